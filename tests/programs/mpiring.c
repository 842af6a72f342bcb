/* mpiring: a small MPI computation for checkpoint tests.
 *
 * Usage: mpiexec -n 4 mpiring STEPS [PAUSE_MS]. Each step: a ring exchange, an allreduce
 * and a 1-D stencil with halo exchange over a distributed array; a pause between steps
 * (default 20 ms). Rank 0 prints "step N <value>" lines and finally "RESULT <checksum>",
 * identical for any run (the values do not depend on STEPS or the pause).
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define N 4096

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int steps = argc > 1 ? atoi(argv[1]) : 100;
    long pause_ms = argc > 2 ? atol(argv[2]) : 20;
    double *u = calloc(N + 2, sizeof(double)), *v = calloc(N + 2, sizeof(double));
    for (int i = 1; i <= N; i++) u[i] = (double)((rank * N + i) % 97) / 97.0;
    long token = rank;
    double total = 0;
    for (int s = 1; s <= steps; s++) {
        int next = (rank + 1) % size, prev = (rank + size - 1) % size;
        long got;
        MPI_Sendrecv(&token, 1, MPI_LONG, next, 0, &got, 1, MPI_LONG, prev, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        token = (got * 31 + s) % 1000003;
        MPI_Sendrecv(&u[1], 1, MPI_DOUBLE, prev, 1, &u[N + 1], 1, MPI_DOUBLE, next, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        MPI_Sendrecv(&u[N], 1, MPI_DOUBLE, next, 2, &u[0], 1, MPI_DOUBLE, prev, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        for (int i = 1; i <= N; i++) v[i] = 0.25 * u[i - 1] + 0.5 * u[i] + 0.25 * u[i + 1];
        double *t = u; u = v; v = t;
        double local = 0;
        for (int i = 1; i <= N; i++) local += u[i];
        double sum;
        MPI_Allreduce(&local, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        long tsum;
        MPI_Allreduce(&token, &tsum, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
        total = sum + (double)tsum;
        if (rank == 0) { printf("step %d %.9f\n", s, total); fflush(stdout); }
        struct timespec d = {pause_ms / 1000, (pause_ms % 1000) * 1000 * 1000};
        nanosleep(&d, NULL);
    }
    if (rank == 0) { printf("RESULT %.9f\n", total); fflush(stdout); }
    MPI_Finalize();
    return 0;
}
