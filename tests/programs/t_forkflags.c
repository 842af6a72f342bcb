/* t_forkflags: memory the kernel leaves out of a fork (MADV_DONTFORK) or hands to it
 * wiped (MADV_WIPEONFORK), whose flags change between checkpoints. A copy-on-write
 * snapshot (a fork) has no such memory, or zeros: it must be read from the job itself.
 *
 * Usage: t_forkflags WORKDIR. Maps three 4 MiB regions: A with MADV_WIPEONFORK, B with
 * MADV_DONTFORK, C plain; fills every page with version 1 (pages.h) and prints READY. When
 * WORKDIR/step exists it writes version 2 everywhere, sets MADV_WIPEONFORK on C and
 * MADV_DOFORK on B (the flags of whole mappings change, their bounds do not) and prints
 * STEP DONE. After a restart, with WORKDIR/go, it checks that every page holds version 2
 * (PASS/FAIL lines, DONE <failures>, exit status = failures).
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/mman.h>

static const char *me = "t_forkflags";
#include "report.h"
#include "pages.h"

#define REGION_PAGES 1024

static unsigned char *region(int advice) {
    unsigned char *p = mmap(NULL, REGION_PAGES * PAGE, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) _exit(98);
    if (advice && madvise(p, REGION_PAGES * PAGE, advice) != 0) _exit(97);
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

int main(int argc, char **argv) {
    snprintf(work, sizeof work, "%s", argc > 1 ? argv[1] : ".");
    unsigned char *a = region(MADV_WIPEONFORK), *b = region(MADV_DONTFORK), *c = region(0);
    fill_all(a, 1);
    fill_all(b, 1);
    fill_all(c, 1);
    say("READY");
    while (!exists("step")) sleep_ms(5);
    fill_all(a, 2);
    fill_all(b, 2);
    fill_all(c, 2);
    if (madvise(c, REGION_PAGES * PAGE, MADV_WIPEONFORK) != 0) _exit(96);
    if (madvise(b, REGION_PAGES * PAGE, MADV_DOFORK) != 0) _exit(95);
    say("STEP DONE");
    while (!exists("go")) sleep_ms(5);
    long bad_a = wrong_pages(a, 2), bad_b = wrong_pages(b, 2), bad_c = wrong_pages(c, 2);
    report(bad_a == 0, "wipe-on-fork region restored (%ld of %d pages wrong)", bad_a, REGION_PAGES);
    report(bad_b == 0, "region no longer don't-fork restored (%ld of %d pages wrong)", bad_b, REGION_PAGES);
    report(bad_c == 0, "region made wipe-on-fork restored (%ld of %d pages wrong)", bad_c, REGION_PAGES);
    say("DONE %d", failures);
    return failures;
}
