/*
 * reduction: pi by numerical integration of 4 / (1 + x^2) over [0, 1] (the midpoint rule, S
 * steps), the steps split evenly over the vCPUs; each vCPU sums its share in registers and
 * stores one partial sum in its own page; after a barrier vCPU 0 adds the partial sums and
 * checks the result. Embarrassingly parallel: the speedup benchmark's workload. Build with
 * -DSTEPS=... for a longer run.
 */
#include <vsmp.h>

#ifndef STEPS
#define STEPS 4000000L
#endif
#define MAX_CPUS 64

static volatile struct {
    double sum;
    char pad[4096 - sizeof(double)];
} partial[MAX_CPUS] __attribute__((aligned(4096)));

static void integrate(unsigned cpu, unsigned ncpus, void *arg)
{
    (void)arg;
    long per = STEPS / ncpus, first = cpu * per;
    long last = cpu == ncpus - 1 ? STEPS : first + per;
    double h = 1.0 / STEPS, sum = 0.0;
    for (long i = first; i < last; i++) {
        double x = (i + 0.5) * h;
        sum += 4.0 / (1.0 + x * x);
    }
    partial[cpu].sum = sum * h;
}

int main(void)
{
    unsigned id = vsmp_cpu_id(), n = vsmp_cpu_count();
    if (n > MAX_CPUS)
        return 2;
    vsmp_parallel(integrate, 0);
    if (id != 0)
        return 0;
    double pi = 0.0;
    for (unsigned k = 0; k < n; k++)
        pi += partial[k].sum;
    double err = pi - 3.14159265358979323846;
    if (err < 0)
        err = -err;
    /* vsmp_printf has no %f: print pi in millionths. */
    long micro = (long)(pi * 1e6 + 0.5);
    if (err > 1e-9) {
        vsmp_printf("reduction: pi = %ld.%06ld (error too large): FAILED\n", micro / 1000000,
                    micro % 1000000);
        return 1;
    }
    vsmp_printf("reduction: pi = %ld.%06ld with %ld steps on %u vCPUs: ok\n", micro / 1000000,
                micro % 1000000, (long)STEPS, n);
    return 0;
}
