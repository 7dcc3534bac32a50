//! Segment registers: `mov` to and from `%ss`/`%ds`/`%es`/`%fs`/`%gs` (and from `%cs`),
//! `push`/`pop` of `%fs`/`%gs`, `lfs`/`lgs`/`lss`, and `swapgs`
//! (`docs/guest-platform.md`, "Flags, segments and descriptor tables").
//!
//! The VM process keeps the host's flat user selectors (ptrace will not let us change them
//! arbitrarily). A load stores the selector in the vCPU ([`Vcpu::selectors`]) and changes
//! nothing real: in 64-bit mode the CS/SS/DS/ES bases are 0 anyway, and loading `%fs`/`%gs`
//! does **not** change their bases, which change only through the FS_BASE/GS_BASE MSRs,
//! `wrfsbase`/`wrgsbase` and `swapgs`. The descriptor tables are not read, so any selector is
//! accepted. `mov` to `%cs` does not exist (`#UD`).
//!
//! Reads (`mov %ds,%ax`, `push %fs`) are not sensitive and normally run natively, returning
//! the host's selectors; if a marker precedes one anyway, it returns the virtual selector,
//! which starts equal to the host's (CS 0x33, SS 0x2b, the others 0): 16 bits to memory,
//! zero-extended into a 32/64-bit register.
//!
//! `lfs`/`lgs`/`lss` load a far pointer: the offset (2, 4 or 8 bytes by operand size) into
//! the register, then the 16-bit selector that follows it into the segment register.
//!
//! `swapgs` exchanges the real GS base with KERNEL_GS_BASE.
#![forbid(unsafe_code)]

use iced_x86::{Code, Instruction, Mnemonic, Register};

use super::operand::{effective_address, pop, push, read_rm, read_u64, write_reg, write_rm};
use super::{EmulateError, Insn, Outcome};
use crate::platform::Platform;
use crate::vcpu::Vcpu;

/// Whether `instr` moves to or from a segment register.
pub(crate) fn is_mov_sreg(instr: &Instruction) -> bool {
    matches!(
        instr.code(),
        Code::Mov_rm16_Sreg
            | Code::Mov_r32m16_Sreg
            | Code::Mov_r64m16_Sreg
            | Code::Mov_Sreg_rm16
            | Code::Mov_Sreg_r32m16
            | Code::Mov_Sreg_r64m16
    )
}

/// Whether `instr` pushes or pops `%fs` or `%gs`.
pub(crate) fn is_push_pop_fs_gs(instr: &Instruction) -> bool {
    matches!(
        instr.code(),
        Code::Pushq_FS
            | Code::Pushw_FS
            | Code::Popq_FS
            | Code::Popw_FS
            | Code::Pushq_GS
            | Code::Pushw_GS
            | Code::Popq_GS
            | Code::Popw_GS
    )
}

fn selector_slot(vcpu: &mut Vcpu, reg: Register) -> Option<&mut u16> {
    let s = &mut vcpu.selectors;
    Some(match reg {
        Register::CS => &mut s.cs,
        Register::SS => &mut s.ss,
        Register::DS => &mut s.ds,
        Register::ES => &mut s.es,
        Register::FS => &mut s.fs,
        Register::GS => &mut s.gs,
        _ => return None,
    })
}

/// Loads `selector` into segment register `reg` (virtually).
pub(crate) fn load(
    vcpu: &mut Vcpu,
    insn: &Insn,
    reg: Register,
    selector: u16,
) -> Result<(), EmulateError> {
    if reg == Register::CS {
        return Err(insn.invalid_opcode("mov to %cs does not exist"));
    }
    let slot =
        selector_slot(vcpu, reg).ok_or_else(|| insn.unsupported("unknown segment register"))?;
    *slot = selector;
    Ok(())
}

pub(crate) fn mov_sreg(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    let instr = &insn.instr;
    match instr.code() {
        Code::Mov_Sreg_rm16 | Code::Mov_Sreg_r32m16 | Code::Mov_Sreg_r64m16 => {
            let selector = read_rm(p, insn, 1, 2)? as u16;
            load(vcpu, insn, instr.op0_register(), selector)?;
        }
        _ => {
            let selector = *selector_slot(vcpu, instr.op1_register())
                .ok_or_else(|| insn.unsupported("unknown segment register"))?;
            write_rm(p, insn, 0, selector.into(), 2)?;
        }
    }
    Ok(Outcome::Resume)
}

pub(crate) fn push_pop_fs_gs(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    let instr = &insn.instr;
    let len = instr.stack_pointer_increment().unsigned_abs() as usize;
    let (reg, is_push) = match instr.code() {
        Code::Pushq_FS | Code::Pushw_FS => (Register::FS, true),
        Code::Pushq_GS | Code::Pushw_GS => (Register::GS, true),
        Code::Popq_FS | Code::Popw_FS => (Register::FS, false),
        _ => (Register::GS, false),
    };
    if is_push {
        let selector = if reg == Register::FS {
            vcpu.selectors.fs
        } else {
            vcpu.selectors.gs
        };
        push(p, insn, selector.into(), len)?;
    } else {
        let selector = pop(p, insn, len)? as u16;
        load(vcpu, insn, reg, selector)?;
    }
    Ok(Outcome::Resume)
}

/// `lfs`, `lgs`, `lss`: op0 = the offset register, op1 = the far pointer in memory.
pub(crate) fn load_far_pointer(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    let instr = &insn.instr;
    let reg = instr.op0_register();
    let offset_len = reg.size();
    let gva = effective_address(p.regs(), insn, 1)?;
    let offset = read_u64(p, insn, gva, offset_len)?;
    let selector = read_u64(p, insn, gva.wrapping_add(offset_len as u64), 2)? as u16;
    let sreg = match instr.mnemonic() {
        Mnemonic::Lfs => Register::FS,
        Mnemonic::Lgs => Register::GS,
        _ => Register::SS,
    };
    load(vcpu, insn, sreg, selector)?;
    write_reg(p.regs(), reg, offset)
        .ok_or_else(|| insn.unsupported("far pointer load into a non-general register"))?;
    Ok(Outcome::Resume)
}

pub(crate) fn swapgs(vcpu: &mut Vcpu, p: &mut impl Platform) -> Result<Outcome, EmulateError> {
    std::mem::swap(&mut p.regs().gs_base, &mut vcpu.msrs.kernel_gs_base);
    Ok(Outcome::Resume)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::Exception;
    use crate::emulate::test_util::*;

    #[test]
    fn swapgs_swaps_the_gs_base_with_kernel_gs_base() {
        let mut vcpu = vcpu();
        vcpu.msrs.kernel_gs_base = 0xffff_8880_0000_1000;
        let mut p = platform(&[0x0f, 0x01, 0xf8]);
        p.regs.gs_base = 0x7000;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(
            (p.regs.gs_base, vcpu.msrs.kernel_gs_base),
            (0xffff_8880_0000_1000, 0x7000)
        );
    }

    #[test]
    fn mov_to_ds_stores_a_virtual_selector_and_leaves_the_real_one() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x8e, 0xd8]); // mov %eax,%ds
        p.regs.rax = 0x2b;
        p.regs.ds = 0;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!((vcpu.selectors.ds, p.regs.ds), (0x2b, 0));
    }

    #[test]
    fn mov_to_fs_keeps_the_fs_base() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x8e, 0xe0]); // mov %eax,%fs
        p.regs.rax = 0x1234;
        p.regs.fs_base = 0x5000;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!((vcpu.selectors.fs, p.regs.fs_base), (0x1234, 0x5000));
    }

    #[test]
    fn mov_to_es_and_ss_from_memory_and_from_a_register() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x8e, 0x00]); // mov (%rax),%es
        p.regs.rax = DATA;
        p.poke(DATA, &[0x18, 0, 0xff, 0xff]);
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(vcpu.selectors.es, 0x18);
        let mut p = platform(&[0x8e, 0xd3]); // mov %ebx,%ss
        p.regs.rbx = 0;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(vcpu.selectors.ss, 0);
    }

    #[test]
    fn mov_from_ss_and_cs_reads_the_virtual_selector() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x8c, 0xd0]); // mov %ss,%eax
        p.regs.rax = u64::MAX;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(p.regs.rax, 0x2b);
        let mut p = platform(&[0x8c, 0x0b]); // mov %cs,(%rbx)
        p.regs.rbx = DATA;
        p.poke(DATA, &[0xaa; 4]);
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(p.peek(DATA, 4), &[0x33, 0, 0xaa, 0xaa]);
    }

    #[test]
    fn mov_to_ss_from_an_unmapped_operand_is_an_operand_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x8e, 0x10]); // mov (%rax),%ss
        p.regs.rax = UNMAPPED;
        assert!(matches!(
            run(&mut vcpu, &mut p),
            Err(EmulateError::AccessOperand { .. })
        ));
        assert_eq!(vcpu.selectors.ss, 0x2b);
    }

    #[test]
    fn mov_to_cs_is_an_invalid_opcode_or_undecodable() {
        let mut p = platform(&[0x8e, 0xc8]); // mov %eax,%cs
        match run(&mut vcpu(), &mut p) {
            Err(EmulateError::GuestException { exception, .. }) => {
                assert_eq!(exception, Exception::InvalidOpcode)
            }
            Err(EmulateError::DecodeInstruction { .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn push_and_pop_fs_and_gs_move_virtual_selectors() {
        let mut vcpu = vcpu();
        vcpu.selectors.gs = 0x18;
        let mut p = platform(&[0x0f, 0xa8, 0x0f, 0xa1]); // push %gs; pop %fs
        let rsp = p.regs.rsp;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(
            (p.regs.rsp, p.peek(rsp - 8, 8)),
            (rsp - 8, &0x18u64.to_le_bytes()[..])
        );
        crate::emulate::handle_trap(
            &mut vcpu,
            &mut p,
            crate::emulate::Trap::Marker { insn: CODE + 2 },
        )
        .unwrap();
        assert_eq!(
            (vcpu.selectors.fs, p.regs.rsp, p.regs.rip),
            (0x18, rsp, CODE + 4)
        );
    }

    #[test]
    fn pop_gs_from_an_unmapped_stack_is_an_operand_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0xa9]); // pop %gs
        p.regs.rsp = UNMAPPED;
        assert!(matches!(
            run(&mut vcpu, &mut p),
            Err(EmulateError::AccessOperand { .. })
        ));
        assert_eq!((vcpu.selectors.gs, p.regs.rsp), (0, UNMAPPED));
    }

    #[test]
    fn lss_loads_the_offset_and_the_selector() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x48, 0x0f, 0xb2, 0x20]); // lss (%rax),%rsp
        p.regs.rax = DATA;
        p.poke(DATA, &0x1122_3344_5566_7788u64.to_le_bytes());
        p.poke(DATA + 8, &0x18u16.to_le_bytes());
        run_ok(&mut vcpu, &mut p, 4);
        assert_eq!(
            (p.regs.rsp, vcpu.selectors.ss),
            (0x1122_3344_5566_7788, 0x18)
        );
    }

    #[test]
    fn lfs_and_lgs_with_a_32_bit_offset() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0xb4, 0x18, 0x0f, 0xb5, 0x08]); // lfs (%rax),%ebx; lgs (%rax),%ecx
        p.regs.rax = DATA;
        p.regs.rbx = u64::MAX;
        p.poke(DATA, &[0x78, 0x56, 0x34, 0x12, 0x23, 0x00]);
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!((p.regs.rbx, vcpu.selectors.fs), (0x1234_5678, 0x23));
        crate::emulate::handle_trap(
            &mut vcpu,
            &mut p,
            crate::emulate::Trap::Marker { insn: CODE + 3 },
        )
        .unwrap();
        assert_eq!((p.regs.rcx, vcpu.selectors.gs), (0x1234_5678, 0x23));
    }

    #[test]
    fn lgs_from_an_unmapped_operand_is_an_operand_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0xb5, 0x08]);
        p.regs.rax = UNMAPPED;
        p.regs.rcx = 7;
        assert!(matches!(
            run(&mut vcpu, &mut p),
            Err(EmulateError::AccessOperand { .. })
        ));
        assert_eq!((p.regs.rcx, vcpu.selectors.gs), (7, 0));
    }
}
