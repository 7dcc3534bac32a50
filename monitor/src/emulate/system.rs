//! `hlt`, `monitor`, `mwait`, and the privilege-changing returns the monitor refuses.
//!
//! - `hlt` ends in [`Outcome::Halt`] with the virtual IF; RIP is after it.
//! - `monitor` records the address in RAX (EAX with a 67 prefix) in
//!   [`Vcpu::monitor_address`]; nothing wakes on writes to it yet. Extensions (ECX) must be 0.
//! - `mwait` behaves like `hlt`: a halt that interrupts end, also when IF is clear if ECX bit 0
//!   ("interrupts break the wait") is set. Other ECX bits must be 0.
//! - `iret`, `sysret`, `sysexit`, `syscall`, `sysenter`: refused with an
//!   [`EmulateError::Unsupported`]: in this stage there is no guest kernel/user split and no
//!   interrupt delivery for them to return from or enter. (A guest `syscall` never reaches
//!   the host kernel either way: the VM process is confined.)
#![forbid(unsafe_code)]

use iced_x86::{Code, Mnemonic};

use super::{EmulateError, Insn, Outcome};
use crate::platform::Platform;
use crate::vcpu::Vcpu;

pub(crate) fn emulate(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &Insn,
) -> Result<Outcome, EmulateError> {
    let regs = p.regs();
    match insn.instr.mnemonic() {
        Mnemonic::Hlt => Ok(Outcome::Halt {
            interrupts_enabled: vcpu.interrupts_enabled(),
        }),
        Mnemonic::Monitor => {
            if regs.rcx as u32 != 0 {
                return Err(insn.general_protection("monitor extensions in ecx are not supported"));
            }
            let addr32 = insn.instr.code() == Code::Monitord;
            vcpu.monitor_address = if addr32 {
                regs.rax & 0xffff_ffff
            } else {
                regs.rax
            };
            Ok(Outcome::Resume)
        }
        Mnemonic::Mwait => {
            let ecx = regs.rcx as u32;
            if ecx & !1 != 0 {
                return Err(insn.general_protection("mwait extensions in ecx other than bit 0"));
            }
            Ok(Outcome::Halt {
                interrupts_enabled: vcpu.interrupts_enabled() || ecx & 1 != 0,
            })
        }
        Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq => {
            Err(insn.unsupported("iret: no guest interrupt or exception delivery yet"))
        }
        Mnemonic::Sysret | Mnemonic::Sysretq | Mnemonic::Sysexit | Mnemonic::Sysexitq => {
            Err(insn.unsupported("return to guest user mode: there is no guest user mode yet"))
        }
        Mnemonic::Syscall | Mnemonic::Sysenter => {
            Err(insn.unsupported("system call entry: there is no guest kernel to enter yet"))
        }
        _ => Err(EmulateError::NotSensitive {
            site: insn.site,
            trap: insn.trap,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::test_util::*;

    #[test]
    fn hlt_halts_with_the_virtual_interrupt_flag_and_rip_after_it() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xf4]);
        let e = run(&mut vcpu, &mut p).unwrap();
        assert_eq!(
            (e.outcome, e.mnemonic, p.regs.rip),
            (
                Outcome::Halt {
                    interrupts_enabled: false
                },
                Mnemonic::Hlt,
                CODE + 1
            )
        );
        vcpu.system_flags |= crate::emulate::flags::RFLAGS_IF;
        p.regs.rip = CODE;
        assert_eq!(
            run(&mut vcpu, &mut p).unwrap().outcome,
            Outcome::Halt {
                interrupts_enabled: true
            }
        );
    }

    #[test]
    fn monitor_records_the_address_and_mwait_halts_like_hlt() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0xc8, 0x0f, 0x01, 0xc9]); // monitor; mwait
        p.regs.rax = DATA;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.monitor_address, DATA);
        let e = crate::emulate::handle_trap(
            &mut vcpu,
            &mut p,
            crate::emulate::Trap::Marker { insn: CODE + 3 },
        )
        .unwrap();
        assert_eq!(
            (e.outcome, p.regs.rip),
            (
                Outcome::Halt {
                    interrupts_enabled: false
                },
                CODE + 6
            )
        );
    }

    #[test]
    fn mwait_with_ecx_bit_0_wakes_on_interrupts_even_with_if_clear() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0xc9]);
        p.regs.rcx = 1;
        assert_eq!(
            run(&mut vcpu, &mut p).unwrap().outcome,
            Outcome::Halt {
                interrupts_enabled: true
            }
        );
        p.regs.rip = CODE;
        p.regs.rcx = 2;
        assert!(run(&mut vcpu, &mut p).is_err());
    }

    #[test]
    fn iretq_sysretq_and_sysexit_are_refused_with_a_clear_error() {
        for (code, name) in [
            (&[0x48, 0xcf][..], "iretq"),
            (&[0x48, 0x0f, 0x07], "sysretq"),
            (&[0x0f, 0x35], "sysexit"),
        ] {
            let mut p = platform(code);
            let err = run(&mut vcpu(), &mut p).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, EmulateError::Unsupported { .. }) && msg.contains(name),
                "{msg}"
            );
            assert_eq!(p.regs.rip, CODE);
        }
    }
}
