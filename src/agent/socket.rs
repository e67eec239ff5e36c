//! The agent's socket: a 0700 directory we own, a 0600 socket inside it. A planted symlink
//! is refused, a stale socket from a dead agent replaced, a live agent's socket left alone.

use std::io;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

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
    #[error("{} has mode {mode:o}: group or others could reach the socket; run: chmod 700 {}", .path.display(), .path.display())]
    DirMode { path: PathBuf, mode: u32 },
    #[error("another keybound agent is listening on {}; stop it first", .0.display())]
    Live(PathBuf),
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotSocket(PathBuf),
    #[error("cannot listen on {}: {reason}", .path.display())]
    Bind { path: PathBuf, reason: String },
}

/// The default: `$XDG_RUNTIME_DIR/keybound/agent.sock`, else `/run/keybound/agent.sock`
/// (a system service, with systemd's `RuntimeDirectory=keybound`).
pub fn default_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("keybound").join("agent.sock"),
        None => PathBuf::from("/run/keybound/agent.sock"),
    }
}

/// This process's effective uid: the owner of `/proc/self` (no unsafe libc call needed).
pub fn own_uid() -> io::Result<u32> {
    std::fs::metadata("/proc/self").map(|m| m.uid())
}

/// Prepares the directory and binds the socket (call inside a tokio runtime).
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| SocketError::NoParent(path.to_path_buf()))?;
    let me = own_uid().map_err(|e| SocketError::Create {
        path: "/proc/self".into(),
        reason: e.to_string(),
    })?;
    prepare_dir(dir, me)?;
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
    let listener = UnixListener::bind(path).map_err(|e| SocketError::Bind {
        path: path.into(),
        reason: e.to_string(),
    })?;
    // The directory is already 0700, so nobody else could reach the socket in between.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        SocketError::Bind {
            path: path.into(),
            reason: e.to_string(),
        }
    })?;
    Ok(listener)
}

fn prepare_dir(dir: &Path, me: u32) -> Result<(), SocketError> {
    if std::fs::symlink_metadata(dir).is_err() {
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
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SocketError::DirMode {
            path: dir.into(),
            mode,
        });
    }
    Ok(())
}
