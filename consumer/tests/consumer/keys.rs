//! Idempotency keys on a real Postgres and broker: a request sent again with its key (a
//! client's retry) is written once, whatever the partitions, batches and crashes in between;
//! keys past their retention are deleted.

use super::*;

/// One keyed request per `(key, records)`; the Kafka key is random, so a request and its
/// retry may land in different partitions, as the producer's would.
async fn produce_keyed(bootstrap: &str, requests: &[(Option<String>, Vec<String>)]) -> Result<()> {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let mut pending = vec![];
    for (n, (key, records)) in requests.iter().enumerate() {
        let env = Envelope {
            received_at_micros: 1_764_000_000_000_000 + n as i64,
            request_id: RequestId::from_u128(fastrand_key() as u128),
            sequenced: false,
            idempotency_key: key.as_deref(),
            source: None,
            records: records.iter().map(|r| r.as_bytes()).collect(),
        };
        let payload = env.encode();
        let kafka_key = fastrand_key().to_string();
        let fut = p
            .send_result(FutureRecord::to(TOPIC).key(&kafka_key).payload(&payload))
            .map_err(|(e, _)| e)?;
        pending.push(fut);
    }
    for f in pending {
        f.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Request `n`: key `req-n` (or none), records `5n..5n+5`; in request 7, record 36 is one
/// Postgres refuses (a NUL character), so it is a dead letter.
fn request(n: u64, keyed: bool) -> (Option<String>, Vec<String>) {
    let records = (5 * n..5 * n + 5)
        .map(|id| match id {
            36 => format!(r#"{{"id": {id}, "bad": "\u0000"}}"#),
            _ => format!(r#"{{"id": {id}}}"#),
        })
        .collect();
    (keyed.then(|| format!("req-{n}")), records)
}

/// Fault: the consumer process (command line, three records per batch, so each five-record
/// request spans batches) SIGKILLs itself between the Postgres and the Kafka commit of its
/// second batch; then every request is sent again with the same key and body (a client's
/// retry after an unclear answer), landing in either partition, with 20 new keyed requests
/// and 10 unkeyed requests each sent twice; a new consumer reads everything. Invariant: each
/// keyed request's records are written exactly once (the dead letter of request 7 once too),
/// whichever of its copies came first; an unkeyed request sent twice is written twice (the
/// key is what tells a retry); the skipped count is exactly the retries' records. Kafka keys
/// are random: the partitions differ from run to run, the invariant does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_again_with_its_key_is_written_once_across_a_crash() -> Result<()> {
    let s = stack(2).await?;
    let first: Vec<_> = (0..100).map(|n| request(n, true)).collect();
    produce_keyed(&s.broker.bootstrap(), &first).await?;
    killed_between_the_commits(&s, &["--batch-max-records", "3"]).await?;
    let c = connect(&s.pg.url()).await?;
    let partial: i64 = c
        .query_one("SELECT count(*) FROM records", &[])
        .await?
        .get(0);
    ensure!(
        partial > 0 && partial < 499,
        "the crash should leave a partial table, got {partial}"
    );

    let mut again = first.clone();
    again.extend((100..120).map(|n| request(n, true)));
    let unkeyed: Vec<_> = (120..130).map(|n| request(n, false)).collect();
    again.extend(unkeyed.iter().cloned());
    again.extend(unkeyed);
    produce_keyed(&s.broker.bootstrap(), &again).await?;
    let mut cfg = settings(&s.broker.bootstrap(), &s.pg.url());
    cfg.batcher.size.max_records = 3;
    cfg.batcher.size.initial_records = 3;
    cfg.batcher.size.min_records = 1;
    let consumer = start(cfg).await?;
    upsert::wait_positions(&s.pg.url(), 100 + 140).await?;

    let counts: BTreeMap<i64, i64> = c
        .query(
            "SELECT (data->>'id')::bigint, count(*) FROM records GROUP BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let wrong: Vec<(u64, i64)> = (0..650)
        .filter(|id| *id != 36)
        .map(|id| {
            let want = if id >= 600 { 2 } else { 1 };
            (id, counts.get(&(id as i64)).copied().unwrap_or(0) - want)
        })
        .filter(|(_, off)| *off != 0)
        .take(20)
        .collect();
    ensure!(
        wrong.is_empty(),
        "(id, copies more than wanted), first 20: {wrong:?}"
    );
    ensure!(counts.len() == 649, "{} ids in records", counts.len());
    let dead: i64 = c
        .query_one("SELECT count(*) FROM records_dead_letters", &[])
        .await?
        .get(0);
    ensure!(
        dead == 1,
        "request 7's bad record is one dead letter: {dead}"
    );
    let keys: i64 = c
        .query_one("SELECT count(*) FROM records_request_keys", &[])
        .await?
        .get(0);
    ensure!(keys == 120, "one key per keyed request: {keys}");
    let skipped = metric(
        &consumer,
        "spillway_consumer_repeated_records_skipped_total",
    )?;
    ensure!(
        skipped == 500.0,
        "the retries' 100 × 5 records were skipped, counted {skipped}"
    );
    stop(consumer).await
}

/// Fault: none; time passes. Keys first seen 3 days ago and an hour ago sit in the table of a
/// consumer keeping keys a day, deleting every 200 ms. Invariant: the old keys are deleted
/// (more than one batch of them) and counted, the recent one stays, and a request sent again
/// with a deleted key is written again (past the retention, a retry is a new request). No
/// randomness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_past_their_retention_are_deleted_in_batches() -> Result<()> {
    let s = stack(1).await?;
    let mut cfg = settings(&s.broker.bootstrap(), &s.pg.url());
    cfg.key_retention = Duration::from_secs(24 * 3600);
    cfg.key_expiry_every = Duration::from_millis(200);
    // The first consumer only creates the schema.
    stop(start(cfg.clone()).await?).await?;
    let c = connect(&s.pg.url()).await?;
    const OLD: i64 = 2500;
    c.execute(
        "INSERT INTO records_request_keys (key, topic, kafka_partition, kafka_offset, first_seen)
         SELECT 'old-' || g, 'events', 0, 1000000 + g, now() - interval '3 days'
         FROM generate_series(1, $1::bigint) g
         UNION ALL SELECT 'req-0', 'events', 0, 999999, now() - interval '3 days'
         UNION ALL SELECT 'recent', 'events', 0, 999998, now() - interval '1 hour'",
        &[&OLD],
    )
    .await?;
    let consumer = start(cfg).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = c
            .query_one("SELECT count(*) FROM records_request_keys", &[])
            .await?
            .get(0);
        if left == 1 {
            break;
        }
        ensure!(Instant::now() < deadline, "{left} keys left after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept: String = c
        .query_one("SELECT key FROM records_request_keys", &[])
        .await?
        .get(0);
    ensure!(kept == "recent", "kept {kept}");
    let expired = metric(&consumer, "spillway_consumer_request_keys_expired_total")?;
    ensure!(expired == (OLD + 1) as f64, "counted {expired} deleted");
    // req-0 was deleted: its request is written as new.
    produce_keyed(&s.broker.bootstrap(), &[request(0, true)]).await?;
    wait_rows(&s.pg.url(), 5, Duration::from_secs(60)).await?;
    stop(consumer).await
}
