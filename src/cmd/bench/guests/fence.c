/*
 * The fence benchmark's guest (built by `vsmp bench fence` with -DPAGES=K -DSAMPLES=N).
 *
 * vCPU 1 measures, with the TSC (rdtsc is not trapped): writing one byte into each of K pages
 * (the pages are write-protected again by every fence, so each write faults), the `mfence`
 * that publishes them (a trap, K diffs, the ticket, the publish, its own apply), and a `cpuid`
 * (a plain trap round trip through the monitor). Then vCPU 0 and 1 take turns under a spinlock
 * 2 x HANDOFFS times (xchg to lock, a plain store to unlock); a handoff is the time from one
 * vCPU's release to the other's taking the turn (one TSC: the nodes share a host). Every other
 * vCPU returns at once. The results are printed in TSC ticks as `NAME median p99` lines.
 */
#include <vsmp.h>

#ifndef PAGES
#define PAGES 1
#endif
#ifndef SAMPLES
#define SAMPLES 2000
#endif
#ifndef HANDOFFS
#define HANDOFFS 1000
#endif
#define WARMUP 50

static volatile char pages[PAGES][4096] __attribute__((aligned(4096)));
static uint64_t fence_t[SAMPLES], fault_t[SAMPLES], trap_t[SAMPLES];

static vsmp_spinlock_t lock __attribute__((aligned(4096)));
static volatile unsigned turn;
static volatile unsigned hand;
/* Per vCPU (each on its own pages): when it took turn h, and when it released turn h. */
static uint64_t took[2][2 * HANDOFFS] __attribute__((aligned(4096)));
static uint64_t released[2][2 * HANDOFFS] __attribute__((aligned(4096)));
static uint64_t handoff_t[SAMPLES];

static void sort(uint64_t *a, int n)
{
    for (int gap = n / 2; gap > 0; gap /= 2)
        for (int i = gap; i < n; i++)
            for (int j = i; j >= gap && a[j - gap] > a[j]; j -= gap) {
                uint64_t t = a[j];
                a[j] = a[j - gap];
                a[j - gap] = t;
            }
}

static void report(const char *name, uint64_t *a)
{
    sort(a, SAMPLES);
    vsmp_printf("%s %lu %lu\n", name, (unsigned long)a[SAMPLES / 2],
                (unsigned long)a[SAMPLES * 99 / 100]);
}

static void measure_fences(void)
{
    for (int i = -WARMUP; i < SAMPLES; i++) {
        uint64_t t0 = vsmp_rdtsc();
        for (int k = 0; k < PAGES; k++)
            pages[k][64] = (char)i;
        uint64_t t1 = vsmp_rdtsc();
        vsmp_mfence();
        uint64_t t2 = vsmp_rdtsc();
        (void)vsmp_cpu_count();
        uint64_t t3 = vsmp_rdtsc();
        if (i >= 0) {
            fault_t[i] = t1 - t0;
            fence_t[i] = t2 - t1;
            trap_t[i] = t3 - t2;
        }
    }
}

static void take_turns(unsigned id)
{
    for (int i = 0; i < HANDOFFS; i++) {
        for (;;) {
            vsmp_spin_lock(&lock);
            if (turn == id) {
                unsigned h = hand;
                took[id][h] = vsmp_rdtsc();
                hand = h + 1;
                turn = 1 - id;
                released[id][h] = vsmp_rdtsc();
                vsmp_spin_unlock(&lock);
                break;
            }
            vsmp_spin_unlock(&lock);
        }
    }
}

/* Handoff h (h >= 1): from the release of turn h - 1 by one vCPU to the other taking turn h. */
static void handoffs(void)
{
    for (int s = 0; s < SAMPLES; s++) {
        unsigned h = 1 + (unsigned)s * (2 * HANDOFFS - 2) / SAMPLES;
        unsigned taker = h % 2; /* vCPU 0 takes the even turns */
        handoff_t[s] = took[taker][h] - released[1 - taker][h - 1];
    }
    report("handoff", handoff_t);
}

int main(void)
{
    unsigned id = vsmp_cpu_id();
    if (id > 1)
        return 0;
    if (id == 1)
        measure_fences();
    vsmp_barrier_all();
    take_turns(id);
    vsmp_barrier_all();
    if (id == 1) {
        report("fault", fault_t);
        report("fence", fence_t);
        report("trap", trap_t);
        handoffs();
    }
    return 0;
}
