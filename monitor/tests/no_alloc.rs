//! Proves the trap path allocates nothing: a counting global allocator watches
//! `handle_trap` for a set of instructions (and for errors, which must not allocate until
//! they are displayed).
//!
//! Only allocations made by the test's own thread while the counter is armed are counted, so
//! the test harness's threads do not disturb it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use vsmp_monitor::emulate::{Outcome, Trap, handle_trap};
use vsmp_monitor::layout::{COM1_PORT, EXIT_PORT};
use vsmp_monitor::platform::mock::MockPlatform;
use vsmp_monitor::vcpu::{Vcpu, VcpuConfig};

struct CountingAllocator;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    // `try_with`: the thread-local may already be gone while a thread shuts down.
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

// SAFETY: every method forwards to `System` with the arguments it was given, so `System`'s
// guarantees hold unchanged; the counting touches only const-initialised thread-locals, which
// never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` via `alloc`/`realloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: `ptr` came from `System` with `layout`; forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Allocations made by `f` on this thread.
fn allocations_during(f: impl FnOnce()) -> u64 {
    COUNT.with(|c| c.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    COUNT.with(|c| c.get())
}

const CODE: u64 = 0x10_0000;
const DATA: u64 = CODE + 0x8000;
const MEM: usize = 0x1_0000;

fn setup(code: &[u8]) -> MockPlatform {
    let mut p = MockPlatform::with_code(CODE, MEM, code);
    p.regs.rsp = CODE + MEM as u64 - 0x100;
    p.regs.eflags = 0x202;
    p
}

#[test]
fn the_trap_path_does_not_allocate() {
    // (name, code, setup of registers)
    type Setup = fn(&mut MockPlatform);
    let cases: [(&str, &[u8], Setup); 12] = [
        ("cpuid leaf 1", &[0x0f, 0xa2], |p| p.regs.rax = 1),
        ("cpuid hypervisor leaf", &[0x0f, 0xa2], |p| {
            p.regs.rax = 0x4000_0001
        }),
        ("rdmsr tsc", &[0x0f, 0x32], |p| p.regs.rcx = 0x10),
        ("wrmsr lstar", &[0x0f, 0x30], |p| p.regs.rcx = 0xc000_0082),
        ("mov %rax,%cr3", &[0x0f, 0x22, 0xd8], |_| {}),
        ("pushfq", &[0x9c], |_| {}),
        ("popfq", &[0x9d], |p| p.regs.rsp = DATA),
        ("lgdt (%rax)", &[0x0f, 0x01, 0x10], |p| p.regs.rax = DATA),
        ("out %al,(%dx) to the uart", &[0xee], |p| {
            p.regs.rdx = COM1_PORT.into();
            p.regs.rax = u64::from(b'x');
        }),
        ("rep outsb to the uart", &[0xf3, 0x6e], |p| {
            p.regs.rdx = COM1_PORT.into();
            p.regs.rsi = DATA;
            p.regs.rcx = 100;
        }),
        ("in from an unknown port", &[0xec], |p| p.regs.rdx = 0x80),
        ("mfence", &[0x0f, 0xae, 0xf0], |_| {}),
    ];
    let mut vcpu = Vcpu::new(VcpuConfig { id: 0, count: 1 }, Box::new(std::io::sink()));
    for (name, code, prepare) in cases {
        let mut p = setup(code);
        prepare(&mut p);
        let mut result = None;
        let n = allocations_during(|| {
            result = Some(handle_trap(&mut vcpu, &mut p, Trap::Marker { insn: CODE }))
        });
        let emulated = result.unwrap().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_ne!(emulated.outcome, Outcome::Exit { status: 0 }, "{name}");
        assert_eq!(n, 0, "{name} allocated {n} times on the trap path");
    }
}

#[test]
fn errors_on_the_trap_path_do_not_allocate_until_displayed() {
    let mut vcpu = Vcpu::new(VcpuConfig { id: 0, count: 1 }, Box::new(std::io::sink()));
    let cases: [(&str, &[u8], u64); 4] = [
        ("unknown msr", &[0x0f, 0x32], 0x1a0),
        ("undecodable", &[0x0f, 0x04], 0),
        ("operand fault", &[0x0f, 0x01, 0x10], 0xdead_0000),
        ("not sensitive", &[0x48, 0x89, 0xc3], 0),
    ];
    for (name, code, reg) in cases {
        let mut p = setup(code);
        p.regs.rcx = reg;
        p.regs.rax = reg;
        let mut result = None;
        let n = allocations_during(|| {
            result = Some(handle_trap(&mut vcpu, &mut p, Trap::Marker { insn: CODE }))
        });
        let err = result.unwrap().expect_err(name);
        assert_eq!(n, 0, "{name}: building the error allocated {n} times");
        assert!(
            err.to_string().contains("guest rip 0x100000"),
            "{name}: {err}"
        );
    }
}

#[test]
fn the_exit_port_does_not_allocate() {
    let mut vcpu = Vcpu::new(VcpuConfig { id: 0, count: 1 }, Box::new(std::io::sink()));
    let mut p = setup(&[0xe6, EXIT_PORT as u8]);
    p.regs.rax = 3;
    let mut result = None;
    let n = allocations_during(|| {
        result = Some(handle_trap(&mut vcpu, &mut p, Trap::Fault { insn: CODE }))
    });
    assert_eq!(
        result.unwrap().unwrap().outcome,
        Outcome::Exit { status: 3 }
    );
    assert_eq!(n, 0);
}

#[test]
fn the_write_fault_path_does_not_allocate() {
    use vsmp_affinity::Placement;
    use vsmp_monitor::emulate::footprint::written_memory;
    use vsmp_monitor::layout::IMAGE_BASE;
    use vsmp_monitor::marker::Marker;
    use vsmp_monitor::platform::Regs;
    use vsmp_monitor::vm::elf::GuestImage;
    use vsmp_monitor::vm::memory::{GuestMemory, MemSize};
    use vsmp_monitor::vm::process::spawn_stopped;
    use vsmp_monitor::vm::protect::{Choice, Mechanism, Protector};

    let memory = GuestMemory::new(MemSize::new(4 << 20).unwrap()).unwrap();
    GuestImage::flat(&[0x0f, 0x0b], Marker::Ud2)
        .load_into(&memory)
        .unwrap();
    let mut tracee = spawn_stopped(&memory, IMAGE_BASE, Placement::Unpinned, 0, 1).unwrap();
    let mut protector = Protector::attach(
        Choice::Only(Mechanism::Uffd),
        &mut tracee,
        memory.ram_start(),
        memory.ram_end(),
    )
    .unwrap();
    let mut factory = iced_x86::InstructionInfoFactory::new();
    let regs = Regs {
        rbx: 0x20_0ffc,
        ..Regs::default()
    };
    let store = [0x48, 0x89, 0x03]; // mov %rax,(%rbx): across a page boundary
    // Warm up once: the decoder's and the protector's first use.
    let _ = written_memory(&store, IMAGE_BASE, &regs, &mut factory);
    protector.set(0x200, true);
    protector.apply(&mut tracee).unwrap();
    protector.set(0x200, false);
    protector.apply(&mut tracee).unwrap();
    let n = allocations_during(|| {
        for _ in 0..100 {
            let w = written_memory(&store, IMAGE_BASE, &regs, &mut factory).unwrap();
            assert_eq!(w.iter().next(), Some((0x20_0ffc, 8)));
            for page in [0x200, 0x201] {
                assert!(protector.is_write_fault(nix::sys::signal::Signal::SIGBUS, 2, page << 12));
                protector.set(page as u32, true);
            }
            protector.apply(&mut tracee).unwrap();
            protector.set(0x200, false);
            protector.set(0x201, false);
            protector.apply(&mut tracee).unwrap();
        }
    });
    assert_eq!(n, 0, "the write fault path allocated {n} times");
    assert_eq!(protector.counters().operations, 1 + 2 + 200);
}
