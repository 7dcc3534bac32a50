/*
 * vsmp.h: the vsmp guest runtime.
 *
 * A vsmp guest is a freestanding static x86-64 program built with `vsmp cc`. Every vCPU
 * enters the runtime's _start, which calls main() (SPMD, like an MPI program). A return from
 * main ends that vCPU only; the machine ends when every vCPU has returned, with the first
 * non-zero value in the machine's global order (else 0). vsmp_exit ends the whole machine at
 * once. Memory is shared by all vCPUs with the x86-TSO model, across nodes. The platform
 * these functions rely on (console UART, exit and done ports, CPUID leaves, boot convention)
 * is described in docs/guest-platform.md.
 */
#ifndef VSMP_H
#define VSMP_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The guest's entry point: runs on every vCPU; its return value ends this vCPU (see above). */
int main(void);

/* ---- console (16550 UART at port 0x3F8) ---- */

/* Writes s and a newline, like puts. */
void vsmp_puts(const char *s);
/* Writes one byte. */
void vsmp_putc(char c);
/* Writes n bytes. */
void vsmp_write(const char *buf, size_t n);
/* printf subset: %d %i %u %x %X %p %s %c %%, flags '-' and '0', width and precision
 * (digits or '*'), length modifiers hh h l ll z. Returns the number of bytes written. */
int vsmp_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vsmp_vprintf(const char *fmt, va_list ap);
/* Formats into buf (at most size bytes including the terminator); returns the length the
 * whole output would have, like snprintf. */
int vsmp_snprintf(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int vsmp_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/* ---- exit (port 0xF4) ---- */

/* Stops the whole machine, every vCPU, with the low byte of status as its exit status. */
_Noreturn void vsmp_exit(int status);

/* ---- processor identity (CPUID leaf 0x40000001) ---- */

/* This vCPU's id, 0 .. vsmp_cpu_count() - 1; vCPU 0 is the bootstrap processor. */
unsigned vsmp_cpu_id(void);
/* The number of vCPUs. */
unsigned vsmp_cpu_count(void);

/* ---- synchronisation ---- */

/* A test-and-set spinlock: lock with `xchg` (a locked instruction), unlock with a plain
 * store (a release under x86-TSO). Initialise with VSMP_SPINLOCK_INIT or zero. */
typedef struct {
    volatile unsigned locked;
} vsmp_spinlock_t;
#define VSMP_SPINLOCK_INIT {0}
void vsmp_spin_lock(vsmp_spinlock_t *lock);
void vsmp_spin_unlock(vsmp_spinlock_t *lock);
/* Returns 1 if the lock was taken, 0 if it was held. */
int vsmp_spin_trylock(vsmp_spinlock_t *lock);

/* A sense-reversing barrier for n vCPUs, built on `lock xadd`. */
typedef struct {
    volatile unsigned arrived;
    volatile unsigned sense;
    unsigned n;
} vsmp_barrier_t;
void vsmp_barrier_init(vsmp_barrier_t *barrier, unsigned n);
void vsmp_barrier_wait(vsmp_barrier_t *barrier);

/* Waits at a barrier of every vCPU of the machine (initialised by the runtime at boot). */
void vsmp_barrier_all(void);

/* Runs fn(cpu, ncpus, arg) on this vCPU and waits until every vCPU has run it: called by
 * every vCPU (collectively, as an SPMD program does), like an OpenMP parallel region. */
void vsmp_parallel(void (*fn)(unsigned cpu, unsigned ncpus, void *arg), void *arg);

/* ---- atomics (locked instructions: atomic and fencing across the whole machine) ---- */

/* Atomically adds v to *p; returns the old value (`lock xadd`). */
static inline uint64_t vsmp_fetch_add(volatile uint64_t *p, uint64_t v)
{
    __asm__ __volatile__("lock xaddq %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}

/* Atomically stores v at *p; returns the old value (`xchg`). */
static inline uint64_t vsmp_exchange(volatile uint64_t *p, uint64_t v)
{
    __asm__ __volatile__("xchgq %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}

/* If *p == expected, stores desired there; returns the value *p had (`lock cmpxchg`). */
static inline uint64_t vsmp_compare_exchange(volatile uint64_t *p, uint64_t expected,
                                             uint64_t desired)
{
    uint64_t prev;
    __asm__ __volatile__("lock cmpxchgq %2, %1"
                         : "=a"(prev), "+m"(*p)
                         : "r"(desired), "0"(expected)
                         : "memory");
    return prev;
}

/* A full memory fence (trapped: the DSM drains this vCPU's store buffer). */
static inline void vsmp_mfence(void)
{
    __asm__ __volatile__("mfence" : : : "memory");
}

/* A spin-wait hint (not trapped). */
static inline void vsmp_cpu_relax(void)
{
    __asm__ __volatile__("pause" : : : "memory");
}

/* The host time-stamp counter (rdtsc is not trapped). */
static inline uint64_t vsmp_rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* ---- memory and strings (gcc may call the first four itself) ---- */

void *memset(void *dst, int c, size_t n);
void *memcpy(void *restrict dst, const void *restrict src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t vsmp_strlen(const char *s);
int vsmp_strcmp(const char *a, const char *b);
#define vsmp_memset memset
#define vsmp_memcpy memcpy
#define vsmp_memmove memmove
#define vsmp_memcmp memcmp

/* ---- the image (linker symbols of guest/runtime/guest.ld) ---- */

/* First byte of the image and first byte after it (free RAM starts here). */
extern char __vsmp_image_start[], __vsmp_image_end[];

#ifdef __cplusplus
}
#endif

#endif /* VSMP_H */
