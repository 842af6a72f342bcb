/* selfcheck: a multi-threaded, self-checking program for repeated checkpoint/restart cycles.
 *
 * Usage: selfcheck WORKDIR [THREADS]
 * THREADS worker threads (default 3) each own a 1 MiB heap buffer and a thread-local counter.
 * Every iteration a worker rewrites one word of its buffer, keeps a running checksum, and
 * every 64 iterations recomputes the whole buffer's checksum and compares; it checks that
 * gettid() and getpid() never change, that CLOCK_MONOTONIC never runs backwards, that its
 * thread-local counter equals its iteration count, and adds one to a mutex-protected shared
 * counter. Workers sleep 1 ms per iteration (so they are often caught inside a syscall).
 * The main thread checks a stack buffer and a 1 MiB anonymous mapping the same way and
 * prints "alive N" every 50 ms. It prints READY at start; once WORKDIR/go exists it runs
 * 200 ms more, stops and joins the workers, checks shared == sum of iterations, and prints
 * PASS/FAIL lines and "DONE <failures>".
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#define WORDS (1 << 17) /* 1 MiB of uint64_t */
#define MAXT 8

struct worker {
    pthread_t th;
    int index;
    pid_t tid;
    long iters;
    uint64_t *buf;
    uint64_t sum;
    long full_checks;
    char failure[256];
};

static pid_t pid0;
static volatile int stop_flag = 0;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long shared_counter = 0;
static __thread long tls_counter = 0;
static int failures = 0;

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static uint64_t checksum(const uint64_t *b, long n) {
    uint64_t s = 0;
    for (long i = 0; i < n; i++) s += b[i];
    return s;
}

static void *work(void *arg) {
    struct worker *w = arg;
    w->tid = (pid_t)syscall(SYS_gettid);
    int64_t last = mono_ns();
    while (!stop_flag && !w->failure[0]) {
        long i = w->iters;
        long j = (i * 7919) % WORDS;
        uint64_t v = mix((uint64_t)i * 131 + (uint64_t)w->index);
        w->sum += v - w->buf[j];
        w->buf[j] = v;
        w->iters++;
        tls_counter++;
        pthread_mutex_lock(&lock);
        shared_counter++;
        pthread_mutex_unlock(&lock);
        if (tls_counter != w->iters)
            snprintf(w->failure, sizeof w->failure, "thread-local counter %ld vs %ld", tls_counter, w->iters);
        if ((pid_t)syscall(SYS_gettid) != w->tid)
            snprintf(w->failure, sizeof w->failure, "tid changed %ld vs %d", (long)syscall(SYS_gettid), w->tid);
        if (getpid() != pid0)
            snprintf(w->failure, sizeof w->failure, "pid changed %d vs %d", getpid(), pid0);
        int64_t t = mono_ns();
        if (t < last)
            snprintf(w->failure, sizeof w->failure, "monotonic clock ran backwards by %lld ns", (long long)(last - t));
        last = t;
        if (w->iters % 64 == 0) {
            uint64_t s = checksum(w->buf, WORDS);
            w->full_checks++;
            if (s != w->sum)
                snprintf(w->failure, sizeof w->failure, "buffer checksum %llx vs %llx at iteration %ld",
                         (unsigned long long)s, (unsigned long long)w->sum, w->iters);
        }
        struct timespec d = {0, 1000 * 1000};
        nanosleep(&d, NULL);
    }
    return NULL;
}

static void fail(const char *msg) {
    printf("FAIL %s\n", msg);
    failures++;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    int nthreads = argc > 2 ? atoi(argv[2]) : 3;
    if (nthreads < 1 || nthreads > MAXT) return 2;
    char go[4096];
    snprintf(go, sizeof go, "%s/go", argv[1]);
    pid0 = getpid();
    static struct worker ws[MAXT];
    for (int k = 0; k < nthreads; k++) {
        ws[k].index = k;
        ws[k].buf = malloc(WORDS * sizeof(uint64_t));
        if (!ws[k].buf) return 2;
        for (long i = 0; i < WORDS; i++) ws[k].buf[i] = mix((uint64_t)i + 1000003ULL * k);
        ws[k].sum = checksum(ws[k].buf, WORDS);
    }
    for (int k = 0; k < nthreads; k++)
        if (pthread_create(&ws[k].th, NULL, work, &ws[k]) != 0) return 2;

    /* main thread: stack and anonymous-mapping checks (shared memory is a known limit) */
    uint64_t stack_buf[4096];
    for (int i = 0; i < 4096; i++) stack_buf[i] = mix(i);
    uint64_t stack_sum = checksum(stack_buf, 4096);
    uint64_t *shm = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED) return 2;
    uint64_t shm_sum = 0;
    pid_t main_tid = (pid_t)syscall(SYS_gettid);
    int64_t last = mono_ns();
    long alive = 0, main_iters = 0;
    int64_t go_seen = 0;
    char msg[256];
    printf("READY pid %d\n", pid0);
    for (;;) {
        long j = main_iters % 4096;
        uint64_t v = mix(main_iters + 77);
        stack_sum += v - stack_buf[j];
        stack_buf[j] = v;
        long k = (main_iters * 4099) % (1 << 17);
        shm_sum += v - shm[k];
        shm[k] = v;
        main_iters++;
        if (main_iters % 16 == 0) {
            if (checksum(stack_buf, 4096) != stack_sum) {
                snprintf(msg, sizeof msg, "main: stack checksum mismatch at iteration %ld", main_iters);
                fail(msg);
                break;
            }
            if (checksum(shm, 1 << 17) != shm_sum) {
                snprintf(msg, sizeof msg, "main: anonymous mapping checksum mismatch at iteration %ld", main_iters);
                fail(msg);
                break;
            }
        }
        if ((pid_t)syscall(SYS_gettid) != main_tid || getpid() != pid0) {
            snprintf(msg, sizeof msg, "main: pid/tid changed (%d/%ld vs %d/%d)", getpid(),
                     (long)syscall(SYS_gettid), pid0, main_tid);
            fail(msg);
            break;
        }
        int64_t t = mono_ns();
        if (t < last) {
            snprintf(msg, sizeof msg, "main: monotonic clock ran backwards by %lld ns", (long long)(last - t));
            fail(msg);
            break;
        }
        last = t;
        if (main_iters % 10 == 0) printf("alive %ld\n", ++alive);
        if (!go_seen && access(go, F_OK) == 0) go_seen = t;
        if (go_seen && t - go_seen > 200 * 1000 * 1000) break;
        struct timespec d = {0, 5 * 1000 * 1000};
        nanosleep(&d, NULL);
    }
    stop_flag = 1;
    long total = 0;
    for (int k = 0; k < nthreads; k++) {
        pthread_join(ws[k].th, NULL);
        total += ws[k].iters;
        if (ws[k].failure[0]) {
            snprintf(msg, sizeof msg, "thread %d: %s", k, ws[k].failure);
            fail(msg);
        } else if (checksum(ws[k].buf, WORDS) != ws[k].sum) {
            snprintf(msg, sizeof msg, "thread %d: final buffer checksum mismatch", k);
            fail(msg);
        } else if (ws[k].full_checks < 1) {
            snprintf(msg, sizeof msg, "thread %d: made no full check (%ld iterations)", k, ws[k].iters);
            fail(msg);
        } else {
            printf("PASS thread %d: %ld iterations, %ld full checks\n", k, ws[k].iters, ws[k].full_checks);
        }
    }
    if (shared_counter != total) {
        snprintf(msg, sizeof msg, "shared counter %ld vs sum of iterations %ld", shared_counter, total);
        fail(msg);
    } else {
        printf("PASS shared counter %ld\n", shared_counter);
    }
    if (!failures) printf("PASS main: %ld iterations, pid %d unchanged, clock monotonic\n", main_iters, pid0);
    printf("DONE %d\n", failures);
    return failures ? 1 : 0;
}
