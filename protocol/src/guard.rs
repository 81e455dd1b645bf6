//! Shared mappings that survive their file being cut short.
//!
//! A page of a `MAP_SHARED` file mapping that lies past the file's end
//! raises SIGBUS when touched, and SIGBUS kills the process. The lease
//! table's file can be truncated by whoever may write it (rotor's own
//! group), which would kill every worker and the allocator at once. So the
//! table's mappings are registered here, and a SIGBUS handler replaces a
//! registered mapping that faulted, in one step (`mremap` onto it), with
//! private memory whose two state words say *closed*: the faulting access
//! is retried on that memory and goes on, every lease of the table answers
//! "closed", workers fall back to the allocator's socket and ask for the
//! table's successor, and the allocator (whose check reads its table every
//! second and before a socket lease) sees the table is broken and replaces
//! it. A fault outside every registered mapping goes to the handler that
//! was there before (Rust's stack-overflow report, or the default: the
//! process dies as it would have).
//!
//! Everything the handler does is async-signal-safe: atomics, `mmap`,
//! `mremap`, `munmap`, `sigaction`, `raise` (raw system calls).
//!
//! One thing it does not undo: a SIGBUS *sent* (`kill -BUS`) is passed to
//! Rust's handler, which, as before, sets the default action back and
//! returns; from then on a cut file kills the process again, as it did
//! before this guard existed.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Mappings that can be registered at once (a process maps one table, two
/// while it moves to a bigger one; tests map more).
const SLOTS: usize = 64;

const LIVE: u8 = 0;
const REPLACING: u8 = 1;
const REPLACED: u8 = 2;
const FAILED: u8 = 3;

struct Slot {
    /// Bumped before and after a slot is armed or freed: odd while it
    /// changes, so the handler never pairs one mapping's start with
    /// another's length.
    version: AtomicUsize,
    /// 0: free.
    start: AtomicUsize,
    len: AtomicUsize,
    state: AtomicU8,
    /// Words of the replacement to set to `closed` (the state words).
    closed_words: [AtomicUsize; 2],
    closed_value: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    version: AtomicUsize::new(0),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    state: AtomicU8::new(LIVE),
    closed_words: [AtomicUsize::new(0), AtomicUsize::new(0)],
    closed_value: AtomicU64::new(0),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
static INSTALL: Once = Once::new();
/// The SIGBUS action found when ours was installed.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A registered mapping; unregistered when dropped (before the unmap).
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Registers the mapping at `start` of `len` bytes: should its file be
    /// cut short, it is replaced by private memory of the same size whose
    /// `u64` words at `closed_words` hold `closed`. `None` if every slot is
    /// taken (the mapping is then unguarded, as before this existed).
    pub fn register(
        start: *mut libc::c_void,
        len: usize,
        closed_words: [usize; 2],
        closed: u64,
    ) -> Option<Guard> {
        install();
        for (i, slot) in TABLE.iter().enumerate() {
            // Claim a free slot by its length word, then arm it by its start.
            if slot
                .len
                .compare_exchange(0, len, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            slot.version.fetch_add(1, Ordering::AcqRel);
            slot.state.store(LIVE, Ordering::Relaxed);
            for (w, k) in slot.closed_words.iter().zip(closed_words) {
                w.store(k, Ordering::Relaxed);
            }
            slot.closed_value.store(closed, Ordering::Relaxed);
            slot.start.store(start as usize, Ordering::Release);
            slot.version.fetch_add(1, Ordering::AcqRel);
            return Some(Guard { slot: i });
        }
        None
    }

    /// Whether the mapping's file was found cut short (the mapping now
    /// holds a closed, empty table).
    pub fn is_broken(&self) -> bool {
        TABLE[self.slot].state.load(Ordering::Acquire) != LIVE
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let slot = &TABLE[self.slot];
        slot.version.fetch_add(1, Ordering::AcqRel);
        slot.start.store(0, Ordering::Release);
        slot.version.fetch_add(1, Ordering::AcqRel);
        // Free for the next `register` only now.
        slot.len.store(0, Ordering::Release);
    }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: plain sigaction calls with valid, initialised structs;
        // the previous action is stored before ours can run.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return;
            }
            let _ = PREVIOUS.set(old);
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
            libc::sigemptyset(&mut new.sa_mask);
            libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut());
        }
    });
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // Only an access past a file's end (not a SIGBUS sent by kill, nor a
    // hardware error) is ours to mend.
    if code == libc::BUS_ADRERR {
        for slot in TABLE.iter() {
            // A slot changing (odd) is not mapped or no longer used: no
            // access of it can be faulting.
            let version = slot.version.load(Ordering::Acquire);
            let start = slot.start.load(Ordering::Acquire);
            let len = slot.len.load(Ordering::Acquire);
            if version % 2 == 1 || slot.version.load(Ordering::Acquire) != version {
                continue;
            }
            if start == 0 || addr < start || addr >= start + len {
                continue;
            }
            match slot
                .state
                .compare_exchange(LIVE, REPLACING, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let done = replace(slot, start, len);
                    slot.state
                        .store(if done { REPLACED } else { FAILED }, Ordering::Release);
                    if done {
                        return;
                    }
                }
                Err(_) => loop {
                    // Another thread is replacing it: the access is retried
                    // once that is done.
                    match slot.state.load(Ordering::Acquire) {
                        REPLACING => std::hint::spin_loop(),
                        REPLACED => return,
                        _ => break,
                    }
                },
            }
            break;
        }
    }
    forward(sig, info, ctx);
}

/// Puts a closed, empty table of `len` bytes at `start`, in one step.
fn replace(slot: &Slot, start: usize, len: usize) -> bool {
    // SAFETY: a fresh private mapping, written within its bounds (the
    // state words are inside the table's first line), then moved onto the
    // registered mapping, which no Rust reference outlives (`LeaseTable`
    // reads it through atomics only, and unregisters before it unmaps).
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return false;
        }
        let closed = slot.closed_value.load(Ordering::Relaxed);
        for w in &slot.closed_words {
            let k = w.load(Ordering::Relaxed);
            if (k + 1) * 8 <= len {
                p.cast::<u64>().add(k).write(closed);
            }
        }
        let moved = libc::mremap(
            p,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            start as *mut libc::c_void,
        );
        if moved == libc::MAP_FAILED {
            libc::munmap(p, len);
            return false;
        }
        true
    }
}

/// What would have happened without this handler.
fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let previous = PREVIOUS.get().copied();
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let sent = unsafe { (*info).si_code } <= 0;
    match previous {
        // A SIGBUS sent (not a fault) to a process that ignored SIGBUS
        // stays ignored.
        Some(p) if p.sa_sigaction == libc::SIG_IGN && sent => {}
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with
                // SA_SIGINFO, so it takes these three arguments.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a handler installed without SA_SIGINFO takes the
                // signal number only.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: sigaction and raise are async-signal-safe. With the
            // default action back, a fault repeats when this returns and
            // kills the process; a sent signal is raised again.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigemptyset(&mut dfl.sa_mask);
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
                if sent {
                    libc::raise(sig);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// A file mapping whose file is truncated under it reads as the
    /// replacement afterwards instead of killing the test process.
    #[test]
    fn a_truncated_mapping_is_replaced_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let len = 3 * 4096;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(len as u64).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of a file of `len` bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let guard = Guard::register(p, len, [8, 10], 1 << 63).unwrap();
        // SAFETY: in bounds, aligned, accessed atomically only.
        let word = |i: usize| unsafe { &*p.cast::<AtomicU64>().add(i) };
        word(8).store(5, Ordering::Relaxed);
        word(1000).store(7, Ordering::Relaxed);
        assert!(!guard.is_broken());
        // Cut to one page: word 1000 (second page) is past the end.
        f.set_len(4096).unwrap();
        assert_eq!(word(1000).load(Ordering::Relaxed), 0);
        assert!(guard.is_broken());
        assert_eq!(word(8).load(Ordering::Relaxed), 1 << 63);
        assert_eq!(word(10).load(Ordering::Relaxed), 1 << 63);
        assert_eq!(word(9).load(Ordering::Relaxed), 0);
        // Writable, private: the file is untouched.
        word(1).store(3, Ordering::Relaxed);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        drop(guard);
        // SAFETY: the mapping made above, unmapped once.
        unsafe { libc::munmap(p, len) };
    }

    /// A fault in a mapping that is not registered still kills, as it
    /// would have without the handler (in a child, so the test lives).
    #[test]
    fn other_faults_still_kill() {
        install();
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create_new(dir.path().join("u")).unwrap();
        f.set_len(8192).unwrap();
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        // SAFETY: a fresh shared mapping of a file of 8192 bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the child only makes system calls and touches the
        // mapping before it exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe {
                libc::ftruncate(fd, 0);
                std::ptr::read_volatile(p.cast::<u64>().add(600));
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFSIGNALED(status), "the child exited: {status}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGBUS);
        // SAFETY: the mapping made above, unmapped once.
        unsafe { libc::munmap(p, 8192) };
    }
}
