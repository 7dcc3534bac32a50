//! A parsed litmus test: memory locations, initial state, one program per thread, and the final
//! condition. Both dialects parse into this one form.

use std::fmt;

use crate::cond::Condition;
use crate::instr::Instr;
use crate::reg::Reg;

/// The dialect a test is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// `X86`: Intel operand order (`MOV [x],$1`), 32-bit registers.
    X86,
    /// `X86_64`: AT&T operand order (`movl $1,(x)`), 64-bit registers.
    X86_64,
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86 => "X86",
            Arch::X86_64 => "X86_64",
        })
    }
}

/// An access width in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Width {
    W1 = 1,
    W2 = 2,
    W4 = 4,
    W8 = 8,
}

impl Width {
    pub fn bytes(self) -> usize {
        self as usize
    }

    /// All-ones mask of this width.
    pub fn mask(self) -> u64 {
        match self {
            Width::W8 => u64::MAX,
            w => (1u64 << (8 * w.bytes())) - 1,
        }
    }

    /// The AT&T mnemonic suffix for this width.
    pub fn att_suffix(self) -> char {
        match self {
            Width::W1 => 'b',
            Width::W2 => 'w',
            Width::W4 => 'l',
            Width::W8 => 'q',
        }
    }

    pub fn from_bytes(n: usize) -> Option<Width> {
        match n {
            1 => Some(Width::W1),
            2 => Some(Width::W2),
            4 => Some(Width::W4),
            8 => Some(Width::W8),
            _ => None,
        }
    }
}

/// The C type of a location or register: its width and signedness (which decides how a value
/// prints: an `int64_t` holding all ones prints `-1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ValueType {
    pub width: Width,
    pub signed: bool,
}

impl ValueType {
    /// herd7's default for undeclared cells: a signed 64-bit value.
    pub const DEFAULT: ValueType = ValueType {
        width: Width::W8,
        signed: true,
    };

    /// Parses a C type name as litmus init blocks write it.
    pub fn from_c(name: &str) -> Option<ValueType> {
        let (signed, width) = match name {
            "int8_t" | "char" => (true, Width::W1),
            "uint8_t" => (false, Width::W1),
            "int16_t" | "short" => (true, Width::W2),
            "uint16_t" => (false, Width::W2),
            "int32_t" | "int" => (true, Width::W4),
            "uint32_t" => (false, Width::W4),
            "int64_t" | "long" => (true, Width::W8),
            "uint64_t" => (false, Width::W8),
            _ => return None,
        };
        Some(ValueType { width, signed })
    }

    /// The C type name, for generated programs.
    pub fn c_name(self) -> &'static str {
        match (self.signed, self.width) {
            (true, Width::W1) => "int8_t",
            (false, Width::W1) => "uint8_t",
            (true, Width::W2) => "int16_t",
            (false, Width::W2) => "uint16_t",
            (true, Width::W4) => "int32_t",
            (false, Width::W4) => "uint32_t",
            (true, Width::W8) => "int64_t",
            (false, Width::W8) => "uint64_t",
        }
    }

    /// Renders a raw value of this type the way herd7 prints it.
    pub fn render(self, raw: u64) -> String {
        let v = raw & self.width.mask();
        if !self.signed {
            return v.to_string();
        }
        let shift = 64 - 8 * self.width.bytes() as u32;
        (((v << shift) as i64) >> shift).to_string()
    }
}

/// Index of a memory location in [`LitmusTest::locations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocId(pub usize);

/// A thread number (`P0` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ThreadId(pub usize);

/// An initial value: an integer, or the address of a location (`0:rax=t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InitValue {
    Int(u64),
    Addr(LocId),
}

/// A shared memory location (a scalar, or an array of `len` elements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub name: String,
    pub ty: ValueType,
    pub len: usize,
    /// Initial value of each element (zero when the test gives none).
    pub init: Vec<InitValue>,
}

impl Location {
    /// Size in bytes (at least 8 per element so any access width fits in a scalar).
    pub fn size_bytes(&self) -> usize {
        if self.len == 1 {
            8
        } else {
            self.len * self.ty.width.bytes()
        }
    }
}

/// A thread's initial register value (`0:rax=1`, or an address: `0:rax=t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegInit {
    pub thread: ThreadId,
    pub reg: Reg,
    pub value: InitValue,
}

/// One thread's program: instructions with branch targets resolved to indices, and the source
/// line of each instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub instrs: Vec<Instr>,
    pub lines: Vec<usize>,
}

/// A whole litmus test.
#[derive(Debug, Clone)]
pub struct LitmusTest {
    pub arch: Arch,
    pub name: String,
    pub locations: Vec<Location>,
    pub reg_inits: Vec<RegInit>,
    /// Declared register types (`int64_t 0:rcx;`), used when printing values.
    pub reg_types: Vec<(ThreadId, Reg, ValueType)>,
    pub threads: Vec<Program>,
    pub condition: Condition,
}

impl LitmusTest {
    pub fn loc_id(&self, name: &str) -> Option<LocId> {
        self.locations
            .iter()
            .position(|l| l.name == name)
            .map(LocId)
    }

    pub fn location(&self, id: LocId) -> &Location {
        &self.locations[id.0]
    }

    /// The type a register's value is printed with.
    pub fn reg_type(&self, thread: ThreadId, reg: Reg) -> ValueType {
        self.reg_types
            .iter()
            .find(|(t, r, _)| *t == thread && *r == reg)
            .map(|(_, _, ty)| *ty)
            .unwrap_or(match self.arch {
                Arch::X86 if reg.is_gpr() => ValueType {
                    width: Width::W4,
                    signed: true,
                },
                _ => ValueType::DEFAULT,
            })
    }

    /// The initial value of a register (zero unless the init block sets it).
    pub fn reg_init(&self, thread: ThreadId, reg: Reg) -> InitValue {
        self.reg_inits
            .iter()
            .find(|i| i.thread == thread && i.reg == reg)
            .map(|i| i.value)
            .unwrap_or(InitValue::Int(0))
    }
}
