//! Pinning and placement of vsmp's threads and processes.
//!
//! A ptrace round trip is several times cheaper when the monitor thread and the VM process it
//! traces run on the same core (DESIGN-BRIEF.md, section 10: 12-20 us against 70-85 us), so
//! the monitor pins both to one core unless told otherwise. Nodes that share a host spread
//! over the cores this process may use (`sched_getaffinity`, which honours cgroups, cpusets and
//! Slurm's task binding), one core per node, by local rank.
//!
//! This crate is a leaf: every other vsmp crate may use it and it uses none of them.
//! Threads: any thread may call any function here; each call acts on the thread or process it
//! names and holds no state.
#![forbid(unsafe_code)]

use std::fmt;

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// A host CPU as the kernel numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CoreId(pub usize);

impl fmt::Display for CoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu{}", self.0)
    }
}

/// What failed while reading or setting an affinity mask.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    #[error("cannot read the affinity mask of {what}")]
    GetAffinity {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot pin {what} to {core}")]
    SetAffinity {
        what: String,
        core: CoreId,
        #[source]
        source: nix::Error,
    },
    #[error("{core} is outside the {limit} CPUs an affinity mask can name")]
    CoreOutOfRange { core: CoreId, limit: usize },
    #[error("this process may run on no CPU at all")]
    NoCores,
}

/// The cores this process is allowed to run on, in ascending order.
pub fn available_cores() -> Result<Vec<CoreId>, AffinityError> {
    let set = sched_getaffinity(Pid::from_raw(0)).map_err(|source| AffinityError::GetAffinity {
        what: "this process".into(),
        source,
    })?;
    let cores: Vec<CoreId> = (0..CpuSet::count())
        .filter(|&i| set.is_set(i).unwrap_or(false))
        .map(CoreId)
        .collect();
    if cores.is_empty() {
        return Err(AffinityError::NoCores);
    }
    Ok(cores)
}

/// The core for the `local_rank`-th vsmp node on this host: nodes spread round-robin over the
/// cores this process may use.
pub fn core_for_local_rank(local_rank: usize) -> Result<CoreId, AffinityError> {
    let cores = available_cores()?;
    Ok(cores[local_rank % cores.len()])
}

/// Pins the calling thread to `core`.
pub fn pin_current_thread(core: CoreId) -> Result<(), AffinityError> {
    pin(Pid::from_raw(0), core, "the current thread")
}

/// Pins the thread (or single-threaded process) `pid` to `core`. Used for the VM process,
/// which the monitor pins beside its own thread.
pub fn pin_process(pid: i32, core: CoreId) -> Result<(), AffinityError> {
    pin(Pid::from_raw(pid), core, &format!("process {pid}"))
}

fn pin(pid: Pid, core: CoreId, what: &str) -> Result<(), AffinityError> {
    let mut set = CpuSet::new();
    set.set(core.0).map_err(|_| AffinityError::CoreOutOfRange {
        core,
        limit: CpuSet::count(),
    })?;
    sched_setaffinity(pid, &set).map_err(|source| AffinityError::SetAffinity {
        what: what.into(),
        core,
        source,
    })
}

/// Where the monitor thread and its VM process run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Both on this core (the default: cheapest ptrace round trip).
    Together(CoreId),
    /// Leave both to the host scheduler.
    Unpinned,
}

impl Placement {
    /// The default placement for the `local_rank`-th node on this host.
    pub fn for_local_rank(local_rank: usize) -> Result<Placement, AffinityError> {
        core_for_local_rank(local_rank).map(Placement::Together)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current_cores_of_this_thread() -> Vec<usize> {
        let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
        (0..CpuSet::count())
            .filter(|&i| set.is_set(i).unwrap())
            .collect()
    }

    #[test]
    fn available_cores_lists_at_least_one_core_in_order() {
        let cores = available_cores().unwrap();
        assert!(!cores.is_empty());
        assert!(cores.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn pinning_a_thread_restricts_it_to_that_core() {
        let target = *available_cores().unwrap().last().unwrap();
        std::thread::spawn(move || {
            pin_current_thread(target).unwrap();
            assert_eq!(current_cores_of_this_thread(), vec![target.0]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn local_ranks_wrap_round_the_available_cores() {
        let cores = available_cores().unwrap();
        assert_eq!(core_for_local_rank(0).unwrap(), cores[0]);
        assert_eq!(core_for_local_rank(cores.len()).unwrap(), cores[0]);
    }

    #[test]
    fn pinning_to_a_core_beyond_the_mask_is_a_clear_error() {
        let err = pin_current_thread(CoreId(1 << 20)).unwrap_err();
        assert!(matches!(err, AffinityError::CoreOutOfRange { .. }), "{err}");
    }

    #[test]
    fn pinning_a_missing_process_names_it() {
        // Pid 0x3fff_ffff exceeds pid_max on every Linux configuration.
        let err = pin_process(0x3fff_ffff, CoreId(0)).unwrap_err();
        assert!(err.to_string().contains("process 1073741823"), "{err}");
    }
}
