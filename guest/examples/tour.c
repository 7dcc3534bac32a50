/*
 * A tour of the emulated instructions: each one is executed as written (vsmp cc marks it,
 * the monitor emulates it) and its result checked against docs/guest-platform.md. The first
 * mismatch is printed and ends the guest with status 1; if all pass, the tour prints a summary
 * and returns 0.
 */
#include <vsmp.h>

static unsigned checks;

static void mismatch(const char *what, uint64_t got, uint64_t want)
{
    vsmp_printf("tour: MISMATCH %s: got 0x%llx, expected 0x%llx\n", what,
                (unsigned long long)got, (unsigned long long)want);
    vsmp_exit(1);
}

#define EXPECT_EQ(what, got, want)                                                             \
    do {                                                                                       \
        uint64_t got_ = (uint64_t)(got), want_ = (uint64_t)(want);                             \
        checks++;                                                                              \
        if (got_ != want_)                                                                     \
            mismatch(what, got_, want_);                                                       \
    } while (0)

#define EXPECT(what, cond) EXPECT_EQ(what, !!(cond), 1)

/* ---- instruction wrappers ---- */

struct regs {
    uint32_t eax, ebx, ecx, edx;
};

static struct regs cpuid(uint32_t leaf, uint32_t subleaf)
{
    struct regs r;
    __asm__ __volatile__("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
                         : "a"(leaf), "c"(subleaf));
    return r;
}

static uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ __volatile__("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}

static void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ __volatile__("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))
                         : "memory");
}

#define READ_CR(n)                                                                             \
    ({                                                                                         \
        uint64_t v_;                                                                           \
        __asm__ __volatile__("mov %%cr" #n ", %0" : "=r"(v_));                                 \
        v_;                                                                                    \
    })
#define WRITE_CR(n, v) __asm__ __volatile__("mov %0, %%cr" #n : : "r"((uint64_t)(v)) : "memory")
#define READ_DR(n)                                                                             \
    ({                                                                                         \
        uint64_t v_;                                                                           \
        __asm__ __volatile__("mov %%dr" #n ", %0" : "=r"(v_));                                 \
        v_;                                                                                    \
    })
#define WRITE_DR(n, v) __asm__ __volatile__("mov %0, %%dr" #n : : "r"((uint64_t)(v)))
#define READ_SEG(s)                                                                            \
    ({                                                                                         \
        uint16_t v_;                                                                           \
        __asm__ __volatile__("mov %%" #s ", %0" : "=r"(v_));                                   \
        v_;                                                                                    \
    })
#define WRITE_SEG(s, v) __asm__ __volatile__("mov %0, %%" #s : : "r"((uint16_t)(v)) : "memory")

static uint64_t flags(void)
{
    uint64_t f;
    __asm__ __volatile__("pushfq; popq %0" : "=r"(f));
    return f;
}

static void set_flags(uint64_t f)
{
    __asm__ __volatile__("pushq %0; popfq" : : "r"(f) : "memory", "cc");
}

static uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static uint16_t inw(uint16_t port)
{
    uint16_t v;
    __asm__ __volatile__("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void outb(uint16_t port, uint8_t v)
{
    __asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port));
}

struct __attribute__((packed)) dtr {
    uint16_t limit;
    uint64_t base;
};

/* ---- the tour ---- */

#define MSR_TSC 0x10u
#define MSR_APIC_BASE 0x1Bu
#define MSR_EFER 0xC0000080u
#define MSR_STAR 0xC0000081u
#define MSR_LSTAR 0xC0000082u
#define MSR_CSTAR 0xC0000083u
#define MSR_FMASK 0xC0000084u
#define MSR_FS_BASE 0xC0000100u
#define MSR_GS_BASE 0xC0000101u
#define MSR_KERNEL_GS_BASE 0xC0000102u

#define VSMP_SIGNATURE 0x706d7376u /* "vsmp" */
#define RFLAGS_IF (1u << 9)
#define RFLAGS_IOPL (3u << 12)

static void tour_cpuid(unsigned id, unsigned count)
{
    struct regs r = cpuid(0, 0);
    EXPECT_EQ("cpuid 0 eax (highest basic leaf)", r.eax, 1);

    r = cpuid(0x40000000, 0);
    EXPECT_EQ("cpuid 0x40000000 eax (highest vsmp leaf)", r.eax, 0x40000001);
    EXPECT_EQ("cpuid 0x40000000 ebx", r.ebx, VSMP_SIGNATURE);
    EXPECT_EQ("cpuid 0x40000000 ecx", r.ecx, VSMP_SIGNATURE);
    EXPECT_EQ("cpuid 0x40000000 edx", r.edx, VSMP_SIGNATURE);

    r = cpuid(0x40000001, 0);
    EXPECT_EQ("cpuid 0x40000001 eax (vCPU count)", r.eax, count);
    EXPECT_EQ("cpuid 0x40000001 ebx (vCPU id)", r.ebx, id);
    EXPECT_EQ("cpuid 0x40000001 ecx", r.ecx, 0);
    EXPECT_EQ("cpuid 0x40000001 edx", r.edx, 0);
    EXPECT("vCPU id below count", id < count);

    r = cpuid(1, 0);
    EXPECT_EQ("cpuid 1 ebx[31:24] (initial APIC id)", r.ebx >> 24, id);
    EXPECT_EQ("cpuid 1 ebx[23:16] (logical processors)", (r.ebx >> 16) & 0xff, count);
    EXPECT("cpuid 1 ecx bit 31 (hypervisor)", r.ecx & (1u << 31));
    EXPECT_EQ("cpuid 1 ecx bit 3 (monitor)", r.ecx & (1u << 3), 0);
    EXPECT_EQ("cpuid 1 ecx bit 5 (vmx)", r.ecx & (1u << 5), 0);
    EXPECT_EQ("cpuid 1 ecx bit 21 (x2apic)", r.ecx & (1u << 21), 0);
    EXPECT("cpuid 1 edx bit 9 (apic)", r.edx & (1u << 9));
    EXPECT("cpuid 1 edx bit 28 (htt)", r.edx & (1u << 28));

    r = cpuid(0x80000000, 0);
    EXPECT_EQ("cpuid 0x80000000 eax (highest extended leaf)", r.eax, 0x80000001);
    EXPECT_EQ("cpuid 0x80000000 ebx", r.ebx, 0);

    r = cpuid(0x80000001, 0);
    EXPECT_EQ("cpuid 0x80000001 eax", r.eax, 0);
    EXPECT("cpuid 0x80000001 edx bit 29 (long mode)", r.edx & (1u << 29));

    r = cpuid(0x40000002, 0);
    EXPECT_EQ("cpuid 0x40000002 (undefined leaf) eax", r.eax, 0);
    EXPECT_EQ("cpuid 0x40000002 (undefined leaf) ebx", r.ebx, 0);
}

static void tour_control_registers(void)
{
    EXPECT_EQ("cr0 at boot", READ_CR(0), 0x80000011);
    EXPECT_EQ("cr4 at boot", READ_CR(4), 0x20);
    EXPECT_EQ("cr3 at boot", READ_CR(3), 0);
    EXPECT_EQ("cr2 at boot", READ_CR(2), 0);
    EXPECT_EQ("cr8 at boot", READ_CR(8), 0);

    uint64_t smsw_reg;
    uint16_t smsw_mem = 0xffff;
    __asm__ __volatile__("smsw %0" : "=r"(smsw_reg));
    __asm__ __volatile__("smsw %0" : "=m"(smsw_mem));
    EXPECT_EQ("smsw to a 64-bit register", smsw_reg, 0x80000011);
    EXPECT_EQ("smsw to memory", smsw_mem, 0x0011);

    WRITE_CR(3, 0x123000);
    EXPECT_EQ("cr3 reads back", READ_CR(3), 0x123000);
    WRITE_CR(2, 0xdeadbeef000);
    EXPECT_EQ("cr2 reads back", READ_CR(2), 0xdeadbeef000);
    WRITE_CR(8, 5);
    EXPECT_EQ("cr8 reads back", READ_CR(8), 5);
    WRITE_CR(8, 0);

    WRITE_CR(0, 0x80010011 | 8); /* WP and TS */
    EXPECT_EQ("cr0 with WP and TS", READ_CR(0), 0x80010019);
    __asm__ __volatile__("clts");
    EXPECT_EQ("clts clears cr0.TS", READ_CR(0), 0x80010011);
    WRITE_CR(0, 0x80000001); /* ET written as 0 */
    EXPECT_EQ("cr0.ET reads 1", READ_CR(0), 0x80000011);
    __asm__ __volatile__("lmsw %w0" : : "r"(0x0002u) : "memory"); /* MP; cannot clear PE */
    EXPECT_EQ("lmsw sets MP and keeps PE", READ_CR(0), 0x80000013);
    WRITE_CR(0, 0x80000011);

    EXPECT_EQ("dr7 at boot", READ_DR(7), 0x400);
    EXPECT_EQ("dr6 at boot", READ_DR(6), 0xffff0ff0);
    WRITE_DR(0, 0x401000);
    EXPECT_EQ("dr0 reads back", READ_DR(0), 0x401000);
}

static volatile uint64_t fs_area[2] = {0x1111222233334444ull, 0};
static volatile uint64_t gs_area_a[2] = {0xaaaaaaaaaaaaaaaaull, 0};
static volatile uint64_t gs_area_b[2] = {0xbbbbbbbbbbbbbbbbull, 0};

static void tour_msrs(unsigned id)
{
    EXPECT_EQ("EFER at boot", rdmsr(MSR_EFER), 0xd01);
    wrmsr(MSR_EFER, 0xd00);
    EXPECT_EQ("EFER.SCE cleared", rdmsr(MSR_EFER), 0xd00);
    wrmsr(MSR_EFER, 0xd01);
    EXPECT_EQ("EFER restored", rdmsr(MSR_EFER), 0xd01);

    EXPECT_EQ("APIC_BASE at boot", rdmsr(MSR_APIC_BASE), id == 0 ? 0xfee00900 : 0xfee00800);
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE));
    EXPECT_EQ("APIC_BASE after writing its own value", rdmsr(MSR_APIC_BASE),
              id == 0 ? 0xfee00900 : 0xfee00800);

    static const uint32_t plain[] = {MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK,
                                     MSR_KERNEL_GS_BASE};
    static const char *const names[] = {"STAR", "LSTAR", "CSTAR", "FMASK", "KERNEL_GS_BASE"};
    static const uint64_t values[] = {0x0023001000000000ull, 0xffffffff81000000ull,
                                      0xffffffff81000100ull, 0x47700, 0x7fff00001000ull};
    for (unsigned i = 0; i < sizeof plain / sizeof plain[0]; i++) {
        EXPECT_EQ(names[i], rdmsr(plain[i]), 0);
        wrmsr(plain[i], values[i]);
        EXPECT_EQ(names[i], rdmsr(plain[i]), values[i]);
    }

    /* FS_BASE takes effect at once for %fs-relative loads. */
    EXPECT_EQ("FS_BASE at boot", rdmsr(MSR_FS_BASE), 0);
    wrmsr(MSR_FS_BASE, (uintptr_t)fs_area);
    EXPECT_EQ("FS_BASE reads back", rdmsr(MSR_FS_BASE), (uintptr_t)fs_area);
    uint64_t v;
    __asm__ __volatile__("movq %%fs:0, %0" : "=r"(v));
    EXPECT_EQ("load through the new FS base", v, fs_area[0]);

    /* swapgs exchanges GS_BASE and KERNEL_GS_BASE. */
    wrmsr(MSR_GS_BASE, (uintptr_t)gs_area_a);
    wrmsr(MSR_KERNEL_GS_BASE, (uintptr_t)gs_area_b);
    __asm__ __volatile__("swapgs" : : : "memory");
    EXPECT_EQ("GS_BASE after swapgs", rdmsr(MSR_GS_BASE), (uintptr_t)gs_area_b);
    EXPECT_EQ("KERNEL_GS_BASE after swapgs", rdmsr(MSR_KERNEL_GS_BASE), (uintptr_t)gs_area_a);
    __asm__ __volatile__("movq %%gs:0, %0" : "=r"(v));
    EXPECT_EQ("load through the swapped GS base", v, gs_area_b[0]);
    __asm__ __volatile__("swapgs" : : : "memory");
    EXPECT_EQ("GS_BASE after a second swapgs", rdmsr(MSR_GS_BASE), (uintptr_t)gs_area_a);

    uint64_t t0 = rdmsr(MSR_TSC), t1 = rdmsr(MSR_TSC);
    EXPECT("TSC does not go backwards", t1 >= t0);
    wrmsr(MSR_TSC, 1ull << 50);
    uint64_t t2 = rdmsr(MSR_TSC);
    EXPECT("TSC counts from the value written", t2 >= (1ull << 50) && t2 < (1ull << 50) + (1ull << 44));
    uint64_t r0 = vsmp_rdtsc();
    EXPECT("rdtsc is the host TSC, not offset", r0 < (1ull << 50));
}

static void tour_flags(void)
{
    uint64_t f = flags();
    EXPECT("IF set at boot", f & RFLAGS_IF);
    EXPECT_EQ("IOPL 0 at boot", f & RFLAGS_IOPL, 0);
    EXPECT("rflags bit 1 reads 1", f & 2);
    __asm__ __volatile__("cli" : : : "memory");
    EXPECT_EQ("cli clears IF", flags() & RFLAGS_IF, 0);
    __asm__ __volatile__("sti" : : : "memory");
    EXPECT("sti sets IF", flags() & RFLAGS_IF);
    set_flags(flags() & ~(uint64_t)RFLAGS_IF);
    EXPECT_EQ("popf clears IF", flags() & RFLAGS_IF, 0);
    set_flags(flags() | RFLAGS_IF | 1 /* CF */);
    f = flags();
    EXPECT("popf sets IF", f & RFLAGS_IF);
    EXPECT("popf sets CF natively", f & 1);
}

/* A GDT with room for the selectors below: null, code 0x10, data 0x18, an LDT descriptor at
 * 0x20 and a TSS descriptor at 0x30 (16 bytes each). Its contents are not read yet. */
static uint64_t gdt[8] __attribute__((aligned(16)));
static uint64_t idt[32] __attribute__((aligned(16)));

static void tour_descriptor_tables(void)
{
    struct dtr d = {0xffff, ~0ull};
    __asm__ __volatile__("sgdt %0" : "=m"(d));
    EXPECT_EQ("GDTR limit at boot", d.limit, 0);
    EXPECT_EQ("GDTR base at boot", d.base, 0);

    struct dtr g = {sizeof gdt - 1, (uintptr_t)gdt};
    __asm__ __volatile__("lgdt %0" : : "m"(g) : "memory");
    __asm__ __volatile__("sgdt %0" : "=m"(d));
    EXPECT_EQ("sgdt limit after lgdt", d.limit, sizeof gdt - 1);
    EXPECT_EQ("sgdt base after lgdt", d.base, (uintptr_t)gdt);

    struct dtr i = {sizeof idt - 1, (uintptr_t)idt};
    __asm__ __volatile__("lidt %0" : : "m"(i) : "memory");
    __asm__ __volatile__("sidt %0" : "=m"(d));
    EXPECT_EQ("sidt limit after lidt", d.limit, sizeof idt - 1);
    EXPECT_EQ("sidt base after lidt", d.base, (uintptr_t)idt);

    uint64_t sel = 0xffff;
    __asm__ __volatile__("sldt %0" : "=r"(sel));
    EXPECT_EQ("LDTR at boot", sel, 0);
    __asm__ __volatile__("str %0" : "=r"(sel));
    EXPECT_EQ("TR at boot", sel, 0);
    __asm__ __volatile__("lldt %w0" : : "r"(0x20) : "memory");
    __asm__ __volatile__("ltr %w0" : : "r"(0x30) : "memory");
    __asm__ __volatile__("sldt %0" : "=r"(sel));
    EXPECT_EQ("sldt after lldt", sel, 0x20);
    uint16_t tr = 0;
    __asm__ __volatile__("str %0" : "=m"(tr));
    EXPECT_EQ("str to memory after ltr", tr, 0x30);
}

static void tour_segments(void)
{
    EXPECT_EQ("cs at boot", READ_SEG(cs), 0x33);
    EXPECT_EQ("ss at boot", READ_SEG(ss), 0x2b);
    EXPECT_EQ("ds at boot", READ_SEG(ds), 0);
    EXPECT_EQ("es at boot", READ_SEG(es), 0);
    EXPECT_EQ("fs at boot", READ_SEG(fs), 0);
    EXPECT_EQ("gs at boot", READ_SEG(gs), 0);
    WRITE_SEG(es, 0);
    EXPECT_EQ("es after loading null", READ_SEG(es), 0);
    WRITE_SEG(es, 0x18);
    EXPECT_EQ("es after loading 0x18", READ_SEG(es), 0x18);
    WRITE_SEG(fs, 0x18);
    EXPECT_EQ("fs after loading 0x18", READ_SEG(fs), 0x18);
    EXPECT_EQ("loading fs keeps FS_BASE", rdmsr(MSR_FS_BASE), (uintptr_t)fs_area);
    uint64_t v;
    __asm__ __volatile__("pushq %%fs; popq %0" : "=r"(v) : : "memory");
    EXPECT_EQ("push fs", v, 0x18);
    __asm__ __volatile__("pushq %0; popq %%fs" : : "r"((uint64_t)0) : "memory");
    EXPECT_EQ("pop fs", READ_SEG(fs), 0);
}

static void tour_ports(void)
{
    EXPECT_EQ("UART LSR (0x3fd)", inb(0x3fd), 0x60);
    EXPECT_EQ("UART IIR (0x3fa)", inb(0x3fa), 0x01);
    EXPECT_EQ("UART RBR (0x3f8, no input)", inb(0x3f8), 0);
    outb(0x3ff, 0x5a);
    EXPECT_EQ("UART SCR (0x3ff): writes ignored, reads 0", inb(0x3ff), 0);
    outb(0x3fb, 0x03);
    EXPECT_EQ("UART LCR (0x3fb): writes ignored, reads 0", inb(0x3fb), 0);
    EXPECT_EQ("UART LSR read as a word", inw(0x3fd), 0x0060);
    EXPECT_EQ("exit port reads 0", inb(0xf4), 0);
    EXPECT_EQ("unclaimed port, byte", inb(0x80), 0xff);
    EXPECT_EQ("unclaimed port, word", inw(0x80), 0xffff);
    EXPECT_EQ("unclaimed port, dword", inl(0x80), 0xffffffff);

    uint8_t two[2] = {0, 0};
    void *dst = two;
    unsigned long n = 2;
    __asm__ __volatile__("cld; rep insb" : "+D"(dst), "+c"(n) : "d"((uint16_t)0x3fd) : "memory");
    EXPECT_EQ("rep insb from LSR, first", two[0], 0x60);
    EXPECT_EQ("rep insb from LSR, second", two[1], 0x60);
    EXPECT_EQ("rep insb counts RCX down", n, 0);
    vsmp_printf("tour: port output through outb and rep outsb: ");
    vsmp_putc('o');
    vsmp_write("k\n", 2);
}

static volatile unsigned counter;
static volatile uint64_t word = 7;

static void tour_ordering(void)
{
    vsmp_mfence();
    __asm__ __volatile__("sfence; lfence" : : : "memory");
    __asm__ __volatile__("lock incl %0" : "+m"(counter));
    __asm__ __volatile__("lock; addl $2, %0" : "+m"(counter));
    EXPECT_EQ("lock inc and lock add", counter, 3);
    uint64_t old = 9;
    __asm__ __volatile__("xchgq %0, %1" : "+r"(old), "+m"(word) : : "memory");
    EXPECT_EQ("xchg returns the old value", old, 7);
    EXPECT_EQ("xchg stores the new value", word, 9);
    unsigned expected = 3;
    __asm__ __volatile__("lock cmpxchgl %2, %1" : "+a"(expected), "+m"(counter) : "r"(10u)
                         : "memory", "cc");
    EXPECT_EQ("lock cmpxchg", counter, 10);

    vsmp_spinlock_t lock = VSMP_SPINLOCK_INIT;
    vsmp_spin_lock(&lock);
    EXPECT("spinlock held", lock.locked == 1 && !vsmp_spin_trylock(&lock));
    vsmp_spin_unlock(&lock);
    EXPECT("spinlock free", vsmp_spin_trylock(&lock));
}

static void tour_maintenance(void)
{
    /* No effect on this platform, but each must be accepted. */
    static char page[64];
    __asm__ __volatile__("invlpg (%0)" : : "r"(page) : "memory");
    __asm__ __volatile__("wbinvd" : : : "memory");
    __asm__ __volatile__("monitor" : : "a"(page), "c"(0), "d"(0));
    __asm__ __volatile__("mwait" : : "a"(0), "c"(0) : "memory"); /* returns at once */
    checks++;

    /* xsetbv accepts the host's own XCR0 (read natively with xgetbv, which is not trapped). */
    if (cpuid(1, 0).ecx & (1u << 27)) {
        uint32_t lo, hi;
        __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        __asm__ __volatile__("xsetbv" : : "a"(lo), "d"(hi), "c"(0) : "memory");
        checks++;
    }
}

/* iretq and sysretq return to the next instruction at the same privilege, loading RFLAGS (the
 * virtual IF with it) and, for iretq, the CS and SS selectors from the frame. */
static void tour_returns(void)
{
    uint64_t no_if = flags() & ~(uint64_t)RFLAGS_IF;
    __asm__ __volatile__("movq %%rsp, %%rax\n\t"
                         "pushq %[ss]\n\t"
                         "pushq %%rax\n\t"
                         "pushq %[fl]\n\t"
                         "pushq %[cs]\n\t"
                         "leaq 1f(%%rip), %%rax\n\t"
                         "pushq %%rax\n\t"
                         "iretq\n"
                         "1:"
                         :
                         : [ss] "r"((uint64_t)0x18), [fl] "r"(no_if), [cs] "r"((uint64_t)0x10)
                         : "rax", "memory", "cc");
    EXPECT_EQ("iretq loads IF from the frame", flags() & RFLAGS_IF, 0);
    EXPECT_EQ("iretq loads CS", READ_SEG(cs), 0x10);
    EXPECT_EQ("iretq loads SS", READ_SEG(ss), 0x18);

    uint64_t with_if = flags() | RFLAGS_IF;
    __asm__ __volatile__("leaq 1f(%%rip), %%rcx\n\t"
                         "movq %0, %%r11\n\t"
                         "sysretq\n"
                         "1:"
                         :
                         : "r"(with_if)
                         : "rcx", "r11", "memory", "cc");
    EXPECT("sysretq loads IF from r11", flags() & RFLAGS_IF);
}

int main(void)
{
    unsigned id = vsmp_cpu_id(), count = vsmp_cpu_count();
    vsmp_printf("tour: vCPU %u of %u\n", id, count);
    tour_cpuid(id, count);
    tour_control_registers();
    tour_msrs(id);
    tour_flags();
    tour_descriptor_tables();
    tour_segments();
    tour_ports();
    tour_ordering();
    tour_maintenance();
    tour_returns();
    vsmp_printf("tour: all %u checks passed\n", checks);
    return 0;
}
