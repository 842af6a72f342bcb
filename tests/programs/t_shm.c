/* t_shm: memory shared between processes must be shared again after a restart.
 *
 * Usage: t_shm WORKDIR
 * Regions, all set up by the root before it forks (children inherit the mappings):
 *   anon    MAP_SHARED|MAP_ANONYMOUS, 1 MiB: counters, a turn word, a page per process and
 *           "ghost" pages written only by a child that exited before the cut;
 *   shmA    a POSIX shm object (shm_open), 64 KiB, still linked at the cut, its descriptor
 *           kept open; C2 also maps it a second time by name;
 *   shmB    a POSIX shm object, 64 KiB, unlinked before the cut, descriptor closed; C3 maps
 *           it a second time by name (before the unlink);
 *   memfd   memfd_create, 128 KiB, mapped whole and again partially (offset 16 KiB, 32 KiB
 *           long) in the root, then the memfd is closed (the mappings stay);
 *   priv    MAP_PRIVATE|MAP_ANONYMOUS: copy-on-write, must stay private to each process.
 * Processes: root (P0), C1 (P1), C2 (P2), C3 (P3), and C1's child C1a (P4).
 * Before the cut every process adds K to a shared counter with atomics, writes its page
 * and its slot in every region. After go: for each region a turn word goes round all five
 * processes 20 times (each waits until the word says it is its turn, then passes it on) —
 * this only progresses if a write by one process is seen by the next; C2 and C3 use their
 * own second mappings, C2 and C3 also use the partial memfd mapping. Then each adds K
 * again; the root checks the counter, every page and slot written by the others (and the
 * ghost's), that private memory stayed private, and that shmA's file holds the data.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PG 4096
#define NP 5
#define K 20000
#define ROUNDS 20
#define ANON_SIZE (1 << 20)
#define SHM_SIZE (64 * 1024)
#define MEMFD_SIZE (128 * 1024)
#define ALIAS_OFF (16 * 1024)
#define ALIAS_LEN (32 * 1024)
#define GHOST_PAGE 100
#define GHOST_PAGES 10

static char work[2048];
static int failures = 0;
static const char *names[NP] = {"P0", "C1", "C2", "C3", "C1a"};
static int me = 0;

static void say(const char *fmt, ...) {
    char b[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b, sizeof b - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof b - 2) n = sizeof b - 2;
    b[n++] = '\n';
    if (write(1, b, n) != n) _exit(99);
}

static void report(int ok, const char *fmt, ...) {
    char b[900];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    say("%s %s: %s", ok ? "PASS" : "FAIL", names[me], b);
    if (!ok) failures++;
}

static void sleep_us(long us) {
    struct timespec d = {us / 1000000, (us % 1000000) * 1000L};
    while (nanosleep(&d, &d) && errno == EINTR) {}
}

static void wait_go(void) {
    char p[4096];
    snprintf(p, sizeof p, "%s/go", work);
    for (int i = 0; i < 60 * 200; i++) {
        if (access(p, F_OK) == 0) return;
        sleep_us(5000);
    }
    report(0, "timed out waiting for go");
    _exit(100);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The layout shared by every region: a header at offset 0 of the region's "view". */
struct hdr {
    uint64_t counter;
    uint32_t turn;
    uint32_t finished;
    uint64_t slot[NP];
};

static unsigned char *anon, *shma, *shmb, *mfd, *alias, *priv;
static unsigned char *shma2, *shmb2; /* C2's, C3's own mappings */
static char shm_a_name[64], shm_b_name[64];

static uint64_t val(int region, int p) { return 0x5354415349530000ull + region * 256 + p; }
static unsigned char pagebyte(int p, int i) { return (unsigned char)(p * 37 + i * 11 + 1); }

/* The view each process uses of region r (C2/C3 use their own second mappings). */
static struct hdr *view(int r) {
    switch (r) {
    case 0: return (struct hdr *)anon;
    case 1: return (struct hdr *)(me == 2 ? shma2 : shma);
    case 2: return (struct hdr *)(me == 3 ? shmb2 : shmb);
    case 3: return (struct hdr *)mfd;
    default: return (struct hdr *)(me == 2 || me == 3 ? alias : mfd + ALIAS_OFF);
    }
}
static const char *rname[5] = {"anon", "shmA", "shmB", "memfd", "memfd partial"};
#define NR 5

static void setup_writes(void) {
    for (int i = 0; i < K; i++) __atomic_add_fetch(&((struct hdr *)anon)->counter, 1, __ATOMIC_SEQ_CST);
    for (int r = 0; r < NR; r++) __atomic_store_n(&view(r)->slot[me], val(r, me), __ATOMIC_SEQ_CST);
    memset(anon + (16 + me) * PG, 0, PG);
    for (int i = 0; i < PG; i++) anon[(16 + me) * PG + i] = pagebyte(me, i);
    memset(priv, 0x10 + me, PG);
}

/* Passes each region's turn word round all processes; returns when done. */
static void rings(void) {
    for (int r = 0; r < NR; r++) {
        struct hdr *h = view(r);
        for (int round = 0; round < ROUNDS; round++) {
            uint32_t want = round * NP + me;
            double t0 = now();
            uint32_t t;
            while ((t = __atomic_load_n(&h->turn, __ATOMIC_SEQ_CST)) != want) {
                if (now() - t0 > 4.0) {
                    report(0, "%s: waited 4 s for turn %u, the word stays at %u: writes by the others are not seen",
                           rname[r], want, t);
                    return;
                }
                sleep_us(50);
            }
            __atomic_store_n(&h->turn, want + 1, __ATOMIC_SEQ_CST);
        }
        report(1, "%s: the turn word went round %d times", rname[r], ROUNDS);
    }
}

static void check_privates(void) {
    int ok = 1;
    for (int i = 0; i < PG; i++) ok &= priv[i] == 0x10 + me;
    report(ok, "private copy-on-write memory holds my own data (%#x)", priv[0]);
}

/* The common part of every process after go. */
static void after_go(void) {
    rings();
    for (int i = 0; i < K; i++) __atomic_add_fetch(&((struct hdr *)anon)->counter, 1, __ATOMIC_SEQ_CST);
    check_privates();
    __atomic_add_fetch(&((struct hdr *)anon)->finished, 1, __ATOMIC_SEQ_CST);
}

__attribute__((noreturn)) static void child(int p, int rdy) {
    me = p;
    if (p == 2) {
        int fd = shm_open(shm_a_name, O_RDWR, 0);
        shma2 = fd < 0 ? MAP_FAILED : mmap(NULL, SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (shma2 == MAP_FAILED) report(0, "C2: mapping shmA again: %s", strerror(errno));
        close(fd);
    }
    if (p == 3) {
        int fd = shm_open(shm_b_name, O_RDWR, 0);
        shmb2 = fd < 0 ? MAP_FAILED : mmap(NULL, SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (shmb2 == MAP_FAILED) report(0, "C3: mapping shmB again: %s", strerror(errno));
        close(fd);
    }
    pid_t grandchild = -1;
    if (p == 1) {
        grandchild = fork();
        if (grandchild == 0) child(4, rdy);
    }
    setup_writes();
    if (write(rdy, "r", 1) != 1) report(0, "ready pipe");
    wait_go();
    after_go();
    if (grandchild > 0) {
        int st;
        waitpid(grandchild, &st, 0);
        report(WIFEXITED(st) && WEXITSTATUS(st) == 0, "C1a exited with 0 (status %#x)", st);
    }
    _exit(failures ? 100 : 0);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    snprintf(work, sizeof work, "%s", argv[1]);
    uint32_t h = 2166136261u;
    for (const char *c = work; *c; c++) h = (h ^ (unsigned char)*c) * 16777619u;
    snprintf(shm_a_name, sizeof shm_a_name, "/stasis-t-%08x-a", h);
    snprintf(shm_b_name, sizeof shm_b_name, "/stasis-t-%08x-b", h);
    say("shm %s %s", shm_a_name, shm_b_name);

    anon = mmap(NULL, ANON_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    priv = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int fa = shm_open(shm_a_name, O_RDWR | O_CREAT | O_TRUNC, 0600);
    int fb = shm_open(shm_b_name, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fa < 0 || fb < 0 || ftruncate(fa, SHM_SIZE) || ftruncate(fb, SHM_SIZE)) {
        say("FAIL setup: shm_open: %s", strerror(errno));
        return 1;
    }
    shma = mmap(NULL, SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fa, 0);
    shmb = mmap(NULL, SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fb, 0);
    close(fb);
    int mf = memfd_create("stasis-t", MFD_CLOEXEC);
    if (mf < 0 || ftruncate(mf, MEMFD_SIZE)) return 2;
    mfd = mmap(NULL, MEMFD_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mf, 0);
    alias = mmap(NULL, ALIAS_LEN, PROT_READ | PROT_WRITE, MAP_SHARED, mf, ALIAS_OFF);
    close(mf);
    if (anon == MAP_FAILED || priv == MAP_FAILED || shma == MAP_FAILED || shmb == MAP_FAILED || mfd == MAP_FAILED ||
        alias == MAP_FAILED)
        return 2;
    memset(priv, 0x10, PG);

    /* The ghost writes its pages and exits before the cut: nobody else ever touches them. */
    pid_t g = fork();
    if (g == 0) {
        for (int i = 0; i < GHOST_PAGES * PG; i++) anon[GHOST_PAGE * PG + i] = pagebyte(9, i);
        _exit(0);
    }
    int st;
    waitpid(g, &st, 0);

    int rdy[2];
    if (pipe(rdy)) return 2;
    pid_t kids[3];
    for (int p = 1; p <= 3; p++) {
        kids[p - 1] = fork();
        if (kids[p - 1] == 0) {
            close(rdy[0]);
            close(fa);
            child(p, rdy[1]);
        }
    }
    close(rdy[1]);
    setup_writes();
    char c;
    for (int got = 0; got < 4;)
        if (read(rdy[0], &c, 1) == 1) got++;
    if (shm_unlink(shm_b_name)) report(0, "shm_unlink B: %s", strerror(errno));
    report(__atomic_load_n(&((struct hdr *)anon)->counter, __ATOMIC_SEQ_CST) == (uint64_t)NP * K,
           "counter is %d before the cut", NP * K);
    say("READY");
    wait_go();
    /* Before anyone writes again: what the others wrote before the cut. */
    int bad_slots = 0;
    for (int r = 0; r < NR; r++)
        for (int p = 0; p < NP; p++)
            if (view(r)->slot[p] != val(r, p)) bad_slots++;
    report(bad_slots == 0, "every process's slot in every region survived (%d wrong)", bad_slots);
    int bad_pages = 0;
    for (int p = 0; p < NP; p++)
        for (int i = 0; i < PG; i++)
            if (anon[(16 + p) * PG + i] != pagebyte(p, i)) bad_pages++;
    report(bad_pages == 0, "every process's page of shared anonymous memory survived (%d bytes wrong)", bad_pages);
    int bad_ghost = 0;
    for (int i = 0; i < GHOST_PAGES * PG; i++)
        if (anon[GHOST_PAGE * PG + i] != pagebyte(9, i)) bad_ghost++;
    report(bad_ghost == 0, "pages written only by a process that exited before the cut survived (%d bytes wrong)",
           bad_ghost);
    report(memcmp(mfd + ALIAS_OFF, alias, ALIAS_LEN) == 0, "the partial memfd mapping shows the same bytes as the whole");
    after_go();
    double t0 = now();
    while (__atomic_load_n(&((struct hdr *)anon)->finished, __ATOMIC_SEQ_CST) < NP && now() - t0 < 10) sleep_us(1000);
    uint64_t cnt = __atomic_load_n(&((struct hdr *)anon)->counter, __ATOMIC_SEQ_CST);
    report(cnt == 2ull * NP * K, "shared counter is %lu, want %d (every atomic increment of every process)",
           (unsigned long)cnt, 2 * NP * K);
    for (int p = 1; p <= 3; p++) {
        waitpid(kids[p - 1], &st, 0);
        report(WIFEXITED(st) && WEXITSTATUS(st) == 0, "%s exited with 0 (status %#x)", names[p], st);
    }
    /* shmA is a real file: a fresh reader of it sees what the processes wrote. */
    struct hdr fh;
    ssize_t n = pread(fa, &fh, sizeof fh, 0);
    report(n == sizeof fh && fh.turn == ROUNDS * NP && fh.slot[3] == val(1, 3),
           "shmA's file holds the data (turn %u, slot %#lx)", fh.turn, (unsigned long)fh.slot[3]);
    if (shm_unlink(shm_a_name)) report(0, "shm_unlink A: %s", strerror(errno));
    say("DONE %d", failures);
    return failures ? 1 : 0;
}
