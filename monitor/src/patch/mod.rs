//! `vsmp patch`: the seed design's assembly-to-assembly translator.
//!
//! It reads GNU `as` AT&T-syntax assembly as `gcc -S` emits it (inline `asm` blocks between
//! `#APP` and `#NO_APP` included) and inserts the trap marker ([`Marker`]) immediately before
//! every sensitive instruction listed in [`table::TABLE`], so that the VM process stops in the
//! monitor, which emulates the instruction.
//!
//! - The marker goes before the instruction's prefixes (`lock`, `rep`, ...), whether they are
//!   written in the same statement or as statements of their own, and after its labels, so a
//!   jump to the label traps too.
//! - It is inserted on the same line as `ud2 /* vsmp-marker */; ` so line numbers still match
//!   the input. The comment tags it: a tagged marker directly before a sensitive instruction is
//!   recognised, so patching is idempotent, and an untagged hand-written `ud2` is guest code.
//! - Directives pass through untouched; instructions inside `.macro` bodies are patched like
//!   any others, and an invocation of a macro defined earlier is not taken for an instruction
//!   even when the macro is named like one.
//!
//! Pure text to text: no I/O, no threads.
#![forbid(unsafe_code)]

pub mod lexer;
pub mod table;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::marker::Marker;
use lexer::{Body, MARKER_TAG};
use table::Rule;

/// Why a source cannot be patched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("line {line}: unterminated /* comment")]
    UnterminatedComment { line: usize },
    #[error("line {line}: unterminated string")]
    UnterminatedString { line: usize },
    #[error("line {line}: Intel syntax is not supported (vsmp patch reads AT&T syntax)")]
    IntelSyntax { line: usize },
    #[error(
        "line {line}: already patched with the {found} marker, but {wanted} was requested \
         (a guest uses one marker)"
    )]
    MarkerMismatch {
        line: usize,
        found: Marker,
        wanted: Marker,
    },
}

/// What a run of the translator did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Markers inserted, per instruction (`hlt`, `outb`, `lock addl`, ...).
    pub inserted: BTreeMap<String, usize>,
    /// Sensitive instructions that already carried a marker.
    pub already_marked: usize,
}

impl Report {
    /// Markers inserted in total.
    pub fn inserted_total(&self) -> usize {
        self.inserted.values().sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} marker(s) inserted, {} sensitive instruction(s) already marked",
            self.inserted_total(),
            self.already_marked
        )?;
        for (mnemonic, count) in &self.inserted {
            write!(f, "\n  {count:>6}  {mnemonic}")?;
        }
        Ok(())
    }
}

/// The patched text and what was done to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patched {
    pub text: String,
    pub report: Report,
}

/// The text inserted before a sensitive instruction.
pub fn marker_text(marker: Marker) -> String {
    format!("{} /* {MARKER_TAG} */; ", marker.name())
}

/// The start of a pending instruction whose prefixes stand in earlier statements.
#[derive(Debug)]
struct Pending {
    offset: usize,
    locked: bool,
    marked: Option<Marker>,
}

/// Inserts `marker` before every sensitive instruction of `source`.
pub fn patch(source: &str, marker: Marker) -> Result<Patched, PatchError> {
    let mut report = Report::default();
    let mut inserts: Vec<usize> = Vec::new();
    let mut pending: Option<Pending> = None;
    // The statement just before was a tagged marker (of this kind).
    let mut previous_marker: Option<Marker> = None;
    // Names of macros defined so far (`as` matches them case-insensitively).
    let mut macros: BTreeSet<String> = BTreeSet::new();

    for stmt in lexer::statements(source)? {
        let parsed = lexer::parse(&stmt);
        // A label or directive between a marker and its instruction breaks the pair; between
        // a prefix statement and its instruction it does not (the prefix still applies to the
        // next instruction, and the marker still goes before the prefix).
        if !parsed.labels.is_empty() {
            previous_marker = None;
        }
        match parsed.body {
            Body::Empty => {}
            Body::Directive { name, args } => {
                if name == ".intel_syntax" {
                    return Err(PatchError::IntelSyntax { line: stmt.line });
                }
                if name == ".macro" {
                    let macro_name = args.split([' ', '\t', ',']).next().unwrap_or_default();
                    macros.insert(macro_name.to_ascii_lowercase());
                }
                previous_marker = None;
            }
            Body::Assignment => {
                previous_marker = None;
            }
            Body::Instruction {
                offset,
                prefixes,
                mnemonic: None,
                ..
            } => {
                let locked = prefixes.iter().any(|p| p == table::LOCK);
                match &mut pending {
                    Some(p) => p.locked |= locked,
                    None => {
                        pending = Some(Pending {
                            offset,
                            locked,
                            marked: previous_marker,
                        });
                    }
                }
                previous_marker = None;
            }
            Body::Instruction {
                offset,
                prefixes,
                mnemonic: Some(mnemonic),
                operands,
            } => {
                let own_lock = prefixes.iter().any(|p| p == table::LOCK);
                let unit = match pending.take() {
                    Some(p) => Pending {
                        locked: p.locked || own_lock,
                        ..p
                    },
                    None => Pending {
                        offset,
                        locked: own_lock,
                        marked: previous_marker,
                    },
                };
                let ops: Vec<&str> = operands.iter().map(String::as_str).collect();
                // A macro invocation is not an instruction (its body was patched).
                let entry = match macros.contains(&mnemonic) {
                    true => None,
                    false => table::classify(&mnemonic, &ops, unit.locked),
                };
                if let Some(entry) = entry {
                    match unit.marked {
                        Some(found) if found == marker => report.already_marked += 1,
                        Some(found) => {
                            return Err(PatchError::MarkerMismatch {
                                line: stmt.line,
                                found,
                                wanted: marker,
                            });
                        }
                        None => {
                            inserts.push(unit.offset);
                            let key = if entry.rule == Rule::LockPrefix {
                                format!("{} {mnemonic}", table::LOCK)
                            } else {
                                mnemonic.clone()
                            };
                            *report.inserted.entry(key).or_default() += 1;
                        }
                    }
                }
                previous_marker = tagged_marker(stmt.tagged, &prefixes, &mnemonic, &ops);
            }
        }
    }

    let insert = marker_text(marker);
    let mut text = String::with_capacity(source.len() + inserts.len() * insert.len());
    let mut copied = 0;
    for offset in inserts {
        text.push_str(&source[copied..offset]);
        text.push_str(&insert);
        copied = offset;
    }
    text.push_str(&source[copied..]);
    Ok(Patched { text, report })
}

/// The marker kind of a statement that is a tagged marker (`ud2 /* vsmp-marker */`).
fn tagged_marker(
    tagged: bool,
    prefixes: &[String],
    mnemonic: &str,
    operands: &[&str],
) -> Option<Marker> {
    if !tagged || !prefixes.is_empty() || !operands.is_empty() {
        return None;
    }
    match mnemonic {
        "ud2" | "ud2a" => Some(Marker::Ud2),
        "int3" => Some(Marker::Int3),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
