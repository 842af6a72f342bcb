/* procstate: process-wide state that must survive checkpoint/restart, self-checking.
 *
 * Usage: procstate WORKDIR   (the test sets STASIS_TEST_VAR in the environment)
 * Before READY it sets up: signal dispositions on every catchable signal (handlers with
 * various flags and masks, SIG_IGN, default), blocked pending signals (thread-directed
 * SIGUSR1 from raise, process-wide SIGUSR2 from kill, two queued SIGRTMIN+3 with values,
 * a thread-directed SIGRTMIN+1 with a value), a periodic ITIMER_REAL, two POSIX timers
 * (periodic SIGEV_SIGNAL on CLOCK_MONOTONIC and an armed SIGEV_NONE one), cwd, umask,
 * rlimits, personality, comm, and records /proc/self/{exe,cmdline,environ,auxv,stat}, AT_RANDOM, brk,
 * pid and ppid. After WORKDIR/go exists it compares everything, prints PASS/FAIL lines and
 * "DONE <failures>".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int failures = 0;

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
    /* sleeps the whole time even if signal handlers interrupt it */
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_nsec += (ms % 1000) * 1000000L;
    t.tv_sec += ms / 1000 + t.tv_nsec / 1000000000L;
    t.tv_nsec %= 1000000000L;
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
    }
}

static size_t read_file(const char *path, char *buf, size_t cap) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    size_t n = 0;
    ssize_t r;
    while (n < cap && (r = read(fd, buf + n, cap - n)) > 0) n += r;
    close(fd);
    return n;
}

/* ---------- signal handlers ---------- */

static volatile sig_atomic_t generic_count[65];
static void generic_handler(int sig) { generic_count[sig]++; }
static void generic_action(int sig, siginfo_t *si, void *uc) {
    (void)si;
    (void)uc;
    generic_count[sig]++;
}

static volatile sig_atomic_t usr1_count, usr2_count, usr1_code, usr1_pid;
static void usr1_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    usr1_count++;
    usr1_code = si->si_code;
    usr1_pid = si->si_pid;
}
static void usr2_handler(int sig) {
    (void)sig;
    usr2_count++;
}

static volatile int rt3_vals[8];
static volatile sig_atomic_t rt3_count, rt3_codes_ok = 1;
static void rt3_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    if (rt3_count < 8) rt3_vals[rt3_count] = si->si_value.sival_int;
    if (si->si_code != SI_QUEUE || si->si_pid != getpid()) rt3_codes_ok = 0;
    rt3_count++;
}
static volatile sig_atomic_t rt1_count, rt1_val;
static void rt1_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    rt1_count++;
    rt1_val = si->si_value.sival_int;
}

static volatile sig_atomic_t alrm_count;
static void alrm_handler(int sig) {
    (void)sig;
    alrm_count++;
}

static volatile sig_atomic_t ptimer_count, ptimer_code, ptimer_val, ptimer_tid, ptimer_overrun;
static void ptimer_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    ptimer_count++;
    ptimer_code = si->si_code;
    ptimer_val = si->si_value.sival_int;
    ptimer_tid = si->si_timerid;
    ptimer_overrun = si->si_overrun;
}

/* ---------- recorded state ---------- */

static struct sigaction before_act[65];
static char exe0[PATH_MAX], cmdline0[8192], environ0[65536], auxv0[4096], cwd0[PATH_MAX];
static size_t cmdline0_len, environ0_len, auxv0_len;
static unsigned char random0[16];
static unsigned long random_ptr0, pagesz0;
static struct rlimit rlim0[RLIM_NLIMITS];
static long brk0;
static char comm0[17];
static unsigned long statf0[60];

static int nstat_fields(unsigned long *f, int max) {
    /* /proc/self/stat: fields after the ")" of comm; f[i] is field number i (1-based) */
    char buf[4096];
    size_t n = read_file("/proc/self/stat", buf, sizeof buf - 1);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return 0;
    p += 2;
    int i = 3;
    while (*p && i < max) {
        if (i == 3) { /* state letter */
            f[i++] = (unsigned char)*p;
            p += 2;
            continue;
        }
        f[i++] = strtoul(p, &p, 10);
        while (*p == ' ') p++;
    }
    return i;
}

static const char *sigflags_str(unsigned long fl) {
    static char b[128];
    snprintf(b, sizeof b, "%#lx", fl);
    return b;
}

static int is_special(int sig) {
    return sig == SIGKILL || sig == SIGSTOP || sig == 32 || sig == 33 || sig == SIGSEGV ||
           sig == SIGBUS || sig == SIGILL || sig == SIGFPE || sig == SIGTRAP || sig == SIGABRT ||
           sig == SIGSYS;
}

static void install(int sig, void *h, int siginfo, int flags, int masksig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    if (siginfo) sa.sa_sigaction = h;
    else sa.sa_handler = h;
    sa.sa_flags = flags | (siginfo ? SA_SIGINFO : 0);
    sigemptyset(&sa.sa_mask);
    if (masksig) sigaddset(&sa.sa_mask, masksig);
    if (sigaction(sig, &sa, NULL) != 0) report(0, "sigaction(%d) setup: %s", sig, strerror(errno));
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    char gopath[PATH_MAX];
    snprintf(gopath, sizeof gopath, "%s/go", argv[1]);
    int rt = SIGRTMIN;

    /* --- dispositions: a varied mix on every catchable signal --- */
    for (int s = 1; s < 65; s++) {
        if (is_special(s)) continue;
        if (s == SIGUSR1 || s == SIGUSR2 || s == SIGALRM || s == rt + 1 || s == rt + 2 || s == rt + 3)
            continue;
        switch (s % 5) {
        case 0: install(s, generic_handler, 0, SA_RESTART, 0); break;
        case 1: install(s, generic_action, 1, SA_ONSTACK | SA_RESTART, s == 64 ? 1 : s + 1); break;
        case 2: install(s, (void *)SIG_IGN, 0, 0, 0); break;
        case 3: install(s, generic_action, 1, SA_NODEFER | SA_RESETHAND, SIGTERM); break;
        case 4: break; /* default */
        }
    }
    install(SIGCHLD, generic_action, 1, SA_NOCLDSTOP | SA_NOCLDWAIT | SA_RESTART, SIGPIPE);
    install(SIGPIPE, (void *)SIG_IGN, 0, 0, 0);
    install(SIGUSR1, usr1_handler, 1, 0, SIGUSR2);
    install(SIGUSR2, usr2_handler, 0, SA_RESTART, 0);
    install(rt + 3, rt3_handler, 1, SA_RESTART, 0);
    install(rt + 1, rt1_handler, 1, 0, 0);
    install(SIGALRM, alrm_handler, 0, SA_RESTART, 0);
    install(rt + 2, ptimer_handler, 1, SA_RESTART, SIGALRM);
    for (int s = 1; s < 65; s++) sigaction(s, NULL, &before_act[s]);

    /* --- pending signals, blocked --- */
    sigset_t blk;
    sigemptyset(&blk);
    sigaddset(&blk, SIGUSR1);
    sigaddset(&blk, SIGUSR2);
    sigaddset(&blk, rt + 3);
    sigaddset(&blk, rt + 1);
    sigprocmask(SIG_BLOCK, &blk, NULL);
    raise(SIGUSR1);                                           /* thread-directed */
    kill(getpid(), SIGUSR2);                                  /* process-wide */
    sigqueue(getpid(), rt + 3, (union sigval){.sival_int = 111}); /* queued twice */
    sigqueue(getpid(), rt + 3, (union sigval){.sival_int = 222});
    siginfo_t si1;
    memset(&si1, 0, sizeof si1);
    si1.si_signo = rt + 1;
    si1.si_code = SI_QUEUE;
    si1.si_pid = getpid();
    si1.si_uid = getuid();
    si1.si_value.sival_int = 4242;
    syscall(SYS_rt_tgsigqueueinfo, getpid(), gettid(), rt + 1, &si1); /* thread-directed rt */
    sigset_t mask0;
    sigprocmask(SIG_SETMASK, NULL, &mask0);

    /* --- timers --- */
    struct itimerval itv = {{0, 50000}, {0, 50000}};
    setitimer(ITIMER_REAL, &itv, NULL);
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_SIGNAL;
    sev.sigev_signo = rt + 2;
    sev.sigev_value.sival_int = 0x5eed;
    timer_t tid_a, tid_b, dummy[3];
    /* create and delete a few timers first so that the ids are not simply 0 and 1 */
    for (int i = 0; i < 3; i++) timer_create(CLOCK_MONOTONIC, NULL, &dummy[i]);
    for (int i = 0; i < 3; i++) timer_delete(dummy[i]);
    if (timer_create(CLOCK_MONOTONIC, &sev, &tid_a) != 0) report(0, "timer_create A: %s", strerror(errno));
    for (int i = 0; i < 2; i++) timer_create(CLOCK_REALTIME, NULL, &dummy[i]);
    for (int i = 0; i < 2; i++) timer_delete(dummy[i]);
    struct itimerspec its = {{0, 40000000}, {0, 40000000}};
    timer_settime(tid_a, 0, &its, NULL);
    struct sigevent sevn;
    memset(&sevn, 0, sizeof sevn);
    sevn.sigev_notify = SIGEV_NONE;
    if (timer_create(CLOCK_MONOTONIC, &sevn, &tid_b) != 0) report(0, "timer_create B: %s", strerror(errno));
    struct itimerspec itsb = {{0, 0}, {1000, 0}};
    timer_settime(tid_b, 0, &itsb, NULL);

    /* --- cwd, umask, rlimits, comm --- */
    char sub[PATH_MAX];
    snprintf(sub, sizeof sub, "%s/cwd-sub.d", argv[1]);
    mkdir(sub, 0755);
    if (chdir(sub) != 0) report(0, "chdir setup: %s", strerror(errno));
    int mk = open("marker", O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (mk >= 0) close(mk);
    if (!getcwd(cwd0, sizeof cwd0)) cwd0[0] = 0;
    umask(027);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = 200;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_CORE, &rl);
    rl.rlim_cur = 0;
    setrlimit(RLIMIT_CORE, &rl);
    getrlimit(RLIMIT_MSGQUEUE, &rl);
    rl.rlim_cur = rl.rlim_cur / 2;
    setrlimit(RLIMIT_MSGQUEUE, &rl);
    for (int r = 0; r < RLIM_NLIMITS; r++) getrlimit(r, &rlim0[r]);
    personality(PER_LINUX | ADDR_NO_RANDOMIZE);
    int pers0 = personality(0xffffffff);
    prctl(PR_SET_NAME, "stasis-procst");
    prctl(PR_GET_NAME, comm0);

    /* --- /proc views, auxv, brk, ids --- */
    ssize_t el = readlink("/proc/self/exe", exe0, sizeof exe0 - 1);
    exe0[el > 0 ? el : 0] = 0;
    cmdline0_len = read_file("/proc/self/cmdline", cmdline0, sizeof cmdline0);
    environ0_len = read_file("/proc/self/environ", environ0, sizeof environ0);
    auxv0_len = read_file("/proc/self/auxv", auxv0, sizeof auxv0);
    random_ptr0 = getauxval(AT_RANDOM);
    if (random_ptr0) memcpy(random0, (void *)random_ptr0, 16);
    pagesz0 = getauxval(AT_PAGESZ);
    const char *env0 = getenv("STASIS_TEST_VAR");
    char envval0[256];
    snprintf(envval0, sizeof envval0, "%s", env0 ? env0 : "(unset)");
    setenv("STASIS_SET_INSIDE", "set-by-the-program", 1);
    void *heap = malloc(100000); /* grows brk */
    memset(heap, 0x5a, 100000);
    brk0 = syscall(SYS_brk, 0);
    void *sbrk0 = sbrk(0);
    nstat_fields(statf0, 60);
    pid_t pid0 = getpid(), ppid0 = getppid();

    sleep_ms(150); /* the timers fire a few times */
    int alrm_at_ready = alrm_count, ptimer_at_ready = ptimer_count;
    if (alrm_at_ready == 0 || ptimer_at_ready == 0)
        report(0, "timers fire before READY: itimer %d, posix timer %d", alrm_at_ready, ptimer_at_ready);
    printf("READY\n");

    struct stat sb;
    while (stat(gopath, &sb) != 0) sleep_ms(10);

    /* ===== checks ===== */
    /* dispositions */
    int bad = 0;
    char first[256] = "";
    for (int s = 1; s < 65; s++) {
        struct sigaction now;
        sigaction(s, NULL, &now);
        struct sigaction *b = &before_act[s];
        int diff = (void *)now.sa_handler != (void *)b->sa_handler || now.sa_flags != b->sa_flags ||
                   (void *)now.sa_restorer != (void *)b->sa_restorer;
        for (int m = 1; m < 65; m++) diff |= sigismember(&now.sa_mask, m) != sigismember(&b->sa_mask, m);
        if (diff) {
            if (!bad)
                snprintf(first, sizeof first,
                         "first: signal %d handler %p flags %s restorer %p (was %p flags %#x restorer %p)", s,
                         (void *)now.sa_handler, sigflags_str(now.sa_flags), (void *)now.sa_restorer,
                         (void *)b->sa_handler, b->sa_flags, (void *)b->sa_restorer);
            bad++;
        }
    }
    int nh = 0, ni = 0;
    for (int s = 1; s < 65; s++) {
        nh += before_act[s].sa_handler != SIG_DFL && before_act[s].sa_handler != SIG_IGN;
        ni += before_act[s].sa_handler == SIG_IGN;
    }
    report(!bad, "signal dispositions: %d of 64 differ (%d handlers, %d ignored) %s", bad, nh, ni, first);

    /* mask and pending signals */
    sigset_t mask1, pend;
    sigprocmask(SIG_SETMASK, NULL, &mask1);
    bad = 0;
    for (int m = 1; m < 65; m++) bad += sigismember(&mask1, m) != sigismember(&mask0, m);
    report(!bad, "signal mask: %d signals differ", bad);
    sigpending(&pend);
    int want_pend[] = {SIGUSR1, SIGUSR2, rt + 1, rt + 3};
    char pend_s[256] = "";
    for (int m = 1; m < 65; m++)
        if (sigismember(&pend, m)) snprintf(pend_s + strlen(pend_s), sizeof pend_s - strlen(pend_s), " %d", m);
    int pend_ok = 1;
    for (int m = 1; m < 65; m++) {
        int want = 0;
        for (unsigned k = 0; k < sizeof want_pend / sizeof *want_pend; k++) want |= want_pend[k] == m;
        if (want != !!sigismember(&pend, m)) pend_ok = 0;
    }
    report(pend_ok, "sigpending shows exactly SIGUSR1 SIGUSR2 SIGRTMIN+1 SIGRTMIN+3:%s (want %d %d %d %d)",
           pend_s, SIGUSR1, SIGUSR2, rt + 1, rt + 3);
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, SIGUSR1);
    sigprocmask(SIG_UNBLOCK, &one, NULL);
    report(usr1_count == 1 && usr1_code == SI_TKILL && usr1_pid == pid0,
           "pending SIGUSR1 (raise) delivered on unblock: count %d, si_code %d (want SI_TKILL %d), si_pid %d",
           usr1_count, usr1_code, SI_TKILL, usr1_pid);
    sigemptyset(&one);
    sigaddset(&one, SIGUSR2);
    sigprocmask(SIG_UNBLOCK, &one, NULL);
    report(usr2_count == 1, "pending process-wide SIGUSR2 (kill) delivered on unblock: count %d", usr2_count);
    sigemptyset(&one);
    sigaddset(&one, rt + 3);
    sigprocmask(SIG_UNBLOCK, &one, NULL);
    report(rt3_count == 2 && rt3_vals[0] == 111 && rt3_vals[1] == 222 && rt3_codes_ok,
           "queued SIGRTMIN+3 x2 delivered in order with values: count %d, values %d %d, si_code/si_pid ok %d",
           rt3_count, rt3_vals[0], rt3_vals[1], rt3_codes_ok);
    sigemptyset(&one);
    sigaddset(&one, rt + 1);
    sigprocmask(SIG_UNBLOCK, &one, NULL);
    report(rt1_count == 1 && rt1_val == 4242, "thread-directed SIGRTMIN+1 with value: count %d, value %d",
           rt1_count, rt1_val);
    sigpending(&pend);
    int left = 0;
    for (int m = 1; m < 65; m++) left += sigismember(&pend, m);
    report(left == 0, "nothing else pending: %d", left);

    /* timers keep firing */
    /* at least 3 more of each, waited for up to 20 s: a loaded machine may run this
       process seldom, and a timer whose signal is still pending is not re-armed */
    int a1 = alrm_count, p1 = ptimer_count;
    long waited = 0;
    while ((alrm_count - a1 < 3 || ptimer_count - p1 < 4) && waited < 20000) {
        sleep_ms(10);
        waited += 10;
    }
    int a2 = alrm_count, p2 = ptimer_count;
    report(a2 - a1 >= 3, "ITIMER_REAL keeps firing after restart: %d SIGALRM in %ld ms (%d before READY)",
           a2 - a1, waited, alrm_at_ready);
    struct itimerval gitv;
    getitimer(ITIMER_REAL, &gitv);
    sigset_t pend_now;
    sigpending(&pend_now);
    /* value 0 is right only while a SIGALRM waits to be taken */
    report(gitv.it_interval.tv_sec == 0 && gitv.it_interval.tv_usec == 50000 &&
               (gitv.it_value.tv_sec || gitv.it_value.tv_usec || sigismember(&pend_now, SIGALRM)) &&
               gitv.it_value.tv_sec == 0 && gitv.it_value.tv_usec <= 50000,
           "getitimer(ITIMER_REAL): interval %ld.%06ld value %ld.%06ld", (long)gitv.it_interval.tv_sec,
           (long)gitv.it_interval.tv_usec, (long)gitv.it_value.tv_sec, (long)gitv.it_value.tv_usec);
    report(p2 - p1 >= 4 && ptimer_code == SI_TIMER && ptimer_val == 0x5eed &&
               ptimer_tid == (int)(intptr_t)tid_a,
           "POSIX timer keeps firing: %d signals in %ld ms, si_code %d (SI_TIMER %d), value %#x, si_timerid %d "
           "(timer id %d)",
           p2 - p1, waited, ptimer_code, SI_TIMER, ptimer_val, ptimer_tid, (int)(intptr_t)tid_a);
    struct itimerspec ga, gb;
    int ra = timer_gettime(tid_a, &ga), rb = timer_gettime(tid_b, &gb);
    report(ra == 0 && ga.it_interval.tv_sec == 0 && ga.it_interval.tv_nsec == 40000000 &&
               ga.it_value.tv_sec == 0 && ga.it_value.tv_nsec > 0,
           "timer_gettime(A, id %d): %d, interval %ld.%09ld value %ld.%09ld", (int)(intptr_t)tid_a, ra,
           (long)ga.it_interval.tv_sec, ga.it_interval.tv_nsec, (long)ga.it_value.tv_sec, ga.it_value.tv_nsec);
    report(rb == 0 && gb.it_interval.tv_sec == 0 && gb.it_interval.tv_nsec == 0 && gb.it_value.tv_sec >= 980 &&
               gb.it_value.tv_sec < 1000,
           "timer_gettime(B, id %d, SIGEV_NONE): %d, value %ld.%09ld (armed for 1000 s)", (int)(intptr_t)tid_b, rb,
           (long)gb.it_value.tv_sec, gb.it_value.tv_nsec);

    /* cwd, umask, rlimits, comm */
    char cwd1[PATH_MAX];
    if (!getcwd(cwd1, sizeof cwd1)) snprintf(cwd1, sizeof cwd1, "(getcwd: %s)", strerror(errno));
    int mfd = open("marker", O_RDONLY);
    report(strcmp(cwd1, cwd0) == 0 && mfd >= 0, "cwd: %s (was %s), relative open: %d", cwd1, cwd0, mfd);
    if (mfd >= 0) close(mfd);
    mode_t um = umask(0);
    umask(um);
    report(um == 027, "umask %03o (want 027)", um);
    bad = 0;
    first[0] = 0;
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        struct rlimit now;
        getrlimit(r, &now);
        if (now.rlim_cur != rlim0[r].rlim_cur || now.rlim_max != rlim0[r].rlim_max) {
            if (!bad)
                snprintf(first, sizeof first, "first: resource %d = %llu/%llu (was %llu/%llu)", r,
                         (unsigned long long)now.rlim_cur, (unsigned long long)now.rlim_max,
                         (unsigned long long)rlim0[r].rlim_cur, (unsigned long long)rlim0[r].rlim_max);
            bad++;
        }
    }
    report(!bad && rlim0[RLIMIT_NOFILE].rlim_cur == 200 && rlim0[RLIMIT_CORE].rlim_cur == 0,
           "rlimits: %d of %d differ %s", bad, RLIM_NLIMITS, first);
    int pers1 = personality(0xffffffff);
    report(pers1 == pers0 && (pers0 & ADDR_NO_RANDOMIZE), "personality %#x (was %#x)", pers1, pers0);
    char comm1[17] = "", comm_proc[64] = "";
    prctl(PR_GET_NAME, comm1);
    size_t cl = read_file("/proc/self/comm", comm_proc, sizeof comm_proc - 1);
    comm_proc[cl] = 0;
    if (cl && comm_proc[cl - 1] == '\n') comm_proc[cl - 1] = 0;
    report(strcmp(comm1, comm0) == 0 && strcmp(comm_proc, comm0) == 0 && strcmp(comm0, "stasis-procst") == 0,
           "comm: PR_GET_NAME '%s', /proc/self/comm '%s' (was '%s')", comm1, comm_proc, comm0);

    /* /proc views */
    char exe1[PATH_MAX];
    el = readlink("/proc/self/exe", exe1, sizeof exe1 - 1);
    exe1[el > 0 ? el : 0] = 0;
    report(strcmp(exe1, exe0) == 0, "/proc/self/exe: %s (was %s)", exe1, exe0);
    char buf[65536];
    size_t n = read_file("/proc/self/cmdline", buf, sizeof buf);
    report(n == cmdline0_len && memcmp(buf, cmdline0, n) == 0 && strcmp(buf, argv[0]) == 0,
           "/proc/self/cmdline: %zu bytes (was %zu), argv[0] %s", n, cmdline0_len, buf);
    n = read_file("/proc/self/environ", buf, sizeof buf);
    report(n == environ0_len && memcmp(buf, environ0, n) == 0, "/proc/self/environ: %zu bytes (was %zu), same %d", n,
           environ0_len, n == environ0_len && memcmp(buf, environ0, n) == 0);
    const char *env1 = getenv("STASIS_TEST_VAR"), *env2 = getenv("STASIS_SET_INSIDE");
    report(env0 && env1 && strcmp(env1, envval0) == 0 && strcmp(env1, "value from the test") == 0,
           "getenv STASIS_TEST_VAR: '%s' (was '%s')", env1 ? env1 : "(unset)", envval0);
    report(env2 && strcmp(env2, "set-by-the-program") == 0, "getenv STASIS_SET_INSIDE: '%s'",
           env2 ? env2 : "(unset)");
    n = read_file("/proc/self/auxv", buf, sizeof buf);
    first[0] = 0;
    if (n != auxv0_len || memcmp(buf, auxv0, n) != 0) {
        const unsigned long *a = (const unsigned long *)buf, *b = (const unsigned long *)auxv0;
        for (size_t i = 0; i + 1 < n / 8 && i + 1 < auxv0_len / 8; i += 2)
            if (a[i] != b[i] || a[i + 1] != b[i + 1]) {
                snprintf(first, sizeof first, ": first difference: entry %zu type %lu = %#lx (was type %lu = %#lx)",
                         i / 2, a[i], a[i + 1], b[i], b[i + 1]);
                break;
            }
    }
    report(n == auxv0_len && memcmp(buf, auxv0, n) == 0, "/proc/self/auxv: %zu bytes (was %zu)%s", n, auxv0_len,
           first);
    unsigned long rp = getauxval(AT_RANDOM);
    report(rp == random_ptr0 && rp && memcmp((void *)rp, random0, 16) == 0,
           "AT_RANDOM at %#lx (was %#lx), 16 bytes unchanged", rp, random_ptr0);
    report(getauxval(AT_PAGESZ) == pagesz0 && pagesz0 == (unsigned long)sysconf(_SC_PAGESIZE),
           "AT_PAGESZ %lu (was %lu)", getauxval(AT_PAGESZ), pagesz0);

    /* brk and mm fields */
    long brk1 = syscall(SYS_brk, 0);
    report(brk1 == brk0 && sbrk(0) == sbrk0, "brk: kernel %#lx (was %#lx), sbrk(0) %p (was %p)", brk1, brk0,
           sbrk(0), sbrk0);
    char *grown = sbrk(8192);
    int grow_ok = grown == sbrk0 && syscall(SYS_brk, 0) == brk0 + 8192;
    if (grow_ok) {
        memset(grown, 0x77, 8192);
        grow_ok = grown[8191] == 0x77;
    }
    report(grow_ok, "brk grows from where it was: sbrk(8192) = %p (want %p), kernel brk %#lx", (void *)grown, sbrk0,
           syscall(SYS_brk, 0));
    sbrk(-8192);
    unsigned long statf1[60];
    nstat_fields(statf1, 60);
    /* start_code end_code start_stack, start_data end_data start_brk arg_start arg_end env_start env_end */
    int fields[] = {26, 27, 28, 45, 46, 47, 48, 49, 50, 51};
    bad = 0;
    first[0] = 0;
    for (unsigned k = 0; k < sizeof fields / sizeof *fields; k++) {
        int f = fields[k];
        if (statf1[f] != statf0[f]) {
            if (!bad)
                snprintf(first, sizeof first, ": first: field %d = %#lx (was %#lx)", f, statf1[f], statf0[f]);
            bad++;
        }
    }
    report(!bad && statf0[47] != 0, "mm fields in /proc/self/stat (code, stack, data, brk, args, env): %d differ%s",
           bad, first);

    report(getpid() == pid0 && getppid() == ppid0, "getpid %d (was %d), getppid %d (was %d)", getpid(), pid0,
           getppid(), ppid0);

    printf("DONE %d\n", failures);
    return failures ? 1 : 0;
}
