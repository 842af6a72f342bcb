/* t_sharedfd: open file descriptions shared across fork keep one offset.
 *
 * Usage: t_sharedfd WORKDIR
 * The root opens WORKDIR/shared.dat (read-write) and WORKDIR/append.log (O_APPEND) before
 * forking K1, which forks K2 (so three generations share both descriptions). K1 also holds
 * a dup of shared.dat and its own, separate open of the file (its own offset, at 16); K2
 * moves the shared description to fd 50. A token goes round root → K1 → K2 → root through
 * pipes; whoever holds it writes the next 16-byte record through the shared description
 * (without seeking) and a line to the log, and checks that the shared offset is right
 * after the record — which is only so if the others' writes moved it. 30 records before
 * the cut (everyone then blocks: K1 and K2 in read on their token pipe), 30 after. At the
 * end: the offset is 960 in every process, K1's own description is still at 16, kcmp says
 * which descriptors share a description, and both files hold every record once, in order.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RECLEN 16
#define BEFORE 30
#define TOTAL 60

static const char *me = "root";

#include "report.h"
static int datfd, logfd;


static const char *writer_of(int idx) { return idx % 3 == 0 ? "root" : idx % 3 == 1 ? "K1" : "K2"; }

static void record(char *buf, int idx) {
    char tmp[32];
    snprintf(tmp, sizeof tmp, "%05d %-9s\n", idx, writer_of(idx));
    memcpy(buf, tmp, RECLEN);
}

static int errors_in_turns = 0;

/* Writes record idx through the shared description, and a log line. */
static void turn(int idx) {
    char r[RECLEN];
    record(r, idx);
    if (write(datfd, r, RECLEN) != RECLEN) {
        report(0, "write of record %d: %s", idx, strerror(errno));
        return;
    }
    off_t off = lseek(datfd, 0, SEEK_CUR);
    if (off != (off_t)(idx + 1) * RECLEN) {
        report(0, "offset after record %d is %ld, want %d: the offset is not shared", idx, (long)off,
               (idx + 1) * RECLEN);
        errors_in_turns++;
    }
    char l[64];
    int n = snprintf(l, sizeof l, "log %05d by %s\n", idx, writer_of(idx));
    if (write(logfd, l, n) != n) report(0, "log write %d: %s", idx, strerror(errno));
}

static int get_token(int fd) {
    int t;
    ssize_t k;
    while ((k = read(fd, &t, sizeof t)) < 0 && errno == EINTR) {}
    if (k != sizeof t) {
        report(0, "token pipe: read returned %zd (%s)", k, k < 0 ? strerror(errno) : "EOF");
        return -2;
    }
    return t;
}

static void put_token(int fd, int t) {
    if (write(fd, &t, sizeof t) != sizeof t) report(0, "token pipe write: %s", strerror(errno));
}

static int kcmp_file(pid_t a, pid_t b, int fa, int fb) { return syscall(SYS_kcmp, a, b, KCMP_FILE, fa, fb); }

/* A token-passing member: K1 (in 0) or K2. Ends when it gets the stop token (-1). */
static void member(int in, int out, int own) {
    for (;;) {
        int t = get_token(in);
        if (t == -1 || t == -2) {
            off_t off = lseek(datfd, 0, SEEK_CUR);
            report(off == TOTAL * RECLEN, "shared offset at the end is %ld, want %d", (long)off, TOTAL * RECLEN);
            if (own >= 0) {
                off_t o = lseek(own, 0, SEEK_CUR);
                report(o == RECLEN, "own description's offset is %ld, want %d", (long)o, RECLEN);
                char r[RECLEN], want[RECLEN];
                record(want, 1);
                report(read(own, r, RECLEN) == RECLEN && memcmp(r, want, RECLEN) == 0,
                       "own description reads on from its own offset (record 1)");
            }
            report(errors_in_turns == 0, "the shared offset was right after each of my writes");
            if (t == -1) put_token(out, -1);
            _exit(failures ? 100 : 0);
        }
        if (own >= 0 && t == 1) {
            char r[RECLEN], want[RECLEN];
            record(want, 0);
            report(read(own, r, RECLEN) == RECLEN && memcmp(r, want, RECLEN) == 0,
                   "own description reads record 0 before the cut");
        }
        turn(t);
        put_token(out, t + 1);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    snprintf(work, sizeof work, "%s", argv[1]);
    char p[4096];
    snprintf(p, sizeof p, "%s/shared.dat", work);
    datfd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0644);
    snprintf(p, sizeof p, "%s/append.log", work);
    logfd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    if (datfd < 0 || logfd < 0) return 2;
    int t1[2], t2[2], t3[2], info[2];
    if (pipe(t1) || pipe(t2) || pipe(t3) || pipe(info)) return 2;
    pid_t k1 = fork();
    if (k1 == 0) {
        me = "K1";
        int dup_fd = dup(datfd);
        snprintf(p, sizeof p, "%s/shared.dat", work);
        int own = open(p, O_RDONLY);
        pid_t k2 = fork();
        if (k2 == 0) {
            me = "K2";
            if (dup2(datfd, 50) != 50) report(0, "dup2: %s", strerror(errno));
            close(datfd);
            close(dup_fd);
            close(own);
            datfd = 50;
            member(t2[0], t3[1], -1);
        }
        int fds[3] = {k2, dup_fd, own};
        if (write(info[1], fds, sizeof fds) != sizeof fds) report(0, "info pipe");
        member(t1[0], t2[1], own);
    }
    int fds[3];
    if (read(info[0], fds, sizeof fds) != sizeof fds) report(0, "info pipe");
    pid_t k2 = fds[0];
    turn(0);
    put_token(t1[1], 1);
    int t = 0;
    for (;;) {
        t = get_token(t3[0]);
        if (t < 0 || t >= BEFORE) break;
        turn(t);
        put_token(t1[1], t + 1);
    }
    report(t == BEFORE, "%d records written before the cut", t);
    say("READY");
    wait_go();
    off_t off = lseek(datfd, 0, SEEK_CUR);
    report(off == BEFORE * RECLEN, "shared offset right after the cut is %ld, want %d", (long)off, BEFORE * RECLEN);
    report(kcmp_file(getpid(), k1, datfd, datfd) == 0, "kcmp: K1's descriptor is the root's description");
    report(kcmp_file(getpid(), k1, datfd, fds[1]) == 0, "kcmp: K1's dup is the root's description");
    report(kcmp_file(getpid(), k2, datfd, 50) == 0, "kcmp: K2's fd 50 is the root's description");
    report(kcmp_file(getpid(), k2, logfd, logfd) == 0, "kcmp: K2's log descriptor is the root's");
    report(kcmp_file(getpid(), k1, datfd, fds[2]) != 0, "kcmp: K1's own open is another description");
    for (;;) {
        turn(t);
        put_token(t1[1], t + 1);
        t = get_token(t3[0]);
        if (t < 0 || t >= TOTAL) break;
    }
    report(t == TOTAL, "%d records written in all", t);
    put_token(t1[1], -1);
    int st;
    waitpid(k1, &st, 0);
    report(WIFEXITED(st) && WEXITSTATUS(st) == 0, "K1 exited with 0 (status %#x)", st);
    report(get_token(t3[0]) == -1, "K2 passed the stop token on");
    off = lseek(datfd, 0, SEEK_CUR);
    report(off == TOTAL * RECLEN, "shared offset at the end is %ld, want %d", (long)off, TOTAL * RECLEN);
    report(errors_in_turns == 0, "the shared offset was right after each of my writes");
    char buf[TOTAL * RECLEN + 100];
    ssize_t n = pread(datfd, buf, sizeof buf, 0);
    int bad = 0;
    for (int i = 0; i < TOTAL; i++) {
        char r[RECLEN];
        record(r, i);
        if (n < (i + 1) * RECLEN || memcmp(buf + i * RECLEN, r, RECLEN)) bad++;
    }
    report(n == TOTAL * RECLEN && bad == 0, "shared.dat holds every record once, in order (%zd bytes, %d wrong)", n,
           bad);
    snprintf(p, sizeof p, "%s/append.log", work);
    FILE *f = fopen(p, "r");
    char line[128];
    int i = 0, lbad = 0;
    while (f && fgets(line, sizeof line, f)) {
        char want[64];
        snprintf(want, sizeof want, "log %05d by %s\n", i, writer_of(i));
        if (strcmp(line, want)) lbad++;
        i++;
    }
    if (f) fclose(f);
    report(i == TOTAL && lbad == 0, "append.log holds every line once, in order (%d lines, %d wrong)", i, lbad);
    say("DONE %d", failures);
    return failures ? 1 : 0;
}
