//! `rdmsr` and `wrmsr`: the vCPU's model-specific registers, as `docs/guest-platform.md`
//! (section MSRs) defines them. ECX names the MSR; the value is EDX:EAX (a read zero-extends
//! both into RDX and RAX).
//!
//! | MSR | behaviour |
//! |-----|-----------|
//! | IA32_TIME_STAMP_COUNTER (0x10) | read: host TSC + offset; write: sets the offset so that a read now returns the value written. `rdtsc` itself is unprivileged and not trapped: it keeps returning the host TSC |
//! | IA32_APIC_BASE (0x1b) | 0xfee00900 on vCPU 0 (BSP, enabled), 0xfee00800 on the others; writing the current value changes nothing, any other value is refused (the APIC cannot move or be disabled) |
//! | IA32_EFER (0xc0000080) | SCE (0) and NXE (11) are stored; LME (8) and LMA (10) must be written as 1; other bits refused |
//! | STAR (0xc0000081), FMASK (0xc0000084) | stored (FMASK's upper 32 bits must be zero) |
//! | LSTAR (0xc0000082), CSTAR (0xc0000083), KERNEL_GS_BASE (0xc0000102) | stored; must be canonical |
//! | FS_BASE (0xc0000100), GS_BASE (0xc0000101) | the real bases in the guest's registers (the run loop writes them back); must be canonical |
//! | anything else | a guest `#GP`: an [`EmulateError`] naming the MSR (there is no guest IDT to deliver it to) |
//!
//! A refused write is a guest `#GP` too ([`EmulateError::WriteMsr`], with the reason).
#![forbid(unsafe_code)]

use super::operand::is_canonical;
use super::{EmulateError, Insn, Outcome, sys};
use crate::platform::Platform;
use crate::vcpu::Vcpu;

pub const IA32_TIME_STAMP_COUNTER: u32 = 0x10;
pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_EFER: u32 = 0xc000_0080;
pub const IA32_STAR: u32 = 0xc000_0081;
pub const IA32_LSTAR: u32 = 0xc000_0082;
pub const IA32_CSTAR: u32 = 0xc000_0083;
pub const IA32_FMASK: u32 = 0xc000_0084;
pub const IA32_FS_BASE: u32 = 0xc000_0100;
pub const IA32_GS_BASE: u32 = 0xc000_0101;
pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// EFER.SCE: `syscall` enabled.
pub const EFER_SCE: u64 = 1 << 0;
/// EFER.LME: long mode enabled.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE: no-execute enabled.
pub const EFER_NXE: u64 = 1 << 11;

/// Reads MSR `msr` of `vcpu` (with the guest's FS/GS bases from `p`), or `None` if the vCPU
/// has no such MSR.
pub fn read(vcpu: &Vcpu, p: &mut impl Platform, msr: u32) -> Option<u64> {
    let m = &vcpu.msrs;
    Some(match msr {
        IA32_TIME_STAMP_COUNTER => sys::host_tsc().wrapping_add(m.tsc_offset),
        IA32_APIC_BASE => m.apic_base,
        IA32_EFER => vcpu.efer,
        IA32_STAR => m.star,
        IA32_LSTAR => m.lstar,
        IA32_CSTAR => m.cstar,
        IA32_FMASK => m.fmask,
        IA32_FS_BASE => p.regs().fs_base,
        IA32_GS_BASE => p.regs().gs_base,
        IA32_KERNEL_GS_BASE => m.kernel_gs_base,
        _ => return None,
    })
}

/// Writes `value` to MSR `msr`, or says why the write is refused.
pub fn write(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    msr: u32,
    value: u64,
) -> Result<(), &'static str> {
    let canonical = |v: u64| {
        if is_canonical(v) {
            Ok(v)
        } else {
            Err("non-canonical address")
        }
    };
    let m = &mut vcpu.msrs;
    match msr {
        IA32_TIME_STAMP_COUNTER => m.tsc_offset = value.wrapping_sub(sys::host_tsc()),
        IA32_APIC_BASE => {
            if value != m.apic_base {
                return Err("the local apic cannot be moved or disabled");
            }
        }
        IA32_EFER => {
            if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
                return Err("reserved or unsupported efer bits");
            }
            if value & (EFER_LME | EFER_LMA) != EFER_LME | EFER_LMA {
                return Err(
                    "efer.lme and efer.lma must stay set: the guest cannot leave long mode",
                );
            }
            vcpu.efer = value;
        }
        IA32_STAR => m.star = value,
        IA32_LSTAR => m.lstar = canonical(value)?,
        IA32_CSTAR => m.cstar = canonical(value)?,
        IA32_FMASK => {
            if value >> 32 != 0 {
                return Err("reserved bits 63:32 of fmask");
            }
            m.fmask = value;
        }
        IA32_FS_BASE => p.regs().fs_base = canonical(value)?,
        IA32_GS_BASE => p.regs().gs_base = canonical(value)?,
        IA32_KERNEL_GS_BASE => m.kernel_gs_base = canonical(value)?,
        _ => return Err("unknown msr"),
    }
    Ok(())
}

/// `rdmsr`.
pub(crate) fn rdmsr(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    let msr = p.regs().rcx as u32;
    let value = read(vcpu, p, msr).ok_or(EmulateError::ReadMsr {
        site: insn.site,
        msr,
    })?;
    let regs = p.regs();
    regs.rax = value & 0xffff_ffff;
    regs.rdx = value >> 32;
    Ok(Outcome::Resume)
}

/// `wrmsr`.
pub(crate) fn wrmsr(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    let regs = p.regs();
    let msr = regs.rcx as u32;
    let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
    write(vcpu, p, msr, value).map_err(|reason| EmulateError::WriteMsr {
        site: insn.site,
        msr,
        value,
        reason,
    })?;
    Ok(Outcome::Resume)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::test_util::*;
    use crate::platform::mock::MockPlatform;
    use crate::vcpu::VcpuConfig;

    const RDMSR: [u8; 2] = [0x0f, 0x32];
    const WRMSR: [u8; 2] = [0x0f, 0x30];

    fn wrmsr_on(
        vcpu: &mut Vcpu,
        p: &mut MockPlatform,
        msr: u32,
        value: u64,
    ) -> Result<(), EmulateError> {
        p.poke(CODE, &WRMSR);
        p.regs.rip = CODE;
        p.regs.rcx = msr.into();
        p.regs.rax = 0xdead_beef_0000_0000 | (value & 0xffff_ffff);
        p.regs.rdx = value >> 32;
        run(vcpu, p).map(|e| {
            assert_eq!((e.outcome, p.regs.rip), (Outcome::Resume, CODE + 2));
        })
    }

    fn rdmsr_on(vcpu: &mut Vcpu, p: &mut MockPlatform, msr: u32) -> Result<u64, EmulateError> {
        p.poke(CODE, &RDMSR);
        p.regs.rip = CODE;
        p.regs.rcx = 0xffff_ffff_0000_0000 | u64::from(msr);
        p.regs.rax = u64::MAX;
        p.regs.rdx = u64::MAX;
        run(vcpu, p).map(|_| {
            assert_eq!(
                (p.regs.rax >> 32, p.regs.rdx >> 32),
                (0, 0),
                "rdmsr zero-extends"
            );
            (p.regs.rdx << 32) | p.regs.rax
        })
    }

    #[test]
    fn wrmsr_then_rdmsr_lstar_round_trips() {
        let (mut vcpu, mut p) = (vcpu(), platform(&[]));
        wrmsr_on(&mut vcpu, &mut p, IA32_LSTAR, 0xffff_ffff_8100_0000).unwrap();
        assert_eq!(
            rdmsr_on(&mut vcpu, &mut p, IA32_LSTAR).unwrap(),
            0xffff_ffff_8100_0000
        );
    }

    #[test]
    fn star_cstar_fmask_and_kernel_gs_base_round_trip() {
        let (mut vcpu, mut p) = (vcpu(), platform(&[]));
        for (msr, v) in [
            (IA32_STAR, 0x0023_0010_0000_0000),
            (IA32_STAR, u64::MAX),
            (IA32_CSTAR, 0x40_1000),
            (IA32_FMASK, 0x4_7700),
            (IA32_KERNEL_GS_BASE, 0xffff_8880_0000_0000),
        ] {
            wrmsr_on(&mut vcpu, &mut p, msr, v).unwrap();
            assert_eq!(rdmsr_on(&mut vcpu, &mut p, msr).unwrap(), v, "msr {msr:#x}");
        }
    }

    #[test]
    fn every_msr_starts_at_its_documented_value() {
        let (mut vcpu, mut p) = (vcpu(), platform(&[]));
        for msr in [
            IA32_STAR,
            IA32_LSTAR,
            IA32_CSTAR,
            IA32_FMASK,
            IA32_FS_BASE,
            IA32_GS_BASE,
            IA32_KERNEL_GS_BASE,
        ] {
            assert_eq!(rdmsr_on(&mut vcpu, &mut p, msr).unwrap(), 0, "msr {msr:#x}");
        }
    }

    #[test]
    fn wrmsr_fs_base_changes_the_real_fs_base_and_rdmsr_reads_it() {
        let (mut vcpu, mut p) = (vcpu(), platform(&[]));
        wrmsr_on(&mut vcpu, &mut p, IA32_FS_BASE, 0x1234_5000).unwrap();
        wrmsr_on(&mut vcpu, &mut p, IA32_GS_BASE, 0x6789_a000).unwrap();
        assert_eq!((p.regs.fs_base, p.regs.gs_base), (0x1234_5000, 0x6789_a000));
        p.regs.fs_base = 0x4000;
        assert_eq!(rdmsr_on(&mut vcpu, &mut p, IA32_FS_BASE).unwrap(), 0x4000);
    }

    #[test]
    fn a_non_canonical_gs_base_is_refused() {
        let (mut vcpu, mut p) = (vcpu(), platform(&[]));
        let err = wrmsr_on(&mut vcpu, &mut p, IA32_GS_BASE, 0x8000_0000_0000).unwrap_err();
        assert!(err.to_string().contains("non-canonical"), "{err}");
        assert_eq!(p.regs.gs_base, 0);
        assert_eq!(p.regs.rip, CODE, "rip unchanged on error");
    }

    #[test]
    fn an_unknown_msr_is_an_error_naming_it() {
        let (mut vcpu, mut p) = (vcpu(), platform(&[]));
        let err = rdmsr_on(&mut vcpu, &mut p, 0x1a0).unwrap_err();
        assert!(
            matches!(err, EmulateError::ReadMsr { msr: 0x1a0, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("#GP") && msg.contains("unknown msr 0x1a0") && msg.contains("0f 32"),
            "{msg}"
        );
        assert!(
            msg.contains("guest rip 0x100000") && msg.contains("(rdmsr)"),
            "{msg}"
        );
        let err = wrmsr_on(&mut vcpu, &mut p, 0x277, 1).unwrap_err();
        assert!(
            err.to_string().contains("msr 0x277 refused (unknown msr)"),
            "{err}"
        );
        assert_eq!(p.regs.rip, CODE, "rip stays at the faulting instruction");
    }

    #[test]
    fn efer_keeps_long_mode_and_lets_sce_and_nxe_change() {
        let (mut vcpu, mut p) = (vcpu(), platform(&[]));
        assert_eq!(rdmsr_on(&mut vcpu, &mut p, IA32_EFER).unwrap(), 0xd01);
        wrmsr_on(&mut vcpu, &mut p, IA32_EFER, EFER_LME | EFER_LMA).unwrap();
        assert_eq!(rdmsr_on(&mut vcpu, &mut p, IA32_EFER).unwrap(), 0x500);
        for refused in [0, EFER_LME, EFER_LMA | EFER_SCE, 0xd01 | (1 << 12)] {
            assert!(
                wrmsr_on(&mut vcpu, &mut p, IA32_EFER, refused).is_err(),
                "efer {refused:#x}"
            );
        }
        assert_eq!(rdmsr_on(&mut vcpu, &mut p, IA32_EFER).unwrap(), 0x500);
    }

    #[test]
    fn apic_base_depends_on_the_vcpu_and_cannot_change() {
        let mut v1 = Vcpu::new(VcpuConfig { id: 1, count: 2 }, Box::new(std::io::sink()));
        let mut p = platform(&[]);
        assert_eq!(
            rdmsr_on(&mut v1, &mut p, IA32_APIC_BASE).unwrap(),
            0xfee0_0800
        );
        wrmsr_on(&mut v1, &mut p, IA32_APIC_BASE, 0xfee0_0800).unwrap();
        for refused in [0xfee0_0000, 0xfed0_0800, 0xfee0_0900, 0xfee0_0c00] {
            assert!(
                wrmsr_on(&mut v1, &mut p, IA32_APIC_BASE, refused).is_err(),
                "{refused:#x}"
            );
        }
        assert_eq!(
            rdmsr_on(&mut v1, &mut p, IA32_APIC_BASE).unwrap(),
            0xfee0_0800
        );
        let mut v0 = vcpu();
        assert_eq!(
            rdmsr_on(&mut v0, &mut p, IA32_APIC_BASE).unwrap(),
            0xfee0_0900
        );
    }

    #[test]
    fn fmask_with_upper_bits_and_non_canonical_bases_are_refused() {
        let (mut vcpu, mut p) = (vcpu(), platform(&[]));
        assert!(wrmsr_on(&mut vcpu, &mut p, IA32_FMASK, 1 << 32).is_err());
        assert!(wrmsr_on(&mut vcpu, &mut p, IA32_LSTAR, 0x0000_8000_0000_0000).is_err());
        assert!(wrmsr_on(&mut vcpu, &mut p, IA32_CSTAR, 0x0000_8000_0000_0000).is_err());
        assert!(
            wrmsr_on(
                &mut vcpu,
                &mut p,
                IA32_KERNEL_GS_BASE,
                0xfff0_0000_0000_0000
            )
            .is_err()
        );
    }

    #[test]
    fn writing_the_tsc_sets_an_offset_that_later_reads_include() {
        let (mut vcpu, mut p) = (vcpu(), platform(&[]));
        let target = 1u64 << 62;
        wrmsr_on(&mut vcpu, &mut p, IA32_TIME_STAMP_COUNTER, target).unwrap();
        let read = rdmsr_on(&mut vcpu, &mut p, IA32_TIME_STAMP_COUNTER).unwrap();
        assert!(
            read >= target && read - target < 1 << 40,
            "tsc {read:#x} not just after {target:#x}"
        );
        let again = rdmsr_on(&mut vcpu, &mut p, IA32_TIME_STAMP_COUNTER).unwrap();
        assert!(again >= read, "the tsc counts up from the value written");
    }
}
