/* t_producer: a slow, deterministic producer for shell pipelines.
 *
 * Usage: t_producer COUNT DELAY_MS
 * Prints COUNT lines "item I VALUE PAD" (VALUE a hash of I, PAD 80 hex digits derived from
 * it, so that the lines are long enough for buffering readers to pass them on in several
 * steps), one write(2) each, sleeping DELAY_MS before each line, then exits 0.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static uint32_t mix(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352d;
    x ^= x >> 15;
    x *= 0x846ca68b;
    x ^= x >> 16;
    return x;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    long n = atol(argv[1]), ms = atol(argv[2]);
    for (long i = 1; i <= n; i++) {
        struct timespec d = {ms / 1000, (ms % 1000) * 1000000L};
        while (nanosleep(&d, &d) && errno == EINTR) {}
        char b[160];
        uint32_t v = mix((uint32_t)i);
        int k = snprintf(b, sizeof b, "item %ld %u ", i, v % 100000);
        for (int j = 0; j < 10; j++) k += snprintf(b + k, sizeof b - k, "%08x", mix(v + j));
        b[k++] = '\n';
        if (write(1, b, k) != k) return 1;
    }
    return 0;
}
