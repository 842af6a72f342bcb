/* tree: a process tree that must come back with the same pids, parents, sessions and
 * process groups, its zombies and its orphans.
 *
 * Usage: tree WORKDIR [MODE]        (and, internally: tree helper WORKDIR RFD FFD)
 *
 * MODE main (the default; pid 2 = R, the root):
 *   R ─┬─ A      fork; leads its own process group; blocks in waitpid(B) across the cut
 *      │  ├─ B   fork (depth 2)
 *      │  │  └─ C    clone() (depth 3); starts its own session
 *      │  │     └─ D    vfork + exec of this program as "helper" (depth 4)
 *      │  │        └─ E    fork (depth 5); own process group inside C's session
 *      │  └─ ZA  zombie: exited with status 43 before the cut, reaped by A afterwards
 *      ├─ F      fork; joins A's process group (a sibling's group)
 *      ├─ Z      zombie: exited with status 42 before the cut, reaped by R afterwards
 *      └─ O1     exits before the cut, leaving its child O2 an orphan (parent: init, pid 1)
 * MODE sigzombie: R ── ZS, a zombie killed by SIGUSR2 before the cut, reaped by R after it.
 * Sessions and groups that inheritance alone cannot rebuild:
 * MODE setsid-after-fork: R ── S ── S1: S forks S1, then calls setsid(); S1 stays in R's
 *   session and group;
 * MODE dead-group-leader: R ─┬─ GL, GM: GM joins the process group of GL, then GL exits
 *   (the group lives on without its leader);
 * MODE dead-session-leader: R ── DA ── DB: DA calls setsid(), forks DB and exits (the daemon
 *   double fork): DB is an orphan in a session and group whose leader is gone.
 *
 * Every process records getpid/getppid/getpgrp/getsid before READY and checks them after
 * WORKDIR/go exists; parents check the exit status of every child (each exits with its own
 * code, 100 on any failure). Processes signal "set up" with one byte on a ready pipe and
 * "finished" with 'P' or 'F' on a finish pipe that the root drains until EOF (so orphans
 * are accounted for). Every line is printed with one write(2) to the shared stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char self_exe[4096];
static int ready_w = -1, finish_w = -1;
static const char *me = "R";

#include "report.h"


struct ids {
    long pid, ppid, pgrp, sid;
};

static struct ids get_ids(void) {
    struct ids i = {getpid(), getppid(), getpgrp(), getsid(0)};
    return i;
}

static void check_ids(const struct ids *b) {
    struct ids a = get_ids();
    int ok = a.pid == b->pid && a.ppid == b->ppid && a.pgrp == b->pgrp && a.sid == b->sid;
    report(ok, "ids pid/ppid/pgrp/sid now %ld/%ld/%ld/%ld, before the cut %ld/%ld/%ld/%ld", a.pid, a.ppid,
           a.pgrp, a.sid, b->pid, b->ppid, b->pgrp, b->sid);
}

static void expect(int ok, const char *what, long got, long want) {
    report(ok, "%s: got %ld, want %ld", what, got, want);
}

static void signal_ready(void) {
    if (write(ready_w, "r", 1) != 1) report(0, "ready pipe: %s", strerror(errno));
}

/* Ends a non-root process: a finish byte for the root, then its own exit code (100 on failure). */
static void finish(int code) {
    char c = failures ? 'F' : 'P';
    if (write(finish_w, &c, 1) != 1) say("FAIL %s: finish pipe: %s", me, strerror(errno));
    _exit(failures ? 100 : code);
}

/* waitpid for one child, checking it exited normally with `code` (or was killed by `sig`). */
static void reap(pid_t pid, const char *name, int code, int sig, int flags) {
    int st = 0;
    pid_t r;
    while ((r = waitpid(pid, &st, flags)) < 0 && errno == EINTR) {}
    if (r != pid) {
        report(0, "waitpid(%s = %d) returned %d (%s)", name, pid, r, r < 0 ? strerror(errno) : "not yet");
        return;
    }
    if (sig)
        report(WIFSIGNALED(st) && WTERMSIG(st) == sig, "child %s (%d) killed by signal %d (status %#x)", name,
               pid, sig, st);
    else
        report(WIFEXITED(st) && WEXITSTATUS(st) == code, "child %s (%d) exited with %d (status %#x, exit %d)",
               name, pid, code, st, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

/* Waits (without reaping) until child `pid` is a zombie. */
static void wait_zombie(pid_t pid, const char *name) {
    siginfo_t si;
    memset(&si, 0, sizeof si);
    while (waitid(P_PID, pid, &si, WEXITED | WNOWAIT) < 0) {
        if (errno != EINTR) {
            report(0, "waitid(%s): %s", name, strerror(errno));
            return;
        }
    }
}

/* ---------------- main tree ---------------- */

static void proc_E(void) {
    me = "E";
    setpgid(0, 0);
    struct ids b = get_ids();
    expect(b.pgrp == b.pid, "E leads its own group", b.pgrp, b.pid);
    signal_ready();
    wait_go();
    check_ids(&b);
    finish(14);
}

/* D: exec'd helper, child of C (the session leader). */
static int helper_main(char **argv) {
    me = "D";
    snprintf(work, sizeof work, "%s", argv[2]);
    ready_w = atoi(argv[3]);
    finish_w = atoi(argv[4]);
    struct ids b = get_ids();
    expect(b.sid == b.ppid, "D is in its parent's session", b.sid, b.ppid);
    expect(b.pgrp == b.ppid, "D is in its parent's group", b.pgrp, b.ppid);
    pid_t e = fork();
    if (e == 0) proc_E();
    signal_ready();
    wait_go();
    reap(e, "E", 14, 0, 0);
    check_ids(&b);
    finish(13);
    return 0;
}

static int proc_C(void *arg) {
    (void)arg;
    me = "C";
    if (setsid() < 0) report(0, "setsid: %s", strerror(errno));
    struct ids b = get_ids();
    expect(b.sid == b.pid && b.pgrp == b.pid, "C leads its session and group", b.sid, b.pid);
    char rfd[16], ffd[16];
    snprintf(rfd, sizeof rfd, "%d", ready_w);
    snprintf(ffd, sizeof ffd, "%d", finish_w);
    pid_t d = vfork();
    if (d == 0) {
        execl(self_exe, self_exe, "helper", work, rfd, ffd, (char *)NULL);
        _exit(127);
    }
    if (d < 0) report(0, "vfork: %s", strerror(errno));
    signal_ready();
    wait_go();
    reap(d, "D", 13, 0, 0);
    check_ids(&b);
    finish(12);
    return 0;
}

static void proc_B(void) {
    me = "B";
    struct ids b = get_ids();
    expect(b.pgrp == b.ppid, "B is in A's group", b.pgrp, b.ppid);
    static char stack[256 * 1024];
    pid_t c = clone(proc_C, stack + sizeof stack, SIGCHLD, NULL);
    if (c < 0) report(0, "clone: %s", strerror(errno));
    signal_ready();
    wait_go();
    reap(c, "C", 12, 0, 0);
    check_ids(&b);
    finish(11);
}

static void proc_A(void) {
    me = "A";
    setpgid(0, 0);
    struct ids b = get_ids();
    expect(b.pgrp == b.pid, "A leads its own group", b.pgrp, b.pid);
    pid_t za = fork();
    if (za == 0) _exit(43);
    pid_t bp = fork();
    if (bp == 0) proc_B();
    wait_zombie(za, "ZA");
    signal_ready();
    /* Blocked in waitpid across the cut: B exits only after go. */
    reap(bp, "B", 11, 0, 0);
    reap(za, "ZA", 43, 0, WNOHANG);
    check_ids(&b);
    finish(10);
}

static void proc_F(pid_t a) {
    me = "F";
    if (setpgid(0, a) < 0) report(0, "setpgid(0, A=%d): %s", a, strerror(errno));
    struct ids b = get_ids();
    expect(b.pgrp == a, "F is in A's group", b.pgrp, a);
    signal_ready();
    wait_go();
    check_ids(&b);
    finish(15);
}

static void proc_O2(void) {
    me = "O2";
    for (int i = 0; getppid() != 1 && i < 2000; i++) sleep_ms(5);
    struct ids b = get_ids();
    expect(b.ppid == 1, "orphan O2 is init's child before the cut", b.ppid, 1);
    signal_ready();
    wait_go();
    expect(getppid() == 1, "orphan O2 is init's child after the cut", getppid(), 1);
    check_ids(&b);
    finish(0);
}

/* Reads `n` ready bytes. */
static void wait_ready(int rfd, int n) {
    char c;
    for (int got = 0; got < n;) {
        ssize_t r = read(rfd, &c, 1);
        if (r == 1) got++;
        else if (r < 0 && errno == EINTR) continue;
        else {
            report(0, "ready pipe: %zd (%s) after %d of %d", r, strerror(errno), got, n);
            return;
        }
    }
}

/* Drains the finish pipe until EOF: expects `n` 'P' bytes. */
static void drain_finish(int ffd, int n) {
    int p = 0, f = 0;
    char buf[64];
    for (;;) {
        struct pollfd pfd = {ffd, POLLIN, 0};
        int r = poll(&pfd, 1, 20000);
        if (r == 0) {
            report(0, "finish pipe: no EOF after 20 s (%d passed, %d failed so far)", p, f);
            return;
        }
        if (r < 0) {
            if (errno == EINTR) continue;
            report(0, "poll: %s", strerror(errno));
            return;
        }
        ssize_t k = read(ffd, buf, sizeof buf);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        for (ssize_t i = 0; i < k; i++) {
            if (buf[i] == 'P') p++;
            else f++;
        }
    }
    report(p == n && f == 0, "every process finished: %d passed, %d failed, want %d passed", p, f, n);
}

static int main_tree(void) {
    int rp[2], fp[2];
    if (pipe(rp) || pipe(fp)) return 2;
    ready_w = rp[1];
    finish_w = fp[1];
    struct ids b = get_ids();
    say("root pid %ld", b.pid);
    pid_t z = fork();
    if (z == 0) _exit(42);
    pid_t a = fork();
    if (a == 0) proc_A();
    setpgid(a, a); /* as a shell does: both parent and child set the group */
    pid_t f = fork();
    if (f == 0) proc_F(a);
    pid_t o1 = fork();
    if (o1 == 0) {
        me = "O1";
        if (fork() == 0) proc_O2();
        _exit(7);
    }
    reap(o1, "O1", 7, 0, 0);
    wait_zombie(z, "Z");
    /* A, B, C, D, E, F, O2 */
    wait_ready(rp[0], 7);
    close(fp[1]);
    say("READY");
    wait_go();
    check_ids(&b);
    reap(z, "Z", 42, 0, WNOHANG);
    reap(f, "F", 15, 0, 0);
    reap(a, "A", 10, 0, 0);
    drain_finish(fp[0], 7);
    say("DONE %d", failures);
    return failures ? 1 : 0;
}

/* ---------------- single cases ---------------- */

/* The root of a single case: sets up the pipes, runs `setup` (which forks), waits for
 * `nready` processes, READY, go, its own checks, `after` (reaps), and the finish pipe. */
static int single(void (*setup)(void), int nready, void (*after)(void)) {
    int rp[2], fp[2];
    if (pipe(rp) || pipe(fp)) return 2;
    ready_w = rp[1];
    finish_w = fp[1];
    struct ids b = get_ids();
    say("root pid %ld", b.pid);
    setup();
    wait_ready(rp[0], nready);
    close(fp[1]);
    say("READY");
    wait_go();
    check_ids(&b);
    after();
    drain_finish(fp[0], nready);
    say("DONE %d", failures);
    return failures ? 1 : 0;
}

static pid_t zs, s_pid, gl, gm, da;
static struct ids root_ids;

static void sigzombie_setup(void) {
    zs = fork();
    if (zs == 0) {
        signal(SIGUSR2, SIG_DFL);
        raise(SIGUSR2);
        _exit(1);
    }
    wait_zombie(zs, "ZS");
}
static void sigzombie_after(void) { reap(zs, "ZS", 0, SIGUSR2, WNOHANG); }

/* S forks S1, then starts a session: S1 keeps R's session and group. */
static void setsid_setup(void) {
    root_ids = get_ids();
    s_pid = fork();
    if (s_pid != 0) return;
    me = "S";
    int go[2];
    if (pipe(go)) _exit(100);
    pid_t s1 = fork();
    if (s1 == 0) {
        me = "S1";
        char c;
        close(go[1]);
        if (read(go[0], &c, 1) != 0) report(0, "go pipe");
        struct ids b1 = get_ids();
        expect(b1.sid == root_ids.sid && b1.pgrp == root_ids.pgrp, "S1 stays in R's session after S's setsid", b1.sid,
               root_ids.sid);
        signal_ready();
        wait_go();
        check_ids(&b1);
        finish(21);
    }
    if (setsid() < 0) report(0, "setsid: %s", strerror(errno));
    close(go[1]);
    struct ids bs = get_ids();
    expect(bs.sid == bs.pid, "S leads its session", bs.sid, bs.pid);
    signal_ready();
    wait_go();
    reap(s1, "S1", 21, 0, 0);
    check_ids(&bs);
    finish(20);
}
static void setsid_after(void) { reap(s_pid, "S", 20, 0, 0); }

/* GL leads a group, GM joins it, GL exits: the group lives on without its leader. */
static void group_setup(void) {
    gl = fork();
    if (gl == 0) {
        setpgid(0, 0);
        pause();
        _exit(0);
    }
    setpgid(gl, gl);
    gm = fork();
    if (gm == 0) {
        me = "GM";
        if (setpgid(0, gl) < 0) report(0, "setpgid(0, GL=%d): %s", gl, strerror(errno));
        struct ids bg = get_ids();
        expect(bg.pgrp == gl, "GM is in GL's group", bg.pgrp, gl);
        signal_ready();
        wait_go();
        check_ids(&bg);
        finish(22);
    }
    /* GL goes once GM is in its group (GM signals ready after joining). */
    int st;
    for (int i = 0; i < 2000 && getpgid(gm) != gl; i++) sleep_ms(5);
    kill(gl, SIGKILL);
    waitpid(gl, &st, 0);
    report(WIFSIGNALED(st), "GL (%d) is gone; its group lives on in GM", gl);
}
static void group_after(void) { reap(gm, "GM", 22, 0, 0); }

/* DA: setsid, fork DB, exit (the classic daemon double fork). */
static void session_setup(void) {
    da = fork();
    if (da != 0) {
        reap(da, "DA", 23, 0, 0);
        return;
    }
    me = "DA";
    if (setsid() < 0) report(0, "setsid: %s", strerror(errno));
    if (fork() == 0) {
        me = "DB";
        for (int i = 0; getppid() != 1 && i < 2000; i++) sleep_ms(5);
        struct ids bd = get_ids();
        expect(bd.ppid == 1 && bd.sid != bd.pid && bd.pgrp == bd.sid, "DB: orphan in DA's session", bd.sid,
               bd.ppid);
        signal_ready();
        wait_go();
        check_ids(&bd);
        finish(0);
    }
    _exit(failures ? 100 : 23);
}
static void nothing(void) {}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    ssize_t n = readlink("/proc/self/exe", self_exe, sizeof self_exe - 1);
    if (n <= 0) return 2;
    self_exe[n] = 0;
    if (argc >= 5 && strcmp(argv[1], "helper") == 0) return helper_main(argv);
    if (argc < 2) return 2;
    snprintf(work, sizeof work, "%s", argv[1]);
    const char *mode = argc > 2 ? argv[2] : "main";
    if (strcmp(mode, "main") == 0) return main_tree();
    if (strcmp(mode, "sigzombie") == 0) return single(sigzombie_setup, 0, sigzombie_after);
    if (strcmp(mode, "setsid-after-fork") == 0) return single(setsid_setup, 2, setsid_after);
    if (strcmp(mode, "dead-group-leader") == 0) return single(group_setup, 1, group_after);
    if (strcmp(mode, "dead-session-leader") == 0) return single(session_setup, 1, nothing);
    return 2;
}
