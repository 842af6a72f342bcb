/* t_reserve.c: memory a checkpoint must leave as it found it. 40 MiB written (enough for a
 * pre-copy), 64 GiB mapped writable (MAP_NORESERVE) and never touched, and a 64 MiB
 * PROT_NONE reserve (as a malloc arena keeps). When WORKDIR/check appears, and again after
 * WORKDIR/go (after a restart), it checks with mincore() that no page of the untouched
 * regions came into memory (write tracking's markers read as pages would map one each),
 * that its page tables stay small (markers over the 64 GiB would need 128 MiB of them) and
 * that every written page is intact; then it writes one page of the untouched region
 * (tracking must see a first write) and, after go, checks that page too. Restarted from a generation
 * taken before the check, it does the same again. Usage: t_reserve WORKDIR */
#include <stdlib.h>
#include <sys/mman.h>

static const char *me = "t_reserve";
#include "pages.h"
#include "report.h"

#define MIB (1L << 20)
#define WRITTEN (40 * MIB)
#define UNTOUCHED (64L << 30)
#define RESERVE (64 * MIB)

static unsigned char *written, *untouched, *reserve;

/* pages of [p, p + len) in memory */
static long resident(unsigned char *p, long len) {
    static unsigned char *vec;
    if (!vec && !(vec = malloc(UNTOUCHED / PAGE))) return -1;
    if (mincore(p, len, vec) != 0) {
        report(0, "mincore: %s", strerror(errno));
        return -1;
    }
    long n = 0;
    for (long i = 0; i < len / PAGE; i++) n += vec[i] & 1;
    return n;
}

/* kB of page tables the process has (VmPTE) */
static long page_tables_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f)) sscanf(line, "VmPTE: %ld", &kb);
    if (f) fclose(f);
    return kb;
}

/* `first_write`: the one page of the untouched region written so far (0: none) */
static void check_all(const char *when, int first_write) {
    long bad = 0;
    for (long i = 0; i < WRITTEN / PAGE; i++) bad += !check(written + i * PAGE, i, 1);
    report(bad == 0, "%s: %ld written pages intact (%ld not)", when, WRITTEN / PAGE - bad, bad);
    long in_untouched = resident(untouched, UNTOUCHED);
    report(in_untouched == first_write, "%s: %ld pages of the untouched region in memory, want %d",
           when, in_untouched, first_write);
    long pte = page_tables_kb();
    report(pte >= 0 && pte < 8192, "%s: %ld kB of page tables", when, pte);
    long in_reserve = resident(reserve, RESERVE);
    report(in_reserve == 0, "%s: %ld pages of the PROT_NONE reserve in memory", when, in_reserve);
    if (first_write) {
        report(check(untouched + UNTOUCHED / 2, 7, 2), "%s: the page written later is intact", when);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    snprintf(work, sizeof work, "%s", argv[1]);
    int anon = MAP_PRIVATE | MAP_ANONYMOUS;
    written = mmap(NULL, WRITTEN, PROT_READ | PROT_WRITE, anon, -1, 0);
    untouched = mmap(NULL, UNTOUCHED, PROT_READ | PROT_WRITE, anon | MAP_NORESERVE, -1, 0);
    reserve = mmap(NULL, RESERVE, PROT_NONE, anon | MAP_NORESERVE, -1, 0);
    if (written == MAP_FAILED || untouched == MAP_FAILED || reserve == MAP_FAILED) return 3;
    for (long i = 0; i < WRITTEN / PAGE; i++) fill(written + i * PAGE, i, 1);
    say("READY");
    while (!exists("check")) sleep_ms(5);
    check_all("after the checkpoints", 0);
    fill(untouched + UNTOUCHED / 2, 7, 2);
    say("CHECKED");
    wait_go();
    check_all("after the restart", 1);
    say("DONE %d", failures);
    return failures ? 1 : 0;
}
