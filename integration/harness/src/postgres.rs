//! What every Postgres backend offers a test, and the client helpers that work on any of them.
//! The backends are [`native`](crate::native) and [`docker`](crate::docker); this module knows
//! neither.

use crate::Result;

/// A Postgres server a test controls. Implemented by [`LocalPostgres`](crate::LocalPostgres)
/// and [`ContainerPostgres`](crate::ContainerPostgres); tests see only this trait.
///
/// The control methods block for at most a few seconds (a start waits for recovery); call them
/// from `tokio::task::spawn_blocking` or a multi-threaded runtime when a pipeline runs beside.
pub trait PostgresServer: Send {
    /// Which backend: `native` or `docker`.
    fn kind(&self) -> &'static str;
    /// A `postgres://` URL for the `postgres` database as superuser `postgres` (trust
    /// authentication, on 127.0.0.1).
    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port())
    }
    /// The TCP port on 127.0.0.1.
    fn port(&self) -> u16;
    /// SIGKILLs the postmaster and every backend, like a machine losing power for Postgres
    /// (the data directory stays; [`PostgresServer::restart`] runs crash recovery).
    fn kill(&mut self) -> Result<()>;
    /// SIGKILLs one backend: Postgres then drops every connection and recovers by itself.
    fn crash_backend(&mut self, pid: i32) -> Result<()>;
    /// SIGSTOPs the server and every backend: connections hang, nothing answers.
    fn pause(&mut self) -> Result<()>;
    /// SIGCONTs everything [`PostgresServer::pause`] stopped.
    fn resume(&mut self) -> Result<()>;
    /// Fast shutdown (SIGINT), waiting for it to finish.
    fn stop(&mut self) -> Result<()>;
    /// Starts again on the same data and port (stopping first if it runs), and waits until
    /// it accepts connections.
    fn restart(&mut self) -> Result<()>;
}

/// Connects with tokio-postgres, driving the connection on a spawned task.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A COPY a backend is running, as `pg_stat_activity` and `pg_stat_progress_copy` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyInProgress {
    /// The backend's pid (the container's own pid on the docker backend).
    pub pid: i32,
    /// Bytes of COPY data the server has received so far.
    pub bytes: i64,
    /// The statement.
    pub query: String,
}

/// The COPYs running now, other than `client`'s own.
pub async fn copies_in_progress(client: &tokio_postgres::Client) -> Result<Vec<CopyInProgress>> {
    let rows = client
        .query(
            "SELECT a.pid, coalesce(p.bytes_processed, 0), a.query \
             FROM pg_stat_activity a LEFT JOIN pg_stat_progress_copy p USING (pid) \
             WHERE a.state = 'active' AND a.query ILIKE 'copy %' AND a.pid <> pg_backend_pid() \
             ORDER BY a.pid",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| CopyInProgress {
            pid: r.get(0),
            bytes: r.get(1),
            query: r.get(2),
        })
        .collect())
}

/// Pids of the backends that are running a COPY right now (to kill one mid-flush).
pub async fn copy_backends(url: &str) -> Result<Vec<i32>> {
    let client = connect(url).await?;
    Ok(copies_in_progress(&client)
        .await?
        .into_iter()
        .map(|c| c.pid)
        .collect())
}
