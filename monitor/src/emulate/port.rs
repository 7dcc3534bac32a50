//! Port I/O: `in`, `out`, `ins`, `outs`, byte/word/dword, with an immediate port or `%dx`,
//! and `rep` on the string forms. Accesses go to the vCPU's [`crate::devices::PortBus`].
//!
//! - `in` to `%al`/`%ax` keeps the rest of RAX; to `%eax` it zero-extends, as on hardware.
//! - `ins`/`outs` use RDI/RSI (EDI/ESI with a 67 prefix; `outs` honours a segment override,
//!   so `%fs:`/`%gs:` add the real FS/GS base), step by the access size, backwards if DF is
//!   set. With `rep` (or `repne`) they repeat RCX (ECX) times; RCX = 0 does nothing.
//! - A `rep` string instruction does at most [`MAX_REP_ITERATIONS`] iterations per trap; if
//!   more remain, RIP stays at the instruction with RCX/RSI/RDI advanced (see
//!   [`super::Outcome::Resume`]), as a hardware interrupt would leave it.
//! - A memory fault in a string instruction is an error; the registers then show the
//!   iterations done, as on hardware.
//! - A write that reaches the exit port ends with [`super::Outcome::Exit`]; the rest of a
//!   `rep outs` is not done.
#![forbid(unsafe_code)]

use iced_x86::{Mnemonic, OpKind, Register};

use super::operand::{effective_address, read_reg, read_u64, write_reg, write_u64};
use super::{EmulateError, Insn, Outcome};
use crate::devices::{PortEffect, PortSize};
use crate::platform::Platform;
use crate::vcpu::Vcpu;

/// Iterations of a `rep ins`/`rep outs` per trap: bounds the time the monitor spends on one
/// trap (a guest can ask for 2^64), while making a console string of a few KiB one trap.
pub const MAX_REP_ITERATIONS: u64 = 4096;

fn size_of(bytes: usize) -> PortSize {
    match bytes {
        1 => PortSize::Byte,
        2 => PortSize::Word,
        _ => PortSize::Dword,
    }
}

/// The port of operand `op`: an 8-bit immediate or DX.
fn port_operand(p: &mut impl Platform, insn: &Insn, op: u32) -> u16 {
    match insn.instr.op_kind(op) {
        OpKind::Immediate8 => insn.instr.immediate8().into(),
        _ => p.regs().rdx as u16,
    }
}

fn device_error(insn: &Insn, source: crate::devices::DeviceError) -> EmulateError {
    EmulateError::Device {
        site: insn.site,
        source,
    }
}

pub(crate) fn emulate(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &mut Insn,
) -> Result<Outcome, EmulateError> {
    let instr = insn.instr;
    match instr.mnemonic() {
        Mnemonic::In => {
            let reg = instr.op0_register();
            let size = size_of(reg.size());
            let port = port_operand(p, insn, 1);
            let value = vcpu.ports.read(port, size);
            write_reg(p.regs(), reg, value.into())
                .ok_or_else(|| insn.unsupported("in to a non-general register"))?;
            Ok(Outcome::Resume)
        }
        Mnemonic::Out => {
            let reg = instr.op1_register();
            let size = size_of(reg.size());
            let port = port_operand(p, insn, 0);
            let value = read_reg(p.regs(), reg)
                .ok_or_else(|| insn.unsupported("out from a non-general register"))?;
            match vcpu
                .ports
                .write(port, size, value as u32)
                .map_err(|e| device_error(insn, e))?
            {
                PortEffect::None => Ok(Outcome::Resume),
                PortEffect::Exit { status } => Ok(Outcome::Exit { status }),
                PortEffect::Done { status } => Ok(Outcome::Done { status }),
            }
        }
        Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => string(vcpu, p, insn, Direction::In),
        Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => {
            string(vcpu, p, insn, Direction::Out)
        }
        _ => Err(EmulateError::NotSensitive {
            site: insn.site,
            trap: insn.trap,
        }),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    In,
    Out,
}

fn string(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &mut Insn,
    dir: Direction,
) -> Result<Outcome, EmulateError> {
    let instr = insn.instr;
    // ins: op0 = es:[rdi], op1 = dx. outs: op0 = dx, op1 = seg:[rsi].
    let mem_op = if dir == Direction::In { 0 } else { 1 };
    let kind = instr.op_kind(mem_op);
    let addr32 = matches!(kind, OpKind::MemoryESEDI | OpKind::MemorySegESI);
    let (index, counter) = match (dir, addr32) {
        (Direction::In, false) => (Register::RDI, Register::RCX),
        (Direction::In, true) => (Register::EDI, Register::ECX),
        (Direction::Out, false) => (Register::RSI, Register::RCX),
        (Direction::Out, true) => (Register::ESI, Register::ECX),
    };
    let bytes = match instr.mnemonic() {
        Mnemonic::Insb | Mnemonic::Outsb => 1,
        Mnemonic::Insw | Mnemonic::Outsw => 2,
        _ => 4,
    };
    let size = size_of(bytes);
    let port = p.regs().rdx as u16;
    let rep = instr.has_rep_prefix() || instr.has_repne_prefix();
    let backwards = p.regs().eflags & super::flags::RFLAGS_DF != 0;
    let step = if backwards {
        (bytes as u64).wrapping_neg()
    } else {
        bytes as u64
    };
    let missing = || insn.unsupported("string port i/o with unexpected registers");

    let mut remaining = if rep {
        read_reg(p.regs(), counter).ok_or_else(missing)?
    } else {
        1
    };
    let mut done = 0u64;
    while remaining > 0 && done < MAX_REP_ITERATIONS {
        let gva = effective_address(p.regs(), insn, mem_op)?;
        let mut effect = PortEffect::None;
        match dir {
            Direction::In => {
                let value = vcpu.ports.read(port, size);
                write_u64(p, insn, gva, value.into(), bytes)?;
            }
            Direction::Out => {
                let value = read_u64(p, insn, gva, bytes)?;
                effect = vcpu
                    .ports
                    .write(port, size, value as u32)
                    .map_err(|e| device_error(insn, e))?;
            }
        }
        let regs = p.regs();
        let next = read_reg(regs, index)
            .ok_or_else(missing)?
            .wrapping_add(step);
        write_reg(regs, index, next).ok_or_else(missing)?;
        remaining -= 1;
        done += 1;
        if rep {
            write_reg(regs, counter, remaining).ok_or_else(missing)?;
        }
        match effect {
            PortEffect::None => {}
            PortEffect::Exit { status } => return Ok(Outcome::Exit { status }),
            PortEffect::Done { status } => return Ok(Outcome::Done { status }),
        }
    }
    if remaining > 0 {
        insn.next_rip = insn.site.rip;
    }
    Ok(Outcome::Resume)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::test_util::*;
    use crate::layout::{COM1_PORT, EXIT_PORT};

    #[test]
    fn out_to_exit_port_exits_with_the_status_byte() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xe6, 0xf4]); // out %al,$0xf4
        p.regs.rax = 0x1234_5607;
        let e = run(&mut vcpu, &mut p).unwrap();
        assert_eq!(e.outcome, Outcome::Exit { status: 7 });
        assert_eq!(e.mnemonic, Mnemonic::Out);
        assert_eq!(p.regs.rip, CODE + 2);
    }

    #[test]
    fn out_dword_to_the_exit_port_through_dx_exits_with_the_low_byte() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xef]); // out %eax,(%dx)
        p.regs.rdx = EXIT_PORT.into();
        p.regs.rax = 0x100;
        assert_eq!(
            run(&mut vcpu, &mut p).unwrap().outcome,
            Outcome::Exit { status: 0 }
        );
    }

    #[test]
    fn out_of_a_byte_to_the_uart_prints_it() {
        let (mut vcpu, console) = vcpu_with_console();
        let mut p = platform(&[0xee]); // out %al,(%dx)
        p.regs.rdx = COM1_PORT.into();
        p.regs.rax = u64::from(b'\n');
        run_ok(&mut vcpu, &mut p, 1);
        assert_eq!(console.text(), "\n");
    }

    #[test]
    fn in_from_the_line_status_register_reads_0x60_into_al_only() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xec]); // in (%dx),%al
        p.regs.rdx = (COM1_PORT + 5).into();
        p.regs.rax = 0xffff_ffff_ffff_ffff;
        run_ok(&mut vcpu, &mut p, 1);
        assert_eq!(p.regs.rax, 0xffff_ffff_ffff_ff60);
    }

    #[test]
    fn in_eax_from_an_unknown_port_zero_extends_all_ones() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xe5, 0x80]); // in $0x80,%eax
        p.regs.rax = 0xaaaa_aaaa_0000_0000;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(p.regs.rax, 0xffff_ffff);
    }

    #[test]
    fn in_ax_from_an_immediate_port_keeps_the_upper_bits() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x66, 0xe5, 0x80]); // in $0x80,%ax
        p.regs.rax = 0x1111_2222_3333_0000;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.regs.rax, 0x1111_2222_3333_ffff);
    }

    #[test]
    fn out_word_to_the_uart_data_port_prints_its_low_byte() {
        let (mut vcpu, console) = vcpu_with_console();
        let mut p = platform(&[0x66, 0xef]); // out %ax,(%dx)
        p.regs.rdx = COM1_PORT.into();
        p.regs.rax = 0x4142;
        run_ok(&mut vcpu, &mut p, 2);
        vcpu.flush().unwrap();
        assert_eq!(console.text(), "B");
    }

    #[test]
    fn in_from_the_exit_port_reads_zero() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xe4, 0xf4]); // in $0xf4,%al
        p.regs.rax = 0xffff;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(p.regs.rax, 0xff00);
    }

    #[test]
    fn rep_outsb_prints_the_string() {
        let (mut vcpu, console) = vcpu_with_console();
        let mut p = platform(&[0xf3, 0x6e]); // rep outsb (%rsi),(%dx)
        p.poke(DATA, b"hello\n");
        p.regs.rsi = DATA;
        p.regs.rcx = 6;
        p.regs.rdx = COM1_PORT.into();
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(console.text(), "hello\n");
        assert_eq!((p.regs.rsi, p.regs.rcx), (DATA + 6, 0));
    }

    #[test]
    fn rep_outsb_with_a_zero_count_does_nothing() {
        let (mut vcpu, console) = vcpu_with_console();
        let mut p = platform(&[0xf3, 0x6e]);
        p.regs.rsi = UNMAPPED;
        p.regs.rdx = COM1_PORT.into();
        run_ok(&mut vcpu, &mut p, 2);
        vcpu.flush().unwrap();
        assert_eq!((console.text().as_str(), p.regs.rsi), ("", UNMAPPED));
    }

    #[test]
    fn outsb_with_df_set_walks_backwards() {
        let (mut vcpu, console) = vcpu_with_console();
        let mut p = platform(&[0xf3, 0x6e]);
        p.poke(DATA, b"ba");
        p.regs.rsi = DATA + 1;
        p.regs.rcx = 2;
        p.regs.rdx = COM1_PORT.into();
        p.regs.eflags |= crate::emulate::flags::RFLAGS_DF;
        run_ok(&mut vcpu, &mut p, 2);
        vcpu.flush().unwrap();
        assert_eq!(console.text(), "ab");
        assert_eq!(p.regs.rsi, DATA - 1);
    }

    #[test]
    fn outsb_with_a_gs_override_adds_the_gs_base() {
        let (mut vcpu, console) = vcpu_with_console();
        let mut p = platform(&[0x65, 0x6e]); // outsb %gs:(%rsi),(%dx)
        p.poke(DATA + 0x10, b"g");
        p.regs.gs_base = DATA;
        p.regs.rsi = 0x10;
        p.regs.rdx = COM1_PORT.into();
        run_ok(&mut vcpu, &mut p, 2);
        vcpu.flush().unwrap();
        assert_eq!(console.text(), "g");
        assert_eq!(p.regs.rsi, 0x11);
    }

    #[test]
    fn rep_insd_fills_memory_with_all_ones_from_an_unknown_port() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xf3, 0x6d]); // rep insl (%dx),(%rdi)
        p.regs.rdi = DATA;
        p.regs.rcx = 2;
        p.regs.rdx = 0x80;
        run_ok(&mut vcpu, &mut p, 2);
        assert_eq!(
            p.peek(DATA, 9),
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]
        );
        assert_eq!((p.regs.rdi, p.regs.rcx), (DATA + 8, 0));
    }

    #[test]
    fn insw_with_an_address_size_prefix_uses_edi_and_leaves_rcx() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x67, 0x66, 0x6d]); // insw (%dx),%es:(%edi)
        p.regs.rdi = 0xffff_ffff_0000_0000 | DATA;
        p.regs.rcx = 9;
        p.regs.rdx = 0x80;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(p.peek(DATA, 2), &[0xff, 0xff]);
        assert_eq!(
            (p.regs.rdi, p.regs.rcx),
            (DATA + 2, 9),
            "edi zero-extends, no rep"
        );
    }

    #[test]
    fn a_long_rep_outsb_stops_at_the_bound_and_stays_at_the_instruction() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xf3, 0x6e]);
        p.regs.rsi = DATA;
        p.regs.rcx = MAX_REP_ITERATIONS + 5;
        p.regs.rdx = 0x80;
        let e = run(&mut vcpu, &mut p).unwrap();
        assert_eq!(e.outcome, Outcome::Resume);
        assert_eq!(
            (p.regs.rip, p.regs.rcx, p.regs.rsi),
            (CODE, 5, DATA + MAX_REP_ITERATIONS)
        );
        // The guest executes it again (as a native fault this time) and it completes.
        let e = crate::emulate::handle_trap(
            &mut vcpu,
            &mut p,
            crate::emulate::Trap::Fault { insn: CODE },
        )
        .unwrap();
        assert_eq!(e.outcome, Outcome::Resume);
        assert_eq!((p.regs.rip, p.regs.rcx), (CODE + 2, 0));
    }

    #[test]
    fn rep_outsb_from_unmapped_memory_is_an_operand_fault_after_the_mapped_part() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xf3, 0x6e]);
        let end = CODE + MEM as u64;
        p.regs.rsi = end - 2;
        p.regs.rcx = 4;
        p.regs.rdx = 0x80;
        let err = run(&mut vcpu, &mut p).unwrap_err();
        assert!(
            matches!(err, EmulateError::AccessOperand { fault, .. } if fault.gva == end),
            "{err:?}"
        );
        assert_eq!((p.regs.rsi, p.regs.rcx, p.regs.rip), (end, 2, CODE));
    }

    #[test]
    fn rep_outsb_that_reaches_the_exit_port_exits() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xf3, 0x6e]);
        p.poke(DATA, &[3, 4]);
        p.regs.rsi = DATA;
        p.regs.rcx = 2;
        p.regs.rdx = EXIT_PORT.into();
        assert_eq!(
            run(&mut vcpu, &mut p).unwrap().outcome,
            Outcome::Exit { status: 3 }
        );
        assert_eq!(p.regs.rip, CODE + 2);
    }

    #[test]
    fn outsw_and_outsd_send_the_low_byte_of_each_element_to_the_uart() {
        let (mut vcpu, console) = vcpu_with_console();
        // rep outsw (%rsi),(%dx); outsl (%rsi),(%dx)
        let mut p = platform(&[0x66, 0xf3, 0x6f, 0x6f]);
        p.poke(DATA, &[b'a', 0xff, b'b', 0xff, b'c', 1, 2, 3]);
        p.regs.rsi = DATA;
        p.regs.rcx = 2;
        p.regs.rdx = COM1_PORT.into();
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!((p.regs.rsi, p.regs.rcx), (DATA + 4, 0));
        crate::emulate::handle_trap(
            &mut vcpu,
            &mut p,
            crate::emulate::Trap::Marker { insn: CODE + 3 },
        )
        .unwrap();
        assert_eq!(p.regs.rsi, DATA + 8);
        vcpu.flush().unwrap();
        assert_eq!(console.text(), "abc");
    }

    #[test]
    fn insb_reads_one_byte_to_es_rdi() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x6c]); // insb (%dx),%es:(%rdi)
        p.regs.rdi = DATA;
        p.regs.rdx = (COM1_PORT + 2).into();
        p.regs.rcx = 5;
        run_ok(&mut vcpu, &mut p, 1);
        assert_eq!(
            (p.peek(DATA, 2), p.regs.rdi, p.regs.rcx),
            (&[0x01, 0][..], DATA + 1, 5)
        );
    }

    #[test]
    fn insb_to_unmapped_memory_is_an_operand_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x6c]);
        p.regs.rdi = UNMAPPED;
        p.regs.rdx = 0x80;
        let err = run(&mut vcpu, &mut p).unwrap_err();
        assert!(
            matches!(err, EmulateError::AccessOperand { fault, .. } if fault.write && fault.gva == UNMAPPED),
            "{err:?}"
        );
        assert_eq!(p.regs.rdi, UNMAPPED);
    }
}
