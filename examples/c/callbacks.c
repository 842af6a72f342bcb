/*
 * libstasis from C: callbacks in every phase, critical sections held by several threads,
 * checkpoints requested from inside (also from a signal handler), a job of several processes,
 * fork().
 *
 *   gcc -I include -pthread -o callbacks examples/c/callbacks.c -L target/debug -lstasis \
 *       -Wl,-rpath,$PWD/target/debug
 *   (or statically: gcc -I include -pthread -o callbacks examples/c/callbacks.c \
 *       target/debug/libstasis.a)
 *   stasis run --name demo -- ./callbacks WORKDIR basic     # then: stasis checkpoint demo
 *
 * Usage: callbacks WORKDIR MODE, MODE one of basic, slow, critical, request, multi, fork,
 * hold, signal. The program reports on stdout (`EVENT …` lines for every callback,
 * `PASS`/`FAIL` for checks) and ends with `DONE 0` once WORKDIR/go exists. Run without Stasis
 * it does the same, every library call being a no-op, and checks that the library started no
 * thread and opened no socket.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "stasis.h"

static const char *workdir;
static int index_in_job; /* 0 for the first process, 1.. for forked ones (multi, fork) */
static atomic_int in_section;    /* threads inside a critical section, by our own count */
static atomic_int post_count;    /* post-checkpoint callbacks run */
static atomic_int restart_count; /* post-restart callbacks run */
static atomic_int sections_done;
static atomic_int pre_count;     /* pre-checkpoint callbacks run (hold) */
static atomic_int request_in_callback_rc = 99; /* blocking request from a callback (request) */
static volatile sig_atomic_t signal_rc = 99;   /* request from the signal handler (signal) */
static volatile sig_atomic_t signal_errno_kept;
static atomic_int signals_handled;
static int failures;

static void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void report(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static void check(int ok, const char *what) {
    if (ok) {
        report("PASS %s\n", what);
    } else {
        report("FAIL %s\n", what);
        failures++;
    }
}

static const char *phase_name(int phase) {
    return phase == STASIS_PRE_CHECKPOINT    ? "pre"
           : phase == STASIS_POST_CHECKPOINT ? "post"
                                             : "restart";
}

/* Prints the event; arg is a label telling callbacks of one phase apart. */
static void on_event(const struct stasis_event *e, void *arg) {
    report("EVENT %s %s proc=%d gen=%u restart=%d\n", phase_name(e->phase), (const char *)arg,
           index_in_job, e->generation, e->is_restart);
    /* Post callbacks run before critical sections reopen: nobody may be inside one. */
    if (e->phase != STASIS_PRE_CHECKPOINT) {
        int inside = atomic_load(&in_section);
        if (inside != 0) {
            report("FAIL %d thread(s) inside a critical section during the snapshot\n", inside);
        }
    }
    if (e->phase == STASIS_POST_CHECKPOINT)
        atomic_fetch_add(&post_count, 1);
    if (e->phase == STASIS_POST_RESTART)
        atomic_fetch_add(&restart_count, 1);
}

static void on_pre_slow(const struct stasis_event *e, void *arg) {
    (void)arg;
    static int calls;
    report("EVENT pre slow-begin proc=%d gen=%u\n", index_in_job, e->generation);
    /* Longer than the test's --callback-timeout the first time, shorter afterwards. */
    usleep(calls++ == 0 ? 3000 * 1000 : 300 * 1000);
    report("EVENT pre slow-end proc=%d gen=%u\n", index_in_job, e->generation);
}

/* Multi: each process's pre callback takes a while, so that a supervisor freezing early
 * would be seen (a post line before every pre-done line). */
static void on_pre_multi(const struct stasis_event *e, void *arg) {
    (void)arg;
    usleep(200 * 1000);
    report("EVENT pre done proc=%d gen=%u\n", index_in_job, e->generation);
}

/* Hold: counts pre-checkpoint callbacks. */
static void on_pre_count(const struct stasis_event *e, void *arg) {
    (void)e;
    (void)arg;
    atomic_fetch_add(&pre_count, 1);
}

/* Request: a blocking request from a callback would wait for itself. */
static void on_post_request(const struct stasis_event *e, void *arg) {
    (void)e;
    (void)arg;
    atomic_store(&request_in_callback_rc, stasis_request_checkpoint(1));
}

/* Signal: a non-blocking request is async-signal-safe (once stasis_is_active() was called). */
static void on_usr1(int sig) {
    (void)sig;
    int saved = errno;
    errno = EXDEV;
    signal_rc = stasis_request_checkpoint(0);
    signal_errno_kept = errno == EXDEV;
    errno = saved;
    atomic_fetch_add(&signals_handled, 1);
}

static int file_exists(const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", workdir, name);
    return access(path, F_OK) == 0;
}

static int go_exists(void) {
    return file_exists("go");
}

static void wait_go(void) {
    while (!go_exists())
        usleep(10 * 1000);
}

static void *section_worker(void *arg) {
    long id = (long)arg;
    do {
        stasis_critical_enter();
        if (id == 0)
            stasis_critical_enter(); /* nested */
        atomic_fetch_add(&in_section, 1);
        usleep(100 * 1000);
        atomic_fetch_sub(&in_section, 1);
        if (id == 0)
            stasis_critical_leave();
        stasis_critical_leave();
        atomic_fetch_add(&sections_done, 1);
        usleep(1000);
    } while (!go_exists());
    return NULL;
}

/* Hold: enters a section and stays until WORKDIR/release (or go) exists. */
static void *holder(void *arg) {
    (void)arg;
    stasis_critical_enter();
    atomic_fetch_add(&in_section, 1);
    report("HOLDING\n");
    while (!file_exists("release") && !go_exists())
        usleep(10 * 1000);
    report("RELEASING\n");
    atomic_fetch_sub(&in_section, 1);
    stasis_critical_leave();
    return NULL;
}

/* Hold: once the pre-checkpoint callbacks have run (and a moment more), no thread may enter a
 * section until the checkpoint is over, i.e. until the post-checkpoint callbacks ran. */
static void *latecomer(void *arg) {
    (void)arg;
    while (atomic_load(&pre_count) == 0)
        usleep(1000);
    usleep(200 * 1000);
    stasis_critical_enter();
    report("LATE-ENTERED post=%d\n", atomic_load(&post_count));
    stasis_critical_leave();
    return NULL;
}

/* Signal: interrupts the main thread (busy in malloc and critical sections) three times, each
 * time waiting for the checkpoint its handler asked for. */
static void *signaller(void *arg) {
    pthread_t target = *(pthread_t *)arg;
    int active = stasis_is_active();
    for (int i = 1; i <= 3; i++) {
        usleep(100 * 1000);
        pthread_kill(target, SIGUSR1);
        while (atomic_load(&signals_handled) < i)
            usleep(1000);
        check(signal_rc == (active ? STASIS_OK : STASIS_NOT_ACTIVE), "request from a handler");
        check(signal_errno_kept, "errno kept by the request");
        for (int waited = 0; active && atomic_load(&post_count) < i; waited++) {
            if (waited == 60 * 1000) {
                check(0, "checkpoint asked for by the handler");
                break;
            }
            usleep(1000);
        }
    }
    report("SIGNALLED\n");
    return NULL;
}

/* Outside Stasis the library did nothing: this process has no thread but its own (every
 * mode joins its threads) and no socket. */
static int count_threads(void) {
    int threads = 0;
    DIR *d = opendir("/proc/self/task");
    for (struct dirent *e; d && (e = readdir(d));)
        threads += e->d_name[0] != '.';
    if (d)
        closedir(d);
    return threads;
}

static void check_untouched(void) {
    int sockets = 0;
    /* A thread just joined may linger in /proc/self/task for a moment after pthread_join
       returns (the kernel wakes the joiner before it unlists the thread): give it a second. */
    int threads = count_threads();
    for (int i = 0; i < 100 && threads != 1; i++) {
        usleep(10000);
        threads = count_threads();
    }
    DIR *d = opendir("/proc/self/fd");
    for (struct dirent *e; d && (e = readdir(d));) {
        char path[300], target[300];
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n > 0) {
            target[n] = 0;
            sockets += strncmp(target, "socket:", 7) == 0;
        }
    }
    if (d)
        closedir(d);
    check(threads == 1, "no thread of the library outside Stasis");
    check(sockets == 0, "no socket of the library outside Stasis");
}

static void register_all(void) {
    int rc = stasis_register(STASIS_PRE_CHECKPOINT, on_event, "first");
    rc |= stasis_register(STASIS_PRE_CHECKPOINT, on_event, "second");
    rc |= stasis_register(STASIS_POST_CHECKPOINT, on_event, "first");
    rc |= stasis_register(STASIS_POST_RESTART, on_event, "first");
    int expected = stasis_is_active() ? STASIS_OK : STASIS_NOT_ACTIVE;
    check(rc == expected, "register");
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s WORKDIR basic|slow|critical|request|multi\n", argv[0]);
        return 2;
    }
    workdir = argv[1];
    const char *mode = argv[2];
    int active = stasis_is_active();
    report("ACTIVE %d\n", active);
    check(stasis_register(7, on_event, NULL) == STASIS_EINVAL || !active, "bad phase refused");
    check(stasis_critical_leave() == STASIS_EINVAL || !active, "leave without enter refused");

    if (strcmp(mode, "basic") == 0) {
        register_all();
        report("READY\n");
        wait_go();
    } else if (strcmp(mode, "slow") == 0) {
        stasis_register(STASIS_PRE_CHECKPOINT, on_pre_slow, NULL);
        stasis_register(STASIS_POST_CHECKPOINT, on_event, "first");
        report("READY\n");
        wait_go();
    } else if (strcmp(mode, "critical") == 0) {
        register_all();
        pthread_t t[3];
        for (long i = 0; i < 3; i++)
            pthread_create(&t[i], NULL, section_worker, (void *)i);
        while (atomic_load(&sections_done) < 3)
            usleep(1000);
        report("READY\n");
        for (int i = 0; i < 3; i++)
            pthread_join(t[i], NULL);
        check(atomic_load(&in_section) == 0, "sections balanced");
    } else if (strcmp(mode, "request") == 0) {
        stasis_register(STASIS_POST_CHECKPOINT, on_post_request, NULL);
        register_all();
        int rc = stasis_request_checkpoint(0);
        check(rc == (active ? STASIS_OK : STASIS_NOT_ACTIVE), "non-blocking request");
        if (active) {
            while (atomic_load(&post_count) < 1)
                usleep(1000);
            report("NONBLOCKING-DONE\n");
            check(atomic_load(&request_in_callback_rc) == STASIS_EDEADLK,
                  "blocking request from a callback refused");
        }
        stasis_critical_enter();
        rc = stasis_request_checkpoint(1);
        stasis_critical_leave();
        check(rc == (active ? STASIS_EDEADLK : STASIS_NOT_ACTIVE),
              "blocking request inside a critical section refused");
        rc = stasis_request_checkpoint(1);
        report("REQUEST rc=%d\n", rc);
        if (rc == STASIS_OK || rc == STASIS_NOT_ACTIVE) {
            report("CONTINUED\n");
        } else if (rc == STASIS_RESTARTED) {
            report("RESTARTED\n");
        } else {
            check(0, "blocking request");
        }
        wait_go();
    } else if (strcmp(mode, "multi") == 0) {
        pid_t kids[2];
        for (int i = 0; i < 2; i++) {
            kids[i] = fork();
            if (kids[i] == 0) {
                index_in_job = i + 1;
                break;
            }
        }
        register_all();
        stasis_register(STASIS_PRE_CHECKPOINT, on_pre_multi, NULL);
        report("READY proc=%d\n", index_in_job);
        wait_go();
        if (index_in_job != 0)
            _exit(failures ? 1 : 0);
        for (int i = 0; i < 2; i++) {
            int status = 0;
            waitpid(kids[i], &status, 0);
            check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child");
        }
    } else if (strcmp(mode, "fork") == 0) {
        /* 0 forks 1 inside a critical section; 1 registers callbacks of its own, forks 2 and
         * exits; 2 (adopted by 0) registers its own. Nothing of a parent's carries over. */
        prctl(PR_SET_CHILD_SUBREAPER, 1);
        register_all();
        stasis_critical_enter();
        pid_t mid = fork();
        if (mid == 0) {
            index_in_job = 1;
            check(stasis_critical_leave() == STASIS_OK, "forked inside the parent's section");
            check(stasis_critical_leave() == STASIS_EINVAL, "that section only");
            int rc = stasis_register(STASIS_PRE_CHECKPOINT, on_event, "mid");
            rc |= stasis_register(STASIS_POST_CHECKPOINT, on_event, "mid");
            rc |= stasis_register(STASIS_POST_RESTART, on_event, "mid");
            check(rc == (active ? STASIS_OK : STASIS_NOT_ACTIVE), "register in the child");
            if (fork() == 0) {
                index_in_job = 2;
                rc = stasis_register(STASIS_PRE_CHECKPOINT, on_event, "child");
                rc |= stasis_register(STASIS_POST_CHECKPOINT, on_event, "child");
                rc |= stasis_register(STASIS_POST_RESTART, on_event, "child");
                check(rc == (active ? STASIS_OK : STASIS_NOT_ACTIVE), "register in the grandchild");
                stasis_critical_enter();
                check(stasis_critical_leave() == STASIS_OK, "a section in the grandchild");
                report("READY proc=2\n");
                wait_go();
                if (!active)
                    check_untouched();
                _exit(failures ? 1 : 0);
            }
            _exit(failures ? 1 : 0);
        }
        check(stasis_critical_leave() == STASIS_OK, "parent leaves its section");
        int status = 0;
        waitpid(mid, &status, 0);
        check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child");
        report("READY proc=0\n");
        wait_go();
        pid_t pid;
        while ((pid = wait(&status)) > 0 || (pid < 0 && errno == EINTR))
            if (pid > 0)
                check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "grandchild");
    } else if (strcmp(mode, "hold") == 0) {
        register_all();
        stasis_register(STASIS_PRE_CHECKPOINT, on_pre_count, NULL);
        pthread_t h, l;
        pthread_create(&h, NULL, holder, NULL);
        if (active)
            pthread_create(&l, NULL, latecomer, NULL);
        while (!file_exists("release") && !go_exists() && atomic_load(&in_section) == 0)
            usleep(1000);
        report("READY\n");
        pthread_join(h, NULL);
        if (active)
            pthread_join(l, NULL);
        wait_go();
    } else if (strcmp(mode, "signal") == 0) {
        register_all();
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_usr1;
        sa.sa_flags = SA_RESTART;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGUSR1, &sa, NULL);
        pthread_t self = pthread_self(), t;
        pthread_create(&t, NULL, signaller, &self);
        report("READY\n");
        /* Busy with the allocator and the library's lock when the signal comes. */
        for (unsigned i = 0; atomic_load(&signals_handled) < 3 || !go_exists(); i++) {
            stasis_critical_enter();
            char *p = malloc(64 + i % 4096);
            if (p)
                p[0] = (char)i;
            free(p);
            stasis_critical_leave();
            if (i % 256 == 0)
                usleep(1000);
        }
        pthread_join(t, NULL);
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    if (!active)
        check_untouched();
    report("DONE %d\n", failures);
    return failures ? 1 : 0;
}
