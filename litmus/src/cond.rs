//! Final conditions (`exists`, `~exists`, `forall`): parsing, evaluation over a final state, and
//! printing exactly as herd7 prints them.

use crate::instr::{Symbols, parse_int};
use crate::reg::Reg;
use crate::test::{InitValue, LitmusTest, LocId, ThreadId};

/// A place whose final value a condition (and herd7's state list) talks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lval {
    Reg(ThreadId, Reg),
    Loc(LocId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prop {
    True,
    False,
    Eq(Lval, InitValue),
    Not(Box<Prop>),
    And(Box<Prop>, Box<Prop>),
    Or(Box<Prop>, Box<Prop>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantifier {
    Exists,
    NotExists,
    Forall,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub quantifier: Quantifier,
    pub prop: Prop,
}

impl Prop {
    /// Every place the proposition mentions, in order of first mention.
    pub fn lvals(&self, out: &mut Vec<Lval>) {
        match self {
            Prop::True | Prop::False => {}
            Prop::Eq(l, _) => {
                if !out.contains(l) {
                    out.push(*l);
                }
            }
            Prop::Not(p) => p.lvals(out),
            Prop::And(a, b) | Prop::Or(a, b) => {
                a.lvals(out);
                b.lvals(out);
            }
        }
    }

    /// Evaluates the proposition; `holds(place, value)` says whether a place's final value
    /// equals a condition value.
    pub fn eval(&self, holds: &dyn Fn(Lval, InitValue) -> bool) -> bool {
        match self {
            Prop::True => true,
            Prop::False => false,
            Prop::Eq(l, v) => holds(*l, *v),
            Prop::Not(p) => !p.eval(holds),
            Prop::And(a, b) => a.eval(holds) && b.eval(holds),
            Prop::Or(a, b) => a.eval(holds) || b.eval(holds),
        }
    }
}

/// Prints a place as herd7 does: `0:rax`, `1:EAX`, `[x]`.
pub fn lval_text(test: &LitmusTest, l: Lval) -> String {
    match l {
        Lval::Reg(t, r) => format!("{}:{}", t.0, r.herd_name(test.arch)),
        Lval::Loc(id) => format!("[{}]", test.location(id).name),
    }
}

fn value_text(test: &LitmusTest, l: Lval, v: InitValue) -> String {
    match v {
        InitValue::Addr(id) => test.location(id).name.clone(),
        InitValue::Int(raw) => match l {
            Lval::Reg(t, r) => test.reg_type(t, r).render(raw),
            Lval::Loc(id) => test.location(id).ty.render(raw),
        },
    }
}

/// Prints a condition exactly as herd7's `Condition` line does.
pub fn condition_text(test: &LitmusTest, c: &Condition) -> String {
    let q = match c.quantifier {
        Quantifier::Exists => "exists",
        Quantifier::NotExists => "~exists",
        Quantifier::Forall => "forall",
    };
    format!("{q} ({})", prop_text(test, &c.prop))
}

fn prop_text(test: &LitmusTest, p: &Prop) -> String {
    let paren = |s: String| format!("({s})");
    match p {
        Prop::True => "true".into(),
        Prop::False => "false".into(),
        Prop::Eq(l, v) => format!("{}={}", lval_text(test, *l), value_text(test, *l, *v)),
        Prop::Not(q) => format!("not ({})", prop_text(test, q)),
        Prop::And(a, b) => {
            let left = match **a {
                Prop::And(..) | Prop::Or(..) => paren(prop_text(test, a)),
                _ => prop_text(test, a),
            };
            let right = match **b {
                Prop::Or(..) => paren(prop_text(test, b)),
                _ => prop_text(test, b),
            };
            format!("{left} /\\ {right}")
        }
        Prop::Or(a, b) => {
            let left = match **a {
                Prop::Or(..) => paren(prop_text(test, a)),
                _ => prop_text(test, a),
            };
            format!("{left} \\/ {}", prop_text(test, b))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Open,
    Close,
    And,
    Or,
    Not,
    Eq,
    Word(String),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let two = s.get(i..i + 2);
        if two == Some("/\\") {
            out.push(Tok::And);
            i += 2;
        } else if two == Some("\\/") {
            out.push(Tok::Or);
            i += 2;
        } else if c == '(' {
            out.push(Tok::Open);
            i += 1;
        } else if c == ')' {
            out.push(Tok::Close);
            i += 1;
        } else if c == '~' {
            out.push(Tok::Not);
            i += 1;
        } else if c == '=' {
            out.push(Tok::Eq);
            i += 1;
        } else if c.is_ascii_alphanumeric() || matches!(c, '_' | '[' | ']' | ':' | '-' | '.' | '+')
        {
            let start = i;
            while i < b.len() {
                let d = b[i] as char;
                if d.is_ascii_alphanumeric() || matches!(d, '_' | '[' | ']' | ':' | '-' | '.' | '+')
                {
                    i += 1;
                } else {
                    break;
                }
            }
            let w = &s[start..i];
            out.push(if w == "not" {
                Tok::Not
            } else {
                Tok::Word(w.to_string())
            });
        } else {
            return Err(format!("unexpected character '{c}' in condition"));
        }
    }
    Ok(out)
}

/// Resolves names in a condition: registers and locations.
pub trait CondSymbols: Symbols {
    fn thread_count(&self) -> usize;
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    syms: &'a mut dyn CondSymbols,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn disj(&mut self) -> Result<Prop, String> {
        let a = self.conj()?;
        if self.peek() == Some(&Tok::Or) {
            self.pos += 1;
            let b = self.disj()?;
            return Ok(Prop::Or(Box::new(a), Box::new(b)));
        }
        Ok(a)
    }

    fn conj(&mut self) -> Result<Prop, String> {
        let a = self.unary()?;
        if self.peek() == Some(&Tok::And) {
            self.pos += 1;
            let b = self.conj()?;
            return Ok(Prop::And(Box::new(a), Box::new(b)));
        }
        Ok(a)
    }

    fn unary(&mut self) -> Result<Prop, String> {
        match self.next() {
            Some(Tok::Not) => Ok(Prop::Not(Box::new(self.unary()?))),
            Some(Tok::Open) => {
                let p = self.disj()?;
                match self.next() {
                    Some(Tok::Close) => Ok(p),
                    _ => Err("missing ')' in condition".into()),
                }
            }
            Some(Tok::Word(w)) if w == "true" => Ok(Prop::True),
            Some(Tok::Word(w)) if w == "false" => Ok(Prop::False),
            Some(Tok::Word(w)) => {
                let lval = self.lval(&w)?;
                if self.next() != Some(Tok::Eq) {
                    return Err(format!("expected '=' after '{w}' in condition"));
                }
                let value = match self.next() {
                    Some(Tok::Word(v)) => self.value(&v)?,
                    _ => return Err(format!("expected a value after '{w}=' in condition")),
                };
                Ok(Prop::Eq(lval, value))
            }
            other => Err(format!("unexpected {other:?} in condition")),
        }
    }

    fn lval(&mut self, w: &str) -> Result<Lval, String> {
        parse_lval(w, self.syms)
    }

    fn value(&mut self, v: &str) -> Result<InitValue, String> {
        if let Some(n) = parse_int(v) {
            return Ok(InitValue::Int(n));
        }
        Ok(InitValue::Addr(self.syms.location(v)))
    }
}

/// Parses `N:reg`, `[x]` or `x`.
pub fn parse_lval(w: &str, syms: &mut dyn CondSymbols) -> Result<Lval, String> {
    if let Some((t, r)) = w.split_once(':') {
        let thread: usize = t
            .parse()
            .map_err(|_| format!("bad thread number in '{w}'"))?;
        if thread >= syms.thread_count() {
            return Err(format!(
                "'{w}' names thread {thread}, but the test has {} threads",
                syms.thread_count()
            ));
        }
        let (reg, _) = Reg::lookup(r).ok_or_else(|| format!("unknown register in '{w}'"))?;
        return Ok(Lval::Reg(ThreadId(thread), reg));
    }
    let name = w
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(w);
    if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(format!("bad location '{w}'"));
    }
    Ok(Lval::Loc(syms.location(name)))
}

/// Parses the condition text after the program (`exists (...)`, `~exists ...`, `forall ...`).
pub fn parse_condition(text: &str, syms: &mut dyn CondSymbols) -> Result<Condition, String> {
    let text = text.trim();
    let (quantifier, rest) = if let Some(r) = text.strip_prefix("~exists") {
        (Quantifier::NotExists, r)
    } else if let Some(r) = text.strip_prefix("exists") {
        (Quantifier::Exists, r)
    } else if let Some(r) = text.strip_prefix("forall") {
        (Quantifier::Forall, r)
    } else {
        return Err(format!(
            "expected 'exists', '~exists' or 'forall', found '{}'",
            text.lines().next().unwrap_or("")
        ));
    };
    let toks = tokenize(rest)?;
    let mut p = Parser { toks, pos: 0, syms };
    let prop = p.disj()?;
    if p.pos != p.toks.len() {
        return Err("trailing text after the condition".into());
    }
    Ok(Condition { quantifier, prop })
}
