//! A private PostgreSQL cluster per test, from the machine's server binaries.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid, User};
use tempfile::TempDir;

use crate::postgres::PostgresServer;
use crate::process::{
    accepts, children_of, free_port, kill_and_reap, kill_for_fault, log_files, log_tail, signal,
    signal_if_alive, stop_process, wait_exit, wait_until,
};
use crate::{io_err, HarnessError, Result};

/// How long a start (including crash recovery) may take.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory holding `initdb` and `postgres`: `SPILLWAY_PG_BIN`, else `pg_config
/// --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn server_bindir() -> Result<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(dir) = std::env::var("SPILLWAY_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(HarnessError::NotInstalled {
                what: "PostgreSQL server binaries",
                hint: format!(
                    "SPILLWAY_PG_BIN={} has no initdb and postgres",
                    dir.display()
                ),
            })
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|d| has_server(d))
        .collect();
    candidates.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().ok_or_else(|| HarnessError::NotInstalled {
        what: "PostgreSQL server binaries (initdb, postgres)",
        hint: "install them with `apt-get install postgresql` (or run ci/test.sh, which does), \
               or point SPILLWAY_PG_BIN at the directory holding them"
            .into(),
    })
}

/// A private cluster in a temporary directory, listening on 127.0.0.1 on a free port.
/// Dropping it shuts the server down (immediately) and deletes the directory.
#[derive(Debug)]
pub struct LocalPostgres {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    settings: Vec<(String, String)>,
    run_as: Option<(Uid, Gid)>,
    child: Option<Child>,
    paused: Vec<i32>,
}

impl LocalPostgres {
    /// initdb and start with the default settings.
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// initdb and start, with extra `postgresql.conf` settings (`("max_connections", "50")`).
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Self> {
        let bin = server_bindir()?;
        let run_as = if Uid::effective().is_root() {
            let user = User::from_name("postgres").ok().flatten().ok_or_else(|| {
                HarnessError::NotInstalled {
                    what: "user `postgres`",
                    hint: "Postgres refuses to run as root; create the user with \
                           `useradd --system postgres` (ci/test.sh does)"
                        .into(),
                }
            })?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("spillway-pg-")
            .tempdir()
            .map_err(io_err("creating the cluster directory"))?;
        if let Some((uid, gid)) = run_as {
            nix::unistd::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| io_err("chown of the cluster directory")(e.into()))?;
        }
        let mut pg = LocalPostgres {
            dir,
            bin,
            port: free_port(),
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            run_as,
            child: None,
            paused: vec![],
        };
        pg.initdb()?;
        pg.spawn()?;
        Ok(pg)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd.env("LC_ALL", "C").current_dir(self.dir.path());
        cmd
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log file (stdout and stderr of the postmaster).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn initdb(&self) -> Result<()> {
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .output()
            .map_err(io_err("running initdb"))?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: "initdb".into(),
                detail: format!("{}\n{}", out.status, String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        let (log, log2) = log_files(&self.log_path(), "Postgres")?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            // Durability is what the tests check: never trade it for speed here.
            .args([
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
                "-c",
                "full_page_writes=on",
            ])
            .args(["-c", "max_connections=200"]);
        for (k, v) in &self.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io_err("starting postgres"))?;
        let pid_file = self.data_dir().join("postmaster.pid");
        let port = self.port;
        let ready = wait_until(&mut child, READY_TIMEOUT, || {
            // Line 8 of postmaster.pid is the server's status; "ready" once it takes queries.
            let status = std::fs::read_to_string(&pid_file).unwrap_or_default();
            status.lines().nth(7).map(str::trim) == Some("ready") && accepts(port)
        });
        if !ready {
            let _ = kill_and_reap(&mut child);
            return Err(HarnessError::NotReady {
                what: "postgres",
                secs: READY_TIMEOUT.as_secs(),
                log: log_tail(&self.log_path(), 20),
            });
        }
        self.child = Some(child);
        Ok(())
    }

    fn postmaster_pid(&self) -> Result<i32> {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .ok_or_else(|| HarnessError::Unsupported("postgres is not running".into()))
    }

    /// The postmaster's pid, if running.
    pub fn pid(&self) -> Option<i32> {
        self.postmaster_pid().ok()
    }

    /// SIGKILLs the postmaster and every backend and waits until none is left. Fails if the
    /// postmaster was not running to be killed or a signal could not be sent.
    fn kill_all(&mut self) -> Result<()> {
        self.resume_stopped()?;
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id() as i32;
        let backends = children_of(pid);
        let killed = kill_for_fault(&mut child, "the postmaster");
        for b in backends {
            signal_if_alive(b, Signal::SIGKILL)?;
        }
        // Backends exit at once on SIGKILL; wait until none holds the data directory.
        for _ in 0..250 {
            if children_of(pid).is_empty() && !backends_alive(&self.data_dir()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        killed.map(|_| ())
    }

    fn resume_stopped(&mut self) -> Result<()> {
        for pid in self.paused.drain(..).rev() {
            signal_if_alive(pid, Signal::SIGCONT)?;
        }
        Ok(())
    }
}

/// Whether any process still has `data_dir` as its working directory (a backend of a killed
/// postmaster that has not exited yet would block the restart).
fn backends_alive(data_dir: &Path) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .any(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd == data_dir))
}

impl PostgresServer for LocalPostgres {
    fn kind(&self) -> &'static str {
        "native"
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn kill(&mut self) -> Result<()> {
        self.postmaster_pid()?;
        self.kill_all()
    }

    fn crash_backend(&mut self, pid: i32) -> Result<()> {
        let postmaster = self.postmaster_pid()?;
        if !children_of(postmaster).contains(&pid) {
            return Err(HarnessError::Unsupported(format!(
                "pid {pid} is not a backend of this server (postmaster {postmaster})"
            )));
        }
        signal(pid, Signal::SIGKILL)
    }

    fn pause(&mut self) -> Result<()> {
        let postmaster = self.postmaster_pid()?;
        // The postmaster first, so it forks no new backend we would miss; it must show `T`.
        stop_process(postmaster)?;
        self.paused.push(postmaster);
        for pid in children_of(postmaster) {
            if signal_if_alive(pid, Signal::SIGSTOP)? {
                self.paused.push(pid);
            }
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        self.resume_stopped()
    }

    fn stop(&mut self) -> Result<()> {
        self.resume_stopped()?;
        if let Some(mut child) = self.child.take() {
            signal(child.id() as i32, Signal::SIGINT)?;
            let stopped = wait_exit(&mut child, Duration::from_secs(30));
            if !stopped {
                self.child = Some(child);
                self.kill_all()?;
            }
        }
        Ok(())
    }

    fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        // Cleanup: a server that already died is fine here.
        let _ = self.kill_all();
    }
}
