//! `cli`, `sti`, `pushf`, `popf`: the virtual system flags.
//!
//! A user process cannot change its real IF, IOPL, NT or ID (ptrace refuses them), so the
//! vCPU keeps them ([`Vcpu::system_flags`]). The guest's arithmetic and control flags (CF, PF,
//! AF, ZF, SF, DF, OF, AC) are the real ones in RFLAGS.
//!
//! - `cli`/`sti` clear/set the virtual IF. (`sti`'s one-instruction interrupt shadow does not
//!   matter until interrupts are injected.)
//! - `pushf` (`pushfq`, 8 bytes; `pushfw` with a 66 prefix, 2 bytes) pushes the real
//!   arithmetic flags merged with the virtual system flags, bit 1 set, and TF, RF and VM
//!   clear (the image carries no host debugging state).
//! - `popf` (`popfq`; `popfw` changes only bits 15:0) sets the real arithmetic flags and the
//!   virtual IF, IOPL, NT and ID from the popped value; RF, VM, VIF and VIP are not changed
//!   and reserved bits are ignored, as at CPL 0. Setting TF (single-step) is refused with an
//!   error: the monitor cannot deliver the #DB it would cause.
#![forbid(unsafe_code)]

use iced_x86::Mnemonic;

use super::operand::{pop, push};
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
pub const RFLAGS_AC: u64 = 1 << 18;
pub const RFLAGS_ID: u64 = 1 << 21;

/// Flags the guest owns in its real RFLAGS.
pub const REAL_FLAGS: u64 =
    RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_DF | RFLAGS_OF | RFLAGS_AC;
/// Flags the vCPU keeps virtually.
pub const SYSTEM_FLAGS: u64 = RFLAGS_IF | RFLAGS_IOPL | RFLAGS_NT | RFLAGS_ID;

/// RFLAGS as the guest sees it: the real arithmetic flags and the virtual system flags.
pub fn guest_rflags(vcpu: &Vcpu, real: u64) -> u64 {
    (real & REAL_FLAGS) | (vcpu.system_flags & SYSTEM_FLAGS) | RFLAGS_FIXED
}

/// Applies a value `popf` loaded (all 64 bits) to the real and virtual flags.
fn set_guest_rflags(vcpu: &mut Vcpu, real: &mut u64, value: u64) {
    *real = (*real & !REAL_FLAGS) | (value & REAL_FLAGS);
    vcpu.system_flags = value & SYSTEM_FLAGS;
}

pub(crate) fn emulate(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    match insn.instr.mnemonic() {
        Mnemonic::Cli => vcpu.system_flags &= !RFLAGS_IF,
        Mnemonic::Sti => vcpu.system_flags |= RFLAGS_IF,
        Mnemonic::Pushf | Mnemonic::Pushfd | Mnemonic::Pushfq => {
            let len = insn.instr.stack_pointer_increment().unsigned_abs() as usize;
            let image = guest_rflags(vcpu, p.regs().eflags);
            push(p, insn, image, len)?;
        }
        Mnemonic::Popf | Mnemonic::Popfd | Mnemonic::Popfq => {
            let len = insn.instr.stack_pointer_increment().unsigned_abs() as usize;
            let rsp = p.regs().rsp;
            let popped = super::operand::read_u64(p, insn, rsp, len)?;
            let current = guest_rflags(vcpu, p.regs().eflags);
            let value = if len == 2 {
                (current & !0xffff) | popped
            } else {
                popped
            };
            if value & RFLAGS_TF != 0 {
                return Err(
                    insn.unsupported("popf setting the trap flag: single-step is not emulated")
                );
            }
            pop(p, insn, len)?;
            set_guest_rflags(vcpu, &mut p.regs().eflags, value);
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
    fn sti_sets_and_cli_clears_the_virtual_interrupt_flag() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xfb]); // sti
        run_ok(&mut vcpu, &mut p, 1);
        assert!(vcpu.interrupts_enabled());
        assert_eq!(p.regs.eflags, 0x202, "the real flags are untouched");
        let mut p = platform(&[0xfa]); // cli
        run_ok(&mut vcpu, &mut p, 1);
        assert!(!vcpu.interrupts_enabled());
    }

    #[test]
    fn pushfq_pushes_the_virtual_interrupt_flag_and_the_real_arithmetic_flags() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x9c]); // pushfq
        // Real IF is always set in a user process; the virtual one is clear. CF and ZF set,
        // and TF, which a debugger might have set, must not leak.
        p.regs.eflags = 0x202 | RFLAGS_CF | RFLAGS_ZF | RFLAGS_TF;
        let rsp = p.regs.rsp;
        run_ok(&mut vcpu, &mut p, 1);
        assert_eq!(p.regs.rsp, rsp - 8);
        let image = u64::from_le_bytes(p.peek(rsp - 8, 8).try_into().unwrap());
        assert_eq!(image, 0x2 | RFLAGS_CF | RFLAGS_ZF);
    }

    #[test]
    fn popf_sets_the_virtual_interrupt_flag() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x9d]); // popfq
        let rsp = p.regs.rsp;
        p.poke(
            rsp,
            &(RFLAGS_IF | RFLAGS_ID | RFLAGS_CF | RFLAGS_OF | 0x2).to_le_bytes(),
        );
        p.regs.eflags = 0x202 | RFLAGS_ZF;
        run_ok(&mut vcpu, &mut p, 1);
        assert!(vcpu.interrupts_enabled());
        assert_eq!(vcpu.system_flags, RFLAGS_IF | RFLAGS_ID);
        assert_eq!(
            p.regs.eflags,
            0x202 | RFLAGS_CF | RFLAGS_OF,
            "ZF cleared, CF and OF set, real IF kept"
        );
        assert_eq!(p.regs.rsp, rsp + 8);
    }

    #[test]
    fn pushfw_and_popfw_move_16_bits() {
        let mut vcpu = vcpu();
        vcpu.system_flags = RFLAGS_IF | RFLAGS_ID;
        let mut p = platform(&[0x66, 0x9c]); // pushfw
        let rsp = p.regs.rsp;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(p.regs.rsp, rsp - 2);
        assert_eq!(p.peek(rsp - 2, 2), &0x0202u16.to_le_bytes());
        // popfw of 0x0001: CF set, IF cleared, ID (bit 21) kept.
        let mut p = platform(&[0x66, 0x9d]);
        let rsp = p.regs.rsp;
        p.poke(rsp, &1u16.to_le_bytes());
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(p.regs.rsp, rsp + 2);
        assert_eq!(vcpu.system_flags, RFLAGS_ID);
        assert_eq!(p.regs.eflags & REAL_FLAGS, RFLAGS_CF);
    }

    #[test]
    fn popf_setting_the_trap_flag_is_refused() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x9d]);
        let rsp = p.regs.rsp;
        p.poke(rsp, &(RFLAGS_TF | 2).to_le_bytes());
        let err = run(&mut vcpu, &mut p).unwrap_err();
        assert!(err.to_string().contains("trap flag"), "{err}");
        assert_eq!(p.regs.rsp, rsp);
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
    }
}
