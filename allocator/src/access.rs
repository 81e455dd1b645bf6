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
    /// Groups (a peer's primary group) served.
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
    #[error("cannot set the mode or group of {0}")]
    Apply(std::path::PathBuf, #[source] std::io::Error),
}

pub fn parse_mode(s: &str) -> Result<u32, AccessError> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| AccessError::Mode(s.to_string()))
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

    /// Whether a peer with these credentials is served.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || uid == Uid::effective().as_raw()
            || self.uids.iter().any(|u| u.as_raw() == uid)
            || self.gids.iter().any(|g| g.as_raw() == gid)
            || self.group.is_some_and(|g| g.as_raw() == gid)
    }
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
        assert!(a.allows(0, 0));
        assert!(a.allows(Uid::effective().as_raw(), 12345));
        assert!(a.allows(1000, 1));
        assert!(a.allows(4242, 2000));
        assert!(!a.allows(4242, 4242) || Uid::effective().as_raw() == 4242);
    }
}
