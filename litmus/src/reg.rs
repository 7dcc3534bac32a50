//! Registers a litmus test can name, in both dialects.
//!
//! A register is an index into one fixed table; the dialect decides how it is printed
//! (`EAX` in the Intel-order `X86` dialect, `rax` in the AT&T `X86_64` dialect), exactly as herd7
//! prints it in its state lists.

use crate::test::{Arch, Width};

/// One architectural register of a test thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reg(pub u8);

/// Number of registers in the table (16 general-purpose, `rip`, six segment registers).
pub const REG_COUNT: usize = 23;

/// First register that is not a general-purpose register.
const FIRST_SPECIAL: u8 = 16;

const NAMES64: [&str; REG_COUNT] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "cs", "ds", "es", "fs", "gs", "ss",
];
const NAMES32: [&str; 16] = [
    "eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "r8d", "r9d", "r10d", "r11d", "r12d",
    "r13d", "r14d", "r15d",
];
const NAMES16: [&str; 16] = [
    "ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "r8w", "r9w", "r10w", "r11w", "r12w", "r13w",
    "r14w", "r15w",
];
const NAMES8: [&str; 16] = [
    "al", "bl", "cl", "dl", "sil", "dil", "bpl", "spl", "r8b", "r9b", "r10b", "r11b", "r12b",
    "r13b", "r14b", "r15b",
];

impl Reg {
    pub const RAX: Reg = Reg(0);
    pub const RSP: Reg = Reg(7);
    pub const RBP: Reg = Reg(6);

    /// Looks a register name up (case-insensitive, without `%`), giving the register and the
    /// width the name selects (`eax` is the low 4 bytes of `rax`). Special registers (`rip`,
    /// segment registers) are 8 bytes wide.
    pub fn lookup(name: &str) -> Option<(Reg, Width)> {
        let lower = name.to_ascii_lowercase();
        let find = |table: &[&str]| table.iter().position(|n| *n == lower);
        if let Some(i) = find(&NAMES64) {
            return Some((Reg(i as u8), Width::W8));
        }
        if let Some(i) = find(&NAMES32) {
            return Some((Reg(i as u8), Width::W4));
        }
        if let Some(i) = find(&NAMES16) {
            return Some((Reg(i as u8), Width::W2));
        }
        find(&NAMES8).map(|i| (Reg(i as u8), Width::W1))
    }

    /// Whether this is one of the sixteen general-purpose registers.
    pub fn is_gpr(self) -> bool {
        self.0 < FIRST_SPECIAL
    }

    /// The name herd7 prints for this register in `arch`'s state lists.
    pub fn herd_name(self, arch: Arch) -> String {
        match arch {
            Arch::X86 if self.is_gpr() => NAMES32[self.0 as usize].to_ascii_uppercase(),
            Arch::X86 => NAMES64[self.0 as usize].to_ascii_uppercase(),
            Arch::X86_64 => NAMES64[self.0 as usize].to_string(),
        }
    }

    /// The AT&T name (without `%`) of this register at `width`; `None` for special registers.
    pub fn att_name(self, width: Width) -> Option<&'static str> {
        if !self.is_gpr() {
            return None;
        }
        let i = self.0 as usize;
        Some(match width {
            Width::W8 => NAMES64[i],
            Width::W4 => NAMES32[i],
            Width::W2 => NAMES16[i],
            Width::W1 => NAMES8[i],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subregister_names_map_to_their_full_register() {
        assert_eq!(Reg::lookup("EAX"), Some((Reg::RAX, Width::W4)));
        assert_eq!(Reg::lookup("r9d"), Some((Reg(9), Width::W4)));
        assert_eq!(Reg::lookup("sil"), Some((Reg(4), Width::W1)));
        assert_eq!(Reg::lookup("rip").map(|(r, _)| r.is_gpr()), Some(false));
        assert_eq!(Reg::lookup("xmm0"), None);
    }

    #[test]
    fn herd_names_follow_the_dialect() {
        assert_eq!(Reg::RAX.herd_name(Arch::X86), "EAX");
        assert_eq!(Reg::RAX.herd_name(Arch::X86_64), "rax");
    }
}
