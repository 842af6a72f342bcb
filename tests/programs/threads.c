/* threads: a multi-threaded, self-checking program for checkpoint/restart.
 *
 * Usage: threads WORKDIR
 * Starts six threads besides the main one, each with its own name, TLS values, signal mask
 * and sigaltstack, and records per thread (before printing READY): tid, fs base, robust list
 * head, rseq registration, the alternate stack, the mask. Then the threads sit in:
 *   fpu     - a tight asm loop that keeps distinct values in general registers and in
 *             ymm0-15 (or zmm0-31 and k1-k7 with AVX-512), with a non-default rounding
 *             mode and PKRU value, sleeping 1 ms per round with a raw nanosleep syscall;
 *   sleeper - one relative nanosleep of 3 s (must not return early nor with EINTR);
 *   condwait- pthread_cond_wait on a predicate the main thread sets after "go";
 *   reader  - read() on a pipe whose write end the main thread writes after "go";
 *   futex   - a raw FUTEX_WAIT that must only return once woken (never EINTR);
 *   poller  - polling a flag every 10 ms, with no alternate stack and a thread-directed
 *             signal pending (the handler must then run in the poller, with its value).
 * Before READY the main thread waits until /proc shows the four blocking threads inside their
 * syscalls, and queues a signal with a value to the poller, which blocks it.
 * After WORKDIR/go exists, every thread checks its own state against the recorded values
 * and prints PASS/FAIL lines; the main thread joins them all (with a timeout: joining
 * depends on clear-child-tid), then prints "DONE <failures>".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fenv.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NTHREADS 7 /* including main */
#define SLEEP_S 3

static pthread_mutex_t print_lock = PTHREAD_MUTEX_INITIALIZER;
static int failures = 0;
static volatile int go_flag = 0;

static void report(int ok, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&print_lock);
    if (!ok) failures++;
    /* one write per line, so threads never interleave within a line */
    char line[600];
    int n = snprintf(line, sizeof line, "%s %s\n", ok ? "PASS" : "FAIL", buf);
    fwrite(line, 1, n, stdout);
    pthread_mutex_unlock(&print_lock);
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms) {
    struct timespec d = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&d, NULL);
}

static void wait_go_flag(void) {
    while (!go_flag) sleep_ms(10);
}

/* ---------- per-thread state ---------- */

static __thread long tls_val;
static __thread char tls_buf[32];

struct tstate {
    const char *name;
    int idx;
    pid_t tid;
    unsigned long fsbase;
    void *tcb_self;
    void *tls_addr;
    sigset_t mask;
    stack_t alt;
    void *robust_head;
    size_t robust_len;
    int rseq_probe_errno; /* errno of re-registering glibc's rseq area: EBUSY if registered */
    char comm[16];
};

static struct tstate states[NTHREADS];

static unsigned long get_fsbase(void) {
    unsigned long v = 0;
    syscall(SYS_arch_prctl, 0x1003 /* ARCH_GET_FS */, &v);
    return v;
}

static void *read_tcb_self(void) {
    void *p;
    __asm__ volatile("mov %%fs:0, %0" : "=r"(p));
    return p;
}

static struct rseq *rseq_area(void) {
    return (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
}

/* Re-registering the same area fails with EBUSY exactly when it is still registered with
 * the same address, length and signature (EINVAL/EPERM if different, 0 if none). */
static int rseq_probe(void) {
    /* glibc registers at least 32 bytes even when __rseq_size (the feature size) is 20 */
    unsigned len = __rseq_size < 32 ? 32 : __rseq_size;
    long r = syscall(SYS_rseq, rseq_area(), len, 0, RSEQ_SIG);
    if (r == 0) {
        /* it was not registered: undo our registration, report 0 */
        syscall(SYS_rseq, rseq_area(), len, 1 /* RSEQ_FLAG_UNREGISTER */, RSEQ_SIG);
        return 0;
    }
    return errno;
}

static void setup_thread(struct tstate *st, int idx, const char *name, int with_altstack) {
    st->name = name;
    st->idx = idx;
    tls_val = 0x5157000 + idx * 7777;
    snprintf(tls_buf, sizeof tls_buf, "tls-of-%s-%d", name, idx);
    st->tls_addr = &tls_val;

    /* a mask that differs per thread */
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGRTMIN + 4 + idx);
    if (idx % 2) sigaddset(&m, SIGUSR2);
    if (idx % 3 == 0) sigaddset(&m, SIGWINCH);
    if (idx == 5) sigaddset(&m, SIGHUP);
    pthread_sigmask(SIG_SETMASK, &m, NULL);
    pthread_sigmask(0, NULL, &st->mask);

    if (with_altstack) {
        stack_t ss;
        ss.ss_size = 65536 + idx * 4096;
        ss.ss_sp = malloc(ss.ss_size);
        ss.ss_flags = 0;
        if (sigaltstack(&ss, NULL) != 0) report(0, "%s: sigaltstack setup: %s", name, strerror(errno));
    }
    sigaltstack(NULL, &st->alt);

    char comm[16];
    snprintf(comm, sizeof comm, "thr-%s", name);
    prctl(PR_SET_NAME, comm);
    prctl(PR_GET_NAME, st->comm);

    st->tid = gettid();
    st->fsbase = get_fsbase();
    st->tcb_self = read_tcb_self();
    syscall(SYS_get_robust_list, 0, &st->robust_head, &st->robust_len);
    st->rseq_probe_errno = __rseq_size ? rseq_probe() : -1;
}

static int same_mask(const sigset_t *a, const sigset_t *b, char *diff, size_t n) {
    int ok = 1;
    diff[0] = 0;
    for (int s = 1; s < 65; s++) {
        if (sigismember(a, s) != sigismember(b, s)) {
            ok = 0;
            size_t l = strlen(diff);
            snprintf(diff + l, n - l, " %d:%d->%d", s, sigismember(a, s), sigismember(b, s));
        }
    }
    return ok;
}

/* Checks the calling thread's state against what setup_thread recorded. */
static void check_thread(struct tstate *st) {
    const char *n = st->name;
    pid_t tid = gettid();
    report(tid == st->tid, "%s tid: %d (recorded %d)", n, tid, st->tid);

    long want = 0x5157000 + st->idx * 7777;
    char wbuf[32];
    snprintf(wbuf, sizeof wbuf, "tls-of-%s-%d", n, st->idx);
    report(tls_val == want && strcmp(tls_buf, wbuf) == 0 && (void *)&tls_val == st->tls_addr,
           "%s TLS: value %#lx (want %#lx), buf '%s', at %p (was %p)", n, tls_val, want, tls_buf,
           (void *)&tls_val, st->tls_addr);

    char comm[17] = "", want_comm[17];
    prctl(PR_GET_NAME, comm);
    snprintf(want_comm, sizeof want_comm, "thr-%s", n);
    report(strcmp(comm, st->comm) == 0 && strcmp(comm, want_comm) == 0, "%s comm '%s' (was '%s')", n, comm,
           st->comm);

    unsigned long fs = get_fsbase();
    void *self = read_tcb_self();
    report(fs == st->fsbase && self == st->tcb_self && (void *)fs == (void *)pthread_self(),
           "%s fs base: %#lx (was %#lx), fs:0 %p (was %p), pthread_self %#lx", n, fs, st->fsbase,
           self, st->tcb_self, (unsigned long)pthread_self());

    sigset_t now;
    char diff[256];
    pthread_sigmask(0, NULL, &now);
    int same = same_mask(&st->mask, &now, diff, sizeof diff);
    report(same, "%s signal mask%s%s", n,
           diff[0] ? ": changed (sig:before->after)" : "", diff);

    stack_t alt;
    sigaltstack(NULL, &alt);
    report(alt.ss_sp == st->alt.ss_sp && alt.ss_size == st->alt.ss_size &&
               alt.ss_flags == st->alt.ss_flags,
           "%s sigaltstack: sp %p size %zu flags %d (was %p %zu %d)", n, alt.ss_sp, alt.ss_size,
           alt.ss_flags, st->alt.ss_sp, st->alt.ss_size, st->alt.ss_flags);

    void *head = NULL;
    size_t len = 0;
    long r = syscall(SYS_get_robust_list, 0, &head, &len);
    report(r == 0 && head == st->robust_head && len == st->robust_len && head != NULL,
           "%s robust list: head %p len %zu (was %p %zu)", n, head, len, st->robust_head,
           st->robust_len);

    if (st->rseq_probe_errno != EBUSY) {
        report(0, "%s rseq: not registered before the checkpoint (probe errno %d, __rseq_size %u)",
               n, st->rseq_probe_errno, __rseq_size);
    } else {
        int e = rseq_probe();
        /* the kernel keeps cpu_id updated only while the area is registered */
        volatile struct rseq *rs = rseq_area();
        rs->cpu_id = 0xfffff00d;
        sleep_ms(2); /* a context switch: the kernel rewrites cpu_id on return to user space */
        uint32_t cpu = rs->cpu_id;
        int gc = sched_getcpu();
        report(e == EBUSY && cpu < 4096 && gc >= 0,
               "%s rseq: re-registration probe errno %d (want EBUSY=%d), cpu_id %u after a "
               "context switch (sentinel 4294963213), sched_getcpu %d",
               n, e, EBUSY, cpu, gc);
    }
}

/* ---------- a thread-directed pending signal ---------- */

#define PENDING_SIG (SIGRTMIN + 10) /* blocked only in the poller (idx 6) */
static volatile pid_t pending_handled_tid;
static volatile int pending_handled_val, pending_handled_count;
static void pending_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    pending_handled_tid = gettid();
    pending_handled_val = si->si_value.sival_int;
    pending_handled_count++;
}

/* The syscall a thread (by its tid as the process sees it) is in, from
 * /proc/self/task/T/syscall, matched through the NSpid line of the task's status (the
 * mounted /proc may belong to an outer pid namespace). -1 if running or not found. */
static long thread_syscall(pid_t tid) {
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    long nr = -2;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char p[300], buf[1024];
        snprintf(p, sizeof p, "/proc/self/task/%s/status", e->d_name);
        FILE *f = fopen(p, "r");
        pid_t last = -1;
        while (f && fgets(buf, sizeof buf, f))
            if (strncmp(buf, "NSpid:", 6) == 0) {
                char *q = buf + 6, *end;
                for (long v; (v = strtol(q, &end, 10)), end != q; q = end) last = (pid_t)v;
            }
        if (f) fclose(f);
        if (last != tid) continue;
        snprintf(p, sizeof p, "/proc/self/task/%s/syscall", e->d_name);
        f = fopen(p, "r");
        if (f && fgets(buf, sizeof buf, f)) nr = (buf[0] >= '0' && buf[0] <= '9') ? atol(buf) : -1;
        if (f) fclose(f);
        break;
    }
    if (d) closedir(d);
    return nr;
}

/* ---------- fpu thread ---------- */

struct fpuctx {
    unsigned long gin[8];
    unsigned long gout[8];
    volatile int stop;
    int pad;
    struct timespec ts;
    unsigned long rounds;
    unsigned char vin[32][64];
    unsigned char vout[32][64];
    unsigned long kin[8];
    unsigned long kout[8];
};
static struct fpuctx fc __attribute__((aligned(64)));

#define O(f) [o_##f] "i"(offsetof(struct fpuctx, f))
#define GLOAD                                                                              \
    "mov %c[o_gin]+0(%[c]), %%rbx\n mov %c[o_gin]+8(%[c]), %%rbp\n"                        \
    "mov %c[o_gin]+16(%[c]), %%r8\n mov %c[o_gin]+24(%[c]), %%r9\n"                         \
    "mov %c[o_gin]+32(%[c]), %%r12\n mov %c[o_gin]+40(%[c]), %%r13\n"                       \
    "mov %c[o_gin]+48(%[c]), %%r14\n mov %c[o_gin]+56(%[c]), %%r15\n"
#define GSTORE                                                                             \
    "mov %%rbx, %c[o_gout]+0(%[c])\n mov %%rbp, %c[o_gout]+8(%[c])\n"                       \
    "mov %%r8, %c[o_gout]+16(%[c])\n mov %%r9, %c[o_gout]+24(%[c])\n"                       \
    "mov %%r12, %c[o_gout]+32(%[c])\n mov %%r13, %c[o_gout]+40(%[c])\n"                     \
    "mov %%r14, %c[o_gout]+48(%[c])\n mov %%r15, %c[o_gout]+56(%[c])\n"
/* Spin 2000 pauses, then (unless stopped) a raw nanosleep(ts) syscall, and again. rax, rcx,
 * r11 (syscall), rdi, rsi are the only general registers used; rdx holds the context. */
#define LOOP                                                                               \
    "1: mov $2000, %%ecx\n"                                                                \
    "2: pause\n dec %%ecx\n jnz 2b\n"                                                       \
    "incq %c[o_rounds](%[c])\n"                                                            \
    "cmpl $0, %c[o_stop](%[c])\n jne 3f\n"                                                 \
    "mov $35, %%eax\n lea %c[o_ts](%[c]), %%rdi\n xor %%esi, %%esi\n syscall\n"             \
    "jmp 1b\n"                                                                             \
    "3:\n"

#define YL(n) "vmovdqu " #n "*64+%c[o_vin](%[c]), %%ymm" #n "\n"
#define YS(n) "vmovdqu %%ymm" #n ", " #n "*64+%c[o_vout](%[c])\n"
#define ZL(n) "vmovdqu64 " #n "*64+%c[o_vin](%[c]), %%zmm" #n "\n"
#define ZS(n) "vmovdqu64 %%zmm" #n ", " #n "*64+%c[o_vout](%[c])\n"
#define KL(n) "kmovq " #n "*8+%c[o_kin](%[c]), %%k" #n "\n"
#define KS(n) "kmovq %%k" #n ", " #n "*8+%c[o_kout](%[c])\n"
#define X16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
#define X16B(M) M(16) M(17) M(18) M(19) M(20) M(21) M(22) M(23) M(24) M(25) M(26) M(27) M(28) M(29) M(30) M(31)

/* rbp is used as a general register inside the asm: saved on the stack (below the red zone). */
static void run_avx2(void) {
    __asm__ volatile("sub $128, %%rsp\n push %%rbp\n" GLOAD X16(YL) LOOP X16(YS) GSTORE "pop %%rbp\n add $128, %%rsp\n"
                     :
                     : [c] "d"(&fc), O(gin), O(gout), O(stop), O(ts), O(rounds), O(vin), O(vout)
                     : "rax", "rbx", "rcx", "rsi", "rdi", "r8", "r9", "r11", "r12", "r13",
                       "r14", "r15", "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4",
                       "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
                       "xmm13", "xmm14", "xmm15");
}

__attribute__((target("avx512f,avx512bw"))) static void run_avx512(void) {
    __asm__ volatile("sub $128, %%rsp\n push %%rbp\n" GLOAD X16(ZL) X16B(ZL) KL(1) KL(2) KL(3) KL(4) KL(5) KL(6)
                         KL(7) LOOP X16(ZS) X16B(ZS) KS(1) KS(2) KS(3) KS(4) KS(5) KS(6) KS(7)
                             GSTORE "pop %%rbp\n add $128, %%rsp\n"
                     :
                     : [c] "d"(&fc), O(gin), O(gout), O(stop), O(ts), O(rounds), O(vin), O(vout),
                       O(kin), O(kout)
                     : "rax", "rbx", "rcx", "rsi", "rdi", "r8", "r9", "r11", "r12", "r13",
                       "r14", "r15", "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4",
                       "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
                       "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20",
                       "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28",
                       "xmm29", "xmm30", "xmm31", "k1", "k2", "k3", "k4", "k5", "k6", "k7");
}

static pthread_barrier_t barrier;
static unsigned long rounds_at_ready;
static int pkey = -1;
static unsigned pkey_rights_set;

static void *fpu_thread(void *arg) {
    struct tstate *st = &states[(long)arg];
    setup_thread(st, (int)(long)arg, "fpu", 1);
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    int nregs = avx512 ? 32 : 16, width = avx512 ? 64 : 32;
    for (int r = 0; r < 8; r++) fc.gin[r] = 0x6e6e000000000000UL + 0x1111111111UL * (r + 1);
    for (int r = 0; r < 32; r++)
        for (int b = 0; b < 64; b++) fc.vin[r][b] = (unsigned char)(r * 37 + b * 11 + 1);
    for (int k = 0; k < 8; k++) fc.kin[k] = 0x0123456789abcdefUL * (k + 3) ^ (0xf0UL << k);
    fc.ts.tv_sec = 0;
    fc.ts.tv_nsec = 1000000;
    fesetround(FE_TOWARDZERO);
    unsigned short cw0;
    unsigned mxcsr0;
    __asm__ volatile("fnstcw %0" : "=m"(cw0));
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr0));
    /* a thread-private PKRU value, if protection keys are available */
    pkey = pkey_alloc(0, 0);
    if (pkey >= 0) {
        pkey_rights_set = PKEY_DISABLE_WRITE;
        pkey_set(pkey, pkey_rights_set);
    }
    pthread_barrier_wait(&barrier);
    if (avx512) run_avx512(); else run_avx2();

    /* stopped: compare */
    wait_go_flag();
    int bad = 0;
    char d[200] = "";
    for (int r = 0; r < 8; r++)
        if (fc.gout[r] != fc.gin[r]) {
            if (!bad) snprintf(d, sizeof d, "reg #%d %#lx != %#lx", r, fc.gout[r], fc.gin[r]);
            bad++;
        }
    report(!bad, "fpu general registers (rbx rbp r8 r9 r12-r15) kept%s%s", bad ? ": " : "", d);
    bad = 0;
    for (int r = 0; r < nregs; r++)
        if (memcmp(fc.vout[r], fc.vin[r], width) != 0) {
            if (!bad) {
                int b = 0;
                while (fc.vout[r][b] == fc.vin[r][b]) b++;
                snprintf(d, sizeof d, "first difference %s%d byte %d: %#x != %#x",
                         avx512 ? "zmm" : "ymm", r, b, fc.vout[r][b], fc.vin[r][b]);
            }
            bad++;
        }
    report(!bad, "fpu %s0-%d kept (%d registers differ)%s%s", avx512 ? "zmm" : "ymm", nregs - 1,
           bad, bad ? ": " : "", d);
    if (avx512) {
        bad = 0;
        for (int k = 1; k < 8; k++) bad += fc.kout[k] != fc.kin[k];
        report(!bad, "fpu mask registers k1-k7 kept (%d differ)", bad);
    }
    unsigned short cw1;
    unsigned mxcsr1;
    __asm__ volatile("fnstcw %0" : "=m"(cw1));
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr1));
    report(fegetround() == FE_TOWARDZERO && cw1 == cw0 && (mxcsr1 & ~0x3fU) == (mxcsr0 & ~0x3fU),
           "fpu rounding mode: x87 cw %#x (was %#x), mxcsr %#x (was %#x)", cw1, cw0, mxcsr1, mxcsr0);
    if (pkey >= 0) {
        int rights = pkey_get(pkey);
        report(rights == (int)pkey_rights_set, "fpu PKRU: rights of pkey %d = %d (set %u)", pkey,
               rights, pkey_rights_set);
    } else {
        pthread_mutex_lock(&print_lock);
        printf("SKIP fpu PKRU: pkey_alloc: %s\n", strerror(errno));
        pthread_mutex_unlock(&print_lock);
    }
    report(fc.rounds > rounds_at_ready, "fpu loop ran after the checkpoint (%lu rounds, %lu at READY)",
           fc.rounds, rounds_at_ready);
    check_thread(st);
    return NULL;
}

/* ---------- sleeper ---------- */

static void *sleeper_thread(void *arg) {
    struct tstate *st = &states[(long)arg];
    setup_thread(st, (int)(long)arg, "sleeper", 1);
    pthread_barrier_wait(&barrier);
    struct timespec d = {SLEEP_S, 0}, rem = {0, 0};
    double t0 = mono();
    int r = nanosleep(&d, &rem);
    int e = errno;
    double el = mono() - t0;
    wait_go_flag();
    report(r == 0, "sleeper nanosleep returned %d%s%s (remaining %ld.%09ld)", r, r ? ": " : "",
           r ? strerror(e) : "", (long)rem.tv_sec, rem.tv_nsec);
    report(el >= SLEEP_S - 0.0005 && el < SLEEP_S + 5, "sleeper slept %.3f s of CLOCK_MONOTONIC (asked %d s)",
           el, SLEEP_S);
    check_thread(st);
    return NULL;
}

/* ---------- condwait ---------- */

static pthread_mutex_t cv_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int cv_pred = 0;

static void *cond_thread(void *arg) {
    struct tstate *st = &states[(long)arg];
    setup_thread(st, (int)(long)arg, "condwait", 1);
    pthread_barrier_wait(&barrier);
    pthread_mutex_lock(&cv_lock);
    int r = 0;
    while (!cv_pred && r == 0) r = pthread_cond_wait(&cv, &cv_lock);
    int pred = cv_pred;
    pthread_mutex_unlock(&cv_lock);
    report(r == 0 && pred == 1 && go_flag, "condwait pthread_cond_wait returned %d with predicate %d after go (%d)", r,
           pred, go_flag);
    check_thread(st);
    return NULL;
}

/* ---------- reader ---------- */

static int pipefd[2];
static const char pipe_msg[] = "the main thread wrote this after go";

static void *reader_thread(void *arg) {
    struct tstate *st = &states[(long)arg];
    setup_thread(st, (int)(long)arg, "reader", 1);
    pthread_barrier_wait(&barrier);
    char buf[128];
    ssize_t n = read(pipefd[0], buf, sizeof buf);
    int e = errno;
    int ok = n == (ssize_t)sizeof pipe_msg && memcmp(buf, pipe_msg, n) == 0 && go_flag;
    report(ok, "reader read() on the pipe returned %zd%s%s (want %zu bytes, after go: %d)", n,
           n < 0 ? ": " : "", n < 0 ? strerror(e) : "", sizeof pipe_msg, go_flag);
    check_thread(st);
    return NULL;
}

/* ---------- futex ---------- */

static int futex_word = 0;

static void *futex_thread(void *arg) {
    struct tstate *st = &states[(long)arg];
    setup_thread(st, (int)(long)arg, "futex", 1);
    pthread_barrier_wait(&barrier);
    int early = 0, eintr = 0, other = 0;
    while (__atomic_load_n(&futex_word, __ATOMIC_SEQ_CST) == 0) {
        long r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        if (r == 0 && __atomic_load_n(&futex_word, __ATOMIC_SEQ_CST) == 0) early++;
        else if (r == -1 && errno == EINTR) eintr++;
        else if (r == -1 && errno != EAGAIN) other = errno;
        else if (r != 0 && r != -1) other = (int)r;
    }
    report(!early && !eintr && !other,
           "futex FUTEX_WAIT returned only when woken (early returns %d, EINTR %d, other error %d)",
           early, eintr, other);
    wait_go_flag();
    check_thread(st);
    return NULL;
}

/* ---------- poller ---------- */

static void *poller_thread(void *arg) {
    struct tstate *st = &states[(long)arg];
    setup_thread(st, (int)(long)arg, "poller", 0);
    pthread_barrier_wait(&barrier);
    wait_go_flag();
    sigset_t pend;
    sigpending(&pend);
    int was_pending = sigismember(&pend, PENDING_SIG) == 1;
    int handled_early = pending_handled_count;
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, PENDING_SIG);
    pthread_sigmask(SIG_UNBLOCK, &one, NULL);
    report(was_pending && !handled_early && pending_handled_count == 1 && pending_handled_tid == st->tid &&
               pending_handled_val == 6060,
           "poller thread-directed pending signal: pending %d, handled before unblock %d, then handled %d time(s) "
           "by tid %d (poller %d) with value %d (want 6060)",
           was_pending, handled_early, pending_handled_count, pending_handled_tid, st->tid, pending_handled_val);
    pthread_sigmask(SIG_BLOCK, &one, NULL);
    check_thread(st);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    char gopath[4096];
    snprintf(gopath, sizeof gopath, "%s/go", argv[1]);
    if (pipe(pipefd) != 0) return 3;
    pthread_barrier_init(&barrier, NULL, NTHREADS);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = pending_handler;
    sa.sa_flags = SA_SIGINFO;
    sigaction(PENDING_SIG, &sa, NULL);
    void *(*fns[NTHREADS])(void *) = {NULL, fpu_thread, sleeper_thread, cond_thread,
                                      reader_thread, futex_thread, poller_thread};
    pthread_t th[NTHREADS];
    for (long i = 1; i < NTHREADS; i++)
        if (pthread_create(&th[i], NULL, fns[i], (void *)i) != 0) return 4;
    setup_thread(&states[0], 0, "main", 1);
    pthread_barrier_wait(&barrier);
    pthread_sigqueue(th[6], PENDING_SIG, (union sigval){.sival_int = 6060});
    /* wait until every thread is in its blocking call (or 3 s) */
    struct { int idx; long nr[2]; } blockers[] = {
        {2, {35, 230}} /* (clock_)nanosleep */, {3, {202, 202}} /* futex */, {4, {0, 0}} /* read */,
        {5, {202, 202}} /* futex */};
    int nblk = sizeof blockers / sizeof *blockers, blocked = 0;
    long seen_nr[4] = {0};
    for (int tries = 0; tries < 300 && blocked < nblk; tries++) {
        sleep_ms(10);
        blocked = 0;
        for (int k = 0; k < nblk; k++) {
            seen_nr[k] = thread_syscall(states[blockers[k].idx].tid);
            blocked += seen_nr[k] == blockers[k].nr[0] || seen_nr[k] == blockers[k].nr[1];
        }
    }
    if (blocked < nblk)
        report(0, "setup: threads not in their blocking syscalls before READY: sleeper %ld, condwait %ld, "
                  "reader %ld, futex %ld", seen_nr[0], seen_nr[1], seen_nr[2], seen_nr[3]);
    sleep_ms(50);
    rounds_at_ready = fc.rounds;
    int main_pkey_rights = pkey >= 0 ? pkey_get(pkey) : -1;
    pid_t pid = getpid();
    printf("READY\n");

    struct stat sb;
    while (stat(gopath, &sb) != 0) sleep_ms(10);
    go_flag = 1;

    fc.stop = 1;
    pthread_mutex_lock(&cv_lock);
    cv_pred = 1;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&cv_lock);
    ssize_t w = write(pipefd[1], pipe_msg, sizeof pipe_msg);
    if (w != (ssize_t)sizeof pipe_msg) report(0, "main write to the pipe: %zd", w);
    __atomic_store_n(&futex_word, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);

    report(getpid() == pid, "main getpid %d (was %d)", getpid(), pid);
    sigset_t mpend;
    sigpending(&mpend);
    report(!sigismember(&mpend, PENDING_SIG) && (pending_handled_count == 0 || pending_handled_tid == states[6].tid),
           "main does not see the poller's pending signal (pending %d, handled by %d)", sigismember(&mpend, PENDING_SIG),
           pending_handled_tid);
    report(fegetround() == FE_TONEAREST, "main rounding mode is still the default (fpu thread's is its own)");
    if (pkey >= 0)
        report(pkey_get(pkey) == main_pkey_rights && main_pkey_rights != (int)pkey_rights_set,
               "main PKRU: rights of pkey %d = %d (was %d; the fpu thread's are %u)", pkey,
               pkey_get(pkey), main_pkey_rights, pkey_rights_set);
    check_thread(&states[0]);

    /* pthread_join relies on the kernel clearing (and futex-waking) each thread's tid word
     * when it exits: the clear-child-tid address must have survived. */
    for (int i = 1; i < NTHREADS; i++) {
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_sec += 15;
        int r = pthread_timedjoin_np(th[i], NULL, &dl);
        report(r == 0, "main joined thread %s%s%s", states[i].name, r ? ": " : "", r ? strerror(r) : "");
    }
    pthread_mutex_lock(&print_lock);
    printf("DONE %d\n", failures);
    pthread_mutex_unlock(&print_lock);
    return failures ? 1 : 0;
}
