/* t_timers: periodic timers whose signal is pending at the cut, self-checking.
 *
 * Usage: t_timers WORKDIR
 * A periodic ITIMER_REAL (50 ms) and a periodic POSIX timer (CLOCK_MONOTONIC, 40 ms,
 * SIGRTMIN+4) fire while their signals are blocked, so at the checkpoint each has fired and
 * waits for its signal to be taken. The kernel re-arms such a timer only when its signal is
 * dequeued, and until then getitimer(ITIMER_REAL) reports value 0 with a non-zero
 * interval: a restore that reads "value 0" as "disarmed" loses the timer. After
 * WORKDIR/go exists the program unblocks both signals and checks that each timer goes on
 * firing (at least 3 more signals, waited for up to 20 s so that a loaded machine cannot
 * fail it) and that getitimer still reports the 50 ms interval. Prints PASS/FAIL lines and
 * "DONE <failures>".
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/time.h>

static const char *me = "timers";

#include "report.h"

static volatile sig_atomic_t alrm_count, rt_count;
static void on_alrm(int sig) {
    (void)sig;
    alrm_count++;
}
static void on_rt(int sig) {
    (void)sig;
    rt_count++;
}

/* Waits until *count reaches want, up to max_ms; returns whether it did. */
static int wait_for(volatile sig_atomic_t *count, int want, long max_ms) {
    for (long waited = 0; waited < max_ms; waited += 5) {
        if (*count >= want) return 1;
        sleep_ms(5);
    }
    return *count >= want;
}

/* Waits up to max_ms for sig to be pending. */
static int wait_pending(int sig, long max_ms) {
    for (long waited = 0; waited < max_ms; waited += 5) {
        sigset_t p;
        sigpending(&p);
        if (sigismember(&p, sig)) return 1;
        sleep_ms(5);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    snprintf(work, sizeof work, "%s", argv[1]);
    setvbuf(stdout, NULL, _IONBF, 0);
    const int rt = SIGRTMIN + 4;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alrm;
    sigaction(SIGALRM, &sa, NULL);
    sa.sa_handler = on_rt;
    sigaction(rt, &sa, NULL);
    sigset_t both;
    sigemptyset(&both);
    sigaddset(&both, SIGALRM);
    sigaddset(&both, rt);
    sigprocmask(SIG_BLOCK, &both, NULL);

    struct itimerval itv = {{0, 50000}, {0, 50000}};
    setitimer(ITIMER_REAL, &itv, NULL);
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_SIGNAL;
    sev.sigev_signo = rt;
    timer_t tid;
    if (timer_create(CLOCK_MONOTONIC, &sev, &tid) != 0) {
        report(0, "timer_create: %s", strerror(errno));
        return 1;
    }
    struct itimerspec its = {{0, 40000000}, {0, 40000000}};
    timer_settime(tid, 0, &its, NULL);

    report(wait_pending(SIGALRM, 20000) && wait_pending(rt, 20000),
           "SIGALRM and SIGRTMIN+4 are pending at the cut");
    struct itimerval before;
    getitimer(ITIMER_REAL, &before);
    say("getitimer(ITIMER_REAL) at the cut: interval %ld.%06ld value %ld.%06ld", (long)before.it_interval.tv_sec,
        (long)before.it_interval.tv_usec, (long)before.it_value.tv_sec, (long)before.it_value.tv_usec);
    say("READY");
    wait_go();

    sigprocmask(SIG_UNBLOCK, &both, NULL);
    int got_alrm = wait_for(&alrm_count, 4, 20000);
    report(got_alrm, "ITIMER_REAL fires again after its pending SIGALRM is taken: %d signals", alrm_count);
    int got_rt = wait_for(&rt_count, 4, 20000);
    report(got_rt, "the POSIX timer fires again after its pending signal is taken: %d signals", rt_count);

    struct itimerval now;
    getitimer(ITIMER_REAL, &now);
    sigset_t p;
    sigpending(&p);
    /* value 0 is right only while a SIGALRM waits to be taken */
    int value_ok = (now.it_value.tv_sec || now.it_value.tv_usec) || sigismember(&p, SIGALRM);
    report(now.it_interval.tv_sec == 0 && now.it_interval.tv_usec == 50000 && value_ok &&
               now.it_value.tv_sec == 0 && now.it_value.tv_usec <= 50000,
           "getitimer(ITIMER_REAL): interval %ld.%06ld value %ld.%06ld", (long)now.it_interval.tv_sec,
           (long)now.it_interval.tv_usec, (long)now.it_value.tv_sec, (long)now.it_value.tv_usec);
    struct itimerspec g;
    int r = timer_gettime(tid, &g);
    report(r == 0 && g.it_interval.tv_sec == 0 && g.it_interval.tv_nsec == 40000000,
           "timer_gettime: %d, interval %ld.%09ld", r, (long)g.it_interval.tv_sec, g.it_interval.tv_nsec);
    say("DONE %d", failures);
    return failures != 0;
}
