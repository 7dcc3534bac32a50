//! The litmus file parser: header, init block, program table, final condition.
//!
//! Grammar accepted (both dialects):
//! ```text
//! ARCH NAME                       ARCH is X86 or X86_64
//! metadata lines                  "..." strings and Key=Value lines, ignored
//! { init; init; ... }             declarations (uint64_t x; int64_t t[2]={1,-1}; int64_t 0:rcx)
//!                                 and assignments (x=0; [x]=0; 0:rax=1; 0:rax=t)
//!  P0 | P1 | ... ;                program table header (or `P0;` alone)
//!  instr | instr | ... ;          one row per line, empty cells allowed
//! exists|~exists|forall PROP      the final condition
//! ```
//! `(* ... *)` comments may appear anywhere.

use std::collections::HashMap;
use std::path::Path;

use crate::cond::{CondSymbols, Lval, parse_condition, parse_lval};
use crate::error::ParseError;
use crate::instr::{Instr, Parsed, Symbols, parse_cell, parse_int};
use crate::reg::Reg;
use crate::test::{
    Arch, InitValue, LitmusTest, LocId, Location, Program, RegInit, ThreadId, ValueType,
};

/// Most threads a test may have (herd7's own tests use at most 8; the model packs a thread
/// number into 4 bits of a store's identity).
pub const MAX_THREADS: usize = 16;

/// Most instructions a thread may have (litmus threads have a handful; the model packs the
/// instruction index into 10 bits of a store's identity).
pub const MAX_INSTRUCTIONS: usize = 1024;

/// Reads and parses a litmus file.
pub fn parse_file(path: &Path) -> Result<LitmusTest, ParseError> {
    let text = std::fs::read_to_string(path).map_err(|source| ParseError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_str(path, &text)
}

/// Parses litmus text; `path` names it in errors.
pub fn parse_str(path: &Path, text: &str) -> Result<LitmusTest, ParseError> {
    let err = |line: usize, message: String| ParseError::Syntax {
        path: path.to_path_buf(),
        line,
        message,
    };
    let text = strip_comments(text).map_err(|(line, m)| err(line, m))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() && lines[i].trim().is_empty() {
        i += 1;
    }
    let header = lines.get(i).ok_or_else(|| err(1, "empty file".into()))?;
    let mut words = header.split_whitespace();
    let arch = match words.next() {
        Some("X86") => Arch::X86,
        Some("X86_64") => Arch::X86_64,
        Some(other) => {
            return Err(err(
                i + 1,
                format!("unsupported architecture '{other}' (expected X86 or X86_64)"),
            ));
        }
        None => return Err(err(i + 1, "missing test header".into())),
    };
    let name = words
        .next()
        .ok_or_else(|| err(i + 1, "missing test name".into()))?
        .to_string();
    i += 1;

    // Metadata lines up to the init block.
    while i < lines.len() && !lines[i].trim_start().starts_with('{') {
        i += 1;
    }
    if i == lines.len() {
        return Err(err(lines.len(), "missing init block '{ ... }'".into()));
    }
    let (init_text, init_line, after) = take_block(&lines, i).map_err(|(l, m)| err(l, m))?;
    i = after;

    let mut b = Builder {
        names: HashMap::new(),
        locations: Vec::new(),
        threads: 0,
    };
    let mut reg_inits = Vec::new();
    let mut reg_types = Vec::new();

    // Program table.
    while i < lines.len() && lines[i].trim().is_empty() {
        i += 1;
    }
    let table_header = lines
        .get(i)
        .ok_or_else(|| err(i, "missing program".into()))?;
    let threads = table_header
        .trim()
        .trim_end_matches(';')
        .split('|')
        .map(str::trim)
        .collect::<Vec<_>>();
    for (n, t) in threads.iter().enumerate() {
        if *t != format!("P{n}") {
            return Err(err(
                i + 1,
                format!("expected 'P{n}' in the program header, found '{t}'"),
            ));
        }
    }
    if threads.len() > MAX_THREADS {
        return Err(err(
            i + 1,
            format!("{} threads (at most {MAX_THREADS})", threads.len()),
        ));
    }
    b.threads = threads.len();
    // Parse init after the thread count is known (it may name registers).
    parse_init(
        &init_text,
        init_line,
        &mut b,
        &mut reg_inits,
        &mut reg_types,
    )
    .map_err(|(l, m)| err(l, m))?;
    i += 1;
    let mut cells: Vec<Vec<(usize, Parsed)>> = vec![Vec::new(); b.threads];
    while i < lines.len() {
        let line = lines[i].trim();
        if is_condition_start(line) {
            break;
        }
        if !line.is_empty() {
            let row = line.strip_suffix(';').unwrap_or(line);
            let parts: Vec<&str> = row.split('|').collect();
            if parts.len() > b.threads {
                return Err(err(
                    i + 1,
                    format!("{} columns but {} threads", parts.len(), b.threads),
                ));
            }
            for (t, cell) in parts.iter().enumerate() {
                let cell = cell.trim();
                if cell.is_empty() {
                    continue;
                }
                let parsed =
                    parse_cell(arch, cell, &mut b).map_err(|m| err(i + 1, format!("P{t}: {m}")))?;
                cells[t].push((i + 1, parsed));
            }
        }
        i += 1;
    }
    for (t, c) in cells.iter().enumerate() {
        if c.len() > MAX_INSTRUCTIONS {
            return Err(err(
                c[MAX_INSTRUCTIONS].0,
                format!("P{t} has more than {MAX_INSTRUCTIONS} instructions"),
            ));
        }
    }
    let programs = cells
        .into_iter()
        .enumerate()
        .map(|(t, c)| resolve_labels(c).map_err(|(l, m)| err(l, format!("P{t}: {m}"))))
        .collect::<Result<Vec<_>, _>>()?;

    if i == lines.len() {
        return Err(err(
            lines.len(),
            "missing final condition (exists / ~exists / forall)".into(),
        ));
    }
    let cond_line = i + 1;
    let first = lines[i].trim();
    if first.starts_with("locations") || first.starts_with("filter") {
        return Err(err(
            cond_line,
            format!(
                "unsupported clause '{}'",
                first.split_whitespace().next().unwrap_or("")
            ),
        ));
    }
    let cond_text = lines[i..].join(" ");
    let condition = parse_condition(&cond_text, &mut b).map_err(|m| err(cond_line, m))?;

    Ok(LitmusTest {
        arch,
        name,
        locations: b.locations,
        reg_inits,
        reg_types,
        threads: programs,
        condition,
    })
}

fn is_condition_start(line: &str) -> bool {
    ["exists", "~exists", "forall", "locations", "filter"]
        .iter()
        .any(|k| {
            line.strip_prefix(k)
                .is_some_and(|r| r.is_empty() || r.starts_with([' ', '(', '\t', '[']))
        })
}

/// Replaces `(* ... *)` comments by spaces, keeping line breaks (so line numbers stay right).
fn strip_comments(text: &str) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut line = 1;
    while let Some(start) = rest.find("(*") {
        out.push_str(&rest[..start]);
        line += rest[..start].matches('\n').count();
        let body = &rest[start + 2..];
        let end = body
            .find("*)")
            .ok_or((line, "unterminated comment '(*'".to_string()))?;
        let comment = &body[..end];
        for c in comment.chars() {
            out.push(if c == '\n' { '\n' } else { ' ' });
        }
        line += comment.matches('\n').count();
        rest = &body[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Takes the `{ ... }` block starting on line `start`; returns its inside, the line of the
/// opening brace and the index of the line after the block.
fn take_block(lines: &[&str], start: usize) -> Result<(String, usize, usize), (usize, String)> {
    let mut depth = 0i32;
    let mut inside = String::new();
    for (k, line) in lines.iter().enumerate().skip(start) {
        for (pos, c) in line.char_indices() {
            match c {
                '{' => {
                    depth += 1;
                    if depth == 1 {
                        continue;
                    }
                }
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        if !line[pos + 1..].trim().is_empty() {
                            return Err((k + 1, "text after the init block's '}'".into()));
                        }
                        return Ok((inside, start + 1, k + 1));
                    }
                }
                _ => {}
            }
            if depth >= 1 {
                inside.push(c);
            }
        }
        inside.push('\n');
    }
    Err((start + 1, "unterminated init block".into()))
}

struct Builder {
    names: HashMap<String, LocId>,
    locations: Vec<Location>,
    threads: usize,
}

impl Symbols for Builder {
    fn location(&mut self, name: &str) -> LocId {
        if let Some(id) = self.names.get(name) {
            return *id;
        }
        let id = LocId(self.locations.len());
        self.locations.push(Location {
            name: name.to_string(),
            ty: ValueType::DEFAULT,
            len: 1,
            init: vec![InitValue::Int(0)],
        });
        self.names.insert(name.to_string(), id);
        id
    }
}

impl CondSymbols for Builder {
    fn thread_count(&self) -> usize {
        self.threads
    }
}

fn parse_init(
    text: &str,
    first_line: usize,
    b: &mut Builder,
    reg_inits: &mut Vec<RegInit>,
    reg_types: &mut Vec<(ThreadId, Reg, ValueType)>,
) -> Result<(), (usize, String)> {
    let mut line = first_line;
    let mut depth = 0;
    let mut item = String::new();
    let mut items = Vec::new();
    let mut item_line = line;
    for c in text.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            '\n' => line += 1,
            _ => {}
        }
        if c == ';' && depth == 0 {
            items.push((item_line, std::mem::take(&mut item)));
            item_line = line;
            continue;
        }
        if item.trim().is_empty() {
            item_line = line;
        }
        item.push(c);
    }
    items.push((item_line, item));
    for (line, item) in items {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        init_item(item, b, reg_inits, reg_types).map_err(|m| (line, m))?;
    }
    Ok(())
}

fn init_item(
    item: &str,
    b: &mut Builder,
    reg_inits: &mut Vec<RegInit>,
    reg_types: &mut Vec<(ThreadId, Reg, ValueType)>,
) -> Result<(), String> {
    let (lhs, rhs) = match item.split_once('=') {
        Some((l, r)) => (l.trim(), Some(r.trim())),
        None => (item, None),
    };
    let mut words: Vec<&str> = lhs.split_whitespace().collect();
    let declared = match words.as_slice() {
        [ty, _] => Some(ValueType::from_c(ty).ok_or_else(|| format!("unsupported type '{ty}'"))?),
        [_] => None,
        _ => return Err(format!("malformed init item '{item}'")),
    };
    let target = words.pop().unwrap_or_default();
    // Array declaration: `t[2]`.
    let array = if target.starts_with('[') {
        None
    } else {
        target.strip_suffix(']').and_then(|t| t.split_once('['))
    };
    if let Some((name, len)) = array {
        if name.is_empty() {
            return Err(format!("malformed init item '{item}'"));
        }
        let ty = declared.ok_or_else(|| format!("array '{name}' needs a type"))?;
        let len: usize = len
            .parse()
            .ok()
            .filter(|n| (1..=4096).contains(n))
            .ok_or_else(|| format!("bad array length in '{item}'"))?;
        let mut init = vec![InitValue::Int(0); len];
        if let Some(rhs) = rhs {
            let inner = rhs
                .strip_prefix('{')
                .and_then(|r| r.strip_suffix('}'))
                .ok_or_else(|| format!("array initialiser must be {{...}} in '{item}'"))?;
            let values: Vec<&str> = inner
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect();
            if values.len() > len {
                return Err(format!("too many initialisers in '{item}'"));
            }
            for (k, v) in values.iter().enumerate() {
                init[k] = init_value(v, b)?;
            }
        }
        let id = b.location(name);
        let loc = &mut b.locations[id.0];
        loc.ty = ty;
        loc.len = len;
        loc.init = init;
        return Ok(());
    }
    let lval = parse_lval(target, b)?;
    let value = rhs.map(|v| init_value(v, b)).transpose()?;
    match lval {
        Lval::Reg(t, r) => {
            if let Some(ty) = declared {
                reg_types.push((t, r, ty));
            }
            if let Some(v) = value {
                reg_inits.retain(|i| !(i.thread == t && i.reg == r));
                reg_inits.push(RegInit {
                    thread: t,
                    reg: r,
                    value: v,
                });
            }
        }
        Lval::Loc(id) => {
            let loc = &mut b.locations[id.0];
            if let Some(ty) = declared {
                loc.ty = ty;
            }
            if let Some(v) = value {
                loc.init = vec![v];
            }
        }
    }
    Ok(())
}

fn init_value(v: &str, b: &mut Builder) -> Result<InitValue, String> {
    if let Some(n) = parse_int(v) {
        return Ok(InitValue::Int(n));
    }
    let name = v.strip_prefix('&').unwrap_or(v);
    if !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
    {
        return Ok(InitValue::Addr(b.location(name)));
    }
    Err(format!("bad initial value '{v}'"))
}

/// Turns a thread's cells into a program, resolving labels to instruction indices.
fn resolve_labels(cells: Vec<(usize, Parsed)>) -> Result<Program, (usize, String)> {
    let mut labels = HashMap::new();
    let mut count = 0;
    for (line, p) in &cells {
        match p {
            Parsed::Label(l) => {
                if labels.insert(l.clone(), count).is_some() {
                    return Err((*line, format!("label '{l}' defined twice")));
                }
            }
            _ => count += 1,
        }
    }
    let mut instrs = Vec::new();
    let mut lines = Vec::new();
    for (line, p) in cells {
        let instr = match p {
            Parsed::Label(_) => continue,
            Parsed::Instr(i) => i,
            Parsed::Jump { cond, label } => {
                let target = *labels
                    .get(&label)
                    .ok_or((line, format!("unknown label '{label}'")))?;
                Instr::Jump { cond, target }
            }
        };
        instrs.push(instr);
        lines.push(line);
    }
    Ok(Program { instrs, lines })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cond::{Prop, Quantifier};

    fn parse(text: &str) -> Result<LitmusTest, ParseError> {
        parse_str(Path::new("t.litmus"), text)
    }

    #[test]
    fn an_intel_dialect_test_parses() {
        let t = parse("X86 SB\n\"Fre PodWR\"\n{ x=0; y=0; }\n P0 | P1 ;\n MOV [x],$1 | MOV [y],$1 ;\n MOV EAX,[y] | MOV EAX,[x] ;\nexists (0:EAX=0 /\\ 1:EAX=0)\n").unwrap();
        assert_eq!(t.arch, Arch::X86);
        assert_eq!(t.name, "SB");
        assert_eq!(t.threads.len(), 2);
        assert_eq!(t.threads[1].instrs.len(), 2);
        assert_eq!(t.condition.quantifier, Quantifier::Exists);
    }

    #[test]
    fn a_single_thread_test_with_comments_and_typed_init_parses() {
        let t = parse("X86_64 A009\n(* a\n comment *)\n{\nint64_t t[2]={1,-1};\n0:rax=t;\n0:rbx=1;\nint64_t 0:rcx;\n}\n\nP0 ;\nmovq 0(%rax,%rbx,8),%rcx ;\nforall 0:rcx = -1\n").unwrap();
        let loc = &t.locations[t.loc_id("t").unwrap().0];
        assert_eq!(loc.len, 2);
        assert_eq!(loc.init[1], InitValue::Int(u64::MAX));
        assert_eq!(t.reg_init(ThreadId(0), Reg::RAX), InitValue::Addr(LocId(0)));
        assert!(matches!(t.condition.prop, Prop::Eq(..)));
    }

    #[test]
    fn labels_resolve_to_instruction_indices() {
        let t = parse("X86_64 B\n{ }\n P0 ;\n cmp $1,%eax ;\n je L1 ;\n movl $1,(x) ;\n L1: ;\n ret ;\nexists ([x]=1)\n").unwrap();
        assert_eq!(
            t.threads[0].instrs[1],
            Instr::Jump {
                cond: Some(crate::instr::Cc::Eq),
                target: 3
            }
        );
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let e =
            parse("X86_64 T\n{ }\n P0 ;\n movl $1,(x) ;\n cpuid ;\nexists ([x]=1)\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("t.litmus:5: P0: unsupported instruction 'cpuid'"),
            "{msg}"
        );
        let e = parse("ARM T\n{ }\n P0 ;\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("t.litmus:1: unsupported architecture 'ARM'")
        );
        let e = parse("X86_64 T\n{ }\n P0 ;\n movl $1,(x) ;\nlocations [x;]\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("t.litmus:5: unsupported clause 'locations'"),
            "{e}"
        );
        let e = parse("X86_64 T\n{ }\n P0 ;\n jmp L9 ;\nexists ([x]=1)\n").unwrap_err();
        assert!(e.to_string().contains("unknown label 'L9'"), "{e}");
        let e = parse("X86_64 T\n{ }\n P0 ;\n movl $1,(x) ;\nexists (2:rax=1)\n").unwrap_err();
        assert!(e.to_string().contains("names thread 2"), "{e}");
    }
}
