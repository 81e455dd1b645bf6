//! Who may talk to the allocator: the socket file's mode and group, and a
//! check of each connecting peer's credentials (SO_PEERCRED). Only root, the
//! allocator's own user, and configured users and groups are served.

use std::path::Path;

use nix::unistd::{Gid, Group, Uid, User};

#[derive(Debug, Clone)]
pub struct Access {
    /// Mode of the socket file (default 0660: owner and group only).
    pub mode: u32,
    /// Group of the socket file; `None`: the allocator's.
    pub group: Option<Gid>,
    /// Users served besides root and the allocator's own.
    pub uids: Vec<Uid>,
    /// Groups served (a peer's primary or a supplementary one).
    pub gids: Vec<Gid>,
}

impl Default for Access {
    fn default() -> Access {
        Access {
            mode: 0o660,
            group: None,
            uids: Vec::new(),
            gids: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("no user `{0}`")]
    NoUser(String),
    #[error("no group `{0}`")]
    NoGroup(String),
    #[error("`{0}` is not an octal file mode (e.g. 660)")]
    Mode(String),
    #[error("socket mode {0:03o} leaves its owner unable to connect (the allocator's user, rotor up's, and its workers run as that user): give the owner rw (6xx)")]
    OwnerLockedOut(u32),
    #[error("cannot set the mode or group of {0}")]
    Apply(std::path::PathBuf, #[source] std::io::Error),
}

pub fn parse_mode(s: &str) -> Result<u32, AccessError> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| AccessError::Mode(s.to_string()))?;
    // A socket its owner cannot write is one rotor up (and a worker of
    // the same user) cannot connect to: it waited, then said the
    // allocator did not come up.
    match mode & 0o600 == 0o600 {
        true => Ok(mode),
        false => Err(AccessError::OwnerLockedOut(mode)),
    }
}

pub fn parse_user(s: &str) -> Result<Uid, AccessError> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(Uid::from_raw(n));
    }
    match User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid),
        _ => Err(AccessError::NoUser(s.to_string())),
    }
}

pub fn parse_group(s: &str) -> Result<Gid, AccessError> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(Gid::from_raw(n));
    }
    match Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid),
        _ => Err(AccessError::NoGroup(s.to_string())),
    }
}

impl Access {
    /// Sets the socket file's mode and group.
    pub fn apply(&self, path: &Path) -> Result<(), AccessError> {
        use std::os::unix::fs::PermissionsExt;
        let wrap = |e: std::io::Error| AccessError::Apply(path.to_path_buf(), e);
        if let Some(g) = self.group {
            nix::unistd::chown(path, None, Some(g)).map_err(|e| wrap(e.into()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode)).map_err(wrap)
    }

    /// Whether a peer with these credentials is served. Its group may be
    /// its primary one or, read from `/proc` for `pid`, a supplementary
    /// one, as the socket file's own check (its mode and group) takes it.
    pub fn allows(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        self.rights(uid, gid, pid).is_some()
    }

    /// What a peer of these credentials may ask, if it is served at all.
    pub fn rights(&self, uid: u32, gid: u32, pid: Option<i32>) -> Option<Rights> {
        if uid == 0 || uid == Uid::effective().as_raw() {
            return Some(Rights::Control);
        }
        // The socket file's group: the one given, else the allocator's
        // (whose members the file lets connect).
        let file_group = self.group.unwrap_or_else(nix::unistd::getegid);
        let group =
            |gid: u32| self.gids.iter().any(|g| g.as_raw() == gid) || file_group.as_raw() == gid;
        let served = self.uids.iter().any(|u| u.as_raw() == uid)
            || group(gid)
            || pid.is_some_and(|pid| supplementary_groups(pid, uid, gid).into_iter().any(group));
        served.then_some(Rights::Lease)
    }
}

/// What a peer the socket serves may ask (as HAProxy's stats socket has
/// levels): a user let in to lease does not steer the pool for everyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rights {
    /// root and the allocator's own user: everything, `rotor reload`,
    /// `rotor quarantine` and `rotor release` among it.
    Control,
    /// A user or group let in by `--allow-uid`, `--allow-gid` or the
    /// socket file's group: leases and what a worker reports (an address
    /// it cannot use, a site's push-back, its metrics), and the status;
    /// not a reload or steering.
    Lease,
}

/// The supplementary groups of process `pid` (`Groups:` of its status),
/// if it is still the peer: its effective user and group are `uid` and
/// `gid` (a pid another process took since the connect is not taken for
/// it). None if it cannot be read.
fn supplementary_groups(pid: i32, uid: u32, gid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    // Real, effective, saved, filesystem.
    if field("Uid:").get(1) != Some(&uid) || field("Gid:").get(1) != Some(&gid) {
        return Vec::new();
    }
    field("Groups:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_users_and_groups() {
        assert_eq!(parse_mode("660").unwrap(), 0o660);
        assert_eq!(parse_mode("0o600").unwrap(), 0o600);
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("rw").is_err());
        // Its owner locked out: rotor up could not connect.
        for locked in ["000", "400", "500", "066"] {
            let e = parse_mode(locked).unwrap_err();
            assert!(matches!(e, AccessError::OwnerLockedOut(_)), "{locked}: {e}");
        }
        assert_eq!(parse_user("root").unwrap().as_raw(), 0);
        assert_eq!(parse_user("1234").unwrap().as_raw(), 1234);
        assert!(parse_user("rotor-no-such-user").is_err());
        assert_eq!(parse_group("0").unwrap().as_raw(), 0);
    }

    #[test]
    fn who_is_served() {
        let a = Access {
            uids: vec![Uid::from_raw(1000)],
            gids: vec![Gid::from_raw(2000)],
            ..Access::default()
        };
        assert!(a.allows(0, 0, None));
        assert!(a.allows(Uid::effective().as_raw(), 12345, None));
        assert!(a.allows(1000, 1, None));
        assert!(a.allows(4242, 2000, None));
        // Only root and the allocator's own user control it.
        assert_eq!(a.rights(0, 0, None), Some(Rights::Control));
        let me = Uid::effective().as_raw();
        assert_eq!(a.rights(me, 12345, None), Some(Rights::Control));
        if me != 1000 && me != 4242 {
            assert_eq!(a.rights(1000, 1, None), Some(Rights::Lease));
            assert_eq!(a.rights(4242, 2000, None), Some(Rights::Lease));
            let by_file_group = nix::unistd::getegid().as_raw();
            assert_eq!(a.rights(4242, by_file_group, None), Some(Rights::Lease));
        }
        assert!(!a.allows(4242, 4242, None) || Uid::effective().as_raw() == 4242);
        // A supplementary group counts: this process's own, read from /proc.
        let me = std::process::id() as i32;
        let (uid, gid) = (Uid::effective().as_raw(), nix::unistd::getegid().as_raw());
        if let Some(&g) = supplementary_groups(me, uid, gid).first() {
            let by_group = Access {
                group: Some(Gid::from_raw(g)),
                ..Access::default()
            };
            // As this process: its groups count.
            assert!(by_group.allows(4242, gid, Some(me)));
        }
        // A pid that is not the peer's (another user, another group).
        assert!(supplementary_groups(me, uid.wrapping_add(1), gid).is_empty());
    }
}
