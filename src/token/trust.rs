//! Which files keybound trusts: the config, the PKCS#11 module and the PIN file only where
//! no other user can change them (the file, and every directory above it, like ssh's
//! StrictModes). Each refusal is a reason ending in the command that fixes it.

use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;

/// Who may own a trusted file besides the effective user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Owners {
    /// The effective user or root: the config, the module (root installs both).
    UserOrRoot,
    /// The effective user only: the PIN file, which the user's process must read alone.
    User,
}

/// Opens `path` for reading without blocking (a FIFO answers at once instead of waiting
/// for a writer) and returns it only when it is a regular file. `nofollow` refuses a
/// symbolic link as the last component.
pub(crate) fn open_regular(path: &Path, nofollow: bool) -> Result<(File, Metadata), String> {
    let mut flags = OFlags::NONBLOCK;
    if nofollow {
        flags |= OFlags::NOFOLLOW;
    }
    // The flag bits fit an i32: they are the kernel's O_* constants.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if nofollow && code == rustix::io::Errno::LOOP.raw_os_error() => {
                match std::fs::read_link(path) {
                    Ok(target) => format!(
                        "it is a symbolic link (to {}); name the file itself",
                        target.display()
                    ),
                    Err(_) => "it is a symbolic link; name the file itself".into(),
                }
            }
            _ => e.to_string(),
        })?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "it is not a regular file (it is {}); name a plain file",
            kind(&meta)
        ));
    }
    Ok((file, meta))
}

/// Refuses a file (its metadata as opened) that someone other than `owners` owns, or that
/// group or others can write.
pub(crate) fn check_file(path: &Path, meta: &Metadata, owners: Owners) -> Result<(), String> {
    let me = euid();
    let uid = meta.uid();
    let owner_ok = uid == me || (owners == Owners::UserOrRoot && uid == 0);
    if !owner_ok {
        let whom = match owners {
            Owners::UserOrRoot => format!("you (uid {me}) or root"),
            Owners::User => format!("you (uid {me})"),
        };
        return Err(format!(
            "it is owned by uid {uid}, not by {whom}; run: chown {me} {}",
            path.display()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "it is writable by group or others (mode {mode:o}); run: chmod go-w {}",
            path.display()
        ));
    }
    Ok(())
}

/// Refuses `path` when another user could replace it: a directory above it (symbolic links
/// resolved) owned by someone other than the effective user or root, or writable by group
/// or others without the sticky bit. A sticky directory such as /tmp is accepted: there
/// nobody can rename or delete an entry another user owns. Returns the resolved path.
pub(crate) fn check_dirs(path: &Path) -> Result<PathBuf, String> {
    let real = std::fs::canonicalize(path).map_err(|e| e.to_string())?;
    check_ancestors(real.parent().unwrap_or(&real))?;
    Ok(real)
}

/// [`check_dirs`] for a file already opened (`opened` is its metadata as opened): the
/// directories checked are the ones the opened file is in. The path is resolved again to
/// find them, so the resolved path must still name the opened file (same device and inode);
/// a file swapped in between is refused.
pub(crate) fn check_dirs_of(path: &Path, opened: &Metadata) -> Result<PathBuf, String> {
    let real = check_dirs(path)?;
    let now = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
    same_file(&real, &now, opened)?;
    Ok(real)
}

/// `resolved` (at `real`) is the file that was opened: same device, same inode.
fn same_file(real: &Path, resolved: &Metadata, opened: &Metadata) -> Result<(), String> {
    if (resolved.dev(), resolved.ino()) != (opened.dev(), opened.ino()) {
        return Err(format!(
            "it changed while being checked ({} is no longer the file keybound opened); \
             find out what replaces it, then try again",
            real.display()
        ));
    }
    Ok(())
}

/// [`check_dirs`] for a directory itself: it and every directory above it.
pub(crate) fn check_dir(dir: &Path) -> Result<PathBuf, String> {
    let real = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
    check_ancestors(&real)?;
    Ok(real)
}

/// `dir` (resolved) and each directory above it.
fn check_ancestors(dir: &Path) -> Result<(), String> {
    let me = euid();
    for dir in dir.ancestors() {
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let uid = meta.uid();
        if uid != me && uid != 0 {
            return Err(format!(
                "its directory {} is owned by uid {uid}, not by you (uid {me}) or root; \
                 move the file to a directory of yours",
                dir.display()
            ));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(format!(
                "its directory {} is writable by group or others (mode {mode:o}); run: \
                 chmod go-w {} (or chmod +t {} if it must stay shared)",
                dir.display(),
                dir.display(),
                dir.display()
            ));
        }
    }
    Ok(())
}

/// The resolved path of a file that no other user can change: the file itself and every
/// directory above it pass [`check_file`] and [`check_dirs`].
pub(crate) fn check_path(path: &Path, owners: Owners) -> Result<PathBuf, String> {
    let real = check_dirs(path)?;
    let meta = std::fs::metadata(&real).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err(format!("it is not a regular file (it is {})", kind(&meta)));
    }
    check_file(path, &meta, owners)?;
    Ok(real)
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a plain file"
    }
}

/// `[token]` paths must be absolute: a relative one would follow the working directory,
/// which whoever starts keybound chooses. The error names the key.
pub fn absolute_paths(paths: &[(&str, Option<&Path>)]) -> Result<(), crate::error::InvalidSetting> {
    for (key, path) in paths {
        if let Some(path) = path
            && !path.is_absolute()
        {
            return Err(crate::error::InvalidSetting::new(
                format!("token.{key}"),
                format!("must be an absolute path, not '{}'", path.display()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn own_file_in_own_directory_is_trusted_and_writable_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        chmod(&file, 0o644);
        let (_, meta) = open_regular(&file, true).unwrap();
        check_file(&file, &meta, Owners::UserOrRoot).unwrap();
        assert_eq!(
            check_path(&file, Owners::UserOrRoot).unwrap(),
            std::fs::canonicalize(&file).unwrap()
        );

        chmod(&file, 0o664);
        let e = check_path(&file, Owners::UserOrRoot).unwrap_err();
        assert!(e.contains("mode 664") && e.contains("chmod go-w"), "{e}");
        chmod(&file, 0o644);

        chmod(dir.path(), 0o777);
        let e = check_path(&file, Owners::UserOrRoot).unwrap_err();
        assert!(e.contains("mode 777"), "{e}");
        chmod(dir.path(), 0o1777);
        check_path(&file, Owners::UserOrRoot).unwrap();
    }

    #[test]
    fn the_checked_directories_are_those_of_the_opened_file() {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let (first, second) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&first, "a").unwrap();
        std::fs::write(&second, "b").unwrap();
        // Through a symbolic link to the parent: resolved, checked, and the same file.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let (_, opened) = open_regular(&link.join("a"), true).unwrap();
        assert_eq!(
            check_dirs_of(&link.join("a"), &opened).unwrap(),
            std::fs::canonicalize(&first).unwrap()
        );
        // The name now resolves to another file than the one opened: refused.
        let (_, opened_second) = open_regular(&second, true).unwrap();
        let e = check_dirs_of(&first, &opened_second).unwrap_err();
        assert!(e.contains("changed while being checked"), "{e}");
        let e = same_file(&first, &std::fs::metadata(&first).unwrap(), &opened_second).unwrap_err();
        assert!(e.contains(&first.display().to_string()), "{e}");
        same_file(
            &second,
            &std::fs::metadata(&second).unwrap(),
            &opened_second,
        )
        .unwrap();
    }

    #[test]
    fn directories_and_symlinks_are_not_opened_as_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_regular(dir.path(), false).unwrap_err();
        assert!(e.contains("a directory"), "{e}");
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        open_regular(&link, false).unwrap();
        let e = open_regular(&link, true).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
    }
}
