//! The virtual CPU of this node: the processor state a user process cannot hold in real
//! registers, and the devices it reaches through port I/O.
//!
//! The guest's general registers, flags and FS/GS bases live in the real VM process (ptrace
//! registers, [`crate::platform::Regs`]); everything here is virtual: control and debug
//! registers, EFER and the other MSRs, the interrupt flag that `cli`/`sti`/`pushf`/`popf`
//! see, the descriptor-table registers and segment selectors, a snapshot of the host's CPUID
//! (and XCR0) taken once at creation, and the port bus. The initial values are those of
//! `docs/guest-platform.md`: a 64-bit kernel-mode CPU with paging on and interrupts enabled.
//!
//! A `Vcpu` belongs to the node's monitor thread; nothing else touches it, so there are no
//! locks. Creating one allocates (the console's box, iced-x86's decoder tables on first use);
//! emulating an instruction never does (`monitor/tests/no_alloc.rs` checks it).
#![forbid(unsafe_code)]

use std::io;

use crate::devices::{DeviceError, PortBus};
use crate::emulate::cpuid::HostCpuid;

/// CR0 at start: PG | ET | PE (paging on, protected mode, x87 present).
pub const INITIAL_CR0: u64 = 0x8000_0011;
/// CR4 at start: PAE (required by long mode).
pub const INITIAL_CR4: u64 = 0x20;
/// EFER at start: NXE | LMA | LME | SCE.
pub const INITIAL_EFER: u64 = 0xd01;
/// DR6 at start, its architectural reset value.
pub const INITIAL_DR6: u64 = 0xffff_0ff0;
/// DR7 at start, its architectural reset value.
pub const INITIAL_DR7: u64 = 0x400;
/// Virtual code segment selector at start: the host's 64-bit user code selector, which is
/// what a native `mov %cs` (not trapped) reads too.
pub const INITIAL_CS: u16 = 0x33;
/// Virtual stack segment selector at start: the host's user data selector, as for CS.
pub const INITIAL_SS: u16 = 0x2b;
/// IA32_APIC_BASE enable bit (bit 11).
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE bootstrap-processor bit (bit 8).
pub const APIC_BASE_BSP: u64 = 1 << 8;

/// What a vCPU is, fixed for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuConfig {
    /// This vCPU's index (its APIC id); 0 is the bootstrap processor.
    pub id: u32,
    /// Number of vCPUs in the virtual machine (nodes).
    pub count: u32,
}

/// Virtual control registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlRegs {
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// The task-priority register (4 bits).
    pub cr8: u64,
}

/// A descriptor-table register (GDTR or IDTR) as `lgdt`/`sgdt` move it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Virtual descriptor-table registers. Nothing reads the tables they point at yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTables {
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    /// LDTR selector.
    pub ldtr: u16,
    /// TR selector.
    pub tr: u16,
}

/// Virtual segment selectors, as moves to and from segment registers see them. The real
/// selectors of the VM process are the host's flat user selectors and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selectors {
    pub cs: u16,
    pub ss: u16,
    pub ds: u16,
    pub es: u16,
    pub fs: u16,
    pub gs: u16,
}

/// Virtual model-specific registers (EFER is in [`Vcpu::efer`]; FS_BASE and GS_BASE are the
/// real ones in the guest's registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernel_gs_base: u64,
    pub apic_base: u64,
    /// Added (wrapping) to the host TSC for reads of IA32_TIME_STAMP_COUNTER.
    pub tsc_offset: u64,
}

/// The virtual CPU.
#[derive(Debug)]
pub struct Vcpu {
    config: VcpuConfig,
    pub cr: ControlRegs,
    /// DR0..DR7 (DR4 and DR5 alias DR6 and DR7; their slots stay unused).
    pub dr: [u64; 8],
    pub efer: u64,
    pub msrs: Msrs,
    /// The guest's interrupt flag (RFLAGS.IF), which a user process cannot own for real.
    pub interrupt_flag: bool,
    pub tables: DescriptorTables,
    pub selectors: Selectors,
    /// The address the last `monitor` armed (nothing wakes on it yet).
    pub monitor_address: u64,
    pub(crate) cpuid: HostCpuid,
    pub(crate) ports: PortBus,
}

impl Vcpu {
    /// A vCPU in its start-up state whose console UART writes to `console`.
    ///
    /// Takes the host CPUID snapshot and builds the decoder's tables
    /// ([`crate::emulate::warm_up`]), so the first trap allocates nothing either. Panics if `cfg.id >= cfg.count` (a monitor bug).
    pub fn new(cfg: VcpuConfig, console: Box<dyn io::Write + Send>) -> Vcpu {
        assert!(
            cfg.id < cfg.count,
            "vCPU id {} out of range for {} vCPUs",
            cfg.id,
            cfg.count
        );
        let bsp = if cfg.id == 0 { APIC_BASE_BSP } else { 0 };
        crate::emulate::warm_up();
        Vcpu {
            config: cfg,
            cr: ControlRegs {
                cr0: INITIAL_CR0,
                cr2: 0,
                cr3: 0,
                cr4: INITIAL_CR4,
                cr8: 0,
            },
            dr: [0, 0, 0, 0, 0, 0, INITIAL_DR6, INITIAL_DR7],
            efer: INITIAL_EFER,
            msrs: Msrs {
                star: 0,
                lstar: 0,
                cstar: 0,
                fmask: 0,
                kernel_gs_base: 0,
                apic_base: crate::layout::APIC_BASE | APIC_BASE_ENABLE | bsp,
                tsc_offset: 0,
            },
            interrupt_flag: true,
            tables: DescriptorTables::default(),
            selectors: Selectors {
                cs: INITIAL_CS,
                ss: INITIAL_SS,
                ds: 0,
                es: 0,
                fs: 0,
                gs: 0,
            },
            monitor_address: 0,
            cpuid: HostCpuid::snapshot(),
            ports: PortBus::new(console),
        }
    }

    /// This vCPU's configuration.
    pub fn config(&self) -> VcpuConfig {
        self.config
    }

    /// This vCPU's index (APIC id).
    pub fn id(&self) -> u32 {
        self.config.id
    }

    /// Number of vCPUs in the machine.
    pub fn count(&self) -> u32 {
        self.config.count
    }

    /// Whether the virtual interrupt flag is set (`sti`, `popf`).
    pub fn interrupts_enabled(&self) -> bool {
        self.interrupt_flag
    }

    /// Writes out console output the UART still buffers. Call it when the guest stops for
    /// good; dropping the vCPU does it too, but cannot report a failure.
    pub fn flush(&mut self) -> Result<(), DeviceError> {
        self.ports.flush()
    }

    /// The port-I/O bus, for callers outside the trap path (tests, diagnostics).
    pub fn ports(&mut self) -> &mut PortBus {
        &mut self.ports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_0_is_the_bootstrap_processor_and_others_are_not() {
        let v0 = Vcpu::new(VcpuConfig { id: 0, count: 2 }, Box::new(io::sink()));
        let v1 = Vcpu::new(VcpuConfig { id: 1, count: 2 }, Box::new(io::sink()));
        assert_eq!(v0.msrs.apic_base, 0xfee0_0900);
        assert_eq!(v1.msrs.apic_base, 0xfee0_0800);
    }

    #[test]
    fn a_new_vcpu_is_in_64_bit_mode_with_interrupts_on() {
        let v = Vcpu::new(VcpuConfig { id: 0, count: 1 }, Box::new(io::sink()));
        assert_eq!((v.cr.cr0, v.cr.cr4, v.efer), (0x8000_0011, 0x20, 0xd01));
        assert_eq!(
            (v.dr[6], v.dr[7], v.tables),
            (0xffff_0ff0, 0x400, DescriptorTables::default())
        );
        assert!(v.interrupts_enabled());
    }
}
