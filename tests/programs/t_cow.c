/* t_cow: a process writing its memory as fast as it can while it is checkpointed, for
 * copy-on-write snapshots.
 *
 * Usage: t_cow WORKDIR MIB. The main thread sweeps a buffer of MIB MiB page by page,
 * writing into each page the number of the sweep (gen), and records the page it reached
 * (pos); before each page it looks for WORKDIR/go. A consistent image therefore holds: every
 * page up to pos (or one further: the write in flight at the cut) with gen, every other
 * page with gen - 1. After a restart with WORKDIR/go present, the first thing the sweep does
 * is check exactly that (PASS/FAIL lines, DONE <failures>, exit status = failures).
 *
 * A side thread waits for WORKDIR/side (created by the test after a checkpoint that let the
 * job run on) and checks that the checkpoint left no trace: no SIGCHLD, no child to wait
 * for (not even a zombie), no child listed in /proc; then it prints SIDE DONE.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>

static const char *me = "t_cow";
#include "report.h"

static volatile sig_atomic_t sigchld;
static void on_chld(int s) {
    (void)s;
    sigchld++;
}

static void *side(void *arg) {
    (void)arg;
    while (!exists("side")) sleep_ms(5);
    report(sigchld == 0, "no SIGCHLD during the checkpoint (%d)", (int)sigchld);
    int st;
    errno = 0;
    pid_t r = waitpid(-1, &st, WNOHANG | __WALL);
    report(r == -1 && errno == ECHILD, "no child to wait for (waitpid %d, %s)", (int)r, strerror(errno));
    int children = 0;
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char p[512], buf[256] = {0};
        snprintf(p, sizeof p, "/proc/self/task/%s/children", e->d_name);
        FILE *f = fopen(p, "r");
        if (f) {
            if (fgets(buf, sizeof buf, f) && buf[0]) children++;
            fclose(f);
        }
    }
    if (d) closedir(d);
    report(children == 0, "no child in /proc (%d threads with children)", children);
    say("SIDE DONE");
    return NULL;
}

int main(int argc, char **argv) {
    snprintf(work, sizeof work, "%s", argc > 1 ? argv[1] : ".");
    long mib = argc > 2 ? atol(argv[2]) : 64;
    size_t pages = (size_t)mib * 256;
    signal(SIGCHLD, on_chld);
    uint64_t *buf = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    static volatile uint64_t gen = 1;
    static volatile size_t pos = 0;
    pthread_t t;
    pthread_create(&t, NULL, side, NULL);
    say("READY");
    for (;;) {
        for (size_t i = 0; i < pages; i++) {
            if (exists("go")) {
                uint64_t g = gen;
                size_t p = pos, boundary = pages;
                int bad = 0;
                for (size_t j = 0; j < pages; j++) {
                    uint64_t v = buf[j * 512];
                    if (boundary == pages && v != g) boundary = j;
                    if (j >= boundary && v != g - 1) bad++;
                }
                report(bad == 0, "pages form one sweep (%d out of place)", bad);
                report(boundary == p + 1 || boundary == p + 2 || (p + 1 == pages && boundary == 0),
                       "the sweep stops where it was at the cut (page %zu, recorded %zu, gen %lu)", boundary,
                       p, (unsigned long)g);
                say("DONE %d", failures);
                return failures;
            }
            buf[i * 512] = gen;
            pos = i;
        }
        gen++;
    }
}
