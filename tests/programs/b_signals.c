/* b_signals: counts queued real-time signals, to catch signals lost around a checkpoint.
 *
 * Usage: b_signals WORKDIR
 * Two sender threads queue SIGRTMIN to the process (sigqueue) as fast as the queue allows
 * and count each signal the kernel accepted; a spinning thread keeps a CPU busy; the
 * handler (run by whichever thread) counts each delivery. Real-time signals are queued, never merged, so once sending stops and the queue
 * is drained, delivered must equal sent. Prints READY, waits for WORKDIR/go, stops sending,
 * drains, and prints PASS/FAIL and "DONE <failures>".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static atomic_long sent = 0, delivered = 0;
static atomic_int stop = 0;

static void handler(int sig, siginfo_t *si, void *ctx) {
    (void)sig; (void)si; (void)ctx;
    atomic_fetch_add(&delivered, 1);
}

static void *sender(void *arg) {
    (void)arg;
    pid_t pid = getpid();
    while (!atomic_load(&stop)) {
        union sigval v = {.sival_int = 1};
        if (sigqueue(pid, SIGRTMIN, v) == 0) {
            atomic_fetch_add(&sent, 1);
        } else if (errno == EAGAIN) {
            struct timespec d = {0, 100 * 1000};
            nanosleep(&d, NULL);
        }
    }
    return NULL;
}

static void *spinner(void *arg) {
    (void)arg;
    volatile unsigned long x = 0;
    while (!atomic_load(&stop)) x++;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    char go[4096];
    snprintf(go, sizeof go, "%s/go", argv[1]);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGRTMIN, &sa, NULL);
    pthread_t s[2], w;
    for (int i = 0; i < 2; i++) pthread_create(&s[i], NULL, sender, NULL);
    pthread_create(&w, NULL, spinner, NULL);
    printf("READY\n");
    while (access(go, F_OK) != 0) {
        struct timespec d = {0, 10 * 1000 * 1000};
        nanosleep(&d, NULL);
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++) pthread_join(s[i], NULL);
    pthread_join(w, NULL);
    /* Drain: every queued signal is delivered to this thread within a short while. */
    for (int i = 0; i < 200 && atomic_load(&delivered) < atomic_load(&sent); i++) {
        struct timespec d = {0, 10 * 1000 * 1000};
        nanosleep(&d, NULL);
    }
    long a = atomic_load(&sent), b = atomic_load(&delivered);
    int failures = 0;
    if (a != b) {
        printf("FAIL signals: %ld queued, %ld delivered (%ld lost)\n", a, b, a - b);
        failures++;
    } else {
        printf("PASS signals: %ld queued, all delivered\n", a);
    }
    if (a < 1000) {
        printf("FAIL too few signals sent: %ld\n", a);
        failures++;
    }
    printf("DONE %d\n", failures);
    return failures ? 1 : 0;
}
