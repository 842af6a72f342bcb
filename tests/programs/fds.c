/* fds: open files, pipes and file mappings that must survive checkpoint/restart.
 *
 * Usage: fds WORKDIR
 * Before READY: a read-write file at an offset; a write-only O_APPEND|O_CLOEXEC log; a
 * read-only file with a dup (shared offset, cloexec only on the original) and a dup2 to
 * fd 100, and the same file opened a second time (own offset); /dev/null, /dev/zero; a
 * pipe holding unread data (read end O_NONBLOCK); a 1 MiB pipe holding 200 KiB; a
 * MAP_PRIVATE writable mapping of a file (at file offset 4096) with one page modified, a
 * MAP_SHARED read-only mapping, and an anonymous region with a PROT_NONE guard page.
 * After WORKDIR/go exists it checks all of them, prints PASS/FAIL lines, "DONE <failures>".
 * Files are only modified after the checks that need them unchanged.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PG 4096
#define BIGPIPE (1 << 20)
#define BIGDATA (200 * 1024)

static int failures = 0;
static char work[2048];

static void report(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", ok ? "PASS" : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (!ok) failures++;
}

static void sleep_ms(long ms) {
    struct timespec d = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&d, NULL);
}

static char *wpath(const char *name) {
    static char b[4][PATH_MAX];
    static int i;
    i = (i + 1) % 4;
    snprintf(b[i], PATH_MAX, "%s/%s", work, name);
    return b[i];
}

static void write_file(const char *name, const void *data, size_t n) {
    int fd = open(wpath(name), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, data, n) != (ssize_t)n) report(0, "setup: writing %s: %s", name, strerror(errno));
    close(fd);
}

static unsigned char pat(size_t i, int seed) { return (unsigned char)((i * 131 + seed * 7 + (i >> 9)) & 0xff); }

static char *fd_path(int fd) {
    static char b[8][PATH_MAX];
    static int i;
    i = (i + 1) % 8;
    char l[64];
    snprintf(l, sizeof l, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(l, b[i], PATH_MAX - 1);
    b[i][n > 0 ? n : 0] = 0;
    if (n <= 0) snprintf(b[i], PATH_MAX, "(readlink: %s)", strerror(errno));
    return b[i];
}

/* The set of open descriptor numbers, as a string. */
static void fd_list(char *out, size_t cap) {
    DIR *d = opendir("/proc/self/fd");
    int fds[256], n = 0, self = d ? dirfd(d) : -1;
    struct dirent *e;
    while (d && (e = readdir(d)) && n < 256) {
        if (e->d_name[0] == '.') continue;
        int fd = atoi(e->d_name);
        if (fd != self) fds[n++] = fd;
    }
    if (d) closedir(d);
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (fds[j] < fds[i]) {
                int t = fds[i];
                fds[i] = fds[j];
                fds[j] = t;
            }
    out[0] = 0;
    for (int i = 0; i < n; i++) snprintf(out + strlen(out), cap - strlen(out), "%s%d", i ? "," : "", fds[i]);
}

/* The /proc/self/maps line for an address (without the inode column). */
static void map_line(void *addr, char *out, size_t cap) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[1024];
    out[0] = 0;
    while (f && fgets(line, sizeof line, f)) {
        unsigned long a, b, off;
        char perms[8], dev[16], path[PATH_MAX] = "";
        unsigned long ino;
        if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %4095s", &a, &b, perms, &off, dev, &ino, path) < 6) continue;
        if ((unsigned long)addr >= a && (unsigned long)addr < b) {
            snprintf(out, cap, "%lx-%lx %s %lx %s", a, b, perms, off, path);
            break;
        }
    }
    if (f) fclose(f);
}

static sigjmp_buf segv_jmp;
static volatile sig_atomic_t segv_count;
static void segv_handler(int sig) {
    (void)sig;
    segv_count++;
    siglongjmp(segv_jmp, 1);
}

static int fl(int fd) { return fcntl(fd, F_GETFL); }
static int fdfl(int fd) { return fcntl(fd, F_GETFD); }
static off_t pos(int fd) { return lseek(fd, 0, SEEK_CUR); }

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    snprintf(work, sizeof work, "%s", argv[1]);
    char gopath[PATH_MAX];
    snprintf(gopath, sizeof gopath, "%s/go", work);

    static unsigned char data[16384];
    for (size_t i = 0; i < sizeof data; i++) data[i] = pat(i, 1);

    /* regular files */
    write_file("rw.dat", data, 1000);
    int rw = open(wpath("rw.dat"), O_RDWR);
    lseek(rw, 37, SEEK_SET);
    int wo = open(wpath("wo.log"), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
    if (write(wo, "line1\n", 6) != 6) report(0, "setup: write wo.log");
    write_file("ro.dat", data, 4000);
    int ro = open(wpath("ro.dat"), O_RDONLY | O_CLOEXEC);
    int ro_dup = dup(ro);
    int ro_100 = dup2(ro, 100);
    lseek(ro, 10, SEEK_SET);
    int ro2 = open(wpath("ro.dat"), O_RDONLY);
    lseek(ro2, 20, SEEK_SET);
    int devnull = open("/dev/null", O_WRONLY);
    int devzero = open("/dev/zero", O_RDONLY);

    /* pipes */
    int pa[2], pb[2];
    if (pipe(pa) || pipe(pb)) return 3;
    fcntl(pa[0], F_SETFL, fl(pa[0]) | O_NONBLOCK);
    size_t pa_len = 0;
    for (int k = 0; k < 10; k++) { /* several writes: several pipe buffers */
        ssize_t w = write(pa[1], data + pa_len, 700 + k * 13);
        if (w > 0) pa_len += w;
    }
    int bsz = fcntl(pb[0], F_SETPIPE_SZ, BIGPIPE);
    if (bsz < BIGPIPE) report(0, "setup: F_SETPIPE_SZ %d: %s", bsz, strerror(errno));
    static unsigned char big[BIGDATA], big_in[BIGDATA];
    for (size_t i = 0; i < BIGDATA; i++) big[i] = pat(i, 2);
    fcntl(pb[1], F_SETFL, fl(pb[1]) | O_NONBLOCK);
    ssize_t bw = write(pb[1], big, BIGDATA);
    fcntl(pb[1], F_SETFL, fl(pb[1]) & ~O_NONBLOCK);
    if (bw != BIGDATA) report(0, "setup: write %d bytes into the big pipe: %zd", BIGDATA, bw);

    /* mappings */
    unsigned char mapdata[4 * PG];
    for (size_t i = 0; i < sizeof mapdata; i++) mapdata[i] = pat(i, 3);
    write_file("map.dat", mapdata, sizeof mapdata);
    unsigned char shdata[2 * PG];
    for (size_t i = 0; i < sizeof shdata; i++) shdata[i] = pat(i, 4);
    write_file("shared.dat", shdata, sizeof shdata);
    int mfd = open(wpath("map.dat"), O_RDWR);
    unsigned char *priv = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, PG);
    close(mfd);
    int sfd = open(wpath("shared.dat"), O_RDONLY);
    unsigned char *shr = mmap(NULL, 2 * PG, PROT_READ, MAP_SHARED, sfd, 0);
    close(sfd);
    if (priv == MAP_FAILED || shr == MAP_FAILED) return 4;
    memset(priv + PG + 100, 0xab, 1000); /* modify the middle page only */
    unsigned char *anon = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(anon, 0x11, PG);
    memset(anon + 2 * PG, 0x33, PG);
    mprotect(anon + PG, PG, PROT_NONE);

    /* record */
    char fds0[1024], priv_map0[512], shr_map0[512], guard_map0[512];
    fd_list(fds0, sizeof fds0);
    map_line(priv, priv_map0, sizeof priv_map0);
    map_line(shr, shr_map0, sizeof shr_map0);
    map_line(anon + PG, guard_map0, sizeof guard_map0);
    char pa_link0[64], pb_link0[64];
    snprintf(pa_link0, sizeof pa_link0, "%s", fd_path(pa[0]));
    snprintf(pb_link0, sizeof pb_link0, "%s", fd_path(pb[0]));
    printf("READY\n");

    struct stat sb;
    while (stat(gopath, &sb) != 0) sleep_ms(10);

    /* ===== checks ===== */
    char fds1[1024];
    fd_list(fds1, sizeof fds1);
    report(strcmp(fds0, fds1) == 0, "open descriptors: %s (were %s)", fds1, fds0);

    /* read-write file */
    unsigned char buf[BIGDATA];
    report(strcmp(fd_path(rw), wpath("rw.dat")) == 0 && pos(rw) == 37 && (fl(rw) & O_ACCMODE) == O_RDWR &&
               !(fl(rw) & O_APPEND) && fdfl(rw) == 0,
           "rw.dat: path %s, offset %ld (want 37), O_RDWR %d, no O_APPEND %d, no cloexec %d", fd_path(rw),
           (long)pos(rw), (fl(rw) & O_ACCMODE) == O_RDWR, !(fl(rw) & O_APPEND), fdfl(rw) == 0);
    ssize_t n = read(rw, buf, 20);
    report(n == 20 && memcmp(buf, data + 37, 20) == 0 && pos(rw) == 57, "rw.dat: read 20 bytes at the offset: %zd",
           n);

    /* write-only append log */
    int f = fl(wo);
    report(strcmp(fd_path(wo), wpath("wo.log")) == 0 && (f & O_ACCMODE) == O_WRONLY && (f & O_APPEND) &&
               fdfl(wo) == FD_CLOEXEC,
           "wo.log: path %s, O_WRONLY %d, O_APPEND %d, FD_CLOEXEC %d", fd_path(wo), (f & O_ACCMODE) == O_WRONLY,
           !!(f & O_APPEND), fdfl(wo) == FD_CLOEXEC);

    /* read-only file, dups, second open */
    report(strcmp(fd_path(ro), wpath("ro.dat")) == 0 && (fl(ro) & O_ACCMODE) == O_RDONLY && fdfl(ro) == FD_CLOEXEC &&
               fdfl(ro_dup) == 0 && fdfl(ro_100) == 0 && ro_100 == 100,
           "ro.dat: path, O_RDONLY, FD_CLOEXEC on fd %d (%d), not on its dups %d and %d (%d %d)", ro, fdfl(ro), ro_dup,
           ro_100, fdfl(ro_dup), fdfl(ro_100));
    report(pos(ro) == 10 && pos(ro_dup) == 10 && pos(ro_100) == 10 && pos(ro2) == 20,
           "offsets: ro %ld, dup %ld, fd100 %ld (want 10), second open %ld (want 20)", (long)pos(ro),
           (long)pos(ro_dup), (long)pos(ro_100), (long)pos(ro2));
    lseek(ro, 1234, SEEK_SET);
    report(pos(ro_dup) == 1234 && pos(ro_100) == 1234 && pos(ro2) == 20,
           "shared offset: after lseek(ro, 1234) dup is at %ld, fd100 at %ld, second open still at %ld",
           (long)pos(ro_dup), (long)pos(ro_100), (long)pos(ro2));
    lseek(ro2, 3000, SEEK_SET);
    n = read(ro_dup, buf, 16);
    report(pos(ro) == 1250 && n == 16 && memcmp(buf, data + 1234, 16) == 0 && pos(ro2) == 3000,
           "independent offsets: ro %ld (want 1250) after reading the dup, second open %ld (want 3000)", (long)pos(ro),
           (long)pos(ro2));

    /* devices */
    memset(buf, 1, 64);
    n = read(devzero, buf, 64);
    int zeros = n == 64;
    for (int i = 0; i < 64; i++) zeros &= buf[i] == 0;
    report(strcmp(fd_path(devzero), "/dev/zero") == 0 && zeros && (fl(devzero) & O_ACCMODE) == O_RDONLY,
           "/dev/zero: %s, read %zd zero bytes", fd_path(devzero), n);
    n = write(devnull, "x", 1);
    report(strcmp(fd_path(devnull), "/dev/null") == 0 && n == 1 && (fl(devnull) & O_ACCMODE) == O_WRONLY,
           "/dev/null: %s, write %zd", fd_path(devnull), n);

    /* pipe with unread data */
    report(strncmp(fd_path(pa[0]), "pipe:", 5) == 0 && strcmp(fd_path(pa[0]), fd_path(pa[1])) == 0 &&
               strcmp(fd_path(pa[0]), fd_path(pb[0])) != 0,
           "pipe: both ends are one pipe: %s %s, the big one %s (before: %s, %s)", fd_path(pa[0]), fd_path(pa[1]),
           fd_path(pb[0]), pa_link0, pb_link0);
    report((fl(pa[0]) & O_NONBLOCK) && !(fl(pa[1]) & O_NONBLOCK) && (fl(pa[0]) & O_ACCMODE) == O_RDONLY &&
               (fl(pa[1]) & O_ACCMODE) == O_WRONLY,
           "pipe flags: read end O_NONBLOCK %d, write end blocking %d", !!(fl(pa[0]) & O_NONBLOCK),
           !(fl(pa[1]) & O_NONBLOCK));
    size_t got = 0;
    while (got < sizeof buf && (n = read(pa[0], buf + got, sizeof buf - got)) > 0) got += n;
    int e = errno;
    report(got == pa_len && memcmp(buf, data, pa_len) == 0 && n == -1 && e == EAGAIN,
           "pipe data: read %zu bytes (want %zu), identical %d, then %s", got, pa_len,
           got == pa_len && memcmp(buf, data, pa_len) == 0, n == -1 ? strerror(e) : "not EAGAIN");

    /* big pipe */
    int sz = fcntl(pb[0], F_GETPIPE_SZ);
    report(sz == BIGPIPE && fcntl(pb[1], F_GETPIPE_SZ) == BIGPIPE, "big pipe: F_GETPIPE_SZ %d (want %d)", sz, BIGPIPE);
    got = 0;
    fcntl(pb[0], F_SETFL, fl(pb[0]) | O_NONBLOCK);
    while (got < BIGDATA && (n = read(pb[0], big_in + got, BIGDATA - got)) > 0) got += n;
    report(got == BIGDATA && memcmp(big_in, big, BIGDATA) == 0, "big pipe data: read %zu bytes (want %d), identical %d",
           got, BIGDATA, got == BIGDATA && memcmp(big_in, big, BIGDATA) == 0);
    n = write(pb[1], big, 100000); /* more than the default 64 KiB capacity, must not block */
    report(n == 100000, "big pipe still takes 100000 bytes: %zd", n);

    /* mappings */
    char line[512];
    map_line(priv, line, sizeof line);
    report(strcmp(line, priv_map0) == 0 && strstr(line, " rw-p 1000 ") && strstr(line, "/map.dat"),
           "MAP_PRIVATE mapping: %s (was %s)", line, priv_map0);
    int ok = memcmp(priv, mapdata + PG, PG) == 0 && memcmp(priv + 2 * PG, mapdata + 3 * PG, PG) == 0 &&
             memcmp(priv + PG, mapdata + 2 * PG, 100) == 0 && priv[PG + 100] == 0xab && priv[PG + 1099] == 0xab &&
             memcmp(priv + PG + 1100, mapdata + 2 * PG + 1100, PG - 1100) == 0;
    report(ok, "MAP_PRIVATE contents: file pages and the modified page");
    int chk = open(wpath("map.dat"), O_RDONLY);
    n = pread(chk, buf, 4 * PG, 0);
    close(chk);
    report(n == 4 * PG && memcmp(buf, mapdata, 4 * PG) == 0, "map.dat on disk unchanged by the private write");
    map_line(shr, line, sizeof line);
    report(strcmp(line, shr_map0) == 0 && strstr(line, " r--s 0 ") && strstr(line, "/shared.dat"),
           "MAP_SHARED mapping: %s (was %s)", line, shr_map0);
    report(memcmp(shr, shdata, sizeof shdata) == 0, "MAP_SHARED contents");
    /* the mapping must really share the file: a write through a descriptor shows in it */
    int w = open(wpath("shared.dat"), O_WRONLY);
    n = pwrite(w, "SHARED!", 7, PG + 5);
    close(w);
    report(n == 7 && memcmp(shr + PG + 5, "SHARED!", 7) == 0, "MAP_SHARED sees a write to the file: '%.7s'",
           shr + PG + 5);
    map_line(anon + PG, line, sizeof line);
    report(strcmp(line, guard_map0) == 0 && strstr(line, " ---p "), "PROT_NONE guard: %s (was %s)", line, guard_map0);
    signal(SIGSEGV, segv_handler);
    volatile unsigned char v = 0;
    int faulted = 0;
    if (sigsetjmp(segv_jmp, 1) == 0) v = anon[PG + 10];
    else faulted = 1;
    signal(SIGSEGV, SIG_DFL);
    report(faulted && anon[0] == 0x11 && anon[PG - 1] == 0x11 && anon[2 * PG] == 0x33 && anon[3 * PG - 1] == 0x33,
           "PROT_NONE guard faults (%d), neighbours keep their data (v %d)", faulted, v);

    /* now the write-only file may change: O_APPEND appends wherever the offset is */
    lseek(wo, 0, SEEK_SET);
    n = write(wo, "line2\n", 6);
    chk = open(wpath("wo.log"), O_RDONLY);
    ssize_t r = read(chk, buf, 100);
    close(chk);
    report(n == 6 && r == 12 && memcmp(buf, "line1\nline2\n", 12) == 0, "wo.log: O_APPEND write appends: %zd bytes",
           r);
    /* and the read-write file is written at its offset */
    n = write(rw, "XYZ", 3);
    chk = open(wpath("rw.dat"), O_RDONLY);
    r = pread(chk, buf, 1000, 0);
    close(chk);
    report(n == 3 && r == 1000 && memcmp(buf + 57, "XYZ", 3) == 0 && memcmp(buf, data, 57) == 0,
           "rw.dat: write lands at offset 57");

    printf("DONE %d\n", failures);
    return failures ? 1 : 0;
}
