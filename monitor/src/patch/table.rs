//! The one table of sensitive instructions: every instruction `vsmp patch` marks.
//!
//! `docs/guest-platform.md` reproduces this table (a test checks that every mnemonic here is
//! listed there). An entry names mnemonics as GNU `as` spells them in AT&T syntax, with every
//! size suffix spelled out, and a [`Rule`] saying when an instruction with that mnemonic is
//! sensitive (some, like `mov` or `xchg`, are sensitive only with certain operands).

/// Why an instruction must trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Faults or misbehaves natively in user mode; the monitor emulates it.
    Privileged,
    /// Runs natively in user mode but reveals or changes state the guest is not entitled to
    /// (flags, descriptor tables, CPU identity, segment registers).
    SensitiveUnprivileged,
    /// Orders memory: the DSM must see it (fences, locked and implicitly locked instructions).
    MemoryOrdering,
}

impl Class {
    /// A short lowercase name for tables and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Class::Privileged => "privileged",
            Class::SensitiveUnprivileged => "sensitive unprivileged",
            Class::MemoryOrdering => "memory ordering",
        }
    }
}

/// When an instruction whose mnemonic is in an entry is sensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Always.
    Always,
    /// When one operand is a control or debug register (`%crN`, `%drN`).
    ControlOrDebugRegister,
    /// When an operand is a segment register (`%cs`, `%ds`, `%es`, `%fs`, `%gs`, `%ss`).
    SegmentRegister,
    /// When one operand is in memory (neither a register nor an immediate).
    MemoryOperand,
    /// When the instruction carries a `lock` prefix, whatever its mnemonic.
    LockPrefix,
}

impl Rule {
    /// How the docs describe the rule.
    pub const fn describe(self) -> &'static str {
        match self {
            Rule::Always => "always",
            Rule::ControlOrDebugRegister => "when an operand is `%crN` or `%drN`",
            Rule::SegmentRegister => {
                "when an operand is `%cs`, `%ds`, `%es`, `%fs`, `%gs` or `%ss` (not a `%fs:` override)"
            }
            Rule::MemoryOperand => "when an operand is in memory (not between two registers)",
            Rule::LockPrefix => "any instruction with a `lock` prefix",
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// What the instructions are, for reports and docs.
    pub what: &'static str,
    /// Mnemonics, lowercase, every accepted size suffix spelled out.
    pub mnemonics: &'static [&'static str],
    pub class: Class,
    pub rule: Rule,
}

/// The mnemonic under which [`Rule::LockPrefix`] instructions are listed.
pub const LOCK: &str = "lock";

/// Every sensitive instruction.
pub const TABLE: &[Entry] = &[
    // Privileged.
    Entry {
        what: "port input",
        mnemonics: &["in", "inb", "inw", "inl"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "port output",
        mnemonics: &["out", "outb", "outw", "outl"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "string port input",
        mnemonics: &["ins", "insb", "insw", "insl", "insd"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "string port output",
        mnemonics: &["outs", "outsb", "outsw", "outsl", "outsd"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "halt",
        mnemonics: &["hlt"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "interrupt flag",
        mnemonics: &["cli", "sti"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "load descriptor-table register",
        mnemonics: &[
            "lgdt", "lgdtq", "lgdtl", "lgdtw", "lidt", "lidtq", "lidtl", "lidtw", "lldt", "lldtw",
            "ltr", "ltrw",
        ],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "move to or from a control or debug register",
        mnemonics: &["mov", "movq", "movl"],
        class: Class::Privileged,
        rule: Rule::ControlOrDebugRegister,
    },
    Entry {
        what: "TLB and cache maintenance",
        mnemonics: &["invlpg", "invpcid", "wbinvd", "wbnoinvd", "invd"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "model-specific registers",
        mnemonics: &["rdmsr", "wrmsr"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "swap GS base",
        mnemonics: &["swapgs"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "return from system call or interrupt",
        mnemonics: &[
            "sysret", "sysretq", "sysretl", "sysexit", "sysexitq", "sysexitl", "iret", "iretq",
            "iretl", "iretw", "iretd",
        ],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "CR0 task-switched and machine status word",
        mnemonics: &["clts", "lmsw", "lmsww"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "extended control register",
        mnemonics: &["xsetbv"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    Entry {
        what: "monitor/wait",
        mnemonics: &["monitor", "mwait"],
        class: Class::Privileged,
        rule: Rule::Always,
    },
    // Sensitive but unprivileged.
    Entry {
        what: "push or pop flags",
        mnemonics: &[
            "pushf", "pushfq", "pushfw", "pushfl", "pushfd", "popf", "popfq", "popfw", "popfl",
            "popfd",
        ],
        class: Class::SensitiveUnprivileged,
        rule: Rule::Always,
    },
    Entry {
        what: "store descriptor-table register or machine status word",
        mnemonics: &[
            "sgdt", "sgdtq", "sgdtl", "sgdtw", "sidt", "sidtq", "sidtl", "sidtw", "sldt", "sldtw",
            "sldtl", "sldtq", "str", "strw", "strl", "strq", "smsw", "smsww", "smswl", "smswq",
        ],
        class: Class::SensitiveUnprivileged,
        rule: Rule::Always,
    },
    Entry {
        what: "CPU identification",
        mnemonics: &["cpuid"],
        class: Class::SensitiveUnprivileged,
        rule: Rule::Always,
    },
    Entry {
        what: "move to or from a segment register",
        mnemonics: &["mov", "movw", "movl", "movq"],
        class: Class::SensitiveUnprivileged,
        rule: Rule::SegmentRegister,
    },
    Entry {
        what: "push or pop a segment register",
        mnemonics: &[
            "push", "pushw", "pushq", "pushl", "pop", "popw", "popq", "popl",
        ],
        class: Class::SensitiveUnprivileged,
        rule: Rule::SegmentRegister,
    },
    Entry {
        what: "load far pointer into a segment register",
        mnemonics: &[
            "lfs", "lfsw", "lfsl", "lfsq", "lgs", "lgsw", "lgsl", "lgsq", "lss", "lssw", "lssl",
            "lssq",
        ],
        class: Class::SensitiveUnprivileged,
        rule: Rule::Always,
    },
    // Memory ordering (for the DSM).
    Entry {
        what: "fences and serialisation",
        mnemonics: &["mfence", "sfence", "lfence", "serialize"],
        class: Class::MemoryOrdering,
        rule: Rule::Always,
    },
    Entry {
        what: "locked instruction",
        mnemonics: &[LOCK],
        class: Class::MemoryOrdering,
        rule: Rule::LockPrefix,
    },
    Entry {
        what: "exchange with memory (implicitly locked)",
        mnemonics: &["xchg", "xchgb", "xchgw", "xchgl", "xchgq"],
        class: Class::MemoryOrdering,
        rule: Rule::MemoryOperand,
    },
];

/// Prefixes that may stand before a mnemonic in the same statement or as statements of their
/// own; they belong to the next instruction, so a marker goes before them.
pub const PREFIXES: &[&str] = &[
    "lock", "rep", "repe", "repz", "repne", "repnz", "data16", "data32", "addr16", "addr32", "rex",
    "rex64", "rex.w", "rex.r", "rex.x", "rex.b", "rex.wr", "rex.wx", "rex.wb", "rex.rx", "rex.rb",
    "rex.xb", "rex.wrx", "rex.wrb", "rex.wxb", "rex.rxb", "rex.wrxb", "cs", "ds", "es", "fs", "gs",
    "ss", "notrack", "bnd", "xacquire", "xrelease",
];

/// Whether `word` (lowercase) is an instruction prefix. Pseudo-prefixes in braces (`{vex}`,
/// `{disp32}`, ...) count too.
pub fn is_prefix(word: &str) -> bool {
    PREFIXES.contains(&word) || (word.starts_with('{') && word.ends_with('}'))
}

/// The table entry that makes this instruction sensitive, if any. `mnemonic` is lowercase,
/// `operands` are the comma-separated operands (trimmed), `locked` says a `lock` prefix applies.
pub fn classify(mnemonic: &str, operands: &[&str], locked: bool) -> Option<&'static Entry> {
    TABLE.iter().find(|entry| match entry.rule {
        Rule::LockPrefix => locked,
        rule => entry.mnemonics.contains(&mnemonic) && rule_holds(rule, operands),
    })
}

fn rule_holds(rule: Rule, operands: &[&str]) -> bool {
    match rule {
        Rule::Always => true,
        Rule::ControlOrDebugRegister => operands.iter().any(|op| is_control_or_debug_register(op)),
        Rule::SegmentRegister => operands.iter().any(|op| is_segment_register(op)),
        Rule::MemoryOperand => operands.iter().any(|op| is_memory_operand(op)),
        Rule::LockPrefix => false,
    }
}

fn is_control_or_debug_register(operand: &str) -> bool {
    let op = operand.to_ascii_lowercase();
    ["%cr", "%dr", "%db"].iter().any(|prefix| {
        op.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn is_segment_register(operand: &str) -> bool {
    matches!(
        operand.to_ascii_lowercase().as_str(),
        "%ds" | "%es" | "%ss" | "%fs" | "%gs" | "%cs"
    )
}

/// Neither a register (`%eax`) nor an immediate (`$1`): a memory reference such as `(%rax)`,
/// `8(%rsp)`, `%fs:0x10` or a bare symbol.
fn is_memory_operand(operand: &str) -> bool {
    let op = operand.trim();
    if op.starts_with('$') {
        return false;
    }
    match op.strip_prefix('%') {
        // `%fs:0x10` is a memory operand with a segment override.
        Some(reg) => reg.contains(':') || reg.contains('('),
        None => !op.is_empty(),
    }
}

/// The table as Markdown, as `docs/guest-platform.md` reproduces it.
pub fn markdown() -> String {
    let mut out =
        String::from("| class | instructions | mnemonics | sensitive |\n|---|---|---|---|\n");
    for entry in TABLE {
        let mnemonics: Vec<String> = entry.mnemonics.iter().map(|m| format!("`{m}`")).collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            entry.class.name(),
            entry.what,
            mnemonics.join(" "),
            entry.rule.describe()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mnemonic_with_rule_always_is_sensitive_without_operands() {
        for entry in TABLE.iter().filter(|e| e.rule == Rule::Always) {
            for m in entry.mnemonics {
                assert!(classify(m, &[], false).is_some(), "{m}");
            }
        }
    }

    #[test]
    fn moves_involving_control_and_debug_registers_are_privileged() {
        for ops in [
            ["%rax", "%cr3"],
            ["%cr0", "%rax"],
            ["%rdi", "%dr7"],
            ["%dr6", "%rax"],
        ] {
            let entry = classify("mov", &ops, false).expect("sensitive");
            assert_eq!(entry.class, Class::Privileged, "{ops:?}");
            assert!(classify("movq", &ops, false).is_some());
        }
    }

    #[test]
    fn moves_to_from_pushes_and_pops_of_segment_registers_are_sensitive() {
        for m in ["mov", "movw", "movl", "movq"] {
            for seg in ["%ds", "%es", "%ss", "%fs", "%gs", "%DS"] {
                let to = classify(m, &["%ax", seg], false).expect("move to");
                assert_eq!(to.class, Class::SensitiveUnprivileged);
                assert!(classify(m, &[seg, "%ax"], false).is_some(), "{m} {seg}");
            }
        }
        for m in ["push", "pushq", "pop", "popq", "popw"] {
            assert!(classify(m, &["%fs"], false).is_some(), "{m}");
            assert!(classify(m, &["%rax"], false).is_none(), "{m}");
        }
    }

    #[test]
    fn a_segment_override_is_not_a_segment_register_destination() {
        assert!(classify("movl", &["%eax", "%fs:0x10"], false).is_none());
        assert!(classify("movq", &["%fs:0", "%rax"], false).is_none());
    }

    #[test]
    fn xchg_is_sensitive_only_with_a_memory_operand() {
        assert!(classify("xchg", &["%eax", "%ebx"], false).is_none());
        assert!(classify("xchgq", &["%rax", "%rbx"], false).is_none());
        for mem in [
            "(%rdi)",
            "8(%rsp)",
            "counter(%rip)",
            "counter",
            "%fs:8",
            "%gs:(%rax)",
        ] {
            let entry = classify("xchgl", &["%eax", mem], false).expect(mem);
            assert_eq!(entry.class, Class::MemoryOrdering);
            assert!(classify("xchg", &[mem, "%eax"], false).is_some(), "{mem}");
        }
    }

    #[test]
    fn any_locked_instruction_is_memory_ordering() {
        let entry = classify("addl", &["$1", "(%rax)"], true).expect("locked");
        assert_eq!(entry.rule, Rule::LockPrefix);
        assert!(classify("addl", &["$1", "(%rax)"], false).is_none());
    }

    #[test]
    fn ordinary_look_alikes_are_not_sensitive() {
        let plain: &[(&str, &[&str])] = &[
            ("movl", &["%eax", "%ebx"]),
            ("mov", &["%rdx", "%rcx"]),
            ("movq", &["%rax", "8(%rsp)"]),
            ("inc", &["%eax"]),
            ("int", &["$0x80"]),
            ("incl", &["(%rax)"]),
            ("insertps", &["$0", "%xmm1", "%xmm2"]),
            ("outer", &[]),
            ("stos", &[]),
            ("strlen", &[]),
            ("push", &["%fs:8"]),
            ("pushq", &["%rax"]),
            ("popq", &["%rbx"]),
            ("call", &["str"]),
            ("cmpxchgl", &["%ecx", "(%rdi)"]),
            ("xadd", &["%eax", "(%rdi)"]),
            ("rdtsc", &[]),
            ("ud2", &[]),
            ("int3", &[]),
            ("fence", &[]),
        ];
        for (m, ops) in plain {
            assert!(classify(m, ops, false).is_none(), "{m} {ops:?}");
        }
    }

    #[test]
    fn prefixes_include_braced_pseudo_prefixes() {
        assert!(is_prefix("lock") && is_prefix("rep") && is_prefix("{vex}"));
        assert!(!is_prefix("hlt") && !is_prefix("repeat"));
    }

    #[test]
    fn guest_platform_doc_reproduces_the_table_exactly() {
        let doc = include_str!("../../../docs/guest-platform.md");
        let table = markdown();
        assert!(
            doc.contains(&table),
            "docs/guest-platform.md must contain the table as table::markdown() renders it:\n{table}"
        );
    }
}
