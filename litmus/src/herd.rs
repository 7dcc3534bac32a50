//! herd7's output format: what `vsmp litmus --model` prints, so it can be held against any
//! `.expected` file herd7 wrote.

use std::fmt::Write as _;

use crate::cond::{Lval, Quantifier, condition_text, lval_text};
use crate::model::{StateSet, positive_count, value_type};
use crate::test::LitmusTest;

/// How often the condition's proposition holds over the allowed states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    Never,
    Sometimes,
    Always,
}

impl Observation {
    pub fn as_str(self) -> &'static str {
        match self {
            Observation::Never => "Never",
            Observation::Sometimes => "Sometimes",
            Observation::Always => "Always",
        }
    }
}

/// The verdict column of `INDEX.tsv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `exists`/`~exists`: some allowed state satisfies the proposition.
    Allowed,
    /// `exists`/`~exists`: no allowed state satisfies it.
    Forbidden,
    /// `forall`: every allowed state satisfies it.
    Required,
    /// `forall`: some allowed state does not.
    NotRequired,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "Allowed",
            Verdict::Forbidden => "Forbidden",
            Verdict::Required => "Required",
            Verdict::NotRequired => "NotRequired",
        }
    }
}

/// The judgement of a test's condition over its allowed states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    pub positive: usize,
    pub negative: usize,
    pub observation: Observation,
    /// herd7's `Ok` / `No` line: whether the test's claim holds.
    pub ok: bool,
    pub verdict: Verdict,
}

pub fn judge(test: &LitmusTest, set: &StateSet) -> Judgement {
    let positive = positive_count(test, set);
    let negative = set.executions.iter().sum::<usize>() - positive;
    let observation = if positive == 0 {
        Observation::Never
    } else if negative == 0 {
        Observation::Always
    } else {
        Observation::Sometimes
    };
    let (ok, verdict) = match test.condition.quantifier {
        Quantifier::Exists | Quantifier::NotExists => {
            let v = if positive > 0 {
                Verdict::Allowed
            } else {
                Verdict::Forbidden
            };
            let ok = (positive > 0) == (test.condition.quantifier == Quantifier::Exists);
            (ok, v)
        }
        Quantifier::Forall => (
            negative == 0,
            if negative == 0 {
                Verdict::Required
            } else {
                Verdict::NotRequired
            },
        ),
    };
    Judgement {
        positive,
        negative,
        observation,
        ok,
        verdict,
    }
}

/// One state as herd7 prints it: `0:rax=1; [x]=2;`.
pub fn state_line(test: &LitmusTest, keys: &[Lval], values: &[u64]) -> String {
    let mut s = String::new();
    for (k, v) in keys.iter().zip(values) {
        let _ = write!(
            s,
            "{}={}; ",
            lval_text(test, *k),
            value_type(test, *k).render(*v)
        );
    }
    s.pop();
    s
}

/// herd7's full report for a test, without the final `Hash=` line (a digest of herd7's
/// internal form of the test, which this kit does not reproduce).
pub fn report(test: &LitmusTest, set: &StateSet) -> String {
    let j = judge(test, set);
    let kind = match test.condition.quantifier {
        Quantifier::Exists => "Allowed",
        Quantifier::NotExists => "Forbidden",
        Quantifier::Forall => "Required",
    };
    let mut s = format!("Test {} {kind}\nStates {}\n", test.name, set.states.len());
    for st in &set.states {
        s.push_str(&state_line(test, &set.keys, st));
        s.push('\n');
    }
    let _ = writeln!(s, "{}", if j.ok { "Ok" } else { "No" });
    let _ = writeln!(
        s,
        "Witnesses\nPositive: {} Negative: {}",
        j.positive, j.negative
    );
    let _ = writeln!(s, "Condition {}", condition_text(test, &test.condition));
    let _ = writeln!(
        s,
        "Observation {} {} {} {}",
        test.name,
        j.observation.as_str(),
        j.positive,
        j.negative
    );
    s
}

/// The lines of an `.expected` file that [`report`] reproduces (everything but `Hash=`).
pub fn comparable_expected(text: &str) -> String {
    let mut s = String::new();
    for line in text.lines() {
        if line.starts_with("Hash=") || line.trim().is_empty() {
            continue;
        }
        s.push_str(line);
        s.push('\n');
    }
    s
}
