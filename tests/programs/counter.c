/* counter: a single-threaded, self-checking program.
 *
 * Usage: counter WORKDIR TICKS
 * Keeps one counter in static data, on the heap, on the stack, in an anonymous mapping and
 * in brk memory; each tick (20 ms, relative nanosleep) increments all of them and checks
 * they agree, that getpid() never changes and that CLOCK_MONOTONIC never runs backwards
 * nor jumps by more than 2 s (the test keeps the job dead for longer than that).
 * Prints "tick N" per tick, then PASS/FAIL lines and "DONE <failures>".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

static long counter_data = 0;
static int failures = 0;

static void fail(const char *what, long a, long b) {
    printf("FAIL %s: %ld vs %ld\n", what, a, b);
    failures++;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    long ticks = atol(argv[2]);
    long counter_stack = 0;
    long *counter_heap = malloc(sizeof(long) * 1024);
    long *counter_mmap = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    long *counter_brk = sbrk(4096);
    memset(counter_heap, 0, sizeof(long) * 1024);
    *counter_brk = 0;
    pid_t pid = getpid();
    double last = now(), max_gap = 0;
    for (long i = 1; i <= ticks; i++) {
        struct timespec d = {0, 20 * 1000 * 1000};
        nanosleep(&d, NULL);
        counter_data++; counter_stack++; counter_heap[i % 1024] = i; counter_mmap[(i * 512) % (1 << 17)] = i; (*counter_brk)++;
        if (counter_stack != counter_data) fail("stack counter", counter_stack, counter_data);
        if (counter_heap[i % 1024] != i) fail("heap counter", counter_heap[i % 1024], i);
        if (counter_mmap[(i * 512) % (1 << 17)] != i) fail("mmap counter", counter_mmap[(i * 512) % (1 << 17)], i);
        if (*counter_brk != counter_data) fail("brk counter", *counter_brk, counter_data);
        if (getpid() != pid) fail("pid", getpid(), pid);
        double t = now();
        if (t < last) fail("monotonic clock ran backwards (us)", (long)(t * 1e6), (long)(last * 1e6));
        if (t - last > max_gap) max_gap = t - last;
        last = t;
        printf("tick %ld\n", i);
    }
    if (max_gap > 2.0) fail("monotonic clock jumped (ms)", (long)(max_gap * 1000), 2000);
    else printf("PASS clock continuous (largest gap %.0f ms)\n", max_gap * 1000);
    printf("PASS counters %ld\nDONE %d\n", counter_data, failures);
    return failures ? 1 : 0;
}
