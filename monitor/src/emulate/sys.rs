//! The host instructions the emulator executes itself, where Rust offers no safe form. The
//! only `unsafe` in [`crate::emulate`].
#![allow(unsafe_code)]

/// The host's time-stamp counter.
pub(crate) fn host_tsc() -> u64 {
    // SAFETY: `rdtsc` has no memory effects and is available on every x86-64 CPU; it only
    // faults if CR4.TSD is set, which Linux leaves clear for user processes.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The host's XCR0. Call only when CPUID leaf 1 reports OSXSAVE (ECX bit 27).
pub(crate) fn host_xcr0_with_osxsave() -> u64 {
    // SAFETY: `xgetbv` needs the XSAVE feature enabled by the OS, which is what CPUID.1:ECX
    // bit 27 (OSXSAVE) says; the only caller, `HostCpuid::snapshot`, checks that bit first.
    // Reading XCR0 (ECX = 0) has no other effect.
    unsafe { core::arch::x86_64::_xgetbv(0) }
}
