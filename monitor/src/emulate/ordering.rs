//! Memory-ordering instructions: `mfence`, `lfence`, `sfence`, `serialize`, every
//! `lock`-prefixed instruction, and `xchg` with a memory operand (implicitly locked).
//!
//! The DSM drains the node's store buffer at these (`docs/coherence.md`):
//! - `mfence` and `serialize` end in [`Outcome::Fence`] (nothing to emulate; the monitor
//!   drains before the vCPU goes on);
//! - `lfence` and `sfence` order nothing on write-back memory under x86-TSO: skipped;
//! - a locked instruction or `xchg` with memory ends in [`Outcome::Atomic`]: the monitor runs
//!   it natively on pages its node owns, then drains.
//!
//! They are not privileged, so they never fault with #GP: a native fault at one is a bad
//! memory access, reported as [`EmulateError::NotSensitive`].
#![forbid(unsafe_code)]

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::{EmulateError, Insn, Outcome, Trap};

/// Whether `instr` orders memory (see the module documentation).
pub(crate) fn is_ordering(instr: &Instruction) -> bool {
    instr.has_lock_prefix()
        || matches!(
            instr.mnemonic(),
            Mnemonic::Mfence | Mnemonic::Lfence | Mnemonic::Sfence | Mnemonic::Serialize
        )
        || (instr.mnemonic() == Mnemonic::Xchg
            && (instr.op0_kind() == OpKind::Memory || instr.op1_kind() == OpKind::Memory))
}

pub(crate) fn emulate(insn: &Insn) -> Result<Outcome, EmulateError> {
    if let Trap::Fault { .. } = insn.trap {
        return Err(EmulateError::NotSensitive {
            site: insn.site,
            trap: insn.trap,
        });
    }
    Ok(match insn.instr.mnemonic() {
        Mnemonic::Mfence | Mnemonic::Serialize => Outcome::Fence,
        Mnemonic::Lfence | Mnemonic::Sfence => Outcome::Resume,
        _ => Outcome::Atomic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::handle_trap;
    use crate::emulate::test_util::*;

    #[test]
    fn locked_instructions_and_xchg_with_memory_run_natively_at_the_instruction() {
        let cases: [(&[u8], Mnemonic); 4] = [
            (&[0xf0, 0x48, 0x0f, 0xc1, 0x03], Mnemonic::Xadd), // lock xadd %rax,(%rbx)
            (&[0xf0, 0x48, 0x0f, 0xb1, 0x0b], Mnemonic::Cmpxchg), // lock cmpxchg %rcx,(%rbx)
            (&[0xf0, 0xff, 0x03], Mnemonic::Inc),              // lock incl (%rbx)
            (&[0x48, 0x87, 0x03], Mnemonic::Xchg),             // xchg %rax,(%rbx)
        ];
        for (code, mnemonic) in cases {
            let mut vcpu = vcpu();
            let mut p = platform(code);
            let before = p.regs;
            let e = run(&mut vcpu, &mut p).unwrap();
            assert_eq!((e.outcome, e.mnemonic), (Outcome::Atomic, mnemonic));
            assert_eq!(
                p.regs, before,
                "nothing changes, rip stays at the instruction"
            );
        }
    }

    #[test]
    fn fences_drain_or_are_skipped_after_the_instruction() {
        let cases: [(&[u8], Mnemonic, Outcome); 4] = [
            (&[0x0f, 0x01, 0xe8], Mnemonic::Serialize, Outcome::Fence),
            (&[0x0f, 0xae, 0xf0], Mnemonic::Mfence, Outcome::Fence),
            (&[0x0f, 0xae, 0xe8], Mnemonic::Lfence, Outcome::Resume),
            (&[0x0f, 0xae, 0xf8], Mnemonic::Sfence, Outcome::Resume),
        ];
        for (code, mnemonic, outcome) in cases {
            let mut p = platform(code);
            let e = run(&mut vcpu(), &mut p).unwrap();
            assert_eq!((e.outcome, e.mnemonic), (outcome, mnemonic));
            assert_eq!(p.regs.rip, CODE + code.len() as u64, "resumes after it");
        }
    }

    #[test]
    fn xchg_between_registers_is_not_a_memory_ordering_instruction() {
        let mut p = platform(&[0x48, 0x87, 0xc3]); // xchg %rax,%rbx
        assert!(matches!(
            run(&mut vcpu(), &mut p),
            Err(EmulateError::NotSensitive { .. })
        ));
    }

    #[test]
    fn a_native_fault_at_a_locked_instruction_is_a_bad_memory_access() {
        let mut p = platform(&[0xf0, 0xff, 0x03]);
        let err = handle_trap(&mut vcpu(), &mut p, Trap::Fault { insn: CODE }).unwrap_err();
        assert!(matches!(err, EmulateError::NotSensitive { .. }), "{err:?}");
        assert!(err.to_string().contains("lock incl (%rbx)"), "{err}");
    }
}
