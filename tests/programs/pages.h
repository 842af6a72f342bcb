/* pages.h: the page contents t_dirty and t_lazy write and check: a page's content is a
 * function of its number and a version (version 0 is a zero page). */
#ifndef STASIS_TEST_PAGES_H
#define STASIS_TEST_PAGES_H

#include <stdint.h>
#include <string.h>

#define PAGE 4096

/* the content of page `idx` at version `v` (0: zero) */
static void fill(unsigned char *p, long idx, int v) {
    if (v == 0) {
        memset(p, 0, PAGE);
        return;
    }
    uint64_t x = (uint64_t)idx * 0x9e3779b97f4a7c15ull + (uint64_t)v * 0xbf58476d1ce4e5b9ull + 1;
    for (int i = 0; i < PAGE; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
}

static int check(const unsigned char *p, long idx, int v) {
    static unsigned char want[PAGE];
    fill(want, idx, v);
    return memcmp(p, want, PAGE) == 0;
}

#endif
