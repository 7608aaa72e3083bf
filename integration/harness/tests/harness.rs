//! The harness's controls, each proven on real processes with real clients.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::SinkExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use spillway_harness::postgres::{connect, copies_in_progress, copy_backends};
use spillway_harness::{FaultProxy, Faults, KafkaBroker, Mock, PostgresServer, Tansu};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

async fn count(url: &str) -> Result<i64> {
    let c = connect(url).await?;
    Ok(c.query_one("SELECT count(*) FROM t", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_postgres_refuses_connections_and_restarts_with_its_committed_data() -> Result<()>
{
    let mut pg = blocking(spillway_harness::postgres_from_env).await?;
    let url = pg.url();
    let c = connect(&url).await?;
    c.batch_execute("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000)")
        .await?;
    pg = blocking(move || pg.kill().map(|_| pg)).await?;
    ensure!(
        connect(&url).await.is_err(),
        "a killed server must refuse connections"
    );
    ensure!(
        c.simple_query("SELECT 1").await.is_err(),
        "an open connection must fail"
    );
    pg = blocking(move || pg.restart().map(|_| pg)).await?;
    assert_eq!(
        count(&url).await?,
        1000,
        "committed rows survive SIGKILL + crash recovery"
    );
    drop(pg);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_postgres_times_out_a_query_and_answers_after_resume() -> Result<()> {
    let mut pg = blocking(spillway_harness::postgres_from_env).await?;
    let c = connect(&pg.url()).await?;
    c.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await?;
    pg.pause()?;
    let query = c.query_one("SELECT count(*) FROM t", &[]);
    tokio::pin!(query);
    ensure!(
        tokio::time::timeout(Duration::from_millis(500), &mut query)
            .await
            .is_err(),
        "a paused server must not answer"
    );
    pg.resume()?;
    let row = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .context("no answer after resume")??;
    assert_eq!(row.get::<_, i64>(0), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_backend_mid_copy_drops_every_connection_and_postgres_recovers() -> Result<()> {
    let mut pg = blocking(spillway_harness::postgres_from_env).await?;
    let url = pg.url();
    let copier = connect(&url).await?;
    let bystander = connect(&url).await?;
    copier.batch_execute("CREATE TABLE t (x int)").await?;
    // A COPY that has started and not finished: the sink stays open.
    let sink = copier
        .copy_in::<_, bytes::Bytes>("COPY t FROM STDIN")
        .await?;
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n")).await?;
    let pids = copy_backends(&url).await?;
    assert_eq!(pids.len(), 1, "exactly one backend is in a COPY: {pids:?}");
    pg.crash_backend(pids[0])?;
    ensure!(sink.as_mut().finish().await.is_err(), "the COPY must fail");
    // Postgres restarts every backend after one crashes: the bystander's session is gone too.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bystander.simple_query("SELECT 1").await.is_ok() {
        ensure!(
            Instant::now() < deadline,
            "the bystander connection survived a backend crash"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Recovery ends by itself; then new connections work and the aborted COPY left nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match count(&url).await {
            Ok(n) => {
                assert_eq!(n, 0);
                break;
            }
            Err(e) => ensure!(Instant::now() < deadline, "no recovery after 30 s: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn producer(bootstrap: &str, extra: &[(&str, &str)]) -> Result<FutureProducer> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "10000");
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    Ok(cfg.create()?)
}

async fn produce<C: ClientContext + 'static>(
    p: &FutureProducer<C>,
    topic: &str,
    payload: &str,
) -> Result<(i32, i64), KafkaError> {
    p.send(
        FutureRecord::<(), _>::to(topic).payload(payload),
        Duration::from_secs(5),
    )
    .await
    .map(|d| (d.partition, d.offset))
    .map_err(|(e, _)| e)
}

fn group_consumer(bootstrap: &str, group: &str) -> Result<StreamConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_tansu_keeps_produced_messages_and_committed_group_offsets() -> Result<()> {
    let mut broker = blocking(Tansu::start).await?;
    let bootstrap = broker.bootstrap();
    broker.create_topic("kept", 1).await?;
    let p = producer(&bootstrap, &[("acks", "all")])?;
    for i in 0..10 {
        produce(&p, "kept", &format!("m{i}")).await?;
    }
    drop(p);
    let c = group_consumer(&bootstrap, "g")?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("kept", 0, Offset::Offset(4))?;
    c.assign(&tpl)?;
    c.commit(&tpl, CommitMode::Sync)?;
    drop(c);

    broker = blocking(move || broker.kill().map(|_| broker)).await?;
    ensure!(produce(
        &producer(&bootstrap, &[("message.timeout.ms", "1000")])?,
        "kept",
        "lost"
    )
    .await
    .is_err());
    broker = blocking(move || broker.restart().map(|_| broker)).await?;

    let c = group_consumer(&bootstrap, "g")?;
    let committed = c.committed_offsets(
        {
            let mut t = TopicPartitionList::new();
            t.add_partition("kept", 0);
            t
        },
        Duration::from_secs(10),
    )?;
    let offset = committed.find_partition("kept", 0).map(|e| e.offset());
    assert_eq!(
        offset,
        Some(Offset::Offset(4)),
        "the group's committed offset survives"
    );
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("kept", 0, Offset::Beginning)?;
    c.assign(&tpl)?;
    let mut seen = vec![];
    while seen.len() < 10 {
        let m = tokio::time::timeout(Duration::from_secs(20), c.recv())
            .await
            .context("messages missing after restart")??;
        seen.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
    }
    assert_eq!(seen, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
    drop(broker);
    Ok(())
}

/// The idempotent producer's id and epoch, from librdkafka's statistics.
#[derive(Clone, Default)]
struct ProducerIdentity(Arc<Mutex<Option<(i64, i64)>>>);

impl ProducerIdentity {
    fn get(&self) -> Option<(i64, i64)> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientContext for ProducerIdentity {
    fn stats(&self, statistics: Statistics) {
        if let Some(eos) = statistics.eos.filter(|e| e.producer_id >= 0) {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((eos.producer_id, eos.producer_epoch));
        }
    }
}

/// The broker as `ci/lib.sh` builds it (Tansu 0.6.0 with `ci/tansu/storage.patch`).
/// Fault: the broker frozen (SIGSTOP) until an idempotent producer's message times out, then
/// thawed. librdkafka then raises its epoch by itself (no request to the broker) and sends its
/// next batch with the new epoch at sequence 0.
/// Checks: the broker takes that producer's writes again under the same id with the higher
/// epoch, and still serves a new client. Unpatched, 0.6.0 panicked on that batch ("more or
/// less than one row") and from then on answered every request with `UnableToSend`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_serves_an_idempotent_producer_that_bumped_its_epoch() -> Result<()> {
    let broker = blocking(Tansu::start).await?;
    let bootstrap = broker.bootstrap();
    broker.create_topic("bump", 1).await?;
    let identity = ProducerIdentity::default();
    let p: FutureProducer<ProducerIdentity> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "1500")
        .set("statistics.interval.ms", "100")
        .create_with_context(identity.clone())?;
    produce(&p, "bump", "before").await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (id, epoch) = loop {
        if let Some(found) = identity.get() {
            break found;
        }
        ensure!(
            Instant::now() < deadline,
            "librdkafka reported no producer id in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    broker.pause()?;
    ensure!(
        produce(&p, "bump", "during").await.is_err(),
        "a frozen broker acknowledged a message"
    );
    broker.resume()?;
    // Each attempt times out after 1.5 s; the bump and the next write need a few round trips.
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = produce(&p, "bump", "after").await {
        ensure!(
            Instant::now() < deadline,
            "the thawed broker took none of the producer's writes for 20 s (last: {e}):\n{}",
            broker.log_tail(20)
        );
    }
    // librdkafka's statistics come every 100 ms: wait for one reporting the bump.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (after_id, after_epoch) = identity.get().context("no producer id after the bump")?;
        if after_id == id && after_epoch > epoch {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the producer went from id {id} epoch {epoch} to id {after_id} epoch {after_epoch}: \
             it did not bump its epoch, so this run did not exercise the fault"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh = producer(&bootstrap, &[("enable.idempotence", "true")])?;
    produce(&fresh, "bump", "fresh")
        .await
        .context("a new producer after the bump")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_cluster_injects_request_errors_and_broker_outages() -> Result<()> {
    let mut mock = Mock::start(1)?;
    mock.create_topic("t", 1).await?;
    let p = producer(
        &mock.bootstrap(),
        &[
            ("retries", "0"),
            ("message.timeout.ms", "3000"),
            ("reconnect.backoff.max.ms", "200"),
        ],
    )?;
    produce(&p, "t", "ok").await.context("first produce")?;
    mock.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS],
    );
    let err = produce(&p, "t", "rejected")
        .await
        .expect_err("an injected error must fail the delivery");
    ensure!(
        err.to_string().contains("replica"),
        "injected error not seen: {err}"
    );
    mock.kill()?;
    ensure!(
        produce(&p, "t", "down").await.is_err(),
        "a down broker must not acknowledge"
    );
    mock.restart()?;
    produce(&p, "t", "back").await.context("after broker_up")?;
    Ok(())
}

async fn proxied_postgres() -> Result<(Box<dyn PostgresServer>, FaultProxy, String)> {
    let pg = blocking(spillway_harness::postgres_from_env).await?;
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], pg.port())), 7).await?;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    connect(&url)
        .await?
        .batch_execute("CREATE TABLE t (x int)")
        .await?;
    Ok((pg, proxy, url))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_latency_and_bandwidth_slow_a_real_client_down() -> Result<()> {
    let (_pg, proxy, url) = proxied_postgres().await?;
    let c = connect(&url).await?;
    proxy.set(Faults {
        latency: Duration::from_millis(100),
        jitter: Duration::from_millis(20),
        ..Faults::default()
    });
    let t = Instant::now();
    c.simple_query("SELECT 1").await?;
    // One round trip crosses the proxy both ways.
    ensure!(
        t.elapsed() >= Duration::from_millis(200),
        "latency not applied: {:?}",
        t.elapsed()
    );
    proxy.set(Faults {
        bandwidth: Some(1 << 20),
        ..Faults::default()
    });
    let t = Instant::now();
    let rows = c
        .query(
            "SELECT repeat('x', 1000) FROM generate_series(1, 1000)",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), 1000);
    ensure!(
        t.elapsed() >= Duration::from_millis(800),
        "1 MB at 1 MB/s took {:?}",
        t.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_reset_refuse_and_blackhole_are_seen_by_a_real_client() -> Result<()> {
    let (_pg, proxy, url) = proxied_postgres().await?;
    let c = connect(&url).await?;
    proxy.reset_all();
    ensure!(
        c.simple_query("SELECT 1").await.is_err(),
        "a reset connection must fail"
    );
    proxy.set(Faults {
        refuse: true,
        ..Faults::default()
    });
    ensure!(
        connect(&url).await.is_err(),
        "new connections must be refused"
    );
    proxy.set(Faults {
        blackhole: true,
        ..Faults::default()
    });
    ensure!(
        tokio::time::timeout(Duration::from_millis(500), connect(&url))
            .await
            .is_err(),
        "a blackholed server must not answer"
    );
    proxy.heal();
    connect(&url).await?.simple_query("SELECT 1").await?;
    Ok(())
}

/// Dropped answers: the server runs what it is sent (the INSERT commits) but its answer never
/// arrives; the connection that lost it stays deaf once healed, a new one is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_drop_answers_lets_requests_through_and_loses_their_answers() -> Result<()> {
    let (pg, proxy, url) = proxied_postgres().await?;
    let c = connect(&url).await?;
    let observer = connect(&pg.url()).await?;
    let sent = proxy.bytes_towards_server();
    proxy.set(Faults {
        drop_answers_after_upstream_bytes: Some(0),
        ..Faults::default()
    });
    let insert = c.simple_query("INSERT INTO t VALUES (1)");
    tokio::pin!(insert);
    let rows = || async {
        let n: i64 = observer
            .query_one("SELECT count(*) FROM t", &[])
            .await?
            .get(0);
        anyhow::Ok(n)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows().await? == 0 {
        ensure!(
            Instant::now() < deadline,
            "the INSERT never reached the server"
        );
        ensure!(
            tokio::time::timeout(Duration::from_millis(10), insert.as_mut())
                .await
                .is_err(),
            "the INSERT was answered through a proxy that drops answers"
        );
    }
    ensure!(
        tokio::time::timeout(Duration::from_millis(300), insert.as_mut())
            .await
            .is_err(),
        "the committed INSERT's answer must be lost"
    );
    ensure!(
        proxy.bytes_towards_server() > sent && proxy.answer_bytes_dropped() > 0,
        "the request's bytes and the lost answer's must be counted"
    );
    proxy.heal();
    ensure!(
        tokio::time::timeout(Duration::from_millis(300), c.simple_query("SELECT 1"))
            .await
            .is_err(),
        "a connection that lost an answer must stay deaf once healed"
    );
    connect(&url).await?.simple_query("SELECT 1").await?;
    assert_eq!(
        rows().await?,
        1,
        "the INSERT whose answer was lost committed once"
    );
    Ok(())
}

/// Hold: a COPY stalls where it is (the server shows it in progress, its byte count still)
/// and, once released, finishes with every row: nothing was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_hold_stalls_a_copy_mid_stream_and_loses_nothing() -> Result<()> {
    let (pg, proxy, url) = proxied_postgres().await?;
    let c = connect(&url).await?;
    let observer = connect(&pg.url()).await?;
    let rows = |from: i32| -> bytes::Bytes {
        (from..from + 1000)
            .map(|i| format!("{i}\n"))
            .collect::<String>()
            .into()
    };
    let first = rows(0);
    let sink = c.copy_in::<_, bytes::Bytes>("COPY t FROM STDIN").await?;
    let mut sink = Box::pin(sink);
    sink.send(first.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !copies_in_progress(&observer)
        .await?
        .iter()
        .any(|c| c.bytes >= first.len() as i64)
    {
        ensure!(
            Instant::now() < deadline,
            "the server never received the first rows"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.set(Faults {
        hold: true,
        ..Faults::default()
    });
    sink.send(rows(1000)).await?;
    let before = copies_in_progress(&observer).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = copies_in_progress(&observer).await?;
    ensure!(
        before.len() == 1 && before == after && before[0].bytes == first.len() as i64,
        "a held COPY stays in progress where it was: {before:?} then {after:?}"
    );
    proxy.heal();
    sink.as_mut().finish().await?;
    assert_eq!(count(&url).await?, 2000, "every held byte arrived");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cut_after_n_bytes_aborts_a_copy_in_the_middle() -> Result<()> {
    let (_pg, proxy, url) = proxied_postgres().await?;
    let c = connect(&url).await?;
    proxy.set(Faults {
        cut_after_upstream_bytes: Some(64 * 1024),
        ..Faults::default()
    });
    let sink = c.copy_in::<_, bytes::Bytes>("COPY t FROM STDIN").await?;
    let mut sink = Box::pin(sink);
    let mut failed = false;
    for chunk in 0..100 {
        let data: String = (0..1000)
            .map(|i| format!("{}\n", chunk * 1000 + i))
            .collect();
        if sink.send(bytes::Bytes::from(data)).await.is_err() {
            failed = true;
            break;
        }
    }
    failed |= sink.as_mut().finish().await.is_err();
    ensure!(failed, "a COPY cut after 64 KiB must fail");
    proxy.heal();
    assert_eq!(count(&url).await?, 0, "a cut COPY commits nothing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_broker_acknowledges_nothing_until_healed() -> Result<()> {
    let proxy_port = spillway_harness::free_port();
    let broker = blocking(move || Tansu::start_advertising(Some(proxy_port))).await?;
    let upstream = SocketAddr::from(([127, 0, 0, 1], broker.port()));
    let proxy = FaultProxy::start_on(proxy_port, upstream, 3).await?;
    broker.create_topic("t", 1).await?;
    let p = producer(
        &broker.bootstrap(),
        &[("acks", "all"), ("message.timeout.ms", "2000")],
    )?;
    produce(&p, "t", "before").await?;
    proxy.set(Faults {
        blackhole: true,
        ..Faults::default()
    });
    ensure!(
        produce(&p, "t", "during").await.is_err(),
        "no ack may come through a blackhole"
    );
    proxy.heal();
    proxy.reset_all();
    produce(&p, "t", "after").await?;
    Ok(())
}
