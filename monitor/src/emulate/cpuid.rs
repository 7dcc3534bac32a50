//! `cpuid`: what the guest learns about its processor, exactly as `docs/guest-platform.md`
//! (section CPUID) defines it. ECX (the sub-leaf) is ignored by every leaf.
//!
//! The guest runs natively on the host CPU, so some bits must be the host's: the monitor reads
//! the host's leaves 0, 1 and 0x8000_0001 (and XCR0, for `xsetbv`) once, when the vCPU is
//! created ([`HostCpuid::snapshot`]), and never executes host `cpuid` on the trap path.
//!
//! | leaf | EAX | EBX | ECX | EDX |
//! |------|-----|-----|-----|-----|
//! | 0 | 1 (highest basic leaf) | host vendor | host vendor | host vendor |
//! | 1 | host | 31:24 vCPU id, 23:16 vCPU count, 15:0 host | host, bit 31 (hypervisor) set, bits 3 (MONITOR), 5 (VMX), 21 (x2APIC) clear | host, bits 9 (APIC) and 28 (HTT) set |
//! | 0x4000_0000 | 0x4000_0001 | "vsmp" | "vsmp" | "vsmp" |
//! | 0x4000_0001 | vCPU count | vCPU id | 0 | 0 |
//! | 0x8000_0000 | 0x8000_0001 | 0 | 0 | 0 |
//! | 0x8000_0001 | 0 | 0 | host | host |
//! | anything else | 0 | 0 | 0 | 0 |
#![forbid(unsafe_code)]

use core::arch::x86_64::__cpuid_count;

use super::{EmulateError, Outcome, sys};
use crate::platform::Platform;
use crate::vcpu::Vcpu;

/// Highest basic leaf the guest sees.
pub const MAX_BASIC_LEAF: u32 = 0x1;
/// Highest hypervisor leaf.
pub const MAX_HYPERVISOR_LEAF: u32 = 0x4000_0001;
/// Highest extended leaf the guest sees.
pub const MAX_EXTENDED_LEAF: u32 = 0x8000_0001;
/// The hypervisor signature in leaf 0x4000_0000 (EBX, ECX, EDX): "vsmp" three times.
pub const HYPERVISOR_SIGNATURE: u32 = u32::from_le_bytes(*b"vsmp");

/// Leaf 1 ECX bits the guest does not get: MONITOR (3), VMX (5), x2APIC (21).
const LEAF1_ECX_CLEAR: u32 = (1 << 3) | (1 << 5) | (1 << 21);
/// Leaf 1 ECX bit set for the guest: a hypervisor is present.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bits set for the guest: APIC (9), HTT (28, so EBX[23:16] is meaningful).
const LEAF1_EDX_SET: u32 = (1 << 9) | (1 << 28);
/// Leaf 1 ECX bit: the OS enabled XSAVE (the host did, if set).
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;

/// The four registers `cpuid` returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidRegs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

fn host(leaf: u32) -> CpuidRegs {
    let r = __cpuid_count(leaf, 0);
    CpuidRegs {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// The host values the guest's CPUID is built from, read once.
#[derive(Debug, Clone, Copy)]
pub struct HostCpuid {
    leaf0: CpuidRegs,
    leaf1: CpuidRegs,
    ext1: CpuidRegs,
    /// The host's XCR0, or `None` if the host OS has not enabled XSAVE.
    xcr0: Option<u64>,
}

impl HostCpuid {
    /// Reads the host's leaves 0, 1, 0x8000_0001 and XCR0.
    pub fn snapshot() -> HostCpuid {
        let leaf0 = host(0);
        let leaf1 = if leaf0.eax >= 1 {
            host(1)
        } else {
            CpuidRegs::default()
        };
        let ext1 = if host(0x8000_0000).eax >= 0x8000_0001 {
            host(0x8000_0001)
        } else {
            CpuidRegs::default()
        };
        let xcr0 = (leaf1.ecx & LEAF1_ECX_OSXSAVE != 0).then(sys::host_xcr0_with_osxsave);
        HostCpuid {
            leaf0,
            leaf1,
            ext1,
            xcr0,
        }
    }

    /// The host's XCR0, if the host OS enabled XSAVE.
    pub fn xcr0(&self) -> Option<u64> {
        self.xcr0
    }
}

/// What `cpuid` returns on `vcpu` for `leaf` (see the module table).
pub fn leaf(vcpu: &Vcpu, leaf: u32) -> CpuidRegs {
    let h = &vcpu.cpuid;
    let (id, count) = (vcpu.id(), vcpu.count());
    match leaf {
        0 => CpuidRegs {
            eax: MAX_BASIC_LEAF,
            ..h.leaf0
        },
        1 => CpuidRegs {
            eax: h.leaf1.eax,
            ebx: ((id & 0xff) << 24) | (count.min(0xff) << 16) | (h.leaf1.ebx & 0xffff),
            ecx: (h.leaf1.ecx & !LEAF1_ECX_CLEAR) | LEAF1_ECX_HYPERVISOR,
            edx: h.leaf1.edx | LEAF1_EDX_SET,
        },
        0x4000_0000 => CpuidRegs {
            eax: MAX_HYPERVISOR_LEAF,
            ebx: HYPERVISOR_SIGNATURE,
            ecx: HYPERVISOR_SIGNATURE,
            edx: HYPERVISOR_SIGNATURE,
        },
        0x4000_0001 => CpuidRegs {
            eax: count,
            ebx: id,
            ecx: 0,
            edx: 0,
        },
        0x8000_0000 => CpuidRegs {
            eax: MAX_EXTENDED_LEAF,
            ..CpuidRegs::default()
        },
        0x8000_0001 => CpuidRegs {
            eax: 0,
            ebx: 0,
            ecx: h.ext1.ecx,
            edx: h.ext1.edx,
        },
        _ => CpuidRegs::default(),
    }
}

/// `cpuid`: EAX = leaf; the results zero-extend into RAX, RBX, RCX, RDX.
pub(crate) fn emulate(vcpu: &mut Vcpu, p: &mut impl Platform) -> Result<Outcome, EmulateError> {
    let regs = p.regs();
    let r = leaf(vcpu, regs.rax as u32);
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
        p.regs.rdx = u64::MAX;
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
        let h = host(1);
        assert_eq!(r.ebx >> 24, 2, "initial APIC id");
        assert_eq!((r.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_eq!(r.ebx & 0xffff, h.ebx & 0xffff);
        assert_eq!(r.eax, h.eax);
        assert_eq!(
            r.ecx,
            (h.ecx & !0x20_0028) | 0x8000_0000,
            "hypervisor set; monitor, vmx, x2apic clear"
        );
        assert_eq!(r.edx, h.edx | 0x1000_0200, "apic and htt set");
    }

    #[test]
    fn cpuid_leaf_0_reports_the_host_vendor_and_max_leaf_1() {
        let mut vcpu = vcpu();
        let r = cpuid_on(&mut vcpu, 0, 0);
        let h = host(0);
        assert_eq!((r.eax, r.ebx, r.edx, r.ecx), (1, h.ebx, h.edx, h.ecx));
    }

    #[test]
    fn cpuid_hypervisor_leaves_give_the_signature_and_the_vcpu_count_and_id() {
        let mut vcpu = Vcpu::new(VcpuConfig { id: 1, count: 3 }, Box::new(std::io::sink()));
        let r = cpuid_on(&mut vcpu, 0x4000_0000, 0);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&r.edx.to_le_bytes());
        assert_eq!((&sig, r.eax), (b"vsmpvsmpvsmp", 0x4000_0001));
        assert_eq!(
            cpuid_on(&mut vcpu, 0x4000_0001, 0),
            CpuidRegs {
                eax: 3,
                ebx: 1,
                ecx: 0,
                edx: 0
            }
        );
    }

    #[test]
    fn cpuid_extended_leaves_stop_at_0x8000_0001_with_the_host_feature_bits() {
        let mut vcpu = vcpu();
        assert_eq!(
            cpuid_on(&mut vcpu, 0x8000_0000, 0),
            CpuidRegs {
                eax: 0x8000_0001,
                ..CpuidRegs::default()
            }
        );
        let r = cpuid_on(&mut vcpu, 0x8000_0001, 0);
        let h = host(0x8000_0001);
        assert_eq!(
            r,
            CpuidRegs {
                eax: 0,
                ebx: 0,
                ecx: h.ecx,
                edx: h.edx
            }
        );
        assert_ne!(r.edx & (1 << 29), 0, "a 64-bit host reports long mode");
    }

    #[test]
    fn cpuid_ignores_the_subleaf() {
        let mut vcpu = vcpu();
        assert_eq!(cpuid_on(&mut vcpu, 1, 0), cpuid_on(&mut vcpu, 1, 7));
    }

    #[test]
    fn cpuid_of_any_other_leaf_is_all_zero() {
        let mut vcpu = vcpu();
        for l in [
            2,
            4,
            7,
            0xb,
            0xd,
            0x4000_0002,
            0x8000_0002,
            0x8000_0008,
            0x1234_5678,
        ] {
            assert_eq!(
                cpuid_on(&mut vcpu, l, 0),
                CpuidRegs::default(),
                "leaf {l:#x}"
            );
        }
    }
}
