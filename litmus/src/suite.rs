//! The litmus suite on disk: locating it, reading `INDEX.tsv`.

use std::path::{Path, PathBuf};

use crate::error::SuiteError;

/// Environment variable that overrides where the suite lives.
pub const DIR_ENV: &str = "VSMP_LITMUS_DIR";

/// One row of `INDEX.tsv`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub threads: usize,
    /// `Allowed`, `Forbidden` or `Required` under x86-TSO.
    pub expected: String,
    /// The file, relative to the suite directory.
    pub file: PathBuf,
    pub arch: String,
    /// herd7's observation under TSO, e.g. `Never 0 3`.
    pub observation_tso: String,
    pub expected_under_sc: String,
    /// `yes` when TSO allows the condition's outcome and SC forbids it.
    pub tso_only_relaxed: bool,
    pub tier: String,
}

/// Finds the suite: `$VSMP_LITMUS_DIR`, else `../shared/litmus` from the repository root
/// (`repo_root`), else `shared/litmus` inside it. An absent directory is an error.
pub fn locate(repo_root: &Path) -> Result<PathBuf, SuiteError> {
    locate_with(repo_root, std::env::var_os(DIR_ENV).map(PathBuf::from))
}

/// [`locate`] with the override given explicitly.
pub fn locate_with(repo_root: &Path, override_dir: Option<PathBuf>) -> Result<PathBuf, SuiteError> {
    if let Some(dir) = override_dir {
        return if dir.join("INDEX.tsv").is_file() {
            Ok(dir)
        } else {
            Err(SuiteError::Missing(dir))
        };
    }
    let beside = repo_root.join("../shared/litmus");
    if beside.join("INDEX.tsv").is_file() {
        return Ok(beside);
    }
    let inside = repo_root.join("shared/litmus");
    if inside.join("INDEX.tsv").is_file() {
        return Ok(inside);
    }
    Err(SuiteError::Missing(beside))
}

/// Reads `INDEX.tsv` in `dir`.
pub fn read_index(dir: &Path) -> Result<Vec<Entry>, SuiteError> {
    let path = dir.join("INDEX.tsv");
    let text = std::fs::read_to_string(&path).map_err(|source| SuiteError::Read {
        path: path.clone(),
        source,
    })?;
    let mut lines = text.lines().enumerate();
    let (_, header) = lines.next().ok_or_else(|| SuiteError::Format {
        path: path.clone(),
        line: 1,
        message: "empty index".into(),
    })?;
    let cols: Vec<&str> = header.split('\t').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| SuiteError::Format {
                path: path.clone(),
                line: 1,
                message: format!("no '{name}' column"),
            })
    };
    let (c_name, c_threads, c_expected, c_file, c_arch) = (
        col("name")?,
        col("threads")?,
        col("expected")?,
        col("file")?,
        col("arch")?,
    );
    let (c_obs, c_sc, c_relaxed, c_tier) = (
        col("herd7_observation_tso")?,
        col("expected_under_SC")?,
        col("tso_only_relaxed")?,
        col("tier")?,
    );
    let mut out = Vec::new();
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let get = |c: usize| {
            f.get(c)
                .map(|s| s.to_string())
                .ok_or_else(|| SuiteError::Format {
                    path: path.clone(),
                    line: n + 1,
                    message: format!("missing column {}", c + 1),
                })
        };
        out.push(Entry {
            name: get(c_name)?,
            threads: get(c_threads)?.parse().map_err(|_| SuiteError::Format {
                path: path.clone(),
                line: n + 1,
                message: "bad thread count".into(),
            })?,
            expected: get(c_expected)?,
            file: PathBuf::from(get(c_file)?),
            arch: get(c_arch)?,
            observation_tso: get(c_obs)?,
            expected_under_sc: get(c_sc)?,
            tso_only_relaxed: get(c_relaxed)? == "yes",
            tier: get(c_tier)?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_suite_is_an_error_naming_where_it_looked() {
        let empty = tempfile::tempdir().unwrap();
        let repo = empty.path().join("repo");
        let err = locate_with(&repo, None).unwrap_err().to_string();
        assert!(
            err.contains("repo/../shared/litmus") && err.contains("VSMP_LITMUS_DIR"),
            "{err}"
        );
        let err = locate_with(&repo, Some(empty.path().join("nowhere")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nowhere"), "{err}");
    }

    #[test]
    fn the_suite_is_found_beside_the_repository_or_through_the_override() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("repo");
        let suite = root.path().join("shared/litmus");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::create_dir_all(&suite).unwrap();
        std::fs::write(suite.join("INDEX.tsv"), "name\n").unwrap();
        assert_eq!(
            locate_with(&repo, None).unwrap(),
            repo.join("../shared/litmus")
        );
        assert_eq!(locate_with(&repo, Some(suite.clone())).unwrap(), suite);
    }
}
