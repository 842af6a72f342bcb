/*
 * libstasis from C: callbacks in every phase, critical sections held by several threads,
 * checkpoints requested from inside, a job of several processes.
 *
 *   gcc -I include -pthread -o callbacks examples/c/callbacks.c -L target/debug -lstasis \
 *       -Wl,-rpath,$PWD/target/debug
 *   stasis run --name demo -- ./callbacks WORKDIR basic     # then: stasis checkpoint demo
 *
 * Usage: callbacks WORKDIR MODE, MODE one of basic, slow, critical, request, multi. The
 * program reports on stdout (`EVENT …` lines for every callback, `PASS`/`FAIL` for checks)
 * and ends with `DONE 0` once WORKDIR/go exists. Run without Stasis it does the same, every
 * library call being a no-op.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "stasis.h"

static const char *workdir;
static int index_in_job; /* 0 for the first process, 1.. for forked ones (mode multi) */
static atomic_int in_section;    /* threads inside a critical section, by our own count */
static atomic_int post_count;    /* post-checkpoint callbacks run */
static atomic_int restart_count; /* post-restart callbacks run */
static atomic_int sections_done;
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

static int go_exists(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s/go", workdir);
    return access(path, F_OK) == 0;
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
        register_all();
        int rc = stasis_request_checkpoint(0);
        check(rc == (active ? STASIS_OK : STASIS_NOT_ACTIVE), "non-blocking request");
        if (active) {
            while (atomic_load(&post_count) < 1)
                usleep(1000);
            report("NONBLOCKING-DONE\n");
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
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    report("DONE %d\n", failures);
    return failures ? 1 : 0;
}
