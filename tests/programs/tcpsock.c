/* tcpsock: TCP and UDP sockets across a checkpoint.
 *
 * Usage: tcpsock WORKDIR. A TCP listener on a loopback port, a loopback connection inside
 * the process with data queued both ways, a bound UDP socket. Prints READY, waits for
 * WORKDIR/go, checks: PASS/FAIL lines and DONE <failures>.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

static int get(int fd, char *buf, int len) {
    memset(buf, 0, len);
    int got = 0;
    for (int i = 0; i < 100 && got < len - 1; i++) {
        int n = (int)recv(fd, buf + got, len - 1 - got, MSG_DONTWAIT);
        if (n > 0) { got += n; continue; }
        if (got > 0) break;
        struct timespec d = {0, 5 * 1000 * 1000};
        nanosleep(&d, NULL);
    }
    return got;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    int srv = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    bind(srv, (struct sockaddr *)&a, sizeof a);
    listen(srv, 16);
    getsockname(srv, (struct sockaddr *)&a, &alen);
    int cli = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(cli, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    connect(cli, (struct sockaddr *)&a, sizeof a);
    int acc = accept(srv, NULL, NULL);
    send(cli, "request bytes", 13, 0);
    send(acc, "response", 8, 0);
    struct sockaddr_in u = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t ulen = sizeof u;
    int udp = socket(AF_INET, SOCK_DGRAM, 0);
    bind(udp, (struct sockaddr *)&u, sizeof u);
    getsockname(udp, (struct sockaddr *)&u, &ulen);
    /* Datagrams queued on udp: two from another socket of the process, one from a socket
     * closed since (its port free again). */
    struct sockaddr_in pa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t palen = sizeof pa;
    int peer = socket(AF_INET, SOCK_DGRAM, 0);
    bind(peer, (struct sockaddr *)&pa, sizeof pa);
    getsockname(peer, (struct sockaddr *)&pa, &palen);
    sendto(peer, "one", 3, 0, (struct sockaddr *)&u, sizeof u);
    sendto(peer, "two", 3, 0, (struct sockaddr *)&u, sizeof u);
    struct sockaddr_in ta = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t talen = sizeof ta;
    int gone = socket(AF_INET, SOCK_DGRAM, 0);
    bind(gone, (struct sockaddr *)&ta, sizeof ta);
    getsockname(gone, (struct sockaddr *)&ta, &talen);
    sendto(gone, "three", 5, 0, (struct sockaddr *)&u, sizeof u);
    close(gone);
    struct timespec settle = {0, 50 * 1000 * 1000};
    nanosleep(&settle, NULL);
    printf("READY\n");
    wait_go(argv[1]);

    char buf[128];
    const char *want[] = {"one", "two", "three"};
    for (int i = 0; i < 3; i++) {
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        memset(buf, 0, sizeof buf);
        ssize_t n = recvfrom(udp, buf, sizeof buf - 1, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
        struct sockaddr_in *exp = i < 2 ? &pa : &ta;
        CHECK(n == (ssize_t)strlen(want[i]) && !strcmp(buf, want[i]) && from.sin_port == exp->sin_port &&
                  from.sin_addr.s_addr == exp->sin_addr.s_addr,
              "a queued datagram, in order, from its sender", "#%d: %zd '%s' from port %d (want %d)", i, n, buf,
              ntohs(from.sin_port), ntohs(exp->sin_port));
        if (i == 0)
            CHECK(sendto(udp, "ack", 3, 0, (struct sockaddr *)&from, fl) == 3 && get(peer, buf, sizeof buf) == 3 &&
                      !strcmp(buf, "ack"),
                  "a reply reaches the datagram's sender", "'%s'", buf);
    }
    CHECK(get(acc, buf, sizeof buf) == 13 && !strcmp(buf, "request bytes"), "bytes queued for the server side", "'%s'", buf);
    CHECK(get(cli, buf, sizeof buf) == 8 && !strcmp(buf, "response"), "bytes queued for the client side", "'%s'", buf);
    CHECK(send(cli, "more", 4, 0) == 4 && get(acc, buf, sizeof buf) == 4, "the connection still carries data", "errno %d", errno);
    int nd = 0;
    socklen_t ol = sizeof nd;
    getsockopt(cli, IPPROTO_TCP, TCP_NODELAY, &nd, &ol);
    CHECK(nd == 1, "TCP_NODELAY kept", "%d", nd);
    int c2 = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(c2, (struct sockaddr *)&a, sizeof a) == 0, "the listener accepts at its port again", "errno %d", errno);
    int a2 = accept(srv, NULL, NULL);
    CHECK(a2 >= 0 && send(c2, "y", 1, 0) == 1 && get(a2, buf, sizeof buf) == 1, "a new connection carries data", "errno %d", errno);
    struct sockaddr_in now;
    socklen_t nlen = sizeof now;
    getsockname(udp, (struct sockaddr *)&now, &nlen);
    CHECK(now.sin_port == u.sin_port, "the UDP socket keeps its port", "%d vs %d", ntohs(now.sin_port), ntohs(u.sin_port));
    int s2 = socket(AF_INET, SOCK_DGRAM, 0);
    sendto(s2, "dgram", 5, 0, (struct sockaddr *)&u, sizeof u);
    CHECK(get(udp, buf, sizeof buf) == 5 && !strcmp(buf, "dgram"), "the UDP socket receives at its port", "'%s'", buf);
    printf("DONE %d\n", failures);
    return failures ? 1 : 0;
}
