//! The rotation state file, so a restarted allocator resumes the rotation
//! where the last one stopped: the address due next, the lease sequence and
//! the pool generation. The address due next is kept for each family (each
//! rotates on its own cursor); a 48-byte record of the single-cursor
//! releases is still read.
//!
//! The state is one 64-byte record at offset 0, rewritten in place with one
//! `pwrite` before any lease reply that it covers is sent. A single write of
//! that size inside one page is all-or-nothing for a process that dies (even
//! by SIGKILL: the kernel holds the data); a checksum rejects a record torn
//! by a power loss, and the allocator then starts from the first address.
//! An exclusive `flock` keeps two allocators off one state directory.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use rotor_protocol::Segment;

const MAGIC: &[u8; 4] = b"RTR2";
const LEN: usize = 64;
/// The single-cursor record: magic, family byte, generation, seq, the
/// address due next at 24, checksum at 40.
const MAGIC_1: &[u8; 4] = b"RTR1";
const LEN_1: usize = 48;
pub const FILE_NAME: &str = "rotation.state";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Saved {
    pub generation: u64,
    pub seq: u64,
    /// By `Family::index`.
    pub next_due: [Option<IpAddr>; 2],
}

/// What to do about a state directory that cannot be used, said after
/// its error (by the allocator, and by `rotor up` before it starts one).
pub const UNUSABLE_HINT: &str = "give a --state-dir this user can write, or --no-state";

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot use the state directory {0}")]
    Dir(PathBuf, #[source] io::Error),
    #[error("cannot open the state file {0}")]
    Open(PathBuf, #[source] io::Error),
    #[error("another allocator is using the state file {0}")]
    Locked(PathBuf),
    #[error("cannot read {0}, kept there by an earlier run (one of another user, root?): give it to this user (chown), or move it away")]
    Kept(PathBuf, #[source] io::Error),
}

pub struct StateFile {
    file: Flock<File>,
    path: PathBuf,
}

/// Whether an allocator could keep its state in `dir`: the directory made
/// (or there) and its state file opened and locked, then let go; nothing
/// read, nothing logged (`--check`, and `rotor up` before it starts one).
pub fn probe(dir: &Path) -> Result<(), PersistError> {
    open_locked(dir).map(|_| ())
}

/// `probe` for `--check`, which leaves nothing made (run by another user
/// than the allocator's, it would leave a file the allocator cannot open):
/// the state file, if there, opened and locked; else the directory made,
/// if need be, and a file made in it, then both taken away again.
pub fn probe_unmade(dir: &Path) -> Result<(), PersistError> {
    let path = dir.join(FILE_NAME);
    // (Not `exists`, which follows a link: a dangling one is no file to
    // make, and the allocator's open refuses it.)
    if std::fs::symlink_metadata(&path).is_ok() {
        open_and_lock(path, false)?;
        file_made_there(dir).map_err(|e| PersistError::Dir(dir.into(), e))?;
        return kept_readable(dir);
    }
    // Tried for real (as root, access(2) passes most of what mkdir then
    // refuses), and undone: the directories made, a file made there.
    // Each level made by this, and only those undone (one another made
    // meanwhile, an allocator starting, is left alone).
    let mut levels: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    levels.reverse();
    let mut made: Vec<&Path> = Vec::new();
    let undo = |made: &[&Path]| {
        for d in made.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    };
    for d in levels {
        match std::fs::create_dir(d) {
            Ok(()) => made.push(d),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                undo(&made);
                return Err(PersistError::Dir(dir.into(), e));
            }
        }
    }
    let made_there = file_made_there(dir);
    undo(&made);
    made_there.map_err(|e| PersistError::Open(path, e))?;
    kept_readable(dir)
}

/// Whether a file can be made in `dir`: one made, then taken away. The
/// state file is written in place, but the sessions and the quarantine
/// are replaced by a rename there: a directory whose files were writable
/// but which was not passed every check, and each later save failed.
fn file_made_there(dir: &Path) -> io::Result<()> {
    let trial = dir.join(format!(".{FILE_NAME}.check-{}", std::process::id()));
    // (One left by a run killed here, of this pid: a container's pid 1.)
    let _ = std::fs::remove_file(&trial);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&trial)?;
    let _ = std::fs::remove_file(&trial);
    Ok(())
}

/// The state file in `dir` (both made if need be), opened and locked, and
/// `dir` one whose files can be replaced.
fn open_locked(dir: &Path) -> Result<(Flock<File>, PathBuf), PersistError> {
    make_private_dir(dir).map_err(|e| PersistError::Dir(dir.into(), e))?;
    let locked = open_and_lock(dir.join(FILE_NAME), true)?;
    file_made_there(dir).map_err(|e| PersistError::Dir(dir.into(), e))?;
    kept_readable(dir)?;
    Ok(locked)
}

/// Each file kept beside the state file that is there can be read by this
/// user: one it cannot (made by an allocator run as root, this one run as
/// `rotor`) had the next checkpoint replace what it held (the sticky
/// sessions, the site state) or the addresses taken out by hand put back
/// into the rotation, with a warning only; refused instead, as the state
/// file is.
fn kept_readable(dir: &Path) -> Result<(), PersistError> {
    let kept = [
        SESSIONS_FILE_NAME,
        SITES_FILE_NAME,
        SOURCES_FILE_NAME,
        HAND_FILE_NAME,
        ORDER_KEY_FILE_NAME,
    ];
    for name in kept {
        let path = dir.join(name);
        match open_kept(&path) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(PersistError::Kept(path, e))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The state file at `path` (made if `create`), opened and locked.
fn open_and_lock(path: PathBuf, create: bool) -> Result<(Flock<File>, PathBuf), PersistError> {
    // (Not through a symlink another user of a shared directory put
    // there.)
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| PersistError::Open(path.clone(), e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(file) => Ok((file, path)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(PersistError::Locked(path)),
        Err((_, e)) => Err(PersistError::Open(path, e.into())),
    }
}

impl StateFile {
    /// Opens (or creates) the state file in `dir`, locks it, and returns the
    /// saved state, if a valid one is there.
    pub fn open(dir: &Path) -> Result<(StateFile, Option<Saved>), PersistError> {
        let (file, path) = open_locked(dir)?;
        // One an older rotor made under a looser umask is narrowed too.
        {
            use std::os::unix::fs::PermissionsExt;
            if file
                .metadata()
                .is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
            {
                let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
            }
        }
        let mut buf = [0u8; LEN];
        let saved = match file.read_at(&mut buf, 0) {
            Ok(n) => {
                let saved = decode(&buf[..n]);
                let newer = buf[..n].starts_with(b"RTR")
                    && n > 3
                    && buf[3].is_ascii_digit()
                    && buf[3] > MAGIC[3];
                if newer {
                    tracing::warn!(file = %path.display(), format = %String::from_utf8_lossy(&buf[..4]), "the rotation state was written by a newer rotor, in a format this one does not read: the rotation starts over (and is kept in this one's format from now on)");
                } else if n > 0 && saved.is_none() {
                    tracing::warn!(file = %path.display(), "the rotation state record is torn or corrupt (its checksum does not match): the rotation starts over");
                }
                saved
            }
            Err(_) => None,
        };
        Ok((StateFile { file, path }, saved))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&self, s: &Saved) -> io::Result<()> {
        self.file.write_all_at(&encode(s), 0)
    }

    /// Puts what was written on the disk (at a clean stop).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// The entries taken out of the rotation by hand (`rotor quarantine`), kept
/// beside the rotation state so an allocator restart does not put them back
/// early: JSON, replaced whole (written to a temporary file, then renamed
/// over) when the set changes.
pub const HAND_FILE_NAME: &str = "quarantine.json";

/// An entry out of the rotation by hand, and when that ends (seconds since
/// the Unix epoch; `None`: until released).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandOut {
    pub entry: Segment,
    pub until: Option<u64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct HandFile {
    /// `ADDRESS` or `PREFIX/LEN`, and the end in Unix seconds or null.
    taken_out_by_hand: Vec<HandLine>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct HandLine {
    entry: String,
    until: Option<u64>,
}

/// Reads the hand quarantines kept in `path`: none if there is no file.
/// A file that does not parse is an error (the caller logs it and goes on)
/// and is set aside as `….corrupt`, not written over by the next change.
/// Entries that do not parse are returned apart, to be named in the log:
/// one bad line does not put the others back into the rotation.
pub fn read_hand(path: &Path) -> io::Result<(Vec<HandOut>, Vec<String>)> {
    let Some(text) = read_text(path)? else {
        return Ok((Vec::new(), Vec::new()));
    };
    let file: HandFile = parse_json(&text).inspect_err(|_| set_aside(path))?;
    let mut outs = Vec::new();
    let mut bad = Vec::new();
    for l in file.taken_out_by_hand {
        match l.entry.parse() {
            Ok(entry) => outs.push(HandOut {
                entry,
                until: l.until,
            }),
            Err(_) => bad.push(l.entry),
        }
    }
    Ok((outs, bad))
}

/// Renames a file that does not parse to `….corrupt`, kept for a look and
/// not lost to the next write; one set aside before is kept too (the next
/// is `….corrupt.2`, up to `….corrupt.9`, which the later ones replace).
fn set_aside(path: &Path) {
    let name = path.file_name().unwrap_or_default().to_owned();
    let named = |n: u32| {
        let mut name = name.clone();
        name.push(".corrupt");
        if n > 1 {
            name.push(format!(".{n}"));
        }
        path.with_file_name(name)
    };
    let to = (1..9)
        .map(named)
        .find(|p| !p.exists())
        .unwrap_or_else(|| named(9));
    let _ = std::fs::rename(path, to);
}

/// Makes `dir` (and its parents) if missing; `dir` itself only its owner
/// may read: its files name users and their session ids, which would let
/// another local user join a session.
fn make_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(m) = std::fs::metadata(dir).ok().filter(|m| m.is_dir()) {
        if m.permissions().mode() & 0o022 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "the state directory is writable by others: they could replace rotor's state files; chmod go-w it");
        }
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        r => r,
    }
}

pub fn write_hand(path: &Path, outs: &[HandOut]) -> io::Result<()> {
    let file = HandFile {
        taken_out_by_hand: outs
            .iter()
            .map(|o| HandLine {
                entry: o.entry.to_string(),
                until: o.until,
            })
            .collect(),
    };
    let text = serde_json::to_string_pretty(&file).map_err(io::Error::other)?;
    replace_file(path, (text + "\n").as_bytes())
}

/// The host's order key (see `rotor_protocol::set_order`): four words
/// in hexadecimal on one line, made at the first start with a state
/// directory and kept, so a restart leases prefixes in the same order and
/// resumes it.
pub const ORDER_KEY_FILE_NAME: &str = "order.key";

/// Made beside the key when prefixes are first leased each in an order of
/// its own (`rotor_protocol::Order::by_prefix`; an allocator of an older
/// release, the key's order alone, ignores it): a position saved without
/// it was saved in the key's order.
pub const ORDER_BY_PREFIX_FILE_NAME: &str = "order.by-prefix";

/// Whether `dir`'s positions were saved in the key's order alone (no
/// `ORDER_BY_PREFIX_FILE_NAME` there); the file made now, so this says
/// so once.
pub fn order_by_prefix_new(dir: &Path) -> bool {
    let path = dir.join(ORDER_BY_PREFIX_FILE_NAME);
    if std::fs::symlink_metadata(&path).is_ok() {
        return false;
    }
    let text =
        "prefixes are leased each in an order of its own (the order key mixed with the prefix)\n";
    let _ = replace_file(&path, text.as_bytes());
    true
}

/// The order key kept in `dir`, made (and kept) if there is none, and
/// whether it was made now. One that does not read is set aside as
/// `order.key.corrupt` and replaced: the order of prefixes starts over,
/// which repeats nothing a destination could tell from a new host's.
pub fn order_key(dir: &Path) -> io::Result<(rotor_protocol::OrderKey, bool)> {
    let path = dir.join(ORDER_KEY_FILE_NAME);
    match read_text(&path) {
        Ok(Some(bytes)) => {
            // (Bytes that are not text are a key that does not read too.)
            let words: Option<Vec<u64>> = String::from_utf8_lossy(&bytes)
                .split_whitespace()
                .map(|w| u64::from_str_radix(w, 16).ok())
                .collect();
            if let Some(Ok(key)) = words.map(<[u64; 4]>::try_from) {
                return Ok((key, false));
            }
            tracing::warn!(file = %path.display(), "the order key does not read: set aside as .corrupt, and a new one made (prefixes are leased in a new order)");
            let _ = std::fs::rename(
                &path,
                path.with_file_name(format!("{ORDER_KEY_FILE_NAME}.corrupt")),
            );
        }
        Ok(None) => {}
        Err(e) => return Err(e),
    }
    let key = rotor_protocol::random_order_key()?;
    let text = key.map(|w| format!("{w:016x}")).join(" ") + "\n";
    replace_file(&path, text.as_bytes())?;
    Ok((key, true))
}

/// The sticky sessions an allocator left for the next one (JSON, written
/// at a clean stop and, while they change, every `--checkpoint`; read at
/// the start).
pub const SESSIONS_FILE_NAME: &str = "sessions.json";

/// The site budgets used and cooldowns an allocator left for the next one
/// (JSON, as the sessions).
pub const SITES_FILE_NAME: &str = "sites.json";

/// The last good lists of the metadata services and pool commands an
/// allocator left for the next one (JSON, as the sessions): a service
/// down as the allocator restarts (a crash, an upgrade) keeps serving them
/// until it reads again, as a failed read does while it runs.
pub const SOURCES_FILE_NAME: &str = "sources.json";

/// A source's last good list: the source by a hash of its name (a
/// command's text may carry a token), its entries as a pool lists them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedSource {
    pub source: String,
    pub entries: Vec<String>,
}

/// How far past the later of the clock and its file's writing a kept
/// item's own time (a session's start, a site's last start or strike) may
/// be and still be believed. One far in the future (an edit, a bit
/// flipped that still parses) had been taken for the clock and ended
/// every other item: it is dropped instead.
pub const FUTURE_SLACK_MS: u64 = 60_000;

/// What the last allocator kept in `path` for this start (none if there
/// is no file), and how many of its items could not be read: one bad item
/// (an edit, a bit flipped) loses itself, not every other. A file with
/// any is set aside as `.corrupt`. With `remove` the file goes, so that a
/// later crash does not bring back what has outlived it (without
/// checkpoints, which rewrite it as things change, nothing else would).
pub fn take_kept<T: serde::de::DeserializeOwned>(
    path: &Path,
    remove: bool,
) -> io::Result<(Vec<T>, usize)> {
    let Some(text) = read_text(path)? else {
        return Ok((Vec::new(), 0));
    };
    let parsed = parse_items::<T>(&text);
    match &parsed {
        // The next checkpoint would write over it (the caller says it
        // starts without it, or without the bad items).
        Err(_) | Ok((_, 1..)) => set_aside(path),
        Ok(_) if remove => {
            let _ = clear_kept(path);
        }
        Ok(_) => {}
    }
    parsed
}

/// Removes what was kept in `path` (there is nothing left to keep).
pub fn clear_kept(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        Err(_) => Ok(()),
        Ok(()) => {
            sync_dir(path);
            Ok(())
        }
    }
}

/// Makes a rename or removal in `path`'s directory durable (its entry is
/// the directory's data): without it a power loss may bring back the
/// file a checkpoint replaced or removed.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// A state file's bytes, if it is there. (Not checked as text here: bytes
/// that are not UTF-8 are a file that does not parse, set aside as any.)
/// Opened without blocking, and only a regular file is read: a FIFO put
/// there had the allocator wait for a writer for ever, its socket bound
/// and unanswered, deaf to SIGTERM.
fn read_text(path: &Path) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut file = match open_kept(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file (a FIFO, a device or a directory is there)",
        ));
    }
    let mut text = Vec::new();
    file.read_to_end(&mut text)?;
    Ok(Some(text))
}

/// A kept file opened to read, without blocking (a FIFO there waits for
/// no writer).
fn open_kept(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// A state file's list of items, each read as a `T` as it comes (its
/// text held only meanwhile, not the whole file's as a tree of values,
/// which took some eight times the file's size at the start), and how
/// many did not read as one. A file that is no list is `InvalidData`.
fn parse_items<T: serde::de::DeserializeOwned>(text: &[u8]) -> io::Result<(Vec<T>, usize)> {
    struct Items<T>(std::marker::PhantomData<T>);
    impl<'de, T: serde::de::DeserializeOwned> serde::de::Visitor<'de> for Items<T> {
        type Value = (Vec<T>, usize);
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of kept items")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let (mut good, mut bad) = (Vec::new(), 0);
            while let Some(raw) = seq.next_element::<Box<serde_json::value::RawValue>>()? {
                match serde_json::from_str::<T>(raw.get()) {
                    Ok(item) => good.push(item),
                    Err(_) => bad += 1,
                }
            }
            Ok((good, bad))
        }
    }
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut de = serde_json::Deserializer::from_slice(text);
    let items = serde::Deserializer::deserialize_seq(&mut de, Items(std::marker::PhantomData))
        .map_err(invalid)?;
    de.end().map_err(invalid)?;
    Ok(items)
}

/// A state file's JSON; one that does not parse is `InvalidData`.
fn parse_json<T: serde::de::DeserializeOwned>(text: &[u8]) -> io::Result<T> {
    serde_json::from_slice(text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Keeps `items` in `path` for the next start (see `take_kept`).
pub fn write_kept<T: serde::Serialize>(path: &Path, items: &[T]) -> io::Result<()> {
    let text = serde_json::to_vec(items).map_err(io::Error::other)?;
    replace_file(path, &text)
}

fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    // (a file left by a crash may have another mode; made anew, never
    // opened through a symlink put there meanwhile)
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let written = io::Write::write_all(&mut f, bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        // Not left behind: on a full disk the part written held what
        // space there was until the next try.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(path);
    Ok(())
}

fn encode(s: &Saved) -> [u8; LEN] {
    let mut b = [0u8; LEN];
    b[..4].copy_from_slice(MAGIC);
    if let Some(IpAddr::V4(v4)) = s.next_due[0] {
        b[4] |= 1;
        b[24..28].copy_from_slice(&v4.octets());
    }
    if let Some(IpAddr::V6(v6)) = s.next_due[1] {
        b[4] |= 2;
        b[28..44].copy_from_slice(&v6.octets());
    }
    b[8..16].copy_from_slice(&s.generation.to_be_bytes());
    b[16..24].copy_from_slice(&s.seq.to_be_bytes());
    let sum = rotor_protocol::fnv1a(b[..56].iter().copied());
    b[56..64].copy_from_slice(&sum.to_be_bytes());
    b
}

fn decode(b: &[u8]) -> Option<Saved> {
    let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let sum_ok = |len: usize| {
        b.len() >= len
            && rotor_protocol::fnv1a(b[..len - 8].iter().copied()).to_be_bytes() == b[len - 8..len]
    };
    let mut next_due = [None, None];
    if b.get(..4) == Some(MAGIC) && sum_ok(LEN) {
        if b[4] & 1 != 0 {
            next_due[0] = Some(IpAddr::from(<[u8; 4]>::try_from(&b[24..28]).ok()?));
        }
        if b[4] & 2 != 0 {
            next_due[1] = Some(IpAddr::from(<[u8; 16]>::try_from(&b[28..44]).ok()?));
        }
    } else if b.get(..4) == Some(MAGIC_1) && sum_ok(LEN_1) {
        match b[4] {
            0 => {}
            4 => next_due[0] = Some(IpAddr::from(<[u8; 4]>::try_from(&b[24..28]).ok()?)),
            6 => next_due[1] = Some(IpAddr::from(<[u8; 16]>::try_from(&b[24..40]).ok()?)),
            _ => return None,
        }
    } else {
        return None;
    }
    Some(Saved {
        generation: u64_at(8),
        seq: u64_at(16),
        next_due,
    })
}

#[cfg(test)]
mod tests {
    /// Made once and kept: a restart leases prefixes in the same order. One
    /// that does not read is set aside and replaced; another directory (a
    /// host) has another.
    #[test]
    fn the_order_key_is_made_once_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = super::order_key(dir.path()).unwrap().0;
        assert_ne!(key, [0; 4]);
        let path = dir.path().join(super::ORDER_KEY_FILE_NAME);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(super::order_key(dir.path()).unwrap().0, key);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(super::order_key(other.path()).unwrap().0, key);
        let bads: [&[u8]; 6] = [
            b"",
            b"1 2 3",
            b"1 2 3 4 5",
            b"x 2 3 4",
            b"1 2 3 10000000000000000",
            b"\xff\xfe 1 2 3",
        ];
        for bad in bads {
            std::fs::write(&path, bad).unwrap();
            let new = super::order_key(dir.path()).unwrap().0;
            assert_ne!(new, key, "{bad:?}");
            assert_eq!(super::order_key(dir.path()).unwrap().0, new, "{bad:?}");
            let aside = dir
                .path()
                .join(format!("{}.corrupt", super::ORDER_KEY_FILE_NAME));
            assert_eq!(std::fs::read(aside).unwrap(), bad);
        }
    }

    #[test]
    fn a_kept_file_that_does_not_parse_is_set_aside_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.json");
        std::fs::write(&path, b"{garbage").unwrap();
        for remove in [true, false] {
            let got = super::take_kept::<u32>(&path, remove);
            assert_eq!(got.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
            assert!(!path.exists());
            let aside = dir.path().join("sessions.json.corrupt");
            assert_eq!(std::fs::read(&aside).unwrap(), b"{garbage");
            std::fs::rename(&aside, &path).unwrap();
        }
        // Bytes that are not text are set aside too (they failed the read
        // before, and the next checkpoint wrote over them), and the first
        // one set aside is kept.
        std::fs::write(dir.path().join("sessions.json.corrupt"), b"first").unwrap();
        std::fs::write(&path, b"\xff\xfe[1]").unwrap();
        let got = super::take_kept::<u32>(&path, false);
        assert_eq!(got.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        assert!(!path.exists());
        let aside = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
        assert_eq!(aside("sessions.json.corrupt"), b"first");
        assert_eq!(aside("sessions.json.corrupt.2"), b"\xff\xfe[1]");
        // A good one is read, and goes only when asked.
        super::write_kept(&path, &[1u32, 2]).unwrap();
        assert_eq!(
            super::take_kept::<u32>(&path, false).unwrap(),
            (vec![1, 2], 0)
        );
        assert!(path.exists());
        assert_eq!(
            super::take_kept::<u32>(&path, true).unwrap(),
            (vec![1, 2], 0)
        );
        assert!(!path.exists());
        // A write that fails leaves no part of itself behind (on a full
        // disk it held what space there was): here, a rename onto a
        // directory.
        let blocked = dir.path().join("blocked.json");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"x").unwrap();
        assert!(super::write_kept(&blocked, &[1u32]).is_err());
        assert!(!dir.path().join("blocked.json.tmp").exists());
        // One bad item loses itself alone; the file is set aside.
        std::fs::write(&path, b"[1, \"not-a-number\", 3]").unwrap();
        assert_eq!(
            super::take_kept::<u32>(&path, false).unwrap(),
            (vec![1, 3], 1)
        );
        assert!(!path.exists());
        assert_eq!(
            aside("sessions.json.corrupt.3"),
            b"[1, \"not-a-number\", 3]"
        );
    }

    /// `--check`'s probe leaves nothing made, finds a held state, and
    /// refuses a dangling link where the state file goes.
    /// A FIFO (or another file that is not a regular one) where a kept
    /// file goes is an error at once, not a wait for a writer for ever.
    #[test]
    fn a_kept_file_that_is_a_fifo_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        for name in [SESSIONS_FILE_NAME, HAND_FILE_NAME, ORDER_KEY_FILE_NAME] {
            let path = dir.path().join(name);
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        }
        let sessions = dir.path().join(SESSIONS_FILE_NAME);
        let e = super::take_kept::<u32>(&sessions, false).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(read_hand(&dir.path().join(HAND_FILE_NAME)).is_err());
        assert!(super::order_key(dir.path()).is_err());
    }

    #[test]
    fn the_check_probe_makes_nothing_and_sees_what_the_allocator_would() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a").join("b");
        super::probe_unmade(&fresh).unwrap();
        assert!(!dir.path().join("a").exists(), "nothing left made");
        let (_held, _) = super::StateFile::open(dir.path()).unwrap();
        assert!(matches!(
            super::probe_unmade(dir.path()),
            Err(super::PersistError::Locked(_))
        ));
        let linked = dir.path().join("linked");
        std::fs::create_dir(&linked).unwrap();
        std::os::unix::fs::symlink("/nonexistent/x", linked.join(super::FILE_NAME)).unwrap();
        assert!(super::probe_unmade(&linked).is_err());
    }

    #[test]
    fn hand_quarantines_round_trip_and_bad_files_are_errors() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HAND_FILE_NAME);
        assert_eq!(read_hand(&path).unwrap(), (vec![], vec![]));
        let outs = vec![
            HandOut {
                entry: Segment::single("10.0.0.5".parse().unwrap()),
                until: Some(1_900_000_000),
            },
            HandOut {
                entry: Segment::prefix("2001:db8::".parse().unwrap(), 64).unwrap(),
                until: None,
            },
        ];
        write_hand(&path, &outs).unwrap();
        assert_eq!(read_hand(&path).unwrap(), (outs.clone(), vec![]));
        assert!(!path.with_extension("json.tmp").exists());
        // Only its owner may read it.
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        // One entry that is not an address is named; the others stay out.
        std::fs::write(
            &path,
            "{\"taken_out_by_hand\": [{\"entry\": \"nope\", \"until\": null}, \
             {\"entry\": \"10.0.0.5\", \"until\": 1900000000}]}",
        )
        .unwrap();
        assert_eq!(
            read_hand(&path).unwrap(),
            (outs[..1].to_vec(), vec!["nope".to_string()])
        );
        // A file that does not parse is an error, and set aside, not
        // written over by the next change.
        std::fs::write(&path, "garbage").unwrap();
        assert!(read_hand(&path).is_err());
        assert!(!path.exists());
        let aside = path.with_file_name(format!("{HAND_FILE_NAME}.corrupt"));
        assert_eq!(std::fs::read(aside).unwrap(), b"garbage");
    }

    #[test]
    fn the_state_directory_and_file_are_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("var/lib/rotor");
        let (f, _) = StateFile::open(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(f.path()), 0o600);
        // A file an older rotor left 0644 is narrowed.
        let path = f.path().to_path_buf();
        drop(f);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (f, _) = StateFile::open(&dir).unwrap();
        assert_eq!(mode(f.path()), 0o600);
        // A second allocator is told the file is in use.
        let e = StateFile::open(&dir).err().unwrap();
        assert!(matches!(e, PersistError::Locked(_)), "{e}");
    }

    use super::*;

    /// A state file that is a symlink (another user of a writable
    /// directory pointing it at a file of rotor's user) is not opened.
    #[test]
    fn the_state_file_is_not_opened_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(FILE_NAME)).unwrap();
        assert!(StateFile::open(dir.path()).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    }

    #[test]
    fn round_trip_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let (f, saved) = StateFile::open(dir.path()).unwrap();
        assert_eq!(saved, None);
        let both = [
            Some("127.0.0.3".parse().unwrap()),
            Some("2001:db8::7".parse().unwrap()),
        ];
        for next_due in [[both[0], None], [None, both[1]], both] {
            let s = Saved {
                generation: 7,
                seq: 12345,
                next_due,
            };
            f.write(&s).unwrap();
            assert_eq!(decode(&encode(&s)), Some(s));
        }
        drop(f);
        let (_f, saved) = StateFile::open(dir.path()).unwrap();
        assert_eq!(saved.unwrap().next_due, both);
    }

    #[test]
    fn a_single_cursor_record_is_still_read() {
        // As the releases before per-family rotation wrote it.
        let mut b = [0u8; LEN_1];
        b[..4].copy_from_slice(MAGIC_1);
        b[4] = 6;
        b[8..16].copy_from_slice(&3u64.to_be_bytes());
        b[16..24].copy_from_slice(&99u64.to_be_bytes());
        b[24..40].copy_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        let sum = rotor_protocol::fnv1a(b[..40].iter().copied());
        b[40..48].copy_from_slice(&sum.to_be_bytes());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b).unwrap();
        let (_f, saved) = StateFile::open(dir.path()).unwrap();
        let saved = saved.unwrap();
        assert_eq!((saved.generation, saved.seq), (3, 99));
        assert_eq!(saved.next_due, [None, Some("2001:db8::7".parse().unwrap())]);
    }

    #[test]
    fn torn_or_foreign_records_are_ignored() {
        let s = Saved {
            generation: 1,
            seq: 2,
            next_due: [None, None],
        };
        let mut b = encode(&s);
        b[17] ^= 1;
        assert_eq!(decode(&b), None);
        assert_eq!(decode(&[0u8; LEN]), None);
    }

    #[test]
    fn a_second_allocator_cannot_share_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (_first, _) = StateFile::open(dir.path()).unwrap();
        assert!(matches!(
            StateFile::open(dir.path()),
            Err(PersistError::Locked(_))
        ));
    }
}
