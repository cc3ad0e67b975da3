//! Which process drives a run: `pid:<pid>:<start time>`, so that a resume can tell a live
//! owner from a dead one even when the pid has been reused.

/// This process's owner string.
pub fn this_process() -> String {
    let pid = std::process::id();
    format!("pid:{pid}:{}", start_time(pid).unwrap_or(0))
}

/// The pid of an owner string whose process still lives.
pub fn live_pid(owner: &str) -> Option<u32> {
    let mut parts = owner.split(':');
    if parts.next()? != "pid" {
        return None;
    }
    let pid: u32 = parts.next()?.parse().ok()?;
    let started: u64 = parts.next()?.parse().ok()?;
    if pid == std::process::id() {
        return None;
    }
    (start_time(pid)? == started).then_some(pid)
}

/// The start time of a process in clock ticks since boot (field 22 of /proc/PID/stat).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}
