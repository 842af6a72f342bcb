/* fifo: named pipes across a checkpoint.
 *
 * Usage: fifo WORKDIR. A parent and a child share a FIFO in WORKDIR (child writes, parent
 * reads) with unread data in it at checkpoint time, plus a FIFO the parent holds open
 * read-write. Prints READY, waits for WORKDIR/go, checks: PASS/FAIL lines and DONE.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failures;
#define CHECK(cond, what, ...) do { if (cond) printf("PASS %s\n", what); else { printf("FAIL %s: ", what); printf(__VA_ARGS__); printf("\n"); failures++; } } while (0)

static int go_exists(const char *dir) {
    char go[4096];
    snprintf(go, sizeof go, "%s/go", dir);
    return access(go, F_OK) == 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    char a[4096], b[4096];
    snprintf(a, sizeof a, "%s/fifo-a", argv[1]);
    snprintf(b, sizeof b, "%s/fifo-b", argv[1]);
    mkfifo(a, 0600);
    mkfifo(b, 0600);
    int rw = open(b, O_RDWR);
    write(rw, "kept in b", 9);
    pid_t child = fork();
    if (child == 0) {
        int w = open(a, O_WRONLY);
        write(w, "first line\n", 11);
        while (!go_exists(argv[1])) { struct timespec d = {0, 10000000}; nanosleep(&d, NULL); }
        write(w, "after go\n", 9);
        close(w);
        _exit(0);
    }
    int r = open(a, O_RDONLY);
    struct timespec settle = {0, 50000000};
    nanosleep(&settle, NULL);
    printf("READY\n");
    while (!go_exists(argv[1])) { struct timespec d = {0, 10000000}; nanosleep(&d, NULL); }
    char buf[64] = {0};
    int n = 0, k;
    while (n < 20 && (k = read(r, buf + n, sizeof buf - 1 - n)) > 0) n += k;
    CHECK(n == 20 && !strcmp(buf, "first line\nafter go\n"), "FIFO data in flight and after restart", "got %d '%s'", n, buf);
    CHECK(read(r, buf, 1) == 0, "end of file once the writer closes", "errno %d", errno);
    memset(buf, 0, sizeof buf);
    CHECK(read(rw, buf, 9) == 9 && !strcmp(buf, "kept in b"), "data queued in a FIFO held read-write", "'%s'", buf);
    int st;
    CHECK(waitpid(child, &st, 0) == child && WIFEXITED(st) && WEXITSTATUS(st) == 0, "the writer child exits", "%d", st);
    printf("DONE %d\n", failures);
    return failures ? 1 : 0;
}
