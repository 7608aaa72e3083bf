//! The container backend: Postgres in a Docker container, through testcontainers.
//!
//! The container shares the host's network (no bridge, no private addresses): Postgres listens
//! on 127.0.0.1 on a free port, like [`LocalPostgres`](crate::LocalPostgres). Its data lives
//! in the container, so a stop and start keeps it. The image must follow the official
//! `postgres` image's interface: an entrypoint that initialises `$PGDATA` when it is empty and
//! runs the command as the `postgres` user (`ci/lib.sh` builds such an image locally, with
//! debootstrap, as `spillway-postgres:15`).
//!
//! `SPILLWAY_DOCKER_PG_IMAGE` picks the image (`name:tag`, default `spillway-postgres:15`);
//! with a registry, `postgres:15` (the official image) works the same way.
//! `SPILLWAY_DOCKER_PG_CMD` replaces the command's start (default `postgres`).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use testcontainers::core::{CmdWaitFor, ExecCommand, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

use crate::postgres::{connect, PostgresServer};
use crate::process::free_port;
use crate::{HarnessError, Result};

/// The image used unless `SPILLWAY_DOCKER_PG_IMAGE` says otherwise.
pub const DEFAULT_IMAGE: &str = "spillway-postgres:15";

/// How long a start (including crash recovery) may take.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A runtime of its own for the Docker API calls, so the blocking [`PostgresServer`] methods
/// work from any thread, inside a test's runtime or not.
fn runtime() -> Result<Arc<tokio::runtime::Runtime>> {
    static RT: OnceLock<Arc<tokio::runtime::Runtime>> = OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt.clone());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("spillway-docker")
        .enable_all()
        .build()
        .map_err(crate::io_err("starting the Docker client's runtime"))?;
    Ok(RT.get_or_init(|| Arc::new(rt)).clone())
}

/// Runs `fut` to completion on the Docker runtime, from a thread of its own.
fn run<T: Send>(fut: impl std::future::Future<Output = T> + Send) -> Result<T> {
    let rt = runtime()?;
    std::thread::scope(|s| {
        s.spawn(move || rt.block_on(fut))
            .join()
            .map_err(|_| HarnessError::Unsupported("a Docker API call panicked".into()))
    })
}

fn docker_err(what: &str) -> impl FnOnce(testcontainers::TestcontainersError) -> HarnessError + '_ {
    move |e| HarnessError::Command {
        command: format!("docker: {what}"),
        detail: format!(
            "{e}. Is dockerd running (ci/test.sh starts it) and the image built? \
             See SPILLWAY_DOCKER_PG_IMAGE."
        ),
    }
}

/// Postgres in a container on the host's network.
pub struct ContainerPostgres {
    container: Option<ContainerAsync<GenericImage>>,
    image: String,
    port: u16,
    paused: bool,
}

impl std::fmt::Debug for ContainerPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerPostgres")
            .field("image", &self.image)
            .field("port", &self.port)
            .field("id", &self.container.as_ref().map(|c| c.id().to_string()))
            .finish()
    }
}

impl ContainerPostgres {
    /// Starts a container from `SPILLWAY_DOCKER_PG_IMAGE` (or [`DEFAULT_IMAGE`]) and waits
    /// until Postgres takes queries.
    pub fn start() -> Result<Self> {
        let image =
            std::env::var("SPILLWAY_DOCKER_PG_IMAGE").unwrap_or_else(|_| DEFAULT_IMAGE.into());
        Self::start_image(&image)
    }

    /// Starts a container from `image` (`name:tag`). Its command is `SPILLWAY_DOCKER_PG_CMD`
    /// (words split on spaces; default `postgres`), followed by the harness's settings: the
    /// port, 127.0.0.1 only, and fsync on.
    pub fn start_image(image: &str) -> Result<Self> {
        let (name, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
        let port = free_port();
        let command = std::env::var("SPILLWAY_DOCKER_PG_CMD").unwrap_or_else(|_| "postgres".into());
        let mut cmd: Vec<String> = command.split_whitespace().map(str::to_string).collect();
        // Durability is what the tests check: fsync stays on (the testcontainers Postgres
        // module turns it off).
        for setting in [
            "listen_addresses=127.0.0.1",
            &format!("port={port}"),
            "fsync=on",
            "synchronous_commit=on",
            "full_page_writes=on",
            "max_connections=200",
        ] {
            cmd.push("-c".into());
            cmd.push(setting.to_string());
        }
        let request = GenericImage::new(name, tag)
            .with_wait_for(WaitFor::Nothing)
            .with_network("host")
            .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
            .with_env_var("POSTGRES_INITDB_ARGS", "--no-sync")
            .with_cmd(cmd);
        let container = run(async move { request.start().await })?.map_err(docker_err("start"))?;
        let pg = ContainerPostgres {
            container: Some(container),
            image: image.to_string(),
            port,
            paused: false,
        };
        pg.wait_ready()?;
        Ok(pg)
    }

    fn container(&self) -> Result<&ContainerAsync<GenericImage>> {
        self.container
            .as_ref()
            .ok_or_else(|| HarnessError::Unsupported("the container is gone".into()))
    }

    /// The container's id.
    pub fn id(&self) -> Option<String> {
        self.container.as_ref().map(|c| c.id().to_string())
    }

    /// Polls with a query until Postgres answers (all in one call on the Docker runtime).
    fn wait_ready(&self) -> Result<()> {
        let url = self.url();
        let ready = run(async move {
            let deadline = Instant::now() + READY_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(c) = connect(&url).await {
                    if c.simple_query("SELECT 1").await.is_ok() {
                        return true;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        })?;
        if ready {
            return Ok(());
        }
        Err(HarnessError::NotReady {
            what: "postgres (container)",
            secs: READY_TIMEOUT.as_secs(),
            log: format!("docker logs {}", self.id().unwrap_or_default()),
        })
    }

    fn exec(&self, cmd: &[&str]) -> Result<()> {
        let c = self.container()?;
        // Wait for the command to finish, with success.
        let cmd = ExecCommand::new(cmd.iter().map(|s| s.to_string()))
            .with_cmd_ready_condition(CmdWaitFor::exit_code(0));
        run(async move { c.exec(cmd).await.map(|_| ()) })?.map_err(docker_err("exec"))
    }

    fn unpause_if_paused(&mut self) -> Result<()> {
        if self.paused {
            let c = self.container()?;
            run(async move { c.unpause().await })?.map_err(docker_err("unpause"))?;
            self.paused = false;
        }
        Ok(())
    }
}

impl PostgresServer for ContainerPostgres {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn port(&self) -> u16 {
        self.port
    }

    /// Docker's stop with a zero timeout: SIGKILL at once (testcontainers has no kill with a
    /// chosen signal). The container's data stays.
    fn kill(&mut self) -> Result<()> {
        self.unpause_if_paused()?;
        let c = self.container()?;
        run(async move { c.stop_with_timeout(Some(0)).await })?.map_err(docker_err("kill"))
    }

    fn crash_backend(&mut self, pid: i32) -> Result<()> {
        // Backend pids from pg_stat_activity are the container's own.
        self.exec(&["sh", "-c", &format!("kill -9 {pid}")])
    }

    fn pause(&mut self) -> Result<()> {
        let c = self.container()?;
        run(async move { c.pause().await })?.map_err(docker_err("pause"))?;
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        self.unpause_if_paused()
    }

    /// A stop with 30 s of grace (the image's stop signal: SIGINT, a fast shutdown).
    fn stop(&mut self) -> Result<()> {
        self.unpause_if_paused()?;
        let c = self.container()?;
        run(async move { c.stop_with_timeout(Some(30)).await })?.map_err(docker_err("stop"))
    }

    fn restart(&mut self) -> Result<()> {
        let c = self.container()?;
        let running = run(async move { c.is_running().await })?.map_err(docker_err("inspect"))?;
        if running {
            self.stop()?;
        }
        let c = self.container()?;
        run(async move { c.start().await })?.map_err(docker_err("start"))?;
        self.wait_ready()
    }
}

impl Drop for ContainerPostgres {
    fn drop(&mut self) {
        if let Some(c) = self.container.take() {
            if self.paused {
                let _ = run(async { c.unpause().await });
            }
            let _ = run(async move { c.rm().await });
        }
    }
}
