//! A TCP proxy with faults that switch at run time, after Toxiproxy's toxics: latency with
//! jitter, a bandwidth limit, a blackhole, holding every byte until released (a COPY frozen
//! in the middle, nothing lost), resetting every open connection, refusing new ones, cutting a
//! connection after N bytes towards the server (a COPY cut in the middle), and losing the
//! server's answers while its requests still arrive.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The faults in force. `Faults::default()` is a clean pass-through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Added to every chunk, each way.
    pub latency: Duration,
    /// A uniform random extra delay in `[0, jitter]` per chunk (seeded).
    pub jitter: Duration,
    /// Bytes per second, each way, per connection.
    pub bandwidth: Option<u64>,
    /// Accept and read, but forward nothing either way: the peer hangs.
    pub blackhole: bool,
    /// Forward nothing either way, but keep what was read and forward it, in order, once this
    /// is lifted: a stream stalls mid-message (a COPY that cannot finish) and loses nothing.
    pub hold: bool,
    /// Close new connections at once with a reset.
    pub refuse: bool,
    /// Forward this many client-to-server bytes per connection, then reset both sides.
    pub cut_after_upstream_bytes: Option<u64>,
    /// Forward every client-to-server byte, but once a connection has forwarded this many,
    /// read and discard every server-to-client byte of it: requests reach the server and take
    /// effect, their answers never arrive. `Some(0)` loses every answer; a larger number lets
    /// a new connection's handshake through and loses the answers to what follows. A
    /// connection that lost an answer loses every later one too, also once this is lifted (a
    /// stream cut in the middle of a frame cannot resume): only a new connection is answered
    /// again.
    pub drop_answers_after_upstream_bytes: Option<u64>,
}

struct Shared {
    faults: Mutex<Faults>,
    /// Woken at every change of `faults`, for connections waiting on a `hold`.
    changed: tokio::sync::Notify,
    rng: Mutex<fastrand::Rng>,
    connections: Mutex<HashMap<u64, JoinHandle<()>>>,
    /// Each open connection's local port towards the server (what the server sees as the
    /// client's port).
    upstream_ports: Mutex<HashMap<u64, u16>>,
    /// Chunks read and waiting for a `hold` to be lifted.
    held: AtomicUsize,
    /// The first bytes of each held client-to-server chunk, by a number of its own.
    held_heads: Mutex<HashMap<u64, Vec<u8>>>,
    /// Client-to-server bytes forwarded.
    towards_server: AtomicU64,
    /// Server-to-client bytes discarded by `drop_answers_after_upstream_bytes`.
    answers_dropped: AtomicU64,
    next_id: AtomicU64,
    accepted: AtomicU64,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running proxy on 127.0.0.1. Dropping it closes the listener and every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("faults", &self.faults())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`. `seed` drives jitter.
    pub async fn start(upstream: SocketAddr, seed: u64) -> std::io::Result<Self> {
        Self::start_on(0, upstream, seed).await
    }

    /// Like [`FaultProxy::start`], on a chosen port of 127.0.0.1 (0 for any).
    pub async fn start_on(port: u16, upstream: SocketAddr, seed: u64) -> std::io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            changed: tokio::sync::Notify::new(),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            connections: Mutex::new(HashMap::new()),
            upstream_ports: Mutex::new(HashMap::new()),
            held: AtomicUsize::new(0),
            held_heads: Mutex::new(HashMap::new()),
            towards_server: AtomicU64::new(0),
            answers_dropped: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let acceptor = tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Ok(FaultProxy {
            addr,
            upstream,
            shared,
            acceptor,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        locked(&self.shared.faults).clone()
    }

    /// Replaces the faults; open connections see the change on their next chunk.
    pub fn set(&self, faults: Faults) {
        *locked(&self.shared.faults) = faults;
        self.shared.changed.notify_waiters();
    }

    /// Removes every fault.
    pub fn heal(&self) {
        self.set(Faults::default());
    }

    /// Resets every open connection now (both sides see a connection reset).
    pub fn reset_all(&self) {
        for (id, task) in locked(&self.shared.connections).drain() {
            task.abort();
            locked(&self.shared.upstream_ports).remove(&id);
        }
    }

    /// Connections open through the proxy.
    pub fn open_connections(&self) -> usize {
        let mut conns = locked(&self.shared.connections);
        conns.retain(|_, t| !t.is_finished());
        conns.len()
    }

    /// Chunks the proxy has read and is holding now (see [`Faults::hold`]): a message a peer
    /// sent that has not reached the other side.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::Relaxed)
    }

    /// The first bytes (at most [`HELD_HEAD`]) of each client-to-server chunk held now: which
    /// messages a hold caught, for example a PostgreSQL client's `START TRANSACTION` rather
    /// than a query of its own.
    pub fn held_towards_server(&self) -> Vec<Vec<u8>> {
        locked(&self.shared.held_heads).values().cloned().collect()
    }

    /// The local ports of the open connections towards the server: the client ports the
    /// server sees (`pg_stat_activity.client_port`), to tell this proxy's clients apart.
    pub fn upstream_ports(&self) -> Vec<u16> {
        locked(&self.shared.upstream_ports)
            .values()
            .copied()
            .collect()
    }

    /// Client-to-server bytes forwarded since start: what the server was sent, for example
    /// while its answers were dropped.
    pub fn bytes_towards_server(&self) -> u64 {
        self.shared.towards_server.load(Ordering::Relaxed)
    }

    /// Server-to-client bytes discarded since start (see
    /// [`Faults::drop_answers_after_upstream_bytes`]): answers
    /// the server sent that never reached their client.
    pub fn answer_bytes_dropped(&self) -> u64 {
        self.shared.answers_dropped.load(Ordering::Relaxed)
    }

    /// Connections accepted since start (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.reset_all();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        // Closing with SO_LINGER 0 sends a reset, as a crashed peer or a firewall would.
        let _ = client.set_zero_linger();
        if locked(&shared.faults).refuse {
            drop(client);
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let conn_shared = shared.clone();
        let task = tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(upstream).await {
                if let Ok(local) = server.local_addr() {
                    locked(&conn_shared.upstream_ports).insert(id, local.port());
                }
                let _ = server.set_zero_linger();
                let _ = server.set_nodelay(true);
                let _ = client.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                // Client-to-server bytes forwarded on this connection, read by both directions.
                let sent = Arc::new(AtomicU64::new(0));
                let up = pump(cr, sw, conn_shared.clone(), sent.clone(), true);
                let down = pump(sr, cw, conn_shared.clone(), sent, false);
                // A cut or reset in one direction ends both.
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            }
            locked(&conn_shared.upstream_ports).remove(&id);
            locked(&conn_shared.connections).remove(&id);
        });
        locked(&shared.connections).insert(id, task);
    }
}

/// Copies one direction, applying the faults to each chunk. Returns when either side closes
/// or the connection is cut.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    sent: Arc<AtomicU64>,
    upstream: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    // Set once this direction (towards the client) discarded an answer: see
    // `drop_answers_after_upstream_bytes`.
    let mut lost_an_answer = false;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                // Half-close: keep the other direction until it ends too.
                std::future::pending::<()>().await;
                return;
            }
            Ok(n) => n,
        };
        let faults = locked(&shared.faults).clone();
        if faults.blackhole {
            continue;
        }
        let deaf = faults
            .drop_answers_after_upstream_bytes
            .is_some_and(|after| sent.load(Ordering::Relaxed) >= after);
        if !upstream && (deaf || lost_an_answer) {
            lost_an_answer = true;
            shared
                .answers_dropped
                .fetch_add(n as u64, Ordering::Relaxed);
            continue;
        }
        let mut chunk = &buf[..n];
        let mut cut = false;
        if upstream {
            if let Some(limit) = faults.cut_after_upstream_bytes {
                let room = limit.saturating_sub(sent.load(Ordering::Relaxed)) as usize;
                if chunk.len() >= room {
                    chunk = &chunk[..room];
                    cut = true;
                }
            }
        }
        let mut delay = faults.latency;
        if !faults.jitter.is_zero() {
            let nanos = faults.jitter.as_nanos() as u64;
            delay += Duration::from_nanos(locked(&shared.rng).u64(0..=nanos));
        }
        if let Some(rate) = faults.bandwidth.filter(|r| *r > 0) {
            delay += Duration::from_secs_f64(chunk.len() as f64 / rate as f64);
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        released(&shared, upstream.then_some(chunk)).await;
        if to.write_all(chunk).await.is_err() {
            return;
        }
        if upstream {
            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            shared
                .towards_server
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        if cut {
            return;
        }
    }
}

/// How many leading bytes of a held client-to-server chunk
/// [`FaultProxy::held_towards_server`] shows.
pub const HELD_HEAD: usize = 64;

/// Returns once no `hold` is in force (at once if none is), counting the chunk as held
/// meanwhile (and keeping its head when it goes towards the server).
async fn released(shared: &Shared, towards_server: Option<&[u8]>) {
    if !locked(&shared.faults).hold {
        return;
    }
    shared.held.fetch_add(1, Ordering::Relaxed);
    let head = towards_server.map(|chunk| {
        let key = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let head = chunk[..chunk.len().min(HELD_HEAD)].to_vec();
        locked(&shared.held_heads).insert(key, head);
        key
    });
    let _counted = HeldChunk(shared, head);
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        // Registered before the check, so a change between the check and the wait wakes us.
        changed.as_mut().enable();
        if !locked(&shared.faults).hold {
            return;
        }
        changed.await;
    }
}

/// Uncounts a held chunk (and forgets its head) when its wait ends, also when the connection
/// is reset meanwhile.
struct HeldChunk<'a>(&'a Shared, Option<u64>);

impl Drop for HeldChunk<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.1 {
            locked(&self.0.held_heads).remove(&key);
        }
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}
