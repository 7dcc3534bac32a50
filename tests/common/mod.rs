//! Helpers shared by the end-to-end tests: finding processes in `/proc`.
#![allow(dead_code)]

use std::fs;

/// The live (not zombie) processes whose `stat` field `index` after the command name is
/// `value` (0: state, 1: ppid, 2: process group, 3: session).
pub fn processes_where(index: usize, value: i32) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            continue; // a zombie awaiting its parent's reap, not a running leftover
        }
        if fields.get(index).and_then(|f| f.parse::<i32>().ok()) == Some(value) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether `pid` is alive (not a zombie).
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().next() != Some("Z"))
        })
        .unwrap_or(false)
}
