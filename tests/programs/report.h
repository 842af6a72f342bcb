/* report.h: reporting and synchronisation helpers shared by the process-tree test programs.
 *
 * The including program declares `static const char *me` (the name its lines carry) first.
 * Lines go to stdout with one write() each, so processes sharing it never interleave
 * within a line: `PASS me: ...` / `FAIL me: ...`; `failures` counts the FAILs; `work` is the
 * work directory (argv[1]), exists(name) tells whether WORKDIR/name exists and wait_go()
 * waits for WORKDIR/go.
 */
#ifndef STASIS_TEST_REPORT_H
#define STASIS_TEST_REPORT_H

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static char work[2048];
static int failures = 0;

__attribute__((unused)) static void say(const char *fmt, ...) {
    char b[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b, sizeof b - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof b - 2) n = sizeof b - 2;
    b[n++] = '\n';
    if (write(1, b, n) != n) _exit(99);
}

__attribute__((unused)) static void report(int ok, const char *fmt, ...) {
    char b[900];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    say("%s %s: %s", ok ? "PASS" : "FAIL", me, b);
    if (!ok) failures++;
}

__attribute__((unused)) static void sleep_ms(long ms) {
    struct timespec d = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&d, &d) && errno == EINTR) {}
}

/* whether WORKDIR/name exists */
__attribute__((unused)) static int exists(const char *name) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", work, name);
    return access(p, F_OK) == 0;
}

__attribute__((unused)) static void wait_go(void) {
    char p[4096];
    snprintf(p, sizeof p, "%s/go", work);
    for (int i = 0; i < 60 * 200; i++) {
        if (access(p, F_OK) == 0) return;
        sleep_ms(5);
    }
    report(0, "timed out waiting for go");
    _exit(100);
}

#endif
