// A program that takes over its terminal: sets its own modes (no echo, no canonical mode,
// Ctrl-G as the interrupt character), then prints a line every 40 ms describing what it
// sees of its terminal: whether it is in the foreground process group, whether it leads
// its session, the modes, the window size. It reports "got SIGINT" when the terminal
// interrupts it and exits on the input byte 'q'.
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

static volatile sig_atomic_t interrupted;

static void on_int(int sig) {
    (void)sig;
    interrupted = 1;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1000000;
    signal(SIGINT, on_int);
    if (!isatty(0)) {
        printf("FAIL stdin is not a terminal\n");
        return 1;
    }
    struct termios t;
    tcgetattr(0, &t);
    t.c_lflag &= ~(ECHO | ICANON);
    t.c_cc[VMIN] = 0;
    t.c_cc[VTIME] = 0;
    t.c_cc[VINTR] = 7;
    tcsetattr(0, TCSANOW, &t);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i <= n; i++) {
        struct termios now;
        struct winsize ws = {0};
        tcgetattr(0, &now);
        ioctl(0, TIOCGWINSZ, &ws);
        printf("tick %d fg=%d leader=%d echo=%d icanon=%d vintr=%d cols=%d\n", i,
               tcgetpgrp(0) == getpgrp(), getsid(0) == getpid(), !!(now.c_lflag & ECHO),
               !!(now.c_lflag & ICANON), now.c_cc[VINTR], ws.ws_col);
        if (interrupted) {
            interrupted = 0;
            printf("got SIGINT\n");
        }
        char c;
        while (read(0, &c, 1) == 1) {
            if (c == 'q') {
                printf("bye\n");
                return 0;
            }
        }
        struct timespec d = {0, 40 * 1000 * 1000};
        nanosleep(&d, NULL);
    }
    return 0;
}
