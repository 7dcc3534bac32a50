//! Fuzzing the emulator through the same trait the VM side uses: arbitrary instruction bytes
//! and register values, against the mock platform, must never panic, and every error must
//! display (with the guest RIP in it).

use proptest::prelude::*;

use vsmp_monitor::emulate::{Outcome, Trap, handle_trap};
use vsmp_monitor::platform::mock::MockPlatform;
use vsmp_monitor::vcpu::{Vcpu, VcpuConfig};

const CODE: u64 = 0x10_0000;
const MEM: usize = 0x2000;

/// A register value: often a pointer into the mock's memory, sometimes anything.
fn reg_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..MEM as u64).prop_map(|o| CODE + o),
        any::<u64>(),
        0..16u64,
        Just(0x3f8u64),
        Just(0xf4u64),
    ]
}

/// Instruction bytes: random, or a sensitive opcode followed by random bytes, so the
/// handlers (not only the decoder) see odd operands.
fn insn_bytes() -> impl Strategy<Value = Vec<u8>> {
    let prefixes: &[&[u8]] = &[
        &[],
        &[0x0f, 0x01],
        &[0x0f, 0x00],
        &[0x0f, 0x20],
        &[0x0f, 0x22],
        &[0x0f, 0x21],
        &[0x0f, 0x23],
        &[0xf3],
        &[0x66],
        &[0x67],
        &[0x8e],
        &[0x8c],
        &[0x48],
        &[0xf0],
        &[0x0f, 0xb2],
    ];
    (
        prop::sample::select(prefixes),
        prop::collection::vec(any::<u8>(), 1..15),
    )
        .prop_map(|(pre, rest)| {
            let mut v = pre.to_vec();
            v.extend(rest);
            v.truncate(15);
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_instructions_never_panic_the_emulator(
        code in insn_bytes(),
        regs in prop::collection::vec(reg_value(), 8),
        at_end in any::<bool>(),
        fault in any::<bool>(),
        data in prop::collection::vec(any::<u8>(), 64),
    ) {
        let mut vcpu = Vcpu::new(VcpuConfig { id: 0, count: 2 }, Box::new(std::io::sink()));
        let mut p = MockPlatform::new(CODE, MEM);
        // Either at the start of memory or ending exactly at its end (a short fetch).
        let insn = if at_end { CODE + (MEM - code.len()) as u64 } else { CODE };
        p.poke(insn, &code);
        p.poke(CODE + 0x1000, &data);
        p.regs.rip = insn;
        p.regs.rax = regs[0];
        p.regs.rbx = regs[1];
        p.regs.rcx = regs[2] & 0xffff; // keep rep counts bounded so the test stays fast
        p.regs.rdx = regs[3];
        p.regs.rsi = regs[4];
        p.regs.rdi = regs[5];
        p.regs.rsp = regs[6];
        p.regs.eflags = 0x202 | (regs[7] & 0x0cd5);
        let trap = if fault { Trap::Fault { insn } } else { Trap::Marker { insn } };
        match handle_trap(&mut vcpu, &mut p, trap) {
            Ok(e) => {
                if e.outcome == Outcome::Atomic {
                    prop_assert_eq!(p.regs.rip, insn);
                }
            }
            Err(err) => {
                let msg = err.to_string();
                prop_assert!(msg.contains(&format!("{insn:#x}")), "{}", msg);
            }
        }
    }
}
