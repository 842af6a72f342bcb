/* memhog: holds MIB mebibytes of pseudo-random (incompressible) memory and checks it.
 *
 * Usage: memhog WORKDIR MIB
 * Fills the memory, records its checksum, prints READY, waits for WORKDIR/go (polling every
 * 10 ms), then recomputes the checksum: PASS/FAIL lines and DONE <failures>. While waiting,
 * each time WORKDIR/touch appears it is removed, one page in 100 is changed (the expected
 * checksum with it) and TOUCHED N is printed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t checksum(const uint64_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    size_t mib = strtoul(argv[2], NULL, 10);
    size_t n = mib * (1u << 20) / 8;
    uint64_t *mem = malloc(n * 8);
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        mem[i] = x;
    }
    uint64_t before = checksum(mem, n);
    char go[4096], touch[4096];
    snprintf(go, sizeof go, "%s/go", argv[1]);
    snprintf(touch, sizeof touch, "%s/touch", argv[1]);
    printf("READY\n");
    int touched = 0;
    while (access(go, F_OK) != 0) {
        if (unlink(touch) == 0) {
            touched++;
            for (size_t i = 0; i < n; i += 100 * 4096 / 8) mem[i] ^= (uint64_t)touched;
            before = checksum(mem, n);
            printf("TOUCHED %d\n", touched);
        }
        struct timespec d = {0, 10 * 1000 * 1000};
        nanosleep(&d, NULL);
    }
    uint64_t after = checksum(mem, n);
    if (after == before) printf("PASS memory checksum of %zu MiB\n", mib);
    else printf("FAIL memory checksum of %zu MiB: %llx vs %llx\n", mib, (unsigned long long)after, (unsigned long long)before);
    printf("DONE %d\n", after != before);
    return after != before;
}
