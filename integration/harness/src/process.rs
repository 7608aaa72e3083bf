//! Child processes, signals and ports.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{io_err, HarnessError};

/// A free TCP port on 127.0.0.1 (bound once, then released).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Sends `signal` to `pid`. A process that is gone, or that may not be signalled, is an error:
/// a fault that was not delivered must never pass for one that was.
pub(crate) fn signal(pid: i32, signal: Signal) -> crate::Result<()> {
    kill(Pid::from_raw(pid), signal).map_err(|errno| HarnessError::Signal { pid, signal, errno })
}

/// Like [`signal`], for processes that may have ended by themselves meanwhile (a backend whose
/// connection closed after it was listed): a process that is gone is not an error. Returns
/// whether it was signalled.
pub(crate) fn signal_if_alive(pid: i32, signal: Signal) -> crate::Result<bool> {
    match kill(Pid::from_raw(pid), signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(errno) => Err(HarnessError::Signal { pid, signal, errno }),
    }
}

/// A process's scheduling state: the third field of `/proc/<pid>/stat` (`R` running, `S`
/// sleeping, `D` disk sleep, `T` stopped by a signal, `Z` zombie, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessState(pub char);

impl ProcessState {
    /// `T`: stopped by SIGSTOP (or another stop signal).
    pub const STOPPED: ProcessState = ProcessState('T');

    /// The state of `pid` now.
    pub fn of(pid: i32) -> crate::Result<Self> {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).map_err(io_err(format!("reading {path}")))?;
        // The command name is in parentheses and may contain spaces: parse after the last ')'.
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next())
            .map(ProcessState)
            .ok_or_else(|| HarnessError::Unsupported(format!("{path} has no state: {stat:?}")))
    }

    /// Waits up to `timeout` until `pid` is (`want` true) or is no longer (`want` false) in
    /// this state (a signal is delivered asynchronously); the state it was last seen in.
    fn await_on(self, pid: i32, want: bool, timeout: Duration) -> crate::Result<ProcessState> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = ProcessState::of(pid)?;
            if (now == self) == want || Instant::now() >= deadline {
                return Ok(now);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl std::fmt::Display for ProcessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// SIGSTOPs `pid` and waits (at most 2 s) until the kernel shows it stopped (`T`).
pub(crate) fn stop_process(pid: i32) -> crate::Result<ProcessState> {
    signal(pid, Signal::SIGSTOP)?;
    let state = ProcessState::STOPPED.await_on(pid, true, Duration::from_secs(2))?;
    if state != ProcessState::STOPPED {
        return Err(HarnessError::Unsupported(format!(
            "SIGSTOP was sent to pid {pid}, but 2 s later its state is {state}, not T"
        )));
    }
    Ok(state)
}

/// SIGCONTs `pid` and waits (at most 2 s) until it is no longer stopped.
pub(crate) fn continue_process(pid: i32) -> crate::Result<ProcessState> {
    signal(pid, Signal::SIGCONT)?;
    let state = ProcessState::STOPPED.await_on(pid, false, Duration::from_secs(2))?;
    if state == ProcessState::STOPPED {
        return Err(HarnessError::Unsupported(format!(
            "SIGCONT was sent to pid {pid}, but 2 s later it is still stopped"
        )));
    }
    Ok(state)
}

/// The direct children of `pid`, read from /proc.
pub(crate) fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| parent_of(*child) == Some(pid))
        .collect()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub(crate) fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Polls `ready` every 20 ms until it holds, the child exits, or `timeout` passes.
/// Returns whether it became ready.
pub(crate) fn wait_until(
    child: &mut Child,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// SIGKILLs a child and reaps it; its exit status (a child that had already exited is reaped
/// and its own status returned: callers that inject a kill check the signal).
pub(crate) fn kill_and_reap(child: &mut Child) -> crate::Result<ExitStatus> {
    let pid = child.id();
    if let Some(status) = child
        .try_wait()
        .map_err(io_err(format!("waiting for pid {pid}")))?
    {
        return Ok(status);
    }
    signal(pid as i32, Signal::SIGKILL)?;
    child
        .wait()
        .map_err(io_err(format!("reaping pid {pid} after SIGKILL")))
}

/// [`kill_and_reap`] for a fault: the child must have been running and died of the SIGKILL.
pub(crate) fn kill_for_fault(child: &mut Child, what: &str) -> crate::Result<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let status = kill_and_reap(child)?;
    if status.signal() != Some(Signal::SIGKILL as i32) {
        return Err(HarnessError::Unsupported(format!(
            "{what} had already exited ({status}) when it was to be SIGKILLed"
        )));
    }
    Ok(status)
}

/// A log file opened for appending, twice: for a child's stdout and stderr.
pub(crate) fn log_files(path: &Path, what: &str) -> crate::Result<(std::fs::File, std::fs::File)> {
    let err = || crate::io_err(format!("opening the {what} log"));
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err())?;
    let log2 = log.try_clone().map_err(err())?;
    Ok((log, log2))
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits up to `timeout` for a child to exit; returns whether it did.
pub(crate) fn wait_exit(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A service started as a child process (a producer or consumer in the chaos suite), with its
/// stdout and stderr in a log file. Signals are real: [`kill`](Self::kill) is SIGKILL,
/// [`pause`](Self::pause) is SIGSTOP, and each fails if the signal was not delivered or did not
/// take effect. Dropping the handle SIGKILLs and reaps the process.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl ChildProcess {
    /// Spawns `cmd` with stdin closed and stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: std::process::Command, log: &Path) -> crate::Result<Self> {
        let (out, err) = log_files(log, name)?;
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(crate::io_err(format!("starting {name}")))?;
        Ok(ChildProcess {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn running_pid(&self) -> crate::Result<i32> {
        self.pid()
            .ok_or_else(|| HarnessError::Unsupported(format!("{} is not running", self.name)))
    }

    /// SIGKILL, then reap. Fails if it had already exited (its status says how) or the signal
    /// could not be sent: a kill that did not happen is not reported as one.
    pub fn kill(&mut self) -> crate::Result<ExitStatus> {
        let mut c = self
            .child
            .take()
            .ok_or_else(|| HarnessError::Unsupported(format!("{} is not running", self.name)))?;
        kill_for_fault(&mut c, &self.name)
    }

    /// SIGSTOP: the process freezes with its sockets open (a zombie member, a hung server).
    /// Returns once the kernel shows it stopped (state `T`); fails if it does not within 2 s.
    pub fn pause(&self) -> crate::Result<ProcessState> {
        stop_process(self.running_pid()?)
    }

    /// SIGCONT after [`pause`](Self::pause); returns once it is no longer stopped.
    pub fn resume(&self) -> crate::Result<ProcessState> {
        continue_process(self.running_pid()?)
    }

    /// Its scheduling state now (`T` while stopped).
    pub fn state(&self) -> crate::Result<ProcessState> {
        ProcessState::of(self.running_pid()?)
    }

    /// Whether it is still running (not exited, not killed).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its exit status if it has exited by itself (without waiting).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Resident memory, from /proc. An error when it cannot be read (the process is gone, or
    /// /proc is not there): a bound must never pass on a measurement that was not taken.
    pub fn rss_bytes(&self) -> crate::Result<u64> {
        let pid = self.running_pid()?;
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).map_err(io_err(format!("reading {path}")))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| HarnessError::Unsupported(format!("{path} has no VmRSS line")))?;
        Ok(kib * 1024)
    }

    /// The last `lines` lines of its log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Cleanup: a child that already exited is fine here.
            let _ = kill_and_reap(&mut c);
        }
    }
}
