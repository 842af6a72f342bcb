/* b_connect: sends one request line to a unix socket and prints the answer line.
 *
 * Usage: b_connect SOCKET REQUEST
 * Exit status: 0 when an answer (possibly empty) was read, 3 when connect() failed (the
 * reason is printed on stderr).
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    /* The server may answer and close before reading the request. */
    signal(SIGPIPE, SIG_IGN);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0) { perror("socket"); return 2; }
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("connect"); return 3; }
    char line[4096];
    snprintf(line, sizeof line, "%s\n", argv[2]);
    if (write(s, line, strlen(line)) < 0) perror("write (reading the answer anyway)");
    char buf[65536];
    size_t got = 0;
    for (;;) {
        ssize_t r = read(s, buf + got, sizeof buf - 1 - got);
        if (r <= 0) break;
        got += r;
        if (memchr(buf, '\n', got) || got == sizeof buf - 1) break;
    }
    buf[got] = 0;
    printf("%s", buf);
    return 0;
}
