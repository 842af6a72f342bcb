/* t_pipes: pipes between processes with data in flight at the cut.
 *
 * Usage: t_pipes WORKDIR
 *
 * Pipe A (256 KiB): writers W1 and W2 share the write end; readers R1 and R2 (and the root,
 *   which never reads it before go) share the read end. Each writer sends NREC 32-byte
 *   records (atomic writes) {writer, seq, hash…}. Before the cut R1 has read 100 records and
 *   the pipe is full again (258944 bytes queued, both writers blocked in write). After go
 *   the readers drain it; each checks every record's hash and that each writer's sequence
 *   numbers grow; the root checks that together they got every record exactly once (count,
 *   sum and sum of squares of the sequence numbers per writer).
 * Pipe B (128 KiB): writer W3 sends a byte stream of BLEN bytes in writes of varying sizes;
 *   before the cut 50000 bytes are written and R3 has read 10000 (40000 queued). After go,
 *   R3 reads it in reads of varying sizes and checks every byte and the total: each byte
 *   exactly once, in order.
 * Pipe C (default size): W4 wrote 5000 bytes and exited before the cut: no writer is left.
 *   After go R3 must read exactly those bytes, then EOF (a leaked write end would hang it).
 * Every process reports PASS/FAIL lines on the shared stdout; results reach the root over a
 * results pipe; the root checks each child's exit status and prints DONE.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NREC 16384
#define REC 32
#define ASIZE (256 * 1024)
#define BSIZE (128 * 1024)
#define BLEN 1000000
#define BPRE 50000
#define BREAD 10000
#define CLEN 5000

static const char *me = "root";

#include "report.h"


static uint32_t mix(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352d;
    x ^= x >> 15;
    x *= 0x846ca68b;
    x ^= x >> 16;
    return x;
}

static unsigned char bpat(uint64_t i) { return (unsigned char)(mix((uint32_t)i * 2654435761u + 17) >> 5); }
static unsigned char cpat(uint64_t i) { return (unsigned char)(mix((uint32_t)i + 0xc0ffee) >> 3); }

struct rec {
    uint32_t writer, seq, h[6];
};

static void make_rec(struct rec *r, uint32_t w, uint32_t s) {
    r->writer = w;
    r->seq = s;
    for (int i = 0; i < 6; i++) r->h[i] = mix(w * 1000003u + s * 7u + i);
}

/* What a reader of pipe A sends to the root. */
struct tally {
    uint32_t reader;
    uint64_t count[2], sum[2], sumsq[2];
};

static int writefull(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        n -= k;
    }
    return 0;
}

static void writer_a(int wfd, uint32_t w) {
    struct rec r;
    for (uint32_t s = 0; s < NREC; s++) {
        make_rec(&r, w, s);
        ssize_t k;
        while ((k = write(wfd, &r, REC)) < 0 && errno == EINTR) {}
        if (k != REC) {
            report(0, "write of record %u returned %zd (%s)", s, k, strerror(errno));
            _exit(100);
        }
    }
    report(1, "sent %d records", NREC);
    _exit(failures ? 100 : 30 + w);
}

/* Reads one record; 0 at EOF. */
static int read_rec(int rfd, struct rec *r) {
    size_t got = 0;
    while (got < REC) {
        ssize_t k = read(rfd, (char *)r + got, REC - got);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) {
            report(0, "read: %s", strerror(errno));
            return 0;
        }
        if (k == 0) {
            if (got) report(0, "EOF inside a record (%zu bytes)", got);
            return 0;
        }
        if (got == 0 && k != REC) report(0, "a read returned %zd bytes of a record: records were split", k);
        got += k;
    }
    return 1;
}

static void reader_a(int rfd, int resfd, uint32_t id, int before, int readyfd) {
    struct tally t;
    memset(&t, 0, sizeof t);
    t.reader = id;
    int64_t last[2] = {-1, -1};
    int bad = 0, order = 0;
    struct rec r, want;
    int n = 0;
    for (; n < before && read_rec(rfd, &r); n++) {
        /* accounted below, same as after go */
        if (r.writer > 1) { bad++; continue; }
        make_rec(&want, r.writer, r.seq);
        if (memcmp(&r, &want, REC) || r.seq >= NREC) bad++;
        if ((int64_t)r.seq <= last[r.writer]) order++;
        last[r.writer] = r.seq;
        t.count[r.writer]++; t.sum[r.writer] += r.seq; t.sumsq[r.writer] += (uint64_t)r.seq * r.seq;
    }
    if (write(readyfd, "r", 1) != 1) report(0, "ready pipe");
    wait_go();
    while (read_rec(rfd, &r)) {
        if (r.writer > 1) { bad++; continue; }
        make_rec(&want, r.writer, r.seq);
        if (memcmp(&r, &want, REC) || r.seq >= NREC) bad++;
        if ((int64_t)r.seq <= last[r.writer]) order++;
        last[r.writer] = r.seq;
        t.count[r.writer]++; t.sum[r.writer] += r.seq; t.sumsq[r.writer] += (uint64_t)r.seq * r.seq;
    }
    report(bad == 0, "records intact (%d damaged)", bad);
    report(order == 0, "each writer's records in order (%d out of order)", order);
    report(1, "read %lu + %lu records", (unsigned long)t.count[0], (unsigned long)t.count[1]);
    if (write(resfd, &t, sizeof t) != sizeof t) report(0, "results pipe");
    _exit(failures ? 100 : 40 + id);
}

static void writer_b(int wfd, int readyfd) {
    static unsigned char buf[8192];
    uint64_t pos = 0, k = 0;
    while (pos < BLEN) {
        if (pos == BPRE) {
            if (write(readyfd, "r", 1) != 1) report(0, "ready pipe");
            wait_go();
        }
        size_t n = 1 + mix(k++) % 7000;
        if (pos < BPRE && pos + n > BPRE) n = BPRE - pos;
        if (pos + n > BLEN) n = BLEN - pos;
        for (size_t i = 0; i < n; i++) buf[i] = bpat(pos + i);
        if (writefull(wfd, buf, n)) {
            report(0, "W3: write at %lu: %s", (unsigned long)pos, strerror(errno));
            _exit(100);
        }
        pos += n;
    }
    report(1, "sent %d bytes", BLEN);
    _exit(failures ? 100 : 33);
}

/* Reads pipe `fd` until EOF (20 s timeout), checking bytes against pat from `pos`. */
static uint64_t read_stream(int fd, uint64_t pos, uint64_t limit, unsigned char (*pat)(uint64_t), const char *name,
                            int *bad, uint64_t *first_bad) {
    static unsigned char buf[9000];
    uint64_t k = 0;
    while (pos < limit) {
        struct pollfd p = {fd, POLLIN, 0};
        int r = poll(&p, 1, 20000);
        if (r < 0 && errno == EINTR) continue;
        if (r == 0) {
            report(0, "%s: no data and no EOF for 20 s at byte %lu", name, (unsigned long)pos);
            return pos;
        }
        size_t want = 1 + mix(k++ + 99) % 8999;
        if (want > limit - pos) want = limit - pos;
        ssize_t n = read(fd, buf, want);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            report(0, "%s: read: %s", name, strerror(errno));
            return pos;
        }
        if (n == 0) break;
        for (ssize_t i = 0; i < n; i++)
            if (buf[i] != pat(pos + i)) {
                if (!*bad) *first_bad = pos + i;
                (*bad)++;
            }
        pos += n;
    }
    return pos;
}

static void reader_bc(int bfd, int cfd, int readyfd) {
    me = "R3";
    int bad = 0;
    uint64_t first_bad = 0;
    uint64_t pos = read_stream(bfd, 0, BREAD, bpat, "pipe B", &bad, &first_bad);
    report(pos == BREAD, "read %lu bytes of pipe B before the cut, want %d", (unsigned long)pos, BREAD);
    if (write(readyfd, "r", 1) != 1) report(0, "ready pipe");
    wait_go();
    pos = read_stream(bfd, pos, UINT64_MAX, bpat, "pipe B", &bad, &first_bad);
    report(pos == BLEN, "pipe B: %lu bytes until EOF, want %d", (unsigned long)pos, BLEN);
    report(bad == 0, "pipe B: every byte as sent, in order (%d wrong, first at %lu)", bad,
           (unsigned long)first_bad);
    bad = 0;
    pos = read_stream(cfd, 0, UINT64_MAX, cpat, "pipe C", &bad, &first_bad);
    report(pos == CLEN, "pipe C (writer gone): %lu bytes then EOF, want %d", (unsigned long)pos, CLEN);
    report(bad == 0, "pipe C: every byte as sent (%d wrong)", bad);
    _exit(failures ? 100 : 43);
}

static int queued(int fd) {
    int n = -1;
    if (ioctl(fd, FIONREAD, &n) < 0) return -1;
    return n;
}

static void reap(pid_t pid, const char *name, int code) {
    int st = 0;
    pid_t r;
    while ((r = waitpid(pid, &st, 0)) < 0 && errno == EINTR) {}
    report(r == pid && WIFEXITED(st) && WEXITSTATUS(st) == code, "child %s exited with %d (status %#x)", name, code,
           st);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    snprintf(work, sizeof work, "%s", argv[1]);
    int a[2], b[2], c[2], res[2], rdy[2];
    if (pipe(a) || pipe(b) || pipe(c) || pipe(res) || pipe(rdy)) return 2;
    if (fcntl(a[1], F_SETPIPE_SZ, ASIZE) != ASIZE) report(0, "F_SETPIPE_SZ A: %s", strerror(errno));
    if (fcntl(b[1], F_SETPIPE_SZ, BSIZE) != BSIZE) report(0, "F_SETPIPE_SZ B: %s", strerror(errno));

    pid_t w4 = fork();
    if (w4 == 0) {
        me = "W4";
        unsigned char buf[CLEN];
        for (int i = 0; i < CLEN; i++) buf[i] = cpat(i);
        if (writefull(c[1], buf, CLEN)) _exit(100);
        _exit(34);
    }
    pid_t pids[6];
    const char *names[6] = {"W1", "W2", "R1", "R2", "W3", "R3"};
    const int codes[6] = {30, 31, 40, 41, 33, 43};
    for (int i = 0; i < 6; i++) {
        pids[i] = fork();
        if (pids[i] != 0) continue;
        me = names[i];
        close(res[0]);
        close(rdy[0]);
        switch (i) {
        case 0:
        case 1:
            close(a[0]); close(b[0]); close(b[1]); close(c[0]); close(c[1]);
            writer_a(a[1], i);
            break;
        case 2:
        case 3:
            close(a[1]); close(b[0]); close(b[1]); close(c[0]); close(c[1]);
            reader_a(a[0], res[1], i - 2, i == 2 ? 100 : 0, rdy[1]);
            break;
        case 4:
            close(a[0]); close(a[1]); close(b[0]); close(c[0]); close(c[1]);
            writer_b(b[1], rdy[1]);
            break;
        case 5:
            close(a[0]); close(a[1]); close(b[1]); close(c[1]);
            reader_bc(b[0], c[0], rdy[1]);
            break;
        }
        _exit(100);
    }
    close(a[1]);
    close(b[0]);
    close(b[1]);
    close(c[0]);
    close(c[1]);
    close(res[1]);
    close(rdy[1]);
    reap(w4, "W4", 34);
    /* R1, R2, W3, R3 are set up; then pipe A must be full with R1's 100 records gone. */
    char ch;
    for (int got = 0; got < 4;) {
        ssize_t k = read(rdy[0], &ch, 1);
        if (k == 1) got++;
        else if (!(k < 0 && errno == EINTR)) { report(0, "ready pipe"); break; }
    }
    int want = ASIZE - 100 * REC, q = -1;
    for (int i = 0; i < 2000 && (q = queued(a[0])) != want; i++) sleep_ms(5);
    report(q == want, "pipe A holds %d bytes before the cut, want %d", q, want);
    say("READY");
    wait_go();
    report(fcntl(a[0], F_GETPIPE_SZ) == ASIZE, "pipe A size %d after the cut, want %d", fcntl(a[0], F_GETPIPE_SZ),
           ASIZE);
    close(a[0]);
    struct tally t[2];
    memset(t, 0, sizeof t);
    for (int i = 0; i < 2; i++) {
        struct tally x;
        ssize_t k;
        while ((k = read(res[0], &x, sizeof x)) < 0 && errno == EINTR) {}
        if (k != sizeof x || x.reader > 1) {
            report(0, "results pipe: %zd", k);
            continue;
        }
        t[x.reader] = x;
    }
    uint64_t n = NREC, sum = n * (n - 1) / 2, sumsq = (n - 1) * n * (2 * n - 1) / 6;
    for (int w = 0; w < 2; w++) {
        uint64_t cnt = t[0].count[w] + t[1].count[w], s = t[0].sum[w] + t[1].sum[w],
                 sq = t[0].sumsq[w] + t[1].sumsq[w];
        report(cnt == n && s == sum && sq == sumsq,
               "pipe A: every record of W%d read exactly once (count %lu sum %lu sumsq %lu, want %lu %lu %lu)", w + 1,
               (unsigned long)cnt, (unsigned long)s, (unsigned long)sq, (unsigned long)n, (unsigned long)sum,
               (unsigned long)sumsq);
    }
    for (int i = 0; i < 6; i++) reap(pids[i], names[i], codes[i]);
    say("DONE %d", failures);
    return failures ? 1 : 0;
}
