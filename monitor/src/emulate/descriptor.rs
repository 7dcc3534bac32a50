//! Descriptor-table registers: `lgdt`, `lidt`, `sgdt`, `sidt` (the 10-byte pseudo-descriptor
//! of 64-bit mode: a 16-bit limit, then a 64-bit base) and the selectors `lldt`, `ltr`,
//! `sldt`, `str`.
//!
//! The registers are virtual ([`Vcpu::tables`]); nothing reads the tables they point at yet,
//! and the real GDT/IDT of the VM process are the host's. Checks done, as hardware would:
//! `lgdt`/`lidt` refuse a non-canonical base; `ltr` refuses a null selector; `lldt`/`ltr`
//! refuse a selector with the TI (LDT) bit and, once a GDT is loaded (limit non-zero), one
//! whose 16-byte system descriptor lies beyond the GDT limit. `ltr` does not mark the TSS
//! busy (the GDT is not written). `sldt`/`str` store 16 bits to memory, zero-extend into a
//! 32/64-bit register.
#![forbid(unsafe_code)]

use iced_x86::Mnemonic;

use super::operand::{effective_address, is_canonical, read_rm, read_u64, write_rm};
use super::{EmulateError, Insn, Outcome};
use crate::platform::Platform;
use crate::vcpu::{DescriptorTable, Vcpu};

fn check_system_selector(vcpu: &Vcpu, insn: &Insn, selector: u16) -> Result<(), EmulateError> {
    if selector & 0x4 != 0 {
        return Err(insn.general_protection("system selector refers to the ldt"));
    }
    let limit = vcpu.tables.gdtr.limit;
    if selector & !0x7 != 0 && limit != 0 && u32::from(selector & !0x7) + 15 > u32::from(limit) {
        return Err(insn.general_protection("selector beyond the gdt limit"));
    }
    Ok(())
}

pub(crate) fn emulate(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    let mnemonic = insn.instr.mnemonic();
    match mnemonic {
        Mnemonic::Lgdt | Mnemonic::Lidt => {
            let gva = effective_address(p.regs(), insn, 0)?;
            let limit = read_u64(p, insn, gva, 2)? as u16;
            let base = read_u64(p, insn, gva.wrapping_add(2), 8)?;
            if !is_canonical(base) {
                return Err(insn.general_protection("descriptor table base is not canonical"));
            }
            let table = DescriptorTable { base, limit };
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
            let mut image = [0u8; 10];
            image[..2].copy_from_slice(&table.limit.to_le_bytes());
            image[2..].copy_from_slice(&table.base.to_le_bytes());
            p.write_mem(gva, &image)
                .map_err(|f| insn.operand_fault(f))?;
        }
        Mnemonic::Lldt => {
            let selector = read_rm(p, insn, 0, 2)? as u16;
            check_system_selector(vcpu, insn, selector)?;
            vcpu.tables.ldtr = selector;
        }
        Mnemonic::Ltr => {
            let selector = read_rm(p, insn, 0, 2)? as u16;
            if selector & !0x3 == 0 {
                return Err(insn.general_protection("ltr of a null selector"));
            }
            check_system_selector(vcpu, insn, selector)?;
            vcpu.tables.tr = selector;
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
    fn lgdt_with_a_non_canonical_base_is_refused() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0x10]);
        p.regs.rax = DATA;
        p.poke(DATA, &pseudo_descriptor(0x3f, 0x8000_0000_0000));
        assert!(
            run(&mut vcpu, &mut p)
                .unwrap_err()
                .to_string()
                .contains("not canonical")
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
    fn ltr_of_a_null_selector_or_one_beyond_the_gdt_is_refused() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x00, 0xd8]);
        p.regs.rax = 0;
        assert!(
            run(&mut vcpu, &mut p)
                .unwrap_err()
                .to_string()
                .contains("null selector")
        );
        vcpu.tables.gdtr.limit = 0x3f;
        p.regs.rax = 0x38;
        assert!(
            run(&mut vcpu, &mut p)
                .unwrap_err()
                .to_string()
                .contains("gdt limit")
        );
        p.regs.rax = 0x30;
        run_ok(&mut vcpu, &mut p, 3);
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
}
