/* t_zap: memory dropped (MADV_DONTNEED) or written in the moment after a checkpoint's cut,
 * before write tracking protects the pages again. The next checkpoint must hold the pages
 * as they are then, not as the first one saved them.
 *
 * Usage: t_zap WORKDIR [FILLER_MIB]. With FILLER_MIB, first maps that many MiB more and
 * fills every page of it (version 1), so that the process is large enough for a
 * checkpoint's pre-copy; those pages are checked too (one more PASS/FAIL line). Maps a
 * region of 1024 pages, fills every page with version 1
 * (pages.h), leaves the region's last 256 pages untouched (never present), prints READY.
 * When WORKDIR/zap exists: MADV_DONTNEED on pages 0-99 (zero from then on), version 2
 * into pages 100-199, version 3 into pages 800-809 (never present before), prints ZAPPED.
 * With WORKDIR/go (after a restart) it checks every page (PASS/FAIL lines, DONE
 * <failures>, exit status = failures).
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/mman.h>

static const char *me = "t_zap";
#include "report.h"
#include "pages.h"

#define PAGES 1024
#define TOUCHED 768

int main(int argc, char **argv) {
    snprintf(work, sizeof work, "%s", argc > 1 ? argv[1] : ".");
    long filler = argc > 2 ? atol(argv[2]) * 256 : 0;
    unsigned char *f = NULL;
    if (filler > 0) {
        f = mmap(NULL, (size_t)filler * PAGE, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (f == MAP_FAILED) return 96;
        for (long i = 0; i < filler; i++) fill(f + (size_t)i * PAGE, 100000 + i, 1);
    }
    unsigned char *r = mmap(NULL, (size_t)PAGES * PAGE, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED) return 98;
    static int version[PAGES];
    for (int i = 0; i < TOUCHED; i++) {
        fill(r + (size_t)i * PAGE, i, 1);
        version[i] = 1;
    }
    say("READY");
    while (!exists("zap")) sleep_ms(2);
    if (madvise(r, 100 * PAGE, MADV_DONTNEED) != 0) return 97;
    for (int i = 0; i < 100; i++) version[i] = 0;
    for (int i = 100; i < 200; i++) {
        fill(r + (size_t)i * PAGE, i, 2);
        version[i] = 2;
    }
    for (int i = 800; i < 810; i++) {
        fill(r + (size_t)i * PAGE, i, 3);
        version[i] = 3;
    }
    say("ZAPPED");
    while (!exists("go")) sleep_ms(5);
    int bad[4] = {0, 0, 0, 0};
    for (int i = 0; i < PAGES; i++) {
        int ok = check(r + (size_t)i * PAGE, i, version[i]);
        int part = i < 100 ? 0 : i < 200 ? 1 : (i >= 800 && i < 810) ? 2 : 3;
        bad[part] += !ok;
    }
    report(bad[0] == 0, "pages dropped after the cut are zero (%d of 100 wrong)", bad[0]);
    report(bad[1] == 0, "pages written after the cut hold it (%d of 100 wrong)", bad[1]);
    report(bad[2] == 0, "pages first touched after the cut hold it (%d of 10 wrong)", bad[2]);
    report(bad[3] == 0, "the other pages are unchanged (%d of %d wrong)", bad[3], PAGES - 210);
    if (filler > 0) {
        long wrong = 0;
        for (long i = 0; i < filler; i++) wrong += !check(f + (size_t)i * PAGE, 100000 + i, 1);
        report(wrong == 0, "the filler pages are unchanged (%ld of %ld wrong)", wrong, filler);
    }
    say("DONE %d", failures);
    return failures;
}
