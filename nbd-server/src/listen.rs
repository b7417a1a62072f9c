//! Listening sockets: a unix socket created with mode 0600 from the first instant, TCP, and
//! sockets passed in by systemd-style socket activation (`LISTEN_PID`, `LISTEN_FDS`).

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// First descriptor passed by socket activation.
const LISTEN_FDS_START: RawFd = 3;

/// Binds a unix socket at `path` that only the owner can connect to. The socket is bound in a
/// private directory, made 0600 there, then renamed into place, so it is never reachable with
/// wider permissions. A stale socket left by a dead server is replaced; a live one is an error.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "a server is already listening on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = parent.join(format!(".{}.bind-{}", file_name(path), std::process::id()));
    std::fs::create_dir(&private)?;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
    let staged = private.join("s");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "socket".into())
}

/// A listening socket inherited through socket activation.
#[derive(Debug)]
pub enum Inherited {
    Unix(UnixListener),
    Tcp(std::net::TcpListener),
}

/// Takes the sockets passed by socket activation, if any were passed to this process, and
/// removes the variables so that children do not take them too.
pub fn activated() -> io::Result<Vec<Inherited>> {
    let pid = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok());
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid != std::process::id() {
        return Ok(Vec::new());
    }
    // SAFETY: changing the environment is unsound only with other threads reading it; this
    // runs at start-up before any thread is spawned.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let mut out = Vec::new();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        let addr: nix::sys::socket::SockaddrStorage = nix::sys::socket::getsockname(fd)?;
        let family = nix::sys::socket::SockaddrLike::family(&addr);
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        // SAFETY: socket activation hands this process ownership of these descriptors; each
        // is wrapped exactly once, and getsockname above proved it is a socket.
        let inherited = unsafe {
            match family {
                Some(nix::sys::socket::AddressFamily::Unix) => {
                    Inherited::Unix(UnixListener::from_raw_fd(fd))
                }
                _ => Inherited::Tcp(std::net::TcpListener::from_raw_fd(fd)),
            }
        };
        out.push(inherited);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn unix_socket_is_private_and_replaces_stale_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nbd.sock");
        let listener = bind_unix(&path).expect("bind");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o777,
            0o600
        );
        assert!(
            bind_unix(&path).is_err(),
            "a live socket must not be replaced"
        );
        drop(listener);
        bind_unix(&path).expect("a stale socket is replaced");
        std::fs::remove_file(&path).expect("rm");
        std::fs::write(&path, b"x").expect("write");
        assert!(
            bind_unix(&path).is_err(),
            "a regular file must not be replaced"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "no staging left behind"
        );
    }
}
