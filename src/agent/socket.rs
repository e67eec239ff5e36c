//! The agent's socket: a directory we own, a socket inside it, their modes set by
//! `agent.socket_mode` (0700/0600 by default; 0710/0660 with `agent.socket_group`;
//! 0711/0666). A planted symlink is refused, a stale socket from a dead agent replaced, a
//! live agent's socket left alone.

use std::io;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokio::net::UnixListener;

use crate::error::InvalidSetting;

/// `agent.socket_mode`: who besides the agent's uid may connect(2). The peer's rule still
/// decides what a connection may do; this only decides who can reach the rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum SocketMode {
    /// `"0600"`: the agent's own uid only (directory 0700).
    #[default]
    Owner,
    /// `"0660"`: also members of `agent.socket_group` (directory 0710, same group).
    Group,
    /// `"0666"`: every uid, for `[[agent.allow]]` rules naming uids outside one group
    /// (directory 0711).
    Everyone,
}

impl TryFrom<String> for SocketMode {
    type Error = String;

    fn try_from(text: String) -> Result<SocketMode, String> {
        match text.as_str() {
            "0600" | "600" => Ok(SocketMode::Owner),
            "0660" | "660" => Ok(SocketMode::Group),
            "0666" | "666" => Ok(SocketMode::Everyone),
            _ => Err(format!(
                "'{text}' is not a socket mode keybound uses; write \"0600\" (this uid only), \"0660\" (with socket_group) or \"0666\" (every uid; the [[agent.allow]] rules decide)"
            )),
        }
    }
}

impl SocketMode {
    pub fn socket_bits(self) -> u32 {
        match self {
            SocketMode::Owner => 0o600,
            SocketMode::Group => 0o660,
            SocketMode::Everyone => 0o666,
        }
    }

    /// The directory's mode: search (not read or write) for whom may reach the socket.
    pub fn dir_bits(self) -> u32 {
        match self {
            SocketMode::Owner => 0o700,
            SocketMode::Group => 0o710,
            SocketMode::Everyone => 0o711,
        }
    }

    /// `socket_group` goes with `"0660"` and only with it.
    pub fn check_group(self, group: Option<&str>) -> Result<(), InvalidSetting> {
        match (self, group) {
            (SocketMode::Group, None) => Err(InvalidSetting::new(
                "agent.socket_mode",
                "\"0660\" needs agent.socket_group (the group whose members may connect)",
            )),
            (SocketMode::Owner | SocketMode::Everyone, Some(g)) => Err(InvalidSetting::new(
                "agent.socket_group",
                format!(
                    "'{g}' has no effect unless agent.socket_mode = \"0660\"; set both or neither"
                ),
            )),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket path {} has no parent directory", .0.display())]
    NoParent(PathBuf),
    #[error("cannot create {}: {reason}", .path.display())]
    Create { path: PathBuf, reason: String },
    #[error("{} is a symbolic link; refusing to use it (remove it, or choose agent.socket elsewhere)", .0.display())]
    Symlink(PathBuf),
    #[error("{} is not a directory", .0.display())]
    NotDirectory(PathBuf),
    #[error("{} belongs to uid {owner}, not to this agent (uid {me}); choose agent.socket elsewhere", .path.display())]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("{} has mode {mode:o}, more open than agent.socket_mode needs ({want:o}); run: chmod {want:o} {}", .path.display(), .path.display())]
    DirMode { path: PathBuf, mode: u32, want: u32 },
    #[error("{} holds other files and has mode {mode:o}, so callers of agent.socket_mode cannot reach a socket in it; keybound does not widen a directory it shares (its mode guards the other files): give the agent a directory of its own, e.g. agent.socket = \"{}/keybound/agent.sock\" (keybound creates it {want:o})", .path.display(), .path.display())]
    Shared { path: PathBuf, mode: u32, want: u32 },
    #[error("agent.socket_group: {reason}")]
    Group { reason: String },
    #[error("another keybound agent is listening on {}; stop it first", .0.display())]
    Live(PathBuf),
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotSocket(PathBuf),
    #[error("cannot listen on {}: {reason}", .path.display())]
    Bind { path: PathBuf, reason: String },
}

impl SocketError {
    /// A socket path or directory keybound must not use, or one another agent holds, is a
    /// configuration matter; one the machine would not create or bind is the machine's
    /// (`Device`).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            SocketError::NoParent(_)
            | SocketError::Symlink(_)
            | SocketError::NotDirectory(_)
            | SocketError::Owner { .. }
            | SocketError::DirMode { .. }
            | SocketError::Shared { .. }
            | SocketError::Group { .. }
            | SocketError::NotSocket(_)
            | SocketError::Live(_) => ErrorKind::Configuration,
            SocketError::Create { .. } | SocketError::Bind { .. } => ErrorKind::Device,
        }
    }
}

/// The default: `$XDG_RUNTIME_DIR/keybound/agent.sock`, else `/run/keybound/agent.sock`
/// (a system service, with systemd's `RuntimeDirectory=keybound`).
pub fn default_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("keybound").join("agent.sock"),
        None => PathBuf::from("/run/keybound/agent.sock"),
    }
}

/// This process's effective uid.
pub fn own_uid() -> io::Result<u32> {
    Ok(rustix::process::geteuid().as_raw())
}

/// Prepares the directory and binds the socket with `mode` and `group` (call inside a tokio
/// runtime). Every check (symlinks, owner, a live agent) comes before anything is changed.
/// The directory's mode and group are managed only when keybound created it or it holds
/// nothing else (systemd's `RuntimeDirectory=`): a directory shared with other sockets (a
/// user's `$XDG_RUNTIME_DIR`) is never widened, since its mode is what guards them.
pub fn bind(
    path: &Path,
    mode: SocketMode,
    group: Option<&str>,
) -> Result<UnixListener, SocketError> {
    let gid = group.map(group_id).transpose()?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| SocketError::NoParent(path.to_path_buf()))?;
    let me = own_uid().map_err(|e| SocketError::Create {
        path: "/proc/self".into(),
        reason: e.to_string(),
    })?;
    let created = prepare_dir(dir, me, mode)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => return Err(SocketError::Symlink(path.into())),
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::Live(path.into()));
            }
            tracing::info!(socket = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path).map_err(|e| SocketError::Create {
                path: path.into(),
                reason: e.to_string(),
            })?;
        }
        Ok(_) => return Err(SocketError::NotSocket(path.into())),
        Err(_) => {}
    }
    let managed = created || is_empty(dir)?;
    if managed {
        // Closed while the socket is made, so nobody reaches it before its mode is set.
        set_mode(dir, 0o700)?;
    } else {
        check_shared_dir(dir, mode, gid)?;
    }
    let listener = UnixListener::bind(path).map_err(|e| SocketError::Bind {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if let Some(gid) = gid {
        let owned: &[&Path] = if managed { &[path, dir] } else { &[path] };
        for p in owned {
            std::os::unix::fs::chown(p, None, Some(gid)).map_err(|e| SocketError::Group {
                reason: format!(
                    "cannot give {} to gid {gid}: {e} (the agent's uid must be a member of that group)",
                    p.display()
                ),
            })?;
        }
    }
    set_mode(path, mode.socket_bits())?;
    if managed {
        set_mode(dir, mode.dir_bits())?;
    }
    Ok(listener)
}

fn is_empty(dir: &Path) -> Result<bool, SocketError> {
    let mut entries = std::fs::read_dir(dir).map_err(|e| SocketError::Create {
        path: dir.into(),
        reason: e.to_string(),
    })?;
    Ok(entries.next().is_none())
}

/// A directory keybound shares with other files must already let `mode`'s callers reach
/// the socket; keybound does not widen it.
fn check_shared_dir(dir: &Path, mode: SocketMode, gid: Option<u32>) -> Result<(), SocketError> {
    let m = std::fs::metadata(dir).map_err(|e| SocketError::Create {
        path: dir.into(),
        reason: e.to_string(),
    })?;
    let bits = m.permissions().mode() & 0o777;
    let reachable = match mode {
        SocketMode::Owner => true,
        SocketMode::Group => bits & 0o010 != 0 && gid == Some(m.gid()),
        SocketMode::Everyone => bits & 0o001 != 0,
    };
    if reachable {
        return Ok(());
    }
    Err(SocketError::Shared {
        path: dir.into(),
        mode: bits,
        want: mode.dir_bits(),
    })
}

fn set_mode(path: &Path, bits: u32) -> Result<(), SocketError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(bits)).map_err(|e| {
        SocketError::Bind {
            path: path.into(),
            reason: e.to_string(),
        }
    })
}

/// A group name (looked up in /etc/group) or a numeric gid.
fn group_id(group: &str) -> Result<u32, SocketError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group").map_err(|e| SocketError::Group {
        reason: format!("cannot read /etc/group to find '{group}': {e}; give the gid instead"),
    })?;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| SocketError::Group {
            reason: format!("no group '{group}' in /etc/group; give its name or gid"),
        })
}

/// Checks the directory, creating it (0700) when missing; returns whether it created it.
fn prepare_dir(dir: &Path, me: u32, mode: SocketMode) -> Result<bool, SocketError> {
    let created = std::fs::symlink_metadata(dir).is_err();
    if created {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| SocketError::Create {
                path: dir.into(),
                reason: e.to_string(),
            })?;
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| SocketError::Create {
        path: dir.into(),
        reason: e.to_string(),
    })?;
    if m.file_type().is_symlink() {
        return Err(SocketError::Symlink(dir.into()));
    }
    if !m.is_dir() {
        return Err(SocketError::NotDirectory(dir.into()));
    }
    if m.uid() != me {
        return Err(SocketError::Owner {
            path: dir.into(),
            owner: m.uid(),
            me,
        });
    }
    let bits = m.permissions().mode() & 0o777;
    let want = mode.dir_bits();
    if bits & !want != 0 {
        return Err(SocketError::DirMode {
            path: dir.into(),
            mode: bits,
            want,
        });
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_modes_and_groups() {
        assert_eq!(
            SocketMode::try_from("0660".to_owned()),
            Ok(SocketMode::Group)
        );
        assert!(
            SocketMode::try_from("0644".to_owned())
                .unwrap_err()
                .contains("0666")
        );
        assert_eq!(SocketMode::Everyone.dir_bits(), 0o711);
        assert!(SocketMode::Group.check_group(None).is_err());
        assert!(SocketMode::Owner.check_group(Some("x")).is_err());
        assert!(SocketMode::Group.check_group(Some("x")).is_ok());
        assert_eq!(group_id("0").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        assert!(
            group_id("no-such-group-here")
                .unwrap_err()
                .to_string()
                .contains("no group 'no-such-group-here'")
        );
    }
}
