/* t_lazy: memory that changes in every way before a lazy restart has loaded it,
 * self-checking.
 *
 * Usage: t_lazy WORKDIR MIB
 * Region R (MIB MiB of private anonymous memory) is filled, except 256 pages in its middle
 * that are never touched (zeros, not in the image), then READY is printed. The program then
 * waits: when WORKDIR/stepK appears (K = 1…5) it takes step K and prints "STEP K"; when
 * WORKDIR/go appears it checks every page against what it expects (a page's content is a
 * function of its number and a version the program keeps; version 0 is a zero page), prints
 * PASS/FAIL lines and "DONE <failures>", and exits with 0 when all passed. Each step touches
 * as little memory as it can, so that after a lazy restart it acts on pages not loaded yet:
 *   1. reads two pages (and checks them);
 *   2. MADV_DONTNEED on 100 pages (which then hold zeros);
 *   3. moves 64 pages elsewhere with mremap;
 *   4. forks a child that checks 10 pages (loaded in the child only) and writes one of
 *      them; the parent checks after the child has ended that its own page did not change;
 *   5. unmaps 32 pages and maps fresh memory there (zeros).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>

static const char *me = "lazy";

#include "report.h"
#include "pages.h"

#define NC 64

static unsigned char *R, *C;
static int *vr, vc[NC];
static long n;


static void step(int k) {
    if (k == 1) {
        report(check(R + PAGE, 1, vr[1]), "page 1 read before go");
        long q = n / 4 + 1;
        report(check(R + q * PAGE, q, vr[q]), "page %ld read before go", q);
    } else if (k == 2) {
        madvise(R + 600 * PAGE, 100 * PAGE, MADV_DONTNEED);
        for (int i = 600; i < 700; i++) vr[i] = 0;
    } else if (k == 3) {
        void *dst = mmap(NULL, NC * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        C = mremap(R + 1024 * PAGE, NC * PAGE, NC * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
        if (C == MAP_FAILED) report(0, "mremap: %s", strerror(errno));
        for (int i = 0; i < NC; i++) vc[i] = vr[1024 + i];
        /* the hole left behind is mapped again, fresh */
        if (mmap(R + 1024 * PAGE, NC * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                 -1, 0) == MAP_FAILED)
            report(0, "mmap into the hole: %s", strerror(errno));
        for (int i = 1024; i < 1024 + NC; i++) vr[i] = 0;
    } else if (k == 4) {
        long base = n - 4000;
        pid_t c = fork();
        if (c == 0) {
            int bad = 0;
            for (long i = base; i < base + 10; i++) bad += !check(R + i * PAGE, i, vr[i]);
            fill(R + base * PAGE, base, 77);
            _exit(bad);
        }
        int st = 0;
        waitpid(c, &st, 0);
        report(WIFEXITED(st) && WEXITSTATUS(st) == 0, "forked child found its pages (status %d)", st);
        report(check(R + base * PAGE, base, vr[base]), "the child's write stayed in the child");
    } else if (k == 5) {
        munmap(R + 1500 * PAGE, 32 * PAGE);
        if (mmap(R + 1500 * PAGE, 32 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                 0) == MAP_FAILED)
            report(0, "mmap after munmap: %s", strerror(errno));
        for (int i = 1500; i < 1532; i++) vr[i] = 0;
    }
    say("STEP %d", k);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    snprintf(work, sizeof work, "%s", argv[1]);
    n = atol(argv[2]) * 256;
    if (n < 8192) return 2;
    R = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    vr = calloc(n, sizeof *vr);
    if (R == MAP_FAILED || !vr) return 3;
    long hole = n / 2;
    for (long i = 0; i < n; i++) {
        if (i >= hole && i < hole + 256) continue;
        vr[i] = 1;
        fill(R + i * PAGE, i, 1);
    }
    say("READY");
    int k = 1;
    while (!exists("go")) {
        char s[32];
        snprintf(s, sizeof s, "step%d", k);
        if (k <= 5 && exists(s)) {
            step(k++);
            continue;
        }
        sleep_ms(5);
    }
    long bad = 0;
    for (long i = 0; i < n; i++) bad += !check(R + i * PAGE, i, vr[i]);
    report(bad == 0, "%ld of %ld pages of the region as expected", n - bad, n);
    if (C) {
        int badc = 0;
        for (int i = 0; i < NC; i++) badc += !check(C + i * PAGE, 1024 + i, vc[i]);
        report(badc == 0, "%d of %d moved pages as expected", NC - badc, NC);
    }
    say("DONE %d", failures);
    return failures ? 1 : 0;
}
