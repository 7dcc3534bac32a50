/*
 * stencil: a Jacobi sweep of the 2-D heat equation on a ROWS x COLS grid, the rows split into
 * one band per vCPU, with a barrier between iterations (neighbouring bands exchange their
 * boundary rows through the DSM). At the end vCPU 0 recomputes the whole sweep alone on a
 * private copy and requires every cell to be bit-identical (the same operations in the same
 * order per cell). Build with -DITERS=... for a longer run.
 */
#include <vsmp.h>

#ifndef ROWS
#define ROWS 128
#endif
#define COLS 512 /* one row of doubles is one page */
#ifndef ITERS
#define ITERS 40
#endif

typedef double grid_t[ROWS][COLS];

static grid_t a __attribute__((aligned(4096)));
static grid_t b __attribute__((aligned(4096)));
static grid_t check_a __attribute__((aligned(4096)));
static grid_t check_b __attribute__((aligned(4096)));

static void init(grid_t g)
{
    for (int i = 0; i < ROWS; i++)
        for (int j = 0; j < COLS; j++)
            g[i][j] = (i == 0 || j == 0) ? 100.0 : (double)((i * 7 + j * 3) % 11);
}

static void sweep(grid_t src, grid_t dst, int first, int last)
{
    for (int i = first; i < last; i++) {
        for (int j = 0; j < COLS; j++) {
            if (i == 0 || i == ROWS - 1 || j == 0 || j == COLS - 1) {
                dst[i][j] = src[i][j];
            } else {
                dst[i][j] = 0.25 * (src[i - 1][j] + src[i + 1][j] + src[i][j - 1] + src[i][j + 1]);
            }
        }
    }
}

int main(void)
{
    unsigned id = vsmp_cpu_id(), n = vsmp_cpu_count();
    int per = ROWS / n, first = id * per, last = id == n - 1 ? ROWS : first + per;
    if (id == 0)
        init(a);
    vsmp_barrier_all();
    for (int it = 0; it < ITERS; it++) {
        if (it % 2 == 0)
            sweep(a, b, first, last);
        else
            sweep(b, a, first, last);
        vsmp_barrier_all();
    }
    if (id != 0)
        return 0;
    init(check_a);
    for (int it = 0; it < ITERS; it++) {
        if (it % 2 == 0)
            sweep(check_a, check_b, 0, ROWS);
        else
            sweep(check_b, check_a, 0, ROWS);
    }
    grid_t *got = ITERS % 2 ? &b : &a, *want = ITERS % 2 ? &check_b : &check_a;
    for (int i = 0; i < ROWS; i++) {
        for (int j = 0; j < COLS; j++) {
            if ((*got)[i][j] != (*want)[i][j]) {
                vsmp_printf("stencil: cell (%d, %d) differs from the serial sweep: FAILED\n", i,
                            j);
                return 1;
            }
        }
    }
    vsmp_printf("stencil: %d x %d grid, %d iterations on %u vCPUs matches the serial sweep: ok\n",
                ROWS, COLS, ITERS, n);
    return 0;
}
