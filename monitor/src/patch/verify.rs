//! Checks machine code, as `objdump -d --no-show-raw-insn` prints it, against the table: every
//! sensitive instruction must come right after a marker, and every marker right before a
//! sensitive instruction.
//!
//! This is the translator's end-to-end check: it looks at what the assembler actually produced
//! (the bytes the monitor will see), not at the assembly text the translator read.

use super::lexer::{self, Body};
use super::table;
use crate::marker::Marker;

/// One disassembled instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insn {
    /// The address column, as printed.
    pub address: String,
    /// The instruction text (prefixes, mnemonic, operands).
    pub text: String,
    prefixes: Vec<String>,
    mnemonic: String,
    operands: Vec<String>,
}

impl Insn {
    fn is_marker(&self, marker: Marker) -> bool {
        self.prefixes.is_empty() && self.operands.is_empty() && self.mnemonic == marker.name()
    }

    fn is_sensitive(&self) -> bool {
        let ops: Vec<&str> = self.operands.iter().map(String::as_str).collect();
        let locked = self.prefixes.iter().any(|p| p == table::LOCK);
        table::classify(&self.mnemonic, &ops, locked).is_some()
    }
}

/// A place where the code breaks the marker rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A sensitive instruction without a marker right before it.
    Unmarked(Insn),
    /// A marker not followed by a sensitive instruction.
    Stray(Insn),
}

/// What a clean disassembly held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checked {
    pub instructions: usize,
    pub sensitive: usize,
}

/// Parses the instruction lines of `objdump -d --no-show-raw-insn` output.
pub fn parse_objdump(listing: &str) -> Vec<Insn> {
    listing.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Insn> {
    // "  401000:\tlock addl $0x1,(%rax)   # comment"
    let (address, rest) = line.split_once(":\t")?;
    let address = address.trim();
    if address.is_empty() || !address.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let text = rest.trim();
    let stmt = lexer::statements(text).ok()?.into_iter().next()?;
    let Body::Instruction {
        prefixes,
        mnemonic,
        operands,
        ..
    } = lexer::parse(&stmt).body
    else {
        return None;
    };
    // A lone prefix byte prints as its name, e.g. `lock` or `cs`: keep it as a mnemonic.
    let (prefixes, mnemonic) = match mnemonic {
        Some(m) => (prefixes, m),
        None => {
            let mut prefixes = prefixes;
            let last = prefixes.pop()?;
            (prefixes, last)
        }
    };
    Some(Insn {
        address: address.to_string(),
        text: text.to_string(),
        prefixes,
        mnemonic,
        operands,
    })
}

/// Scans a disassembly listing: what it holds and where it breaks the marker rule.
pub fn scan(listing: &str, marker: Marker) -> (Checked, Vec<Violation>) {
    let insns = parse_objdump(listing);
    let mut violations = Vec::new();
    let mut checked = Checked {
        instructions: insns.len(),
        sensitive: 0,
    };
    for (i, insn) in insns.iter().enumerate() {
        if insn.is_sensitive() {
            checked.sensitive += 1;
            let marked = i > 0 && insns[i - 1].is_marker(marker);
            if !marked {
                violations.push(Violation::Unmarked(insn.clone()));
            }
        }
        if insn.is_marker(marker) && !insns.get(i + 1).is_some_and(Insn::is_sensitive) {
            violations.push(Violation::Stray(insn.clone()));
        }
    }
    (checked, violations)
}

/// Checks the marker rule over a disassembly listing: Ok only if it holds everywhere.
pub fn check(listing: &str, marker: Marker) -> Result<Checked, Vec<Violation>> {
    let (checked, violations) = scan(listing, marker);
    if violations.is_empty() {
        Ok(checked)
    } else {
        Err(violations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "
t.o:     file format elf64-x86-64

Disassembly of section .text:

0000000000000000 <f>:
   0:\tud2
   2:\tout    %al,(%dx)
   3:\tmov    %rsp,%rbp
   6:\tud2
   8:\tlock addl $0x1,0x0(%rip)        # 10 <f+0x10>
  10:\tud2
  12:\txchg   %eax,(%rdx)
  14:\txchg   %eax,%ebx
  16:\tret
";

    #[test]
    fn a_fully_marked_listing_passes() {
        let checked = check(LISTING, Marker::Ud2).unwrap();
        assert_eq!(
            checked,
            Checked {
                instructions: 9,
                sensitive: 3
            }
        );
    }

    #[test]
    fn an_unmarked_sensitive_instruction_is_reported() {
        let listing = LISTING.replace("  10:\tud2\n", "");
        let violations = check(&listing, Marker::Ud2).unwrap_err();
        assert!(
            matches!(&violations[..], [Violation::Unmarked(i)] if i.address == "12"),
            "{violations:?}"
        );
    }

    #[test]
    fn a_marker_before_an_ordinary_instruction_is_reported() {
        let listing = LISTING.replace("  16:\tret", "  16:\tud2\n  18:\tret");
        let violations = check(&listing, Marker::Ud2).unwrap_err();
        assert!(
            matches!(&violations[..], [Violation::Stray(i)] if i.address == "16"),
            "{violations:?}"
        );
    }

    #[test]
    fn the_other_marker_does_not_count() {
        assert_eq!(check(LISTING, Marker::Int3).unwrap_err().len(), 3);
    }
}
