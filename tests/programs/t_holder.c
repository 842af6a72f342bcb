/* t_holder: a job in which one process, deep in the tree, holds a special resource.
 *
 * Usage: t_holder WORKDIR KIND [MIN_BEATS]
 * Processes: the root R, W1, W2 and W2's child W2a. Each "beats" every 10 ms and prints
 * "beat NAME N" every 10 beats until WORKDIR/go exists. W2a holds the resource KIND:
 *   eventfd     an eventfd (counter 5);
 *   socketpair  a unix stream socketpair at fds >= 3, with "ping" queued in it;
 *   inotify     an inotify instance watching WORKDIR for created files;
 *   fifo        the named pipe WORKDIR/fifo, open read-write, with "ping" queued in it;
 *   pidfd       a pidfd of its parent (pidfd_open);
 *   ptraced     W2a is traced by W2 (PTRACE_SEIZE): nobody else can seize it;
 *   clone-files W2a is created by clone(CLONE_FILES): it shares W2's descriptor table.
 * W2a prints "holder KIND pid=JOBPID fd=FD" before READY. After go: every
 * process checks it is not traced by anybody (TracerPid 0) and, when MIN_BEATS > 0, that
 * it beat at least that often before go (it ran on); W2a checks its resource still works
 * (the eventfd reads 5+7, the socketpair delivers "ping" then "pong", inotify reports the
 * creation of "go", the fifo delivers "ping", W2 can interrupt and detach it, kcmp says the
 * descriptor table is still W2's). Exit codes
 * are checked by parents; the root prints DONE.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <linux/kcmp.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *mode;
static long min_beats = 30;
static const char *me = "R";

#include "report.h"

static int go_exists(void) {
    char p[4096];
    snprintf(p, sizeof p, "%s/go", work);
    return access(p, F_OK) == 0;
}

/* Beats until go (at most 60 s); returns the number of beats. */
static long beat_until_go(void) {
    long n = 0;
    while (!go_exists() && n < 6000) {
        sleep_ms(10);
        if (++n % 10 == 0) say("beat %s %ld", me, n / 10);
    }
    return n;
}

static long tracer_pid(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long t = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "TracerPid: %ld", &t) == 1) break;
    if (f) fclose(f);
    return t;
}

static void common_checks(long beats, long allowed_tracer) {
    long t = tracer_pid();
    report(t == 0 || t == allowed_tracer, "TracerPid is %ld: nobody traces me", t);
    if (min_beats > 0) report(beats >= min_beats, "%ld beats before go, want at least %ld: it ran on", beats, min_beats);
}

static void reap(pid_t pid, const char *name, int code) {
    int st = 0;
    pid_t r;
    while ((r = waitpid(pid, &st, 0)) < 0 && errno == EINTR) {}
    report(r == pid && WIFEXITED(st) && WEXITSTATUS(st) == code, "child %s exited with %d (status %#x)", name, code,
           st);
}

static void holder(int rdy) {
    me = "W2a";
    int fd = -1, sv[2] = {-1, -1};
    if (!strcmp(mode, "eventfd")) {
        fd = eventfd(5, 0);
        if (fd < 0) report(0, "eventfd: %s", strerror(errno));
    } else if (!strcmp(mode, "socketpair")) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) report(0, "socketpair: %s", strerror(errno));
        if (write(sv[0], "ping", 4) != 4) report(0, "socket write: %s", strerror(errno));
        fd = sv[1];
    } else if (!strcmp(mode, "inotify")) {
        fd = inotify_init1(0);
        if (fd < 0 || inotify_add_watch(fd, work, IN_CREATE) < 0) report(0, "inotify: %s", strerror(errno));
    } else if (!strcmp(mode, "pidfd")) {
        fd = (int)syscall(SYS_pidfd_open, getppid(), 0);
        if (fd < 0) report(0, "pidfd_open: %s", strerror(errno));
    } else if (!strcmp(mode, "fifo")) {
        char p[4096];
        snprintf(p, sizeof p, "%s/fifo", work);
        if (mkfifo(p, 0600) && errno != EEXIST) report(0, "mkfifo: %s", strerror(errno));
        fd = open(p, O_RDWR);
        if (fd < 0 || write(fd, "ping", 4) != 4) report(0, "fifo: %s", strerror(errno));
    }
    say("holder %s pid=%d fd=%d", mode, getpid(), fd);
    if (write(rdy, "r", 1) != 1) report(0, "ready pipe");
    long beats = beat_until_go();
    if (!strcmp(mode, "eventfd")) {
        uint64_t v = 7;
        int ok = write(fd, &v, 8) == 8 && read(fd, &v, 8) == 8;
        report(ok && v == 12, "the eventfd still counts: read %lu, want 12", (unsigned long)v);
        common_checks(beats, 0);
    } else if (!strcmp(mode, "socketpair")) {
        char b[8] = {0};
        report(read(sv[1], b, 4) == 4 && !memcmp(b, "ping", 4), "the socketpair delivers the queued ping");
        memset(b, 0, sizeof b);
        report(write(sv[1], "pong", 4) == 4 && read(sv[0], b, 4) == 4 && !memcmp(b, "pong", 4),
               "the socketpair carries a pong back");
        common_checks(beats, 0);
    } else if (!strcmp(mode, "inotify")) {
        union {
            struct inotify_event e;
            char b[4096];
        } u;
        ssize_t n = read(fd, &u, sizeof u);
        int seen = 0;
        for (char *p = u.b; n > 0 && p < u.b + n; p += sizeof(struct inotify_event) + ((struct inotify_event *)p)->len) {
            struct inotify_event *e = (struct inotify_event *)p;
            if (e->len && !strcmp(e->name, "go") && (e->mask & IN_CREATE)) seen = 1;
        }
        report(seen, "inotify reported the creation of go");
        common_checks(beats, 0);
    } else if (!strcmp(mode, "fifo")) {
        char b[8] = {0};
        report(read(fd, b, 4) == 4 && !memcmp(b, "ping", 4), "the fifo delivers the queued ping");
        common_checks(beats, 0);
    } else if (!strcmp(mode, "pidfd")) {
        report(syscall(SYS_pidfd_send_signal, fd, 0, NULL, 0) == 0, "the pidfd still names W2");
        common_checks(beats, 0);
    } else if (!strcmp(mode, "clone-files")) {
        long r = syscall(SYS_kcmp, getpid(), getppid(), KCMP_FILES, 0, 0);
        report(r == 0, "my descriptor table is still W2's (kcmp %ld)", r);
        common_checks(beats, 0);
    } else {
        /* W2 detaches us after go. */
        long t = -1;
        for (int i = 0; i < 500 && (t = tracer_pid()) != 0; i++) sleep_ms(10);
        report(t == 0, "W2 detached me (TracerPid %ld)", t);
        common_checks(beats, 0);
    }
    _exit(failures ? 100 : 12);
}

static int holder_rdy;
static int holder_entry(void *arg) {
    (void)arg;
    holder(holder_rdy);
    return 0;
}

static void proc_w2(int rdy) {
    me = "W2";
    pid_t h;
    if (!strcmp(mode, "clone-files")) {
        static char stack[256 * 1024];
        holder_rdy = rdy;
        h = clone(holder_entry, stack + sizeof stack, CLONE_FILES | SIGCHLD, NULL);
        if (h < 0) report(0, "clone: %s", strerror(errno));
    } else {
        h = fork();
        if (h == 0) holder(rdy);
    }
    if (!strcmp(mode, "ptraced") && ptrace(PTRACE_SEIZE, h, 0, 0) != 0) report(0, "PTRACE_SEIZE: %s", strerror(errno));
    if (write(rdy, "r", 1) != 1) report(0, "ready pipe");
    long beats = beat_until_go();
    if (!strcmp(mode, "ptraced")) {
        int st = 0;
        int ok = ptrace(PTRACE_INTERRUPT, h, 0, 0) == 0 && waitpid(h, &st, __WALL) == h && WIFSTOPPED(st) &&
                 ptrace(PTRACE_DETACH, h, 0, 0) == 0;
        report(ok, "interrupted and detached W2a (status %#x, %s)", st, ok ? "ok" : strerror(errno));
    }
    common_checks(beats, 0);
    reap(h, "W2a", 12);
    _exit(failures ? 100 : 11);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    snprintf(work, sizeof work, "%s", argv[1]);
    mode = argv[2];
    if (argc > 3) min_beats = atol(argv[3]);
    if (strcmp(mode, "eventfd") && strcmp(mode, "socketpair") && strcmp(mode, "inotify") && strcmp(mode, "fifo") && strcmp(mode, "pidfd") &&
        strcmp(mode, "ptraced") && strcmp(mode, "clone-files"))
        return 2;
    int rdy[2];
    if (pipe(rdy)) return 2;
    pid_t w1 = fork();
    if (w1 == 0) {
        me = "W1";
        if (write(rdy[1], "r", 1) != 1) report(0, "ready pipe");
        common_checks(beat_until_go(), 0);
        _exit(failures ? 100 : 10);
    }
    pid_t w2 = fork();
    if (w2 == 0) proc_w2(rdy[1]);
    char c;
    for (int got = 0; got < 3;)
        if (read(rdy[0], &c, 1) == 1) got++;
    say("READY");
    long beats = beat_until_go();
    common_checks(beats, 0);
    reap(w1, "W1", 10);
    reap(w2, "W2", 11);
    say("DONE %d", failures);
    return failures ? 1 : 0;
}
