//! The host instructions the emulator executes itself, where Rust offers no safe form.
#![allow(unsafe_code)]

/// The host's time-stamp counter.
pub(crate) fn host_tsc() -> u64 {
    // SAFETY: `rdtsc` has no memory effects and is available on every x86-64 CPU; it only
    // faults if CR4.TSD is set, which Linux leaves clear for user processes (and this monitor
    // never sets it).
    unsafe { core::arch::x86_64::_rdtsc() }
}
