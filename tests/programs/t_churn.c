/* t_churn: memory written all the time, checkpoints or not, self-checking.
 *
 * Usage: t_churn WORKDIR
 * A writer thread writes, one after the other, the values s = 1, 2, 3, … each into page
 * page_of(s) of a 64 MiB region (16384 pages, a pseudo-random page each time), about 20000
 * a second, and publishes s as `last` after each write. At any instant, and so at any
 * checkpoint's cut, every page holds the largest s <= last that maps to it (or 0). Pages
 * are written during every checkpoint, also in the moments after the cut while a
 * copy-on-write snapshot is read and the pages are protected again for write tracking.
 * After READY, when WORKDIR/go exists, the writer is stopped and every page is checked
 * against what `last` implies: PASS/FAIL lines and "DONE <failures>".
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static const char *me = "churn";

#include "report.h"

#define PAGE 4096
#define NPAGES 16384

static uint64_t *region;
static _Atomic uint64_t last;
static atomic_int stop;

static uint64_t page_of(uint64_t s) {
    s ^= s >> 31;
    s *= 0x7fb5d329728ea185ull;
    s ^= s >> 27;
    return s % NPAGES;
}

static void *writer(void *arg) {
    (void)arg;
    uint64_t s = atomic_load(&last);
    while (!atomic_load(&stop)) {
        for (int k = 0; k < 20; k++) {
            s++;
            uint64_t *p = region + page_of(s) * (PAGE / 8);
            p[0] = s;
            p[PAGE / 8 - 1] = ~s;
            atomic_store(&last, s);
        }
        struct timespec d = {0, 1000000};
        nanosleep(&d, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    snprintf(work, sizeof work, "%s", argv[1]);
    setvbuf(stdout, NULL, _IONBF, 0);
    region = mmap(NULL, (size_t)NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) return 3;
    /* every page present from the start, holding 0 */
    for (size_t i = 0; i < NPAGES; i++) region[i * (PAGE / 8) + 1] = 1;
    pthread_t t;
    pthread_create(&t, NULL, writer, NULL);
    while (atomic_load(&last) < 1000) sleep_ms(1);
    say("READY");
    wait_go();
    atomic_store(&stop, 1);
    pthread_join(t, NULL);

    uint64_t n = atomic_load(&last);
    uint64_t *want = calloc(NPAGES, sizeof *want);
    for (uint64_t s = 1; s <= n; s++) want[page_of(s)] = s;
    int bad = 0;
    long first = -1;
    for (size_t i = 0; i < NPAGES; i++) {
        uint64_t *p = region + i * (PAGE / 8);
        uint64_t tail = want[i] ? ~want[i] : 0;
        if (p[0] != want[i] || p[PAGE / 8 - 1] != tail || p[1] != 1) {
            if (!bad++) first = (long)i;
        }
    }
    report(!bad, "%d of %d pages differ from what %llu writes leave (first: page %ld, holds %llu, want %llu)", bad,
           NPAGES, (unsigned long long)n, first, first >= 0 ? (unsigned long long)region[first * (PAGE / 8)] : 0ull,
           first >= 0 ? (unsigned long long)want[first] : 0ull);
    report(n > 1000, "writes made: %llu", (unsigned long long)n);
    say("DONE %d", failures);
    return failures != 0;
}
