/*
 * barrier: R rounds of a sense-reversing barrier (lock xadd to arrive, a plain store to
 * release). In round r every vCPU writes r into its own slot before the barrier; after it,
 * every vCPU checks that every slot holds r. A barrier that lets anyone through early, or a
 * store that is not visible after it, shows as a mismatch.
 */
#include <vsmp.h>

#ifndef ROUNDS
#define ROUNDS 50
#endif
#define MAX_CPUS 64

static vsmp_barrier_t barrier;
static volatile int ready;
/* One slot per vCPU, each on its own page. */
static volatile struct {
    int round;
    char pad[4096 - sizeof(int)];
} slot[MAX_CPUS] __attribute__((aligned(4096)));

int main(void)
{
    unsigned id = vsmp_cpu_id(), n = vsmp_cpu_count();
    if (n > MAX_CPUS)
        return 2;
    if (id == 0) {
        vsmp_barrier_init(&barrier, n);
        ready = 1;
    }
    while (!ready)
        vsmp_cpu_relax();
    for (int r = 1; r <= ROUNDS; r++) {
        slot[id].round = r;
        vsmp_barrier_wait(&barrier);
        for (unsigned k = 0; k < n; k++) {
            if (slot[k].round != r) {
                vsmp_printf("barrier: vCPU %u saw slot %u = %d in round %d: FAILED\n", id, k,
                            slot[k].round, r);
                return 1;
            }
        }
        vsmp_barrier_wait(&barrier);
    }
    if (id == 0)
        vsmp_printf("barrier: %u vCPUs, %d rounds: ok\n", n, ROUNDS);
    return 0;
}
