//! Operand access shared by the handlers: general registers by iced register name (with the
//! x86-64 width rules), effective addresses, memory operands and the stack.
#![forbid(unsafe_code)]

use iced_x86::{OpKind, Register};

use super::{EmulateError, Insn};
use crate::platform::{Platform, Regs};

/// The 64-bit register field behind a full general register, if `full` is one.
fn gpr(regs: &mut Regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RBX => &mut regs.rbx,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

/// Reads general register `reg` of any width (zero-extended), or `None` if it is not one.
pub(crate) fn read_reg(regs: &mut Regs, reg: Register) -> Option<u64> {
    let full = *gpr(regs, reg.full_register())?;
    Some(if is_high_byte(reg) {
        (full >> 8) & 0xff
    } else {
        match reg.size() {
            8 => full,
            4 => full & 0xffff_ffff,
            2 => full & 0xffff,
            _ => full & 0xff,
        }
    })
}

/// Writes general register `reg` with x86-64 rules: a 32-bit write zero-extends to 64 bits,
/// 16- and 8-bit writes keep the other bits. Returns `None` if `reg` is not a general register.
pub(crate) fn write_reg(regs: &mut Regs, reg: Register, value: u64) -> Option<()> {
    let high = is_high_byte(reg);
    let size = reg.size();
    let slot = gpr(regs, reg.full_register())?;
    *slot = if high {
        (*slot & !0xff00) | ((value & 0xff) << 8)
    } else {
        match size {
            8 => value,
            4 => value & 0xffff_ffff,
            2 => (*slot & !0xffff) | (value & 0xffff),
            _ => (*slot & !0xff) | (value & 0xff),
        }
    };
    Some(())
}

/// The guest-virtual address of memory operand `op` of the instruction.
pub(crate) fn effective_address(
    regs: &mut Regs,
    insn: &Insn,
    op: u32,
) -> Result<u64, EmulateError> {
    insn.instr
        .virtual_address(op, 0, |reg, _, _| match reg {
            Register::FS => Some(regs.fs_base),
            Register::GS => Some(regs.gs_base),
            Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
            other => read_reg(regs, other),
        })
        .ok_or_else(|| insn.unsupported("memory operand with an unexpected base or index register"))
}

fn is_memory(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Memory
            | OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemorySegDI
            | OpKind::MemorySegEDI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI
    )
}

/// Reads `len` (1..=8) little-endian bytes at `gva`.
pub(crate) fn read_u64(
    p: &mut impl Platform,
    insn: &Insn,
    gva: u64,
    len: usize,
) -> Result<u64, EmulateError> {
    let mut buf = [0u8; 8];
    let len = len.min(8);
    p.read_mem(gva, &mut buf[..len])
        .map_err(|f| insn.operand_fault(f))?;
    Ok(u64::from_le_bytes(buf))
}

/// Writes the low `len` (1..=8) bytes of `value` at `gva`, little-endian.
pub(crate) fn write_u64(
    p: &mut impl Platform,
    insn: &Insn,
    gva: u64,
    value: u64,
    len: usize,
) -> Result<(), EmulateError> {
    p.write_mem(gva, &value.to_le_bytes()[..len.min(8)])
        .map_err(|f| insn.operand_fault(f))
}

/// Reads operand `op`, a register or memory, `mem_len` bytes if it is memory.
pub(crate) fn read_rm(
    p: &mut impl Platform,
    insn: &Insn,
    op: u32,
    mem_len: usize,
) -> Result<u64, EmulateError> {
    let kind = insn.instr.op_kind(op);
    if kind == OpKind::Register {
        let reg = insn.instr.op_register(op);
        return read_reg(p.regs(), reg)
            .ok_or_else(|| insn.unsupported("operand is not a general register"));
    }
    if !is_memory(kind) {
        return Err(insn.unsupported("operand is neither a register nor memory"));
    }
    let gva = effective_address(p.regs(), insn, op)?;
    read_u64(p, insn, gva, mem_len)
}

/// Writes operand `op`: a register with the width rules of [`write_reg`], or `mem_len`
/// bytes of memory.
pub(crate) fn write_rm(
    p: &mut impl Platform,
    insn: &Insn,
    op: u32,
    value: u64,
    mem_len: usize,
) -> Result<(), EmulateError> {
    let kind = insn.instr.op_kind(op);
    if kind == OpKind::Register {
        let reg = insn.instr.op_register(op);
        return write_reg(p.regs(), reg, value)
            .ok_or_else(|| insn.unsupported("operand is not a general register"));
    }
    if !is_memory(kind) {
        return Err(insn.unsupported("operand is neither a register nor memory"));
    }
    let gva = effective_address(p.regs(), insn, op)?;
    write_u64(p, insn, gva, value, mem_len)
}

/// Pushes the low `len` bytes of `value`; RSP moves only if the write succeeds.
pub(crate) fn push(
    p: &mut impl Platform,
    insn: &Insn,
    value: u64,
    len: usize,
) -> Result<(), EmulateError> {
    let rsp = p.regs().rsp.wrapping_sub(len as u64);
    write_u64(p, insn, rsp, value, len)?;
    p.regs().rsp = rsp;
    Ok(())
}

/// Pops `len` bytes; RSP moves only if the read succeeds.
pub(crate) fn pop(p: &mut impl Platform, insn: &Insn, len: usize) -> Result<u64, EmulateError> {
    let rsp = p.regs().rsp;
    let value = read_u64(p, insn, rsp, len)?;
    p.regs().rsp = rsp.wrapping_add(len as u64);
    Ok(value)
}

/// Whether `addr` is canonical for 48-bit virtual addresses (bits 63:47 all equal).
pub(crate) const fn is_canonical(addr: u64) -> bool {
    let top = (addr as i64) >> 47;
    top == 0 || top == -1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_32_bit_register_write_zero_extends_and_narrower_ones_merge() {
        let mut regs = Regs {
            rax: u64::MAX,
            rbx: u64::MAX,
            rcx: u64::MAX,
            rdx: u64::MAX,
            ..Regs::default()
        };
        write_reg(&mut regs, Register::EAX, 0x1234).unwrap();
        write_reg(&mut regs, Register::BX, 0x1234).unwrap();
        write_reg(&mut regs, Register::CL, 0x12).unwrap();
        write_reg(&mut regs, Register::DH, 0x12).unwrap();
        assert_eq!(regs.rax, 0x1234);
        assert_eq!(regs.rbx, 0xffff_ffff_ffff_1234);
        assert_eq!(regs.rcx, 0xffff_ffff_ffff_ff12);
        assert_eq!(regs.rdx, 0xffff_ffff_ffff_12ff);
        assert_eq!(read_reg(&mut regs, Register::DH), Some(0x12));
        assert_eq!(read_reg(&mut regs, Register::ES), None);
    }

    #[test]
    fn canonical_addresses_are_those_with_bits_63_to_47_equal() {
        assert!(is_canonical(0x7fff_ffff_ffff));
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(!is_canonical(0x8000_0000_0000));
    }
}
