//! The instructions a litmus thread may contain, and their parsers for both dialects.
//!
//! Both dialects parse into one [`Instr`] form with explicit widths, so the model and the C
//! generators never look at source text again. Anything outside the supported set is an error
//! naming the instruction, never skipped.

use crate::reg::Reg;
use crate::test::{Arch, LocId, Width};

/// A memory operand: `disp + [sym] + base + index*scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mem {
    pub sym: Option<LocId>,
    pub disp: i64,
    pub base: Option<Reg>,
    pub index: Option<(Reg, u8)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operand {
    /// A register at the given width (`%eax` is `rax` at 4 bytes).
    Reg(Reg, Width),
    Imm(u64),
    Mem(Mem),
}

impl Operand {
    pub fn is_mem(&self) -> bool {
        matches!(self, Operand::Mem(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AluOp {
    Add,
    Sub,
    And,
    Or,
    Xor,
    Shl,
    Shr,
    /// Like `Sub` but only sets flags.
    Cmp,
    /// Like `And` but only sets flags.
    Test,
}

impl AluOp {
    pub fn writes_dst(self) -> bool {
        !matches!(self, AluOp::Cmp | AluOp::Test)
    }

    pub fn att_mnemonic(self) -> &'static str {
        match self {
            AluOp::Add => "add",
            AluOp::Sub => "sub",
            AluOp::And => "and",
            AluOp::Or => "or",
            AluOp::Xor => "xor",
            AluOp::Shl => "shl",
            AluOp::Shr => "shr",
            AluOp::Cmp => "cmp",
            AluOp::Test => "test",
        }
    }

    /// Computes the result of `dst op src` at `width`.
    pub fn apply(self, dst: u64, src: u64, width: Width) -> u64 {
        let bits = 8 * width.bytes() as u64;
        let count = src & if bits == 64 { 63 } else { 31 };
        let r = match self {
            AluOp::Add => dst.wrapping_add(src),
            AluOp::Sub | AluOp::Cmp => dst.wrapping_sub(src),
            AluOp::And | AluOp::Test => dst & src,
            AluOp::Or => dst | src,
            AluOp::Xor => dst ^ src,
            AluOp::Shl if count >= bits => 0,
            AluOp::Shl => dst << count,
            AluOp::Shr if count >= bits => 0,
            AluOp::Shr => (dst & width.mask()) >> count,
        };
        r & width.mask()
    }
}

/// Condition of a conditional jump (only the zero flag is modelled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cc {
    /// `je` / `jz`
    Eq,
    /// `jne` / `jnz`
    Ne,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fence {
    /// Drains the store buffer.
    M,
    /// No effect on ordinary write-back memory under TSO.
    L,
    /// No effect on ordinary write-back memory under TSO.
    S,
}

/// One instruction, with explicit widths and resolved branch targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Instr {
    Mov {
        dst: Operand,
        src: Operand,
        width: Width,
    },
    Alu {
        op: AluOp,
        dst: Operand,
        src: Operand,
        width: Width,
        locked: bool,
    },
    /// Exchange; with a memory operand it is implicitly locked (atomic and fencing).
    Xchg {
        dst: Operand,
        src: Reg,
        width: Width,
    },
    Xadd {
        dst: Operand,
        src: Reg,
        width: Width,
        locked: bool,
    },
    /// Compare `rax` with `dst`; equal: `dst = src`, else `rax = dst`.
    Cmpxchg {
        dst: Operand,
        src: Reg,
        width: Width,
        locked: bool,
    },
    Fence(Fence),
    Jump {
        cond: Option<Cc>,
        target: usize,
    },
    /// Ends the thread.
    Ret,
    Nop,
}

impl Instr {
    /// Whether the instruction touches memory (reads or writes a shared location).
    pub fn accesses_memory(&self) -> bool {
        match self {
            Instr::Mov { dst, src, .. } | Instr::Alu { dst, src, .. } => {
                dst.is_mem() || src.is_mem()
            }
            Instr::Xchg { dst, .. } | Instr::Xadd { dst, .. } | Instr::Cmpxchg { dst, .. } => {
                dst.is_mem()
            }
            Instr::Fence(Fence::M) => true,
            _ => false,
        }
    }

    /// Whether the instruction is an atomic read-modify-write (locked, or `xchg` with memory).
    pub fn is_atomic_rmw(&self) -> bool {
        match self {
            Instr::Alu { locked, dst, .. }
            | Instr::Xadd { locked, dst, .. }
            | Instr::Cmpxchg { locked, dst, .. } => *locked && dst.is_mem(),
            Instr::Xchg { dst, .. } => dst.is_mem(),
            _ => false,
        }
    }
}

/// A parsed line cell: an instruction whose branch target is still a label name, or a label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Label(String),
    Instr(Instr),
    Jump { cond: Option<Cc>, label: String },
}

/// What parsing one instruction needs from the surrounding test: location ids by name.
pub trait Symbols {
    fn location(&mut self, name: &str) -> LocId;
}

/// Parses one program cell (`movl $1,(x)`, `MOV EAX,[y]`, `L0:`) of the given dialect.
pub fn parse_cell(arch: Arch, text: &str, syms: &mut dyn Symbols) -> Result<Parsed, String> {
    let text = text.trim();
    if let Some(label) = text.strip_suffix(':') {
        let label = label.trim();
        if is_ident(label) {
            return Ok(Parsed::Label(label.to_string()));
        }
        return Err(format!("malformed label '{text}'"));
    }
    let mut words = text.splitn(2, char::is_whitespace);
    let mut mnemonic = words.next().unwrap_or("").to_ascii_lowercase();
    let mut rest = words.next().unwrap_or("").trim().to_string();
    let mut locked = false;
    if mnemonic == "lock" {
        locked = true;
        let mut w = rest.splitn(2, char::is_whitespace);
        mnemonic = w.next().unwrap_or("").to_ascii_lowercase();
        rest = w.next().unwrap_or("").trim().to_string();
    }
    if let Some(cond) = jump_condition(&mnemonic) {
        let label = rest.trim();
        if locked || !is_ident(label) {
            return Err(format!("'{mnemonic}' needs a label in '{text}'"));
        }
        return Ok(Parsed::Jump {
            cond,
            label: label.to_string(),
        });
    }
    let ops: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        split_operands(&rest)
    };
    let operands = ops
        .iter()
        .map(|o| match arch {
            Arch::X86 => parse_intel_operand(o, syms),
            Arch::X86_64 => parse_att_operand(o, syms),
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Intel order is `dst, src`; AT&T is `src, dst`. Normalise to (dst, src).
    let (dst, src) = match (arch, operands.as_slice()) {
        (_, []) => (None, None),
        (_, [a]) => (Some(*a), None),
        (Arch::X86, [d, s]) => (Some(*d), Some(*s)),
        (Arch::X86_64, [s, d]) => (Some(*d), Some(*s)),
        _ => return Err(format!("too many operands in '{text}'")),
    };
    let (base, suffix) = split_mnemonic(&mnemonic);
    let base = base.ok_or_else(|| format!("unsupported instruction '{mnemonic}'"))?;
    let suffix_width = suffix.map(|c| match c {
        'b' => Width::W1,
        'w' => Width::W2,
        'l' => Width::W4,
        _ => Width::W8,
    });
    let default_width = match arch {
        Arch::X86 => Some(Width::W4),
        Arch::X86_64 => None,
    };
    let width = || -> Result<Width, String> {
        let reg_width = [dst, src].into_iter().flatten().find_map(|o| match o {
            Operand::Reg(r, w) if r.is_gpr() => Some(w),
            _ => None,
        });
        suffix_width
            .or(reg_width)
            .or(default_width)
            .ok_or_else(|| format!("cannot tell the operand size of '{text}' (add a suffix)"))
    };
    let need2 = || -> Result<(Operand, Operand), String> {
        match (dst, src) {
            (Some(d), Some(s)) => Ok((d, s)),
            _ => Err(format!("'{mnemonic}' needs two operands in '{text}'")),
        }
    };
    let need0 = || -> Result<(), String> {
        if dst.is_some() && !matches!(base, "nop") {
            return Err(format!("'{mnemonic}' takes no operands in '{text}'"));
        }
        Ok(())
    };
    if locked
        && !matches!(
            base,
            "add" | "sub" | "and" | "or" | "xor" | "inc" | "dec" | "xchg" | "xadd" | "cmpxchg"
        )
    {
        return Err(format!("'lock' cannot prefix '{mnemonic}'"));
    }
    let instr = match base {
        "mov" => {
            let (d, s) = need2()?;
            if d.is_mem() && s.is_mem() {
                return Err(format!("memory-to-memory move in '{text}'"));
            }
            if matches!(d, Operand::Imm(_)) {
                return Err(format!("move into an immediate in '{text}'"));
            }
            Instr::Mov {
                dst: d,
                src: s,
                width: width()?,
            }
        }
        "add" | "sub" | "and" | "or" | "xor" | "shl" | "sal" | "shr" | "cmp" | "test" => {
            let (d, s) = need2()?;
            let op = match base {
                "add" => AluOp::Add,
                "sub" => AluOp::Sub,
                "and" => AluOp::And,
                "or" => AluOp::Or,
                "xor" => AluOp::Xor,
                "shl" | "sal" => AluOp::Shl,
                "shr" => AluOp::Shr,
                "cmp" => AluOp::Cmp,
                _ => AluOp::Test,
            };
            alu(op, d, s, width()?, locked, text)?
        }
        "inc" | "dec" => {
            let d = dst.ok_or_else(|| format!("'{mnemonic}' needs an operand"))?;
            let op = if base == "inc" {
                AluOp::Add
            } else {
                AluOp::Sub
            };
            alu(op, d, Operand::Imm(1), width()?, locked, text)?
        }
        "xchg" | "xadd" | "cmpxchg" => {
            let (d, s) = need2()?;
            // xchg is symmetric: put the memory operand (if any) in `dst`.
            let (d, s) = if base == "xchg" && s.is_mem() {
                (s, d)
            } else {
                (d, s)
            };
            let Operand::Reg(src, _) = s else {
                return Err(format!("'{mnemonic}' needs a register source in '{text}'"));
            };
            if matches!(d, Operand::Imm(_)) {
                return Err(format!("'{mnemonic}' into an immediate in '{text}'"));
            }
            let w = width()?;
            match base {
                "xchg" => Instr::Xchg {
                    dst: d,
                    src,
                    width: w,
                },
                "xadd" => Instr::Xadd {
                    dst: d,
                    src,
                    width: w,
                    locked,
                },
                _ => Instr::Cmpxchg {
                    dst: d,
                    src,
                    width: w,
                    locked,
                },
            }
        }
        "mfence" | "lfence" | "sfence" => {
            need0()?;
            Instr::Fence(match base {
                "mfence" => Fence::M,
                "lfence" => Fence::L,
                _ => Fence::S,
            })
        }
        "nop" => Instr::Nop,
        "ret" => {
            need0()?;
            Instr::Ret
        }
        other => return Err(format!("unsupported instruction '{other}'")),
    };
    Ok(Parsed::Instr(instr))
}

/// `Some(cond)` when `m` is a jump mnemonic (`None` inside: unconditional).
fn jump_condition(m: &str) -> Option<Option<Cc>> {
    match m {
        "jmp" => Some(None),
        "je" | "jz" => Some(Some(Cc::Eq)),
        "jne" | "jnz" => Some(Some(Cc::Ne)),
        _ => None,
    }
}

fn alu(
    op: AluOp,
    d: Operand,
    s: Operand,
    width: Width,
    locked: bool,
    text: &str,
) -> Result<Instr, String> {
    if d.is_mem() && s.is_mem() {
        return Err(format!("two memory operands in '{text}'"));
    }
    if matches!(d, Operand::Imm(_)) {
        return Err(format!("immediate destination in '{text}'"));
    }
    if locked && !d.is_mem() {
        return Err(format!("'lock' needs a memory destination in '{text}'"));
    }
    Ok(Instr::Alu {
        op,
        dst: d,
        src: s,
        width,
        locked,
    })
}

const BASES: [&str; 21] = [
    "mov", "add", "sub", "and", "or", "xor", "shl", "sal", "shr", "cmp", "test", "inc", "dec",
    "xchg", "xadd", "cmpxchg", "mfence", "lfence", "sfence", "nop", "ret",
];

/// Splits an AT&T mnemonic into its base and size suffix (`movl` -> `mov`, `l`).
fn split_mnemonic(m: &str) -> (Option<&'static str>, Option<char>) {
    if let Some(b) = BASES.iter().find(|b| **b == m) {
        return (Some(b), None);
    }
    let mut chars = m.chars();
    match chars.next_back() {
        Some(c @ ('b' | 'w' | 'l' | 'q')) => {
            let stem = chars.as_str();
            let found = BASES.iter().find(|b| **b == stem);
            (found.copied(), found.map(|_| c))
        }
        _ => (None, None),
    }
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Splits operands at top-level commas (not inside parentheses or brackets).
fn split_operands(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out
}

/// Parses an integer: decimal or `0x` hex, optionally negative; the result is two's complement.
pub fn parse_int(s: &str) -> Option<u64> {
    let s = s.trim();
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        digits.parse::<u64>().ok()?
    };
    Some(if neg { v.wrapping_neg() } else { v })
}

fn parse_att_operand(op: &str, syms: &mut dyn Symbols) -> Result<Operand, String> {
    let op = op.trim();
    if let Some(imm) = op.strip_prefix('$') {
        return parse_int(imm)
            .map(Operand::Imm)
            .ok_or_else(|| format!("bad immediate '{op}'"));
    }
    if let Some(name) = op.strip_prefix('%') {
        if let Some((seg_or_reg, rest)) = name.split_once(':') {
            // A segment override: `%cs:0(%rax)`. The segment is ignored (flat memory).
            if Reg::lookup(seg_or_reg).is_none() {
                return Err(format!("unknown register '%{seg_or_reg}'"));
            }
            return parse_att_operand(rest, syms);
        }
        return Reg::lookup(name)
            .map(|(r, w)| Operand::Reg(r, w))
            .ok_or_else(|| format!("unknown register '{op}'"));
    }
    // Bare integer: herd7 reads it as an immediate (`shl 2,%eax`).
    if let Some(v) = parse_int(op) {
        return Ok(Operand::Imm(v));
    }
    let (disp_text, inner) = match op.find('(') {
        Some(open) => {
            let close = op
                .rfind(')')
                .filter(|c| *c == op.len() - 1)
                .ok_or_else(|| format!("unbalanced parentheses in '{op}'"))?;
            (&op[..open], Some(&op[open + 1..close]))
        }
        None => (op, None),
    };
    let mut mem = Mem {
        sym: None,
        disp: 0,
        base: None,
        index: None,
    };
    let disp_text = disp_text.trim();
    if !disp_text.is_empty() {
        if let Some(v) = parse_int(disp_text) {
            mem.disp = v as i64;
        } else if is_ident(disp_text) {
            mem.sym = Some(syms.location(disp_text));
        } else {
            return Err(format!("bad displacement in '{op}'"));
        }
    }
    if let Some(inner) = inner {
        let parts: Vec<&str> = inner.split(',').map(str::trim).collect();
        let reg = |p: &str| -> Result<Reg, String> {
            p.strip_prefix('%')
                .and_then(Reg::lookup)
                .map(|(r, _)| r)
                .ok_or_else(|| format!("bad register '{p}' in '{op}'"))
        };
        match parts.as_slice() {
            [s] if is_ident(s) => {
                if mem.sym.is_some() {
                    return Err(format!("two symbols in '{op}'"));
                }
                mem.sym = Some(syms.location(s));
            }
            [b] => mem.base = Some(reg(b)?),
            [b, i] | [b, i, _] => {
                if !b.is_empty() {
                    mem.base = Some(reg(b)?);
                }
                let scale = match parts.get(2) {
                    Some(s) => parse_int(s)
                        .filter(|v| matches!(v, 0 | 1 | 2 | 4 | 8))
                        .ok_or_else(|| format!("bad scale in '{op}'"))?
                        as u8,
                    None => 1,
                };
                mem.index = Some((reg(i)?, scale));
            }
            _ => return Err(format!("malformed memory operand '{op}'")),
        }
    }
    if mem.sym.is_none() && mem.base.is_none() && mem.index.is_none() {
        return Err(format!("absolute address operand '{op}' is not supported"));
    }
    Ok(Operand::Mem(mem))
}

fn parse_intel_operand(op: &str, syms: &mut dyn Symbols) -> Result<Operand, String> {
    let op = op.trim();
    if let Some(imm) = op.strip_prefix('$') {
        return parse_int(imm)
            .map(Operand::Imm)
            .ok_or_else(|| format!("bad immediate '{op}'"));
    }
    if let Some(v) = parse_int(op) {
        return Ok(Operand::Imm(v));
    }
    if let Some(inner) = op.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        let mut mem = Mem {
            sym: None,
            disp: 0,
            base: None,
            index: None,
        };
        for term in inner.split('+').map(str::trim) {
            if let Some(v) = parse_int(term) {
                mem.disp = mem.disp.wrapping_add(v as i64);
            } else if let Some((r, s)) = term.split_once('*') {
                let (reg, _) =
                    Reg::lookup(r.trim()).ok_or_else(|| format!("bad register in '{op}'"))?;
                let scale = parse_int(s)
                    .filter(|v| matches!(v, 1 | 2 | 4 | 8))
                    .ok_or_else(|| format!("bad scale in '{op}'"))?;
                mem.index = Some((reg, scale as u8));
            } else if let Some((reg, _)) = Reg::lookup(term) {
                if mem.base.is_none() {
                    mem.base = Some(reg);
                } else {
                    mem.index = Some((reg, 1));
                }
            } else if is_ident(term) && mem.sym.is_none() {
                mem.sym = Some(syms.location(term));
            } else {
                return Err(format!("malformed memory operand '{op}'"));
            }
        }
        if mem.sym.is_none() && mem.base.is_none() {
            return Err(format!("absolute address operand '{op}' is not supported"));
        }
        return Ok(Operand::Mem(mem));
    }
    Reg::lookup(op)
        .map(|(r, w)| Operand::Reg(r, w))
        .ok_or_else(|| format!("unknown operand '{op}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Names(Vec<String>);
    impl Symbols for Names {
        fn location(&mut self, name: &str) -> LocId {
            if let Some(i) = self.0.iter().position(|n| n == name) {
                return LocId(i);
            }
            self.0.push(name.to_string());
            LocId(self.0.len() - 1)
        }
    }

    fn parse(arch: Arch, s: &str) -> Result<Parsed, String> {
        parse_cell(arch, s, &mut Names(Vec::new()))
    }

    fn x() -> Operand {
        Operand::Mem(Mem {
            sym: Some(LocId(0)),
            disp: 0,
            base: None,
            index: None,
        })
    }

    #[test]
    fn intel_and_att_stores_parse_to_the_same_instruction() {
        let intel = parse(Arch::X86, "MOV [x],$1").unwrap();
        let att = parse(Arch::X86_64, "movl $1,(x)").unwrap();
        assert_eq!(intel, att);
        assert_eq!(
            att,
            Parsed::Instr(Instr::Mov {
                dst: x(),
                src: Operand::Imm(1),
                width: Width::W4
            })
        );
    }

    #[test]
    fn xchg_puts_the_memory_operand_first_whatever_the_order() {
        let a = parse(Arch::X86_64, "xchgl (x),%eax").unwrap();
        let b = parse(Arch::X86_64, "xchgl %eax,(x)").unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a,
            Parsed::Instr(Instr::Xchg {
                dst: x(),
                src: Reg::RAX,
                width: Width::W4
            })
        );
    }

    #[test]
    fn indexed_and_segment_operands_parse() {
        let p = parse(Arch::X86_64, "movq 0(%rax,%rbx,8),%rcx").unwrap();
        let Parsed::Instr(Instr::Mov {
            src: Operand::Mem(m),
            width: Width::W8,
            ..
        }) = p
        else {
            panic!("{p:?}")
        };
        assert_eq!(m.base, Some(Reg::RAX));
        assert_eq!(m.index, Some((Reg(1), 8)));
        assert!(matches!(
            parse(Arch::X86_64, "NOPL %cs:0(%rax,%eax,0)"),
            Ok(Parsed::Instr(Instr::Nop))
        ));
    }

    #[test]
    fn lock_prefix_and_jumps_parse() {
        let p = parse(Arch::X86, "LOCK ADD [x],$2").unwrap();
        assert_eq!(
            p,
            Parsed::Instr(Instr::Alu {
                op: AluOp::Add,
                dst: x(),
                src: Operand::Imm(2),
                width: Width::W4,
                locked: true
            })
        );
        assert_eq!(
            parse(Arch::X86_64, "je L0x3b").unwrap(),
            Parsed::Jump {
                cond: Some(Cc::Eq),
                label: "L0x3b".into()
            }
        );
        assert_eq!(
            parse(Arch::X86_64, "L0x31:").unwrap(),
            Parsed::Label("L0x31".into())
        );
    }

    #[test]
    fn unsupported_and_malformed_instructions_are_errors() {
        assert!(
            parse(Arch::X86_64, "cpuid")
                .unwrap_err()
                .contains("unsupported")
        );
        assert!(
            parse(Arch::X86_64, "mov $1,(x)")
                .unwrap_err()
                .contains("operand size")
        );
        assert!(parse(Arch::X86_64, "movl (x),(y)").is_err());
        assert!(parse(Arch::X86_64, "lock movl $1,(x)").is_err());
        assert!(parse(Arch::X86, "MOV EAX,[x").is_err());
    }

    #[test]
    fn alu_ops_wrap_at_their_width() {
        assert_eq!(AluOp::Add.apply(0xffff_ffff, 1, Width::W4), 0);
        assert_eq!(AluOp::Shl.apply(1, 2, Width::W4), 4);
        assert_eq!(AluOp::Sub.apply(0, 1, Width::W8), u64::MAX);
    }
}
