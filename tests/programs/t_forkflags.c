/* t_forkflags: memory the kernel leaves out of a fork (MADV_DONTFORK) or hands to it
 * wiped (MADV_WIPEONFORK), whose flags change between checkpoints. A copy-on-write
 * snapshot (a fork) has no such memory, or zeros: it must be read from the job itself.
 * The advice itself must come back with the memory at restart.
 *
 * Usage: t_forkflags WORKDIR [few]. Maps four 4 MiB regions: A with MADV_WIPEONFORK, B with
 * MADV_DONTFORK, C plain, D with MADV_DONTFORK and MADV_DONTDUMP; fills every page with
 * version 1 (pages.h) and prints READY. When WORKDIR/step exists it writes version 2
 * everywhere, sets MADV_WIPEONFORK on C and MADV_DOFORK on B (the flags of whole mappings
 * change, their bounds do not), maps E with MADV_WIPEONFORK (a mapping the previous
 * checkpoint never saw), fills it like the others, maps F right below plain region G
 * (filled at the start like A-D) and leaves it untouched (write tracking's registration
 * at the next cut merges F into G), and prints STEP DONE. After a restart, with WORKDIR/go, it
 * first forks a child, before touching any page, that must see A, C and E as zeros, B as
 * version 2 and no D at all; then checks that every page holds version 2 and that D still
 * carries both advices (/proc/self/smaps) (PASS/FAIL lines, DONE <failures>, exit status
 * = failures). With `few`, the step writes nothing (every page keeps version 1) and only
 * changes the flags: the next checkpoint then copies what little changed at the cut
 * instead of taking a snapshot, and still owes the restart the new advice.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>

static const char *me = "t_forkflags";
#include "report.h"
#include "pages.h"

#define REGION_PAGES 1024
#define REGION_LEN (REGION_PAGES * PAGE)

static unsigned char *region(int advice, int more) {
    unsigned char *p = mmap(NULL, REGION_LEN, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) _exit(98);
    if (advice && madvise(p, REGION_LEN, advice) != 0) _exit(97);
    if (more && madvise(p, REGION_LEN, more) != 0) _exit(97);
    return p;
}

static void fill_all(unsigned char *p, int v) {
    for (long i = 0; i < REGION_PAGES; i++) fill(p + i * PAGE, i, v);
}

static long wrong_pages(const unsigned char *p, int v) {
    long bad = 0;
    for (long i = 0; i < REGION_PAGES; i++) bad += !check(p + i * PAGE, i, v);
    return bad;
}

/* whether the mapping starting at `p` carries VmFlags `flag` in /proc/self/smaps */
static int has_vmflag(const void *p, const char *flag) {
    char want[32], line[512];
    snprintf(want, sizeof want, "%lx-", (unsigned long)p);
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return 0;
    int in = 0, found = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, want, strlen(want)) == 0) in = 1;
        else if (in && strncmp(line, "VmFlags:", 8) == 0) {
            char needle[8];
            snprintf(needle, sizeof needle, " %s", flag);
            found = strstr(line, needle) != NULL;
            break;
        }
    }
    fclose(f);
    return found;
}

int main(int argc, char **argv) {
    snprintf(work, sizeof work, "%s", argc > 1 ? argv[1] : ".");
    const int v = argc > 2 && strcmp(argv[2], "few") == 0 ? 1 : 2;
    unsigned char *a = region(MADV_WIPEONFORK, 0), *b = region(MADV_DONTFORK, 0);
    unsigned char *c = region(0, 0), *d = region(MADV_DONTFORK, MADV_DONTDUMP);
    /* G with a hole below it for F */
    unsigned char *g = mmap(NULL, 2 * REGION_LEN, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g == MAP_FAILED || munmap(g, REGION_LEN) != 0) _exit(98);
    unsigned char *f = g;
    g += REGION_LEN;
    fill_all(g, 1);
    fill_all(a, 1);
    fill_all(b, 1);
    fill_all(c, 1);
    fill_all(d, 1);
    say("READY");
    while (!exists("step")) sleep_ms(5);
    if (v == 2) {
        fill_all(a, 2);
        fill_all(b, 2);
        fill_all(c, 2);
        fill_all(d, 2);
    }
    if (madvise(c, REGION_LEN, MADV_WIPEONFORK) != 0) _exit(96);
    if (madvise(b, REGION_LEN, MADV_DOFORK) != 0) _exit(95);
    /* F first: E would take the hole */
    if (mmap(f, REGION_LEN, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) != f)
        _exit(94);
    unsigned char *e = region(MADV_WIPEONFORK, 0);
    fill_all(e, v);
    say("STEP DONE");
    while (!exists("go")) sleep_ms(5);
    /* The child is forked before the parent reads its pages: restarted lazily, they may
     * not be loaded yet, and the child must still see the advice's effect. */
    pid_t child = fork();
    if (child == 0) {
        /* exit status: one bit per wrong finding */
        int st = 0;
        if (wrong_pages(a, 0) != 0 || wrong_pages(e, 0) != 0) st |= 1;
        if (wrong_pages(c, 0) != 0) st |= 2;
        if (wrong_pages(b, v) != 0) st |= 4;
        if (msync(d, PAGE, MS_ASYNC) == 0) st |= 8; /* D must not be mapped here */
        _exit(st);
    }
    int status = -1;
    if (child < 0 || waitpid(child, &status, 0) != child) status = -1;
    int st = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    long bad_a = wrong_pages(a, v) + wrong_pages(e, v), bad_b = wrong_pages(b, v), bad_c = wrong_pages(c, v);
    long bad_d = wrong_pages(d, v);
    report(bad_a == 0, "wipe-on-fork regions restored (%ld of %d pages wrong)", bad_a, 2 * REGION_PAGES);
    report(bad_b == 0, "region no longer don't-fork restored (%ld of %d pages wrong)", bad_b, REGION_PAGES);
    report(bad_c == 0, "region made wipe-on-fork restored (%ld of %d pages wrong)", bad_c, REGION_PAGES);
    report(bad_d == 0, "don't-fork, don't-dump region restored (%ld of %d pages wrong)", bad_d, REGION_PAGES);
    report(has_vmflag(d, "dc") && has_vmflag(d, "dd"), "don't-fork and don't-dump advice kept");
    long bad_fg = wrong_pages(f, 0) + wrong_pages(g, 1);
    report(bad_fg == 0, "region merged at the cut restored (%ld of %d pages wrong)", bad_fg,
           2 * REGION_PAGES);
    report(st == 0, "a forked child sees the advice (wiped A and E %s, wiped C %s, B %s, D %s)",
           st < 0 ? "?" : st & 1 ? "no" : "yes", st < 0 ? "?" : st & 2 ? "no" : "yes",
           st < 0 ? "?" : st & 4 ? "wrong" : "copied", st < 0 ? "?" : st & 8 ? "present" : "absent");
    say("DONE %d", failures);
    return failures;
}
