/* evfds: eventfd, timerfd, signalfd, epoll and memfd descriptors across a checkpoint.
 *
 * Usage: evfds WORKDIR. Sets everything up, prints READY, waits for WORKDIR/go, then checks
 * the state of every descriptor: PASS/FAIL lines and DONE <failures>.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
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

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    int ev = eventfd(5, EFD_NONBLOCK);
    int sem = eventfd(3, EFD_SEMAPHORE);
    int tick = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec every = {{0, 50 * 1000 * 1000}, {0, 50 * 1000 * 1000}};
    timerfd_settime(tick, 0, &every, NULL);
    int idle = timerfd_create(CLOCK_MONOTONIC, 0);
    int longt = timerfd_create(CLOCK_MONOTONIC, 0);
    struct itimerspec ten = {{0, 0}, {10, 0}};
    timerfd_settime(longt, 0, &ten, NULL);
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL);
    int sfd = signalfd(-1, &usr1, SFD_NONBLOCK);
    raise(SIGUSR1);
    int p[2];
    pipe(p);
    int ep = epoll_create1(0);
    struct epoll_event e1 = {.events = EPOLLIN, .data.u64 = 0x1234};
    epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e1);
    struct epoll_event e2 = {.events = EPOLLIN | EPOLLET, .data.u64 = 77};
    epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e2);
    int mfd = memfd_create("evfds", 0);
    ftruncate(mfd, 8192);
    char *shared = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    strcpy(shared + 4096, "memfd page two");
    lseek(mfd, 4096, SEEK_SET);
    printf("READY\n");
    wait_go(argv[1]);

    uint64_t v = 0;
    CHECK(read(ev, &v, 8) == 8 && v == 5, "eventfd counter", "read %llu", (unsigned long long)v);
    CHECK(read(ev, &v, 8) < 0 && errno == EAGAIN, "eventfd stays non-blocking", "errno %d", errno);
    int got = 0;
    for (int i = 0; i < 3; i++) got += read(sem, &v, 8) == 8 && v == 1;
    int fl = fcntl(sem, F_GETFL);
    fcntl(sem, F_SETFL, fl | O_NONBLOCK);
    CHECK(got == 3 && read(sem, &v, 8) < 0, "semaphore eventfd", "got %d", got);
    struct timespec d = {0, 120 * 1000 * 1000};
    nanosleep(&d, NULL);
    v = 0;
    CHECK(read(tick, &v, 8) == 8 && v >= 1, "periodic timerfd keeps firing", "expirations %llu", (unsigned long long)v);
    struct itimerspec cur;
    timerfd_gettime(idle, &cur);
    CHECK(cur.it_value.tv_sec == 0 && cur.it_value.tv_nsec == 0, "disarmed timerfd stays disarmed", "%ld", (long)cur.it_value.tv_sec);
    timerfd_gettime(longt, &cur);
    CHECK(cur.it_value.tv_sec >= 5 && cur.it_value.tv_sec <= 10, "long timerfd keeps its remaining time", "%ld s left", (long)cur.it_value.tv_sec);
    struct signalfd_siginfo si;
    CHECK(read(sfd, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR1, "signalfd delivers the pending signal", "errno %d", errno);
    write(ev, &(uint64_t){1}, 8);
    struct epoll_event out[4];
    int n = epoll_wait(ep, out, 4, 1000);
    CHECK(n == 1 && out[0].data.u64 == 0x1234, "epoll reports the ready eventfd with its data", "n=%d data=%llx", n, n > 0 ? (unsigned long long)out[0].data.u64 : 0ull);
    write(p[1], "x", 1);
    n = epoll_wait(ep, out, 4, 1000);
    int saw77 = 0;
    for (int i = 0; i < n; i++) saw77 |= out[i].data.u64 == 77;
    CHECK(saw77, "epoll watches the pipe", "n=%d", n);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, p[0], NULL) == 0, "epoll registration names the process's descriptor", "errno %d", errno);
    char buf[32] = {0};
    CHECK(read(mfd, buf, 14) == 14 && strcmp(buf, "memfd page two") == 0, "memfd content at its offset", "read '%s'", buf);
    strcpy(shared, "written through the mapping");
    memset(buf, 0, sizeof buf);
    pread(mfd, buf, 27, 0);
    CHECK(strcmp(buf, "written through the mapping") == 0, "memfd descriptor and mapping share one object", "read '%s'", buf);
    printf("DONE %d\n", failures);
    return failures ? 1 : 0;
}
