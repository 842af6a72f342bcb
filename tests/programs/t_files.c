/* t_files: a program whose files must come back as they were at the checkpoint.
 *
 * Usage: t_files WORKDIR DIR
 * DIR/in/input.dat (written by the test: INPUT_LEN bytes of in_byte(), mode 0640) is opened
 * read-only and its first 10000 bytes read. The program creates DIR/out/log.dat (read-write)
 * and writes its first 6000 bytes; DIR/shared.dat (8 KiB), mapped MAP_SHARED with its
 * descriptor closed, its first page written through the mapping; and DIR/tmp.dat, written
 * (3000 bytes) then unlinked while open. Prints READY and waits for WORKDIR/go.
 *
 * Then (phase 2): reads input bytes 10000..20000 from its descriptor, appends 4000 bytes to
 * the log (to 10000) and checks all of it, checks the mapped page and writes the second
 * page, checks and extends the unlinked file. Prints WROTE and waits for WORKDIR/go2.
 *
 * Finally checks what is on disk: the log is exactly 10000 bytes of log_byte() (nothing
 * left over from a later run, nothing missing), input.dat has mode 0640 and its offset is
 * 20000, shared.dat holds both pages. PASS/FAIL lines, then "DONE <failures>".
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *me = "t_files";
#include "report.h"

#define INPUT_LEN 200000
#define LOG1 6000
#define LOG2 10000

static unsigned char in_byte(long i) { return (unsigned char)((i * 7 + i / 251) & 0xff); }
static unsigned char log_byte(long i) { return (unsigned char)((i * 13 + i / 509 + 1) & 0xff); }
static unsigned char map_byte(long i) { return (unsigned char)((i * 3 + 1) & 0xff); }
static unsigned char tmp_byte(long i) { return (unsigned char)((i * 11 + 7) & 0xff); }

static long first_bad(unsigned char (*f)(long), const unsigned char *buf, long from, long n) {
    for (long i = 0; i < n; i++)
        if (buf[i] != f(from + i)) return from + i;
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

static void write_pattern(int fd, unsigned char (*f)(long), long from, long to) {
    unsigned char b[4096];
    for (long at = from; at < to;) {
        long n = to - at < (long)sizeof b ? to - at : (long)sizeof b;
        for (long i = 0; i < n; i++) b[i] = f(at + i);
        if (write(fd, b, n) != n) { perror("write"); _exit(2); }
        at += n;
    }
}

static void wait_file(const char *name) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", work, name);
    for (int i = 0; i < 60 * 200; i++) {
        if (access(p, F_OK) == 0) return;
        sleep_ms(5);
    }
    report(0, "timed out waiting for %s", name);
    _exit(100);
}

static void check_pread(int fd, unsigned char (*f)(long), long n, const char *what) {
    static unsigned char buf[INPUT_LEN];
    long got = pread(fd, buf, n, 0);
    long bad = got == n ? first_bad(f, buf, 0, n) : -2;
    report(bad == -1, "%s: %ld bytes read, first bad byte %ld", what, got, bad);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    snprintf(work, sizeof work, "%s", argv[1]);
    const char *dir = argv[2];
    char path[4096];
    static unsigned char buf[INPUT_LEN];

    snprintf(path, sizeof path, "%s/in/input.dat", dir);
    int in = open(path, O_RDONLY);
    if (in < 0) { perror("open input"); return 2; }
    long got = read_full(in, buf, 10000);
    report(got == 10000 && first_bad(in_byte, buf, 0, 10000) == -1, "input first part");

    snprintf(path, sizeof path, "%s/out", dir);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/out/log.dat", dir);
    int log = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (log < 0) { perror("open log"); return 2; }
    write_pattern(log, log_byte, 0, LOG1);

    snprintf(path, sizeof path, "%s/shared.dat", dir);
    int sfd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (sfd < 0 || ftruncate(sfd, 8192) != 0) { perror("shared.dat"); return 2; }
    unsigned char *map = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (map == MAP_FAILED) { perror("mmap"); return 2; }
    close(sfd);
    for (long i = 0; i < 4096; i++) map[i] = map_byte(i);

    snprintf(path, sizeof path, "%s/tmp.dat", dir);
    int tmp = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (tmp < 0) { perror("tmp.dat"); return 2; }
    write_pattern(tmp, tmp_byte, 0, 3000);
    unlink(path);

    say("READY");
    wait_file("go");
    say("resumed");

    got = read_full(in, buf, 10000);
    long bad = first_bad(in_byte, buf, 10000, got);
    report(got == 10000 && bad == -1, "input continues at its offset (%ld bytes, bad %ld)", got,
           bad);
    report(lseek(log, 0, SEEK_CUR) == LOG1, "log offset %ld", (long)lseek(log, 0, SEEK_CUR));
    write_pattern(log, log_byte, LOG1, LOG2);
    check_pread(log, log_byte, LOG2, "log after appending");
    bad = first_bad(map_byte, map, 0, 4096);
    report(bad == -1, "shared mapping's first page (bad %ld)", bad);
    for (long i = 4096; i < 8192; i++) map[i] = map_byte(i);
    msync(map, 8192, MS_SYNC);
    check_pread(tmp, tmp_byte, 3000, "unlinked file");
    report(lseek(tmp, 0, SEEK_CUR) == 3000, "unlinked file offset");
    write_pattern(tmp, tmp_byte, 3000, 4000);
    check_pread(tmp, tmp_byte, 4000, "unlinked file extended");
    say("WROTE");
    wait_file("go2");

    struct stat st;
    long size = fstat(log, &st) == 0 ? (long)st.st_size : -1;
    report(size == LOG2, "log is %ld bytes", size);
    check_pread(log, log_byte, LOG2, "log at the end");
    snprintf(path, sizeof path, "%s/out/log.dat", dir);
    int again = open(path, O_RDONLY);
    report(again >= 0 && fstat(again, &st) == 0 && st.st_size == LOG2,
           "log on disk is the one written");
    if (again >= 0) close(again);
    snprintf(path, sizeof path, "%s/in/input.dat", dir);
    int mode = stat(path, &st) == 0 ? (int)(st.st_mode & 07777) : -1;
    report(mode == 0640, "input mode %o", mode);
    report(lseek(in, 0, SEEK_CUR) == 20000, "input offset");
    snprintf(path, sizeof path, "%s/shared.dat", dir);
    int s2 = open(path, O_RDONLY);
    if (s2 >= 0) {
        check_pread(s2, map_byte, 8192, "shared.dat on disk");
        close(s2);
    } else {
        report(0, "shared.dat cannot be opened");
    }
    say("DONE %d", failures);
    return failures ? 1 : 0;
}
