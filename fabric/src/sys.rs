//! Everything in the fabric that needs `unsafe`: shared memory mappings and the atomics and
//! copies on them, a spin lock for the posting paths, raw vectored writes from a mapping (the
//! tcp backend's zero-copy send), non-blocking socket calls std lacks, and adopting file
//! descriptors received over a Unix socket. Every block does one thing and says why it is
//! sound; the rest of the crate forbids `unsafe` (the crate root allows it here alone).

use std::cell::UnsafeCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// A mutual-exclusion lock for the posting and polling paths: an uncontended round is one
/// compare-exchange and one release store (a `std::sync::Mutex` costs about twice that here,
/// measured on the shm doorbell path). Contended, it spins a little, then naps with a growing
/// pause, so a holder that was preempted gets the core back.
#[derive(Debug, Default)]
pub(crate) struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

/// Spins before the first nap.
const LOCK_SPINS: u32 = 2000;
/// Longest nap between attempts.
const LOCK_MAX_NAP: Duration = Duration::from_micros(500);

// SAFETY: the lock hands out `&mut T` to one holder at a time (the `locked` flag, acquired
// with Acquire and released with Release), so sharing the lock between threads is sharing
// `T` under a mutex: sound whenever `T` may move between threads.
unsafe impl<T: Send> Send for SpinLock<T> {}
// SAFETY: as above; `&SpinLock<T>` only ever yields exclusive access.
unsafe impl<T: Send> Sync for SpinLock<T> {}

/// Exclusive access to a [`SpinLock`]'s value until dropped.
pub(crate) struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> SpinLock<T> {
    pub fn new(value: T) -> SpinLock<T> {
        SpinLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    fn try_acquire(&self) -> bool {
        // Acquire: pairs with the Release in `SpinGuard::drop`, so the previous holder's
        // writes to the value are visible.
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    pub fn lock(&self) -> SpinGuard<'_, T> {
        if !self.try_acquire() {
            self.lock_contended();
        }
        SpinGuard { lock: self }
    }

    /// The lock if it is free now.
    pub fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        // Not `then_some`: that would build a guard (and drop it, unlocking) on failure too.
        if self.try_acquire() {
            Some(SpinGuard { lock: self })
        } else {
            None
        }
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

impl<T> std::ops::Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while `locked` is held by it (see `lock`).
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> std::ops::DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard exists only while `locked` is held by it, and `&mut self` makes
        // this the only reference derived from it.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire of the next `try_acquire`.
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// A file mapped shared and writable into this process. Other processes (and the peers'
/// writes) change the bytes at any time, so the mapping never hands out Rust references to
/// its bytes: only copies in and out, and atomics on aligned words.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through copies or atomics,
// which are sound from any thread (concurrent copies may observe torn bytes, as DMA would,
// and the contract says so), and the pointer stays valid until `drop`.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` (which must have at least that many).
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
                format!("the memory file has {actual} bytes, {len} were expected"),
            ));
        }
        // SAFETY: a fresh shared mapping chosen by the kernel (null hint), of a file we hold
        // open and checked to be long enough; it aliases no Rust object.
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

    /// Callers check ranges first and report errors; this is the last line of defence.
    #[inline]
    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "access of {len} bytes at {offset} outside a mapping of {} bytes",
            self.len
        );
    }

    /// Copies `data` in at `offset`.
    #[inline]
    pub fn copy_in(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: the range is inside the live mapping (checked), and `data` is a Rust slice,
        // which cannot overlap shared memory we never hand out references to.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
    }

    /// Copies `len` bytes at `from` in this mapping to `to` in `dst` (another mapping, or
    /// this one at a range that does not overlap).
    #[inline]
    pub fn copy_to(&self, from: usize, dst: &Mapping, to: usize, len: usize) {
        self.check(from, len);
        dst.check(to, len);
        let src = self.ptr.as_ptr().wrapping_add(from);
        let dstp = dst.ptr.as_ptr().wrapping_add(to);
        if std::ptr::eq(self, dst) {
            assert!(
                from + len <= to || to + len <= from,
                "overlapping copy inside one mapping"
            );
        }
        // SAFETY: both ranges are inside live mappings (checked); within one mapping they do
        // not overlap (checked); two distinct mappings of one file may alias, in which case
        // the bytes are those of a racing copy, which the contract allows (torn, like DMA).
        unsafe { std::ptr::copy(src, dstp, len) };
    }

    /// Zeroes `len` bytes at `offset`.
    pub fn fill_zero(&self, offset: usize, len: usize) {
        self.check(offset, len);
        // SAFETY: the range is inside the live mapping (checked).
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), 0, len) };
    }

    /// Copies `buf.len()` bytes at `offset` out.
    #[inline]
    pub fn copy_out(&self, offset: usize, buf: &mut [u8]) {
        self.check(offset, buf.len());
        // SAFETY: the range is inside the live mapping (checked), and `buf` is an exclusive
        // Rust slice, which cannot overlap the shared memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
    }

    /// The 64-bit word at `offset` (8-byte aligned) as an atomic.
    #[inline]
    pub fn u64_at(&self, offset: usize) -> &AtomicU64 {
        self.check(offset, 8);
        assert!(offset % 8 == 0, "u64 at misaligned offset {offset}");
        // SAFETY: in range and 8-byte aligned (checked; mappings are page aligned); the memory
        // lives as long as `self`, and every access to these bytes is atomic or a copy.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
    }

    /// The 32-bit word at `offset` (4-byte aligned) as an atomic.
    #[inline]
    pub fn u32_at(&self, offset: usize) -> &AtomicU32 {
        self.check(offset, 4);
        assert!(offset % 4 == 0, "u32 at misaligned offset {offset}");
        // SAFETY: as in `u64_at`, for a 4-byte aligned word.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
    }

    /// A range of the mapping as a piece of a vectored write (the kernel reads it).
    pub fn io_range(&self, offset: usize, len: usize) -> RawIo {
        self.check(offset, len);
        RawIo {
            base: self.ptr.as_ptr().wrapping_add(offset),
            len,
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`, and no copy or atomic
        // borrowed from it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One piece of a vectored write: bytes of a live mapping or of a slice, valid for the
/// lifetime of the borrow it was made from (the `'a` of [`writev_nonblocking`]'s callers).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawIo {
    base: *const u8,
    len: usize,
}

impl RawIo {
    pub fn slice(s: &[u8]) -> RawIo {
        RawIo {
            base: s.as_ptr(),
            len: s.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The same piece without its first `n` bytes.
    pub fn advance(self, n: usize) -> RawIo {
        let n = n.min(self.len);
        RawIo {
            base: self.base.wrapping_add(n),
            len: self.len - n,
        }
    }
}

/// Writes `pieces` to a socket with one `writev`, never raising SIGPIPE. With `block`
/// false the write takes only what the socket holds room for now (0 when full); with it
/// true, it may block (the socket's send timeout bounds it). Returns the bytes written.
///
/// Callers keep every piece's source (the mapping, the slice) alive across the call.
pub(crate) fn writev(fd: BorrowedFd<'_>, pieces: &[RawIo], block: bool) -> io::Result<usize> {
    const MAX_PIECES: usize = 8;
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_PIECES];
    let mut n = 0;
    for p in pieces.iter().filter(|p| p.len > 0) {
        assert!(n < MAX_PIECES, "more than {MAX_PIECES} pieces in one write");
        iov[n] = libc::iovec {
            iov_base: p.base.cast_mut().cast(),
            iov_len: p.len,
        };
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    let msg = libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: iov.as_mut_ptr(),
        msg_iovlen: n,
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    };
    let flags = libc::MSG_NOSIGNAL | if block { 0 } else { libc::MSG_DONTWAIT };
    loop {
        // SAFETY: `fd` is a borrowed open socket; `msg` points at `n` iovecs that describe
        // live memory the callers keep alive (see above), which the kernel only reads.
        let sent = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock if !block => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// Reads what the socket holds right now (`MSG_DONTWAIT`) without changing the blocking
/// mode of the file description, which posters share. `WouldBlock` when it holds nothing.
pub(crate) fn recv_nonblocking(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `fd` is a borrowed, open socket for the duration of the call, and the pointer
        // and length describe `buf`, a live exclusive slice the kernel writes at most
        // `buf.len()` bytes into.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Takes ownership of descriptors the kernel installed in this process for an `SCM_RIGHTS`
/// message.
pub(crate) fn adopt_received_fds(raw: Vec<RawFd>) -> Vec<OwnedFd> {
    raw.into_iter()
        // SAFETY: each descriptor was just installed by the kernel for this `recvmsg` and is
        // owned by nobody else in this process.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Asks the kernel to wake this thread's timed waits within 1 ns of their deadline instead of
/// the default 50 us slack (for threads that release delayed operations). Best effort.
pub(crate) fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only changes this thread's
    // timer slack; no memory is passed.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

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
    fn a_spin_lock_gives_threads_exclusive_access_even_when_contended() {
        let lock = SpinLock::new(0u64);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..20_000u64 {
                        let mut g = lock.lock();
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
    fn a_failed_try_lock_leaves_the_lock_held() {
        let lock = SpinLock::new(());
        let g = lock.lock();
        assert!(lock.try_lock().is_none());
        assert!(
            lock.try_lock().is_none(),
            "the failed attempt released the holder's lock"
        );
        drop(g);
        assert!(lock.try_lock().is_some());
    }

    #[test]
    fn two_mappings_of_one_file_see_each_others_copies_and_atomics() {
        let f = memfd(8192);
        let a = Mapping::map(&f, 8192).unwrap();
        let b = Mapping::map(&f, 8192).unwrap();
        a.copy_in(100, b"shared");
        let mut buf = [0u8; 6];
        b.copy_out(100, &mut buf);
        assert_eq!(&buf, b"shared");
        a.u64_at(4096).fetch_add(5, Ordering::SeqCst);
        assert_eq!(b.u64_at(4096).load(Ordering::SeqCst), 5);
        a.copy_to(100, &b, 200, 6);
        b.copy_out(200, &mut buf);
        assert_eq!(&buf, b"shared");
    }

    #[test]
    fn a_mapping_longer_than_its_file_is_refused() {
        let f = memfd(4096);
        assert!(Mapping::map(&f, 8192).is_err());
    }

    #[test]
    #[should_panic(expected = "outside a mapping")]
    fn an_access_past_the_end_panics_instead_of_touching_other_memory() {
        let f = memfd(4096);
        let m = Mapping::map(&f, 4096).unwrap();
        m.copy_in(4090, &[0u8; 8]);
    }

    #[test]
    fn writev_sends_mapping_bytes_and_slices_in_one_call() {
        let f = memfd(4096);
        let m = Mapping::map(&f, 4096).unwrap();
        m.copy_in(10, b"world");
        let (a, mut b) = UnixStream::pair().unwrap();
        let head = b"hello ";
        let n = writev(a.as_fd(), &[RawIo::slice(head), m.io_range(10, 5)], true).unwrap();
        assert_eq!(n, 11);
        let mut got = [0u8; 11];
        std::io::Read::read_exact(&mut b, &mut got).unwrap();
        assert_eq!(&got, b"hello world");
    }

    #[test]
    fn a_full_socket_takes_nothing_instead_of_blocking() {
        let (a, _b) = UnixStream::pair().unwrap();
        let chunk = vec![7u8; 1 << 16];
        let mut total = 0;
        loop {
            let n = writev(a.as_fd(), &[RawIo::slice(&chunk)], false).unwrap();
            if n == 0 {
                break;
            }
            total += n;
            assert!(total < 1 << 30, "the socket never filled");
        }
        assert!(total > 0);
    }
}
