/*
 * prodcons: a single-producer single-consumer ring between vCPU 2i (producer) and vCPU 2i+1
 * (consumer), with nothing but plain loads and stores: the producer writes an item, then
 * advances `head`; the consumer spins on `head` (no trap: plain loads), reads the item, then
 * advances `tail`. Under x86-TSO the item is visible before the index that publishes it. It
 * makes progress only because the DSM publishes stores without fences (the periodic flush)
 * and makes them visible to a spinning vCPU (it interrupts it to apply them).
 */
#include <vsmp.h>

#ifndef ITEMS
#define ITEMS 2000
#endif
#define SLOTS 64
#define MAX_PAIRS 32

struct ring {
    volatile uint64_t head; /* written by the producer only */
    char pad0[4096 - 8];
    volatile uint64_t tail; /* written by the consumer only */
    char pad1[4096 - 8];
    volatile uint64_t item[SLOTS];
    char pad2[4096 - 8 * SLOTS];
} __attribute__((aligned(4096)));

static struct ring rings[MAX_PAIRS];

static uint64_t value(unsigned pair, uint64_t i)
{
    return (uint64_t)pair << 32 | (i * 2654435761u);
}

int main(void)
{
    unsigned id = vsmp_cpu_id(), n = vsmp_cpu_count();
    unsigned pair = id / 2;
    if (pair >= MAX_PAIRS || (id == n - 1 && n % 2 == 1)) {
        return 0; /* no partner */
    }
    struct ring *r = &rings[pair];
    if (id % 2 == 0) {
        for (uint64_t i = 0; i < ITEMS; i++) {
            while (r->head - r->tail == SLOTS)
                vsmp_cpu_relax();
            r->item[r->head % SLOTS] = value(pair, i);
            r->head = r->head + 1;
        }
        return 0;
    }
    for (uint64_t i = 0; i < ITEMS; i++) {
        while (r->tail == r->head)
            vsmp_cpu_relax();
        uint64_t v = r->item[r->tail % SLOTS];
        if (v != value(pair, i)) {
            vsmp_printf("prodcons: pair %u item %lu is %lx, expected %lx: FAILED\n", pair,
                        (unsigned long)i, (unsigned long)v, (unsigned long)value(pair, i));
            return 1;
        }
        r->tail = r->tail + 1;
    }
    vsmp_printf("prodcons: pair %u passed %d items in order: ok\n", pair, ITEMS);
    return 0;
}
