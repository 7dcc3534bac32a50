//! Control and debug registers and the cache/TLB instructions: `mov` to/from `%crN` and
//! `%drN`, `clts`, `lmsw`, `smsw`, `invlpg`, `invpcid`, `wbinvd`, `wbnoinvd`, `invd`,
//! `xsetbv`, as `docs/guest-platform.md` ("Control registers", "Other privileged
//! instructions") defines them.
//!
//! All of these act on virtual state only ([`Vcpu::cr`], [`Vcpu::dr`]); the real processor
//! state of the VM process never changes:
//! - CR0 (initially PG|ET|PE): bits 63:32 set, or PE or PG cleared, raise `#GP`; ET always
//!   reads 1; every other bit is stored and read back (TS is recorded, but the FPU never
//!   raises `#NM` for it).
//! - CR2, CR3: any value, stored. There are no guest page tables yet: CR3 changes no mapping.
//! - CR4 (initially PAE): bits 63:32 set, or PAE cleared, raise `#GP`; every other bit stored.
//! - CR8: the 4-bit task priority; bits 63:4 set raise `#GP`.
//! - CR1, CR5-CR7, CR9-CR15: `#UD`.
//! - DR0-DR3, DR6, DR7: any value, stored; DR4/DR5 are aliases of DR6/DR7; DR8-DR15: `#UD`.
//!   They arm no real breakpoints.
//! - `clts` clears CR0.TS; `lmsw` loads CR0 bits 3:0 but cannot clear PE; `smsw` stores CR0
//!   (16 bits to memory, CR0 zero-extended to a register's size).
//! - `invlpg`, `wbinvd`, `wbnoinvd`, `invd`: no effect (no guest TLB or cache yet); `invpcid`
//!   reads its 16-byte memory operand (so an unmapped one is an operand fault), then does
//!   nothing.
//! - `xsetbv`: ECX = 0 and EDX:EAX equal to the host's XCR0 is accepted and does nothing;
//!   anything else is a `#GP` (the guest's native FPU state is the host's).
#![forbid(unsafe_code)]

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

use super::operand::{effective_address, read_reg, read_rm, read_u64, write_reg, write_rm};
use super::{EmulateError, Exception, Insn, Outcome};
use crate::platform::Platform;
use crate::vcpu::Vcpu;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;

/// Whether `instr` moves to or from a control or debug register.
pub(crate) fn is_mov_cr_or_dr(instr: &Instruction) -> bool {
    matches!(
        instr.code(),
        Code::Mov_r64_cr | Code::Mov_cr_r64 | Code::Mov_r64_dr | Code::Mov_dr_r64
    )
}

/// Why a control- or debug-register access raises an exception.
type Refusal = (Exception, &'static str);

const NO_SUCH_CR: Refusal = (Exception::InvalidOpcode, "no such control register");
const NO_SUCH_DR: Refusal = (Exception::InvalidOpcode, "no such debug register");

fn gp(reason: &'static str) -> Refusal {
    (Exception::GeneralProtection, reason)
}

/// Reads control register `n`.
pub fn read_cr(vcpu: &Vcpu, n: u32) -> Result<u64, Refusal> {
    match n {
        0 => Ok(vcpu.cr.cr0),
        2 => Ok(vcpu.cr.cr2),
        3 => Ok(vcpu.cr.cr3),
        4 => Ok(vcpu.cr.cr4),
        8 => Ok(vcpu.cr.cr8),
        _ => Err(NO_SUCH_CR),
    }
}

/// Writes control register `n`, or says which exception the value raises.
pub fn write_cr(vcpu: &mut Vcpu, n: u32, value: u64) -> Result<(), Refusal> {
    match n {
        0 => {
            if value >> 32 != 0 {
                return Err(gp("reserved bits 63:32 of cr0"));
            }
            if value & (CR0_PE | CR0_PG) != CR0_PE | CR0_PG {
                return Err(gp(
                    "cr0.pe and cr0.pg must stay set: the guest cannot leave long mode",
                ));
            }
            vcpu.cr.cr0 = value | CR0_ET;
        }
        2 => vcpu.cr.cr2 = value,
        3 => vcpu.cr.cr3 = value,
        4 => {
            if value >> 32 != 0 {
                return Err(gp("reserved bits 63:32 of cr4"));
            }
            if value & CR4_PAE == 0 {
                return Err(gp("long mode requires cr4.pae"));
            }
            vcpu.cr.cr4 = value;
        }
        8 => {
            if value > 0xf {
                return Err(gp("reserved bits 63:4 of cr8"));
            }
            vcpu.cr.cr8 = value;
        }
        _ => return Err(NO_SUCH_CR),
    }
    Ok(())
}

/// The [`Vcpu::dr`] slot of debug register `n` (DR4/DR5 alias DR6/DR7).
fn dr_slot(n: u32) -> Result<usize, Refusal> {
    match n {
        0..=3 | 6 | 7 => Ok(n as usize),
        4 | 5 => Ok(n as usize + 2),
        _ => Err(NO_SUCH_DR),
    }
}

fn refused(insn: &Insn, (exception, reason): Refusal) -> EmulateError {
    EmulateError::GuestException {
        site: insn.site,
        exception,
        reason,
    }
}

pub(crate) fn mov_cr_or_dr(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    let instr = &insn.instr;
    let not_gpr = || insn.unsupported("control register move with a non-general register");
    let cr = |reg: Register| reg as u32 - Register::CR0 as u32;
    let dr = |reg: Register| reg as u32 - Register::DR0 as u32;
    match instr.code() {
        Code::Mov_r64_cr => {
            let value = read_cr(vcpu, cr(instr.op1_register())).map_err(|r| refused(insn, r))?;
            write_reg(p.regs(), instr.op0_register(), value).ok_or_else(not_gpr)?;
        }
        Code::Mov_cr_r64 => {
            let value = read_reg(p.regs(), instr.op1_register()).ok_or_else(not_gpr)?;
            write_cr(vcpu, cr(instr.op0_register()), value).map_err(|r| refused(insn, r))?;
        }
        Code::Mov_r64_dr => {
            let slot = dr_slot(dr(instr.op1_register())).map_err(|r| refused(insn, r))?;
            write_reg(p.regs(), instr.op0_register(), vcpu.dr[slot]).ok_or_else(not_gpr)?;
        }
        Code::Mov_dr_r64 => {
            let slot = dr_slot(dr(instr.op0_register())).map_err(|r| refused(insn, r))?;
            vcpu.dr[slot] = read_reg(p.regs(), instr.op1_register()).ok_or_else(not_gpr)?;
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
        Mnemonic::Invlpg | Mnemonic::Wbinvd | Mnemonic::Wbnoinvd | Mnemonic::Invd => {}
        Mnemonic::Invpcid => {
            if instr.op1_kind() != OpKind::Memory {
                return Err(insn.unsupported("invpcid without a memory descriptor"));
            }
            let gva = effective_address(p.regs(), insn, 1)?;
            read_u64(p, insn, gva, 8)?;
            read_u64(p, insn, gva.wrapping_add(8), 8)?;
        }
        Mnemonic::Xsetbv => {
            let regs = p.regs();
            let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
            if regs.rcx as u32 != 0 {
                return Err(insn.general_protection("xsetbv of an xcr other than xcr0"));
            }
            if vcpu.cpuid.xcr0() != Some(value) {
                return Err(insn.general_protection("xsetbv of a value other than the host's xcr0"));
            }
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
    use crate::emulate::{Trap, handle_trap};

    fn exception_of(r: Result<crate::emulate::Emulated, EmulateError>) -> Exception {
        match r {
            Err(EmulateError::GuestException { exception, .. }) => exception,
            other => panic!("expected a guest exception, got {other:?}"),
        }
    }

    #[test]
    fn mov_to_cr3_then_from_cr3_round_trips() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x22, 0xd8]); // mov %rax,%cr3
        p.regs.rax = 0xffff_ffff_ffff_f123;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.cr.cr3, 0xffff_ffff_ffff_f123);
        let mut p = platform(&[0x0f, 0x20, 0xdb]); // mov %cr3,%rbx
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.regs.rbx, 0xffff_ffff_ffff_f123);
    }

    #[test]
    fn mov_from_cr0_and_cr4_reads_the_initial_values() {
        let mut vcpu = vcpu();
        // mov %cr0,%rax; mov %cr4,%r8
        let mut p = platform(&[0x0f, 0x20, 0xc0, 0x41, 0x0f, 0x20, 0xe0]);
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.regs.rax, 0x8000_0011);
        handle_trap(&mut vcpu, &mut p, Trap::Marker { insn: CODE + 3 }).unwrap();
        assert_eq!((p.regs.r8, p.regs.rip), (0x20, CODE + 7));
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
        assert_eq!(
            exception_of(run(&mut vcpu, &mut p)),
            Exception::GeneralProtection
        );
        let mut p = platform(&[0x44, 0x0f, 0x20, 0xc2]); // mov %cr8,%rdx
        run_ok(&mut vcpu, &mut p, 4);
        assert_eq!(p.regs.rdx, 7);
    }

    #[test]
    fn clearing_cr0_pg_or_setting_its_upper_bits_is_a_general_protection_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x22, 0xc0]); // mov %rax,%cr0
        for bad in [0x11, 0x8000_0010, 0x1_8000_0011] {
            p.regs.rax = bad;
            let err = run(&mut vcpu, &mut p).unwrap_err();
            assert!(err.to_string().contains("#GP"), "{err}");
        }
        assert_eq!((vcpu.cr.cr0, p.regs.rip), (0x8000_0011, CODE));
    }

    #[test]
    fn mov_to_cr0_stores_every_other_bit_and_keeps_et() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x22, 0xc0]);
        p.regs.rax = 0xe005_002b; // PG CD NW AM WP NE TS MP PE, ET clear, bit 30/29
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.cr.cr0, 0xe005_003b);
    }

    #[test]
    fn mov_to_cr4_stores_other_bits_and_refuses_clearing_pae_or_upper_bits() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x22, 0xe0]); // mov %rax,%cr4
        p.regs.rax = 0x20 | (1 << 18) | (1 << 9) | (1 << 13);
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.cr.cr4, 0x20 | (1 << 18) | (1 << 9) | (1 << 13));
        for bad in [0, 1 << 32 | 0x20] {
            let mut p = platform(&[0x0f, 0x22, 0xe0]);
            p.regs.rax = bad;
            assert_eq!(
                exception_of(run(&mut vcpu, &mut p)),
                Exception::GeneralProtection
            );
        }
    }

    #[test]
    fn cr1_and_cr9_do_not_exist() {
        let mut vcpu = vcpu();
        for code in [&[0x0f, 0x20, 0xc8][..], &[0x44, 0x0f, 0x22, 0xc8]] {
            // mov %cr1,%rax; mov %rax,%cr9
            let mut p = platform(code);
            let r = run(&mut vcpu, &mut p);
            if let Err(EmulateError::DecodeInstruction { .. }) = r {
                continue; // iced may refuse to decode them at all: also a clean error.
            }
            assert_eq!(exception_of(r), Exception::InvalidOpcode);
        }
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
        let mut p = platform(&[0x0f, 0x23, 0xe8]); // mov %rax,%db5
        p.regs.rax = 1 << 40;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.dr[7], 1 << 40);
        let mut p = platform(&[0x0f, 0x21, 0xfa]); // mov %db7,%rdx
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.regs.rdx, 1 << 40);
    }

    #[test]
    fn dr8_does_not_exist() {
        let mut p = platform(&[0x44, 0x0f, 0x21, 0xc0]); // mov %db8,%rax
        let r = run(&mut vcpu(), &mut p);
        if !matches!(r, Err(EmulateError::DecodeInstruction { .. })) {
            assert_eq!(exception_of(r), Exception::InvalidOpcode);
        }
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
        let mut p = platform(&[0x66, 0x0f, 0x01, 0xe0]); // smsw %ax
        p.regs.rax = u64::MAX;
        run_ok(&mut vcpu, &mut p, 4);
        assert_eq!(p.regs.rax, 0xffff_ffff_ffff_0011);
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
    fn lmsw_from_an_unmapped_operand_is_an_operand_fault() {
        let mut p = platform(&[0x0f, 0x01, 0x30]); // lmsw (%rax)
        p.regs.rax = UNMAPPED;
        assert!(matches!(
            run(&mut vcpu(), &mut p),
            Err(EmulateError::AccessOperand { .. })
        ));
    }

    #[test]
    fn invlpg_wbinvd_wbnoinvd_and_invd_are_no_ops_that_advance_rip() {
        let mut vcpu = vcpu();
        // invlpg (%rax); wbinvd; wbnoinvd; invd
        for code in [
            &[0x0f, 0x01, 0x38][..],
            &[0x0f, 0x09],
            &[0xf3, 0x0f, 0x09],
            &[0x0f, 0x08],
        ] {
            let mut p = platform(code);
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
    fn invpcid_reads_its_descriptor_and_does_nothing_else() {
        let mut vcpu = vcpu();
        let code = [0x66, 0x0f, 0x38, 0x82, 0x03]; // invpcid (%rbx),%rax
        let mut p = platform(&code);
        p.regs.rbx = DATA;
        p.regs.rax = 2;
        run_ok(&mut vcpu, &mut p, code.len());
        p.regs.rip = CODE;
        p.regs.rbx = CODE + MEM as u64 - 8; // the descriptor's second half is unmapped
        let err = run(&mut vcpu, &mut p).unwrap_err();
        assert!(
            matches!(err, EmulateError::AccessOperand { fault, .. } if fault.gva == CODE + MEM as u64),
            "{err:?}"
        );
    }

    #[test]
    fn xsetbv_accepts_only_the_hosts_xcr0() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0xd1]); // xsetbv
        match vcpu.cpuid.xcr0() {
            Some(xcr0) => {
                p.regs.rax = xcr0 & 0xffff_ffff;
                p.regs.rdx = xcr0 >> 32;
                run_ok(&mut vcpu, &mut p, 3);
                p.regs.rip = CODE;
                p.regs.rax ^= 0x4;
                assert_eq!(
                    exception_of(run(&mut vcpu, &mut p)),
                    Exception::GeneralProtection
                );
                p.regs.rax ^= 0x4;
                p.regs.rcx = 1;
                assert_eq!(
                    exception_of(run(&mut vcpu, &mut p)),
                    Exception::GeneralProtection
                );
            }
            None => {
                eprintln!(
                    "NOTE xsetbv test: the host has no OSXSAVE, so every xsetbv must be refused"
                );
                p.regs.rax = 1;
                assert_eq!(
                    exception_of(run(&mut vcpu, &mut p)),
                    Exception::GeneralProtection
                );
            }
        }
    }
}
