//! Crash points for the tests that kill keybound at every step of a multi-step operation
//! (key rotation): in debug builds, `KEYBOUND_FAULT=<name>` makes the process kill itself
//! with SIGKILL when it reaches the point of that name, exactly as `kill -9` from outside
//! would at that moment. Release builds have no crash points.

/// Dies here if the tests asked for it (debug builds only).
pub fn point(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var_os("KEYBOUND_FAULT").is_some_and(|v| v == name) {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
    let _ = name;
}
