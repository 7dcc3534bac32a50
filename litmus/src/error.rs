//! Errors of the kit, one enum per domain.

use std::path::PathBuf;

/// A litmus file that cannot be read or parsed. `line` is 1-based (0: the file as a whole).
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// The reference model could not finish exploring a test.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{test}: thread {thread} accesses address {addr:#x} outside the test's memory")]
    OutOfBounds {
        test: String,
        thread: usize,
        addr: u64,
    },
    #[error("{test}: more than {limit} states; the test is too large (or loops without end)")]
    StateLimit { test: String, limit: usize },
    #[error("{test}: a store buffer grew past {limit} entries (a loop that only stores?)")]
    BufferLimit { test: String, limit: usize },
}

/// The suite index or an `.expected` file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error(
        "litmus suite directory not found: {0} (set VSMP_LITMUS_DIR to the directory holding INDEX.tsv)"
    )]
    Missing(PathBuf),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Format {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Generating, compiling or running a native litmus program failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{test}: cannot generate C: {message}")]
    Generate { test: String, message: String },
    #[error("cannot create a temporary directory")]
    TempDir(#[source] std::io::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{test}: gcc failed on {path}:\n{stderr}")]
    Compile {
        test: String,
        path: PathBuf,
        stderr: String,
    },
    #[error("{test}: the native program failed ({status}):\n{stderr}")]
    Execute {
        test: String,
        status: String,
        stderr: String,
    },
    #[error("{test}: malformed output from the native program: {line}")]
    Output { test: String, line: String },
}
