/* t_cycle: a small multi-process job that runs until told to stop, checking itself all the
 * time, for many checkpoint/restart cycles.
 *
 * Usage: t_cycle WORKDIR
 * P (the root) forks C1 and C2. C1 produces items {k, mix(k)} into pipe 1 (1 ms apart);
 * C2 reads them, checks them, transforms them and sends {k, f(mix(k))} on pipe 2; P reads
 * those (2 ms apart until go, so data queues up in both pipes) and checks that k runs 0, 1, 2, …
 * without gap or repeat and that the value is right. Through MAP_SHARED anonymous memory,
 * C1 publishes the last k it produced and C2 the last k it forwarded, before writing to the
 * pipe: P checks it always sees at least the k it receives (writes by another process are
 * visible) and all three count their items there with atomics. P prints "alive N" every 25
 * items. When WORKDIR/go exists, C1 stops and closes pipe 1; C2 and then P see EOF; P
 * checks the shared counts against what it received, the children's exit statuses, and
 * prints PASS/FAIL lines and "DONE <failures>".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *me = "P";

#include "report.h"

struct shared {
    uint64_t produced, forwarded, received;
    uint64_t last_produced, last_forwarded;
};
static struct shared *sh;

static int go_exists(void) {
    char p[4096];
    snprintf(p, sizeof p, "%s/go", work);
    return access(p, F_OK) == 0;
}

static uint64_t mix(uint64_t x) {
    x ^= x >> 31;
    x *= 0x7fb5d329728ea185ull;
    x ^= x >> 27;
    x *= 0x81dadef4bc2dd44dull;
    x ^= x >> 33;
    return x;
}
static uint64_t f(uint64_t v) { return v * 3 + 1; }

struct item {
    uint64_t k, v;
};

static int read_item(int fd, struct item *it) {
    size_t got = 0;
    while (got < sizeof *it) {
        ssize_t n = read(fd, (char *)it + got, sizeof *it - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            if (got) report(0, "EOF inside an item");
            return 0;
        }
        got += n;
    }
    return 1;
}

static void send_item(int fd, struct item *it) {
    ssize_t n;
    while ((n = write(fd, it, sizeof *it)) < 0 && errno == EINTR) {}
    if (n != sizeof *it) {
        report(0, "write: %s", strerror(errno));
        _exit(100);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    snprintf(work, sizeof work, "%s", argv[1]);
    sh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) return 2;
    int p1[2], p2[2];
    if (pipe(p1) || pipe(p2)) return 2;
    pid_t c1 = fork();
    if (c1 == 0) {
        me = "C1";
        close(p1[0]);
        close(p2[0]);
        close(p2[1]);
        for (uint64_t k = 0; !go_exists() && k < 1000000; k++) {
            struct item it = {k, mix(k)};
            __atomic_store_n(&sh->last_produced, k, __ATOMIC_SEQ_CST);
            __atomic_add_fetch(&sh->produced, 1, __ATOMIC_SEQ_CST);
            send_item(p1[1], &it);
            sleep_ms(1);
        }
        _exit(failures ? 100 : 21);
    }
    pid_t c2 = fork();
    if (c2 == 0) {
        me = "C2";
        close(p1[1]);
        close(p2[0]);
        struct item it;
        uint64_t want = 0;
        int bad = 0;
        while (read_item(p1[0], &it)) {
            if (it.k != want || it.v != mix(it.k)) {
                if (bad++ < 5) report(0, "item %lu from C1, want %lu (value %s)", (unsigned long)it.k,
                                      (unsigned long)want, it.v == mix(it.k) ? "right" : "wrong");
            }
            if (__atomic_load_n(&sh->last_produced, __ATOMIC_SEQ_CST) < it.k && bad++ < 5)
                report(0, "C1's shared last_produced %lu is behind the item %lu it sent",
                       (unsigned long)sh->last_produced, (unsigned long)it.k);
            want = it.k + 1;
            it.v = f(it.v);
            __atomic_store_n(&sh->last_forwarded, it.k, __ATOMIC_SEQ_CST);
            __atomic_add_fetch(&sh->forwarded, 1, __ATOMIC_SEQ_CST);
            send_item(p2[1], &it);
        }
        report(bad == 0, "forwarded %lu items, all in order and right", (unsigned long)want);
        _exit(failures ? 100 : 22);
    }
    close(p1[0]);
    close(p1[1]);
    close(p2[1]);
    say("READY");
    struct item it;
    uint64_t want = 0;
    int bad = 0, draining = 0;
    while (read_item(p2[0], &it)) {
        if (it.k != want || it.v != f(mix(it.k))) {
            if (bad++ < 5) report(0, "item %lu from C2, want %lu (value %s)", (unsigned long)it.k, (unsigned long)want,
                                  it.v == f(mix(it.k)) ? "right" : "wrong");
        }
        uint64_t lp = __atomic_load_n(&sh->last_produced, __ATOMIC_SEQ_CST);
        uint64_t lf = __atomic_load_n(&sh->last_forwarded, __ATOMIC_SEQ_CST);
        if ((lp < it.k || lf < it.k) && bad++ < 5)
            report(0, "shared memory is behind: last produced %lu, last forwarded %lu, received %lu",
                   (unsigned long)lp, (unsigned long)lf, (unsigned long)it.k);
        __atomic_add_fetch(&sh->received, 1, __ATOMIC_SEQ_CST);
        want = it.k + 1;
        if (want % 25 == 0) {
            say("alive %lu", (unsigned long)(want / 25));
            draining = go_exists();
        }
        if (!draining) sleep_ms(2); /* slower than C1 while running: data queues up */
    }
    report(bad == 0, "received %lu items, all in order and right", (unsigned long)want);
    int st;
    waitpid(c1, &st, 0);
    report(WIFEXITED(st) && WEXITSTATUS(st) == 21, "C1 exited with 21 (status %#x)", st);
    waitpid(c2, &st, 0);
    report(WIFEXITED(st) && WEXITSTATUS(st) == 22, "C2 exited with 22 (status %#x)", st);
    report(sh->produced == want && sh->forwarded == want && sh->received == want,
           "shared counts: produced %lu, forwarded %lu, received %lu, want %lu each", (unsigned long)sh->produced,
           (unsigned long)sh->forwarded, (unsigned long)sh->received, (unsigned long)want);
    say("DONE %d", failures);
    return failures ? 1 : 0;
}
