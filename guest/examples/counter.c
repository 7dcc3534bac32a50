/*
 * counter: every vCPU increments one shared counter K times under a spinlock (xchg to lock, a
 * plain store to unlock); at the end the counter must be exactly N x K. Each increment moves
 * the lock's and the counter's page between nodes: the DSM's ownership and fences at work.
 */
#include <vsmp.h>

#ifndef ROUNDS
#define ROUNDS 300
#endif

/* The lock and the counter share a page, as they would in most programs. */
static vsmp_spinlock_t lock = VSMP_SPINLOCK_INIT;
static volatile uint64_t counter;

int main(void)
{
    unsigned id = vsmp_cpu_id(), n = vsmp_cpu_count();
    for (int i = 0; i < ROUNDS; i++) {
        vsmp_spin_lock(&lock);
        counter = counter + 1;
        vsmp_spin_unlock(&lock);
    }
    vsmp_barrier_all();
    if (id == 0) {
        uint64_t want = (uint64_t)n * ROUNDS;
        if (counter != want) {
            vsmp_printf("counter: %lu, expected %lu: FAILED\n", (unsigned long)counter,
                        (unsigned long)want);
            return 1;
        }
        vsmp_printf("counter: %u vCPUs x %d increments = %lu: ok\n", n, ROUNDS,
                    (unsigned long)counter);
    }
    return 0;
}
