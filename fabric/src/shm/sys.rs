//! The shm backend's only unsafe code: shared mappings of memfds, atomics and futexes inside
//! them, and adopting file descriptors received over a Unix socket.
//!
//! A [`Mapping`] is a `MAP_SHARED` view of a memfd that other processes of the group map too.
//! Bytes are moved in and out by copies only (never Rust references into the bytes, which
//! peers change under us); words shared between processes are reached as atomics.

use std::cell::UnsafeCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// A process-local lock for the data path, whose uncontended acquire is one compare-exchange
/// and whose release is a plain store (std's `Mutex` releases with a locked swap, to find
/// sleepers to wake). A contended acquire spins briefly, then sleeps in growing steps up to
/// [`LOCK_MAX_NAP`]; that suits locks held for a few instructions in the common case and only
/// rarely long (a producer waiting for room in a full ring, a receiver blocked in `recv`).
#[derive(Debug, Default)]
pub(crate) struct PostLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

/// Spins on a held [`PostLock`] before sleeping.
const LOCK_SPINS: u32 = 2000;
/// Longest sleep between two looks at a held [`PostLock`]: how late a waiter may notice that
/// a long holder let go.
pub(crate) const LOCK_MAX_NAP: Duration = Duration::from_micros(500);

// SAFETY: the value is only reached through a guard, and at most one guard exists at a time
// (the acquire below); sending the lock sends the value.
unsafe impl<T: Send> Send for PostLock<T> {}
// SAFETY: as above: the flag gives one thread at a time exclusive access to the value.
unsafe impl<T: Send> Sync for PostLock<T> {}

/// Exclusive access to a [`PostLock`]'s value; releases on drop.
pub(crate) struct PostGuard<'a, T> {
    lock: &'a PostLock<T>,
}

impl<T> PostLock<T> {
    pub fn new(value: T) -> PostLock<T> {
        PostLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    fn try_acquire(&self) -> bool {
        // Acquire: pairs with the previous holder's release store.
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    pub fn lock(&self) -> PostGuard<'_, T> {
        if !self.try_acquire() {
            self.lock_contended();
        }
        PostGuard { lock: self }
    }

    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0;
        let mut nap = Duration::from_micros(5);
        loop {
            if !self.locked.load(Ordering::Relaxed) && self.try_acquire() {
                return;
            }
            if spins < LOCK_SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::sleep(nap);
                nap = (nap * 2).min(LOCK_MAX_NAP);
            }
        }
    }
}

impl<T> std::ops::Deref for PostGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the lock, so no other reference to the value exists.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> std::ops::DerefMut for PostGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this guard holds the lock, so no other reference to the value exists.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for PostGuard<'_, T> {
    fn drop(&mut self) {
        // Release: the holder's accesses happen before the next holder's (a plain store on
        // x86).
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// A shared, read-write mapping of a whole memfd.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value until drop; every access
// goes through copies or atomics (methods below), which are sound from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: no method hands out a non-atomic reference into the bytes.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` shared and read-write. The caller checked that the
    /// file is at least `len` bytes long (a shorter one would fault on access) and that it
    /// never shrinks (memfds in this crate are sized once, before they are shared).
    pub fn map(file: &File, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot map an empty file",
            ));
        }
        let actual = file.metadata()?.len();
        if actual < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the shared file has {actual} bytes, {len} were expected"),
            ));
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr null) over a valid open fd; it
        // aliases no Rust object. The file is at least `len` bytes (checked above).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "access of {len} bytes at {offset} outside a mapping of {} bytes",
            self.len
        );
    }

    /// Copies `data` into the mapping at `offset`. Panics when out of range (callers check).
    pub fn copy_in(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: the destination range lies inside the live mapping (checked above) and
        // cannot overlap `data`, a Rust slice outside any mapping made here. Concurrent
        // writers in other processes may tear bytes, which the contract allows.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
    }

    /// Zeroes `len` bytes at `offset`. Panics when out of range (callers check).
    pub fn fill_zero(&self, offset: usize, len: usize) {
        self.check(offset, len);
        // SAFETY: the range lies inside the live mapping (checked above); plain bytes.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), 0, len) };
    }

    /// Copies bytes at `offset` out into `buf`. Panics when out of range (callers check).
    pub fn copy_out(&self, offset: usize, buf: &mut [u8]) {
        self.check(offset, buf.len());
        // SAFETY: the source range lies inside the live mapping (checked above); `buf` is an
        // exclusive Rust slice, so they do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
    }

    /// The 64-bit word at `offset` as an atomic. Panics when misaligned or out of range.
    pub fn u64_at(&self, offset: usize) -> &AtomicU64 {
        self.check(offset, 8);
        assert!(offset % 8 == 0, "u64 at misaligned offset {offset}");
        // SAFETY: in range and 8-byte aligned (checked; the mapping is page aligned); the
        // memory lives as long as `self`, and every process reaches this word atomically.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
    }

    /// The 32-bit word at `offset` as an atomic. Panics when misaligned or out of range.
    pub fn u32_at(&self, offset: usize) -> &AtomicU32 {
        self.check(offset, 4);
        assert!(offset % 4 == 0, "u32 at misaligned offset {offset}");
        // SAFETY: in range and 4-byte aligned (checked); lives as long as `self`.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
    }

    /// Sleeps while the 32-bit word at `offset` equals `expected`, for at most `timeout`
    /// (a shared futex: processes mapping the same memfd wake each other).
    pub fn futex_wait(&self, offset: usize, expected: u32, timeout: Duration) {
        let word = self.u32_at(offset);
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: FUTEX_WAIT (shared) on a valid aligned word of a live mapping, with a valid
        // relative timeout; the kernel only reads both. Errors (EAGAIN: the word changed,
        // EINTR, ETIMEDOUT) all mean "look again", which every caller does.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &ts as *const libc::timespec,
            )
        };
    }

    /// Wakes every sleeper on the 32-bit word at `offset`.
    pub fn futex_wake(&self, offset: usize) {
        let word = self.u32_at(offset);
        // SAFETY: FUTEX_WAKE (shared) on a valid aligned word of a live mapping; it touches
        // no memory.
        unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range `map` created; no reference into it outlives
        // `self` (atomics borrowed from it borrow `self`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Adopts file descriptors the kernel installed in this process from an `SCM_RIGHTS` message.
pub(crate) fn adopt_received_fds(raw: Vec<RawFd>) -> Vec<OwnedFd> {
    raw.into_iter()
        // SAFETY: each fd was just installed in this process by recvmsg's SCM_RIGHTS and is
        // owned by nothing else; adopting it makes sure it is closed exactly once.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> File {
        let fd = nix::sys::memfd::memfd_create(
            c"vsmp-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        let f = File::from(fd);
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn a_post_lock_gives_threads_exclusive_access_even_when_contended() {
        let lock = PostLock::new(0u64);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..20_000u64 {
                        let mut g = lock.lock();
                        // A non-atomic read-modify-write: lost updates if two threads held it.
                        let v = *g;
                        if i % 1000 == 0 {
                            std::thread::yield_now();
                        }
                        *g = v + 1;
                    }
                });
            }
        });
        assert_eq!(*lock.lock(), 80_000);
    }

    #[test]
    fn a_post_lock_held_long_makes_the_next_taker_wait_then_proceed() {
        let lock = PostLock::new(Vec::new());
        let g = lock.lock();
        std::thread::scope(|s| {
            let t = s.spawn(|| lock.lock().push(2));
            // Longer than the spin phase, so the taker reaches its sleeping phase.
            std::thread::sleep(Duration::from_millis(20));
            let mut g = g;
            g.push(1);
            drop(g);
            t.join().unwrap();
        });
        assert_eq!(*lock.lock(), vec![1, 2]);
    }

    #[test]
    fn two_mappings_of_one_memfd_see_each_others_bytes_and_atomics() {
        let f = memfd(4096);
        let a = Mapping::map(&f, 4096).unwrap();
        let b = Mapping::map(&f, 4096).unwrap();
        a.copy_in(100, b"shared");
        let mut buf = [0; 6];
        b.copy_out(100, &mut buf);
        assert_eq!(&buf, b"shared");
        a.u64_at(8)
            .fetch_add(5, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(b.u64_at(8).load(std::sync::atomic::Ordering::SeqCst), 5);
    }

    #[test]
    fn mapping_more_than_the_file_holds_is_refused() {
        let f = memfd(4096);
        assert!(Mapping::map(&f, 8192).is_err());
    }

    #[test]
    #[should_panic(expected = "outside a mapping")]
    fn a_copy_past_the_end_panics_instead_of_corrupting() {
        let f = memfd(4096);
        let a = Mapping::map(&f, 4096).unwrap();
        a.copy_in(4090, &[0; 8]);
    }
}
