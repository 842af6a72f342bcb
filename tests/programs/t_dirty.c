/* t_dirty: memory changed between checkpoints in every way write tracking must notice,
 * self-checking.
 *
 * Usage: t_dirty WORKDIR [PAGES]
 * Region A (PAGES pages of private anonymous memory, 2048 to 16384, default 2048) is
 * filled, then READY is printed. The program then waits: when WORKDIR/stepK appears
 * (K = 1, 2, …) it makes the changes of step K and prints "STEP K"; when WORKDIR/go appears it checks every page it holds against the
 * contents it expects (a page's content is a function of its number and a version the
 * program keeps; version 0 is a zero page), prints PASS/FAIL lines and "DONE <failures>".
 * The steps, meant to be separated by checkpoints:
 *   1. writes 2% of A's pages; MADV_DONTNEED on 10 pages; rewrites part of one page;
 *   2. moves 64 pages of A elsewhere with mremap and maps fresh memory into the hole (10 of
 *      its pages written); replaces 32 pages by a new mapping (munmap, mmap at the same
 *      place) that it fills; writes 11 pages in place;
 *   3. forks a child that overwrites all of A and exits (the parent's pages must not
 *      change); writes 5 pages; refills 5 of the pages zeroed in step 1; MADV_DONTNEED on
 *      8 of the moved pages;
 *   4 and later: writes 1% of A's pages (a different set each time); besides, step 5 maps a
 *      file privately and deletes it (a mapping no checkpoint accepts, so checkpoints
 *      fail until step 6 unmaps it).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>

static const char *me = "dirty";

#include "report.h"
#include "pages.h"

#define NA_MAX 16384
#define NC 64

static int NA = 2048;
static unsigned char *A, *C;
static int va[NA_MAX], vc[NC];
static void set_a(int i, int v) {
    fill(A + (size_t)i * PAGE, i, v);
    va[i] = v;
}

static void step(int k) {
    if (k == 1) {
        for (int i = 7; i < NA; i += 50) set_a(i, va[i] + 1);
        madvise(A + 100 * PAGE, 10 * PAGE, MADV_DONTNEED);
        for (int i = 100; i < 110; i++) va[i] = 0;
        /* the first half of page 200 becomes version 3's: a page partly rewritten */
        unsigned char half[PAGE];
        fill(half, 200, 3);
        memcpy(A + 200 * PAGE, half, PAGE / 2);
        va[200] = -1;
    } else if (k == 2) {
        void *dst = mmap(NULL, NC * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        C = mremap(A + 300 * PAGE, NC * PAGE, NC * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
        if (C == MAP_FAILED) report(0, "mremap: %s", strerror(errno));
        for (int i = 0; i < NC; i++) vc[i] = va[300 + i];
        if (mmap(A + 300 * PAGE, NC * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                 0) == MAP_FAILED)
            report(0, "mmap into the hole: %s", strerror(errno));
        for (int i = 300; i < 300 + NC; i++) va[i] = 0;
        for (int i = 300; i < 310; i++) set_a(i, 7);
        munmap(A + 500 * PAGE, 32 * PAGE);
        if (mmap(A + 500 * PAGE, 32 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                 0) == MAP_FAILED)
            report(0, "mmap after munmap: %s", strerror(errno));
        for (int i = 500; i < 532; i++) set_a(i, 9);
        for (int i = 1000; i < 1011; i++) set_a(i, va[i] + 1);
    } else if (k == 3) {
        pid_t c = fork();
        if (c == 0) {
            memset(A, 0xee, (size_t)NA * PAGE);
            _exit(0);
        }
        waitpid(c, NULL, 0);
        for (int i = 1500; i < 1505; i++) set_a(i, va[i] + 1);
        for (int i = 100; i < 105; i++) set_a(i, 5);
        madvise(C + 8 * PAGE, 8 * PAGE, MADV_DONTNEED);
        for (int i = 8; i < 16; i++) vc[i] = 0;
    } else {
        for (int i = 3 + k; i < NA; i += 100) set_a(i, va[i] + 1);
        static void *doomed;
        if (k == 5) {
            char p[4096];
            snprintf(p, sizeof p, "%s/doomed", work);
            int fd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0600);
            if (fd < 0 || ftruncate(fd, PAGE) != 0) report(0, "doomed file: %s", strerror(errno));
            doomed = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
            if (doomed == MAP_FAILED) report(0, "mmap doomed: %s", strerror(errno));
            ((char *)doomed)[0] = 1;
            close(fd);
            unlink(p);
        } else if (k == 6 && doomed) {
            munmap(doomed, PAGE);
            doomed = NULL;
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    snprintf(work, sizeof work, "%s", argv[1]);
    if (argc > 2) NA = atoi(argv[2]);
    if (NA < 2048 || NA > NA_MAX) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    A = mmap(NULL, (size_t)NA * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (A == MAP_FAILED) return 3;
    for (int i = 0; i < NA; i++) set_a(i, 1);
    /* the mixed page 200 of step 1, computed once */
    static unsigned char mixed[PAGE];
    fill(mixed, 200, 1);
    unsigned char half[PAGE];
    fill(half, 200, 3);
    memcpy(mixed, half, PAGE / 2);
    say("READY");

    int k = 1;
    while (!exists("go")) {
        char name[32];
        snprintf(name, sizeof name, "step%d", k);
        if (exists(name)) {
            step(k);
            say("STEP %d", k);
            k++;
            continue;
        }
        sleep_ms(5);
    }

    int bad = 0, first = -1;
    for (int i = 0; i < NA; i++) {
        int ok = va[i] == -1 ? memcmp(A + (size_t)i * PAGE, mixed, PAGE) == 0 : check(A + (size_t)i * PAGE, i, va[i]);
        if (!ok && bad++ == 0) first = i;
    }
    report(!bad, "region A: %d of %d pages differ (first: page %d)", bad, NA, first);
    if (C) {
        bad = 0, first = -1;
        for (int i = 0; i < NC; i++)
            if (!check(C + (size_t)i * PAGE, 300 + i, vc[i]) && bad++ == 0) first = i;
        report(!bad, "moved pages: %d of %d differ (first: %d)", bad, NC, first);
    }
    report(k > 1, "steps done before go: %d", k - 1);
    say("DONE %d", failures);
    return failures != 0;
}
