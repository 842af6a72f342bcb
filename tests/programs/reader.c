/* reader: a program that keeps a data file open for reading (and optionally maps another).
 *
 * Usage: reader WORKDIR DATAFILE [MAPFILE]
 * Opens DATAFILE read-only and reads its first 16 KiB; maps the first 8 KiB of MAPFILE
 * read-only (then closes that descriptor). Prints READY, waits for WORKDIR/go, then reads the
 * rest of the data file's first 64 KiB from where it stopped and checks every byte against
 * the pattern the test wrote (byte i = (i * 7 + i / 251) & 0xff), checks the descriptor's
 * offset, and the mapped bytes. Prints PASS/FAIL lines and "DONE <failures>".
 * Bytes appended to the data file after 64 KiB are ignored (a test may append some and
 * restart with --force).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#define TOTAL 65536
#define FIRST 16384

static int failures = 0;

static unsigned char pattern(long i) { return (unsigned char)((i * 7 + i / 251) & 0xff); }

static void fail(const char *what, long a, long b) {
    printf("FAIL %s: %ld vs %ld\n", what, a, b);
    failures++;
}

static long check(const unsigned char *buf, long from, long n) {
    for (long i = 0; i < n; i++)
        if (buf[i] != pattern(from + i)) return from + i;
    return -1;
}

static long read_full(int fd, unsigned char *buf, long n) {
    long got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) break;
        got += r;
    }
    return got;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    char go[4096];
    snprintf(go, sizeof go, "%s/go", argv[1]);
    static unsigned char buf[TOTAL];
    int fd = open(argv[2], O_RDONLY);
    if (fd < 0) { perror("open data file"); return 2; }
    long got = read_full(fd, buf, FIRST);
    if (got != FIRST) fail("first read length", got, FIRST);
    long bad = check(buf, 0, FIRST);
    if (bad >= 0) fail("first part content differs at", bad, 0);
    const unsigned char *map = NULL;
    if (argc > 3) {
        int mfd = open(argv[3], O_RDONLY);
        if (mfd < 0) { perror("open map file"); return 2; }
        map = mmap(NULL, 8192, PROT_READ, MAP_PRIVATE, mfd, 0);
        if (map == MAP_FAILED) { perror("mmap"); return 2; }
        close(mfd);
        bad = check(map, 0, 8192);
        if (bad >= 0) fail("mapped content before checkpoint differs at", bad, 0);
    }
    printf("READY\n");
    while (access(go, F_OK) != 0) {
        struct timespec d = {0, 10 * 1000 * 1000};
        nanosleep(&d, NULL);
    }
    printf("resumed\n");
    got = read_full(fd, buf + FIRST, TOTAL - FIRST);
    if (got != TOTAL - FIRST) fail("second read length", got, TOTAL - FIRST);
    else printf("PASS second read length\n");
    bad = check(buf + FIRST, FIRST, TOTAL - FIRST);
    if (bad >= 0) fail("second part content differs at", bad, 0);
    else printf("PASS data continues at the saved offset\n");
    long pos = lseek(fd, 0, SEEK_CUR);
    if (pos != TOTAL) fail("file offset", pos, TOTAL);
    else printf("PASS file offset %ld\n", pos);
    if (map) {
        bad = check(map, 0, 8192);
        if (bad >= 0) fail("mapped content differs at", bad, 0);
        else printf("PASS mapped content\n");
    }
    printf("DONE %d\n", failures);
    return failures ? 1 : 0;
}
