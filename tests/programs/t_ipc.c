/* t_ipc: SysV semaphores and message queues, inotify watches and a pseudo-terminal pair
 * held inside the job, across a checkpoint.
 *
 * Usage: t_ipc WORKDIR. Sets everything up, prints READY, waits for WORKDIR/go, then
 * checks each object: PASS/FAIL lines from both processes, exit status = failures.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/wait.h>
#include <termios.h>

static const char *me = "t_ipc";
#include "report.h"

struct msg {
    long mtype;
    char text[64];
};

static void check_sysv(int sem, int q) {
    unsigned short v[3] = {0};
    semctl(sem, 0, GETALL, v);
    report(v[0] == 5 && v[1] == 0 && v[2] == 7, "semaphore values %d %d %d", v[0], v[1], v[2]);
    struct sembuf op = {0, -2, IPC_NOWAIT};
    report(semop(sem, &op, 1) == 0 && semctl(sem, 0, GETVAL) == 3, "semop on the restored set");
    const char *want[] = {"first", "second", ""};
    for (int i = 0; i < 3; i++) {
        struct msg m = {0};
        ssize_t n = msgrcv(q, &m, sizeof m.text, 0, IPC_NOWAIT);
        report(n == (ssize_t)strlen(want[i]) && m.mtype == i + 1 && strcmp(m.text, want[i]) == 0,
               "message %d: type %ld, %zd bytes \"%s\"", i + 1, m.mtype, n, n > 0 ? m.text : "");
    }
    struct msg m;
    report(msgrcv(q, &m, sizeof m.text, 0, IPC_NOWAIT) < 0, "no fourth message");
    struct msqid_ds ds;
    msgctl(q, IPC_STAT, &ds);
    report(ds.msg_qbytes == 4000, "queue capacity %lu", (unsigned long)ds.msg_qbytes);
}

static void check_inotify(int in, int wd_dir, int wd_file, const char *dir, const char *file) {
    char p[4096];
    snprintf(p, sizeof p, "%s/created", dir);
    close(open(p, O_CREAT | O_WRONLY, 0600));
    int f = open(file, O_WRONLY | O_APPEND);
    report(write(f, "x", 1) == 1, "modify the watched file");
    close(f);
    sleep_ms(50);
    char buf[4096] __attribute__((aligned(8)));
    ssize_t n = read(in, buf, sizeof buf);
    int created = 0, modified = 0, other = 0;
    for (char *at = buf; n > 0 && at < buf + n;) {
        struct inotify_event *e = (struct inotify_event *)at;
        if (e->wd == wd_dir && (e->mask & IN_CREATE) && strcmp(e->name, "created") == 0) created++;
        else if (e->wd == wd_file && (e->mask & IN_MODIFY)) modified++;
        else other++;
        at += sizeof *e + e->len;
    }
    report(created == 1, "IN_CREATE on watch %d (%d seen)", wd_dir, created);
    report(modified == 1, "IN_MODIFY on watch %d (%d seen)", wd_file, modified);
    report(other == 0, "no stray events (%d)", other);
}

/* Reads exactly n bytes from fd. */
static int read_n(int fd, char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

int main(int argc, char **argv) {
    snprintf(work, sizeof work, "%s", argc > 1 ? argv[1] : ".");
    setvbuf(stdout, NULL, _IONBF, 0);
    int sem = semget(IPC_PRIVATE, 3, IPC_CREAT | 0600);
    unsigned short init[3] = {5, 0, 7};
    semctl(sem, 0, SETALL, init);
    int q = msgget(0x5717, IPC_CREAT | 0640);
    struct msqid_ds ds;
    msgctl(q, IPC_STAT, &ds);
    ds.msg_qbytes = 4000;
    msgctl(q, IPC_SET, &ds);
    struct msg m1 = {1, "first"}, m2 = {2, "second"}, m3 = {3, ""};
    msgsnd(q, &m1, 5, 0);
    msgsnd(q, &m2, 6, 0);
    msgsnd(q, &m3, 0, 0);

    char dir[4096], file[4096], gone[4096];
    snprintf(dir, sizeof dir, "%s/watched", work);
    mkdir(dir, 0700);
    snprintf(file, sizeof file, "%s/file", dir);
    snprintf(gone, sizeof gone, "%s/gone", dir);
    close(open(file, O_CREAT | O_WRONLY, 0600));
    close(open(gone, O_CREAT | O_WRONLY, 0600));
    int in = inotify_init1(IN_NONBLOCK);
    int wd_gone = inotify_add_watch(in, gone, IN_ATTRIB);
    int wd_dir = inotify_add_watch(in, dir, IN_CREATE);
    inotify_rm_watch(in, wd_gone); /* a gap before the next watch descriptor */
    int wd_file = inotify_add_watch(in, file, IN_MODIFY);
    char drain[4096];
    while (read(in, drain, sizeof drain) > 0) {} /* the IN_IGNORED of the removed watch */

    int master = posix_openpt(O_RDWR | O_NOCTTY);
    grantpt(master);
    unlockpt(master);
    int slave = open(ptsname(master), O_RDWR | O_NOCTTY);
    struct termios t;
    tcgetattr(slave, &t);
    cfmakeraw(&t);
    t.c_cc[VMIN] = 1;
    tcsetattr(slave, TCSANOW, &t);
    struct winsize ws = {33, 111, 0, 0};
    ioctl(master, TIOCSWINSZ, &ws);
    /* Bytes in flight inside the pair at the cut, both ways. */
    if (write(slave, "queued output", 13) != 13 || write(master, "typed", 5) != 5)
        report(0, "queueing bytes in the pty");
    pid_t child = fork();
    if (child == 0) {
        me = "t_ipc child";
        close(master);
        wait_go();
        struct termios now;
        tcgetattr(slave, &now);
        struct winsize w = {0};
        ioctl(slave, TIOCGWINSZ, &w);
        report(!(now.c_lflag & (ECHO | ICANON)), "the pty keeps its raw modes");
        report(w.ws_row == 33 && w.ws_col == 111, "window %dx%d", w.ws_row, w.ws_col);
        char typed[6] = {0};
        report(read_n(slave, typed, 5) == 0 && strcmp(typed, "typed") == 0,
               "input queued in the pty at the cut is read (%s)", typed);
        char c[5] = {0};
        ssize_t n = read(slave, c, 4);
        report(n == 4 && memcmp(c, "ping", 4) == 0, "read the master's ping (%zd)", n);
        report(write(slave, "pong", 4) == 4, "answer through the pty");
        _exit(failures);
    }
    close(slave);
    say("READY");
    wait_go();
    check_sysv(sem, q);
    check_inotify(in, wd_dir, wd_file, dir, file);
    char out[14] = {0};
    report(read_n(master, out, 13) == 0 && strcmp(out, "queued output") == 0,
           "output queued in the pty at the cut is read (%s)", out);
    report(write(master, "ping", 4) == 4, "write to the pty master");
    char c[5] = {0};
    ssize_t n = read(master, c, 4);
    report(n == 4 && memcmp(c, "pong", 4) == 0, "pong from the child (%zd)", n);
    int st = 0;
    waitpid(child, &st, 0);
    report(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
    semctl(sem, 0, IPC_RMID);
    msgctl(q, IPC_RMID, NULL);
    say("DONE %d", failures);
    return failures;
}
