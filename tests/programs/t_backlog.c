/* t_backlog: sockets under back-pressure, and connections nobody has accepted yet.
 *
 * Usage: t_backlog WORKDIR. Sets up, inside one process:
 * - a TCP loopback connection (a -> b) that a fills, without blocking, until the kernel takes
 *   no more: b's receive buffer is full and a still holds bytes it could not send; b sends a
 *   few bytes the other way, which a does not read yet;
 * - a TCP listening socket with a client connected to it that the server has not accepted;
 * - a unix stream listening socket (abstract name) with a client not yet accepted.
 * Prints READY with the number of bytes in flight, waits for WORKDIR/go, then checks that b
 * receives exactly the bytes a sent, in order, then more sent after the restart; that a reads
 * b's bytes; that both pending connections are accepted and carry a message each way.
 * PASS/FAIL lines and DONE <failures>.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static const char *me = "t_backlog";
#include "report.h"

/* Byte i of the stream a sends. */
static unsigned char byte_at(unsigned long i) { return (unsigned char)(i * 7 + i / 251); }

static int tcp_listener(struct sockaddr_in *addr) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    socklen_t len = sizeof *addr;
    memset(addr, 0, sizeof *addr);
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (l < 0 || bind(l, (struct sockaddr *)addr, sizeof *addr) || listen(l, 8) ||
        getsockname(l, (struct sockaddr *)addr, &len)) {
        report(0, "tcp listener: %s", strerror(errno));
        _exit(1);
    }
    return l;
}

static int tcp_connect(const struct sockaddr_in *addr) {
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (const struct sockaddr *)addr, sizeof *addr)) {
        report(0, "tcp connect: %s", strerror(errno));
        _exit(1);
    }
    return c;
}

/* Reads exactly n bytes (blocking). */
static int read_all(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

/* Accepts one connection and exchanges "ping"/"pong" with its client. */
static void exchange(const char *what, int listener, int client) {
    int s = accept(listener, NULL, NULL);
    char buf[5] = {0};
    int ok = s >= 0 && write(client, "ping", 4) == 4 && read_all(s, buf, 4) == 0 &&
             memcmp(buf, "ping", 4) == 0 && write(s, "pong", 4) == 4 &&
             read_all(client, buf, 4) == 0 && memcmp(buf, "pong", 4) == 0;
    report(ok, "%s: the connection waiting to be accepted is accepted and carries data", what);
    /* Nothing else was waiting. */
    int flags = fcntl(listener, F_GETFL);
    fcntl(listener, F_SETFL, flags | O_NONBLOCK);
    int extra = accept(listener, NULL, NULL);
    report(extra < 0 && errno == EAGAIN, "%s: no other connection was waiting", what);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    snprintf(work, sizeof work, "%s", argv[1]);

    /* a -> b under back-pressure. */
    struct sockaddr_in addr;
    int l = tcp_listener(&addr);
    int a = tcp_connect(&addr);
    int b = accept(l, NULL, NULL);
    fcntl(a, F_SETFL, fcntl(a, F_GETFL) | O_NONBLOCK);
    unsigned char chunk[65536];
    unsigned long sent = 0;
    for (;;) {
        for (size_t i = 0; i < sizeof chunk; i++) chunk[i] = byte_at(sent + i);
        ssize_t n = write(a, chunk, sizeof chunk);
        if (n < 0 && errno == EAGAIN) {
            /* The window may open a little later: try once more after a pause. */
            sleep_ms(50);
            n = write(a, chunk, sizeof chunk);
            if (n < 0 && errno == EAGAIN) break;
        }
        if (n <= 0) {
            report(0, "filling the connection: %s", strerror(errno));
            return 1;
        }
        sent += (unsigned long)n;
    }
    const char back[] = "bytes from b to a";
    if (write(b, back, sizeof back) != (ssize_t)sizeof back) report(0, "b -> a");

    /* A TCP client not yet accepted. */
    int l2 = tcp_listener(&addr);
    int c2 = tcp_connect(&addr);

    /* A unix client not yet accepted. */
    struct sockaddr_un ua = {.sun_family = AF_UNIX};
    char name[64];
    unsigned long h = 5381; /* the work directory names the test run: a name of its own */
    for (const char *p = work; *p; p++) h = h * 33 + (unsigned char)*p;
    int nlen = snprintf(name, sizeof name, "stasis-backlog-%lx", h);
    memcpy(ua.sun_path + 1, name, (size_t)nlen);
    socklen_t ulen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)nlen);
    int u = socket(AF_UNIX, SOCK_STREAM, 0);
    int uc = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(u, (struct sockaddr *)&ua, ulen) || listen(u, 4) ||
        connect(uc, (struct sockaddr *)&ua, ulen)) {
        report(0, "unix listener: %s", strerror(errno));
        return 1;
    }

    say("in flight: %lu bytes", sent);
    say("READY");
    wait_go();

    /* b receives exactly what a sent, in order, then more. */
    fcntl(a, F_SETFL, fcntl(a, F_GETFL) & ~O_NONBLOCK);
    const unsigned long more = 100000;
    unsigned long got = 0, bad = 0;
    unsigned char buf[65536];
    /* a sends the rest while b reads: a child would do, but the kernel's buffers hold it
     * once b has made room, so a writes after b has drained what was in flight. */
    while (got < sent) {
        size_t want = sent - got < sizeof buf ? sent - got : sizeof buf;
        ssize_t n = read(b, buf, want);
        if (n <= 0) break;
        for (ssize_t i = 0; i < n; i++)
            if (buf[i] != byte_at(got + (unsigned long)i)) bad++;
        got += (unsigned long)n;
    }
    report(got == sent && bad == 0, "b received the %lu bytes in flight, in order (%lu read, %lu wrong)",
           sent, got, bad);
    for (unsigned long off = 0; off < more;) {
        size_t n = more - off < sizeof chunk ? more - off : sizeof chunk;
        for (size_t i = 0; i < n; i++) chunk[i] = byte_at(sent + off + i);
        ssize_t w = write(a, chunk, n);
        if (w <= 0) break;
        off += (unsigned long)w;
        while (got < sent + off) {
            ssize_t r = read(b, buf, sizeof buf < sent + off - got ? sizeof buf : sent + off - got);
            if (r <= 0) break;
            for (ssize_t i = 0; i < r; i++)
                if (buf[i] != byte_at(got + (unsigned long)i)) bad++;
            got += (unsigned long)r;
        }
    }
    report(got == sent + more && bad == 0, "the stream goes on after the cut (%lu bytes, %lu wrong)",
           got, bad);
    fcntl(b, F_SETFL, fcntl(b, F_GETFL) | O_NONBLOCK);
    report(read(b, buf, 1) < 0 && errno == EAGAIN, "no byte was duplicated");
    char back_got[sizeof back] = {0};
    report(read_all(a, back_got, sizeof back) == 0 && memcmp(back, back_got, sizeof back) == 0,
           "a received b's bytes");

    exchange("tcp", l2, c2);
    exchange("unix", u, uc);
    say("DONE %d", failures);
    return failures != 0;
}
