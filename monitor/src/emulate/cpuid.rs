//! `cpuid`: what the guest learns about its processor.
//!
//! The guest runs natively on the host CPU, so most feature bits must be the host's: the
//! monitor reads the host's leaves once, when the vCPU is created ([`HostCpuid::snapshot`]),
//! and never executes host `cpuid` on the trap path. On top of that snapshot:
//!
//! | leaf | value |
//! |------|-------|
//! | 0 | max basic leaf = min(host, 0xd); vendor string of the host |
//! | 1 | EAX, EBX[15:0], ECX, EDX from the host, except: EBX[23:16] = vCPU count, EBX[31:24] = vCPU id (initial APIC id); ECX: hypervisor (31) set, VMX (5), SMX (6), x2APIC (21), TSC-deadline (24) clear, OSXSAVE (27) = virtual CR4.OSXSAVE; EDX: APIC (9) and HTT (28) set |
//! | 2, 5, 6, 7, 8, 9, 0xc, 0xd | host (subleaves of 7 below 4 and of 0xd below 64) |
//! | 3, 0xa | zero (no serial number, no performance counters) |
//! | 4 | host cache descriptions (subleaves below 8), EAX[31:26] = vCPU count - 1, EAX[25:14] = 0: every vCPU has caches of its own (it is a node) |
//! | 0xb | x2APIC topology: subleaf 0 = SMT level (1 thread), 1 = core level (vCPU count cores, APIC-id shift = ceil(log2 count)), others invalid; EDX = vCPU id |
//! | 0x4000_0000 | EAX = 0x4000_0001 (max hypervisor leaf), EBX, ECX, EDX = `"vsmpvsmpvsmp"` |
//! | 0x4000_0001 | EAX = vCPU count, EBX = vCPU id, ECX = EDX = 0 |
//! | 0x8000_0000 | EAX = min(host, 0x8000_0008), EBX..EDX from the host |
//! | 0x8000_0001..=0x8000_0008 | host, except 0x8000_0001 ECX bit 2 (SVM) clear and 0x8000_0008 ECX = vCPU count - 1 |
//! | anything else | zero |
#![forbid(unsafe_code)]

use core::arch::x86_64::__cpuid_count;

use super::{EmulateError, Outcome};
use crate::platform::Platform;
use crate::vcpu::Vcpu;

/// Highest basic leaf the guest sees (at most; less if the host has fewer).
pub const MAX_BASIC_LEAF: u32 = 0xd;
/// Highest extended leaf the guest sees (at most).
pub const MAX_EXTENDED_LEAF: u32 = 0x8000_0008;
/// Highest hypervisor leaf.
pub const MAX_HYPERVISOR_LEAF: u32 = 0x4000_0001;
/// The hypervisor signature in leaf 0x4000_0000 (EBX, ECX, EDX).
pub const HYPERVISOR_SIGNATURE: &[u8; 12] = b"vsmpvsmpvsmp";

const LEAF4_SUBLEAVES: usize = 8;
const LEAF7_SUBLEAVES: usize = 4;
const LEAF_D_SUBLEAVES: usize = 64;
const CR4_OSXSAVE: u64 = 1 << 18;

/// The four registers `cpuid` returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidRegs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

fn host(leaf: u32, sub: u32) -> CpuidRegs {
    let r = __cpuid_count(leaf, sub);
    CpuidRegs {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// The host's CPUID leaves the guest may see, read once.
#[derive(Debug, Clone)]
pub struct HostCpuid {
    /// Leaves 0..=MAX_BASIC_LEAF, subleaf 0 (zero beyond the host's max).
    basic: [CpuidRegs; MAX_BASIC_LEAF as usize + 1],
    leaf4: [CpuidRegs; LEAF4_SUBLEAVES],
    leaf7: [CpuidRegs; LEAF7_SUBLEAVES],
    leaf_d: [CpuidRegs; LEAF_D_SUBLEAVES],
    /// Leaves 0x8000_0000..=MAX_EXTENDED_LEAF (zero beyond the host's max).
    extended: [CpuidRegs; (MAX_EXTENDED_LEAF - 0x8000_0000) as usize + 1],
}

impl HostCpuid {
    /// Reads the host's leaves.
    pub fn snapshot() -> HostCpuid {
        let host_max = host(0, 0).eax;
        let host_max_ext = host(0x8000_0000, 0).eax;
        let basic_leaf = |leaf: u32, sub: u32| {
            if leaf <= host_max {
                host(leaf, sub)
            } else {
                CpuidRegs::default()
            }
        };
        let mut s = HostCpuid {
            basic: [CpuidRegs::default(); MAX_BASIC_LEAF as usize + 1],
            leaf4: [CpuidRegs::default(); LEAF4_SUBLEAVES],
            leaf7: [CpuidRegs::default(); LEAF7_SUBLEAVES],
            leaf_d: [CpuidRegs::default(); LEAF_D_SUBLEAVES],
            extended: [CpuidRegs::default(); (MAX_EXTENDED_LEAF - 0x8000_0000) as usize + 1],
        };
        for (leaf, slot) in (0u32..).zip(s.basic.iter_mut()) {
            *slot = basic_leaf(leaf, 0);
        }
        for (sub, slot) in (0u32..).zip(s.leaf4.iter_mut()) {
            *slot = basic_leaf(4, sub);
        }
        for (sub, slot) in (0u32..).zip(s.leaf7.iter_mut()) {
            *slot = basic_leaf(7, sub);
        }
        for (sub, slot) in (0u32..).zip(s.leaf_d.iter_mut()) {
            *slot = basic_leaf(0xd, sub);
        }
        for (leaf, slot) in (0x8000_0000u32..).zip(s.extended.iter_mut()) {
            if leaf <= host_max_ext {
                *slot = host(leaf, 0);
            }
        }
        s
    }

    /// The XCR0 bits the host supports (leaf 0xd subleaf 0), or 0 without XSAVE.
    pub fn xcr0_supported(&self) -> u64 {
        if self.basic[1].ecx & (1 << 26) == 0 {
            return 0;
        }
        (u64::from(self.leaf_d[0].edx) << 32) | u64::from(self.leaf_d[0].eax)
    }

    fn max_basic(&self) -> u32 {
        self.basic[0].eax.min(MAX_BASIC_LEAF)
    }

    fn max_extended(&self) -> u32 {
        let max = self.extended[0].eax;
        if max < 0x8000_0000 {
            0
        } else {
            max.min(MAX_EXTENDED_LEAF)
        }
    }
}

fn sig_word(i: usize) -> u32 {
    let b = HYPERVISOR_SIGNATURE;
    u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

/// ceil(log2(n)) for n >= 1.
fn ceil_log2(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// What `cpuid` returns on `vcpu` for `leaf`/`sub` (see the module table).
pub fn leaf(vcpu: &Vcpu, leaf: u32, sub: u32) -> CpuidRegs {
    let h = &vcpu.cpuid;
    let id = vcpu.id();
    let count = vcpu.count();
    let zero = CpuidRegs::default();
    let get = |table: &[CpuidRegs], i: u32| table.get(i as usize).copied().unwrap_or_default();
    match leaf {
        0 => CpuidRegs {
            eax: h.max_basic(),
            ..h.basic[0]
        },
        l if l <= h.max_basic() => match l {
            1 => {
                let r = h.basic[1];
                let ebx = (r.ebx & 0xffff) | (count.min(0xff) << 16) | ((id & 0xff) << 24);
                let clear = (1 << 5) | (1 << 6) | (1 << 21) | (1 << 24) | (1 << 27);
                let osxsave = if vcpu.cr.cr4 & CR4_OSXSAVE != 0 {
                    1 << 27
                } else {
                    0
                };
                let ecx = (r.ecx & !clear) | (1 << 31) | osxsave;
                let edx = r.edx | (1 << 9) | (1 << 28);
                CpuidRegs {
                    eax: r.eax,
                    ebx,
                    ecx,
                    edx,
                }
            }
            3 | 0xa => zero,
            4 => {
                let mut r = get(&h.leaf4, sub);
                if r.eax & 0x1f != 0 {
                    r.eax = (r.eax & 0x3fff) | ((count - 1).min(63) << 26);
                }
                r
            }
            7 => get(&h.leaf7, sub),
            0xb => match sub {
                0 => CpuidRegs {
                    eax: 0,
                    ebx: 1,
                    ecx: 1 << 8,
                    edx: id,
                },
                1 => CpuidRegs {
                    eax: ceil_log2(count),
                    ebx: count.min(0xffff),
                    ecx: 1 | (2 << 8),
                    edx: id,
                },
                _ => CpuidRegs {
                    eax: 0,
                    ebx: 0,
                    ecx: sub & 0xff,
                    edx: id,
                },
            },
            0xd => get(&h.leaf_d, sub),
            _ => h.basic[l as usize],
        },
        0x4000_0000 => CpuidRegs {
            eax: MAX_HYPERVISOR_LEAF,
            ebx: sig_word(0),
            ecx: sig_word(1),
            edx: sig_word(2),
        },
        0x4000_0001 => CpuidRegs {
            eax: count,
            ebx: id,
            ecx: 0,
            edx: 0,
        },
        0x8000_0000 if h.max_extended() != 0 => CpuidRegs {
            eax: h.max_extended(),
            ..h.extended[0]
        },
        l if (0x8000_0001..=h.max_extended()).contains(&l) => {
            let mut r = h.extended[(l - 0x8000_0000) as usize];
            match l {
                0x8000_0001 => r.ecx &= !(1 << 2),
                0x8000_0008 => r.ecx = (count - 1) & 0xff,
                _ => {}
            }
            r
        }
        _ => zero,
    }
}

/// `cpuid`: EAX = leaf, ECX = subleaf; the results zero-extend into RAX, RBX, RCX, RDX.
pub(crate) fn emulate(vcpu: &mut Vcpu, p: &mut impl Platform) -> Result<Outcome, EmulateError> {
    let regs = p.regs();
    let r = leaf(vcpu, regs.rax as u32, regs.rcx as u32);
    regs.rax = r.eax.into();
    regs.rbx = r.ebx.into();
    regs.rcx = r.ecx.into();
    regs.rdx = r.edx.into();
    Ok(Outcome::Resume)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::test_util::*;
    use crate::vcpu::VcpuConfig;

    const CPUID: [u8; 2] = [0x0f, 0xa2];

    fn cpuid_on(vcpu: &mut Vcpu, leaf: u32, sub: u32) -> CpuidRegs {
        let mut p = platform(&CPUID);
        p.regs.rax = 0xffff_ffff_0000_0000 | u64::from(leaf);
        p.regs.rcx = u64::from(sub);
        p.regs.rbx = u64::MAX;
        run_ok(vcpu, &mut p, CPUID.len());
        for r in [p.regs.rax, p.regs.rbx, p.regs.rcx, p.regs.rdx] {
            assert_eq!(r >> 32, 0, "cpuid results must zero-extend");
        }
        CpuidRegs {
            eax: p.regs.rax as u32,
            ebx: p.regs.rbx as u32,
            ecx: p.regs.rcx as u32,
            edx: p.regs.rdx as u32,
        }
    }

    #[test]
    fn cpuid_leaf_1_reports_vcpu_id_and_count() {
        let mut vcpu = Vcpu::new(VcpuConfig { id: 2, count: 4 }, Box::new(std::io::sink()));
        let r = cpuid_on(&mut vcpu, 1, 0);
        assert_eq!(r.ebx >> 24, 2, "initial APIC id");
        assert_eq!((r.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_ne!(r.ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(r.ecx & (1 << 21), 0, "no x2APIC");
        assert_ne!(r.edx & (1 << 9), 0, "APIC present");
    }

    #[test]
    fn cpuid_leaf_1_osxsave_follows_the_virtual_cr4() {
        let mut vcpu = vcpu();
        assert_eq!(cpuid_on(&mut vcpu, 1, 0).ecx & (1 << 27), 0);
        vcpu.cr.cr4 |= CR4_OSXSAVE;
        assert_ne!(cpuid_on(&mut vcpu, 1, 0).ecx & (1 << 27), 0);
    }

    #[test]
    fn cpuid_leaf_0_reports_the_host_vendor_and_a_capped_max_leaf() {
        let mut vcpu = vcpu();
        let r = cpuid_on(&mut vcpu, 0, 0);
        let h = host(0, 0);
        assert_eq!((r.ebx, r.edx, r.ecx), (h.ebx, h.edx, h.ecx));
        assert_eq!(r.eax, h.eax.min(MAX_BASIC_LEAF));
    }

    #[test]
    fn cpuid_hypervisor_leaves_give_the_signature_and_the_vcpu_count_and_id() {
        let mut vcpu = Vcpu::new(VcpuConfig { id: 1, count: 3 }, Box::new(std::io::sink()));
        let r = cpuid_on(&mut vcpu, 0x4000_0000, 0);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&r.edx.to_le_bytes());
        assert_eq!((&sig, r.eax), (HYPERVISOR_SIGNATURE, 0x4000_0001));
        let r = cpuid_on(&mut vcpu, 0x4000_0001, 0);
        assert_eq!((r.eax, r.ebx), (3, 1));
    }

    #[test]
    fn cpuid_leaf_0xb_describes_one_thread_per_core_and_count_cores() {
        let mut vcpu = Vcpu::new(VcpuConfig { id: 5, count: 6 }, Box::new(std::io::sink()));
        if leaf(&vcpu, 0, 0).eax < 0xb {
            eprintln!("SKIPPED cpuid_leaf_0xb check: the host's max basic leaf is below 0xb");
            return;
        }
        let smt = cpuid_on(&mut vcpu, 0xb, 0);
        let core = cpuid_on(&mut vcpu, 0xb, 1);
        let end = cpuid_on(&mut vcpu, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
    }

    #[test]
    fn cpuid_of_an_unknown_leaf_is_all_zero() {
        let mut vcpu = vcpu();
        assert_eq!(cpuid_on(&mut vcpu, 0x1234_5678, 0), CpuidRegs::default());
        assert_eq!(cpuid_on(&mut vcpu, 0xa, 0), CpuidRegs::default());
    }

    #[test]
    fn ceil_log2_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(ceil_log2), [0, 1, 2, 2, 3, 3, 4]);
    }
}
