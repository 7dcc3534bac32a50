//! The memory an instruction writes, from its bytes and the registers: what the DSM must own
//! before the instruction may run (a locked instruction, an emulated store) or to let a
//! faulting store go on (a store across a page boundary needs both pages, acquired together
//! in ascending order).
#![forbid(unsafe_code)]

use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory, OpAccess, Register};

use super::operand::read_reg;
use crate::platform::Regs;

/// The most write ranges an instruction has (x86 instructions write at most two memory
/// operands; `enter` and string instructions one).
pub const MAX_WRITES: usize = 4;

/// Where an instruction writes: up to [`MAX_WRITES`] ranges `(address, bytes)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Writes {
    pub ranges: [(u64, u64); MAX_WRITES],
    pub count: usize,
}

impl Writes {
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges[..self.count].iter().copied()
    }
}

/// Decodes the instruction in `bytes` at `rip` and computes the memory it writes (for a `rep`
/// string instruction, one element: its next iteration). `None` if it does not decode or an
/// address cannot be computed. `factory` is kept by the caller so that nothing allocates.
pub fn written_memory(
    bytes: &[u8],
    rip: u64,
    regs: &Regs,
    factory: &mut InstructionInfoFactory,
) -> Option<Writes> {
    let instr = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE).decode();
    if instr.is_invalid() {
        return None;
    }
    let mut regs = *regs;
    let info = factory.info(&instr);
    let mut w = Writes::default();
    for m in info.used_memory() {
        let writes = matches!(
            m.access(),
            OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
        );
        if !writes || w.count == MAX_WRITES {
            continue;
        }
        let addr = m.virtual_address(0, |reg, _, _| match reg {
            Register::FS => Some(regs.fs_base),
            Register::GS => Some(regs.gs_base),
            Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
            other => read_reg(&mut regs, other),
        })?;
        let size = m.memory_size().size().max(1) as u64;
        w.ranges[w.count] = (addr, size);
        w.count += 1;
    }
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(code: &[u8], regs: Regs) -> Vec<(u64, u64)> {
        let mut f = InstructionInfoFactory::new();
        written_memory(code, 0x1000, &regs, &mut f)
            .unwrap()
            .iter()
            .collect()
    }

    #[test]
    fn a_store_writes_its_operand_and_a_load_writes_nothing() {
        let regs = Regs {
            rbx: 0x2ffc,
            ..Regs::default()
        };
        assert_eq!(writes(&[0x48, 0x89, 0x03], regs), vec![(0x2ffc, 8)]); // mov %rax,(%rbx)
        assert_eq!(writes(&[0x48, 0x8b, 0x03], regs), vec![]); // mov (%rbx),%rax
    }

    #[test]
    fn locked_and_string_instructions_write_their_element() {
        let regs = Regs {
            rbx: 0x3000,
            rdi: 0x4000,
            rsp: 0x8000,
            ..Regs::default()
        };
        assert_eq!(writes(&[0xf0, 0x0f, 0xc1, 0x03], regs), vec![(0x3000, 4)]); // lock xadd
        assert_eq!(writes(&[0xf3, 0xaa], regs), vec![(0x4000, 1)]); // rep stosb
        assert_eq!(writes(&[0x50], regs), vec![(0x7ff8, 8)]); // push %rax
    }

    #[test]
    fn garbage_does_not_decode() {
        let mut f = InstructionInfoFactory::new();
        assert!(written_memory(&[0x0f, 0xff], 0, &Regs::default(), &mut f).is_none());
    }
}
