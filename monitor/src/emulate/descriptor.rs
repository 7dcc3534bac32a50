//! Descriptor-table registers: `lgdt`, `lidt`, `sgdt`, `sidt` (the 10-byte pseudo-descriptor
//! of 64-bit mode: a 16-bit limit, then a 64-bit base) and the selectors `lldt`, `ltr`,
//! `sldt`, `str` (`docs/guest-platform.md`, "Flags, segments and descriptor tables").
//!
//! The registers are virtual ([`Vcpu::tables`], all zero at start) and the tables they point
//! at are not read yet, so there are no descriptor checks: `lgdt`/`lidt` load any value and
//! `sgdt`/`sidt` store it back exactly; `lldt`/`ltr` store the 16-bit selector (from a
//! register or memory) and `sldt`/`str` read it back (16 bits to memory, zero-extended into a
//! 32/64-bit register). The real GDT/IDT of the VM process are the host's.
#![forbid(unsafe_code)]

use iced_x86::Mnemonic;

use super::operand::{effective_address, read_rm, write_rm};
use super::{EmulateError, Insn, Outcome};
use crate::platform::Platform;
use crate::vcpu::{DescriptorTable, Vcpu};

/// Size of the 64-bit mode pseudo-descriptor: a 16-bit limit and a 64-bit base.
const PSEUDO_DESCRIPTOR_BYTES: usize = 10;

pub(crate) fn emulate(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    let mnemonic = insn.instr.mnemonic();
    match mnemonic {
        Mnemonic::Lgdt | Mnemonic::Lidt => {
            let gva = effective_address(p.regs(), insn, 0)?;
            let mut image = [0u8; PSEUDO_DESCRIPTOR_BYTES];
            p.read_mem(gva, &mut image)
                .map_err(|f| insn.operand_fault(f))?;
            let mut base = [0u8; 8];
            base.copy_from_slice(&image[2..]);
            let table = DescriptorTable {
                limit: u16::from_le_bytes([image[0], image[1]]),
                base: u64::from_le_bytes(base),
            };
            if mnemonic == Mnemonic::Lgdt {
                vcpu.tables.gdtr = table;
            } else {
                vcpu.tables.idtr = table;
            }
        }
        Mnemonic::Sgdt | Mnemonic::Sidt => {
            let table = if mnemonic == Mnemonic::Sgdt {
                vcpu.tables.gdtr
            } else {
                vcpu.tables.idtr
            };
            let gva = effective_address(p.regs(), insn, 0)?;
            let mut image = [0u8; PSEUDO_DESCRIPTOR_BYTES];
            image[..2].copy_from_slice(&table.limit.to_le_bytes());
            image[2..].copy_from_slice(&table.base.to_le_bytes());
            p.write_mem(gva, &image)
                .map_err(|f| insn.operand_fault(f))?;
        }
        Mnemonic::Lldt => {
            vcpu.tables.ldtr = read_rm(p, insn, 0, 2)? as u16;
        }
        Mnemonic::Ltr => {
            vcpu.tables.tr = read_rm(p, insn, 0, 2)? as u16;
        }
        Mnemonic::Sldt => write_rm(p, insn, 0, vcpu.tables.ldtr.into(), 2)?,
        Mnemonic::Str => write_rm(p, insn, 0, vcpu.tables.tr.into(), 2)?,
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

    fn pseudo_descriptor(limit: u16, base: u64) -> [u8; 10] {
        let mut d = [0u8; 10];
        d[..2].copy_from_slice(&limit.to_le_bytes());
        d[2..].copy_from_slice(&base.to_le_bytes());
        d
    }

    #[test]
    fn lgdt_then_sgdt_round_trips_the_pseudo_descriptor() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0x10]); // lgdt (%rax)
        p.regs.rax = DATA;
        p.poke(DATA, &pseudo_descriptor(0x3f, 0xffff_ffff_8000_1000));
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(
            vcpu.tables.gdtr,
            DescriptorTable {
                base: 0xffff_ffff_8000_1000,
                limit: 0x3f
            }
        );
        let mut p = platform(&[0x0f, 0x01, 0x03]); // sgdt (%rbx)
        p.regs.rbx = DATA + 0x20;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(
            p.peek(DATA + 0x20, 10),
            &pseudo_descriptor(0x3f, 0xffff_ffff_8000_1000)
        );
    }

    #[test]
    fn lidt_with_a_displacement_then_sidt_round_trips() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0x58, 0x10]); // lidt 0x10(%rax)
        p.regs.rax = DATA;
        p.poke(DATA + 0x10, &pseudo_descriptor(0xfff, 0x20_0000));
        run_ok(&mut vcpu, &mut p, 4);
        assert_eq!(
            vcpu.tables.idtr,
            DescriptorTable {
                base: 0x20_0000,
                limit: 0xfff
            }
        );
        let mut p = platform(&[0x0f, 0x01, 0x0b]); // sidt (%rbx)
        p.regs.rbx = DATA;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.peek(DATA, 10), &pseudo_descriptor(0xfff, 0x20_0000));
    }

    #[test]
    fn lgdt_with_an_unmapped_operand_is_an_operand_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0x10]);
        p.regs.rax = UNMAPPED;
        let err = run(&mut vcpu, &mut p).unwrap_err();
        assert!(
            matches!(err, EmulateError::AccessOperand { fault, .. } if fault.gva == UNMAPPED && !fault.write),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("0xdead0000") && msg.contains("0f 01 10") && msg.contains("lgdt"),
            "{msg}"
        );
        assert_eq!(vcpu.tables.gdtr, DescriptorTable::default());
        assert_eq!(p.regs.rip, CODE);
    }

    #[test]
    fn sidt_to_an_unmapped_operand_is_an_operand_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0x0b]);
        p.regs.rbx = UNMAPPED;
        let err = run(&mut vcpu, &mut p).unwrap_err();
        assert!(
            matches!(err, EmulateError::AccessOperand { fault, .. } if fault.write),
            "{err:?}"
        );
    }

    #[test]
    fn lgdt_stores_any_base_without_descriptor_checks() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0x10]);
        p.regs.rax = DATA;
        p.poke(DATA, &pseudo_descriptor(0, 0x8000_0000_0000));
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(
            vcpu.tables.gdtr,
            DescriptorTable {
                base: 0x8000_0000_0000,
                limit: 0
            }
        );
    }

    #[test]
    fn ltr_then_str_round_trips_the_selector() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x00, 0xd8]); // ltr %ax
        p.regs.rax = 0x40;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.tables.tr, 0x40);
        let mut p = platform(&[0x0f, 0x00, 0xcb]); // str %ebx
        p.regs.rbx = u64::MAX;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.regs.rbx, 0x40);
    }

    #[test]
    fn ltr_and_lldt_store_any_selector_even_null() {
        let mut vcpu = vcpu();
        vcpu.tables.tr = 0x40;
        let mut p = platform(&[0x0f, 0x00, 0xd8]); // ltr %ax
        p.regs.rax = 0xffff_0000;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.tables.tr, 0);
        let mut p = platform(&[0x0f, 0x00, 0xd1]); // lldt %cx
        p.regs.rcx = 0xfffc;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.tables.ldtr, 0xfffc);
    }

    #[test]
    fn lldt_from_memory_then_sldt_to_memory_round_trips() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x00, 0x10]); // lldt (%rax)
        p.regs.rax = DATA;
        p.poke(DATA, &0x28u16.to_le_bytes());
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.tables.ldtr, 0x28);
        let mut p = platform(&[0x0f, 0x00, 0x03]); // sldt (%rbx)
        p.regs.rbx = DATA + 8;
        p.poke(DATA + 8, &[0xaa; 4]);
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.peek(DATA + 8, 4), &[0x28, 0, 0xaa, 0xaa]);
    }

    #[test]
    fn lldt_from_an_unmapped_operand_is_an_operand_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x00, 0x10]);
        p.regs.rax = UNMAPPED;
        assert!(matches!(
            run(&mut vcpu, &mut p),
            Err(EmulateError::AccessOperand { .. })
        ));
    }

    #[test]
    fn str_and_sldt_to_unmapped_memory_are_operand_faults() {
        let mut vcpu = vcpu();
        for code in [[0x0f, 0x00, 0x0b], [0x0f, 0x00, 0x03]] {
            // str (%rbx); sldt (%rbx)
            let mut p = platform(&code);
            p.regs.rbx = UNMAPPED;
            let err = run(&mut vcpu, &mut p).unwrap_err();
            assert!(
                matches!(err, EmulateError::AccessOperand { fault, .. } if fault.write && fault.len == 2),
                "{err:?}"
            );
        }
    }
}
