/*
 * Exit, processor identity and synchronisation. Every sensitive instruction here (out, hlt,
 * cpuid, xchg with memory, lock xadd) is written as itself: vsmp cc marks it and the monitor
 * emulates it (docs/guest-platform.md).
 */
#include <vsmp.h>

#define EXIT_PORT 0xF4
#define VSMP_CPUID_INFO 0x40000001u

_Noreturn void vsmp_exit(int status)
{
    __asm__ __volatile__("outb %0, %1" : : "a"((uint8_t)status), "Nd"((uint16_t)EXIT_PORT)
                         : "memory");
    /* The monitor ends the vCPU at the write above; should it not, stop here. */
    for (;;)
        __asm__ __volatile__("hlt" : : : "memory");
}

static void cpuid(uint32_t leaf, uint32_t *eax, uint32_t *ebx, uint32_t *ecx, uint32_t *edx)
{
    __asm__ __volatile__("cpuid" : "=a"(*eax), "=b"(*ebx), "=c"(*ecx), "=d"(*edx)
                         : "a"(leaf), "c"(0));
}

unsigned vsmp_cpu_id(void)
{
    uint32_t a, b, c, d;
    cpuid(VSMP_CPUID_INFO, &a, &b, &c, &d);
    return b;
}

unsigned vsmp_cpu_count(void)
{
    uint32_t a, b, c, d;
    cpuid(VSMP_CPUID_INFO, &a, &b, &c, &d);
    return a;
}

/* Atomically stores v at *p and returns the old value (`xchg` with memory is locked). */
static unsigned exchange(volatile unsigned *p, unsigned v)
{
    __asm__ __volatile__("xchgl %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}

int vsmp_spin_trylock(vsmp_spinlock_t *lock)
{
    return exchange(&lock->locked, 1) == 0;
}

void vsmp_spin_lock(vsmp_spinlock_t *lock)
{
    while (exchange(&lock->locked, 1) != 0) {
        /* Wait with plain loads (no trap) until the lock looks free, then retry. */
        while (lock->locked != 0)
            vsmp_cpu_relax();
    }
}

void vsmp_spin_unlock(vsmp_spinlock_t *lock)
{
    __asm__ __volatile__("" : : : "memory");
    lock->locked = 0; /* a plain store is a release under x86-TSO */
}

/* Atomically adds v to *p and returns the old value (`lock xadd`). */
static unsigned fetch_add(volatile unsigned *p, unsigned v)
{
    __asm__ __volatile__("lock xaddl %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}

void vsmp_barrier_init(vsmp_barrier_t *barrier, unsigned n)
{
    barrier->arrived = 0;
    barrier->sense = 0;
    barrier->n = n;
}

/* The barrier of every vCPU; its count is set by vCPU 0 at boot, before any other vCPU runs. */
static vsmp_barrier_t all_cpus = {0, 0, 0};

void __vsmp_boot_init(unsigned ncpus)
{
    vsmp_barrier_init(&all_cpus, ncpus);
}

void vsmp_barrier_all(void)
{
    vsmp_barrier_wait(&all_cpus);
}

void vsmp_parallel(void (*fn)(unsigned cpu, unsigned ncpus, void *arg), void *arg)
{
    fn(vsmp_cpu_id(), vsmp_cpu_count(), arg);
    vsmp_barrier_all();
}

void vsmp_barrier_wait(vsmp_barrier_t *barrier)
{
    /* The sense of this episode, read before arriving: it cannot flip until we arrive. */
    unsigned sense = barrier->sense;
    if (fetch_add(&barrier->arrived, 1) == barrier->n - 1) {
        barrier->arrived = 0;    /* reset first ... */
        barrier->sense = !sense; /* ... then release (stores stay in order under TSO) */
    } else {
        while (barrier->sense == sense)
            vsmp_cpu_relax();
    }
    __asm__ __volatile__("" : : : "memory");
}
