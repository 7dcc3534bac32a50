//! Segment registers: `mov` to and from `%cs`/`%ss`/`%ds`/`%es`/`%fs`/`%gs`, `push`/`pop` of
//! `%fs`/`%gs`, and `swapgs`.
//!
//! The VM process keeps the host's flat user selectors, which ptrace will not let us change
//! arbitrarily; the guest sees virtual selectors ([`Vcpu::selectors`], initially
//! `%cs` = 0x10, `%ss`/`%ds`/`%es` = 0x18, `%fs`/`%gs` = 0, as in a Linux kernel). Loading a
//! selector stores it and changes nothing real: in 64-bit mode the CS/SS/DS/ES bases are 0
//! anyway, and the FS/GS bases change only through the FS_BASE/GS_BASE MSRs, `wrfsbase`/
//! `wrgsbase` and `swapgs` (a load of `%fs`/`%gs` does not reset the base as it would from a
//! real descriptor). A non-null selector must lie within the GDT limit once a GDT is loaded,
//! and must not refer to the LDT; a null selector is accepted (also for `%ss`, as at CPL 0
//! in 64-bit mode). `mov` to `%cs` does not exist (#UD).
//!
//! `mov` from a segment register stores 16 bits to memory and zero-extends into a 32/64-bit
//! register. `swapgs` exchanges the real GS base with KERNEL_GS_BASE.
#![forbid(unsafe_code)]

use iced_x86::{Code, Instruction, Register};

use super::operand::{pop, push, read_rm, write_rm};
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

fn load(vcpu: &mut Vcpu, insn: &Insn, reg: Register, selector: u16) -> Result<(), EmulateError> {
    if reg == Register::CS {
        return Err(insn.general_protection("mov to %cs does not exist (#UD)"));
    }
    if selector & !0x3 != 0 {
        if selector & 0x4 != 0 {
            return Err(insn.general_protection("segment selector refers to the ldt"));
        }
        let limit = vcpu.tables.gdtr.limit;
        if limit != 0 && u32::from(selector | 0x7) > u32::from(limit) {
            return Err(insn.general_protection("segment selector beyond the gdt limit"));
        }
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
        let rsp = p.regs().rsp;
        let selector = super::operand::read_u64(p, insn, rsp, len)? as u16;
        load(vcpu, insn, reg, selector)?;
        pop(p, insn, len)?;
    }
    Ok(Outcome::Resume)
}

pub(crate) fn swapgs(vcpu: &mut Vcpu, p: &mut impl Platform) -> Result<Outcome, EmulateError> {
    std::mem::swap(&mut p.regs().gs_base, &mut vcpu.msrs.kernel_gs_base);
    Ok(Outcome::Resume)
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn mov_from_ss_reads_the_virtual_selector_zero_extended() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x8c, 0xd0]); // mov %ss,%eax
        p.regs.rax = u64::MAX;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(p.regs.rax, 0x18);
        let mut p = platform(&[0x8c, 0x0b]); // mov %cs,(%rbx)
        p.regs.rbx = DATA;
        p.poke(DATA, &[0xaa; 4]);
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(p.peek(DATA, 4), &[0x10, 0, 0xaa, 0xaa]);
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
        assert_eq!(vcpu.selectors.ss, 0x18);
    }

    #[test]
    fn a_selector_beyond_the_loaded_gdt_or_in_the_ldt_is_refused_but_null_is_accepted() {
        let mut vcpu = vcpu();
        vcpu.tables.gdtr.limit = 0x1f;
        let mut p = platform(&[0x8e, 0xe0]); // mov %eax,%fs
        p.regs.rax = 0x20;
        assert!(
            run(&mut vcpu, &mut p)
                .unwrap_err()
                .to_string()
                .contains("gdt limit")
        );
        p.regs.rax = 0x1c;
        assert!(
            run(&mut vcpu, &mut p)
                .unwrap_err()
                .to_string()
                .contains("ldt")
        );
        p.regs.rax = 0x18;
        run_ok(&mut vcpu, &mut p, 2);
        p.regs.rip = CODE;
        p.regs.rax = 0;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(vcpu.selectors.fs, 0);
    }

    #[test]
    fn push_and_pop_fs_and_gs_move_virtual_selectors() {
        let mut vcpu = vcpu();
        vcpu.selectors.gs = 0x18;
        let mut p = platform(&[0x0f, 0xa8]); // push %gs
        let rsp = p.regs.rsp;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(
            (p.regs.rsp, p.peek(rsp - 8, 8)),
            (rsp - 8, &0x18u64.to_le_bytes()[..])
        );
        let mut p2 = platform(&[0x0f, 0xa1]); // pop %fs
        p2.regs.rsp = p.regs.rsp;
        p2.mem = p.mem.clone();
        p2.poke(CODE, &[0x0f, 0xa1]);
        run_ok(&mut vcpu, &mut p2, 2);
        assert_eq!((vcpu.selectors.fs, p2.regs.rsp), (0x18, rsp));
    }
}
