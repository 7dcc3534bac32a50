//! The guest platform's memory map, shared by the loader, the VM process, the guest runtime's
//! linker script and the docs (`docs/guest-platform.md`). Change it only together with them.
//!
//! Guest physical memory is one memfd of `--mem` bytes. In the VM process it is mapped at the
//! identical virtual address (guest-virtual == guest-physical while the guest has no paging),
//! except the first [`NULL_GUARD_END`] bytes, which stay unmapped so that null-pointer
//! accesses fault. Nothing else the guest could reach by accident is mapped in that range.

/// Guest-physical addresses below this are never mapped (a null-pointer guard; it is also
/// Linux's default `vm.mmap_min_addr`).
pub const NULL_GUARD_END: u64 = 0x1_0000;

/// Where guest images are linked: 1 MiB, as on a PC.
pub const IMAGE_BASE: u64 = 0x10_0000;

/// Default guest memory size (`--mem`).
pub const DEFAULT_MEM_BYTES: u64 = 64 << 20;

/// Smallest guest memory: the image area plus one boot stack.
pub const MIN_MEM_BYTES: u64 = 2 << 20;

/// Largest guest memory: RAM stays below the PC's 32-bit I/O hole, which holds the local APIC.
pub const MAX_MEM_BYTES: u64 = 0xC000_0000;

/// Guest-physical address of the local APIC page (never mapped: every access traps).
pub const APIC_BASE: u64 = 0xFEE0_0000;

/// Size of each vCPU's boot stack, carved downwards from the top of guest memory.
pub const BOOT_STACK_BYTES: u64 = 256 << 10;

/// The initial RSP of vCPU `vcpu`: the top of its boot stack, 16-byte aligned.
pub const fn boot_stack_top(mem_bytes: u64, vcpu: u32) -> u64 {
    (mem_bytes - vcpu as u64 * BOOT_STACK_BYTES) & !0xf
}

/// I/O port of the console, a 16550 UART (COM1).
pub const COM1_PORT: u16 = 0x3F8;

/// I/O port of the exit device (QEMU's isa-debug-exit address): the byte written is the
/// guest's exit status.
pub const EXIT_PORT: u16 = 0xF4;

/// I/O port of the vCPU-done device: the runtime writes `main`'s return value here when it
/// returns. It ends only that vCPU; the machine ends when every vCPU has, with the first
/// non-zero status in the machine's global order (else 0).
pub const DONE_PORT: u16 = 0xF5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_stacks_do_not_overlap_and_stay_aligned() {
        let mem = DEFAULT_MEM_BYTES;
        assert_eq!(boot_stack_top(mem, 0), mem);
        assert_eq!(boot_stack_top(mem, 1), mem - BOOT_STACK_BYTES);
        assert_eq!(boot_stack_top(mem, 3) % 16, 0);
    }

    #[test]
    fn the_image_lies_above_the_null_guard_and_ram_below_the_apic() {
        const { assert!(IMAGE_BASE >= NULL_GUARD_END) };
        const { assert!(MAX_MEM_BYTES <= APIC_BASE) };
    }
}
