/* socks: unix sockets across a checkpoint.
 *
 * Usage: socks WORKDIR. Stream, datagram and seqpacket socketpairs with data queued both
 * ways, a half-closed pair, a listening socket at a path and an abstract one, an accepted
 * connection with data in flight. Prints READY, waits for WORKDIR/go, checks: PASS/FAIL
 * lines and DONE <failures>.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int failures;
#define CHECK(cond, what, ...) do { if (cond) printf("PASS %s\n", what); else { printf("FAIL %s: ", what); printf(__VA_ARGS__); printf("\n"); failures++; } } while (0)

static void wait_go(const char *dir) {
    char go[4096];
    snprintf(go, sizeof go, "%s/go", dir);
    while (access(go, F_OK) != 0) {
        struct timespec d = {0, 10 * 1000 * 1000};
        nanosleep(&d, NULL);
    }
}

static socklen_t addr_of(struct sockaddr_un *a, const char *path, int abstract) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    if (abstract) {
        strcpy(a->sun_path + 1, path);
        return offsetof(struct sockaddr_un, sun_path) + 1 + strlen(path);
    }
    strcpy(a->sun_path, path);
    return sizeof *a;
}

static int get(int fd, char *buf, int len) {
    memset(buf, 0, len);
    return (int)recv(fd, buf, len - 1, MSG_DONTWAIT);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    int st[2], dg[2], sp[2], half[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, st);
    socketpair(AF_UNIX, SOCK_DGRAM, 0, dg);
    socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sp);
    socketpair(AF_UNIX, SOCK_STREAM, 0, half);
    send(st[0], "ping", 4, 0);
    send(st[1], "pong-pong", 9, 0);
    send(dg[0], "one", 3, 0);
    send(dg[0], "two two", 7, 0);
    send(dg[0], "three three three", 17, 0);
    send(sp[1], "seq-a", 5, 0);
    send(sp[1], "seq-bb", 6, 0);
    send(half[0], "last words", 10, 0);
    shutdown(half[0], SHUT_WR);
    fcntl(st[0], F_SETFL, O_NONBLOCK);
    char path[4096], abs_name[64];
    snprintf(path, sizeof path, "%s/srv.sock", argv[1]);
    /* Unique per test: inside a job every program is pid 2, so derive it from the work dir. */
    unsigned long h = 5381;
    for (const char *c = argv[1]; *c; c++) h = h * 33 + (unsigned char)*c;
    snprintf(abs_name, sizeof abs_name, "stasis-socks-%lx", h);
    struct sockaddr_un a;
    int srv = socket(AF_UNIX, SOCK_STREAM, 0);
    socklen_t alen = addr_of(&a, path, 0);
    bind(srv, (struct sockaddr *)&a, alen);
    listen(srv, 8);
    int abs_srv = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    alen = addr_of(&a, abs_name, 1);
    bind(abs_srv, (struct sockaddr *)&a, alen);
    listen(abs_srv, 8);
    int cli = socket(AF_UNIX, SOCK_STREAM, 0);
    alen = addr_of(&a, path, 0);
    connect(cli, (struct sockaddr *)&a, alen);
    int acc = accept(srv, NULL, NULL);
    send(cli, "hello server", 12, 0);
    printf("READY\n");
    wait_go(argv[1]);

    char buf[128];
    CHECK(get(st[1], buf, sizeof buf) == 4 && !strcmp(buf, "ping"), "stream data queued one way", "'%s'", buf);
    CHECK(get(st[0], buf, sizeof buf) == 9 && !strcmp(buf, "pong-pong"), "stream data queued the other way", "'%s'", buf);
    CHECK(fcntl(st[0], F_GETFL) & O_NONBLOCK, "non-blocking flag", "flags %x", fcntl(st[0], F_GETFL));
    CHECK(send(st[0], "again", 5, 0) == 5 && get(st[1], buf, sizeof buf) == 5, "the stream pair is still connected", "errno %d", errno);
    CHECK(get(dg[1], buf, sizeof buf) == 3 && !strcmp(buf, "one"), "first datagram", "'%s'", buf);
    CHECK(get(dg[1], buf, sizeof buf) == 7 && !strcmp(buf, "two two"), "second datagram", "'%s'", buf);
    CHECK(get(dg[1], buf, sizeof buf) == 17 && !strcmp(buf, "three three three"), "third datagram", "'%s'", buf);
    CHECK(get(dg[1], buf, sizeof buf) < 0 && errno == EAGAIN, "no extra datagram", "errno %d", errno);
    CHECK(get(sp[0], buf, sizeof buf) == 5 && !strcmp(buf, "seq-a"), "first seqpacket", "'%s'", buf);
    CHECK(get(sp[0], buf, sizeof buf) == 6 && !strcmp(buf, "seq-bb"), "second seqpacket", "'%s'", buf);
    CHECK(get(half[1], buf, sizeof buf) == 10 && !strcmp(buf, "last words"), "data before a half-close", "'%s'", buf);
    CHECK(recv(half[1], buf, sizeof buf, 0) == 0, "end of stream after the half-close", "errno %d", errno);
    CHECK(send(half[1], "reply", 5, MSG_NOSIGNAL) == 5 && get(half[0], buf, sizeof buf) == 5, "the other direction of a half-closed pair", "errno %d", errno);
    CHECK(get(acc, buf, sizeof buf) == 12 && !strcmp(buf, "hello server"), "data in flight on an accepted connection", "'%s'", buf);
    int c2 = socket(AF_UNIX, SOCK_STREAM, 0);
    alen = addr_of(&a, path, 0);
    CHECK(connect(c2, (struct sockaddr *)&a, alen) == 0, "the listening socket accepts at its path", "errno %d", errno);
    int a2 = accept(srv, NULL, NULL);
    CHECK(a2 >= 0 && send(c2, "x", 1, 0) == 1 && recv(a2, buf, 1, 0) == 1, "a new connection works", "errno %d", errno);
    int c3 = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    alen = addr_of(&a, abs_name, 1);
    CHECK(connect(c3, (struct sockaddr *)&a, alen) == 0 && accept(abs_srv, NULL, NULL) >= 0, "the abstract listening socket", "errno %d", errno);
    printf("DONE %d\n", failures);
    return failures ? 1 : 0;
}
