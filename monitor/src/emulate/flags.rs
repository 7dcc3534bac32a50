//! `cli`, `sti`, `pushf`, `popf`: the virtual interrupt flag (`docs/guest-platform.md`,
//! "Flags, segments and descriptor tables").
//!
//! A user process cannot change its real IF (the VM process always runs with IF = 1), so the
//! vCPU keeps the guest's IF ([`Vcpu::interrupt_flag`], initially set). The arithmetic and
//! control flags are the real ones in RFLAGS.
//!
//! - `cli`/`sti` clear/set the virtual IF (`sti`'s one-instruction interrupt shadow does not
//!   matter until interrupts are injected).
//! - `pushf` (`pushfq`, 8 bytes; `pushfw`, 2 bytes) pushes the real RFLAGS with bit 9 replaced
//!   by the virtual IF, IOPL (13:12) as 0, bit 1 as 1, and RF (16) and VM (17) clear, as the
//!   processor's own image has them.
//! - `popf` (`popfq`; `popfw` applies only bits 15:0) sets the virtual IF from bit 9 and
//!   applies CF, PF, AF, ZF, SF, DF, OF and AC to the real RFLAGS; TF, IOPL, NT, RF, VM, VIF,
//!   VIP and ID in the popped value are ignored.
//!
//! [`apply_popped_flags`] is also how `iretq` and `sysret` load RFLAGS.
#![forbid(unsafe_code)]

use iced_x86::Mnemonic;

use super::operand::{pop, push, read_u64};
use super::{EmulateError, Insn, Outcome};
use crate::platform::Platform;
use crate::vcpu::Vcpu;

pub const RFLAGS_CF: u64 = 1 << 0;
/// Bit 1 of RFLAGS always reads as 1.
pub const RFLAGS_FIXED: u64 = 1 << 1;
pub const RFLAGS_PF: u64 = 1 << 2;
pub const RFLAGS_AF: u64 = 1 << 4;
pub const RFLAGS_ZF: u64 = 1 << 6;
pub const RFLAGS_SF: u64 = 1 << 7;
pub const RFLAGS_TF: u64 = 1 << 8;
pub const RFLAGS_IF: u64 = 1 << 9;
pub const RFLAGS_DF: u64 = 1 << 10;
pub const RFLAGS_OF: u64 = 1 << 11;
pub const RFLAGS_IOPL: u64 = 3 << 12;
pub const RFLAGS_NT: u64 = 1 << 14;
pub const RFLAGS_RF: u64 = 1 << 16;
pub const RFLAGS_VM: u64 = 1 << 17;
pub const RFLAGS_AC: u64 = 1 << 18;
pub const RFLAGS_ID: u64 = 1 << 21;

/// The flags `popf` applies to the real RFLAGS.
pub const POPF_REAL_FLAGS: u64 =
    RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_DF | RFLAGS_OF | RFLAGS_AC;

/// RFLAGS as the guest sees it (`pushf`'s image): the real flags with the virtual IF.
pub fn guest_rflags(vcpu: &Vcpu, real: u64) -> u64 {
    let vif = if vcpu.interrupt_flag { RFLAGS_IF } else { 0 };
    (real & !(RFLAGS_IF | RFLAGS_IOPL | RFLAGS_RF | RFLAGS_VM)) | vif | RFLAGS_FIXED
}

/// Loads a popped RFLAGS value as `popf` does: the virtual IF from bit 9, the arithmetic and
/// control flags into the real RFLAGS, everything else ignored.
pub fn apply_popped_flags(vcpu: &mut Vcpu, real: &mut u64, value: u64) {
    *real = (*real & !POPF_REAL_FLAGS) | (value & POPF_REAL_FLAGS);
    vcpu.interrupt_flag = value & RFLAGS_IF != 0;
}

pub(crate) fn emulate(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    match insn.instr.mnemonic() {
        Mnemonic::Cli => vcpu.interrupt_flag = false,
        Mnemonic::Sti => vcpu.interrupt_flag = true,
        Mnemonic::Pushf | Mnemonic::Pushfd | Mnemonic::Pushfq => {
            let len = insn.instr.stack_pointer_increment().unsigned_abs() as usize;
            let image = guest_rflags(vcpu, p.regs().eflags);
            push(p, insn, image, len)?;
        }
        Mnemonic::Popf | Mnemonic::Popfd | Mnemonic::Popfq => {
            let len = insn.instr.stack_pointer_increment().unsigned_abs() as usize;
            let rsp = p.regs().rsp;
            let popped = read_u64(p, insn, rsp, len)?;
            let value = if len == 2 {
                (guest_rflags(vcpu, p.regs().eflags) & !0xffff) | popped
            } else {
                popped
            };
            pop(p, insn, len)?;
            apply_popped_flags(vcpu, &mut p.regs().eflags, value);
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
    fn cli_clears_and_sti_sets_the_virtual_interrupt_flag() {
        let mut vcpu = vcpu();
        assert!(vcpu.interrupts_enabled(), "IF starts set");
        let mut p = platform(&[0xfa]); // cli
        run_ok(&mut vcpu, &mut p, 1);
        assert!(!vcpu.interrupts_enabled());
        assert_eq!(p.regs.eflags, 0x202, "the real flags are untouched");
        let mut p = platform(&[0xfb]); // sti
        run_ok(&mut vcpu, &mut p, 1);
        assert!(vcpu.interrupts_enabled());
    }

    #[test]
    fn pushfq_pushes_the_virtual_interrupt_flag_and_the_real_other_flags() {
        let mut vcpu = vcpu();
        vcpu.interrupt_flag = false;
        let mut p = platform(&[0x9c]); // pushfq
        // Real IF is always set in a user process; the virtual one is clear.
        p.regs.eflags = 0x202 | RFLAGS_CF | RFLAGS_ZF | RFLAGS_ID | RFLAGS_RF | RFLAGS_IOPL;
        let rsp = p.regs.rsp;
        run_ok(&mut vcpu, &mut p, 1);
        assert_eq!(p.regs.rsp, rsp - 8);
        let image = u64::from_le_bytes(p.peek(rsp - 8, 8).try_into().unwrap());
        assert_eq!(image, 0x2 | RFLAGS_CF | RFLAGS_ZF | RFLAGS_ID);
    }

    #[test]
    fn popf_sets_the_virtual_interrupt_flag() {
        let mut vcpu = vcpu();
        vcpu.interrupt_flag = false;
        let mut p = platform(&[0x9d]); // popfq
        let rsp = p.regs.rsp;
        let popped = RFLAGS_IF | RFLAGS_CF | RFLAGS_OF | RFLAGS_TF | RFLAGS_NT | RFLAGS_ID | 0x2;
        p.poke(rsp, &popped.to_le_bytes());
        p.regs.eflags = 0x202 | RFLAGS_ZF;
        run_ok(&mut vcpu, &mut p, 1);
        assert!(vcpu.interrupts_enabled());
        assert_eq!(
            p.regs.eflags,
            0x202 | RFLAGS_CF | RFLAGS_OF,
            "ZF cleared, CF/OF set, TF/NT/ID ignored"
        );
        assert_eq!(p.regs.rsp, rsp + 8);
    }

    #[test]
    fn popf_clearing_if_disables_interrupts() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x9d]);
        let rsp = p.regs.rsp;
        p.poke(rsp, &(RFLAGS_AC | RFLAGS_DF | 0x2).to_le_bytes());
        run_ok(&mut vcpu, &mut p, 1);
        assert!(!vcpu.interrupts_enabled());
        assert_eq!(p.regs.eflags, 0x202 | RFLAGS_AC | RFLAGS_DF);
    }

    #[test]
    fn pushfw_and_popfw_move_16_bits() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x66, 0x9c]); // pushfw
        p.regs.eflags = 0x202 | RFLAGS_AC;
        let rsp = p.regs.rsp;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(p.regs.rsp, rsp - 2);
        assert_eq!(p.peek(rsp - 2, 2), &0x0202u16.to_le_bytes());
        // popfw of 0x0001: CF set, IF cleared, AC (bit 18) kept.
        let mut p2 = platform(&[0x66, 0x9d]);
        p2.regs.eflags = 0x202 | RFLAGS_AC;
        let rsp = p2.regs.rsp;
        p2.poke(rsp, &1u16.to_le_bytes());
        run_ok(&mut vcpu, &mut p2, 2);
        assert_eq!(p2.regs.rsp, rsp + 2);
        assert!(!vcpu.interrupts_enabled());
        assert_eq!(p2.regs.eflags, 0x202 | RFLAGS_AC | RFLAGS_CF);
    }

    #[test]
    fn pushf_with_an_unmapped_stack_is_an_operand_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x9c]);
        p.regs.rsp = UNMAPPED;
        let err = run(&mut vcpu, &mut p).unwrap_err();
        assert!(
            matches!(err, EmulateError::AccessOperand { fault, .. } if fault.write && fault.gva == UNMAPPED - 8),
            "{err:?}"
        );
        assert_eq!((p.regs.rsp, p.regs.rip), (UNMAPPED, CODE));
    }

    #[test]
    fn popf_with_an_unmapped_stack_is_an_operand_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x9d]);
        p.regs.rsp = UNMAPPED;
        let err = run(&mut vcpu, &mut p).unwrap_err();
        assert!(
            matches!(err, EmulateError::AccessOperand { fault, .. } if !fault.write),
            "{err:?}"
        );
        assert!(vcpu.interrupts_enabled(), "nothing changed");
    }
}
