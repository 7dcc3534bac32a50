//! Control and debug registers and the cache/TLB instructions: `mov` to/from `%crN` and
//! `%drN`, `clts`, `lmsw`, `smsw`, `invlpg`, `invpcid`, `wbinvd`, `invd`, `xsetbv`.
//!
//! All of these act on virtual state only ([`Vcpu::cr`], [`Vcpu::dr`], [`Vcpu::xcr0`]); the
//! real processor state of the VM process never changes:
//! - CR0 (initially PG|ET|PE): PE and PG must stay set (the guest cannot leave long mode),
//!   bits 63:32 must be zero, NW without CD is refused, ET reads as 1, other reserved bits
//!   are dropped. TS is recorded but the FPU never raises #NM for it.
//! - CR2, CR3: stored. There are no guest page tables yet: CR3 changes no mapping.
//! - CR4 (initially PAE): PAE must stay set, LA57 cannot change, VMXE/SMXE are refused,
//!   OSXSAVE needs the host's XSAVE; reserved bits are refused. CR4.OSXSAVE shows in CPUID.
//! - CR8: the 4-bit task priority; higher bits are refused. Nothing uses it yet.
//! - DR0-DR3, DR6, DR7: stored (DR4/DR5 alias DR6/DR7 unless CR4.DE). They arm no real
//!   breakpoints. DR6/DR7 bits 63:32 must be zero.
//! - `clts` clears CR0.TS; `lmsw` loads CR0 bits 3:0 but cannot clear PE; `smsw` stores CR0
//!   (16 bits to memory, the whole CR0 zero-extended to a 32/64-bit register).
//! - `invlpg`, `invpcid`, `wbinvd`, `invd`: no-ops, since there is no guest TLB or cache to
//!   act on (`invpcid` still reads its descriptor and checks its type).
//! - `xsetbv`: XCR0 only, with CR4.OSXSAVE set; bit 0 set, AVX only with SSE, and only
//!   components the host supports. The value is virtual: the host's XCR0 stays in force, so
//!   `xgetbv` (unprivileged, not trapped) reports the host's.
//!
//! A refused value is an [`EmulateError::GeneralProtection`] naming the reason.
#![forbid(unsafe_code)]

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

use super::operand::{
    effective_address, is_canonical, read_reg, read_rm, read_u64, write_reg, write_rm,
};
use super::{EmulateError, Insn, Outcome};
use crate::platform::Platform;
use crate::vcpu::Vcpu;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;
const CR0_DEFINED: u64 = CR0_PE
    | CR0_MP
    | CR0_EM
    | CR0_TS
    | CR0_ET
    | CR0_NE
    | CR0_WP
    | CR0_AM
    | CR0_NW
    | CR0_CD
    | CR0_PG;

pub const CR4_DE: u64 = 1 << 3;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_LA57: u64 = 1 << 12;
pub const CR4_VMXE: u64 = 1 << 13;
pub const CR4_SMXE: u64 = 1 << 14;
pub const CR4_PCIDE: u64 = 1 << 17;
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4 bits a guest may set: VME..OSXMMEXCPT (0-10), UMIP (11), FSGSBASE (16), PCIDE (17),
/// OSXSAVE (18), SMEP (20), SMAP (21), PKE (22).
const CR4_ALLOWED: u64 =
    0x7ff | (1 << 11) | (1 << 16) | CR4_PCIDE | CR4_OSXSAVE | (1 << 20) | (1 << 21) | (1 << 22);

/// Whether `instr` moves to or from a control or debug register.
pub(crate) fn is_mov_cr_or_dr(instr: &Instruction) -> bool {
    matches!(
        instr.code(),
        Code::Mov_r64_cr | Code::Mov_cr_r64 | Code::Mov_r64_dr | Code::Mov_dr_r64
    )
}

fn cr_number(reg: Register) -> u32 {
    reg as u32 - Register::CR0 as u32
}

fn dr_number(reg: Register) -> u32 {
    reg as u32 - Register::DR0 as u32
}

/// Reads control register `n`.
pub fn read_cr(vcpu: &Vcpu, n: u32) -> Result<u64, &'static str> {
    match n {
        0 => Ok(vcpu.cr.cr0),
        2 => Ok(vcpu.cr.cr2),
        3 => Ok(vcpu.cr.cr3),
        4 => Ok(vcpu.cr.cr4),
        8 => Ok(vcpu.cr.cr8),
        _ => Err("no such control register (#UD)"),
    }
}

/// Writes control register `n`, or says why the value is refused.
pub fn write_cr(vcpu: &mut Vcpu, n: u32, value: u64) -> Result<(), &'static str> {
    match n {
        0 => {
            if value >> 32 != 0 {
                return Err("reserved bits 63:32 of cr0");
            }
            if value & CR0_NW != 0 && value & CR0_CD == 0 {
                return Err("cr0.nw without cr0.cd");
            }
            if value & (CR0_PE | CR0_PG) != CR0_PE | CR0_PG {
                return Err("the guest cannot clear cr0.pe or cr0.pg (leave long mode)");
            }
            vcpu.cr.cr0 = (value & CR0_DEFINED) | CR0_ET;
        }
        2 => vcpu.cr.cr2 = value,
        3 => vcpu.cr.cr3 = value,
        4 => {
            if value & !CR4_ALLOWED & !(CR4_VMXE | CR4_SMXE | CR4_LA57) != 0 {
                return Err("reserved or unsupported cr4 bits");
            }
            if value & (CR4_VMXE | CR4_SMXE) != 0 {
                return Err("cr4.vmxe/smxe: vmx and smx are not offered");
            }
            if (value ^ vcpu.cr.cr4) & CR4_LA57 != 0 {
                return Err("cr4.la57 cannot change in long mode");
            }
            if value & CR4_PAE == 0 {
                return Err("long mode requires cr4.pae");
            }
            if value & CR4_OSXSAVE != 0 && vcpu.cpuid_host_xsave_mask() == 0 {
                return Err("cr4.osxsave without xsave support");
            }
            vcpu.cr.cr4 = value;
        }
        8 => {
            if value > 0xf {
                return Err("reserved bits 63:4 of cr8");
            }
            vcpu.cr.cr8 = value;
        }
        _ => return Err("no such control register (#UD)"),
    }
    Ok(())
}

/// The DR slot for `n`, applying the DR4/DR5 aliases.
fn dr_slot(vcpu: &Vcpu, n: u32) -> Result<usize, &'static str> {
    match n {
        0..=3 | 6 | 7 => Ok(n as usize),
        4 | 5 if vcpu.cr.cr4 & CR4_DE == 0 => Ok(n as usize + 2),
        4 | 5 => Err("dr4/dr5 with cr4.de set (#UD)"),
        _ => Err("no such debug register (#UD)"),
    }
}

pub(crate) fn mov_cr_or_dr(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    let instr = &insn.instr;
    let gp = |reason| insn.general_protection(reason);
    let not_gpr = || insn.unsupported("control register move with a non-general register");
    match instr.code() {
        Code::Mov_r64_cr => {
            let value = read_cr(vcpu, cr_number(instr.op1_register())).map_err(gp)?;
            write_reg(p.regs(), instr.op0_register(), value).ok_or_else(not_gpr)?;
        }
        Code::Mov_cr_r64 => {
            let value = read_reg(p.regs(), instr.op1_register()).ok_or_else(not_gpr)?;
            write_cr(vcpu, cr_number(instr.op0_register()), value).map_err(gp)?;
        }
        Code::Mov_r64_dr => {
            let slot = dr_slot(vcpu, dr_number(instr.op1_register())).map_err(gp)?;
            write_reg(p.regs(), instr.op0_register(), vcpu.dr[slot]).ok_or_else(not_gpr)?;
        }
        Code::Mov_dr_r64 => {
            let slot = dr_slot(vcpu, dr_number(instr.op0_register())).map_err(gp)?;
            let value = read_reg(p.regs(), instr.op1_register()).ok_or_else(not_gpr)?;
            if slot >= 6 && value >> 32 != 0 {
                return Err(gp("reserved bits 63:32 of dr6/dr7"));
            }
            vcpu.dr[slot] = value;
        }
        _ => {
            return Err(EmulateError::NotSensitive {
                site: insn.site,
                trap: insn.trap,
            });
        }
    }
    Ok(Outcome::Resume)
}

pub(crate) fn emulate(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    let instr = &insn.instr;
    match instr.mnemonic() {
        Mnemonic::Clts => vcpu.cr.cr0 &= !CR0_TS,
        Mnemonic::Lmsw => {
            let src = read_rm(p, insn, 0, 2)? & 0xf;
            vcpu.cr.cr0 = (vcpu.cr.cr0 & !0xf) | src | (vcpu.cr.cr0 & CR0_PE);
        }
        Mnemonic::Smsw => write_rm(p, insn, 0, vcpu.cr.cr0, 2)?,
        Mnemonic::Invlpg | Mnemonic::Wbinvd | Mnemonic::Invd => {}
        Mnemonic::Invpcid => {
            let kind = read_reg(p.regs(), instr.op0_register())
                .ok_or_else(|| insn.unsupported("invpcid with a non-general register"))?;
            if instr.op1_kind() != OpKind::Memory {
                return Err(insn.unsupported("invpcid without a memory descriptor"));
            }
            let gva = effective_address(p.regs(), insn, 1)?;
            let pcid = read_u64(p, insn, gva, 8)?;
            let addr = read_u64(p, insn, gva.wrapping_add(8), 8)?;
            if kind > 3 {
                return Err(insn.general_protection("invpcid type above 3"));
            }
            if pcid > 0xfff {
                return Err(insn.general_protection("invpcid descriptor with reserved bits set"));
            }
            if kind == 0 && !is_canonical(addr) {
                return Err(insn.general_protection("invpcid of a non-canonical address"));
            }
        }
        Mnemonic::Xsetbv => {
            let regs = p.regs();
            let index = regs.rcx as u32;
            let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
            if vcpu.cr.cr4 & CR4_OSXSAVE == 0 {
                return Err(insn.general_protection("xsetbv with cr4.osxsave clear (#UD)"));
            }
            if index != 0 {
                return Err(insn.general_protection("xsetbv of an xcr other than xcr0"));
            }
            if value & 1 == 0 {
                return Err(insn.general_protection("xcr0 bit 0 (x87) must be set"));
            }
            if value & 0b100 != 0 && value & 0b10 == 0 {
                return Err(insn.general_protection("xcr0: avx state without sse state"));
            }
            if value & !vcpu.cpuid_host_xsave_mask() != 0 {
                return Err(insn.general_protection("xcr0 names state components the cpu lacks"));
            }
            vcpu.xcr0 = value;
        }
        _ => {
            return Err(EmulateError::NotSensitive {
                site: insn.site,
                trap: insn.trap,
            });
        }
    }
    Ok(Outcome::Resume)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::test_util::*;

    #[test]
    fn mov_to_cr3_then_from_cr3_round_trips() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x22, 0xd8]); // mov %rax,%cr3
        p.regs.rax = 0x12_3000;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.cr.cr3, 0x12_3000);
        let mut p = platform(&[0x0f, 0x20, 0xdb]); // mov %cr3,%rbx
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.regs.rbx, 0x12_3000);
    }

    #[test]
    fn mov_from_cr0_and_cr4_reads_the_initial_values() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x20, 0xc0, 0x41, 0x0f, 0x20, 0xe0]); // mov %cr0,%rax; mov %cr4,%r8
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.regs.rax, 0x8000_0011);
        crate::emulate::handle_trap(
            &mut vcpu,
            &mut p,
            crate::emulate::Trap::Marker { insn: CODE + 3 },
        )
        .unwrap();
        assert_eq!(p.regs.r8, 0x20);
    }

    #[test]
    fn mov_to_cr2_and_cr8_store_and_cr8_refuses_high_bits() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x22, 0xd1]); // mov %rcx,%cr2
        p.regs.rcx = 0xdead_b000;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.cr.cr2, 0xdead_b000);
        let mut p = platform(&[0x44, 0x0f, 0x22, 0xc0]); // mov %rax,%cr8
        p.regs.rax = 7;
        run_ok(&mut vcpu, &mut p, 4);
        assert_eq!(vcpu.cr.cr8, 7);
        let mut p = platform(&[0x44, 0x0f, 0x22, 0xc0]);
        p.regs.rax = 0x10;
        assert!(matches!(
            run(&mut vcpu, &mut p),
            Err(EmulateError::GeneralProtection { .. })
        ));
        let mut p = platform(&[0x44, 0x0f, 0x20, 0xc2]); // mov %cr8,%rdx
        run_ok(&mut vcpu, &mut p, 4);
        assert_eq!(p.regs.rdx, 7);
    }

    #[test]
    fn clearing_cr0_pg_is_a_general_protection_error() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x22, 0xc0]); // mov %rax,%cr0
        p.regs.rax = 0x11;
        let err = run(&mut vcpu, &mut p).unwrap_err();
        assert!(
            err.to_string().contains("cannot clear cr0.pe or cr0.pg"),
            "{err}"
        );
        assert_eq!((vcpu.cr.cr0, p.regs.rip), (0x8000_0011, CODE));
    }

    #[test]
    fn mov_to_cr0_setting_ts_and_wp_is_stored() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x22, 0xc0]);
        p.regs.rax = 0x8001_0019;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.cr.cr0, 0x8001_0019);
    }

    #[test]
    fn mov_to_cr4_sets_osxsave_and_refuses_clearing_pae() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x22, 0xe0]); // mov %rax,%cr4
        p.regs.rax = 0x20 | CR4_OSXSAVE | (1 << 9);
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.cr.cr4, 0x20 | CR4_OSXSAVE | (1 << 9));
        let mut p = platform(&[0x0f, 0x22, 0xe0]);
        p.regs.rax = 0;
        assert!(
            run(&mut vcpu, &mut p)
                .unwrap_err()
                .to_string()
                .contains("cr4.pae")
        );
        p.regs.rax = 0x20 | CR4_VMXE;
        assert!(run(&mut vcpu, &mut p).is_err());
    }

    #[test]
    fn mov_to_and_from_debug_registers_round_trips_and_dr4_aliases_dr6() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x23, 0xd8]); // mov %rax,%db3
        p.regs.rax = 0x40_1000;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.dr[3], 0x40_1000);
        let mut p = platform(&[0x0f, 0x21, 0xe1]); // mov %db4,%rcx
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.regs.rcx, 0xffff_0ff0);
        let mut p = platform(&[0x0f, 0x23, 0xf8]); // mov %rax,%db7
        p.regs.rax = 1 << 32;
        assert!(run(&mut vcpu, &mut p).is_err());
    }

    #[test]
    fn clts_clears_cr0_ts() {
        let mut vcpu = vcpu();
        vcpu.cr.cr0 |= CR0_TS;
        let mut p = platform(&[0x0f, 0x06]);
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(vcpu.cr.cr0, 0x8000_0011);
    }

    #[test]
    fn smsw_to_a_register_and_to_memory() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0xe0]); // smsw %eax
        p.regs.rax = u64::MAX;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.regs.rax, 0x8000_0011);
        let mut p = platform(&[0x0f, 0x01, 0x23]); // smsw (%rbx)
        p.regs.rbx = DATA;
        p.poke(DATA, &[0xaa; 4]);
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.peek(DATA, 4), &[0x11, 0x00, 0xaa, 0xaa]);
    }

    #[test]
    fn smsw_to_an_unmapped_address_is_an_operand_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0x23]);
        p.regs.rbx = UNMAPPED;
        assert!(matches!(
            run(&mut vcpu, &mut p),
            Err(EmulateError::AccessOperand { .. })
        ));
    }

    #[test]
    fn lmsw_sets_ts_but_cannot_clear_pe() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0xf0]); // lmsw %ax
        p.regs.rax = 0x8;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.cr.cr0, 0x8000_0019);
    }

    #[test]
    fn invlpg_wbinvd_and_invd_are_no_ops_that_advance_rip() {
        let mut vcpu = vcpu();
        for code in [&[0x0f, 0x01, 0x38][..], &[0x0f, 0x09], &[0x0f, 0x08]] {
            let mut p = platform(code); // invlpg (%rax); wbinvd; invd
            p.regs.rax = UNMAPPED;
            let before = p.regs;
            run_ok(&mut vcpu, &mut p, code.len());
            assert_eq!(
                p.regs,
                crate::platform::Regs {
                    rip: CODE + code.len() as u64,
                    ..before
                }
            );
        }
    }

    #[test]
    fn invpcid_reads_its_descriptor_and_checks_the_type() {
        let mut vcpu = vcpu();
        let code = [0x66, 0x0f, 0x38, 0x82, 0x03]; // invpcid (%rbx),%rax
        let mut p = platform(&code);
        p.regs.rbx = DATA;
        p.regs.rax = 2;
        run_ok(&mut vcpu, &mut p, code.len());
        p.regs.rip = CODE;
        p.regs.rax = 4;
        assert!(
            run(&mut vcpu, &mut p)
                .unwrap_err()
                .to_string()
                .contains("type above 3")
        );
        p.regs.rax = 2;
        p.regs.rbx = UNMAPPED;
        assert!(matches!(
            run(&mut vcpu, &mut p),
            Err(EmulateError::AccessOperand { .. })
        ));
    }

    #[test]
    fn xsetbv_stores_xcr0_once_osxsave_is_set() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0xd1]); // xsetbv
        p.regs.rax = 0x3;
        assert!(
            run(&mut vcpu, &mut p)
                .unwrap_err()
                .to_string()
                .contains("osxsave")
        );
        if vcpu.cpuid_host_xsave_mask() & 0x3 != 0x3 {
            eprintln!(
                "SKIPPED the rest of xsetbv_stores_xcr0: the host lacks xsave with sse state"
            );
            return;
        }
        vcpu.cr.cr4 |= CR4_OSXSAVE;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.xcr0, 0x3);
        p.regs.rip = CODE;
        p.regs.rax = 0x2;
        assert!(
            run(&mut vcpu, &mut p)
                .unwrap_err()
                .to_string()
                .contains("bit 0")
        );
        p.regs.rax = 0x5;
        assert!(run(&mut vcpu, &mut p).is_err());
        p.regs.rax = 0x3;
        p.regs.rcx = 1;
        assert!(run(&mut vcpu, &mut p).is_err());
    }
}
