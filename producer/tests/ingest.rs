//! The producer against a real broker (Tansu), and the mock cluster where a fault must be
//! injected: a 2xx always means the request is readable from Kafka.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use spillway_core::{Envelope, ProducerSequence, RequestId};
use spillway_harness::http::{Answer, HttpClient};
use spillway_harness::kafka::{message_count, read_all, watermarks};
use spillway_harness::{KafkaBroker, Mock, Tansu};
use spillway_producer::{start, RunningProducer, Settings, StartError};

#[path = "ingest/idempotency.rs"]
mod idempotency;

const TOPIC: &str = "ingest";

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

fn settings(broker: &dyn KafkaBroker) -> Settings {
    let mut s = Settings::new(broker.bootstrap(), TOPIC);
    s.listen = "127.0.0.1:0".parse().unwrap();
    s.produce_timeout = Duration::from_millis(2000);
    s
}

async fn tansu() -> Result<Tansu> {
    let broker = blocking(Tansu::start).await?;
    broker.create_topic(TOPIC, 2).await?;
    Ok(broker)
}

fn coordinates(answer: &Answer) -> Result<(i32, i64)> {
    let j = answer.json();
    Ok((
        j["partition"].as_i64().context("partition")? as i32,
        j["offset"].as_i64().context("offset")?,
    ))
}

/// The envelope a 200 points at, read back from Kafka.
async fn acknowledged_message(broker: &dyn KafkaBroker, answer: &Answer) -> Result<Vec<u8>> {
    let at = coordinates(answer)?;
    let bootstrap = broker.bootstrap();
    let mut all = blocking(move || read_all(&bootstrap, TOPIC, Duration::from_secs(30))).await?;
    all.remove(&at)
        .with_context(|| format!("acknowledged message {at:?} is not in Kafka"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_means_the_request_is_one_envelope_readable_from_kafka() -> Result<()> {
    let broker = tansu().await?;
    let producer = start(settings(&broker)).await?;
    let http = HttpClient::new();
    let body = r#"[{"id": 1, "v": "a"}, {"id":2}, [3]]"#;
    let a = http
        .post(&producer.store_url(), "application/json", body)
        .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["records"], 3);
    let bytes = acknowledged_message(&broker, &a).await?;
    let env = Envelope::decode(&bytes)?;
    let records: Vec<&str> = env
        .records
        .iter()
        .map(|r| std::str::from_utf8(r).unwrap())
        .collect();
    assert_eq!(
        records,
        vec![r#"{"id": 1, "v": "a"}"#, r#"{"id":2}"#, "[3]"],
        "records travel byte for byte"
    );
    assert_eq!(
        env.request_id.to_string(),
        a.json()["request_id"].as_str().unwrap()
    );

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"{\"n\":1}\n{\"n\":2}\n")?;
    let a = http
        .send(
            hyper::Method::PUT,
            &producer.store_url(),
            &[
                ("content-type", "application/x-ndjson"),
                ("content-encoding", "gzip"),
            ],
            gz.finish()?,
        )
        .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    let bytes = acknowledged_message(&broker, &a).await?;
    assert_eq!(
        Envelope::decode(&bytes)?.records,
        vec![&b"{\"n\":1}"[..], b"{\"n\":2}"]
    );
    producer.shutdown().await;
    Ok(())
}

/// The producer and sequence an answer's `request_id` names.
fn producer_sequence(answer: &Answer) -> Result<ProducerSequence> {
    let id = answer.json()["request_id"]
        .as_str()
        .context("request_id")?
        .to_string();
    Ok(RequestId::from_u128(u128::from_str_radix(&id, 16)?).producer_sequence())
}

/// Requests sent by many connections at once: every message carries the producer client's id
/// and a sequence number of its own, and within each partition the sequences rise with the
/// offsets (what lets the consumer tell a second copy of a message from a new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_is_numbered_and_the_numbers_rise_in_each_partition() -> Result<()> {
    let broker = tansu().await?;
    let producer = start(settings(&broker)).await?;
    let url = producer.store_url();
    let senders: Vec<_> = (0..8)
        .map(|t| {
            let url = url.clone();
            tokio::spawn(async move {
                let http = HttpClient::new();
                let mut answers = Vec::new();
                for n in 0..25 {
                    let body = format!(r#"{{"t": {t}, "n": {n}}}"#);
                    answers.push(http.post(&url, "application/json", body).await?);
                }
                anyhow::Ok(answers)
            })
        })
        .collect();
    let mut answered = BTreeMap::new();
    for s in senders {
        for a in s.await?? {
            ensure!(a.status == 200, "{}", a.body);
            answered.insert(coordinates(&a)?, producer_sequence(&a)?);
        }
    }
    let bootstrap = broker.bootstrap();
    let all = blocking(move || read_all(&bootstrap, TOPIC, Duration::from_secs(30))).await?;
    ensure!(
        all.len() == 200,
        "{} messages in Kafka, 200 sent",
        all.len()
    );
    let mut last: BTreeMap<i32, u64> = BTreeMap::new();
    let mut producers = std::collections::BTreeSet::new();
    for ((partition, offset), bytes) in &all {
        let at = Envelope::decode(bytes)?
            .producer_sequence()
            .context("a message without a sequenced id")?;
        ensure!(
            answered.get(&(*partition, *offset)) == Some(&at),
            "the answer for {partition}/{offset} named another id than the message carries"
        );
        if let Some(before) = last.insert(*partition, at.sequence) {
            ensure!(
                at.sequence > before,
                "partition {partition}: sequence {} at offset {offset} after {before}",
                at.sequence
            );
        }
        producers.insert(at.producer);
    }
    ensure!(producers.len() == 1, "one client, ids {producers:?}");
    ensure!(last.len() == 2, "both partitions written: {last:?}");
    producer.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_writes_nothing() -> Result<()> {
    let broker = tansu().await?;
    let mut s = settings(&broker);
    s.max_body_bytes = 64 * 1024;
    let producer = start(s).await?;
    let http = HttpClient::new();
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb.write_all(&vec![b' '; 32 << 20])?;
    let bomb = bomb.finish()?;
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed",
            "application/json",
            None,
            br#"{"a": }"#.to_vec(),
            400,
            "malformed JSON at line 1, column 7",
        ),
        (
            "not utf-8",
            "application/json",
            None,
            b"{\"a\": \"\xc3\x28\"}".to_vec(),
            400,
            "not UTF-8",
        ),
        ("empty", "application/json", None, vec![], 400, "empty"),
        (
            "bare value",
            "application/json",
            None,
            b"17".to_vec(),
            400,
            "bare value",
        ),
        (
            "bad ndjson line",
            "application/x-ndjson",
            None,
            b"{}\nnope\n".to_vec(),
            400,
            "line 2",
        ),
        (
            "too large",
            "application/json",
            None,
            format!("[\"{}\"]", "x".repeat(70_000)).into_bytes(),
            413,
            "larger than 65536",
        ),
        (
            "gzip bomb",
            "application/json",
            Some("gzip"),
            bomb,
            413,
            "decompresses to more than 65536",
        ),
        (
            "wrong type",
            "text/plain",
            None,
            b"{}".to_vec(),
            415,
            "not accepted",
        ),
        (
            "wrong encoding",
            "application/json",
            Some("br"),
            b"{}".to_vec(),
            415,
            "Content-Encoding",
        ),
    ];
    for (name, ct, enc, body, status, needle) in cases {
        let mut headers = vec![("content-type", ct)];
        if let Some(e) = enc {
            headers.push(("content-encoding", e));
        }
        let a = http
            .send(hyper::Method::POST, &producer.store_url(), &headers, body)
            .await?;
        assert_eq!(a.status, status, "{name}: {}", a.body);
        let msg = a.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}");
    }
    let bootstrap = broker.bootstrap();
    assert_eq!(
        blocking(move || message_count(&bootstrap, TOPIC)).await?,
        0,
        "nothing was written"
    );
    let metrics = producer.metrics_text().unwrap();
    assert!(
        metrics.contains("spillway_producer_requests_total{status=\"400\"} 5"),
        "{metrics}"
    );
    producer.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_killed_no_2xx_is_given_for_what_is_not_in_kafka() -> Result<()> {
    let mut broker = tansu().await?;
    let producer = start(settings(&broker)).await?;
    let http = HttpClient::new();
    let url = producer.store_url();
    // Traffic before, during and after the outage: 3 senders, 40 requests each.
    let senders: Vec<_> = (0..3)
        .map(|s| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let mut answers = vec![];
                for i in 0..40 {
                    let body = format!(r#"{{"sender":{s},"i":{i}}}"#);
                    let a = http.post(&url, "application/json", body.clone()).await;
                    answers.push((body, a));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker = blocking(move || broker.kill().map(|_| broker)).await?;
    let started = Instant::now();
    let down = http.post(&url, "application/json", "{}").await?;
    assert_eq!(down.status, 503, "{}", down.body);
    assert!(down.retry_after.is_some(), "a 503 says when to retry");
    assert!(
        started.elapsed() < Duration::from_millis(2000 + 3000),
        "503 within the produce deadline"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker = blocking(move || broker.restart().map(|_| broker)).await?;
    // Every answer first, then Kafka: a request 200'd after the restart is in Kafka too.
    let mut answers = vec![];
    for s in senders {
        answers.extend(s.await?);
    }
    let bootstrap = broker.bootstrap();
    let in_kafka = blocking(move || read_all(&bootstrap, TOPIC, Duration::from_secs(30))).await?;
    let mut acked = 0;
    for (body, a) in answers {
        let a = a?;
        assert!(
            a.status == 200 || a.status == 503,
            "unexpected {}: {}",
            a.status,
            a.body
        );
        if a.status == 200 {
            acked += 1;
            let at = coordinates(&a)?;
            let bytes = in_kafka
                .get(&at)
                .with_context(|| format!("200'd request {at:?} is not in Kafka"))?;
            assert_eq!(
                Envelope::decode(bytes)?.records,
                vec![body.as_bytes()],
                "the 200'd record is in Kafka"
            );
        }
    }
    ensure!(
        acked > 0,
        "some requests should have been acknowledged outside the outage"
    );
    producer.shutdown().await;
    Ok(())
}

async fn mock_producer(
    rtt: Option<Duration>,
    tweak: impl FnOnce(&mut Settings),
) -> Result<(Mock, RunningProducer)> {
    let mock = Mock::start(1)?;
    mock.create_topic(TOPIC, 1).await?;
    if let Some(rtt) = rtt {
        mock.cluster().broker_round_trip_time(1, rtt)?;
    }
    let mut s = settings(&mock);
    tweak(&mut s);
    let producer = start(s).await?;
    Ok((mock, producer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_broker_errors_give_503_never_2xx() -> Result<()> {
    let (mock, producer) =
        mock_producer(None, |s| s.produce_timeout = Duration::from_millis(1500)).await?;
    let http = HttpClient::new();
    mock.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 500],
    );
    let a = http
        .post(&producer.store_url(), "application/json", "{}")
        .await?;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("not acknowledged"),
        "{}",
        a.body
    );
    mock.cluster().clear_request_errors(RDKafkaApiKey::Produce);
    let a = http
        .post(&producer.store_url(), "application/json", "{}")
        .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    producer.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_in_flight_limit_is_shed_with_429_at_once() -> Result<()> {
    let (_mock, producer) = mock_producer(Some(Duration::from_millis(300)), |s| {
        s.max_in_flight_requests = 4
    })
    .await?;
    let http = HttpClient::new();
    let burst: Vec<_> = (0..40)
        .map(|i| {
            let (http, url) = (http.clone(), producer.store_url());
            tokio::spawn(async move {
                http.post(&url, "application/json", format!("{{\"i\":{i}}}"))
                    .await
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for b in burst {
        let a = b.await??;
        match a.status {
            200 => ok += 1,
            429 => {
                shed += 1;
                assert_eq!(a.retry_after.as_deref(), Some("1"));
            }
            other => panic!("unexpected {other}: {}", a.body),
        }
    }
    ensure!(ok >= 4 && shed > 0, "{ok} accepted, {shed} shed");
    producer.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_every_in_flight_request_and_loses_none() -> Result<()> {
    let (mock, producer) = mock_producer(Some(Duration::from_millis(400)), |_| {}).await?;
    let http = HttpClient::new();
    let url = producer.store_url();
    let inflight: Vec<_> = (0..10)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                http.post(&url, "application/json", format!("{{\"i\":{i}}}"))
                    .await
            })
        })
        .collect();
    // Wait (on the producer's own gauge) until all ten are being handled.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !producer
        .metrics_text()
        .unwrap()
        .contains("spillway_producer_in_flight_requests 10")
    {
        ensure!(Instant::now() < deadline, "requests never got in flight");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    producer.shutdown().await;
    for r in inflight {
        let a = r.await??;
        assert_eq!(
            a.status, 200,
            "an in-flight request is finished, not dropped: {}",
            a.body
        );
        acknowledged_message(&mock, &a).await?;
    }
    ensure!(
        HttpClient::new()
            .post(&url, "application/json", "{}")
            .await
            .is_err(),
        "no longer accepting"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_required_when_configured() -> Result<()> {
    let (_mock, producer) = mock_producer(None, |s| {
        s.auth_tokens = vec!["s3cret".into(), "other".into()]
    })
    .await?;
    let http = HttpClient::new();
    let url = producer.store_url();
    let none = http.post(&url, "application/json", "{}").await?;
    assert_eq!(
        (none.status, none.www_authenticate.as_deref()),
        (401, Some("Bearer"))
    );
    let wrong = http
        .send(
            hyper::Method::POST,
            &url,
            &[
                ("content-type", "application/json"),
                ("authorization", "Bearer s3cre"),
            ],
            "{}",
        )
        .await?;
    assert_eq!(wrong.status, 401);
    let right = http
        .send(
            hyper::Method::POST,
            &url,
            &[
                ("content-type", "application/json"),
                ("authorization", "Bearer other"),
            ],
            "{}",
        )
        .await?;
    assert_eq!(right.status, 200, "{}", right.body);
    producer.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_a_missing_topic_and_a_body_limit_the_broker_cannot_take() -> Result<()> {
    let broker = tansu().await?;
    let mut s = settings(&broker);
    s.topic = "no-such-topic".into();
    let err = start(s)
        .await
        .expect_err("a missing topic must stop start-up");
    assert!(matches!(err, StartError::NoTopic { .. }), "{err}");
    let mut s = settings(&broker);
    s.max_body_bytes = 4 << 20;
    let err = start(s)
        .await
        .expect_err("a body limit over the message size must stop start-up");
    assert!(err.to_string().contains("max-body-bytes"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_endpoints() -> Result<()> {
    let (mock, producer) = mock_producer(None, |_| {}).await?;
    let http = HttpClient::new();
    let base = format!("http://{}", producer.addr());
    assert_eq!(http.get(&format!("{base}/healthz")).await?.status, 200);
    assert_eq!(http.get(&format!("{base}/readyz")).await?.status, 200);
    http.post(&producer.store_url(), "application/json", "[1,2]")
        .await?;
    let m = http.get(&format!("{base}/metrics")).await?.body;
    for needle in [
        "spillway_producer_requests_total{status=\"200\"} 1",
        "spillway_producer_records_accepted_total 2",
        "spillway_producer_produce_latency_seconds_count 1",
        "spillway_producer_kafka_queue_depth 0",
    ] {
        assert!(m.contains(needle), "{needle} missing from\n{m}");
    }
    drop(mock);
    producer.shutdown().await;
    Ok(())
}

/// Fault: the broker answers produce requests with errors that leave an idempotent client
/// unable to write again (a desynchronised sequence: Tansu does this after a reset connection).
/// Invariant: those requests get 503, the producer replaces its Kafka client, and later
/// requests are acknowledged again, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_the_broker_no_longer_accepts_is_replaced() -> Result<()> {
    let (mock, producer) =
        mock_producer(None, |s| s.produce_timeout = Duration::from_millis(2500)).await?;
    let http = HttpClient::new();
    let a = http
        .post(&producer.store_url(), "application/json", "{}")
        .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    let first_client = producer_sequence(&a)?.producer;
    mock.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER; 3],
    );
    // Each new client's first write meets one of the injected errors: three replacements.
    let mut answers = vec![];
    loop {
        let a = http
            .post(&producer.store_url(), "application/json", "{}")
            .await?;
        answers.push(a.status);
        if a.status == 200 {
            // A new client numbers its messages afresh, under an id of its own.
            let last_client = producer_sequence(&a)?.producer;
            assert_ne!(
                first_client, last_client,
                "the replaced client's id was kept"
            );
            break;
        }
        assert_eq!(a.status, 503, "{}", a.body);
        assert!(answers.len() < 40, "never acknowledged again: {answers:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let resets = producer
        .metrics_text()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("spillway_producer_kafka_client_resets_total "))
        .map(str::to_string);
    assert_eq!(resets.as_deref(), Some("3"), "answers: {answers:?}");
    producer.shutdown().await;
    Ok(())
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data)?;
    Ok(gz.finish()?)
}

fn metric<'a>(metrics: &'a str, name: &str) -> Option<&'a str> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
}

/// A record nested 100,000 arrays deep once got a 200 (it could only be dead-lettered later).
/// Every body kind is checked against --max-depth (default 128) before it is parsed, and the
/// 400 names the record and the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_nested_deeper_than_max_depth_get_a_400_naming_the_record() -> Result<()> {
    let broker = tansu().await?;
    let producer = start(settings(&broker)).await?;
    let http = HttpClient::new();
    let over = nested_arrays(129);
    let very_deep = nested_arrays(100_000);
    let objects = format!("{}1{}", "{\"a\":".repeat(129), "}".repeat(129));
    let ndjson = format!("{{\"id\":1}}\n{{\"id\":2}}\n{very_deep}\n{{\"id\":4}}\n");
    type Case<'a> = (&'a str, &'a str, bool, Vec<u8>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "array of records, the third too deep",
            "application/json",
            false,
            format!("[{{\"id\":1}}, 2, {over}]").into_bytes(),
            "record 2 is nested more than 128 levels deep",
        ),
        (
            "one record of nested objects",
            "application/json",
            false,
            objects.into_bytes(),
            "record 0 is nested more than 128 levels deep",
        ),
        (
            "100,000 nested arrays",
            "application/json",
            false,
            very_deep.clone().into_bytes(),
            "record 0 is nested more than 128 levels deep",
        ),
        (
            "ndjson",
            "application/x-ndjson",
            false,
            ndjson.clone().into_bytes(),
            "record 2 is nested more than 128 levels deep",
        ),
        (
            "gzipped ndjson",
            "application/x-ndjson",
            true,
            gzip(ndjson.as_bytes())?,
            "record 2 is nested more than 128 levels deep",
        ),
    ];
    for (name, ct, gzipped, body, needle) in cases {
        let mut headers = vec![("content-type", ct)];
        if gzipped {
            headers.push(("content-encoding", "gzip"));
        }
        let a = http
            .send(hyper::Method::POST, &producer.store_url(), &headers, body)
            .await?;
        assert_eq!(a.status, 400, "{name}: {}", a.body);
        let msg = a.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}");
        assert!(
            msg.contains("--max-depth") && msg.contains("Nothing was written"),
            "{name}: {msg}"
        );
    }
    // Exactly at the limit is accepted, byte for byte.
    let at_limit = nested_arrays(128);
    let a = http
        .post(
            &producer.store_url(),
            "application/json",
            format!("[{at_limit}]"),
        )
        .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    let env_bytes = acknowledged_message(&broker, &a).await?;
    assert_eq!(
        Envelope::decode(&env_bytes)?.records,
        vec![at_limit.as_bytes()]
    );
    let bootstrap = broker.bootstrap();
    assert_eq!(
        blocking(move || message_count(&bootstrap, TOPIC)).await?,
        1,
        "only the request at the limit was written"
    );
    assert_eq!(
        metric(
            &producer.metrics_text()?,
            "spillway_producer_requests_total{status=\"400\"}"
        ),
        Some("5")
    );
    producer.shutdown().await;
    Ok(())
}

/// Sends `head` then the whole `body`, and only then reads the answer, as a client that does
/// not read while it writes.
fn write_everything_then_read(
    addr: std::net::SocketAddr,
    head: &str,
    body: &[u8],
) -> Result<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(head.as_bytes())
        .context("writing the request head")?;
    s.write_all(body)
        .context("writing the whole body before reading")?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).context("reading the answer")?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn status_and_json(answer: &str) -> (String, serde_json::Value) {
    let status = answer.lines().next().unwrap_or_default().to_string();
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or_default())
}

/// A 20 MB body declared over the cap once got a broken pipe: the producer answered and closed
/// while the client was still writing. A client that writes everything before reading now
/// gets the 413 and its JSON error, with a Content-Length and chunked, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_writes_its_whole_body_before_reading_gets_the_413() -> Result<()> {
    let broker = tansu().await?;
    let producer = start(settings(&broker)).await?;
    let addr = producer.addr();
    let size = 20 << 20;
    let head = format!(
        "POST /store HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {size}\r\nconnection: close\r\n\r\n"
    );
    let answer =
        blocking(move || write_everything_then_read(addr, &head, &vec![b' '; size])).await?;
    let (status, body) = status_and_json(&answer);
    assert!(status.starts_with("HTTP/1.1 413"), "{answer:.300}");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("larger than 921600 bytes") && msg.contains("Nothing was written"),
        "{answer:.300}"
    );

    let head = format!(
        "POST /store HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    let mut chunked = Vec::new();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 1 << 20).as_bytes());
        chunked.extend(std::iter::repeat_n(b' ', 1 << 20));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = blocking(move || write_everything_then_read(addr, &head, &chunked)).await?;
    let (status, body) = status_and_json(&answer);
    assert!(status.starts_with("HTTP/1.1 413"), "{answer:.300}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("larger than 921600 bytes"),
        "{answer:.300}"
    );

    let bootstrap = broker.bootstrap();
    assert_eq!(
        blocking(move || message_count(&bootstrap, TOPIC)).await?,
        0,
        "nothing was written"
    );
    assert_eq!(
        metric(
            &producer.metrics_text()?,
            "spillway_producer_requests_total{status=\"413\"}"
        ),
        Some("2")
    );
    producer.shutdown().await;
    Ok(())
}

const USER_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["id"],
  "properties": {
    "id": {"type": "integer"},
    "user": {"type": "object", "properties": {"name": {"type": "string"}}}
  }
}"#;

fn schema_file(dir: &tempfile::TempDir, name: &str, text: &str) -> Result<std::path::PathBuf> {
    let path = dir.path().join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// (record, instance path, schema path) of each listed error, in order.
fn listed_errors(answer: &Answer) -> Vec<(u64, String, String)> {
    answer.json()["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    assert!(
                        !e["reason"].as_str().unwrap_or_default().is_empty(),
                        "every error has a reason: {e}"
                    );
                    (
                        e["record"].as_u64().unwrap_or(u64::MAX),
                        e["instance_path"].as_str().unwrap_or("?").to_string(),
                        e["schema_path"].as_str().unwrap_or("?").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// With --schema, a request with any record that does not match gets 422 listing each error's
/// record, path, schema path and reason, and nothing of it reaches Kafka; matching records are
/// written byte for byte, as without a schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_schema_a_record_that_does_not_match_gets_a_422_and_nothing_is_written() -> Result<()>
{
    let broker = tansu().await?;
    let dir = tempfile::tempdir()?;
    let mut s = settings(&broker);
    s.schema = Some(schema_file(&dir, "user.json", USER_SCHEMA)?);
    let producer = start(s).await?;
    let http = HttpClient::new();
    let url = producer.store_url();

    let a = http
        .post(
            &url,
            "application/json",
            r#"[{"id": 1, "user": {"name": "a"}}, {"id": "two", "user": {"name": 3}}, {"user": {}}]"#,
        )
        .await?;
    assert_eq!(a.status, 422, "{}", a.body);
    let mut errors = listed_errors(&a);
    errors.sort();
    let want = |r: u64, i: &str, s: &str| (r, i.to_string(), s.to_string());
    assert_eq!(
        errors,
        vec![
            want(1, "/id", "/properties/id/type"),
            want(1, "/user/name", "/properties/user/properties/name/type"),
            want(2, "", "/required"),
        ],
        "{}",
        a.body
    );
    assert_eq!(a.json()["failing_records"], 2);
    let msg = a.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.contains("2 of the 3 records do not match") && msg.contains("nothing was written"),
        "{msg}"
    );
    assert!(
        a.body.contains("is not of type") && a.body.contains("required"),
        "reasons: {}",
        a.body
    );

    let ndjson = gzip(b"{\"id\": 1}\n{\"id\": 2.5}\n")?;
    let a = http
        .send(
            hyper::Method::POST,
            &url,
            &[
                ("content-type", "application/x-ndjson"),
                ("content-encoding", "gzip"),
            ],
            ndjson,
        )
        .await?;
    assert_eq!(a.status, 422, "{}", a.body);
    assert_eq!(
        listed_errors(&a),
        vec![want(1, "/id", "/properties/id/type")]
    );

    let many = format!("[{}]", [r#"{"id": "x"}"#; 12].join(","));
    let a = http.post(&url, "application/json", many).await?;
    assert_eq!(a.status, 422, "{}", a.body);
    assert_eq!(listed_errors(&a).len(), 10, "the list is capped");
    assert_eq!(
        (&a.json()["failing_records"], &a.json()["errors_truncated"]),
        (&serde_json::json!(12), &serde_json::json!(true))
    );

    // Depth is checked before a tree is built: deep records get the 400, not a parse error.
    let over = format!("{{\"id\": 5, \"deep\": {}}}", nested_arrays(128));
    let a = http.post(&url, "application/json", over).await?;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body.contains("record 0 is nested more than 128"),
        "{}",
        a.body
    );
    let a = http
        .post(&url, "application/json", nested_arrays(100_000))
        .await?;
    assert_eq!(a.status, 400, "{}", a.body);

    let bootstrap = broker.bootstrap();
    assert_eq!(
        blocking(move || message_count(&bootstrap, TOPIC)).await?,
        0,
        "no refused request reached Kafka"
    );

    // Matching records, one of them exactly at the depth limit (past serde_json's own 127).
    let at_limit = format!("{{\"id\": 4, \"deep\": {}}}", nested_arrays(127));
    let body = format!("[{{\"id\": 1, \"user\": {{\"name\": \"a\"}}}}, {at_limit}]");
    let a = http.post(&url, "application/json", body).await?;
    assert_eq!(a.status, 200, "{}", a.body);
    let env_bytes = acknowledged_message(&broker, &a).await?;
    assert_eq!(
        Envelope::decode(&env_bytes)?.records,
        vec![
            &br#"{"id": 1, "user": {"name": "a"}}"#[..],
            at_limit.as_bytes()
        ]
    );
    let metrics = producer.metrics_text()?;
    assert_eq!(
        metric(&metrics, "spillway_producer_requests_total{status=\"422\"}"),
        Some("3"),
        "{metrics}"
    );
    producer.shutdown().await;
    Ok(())
}

/// A --schema that cannot be used stops start-up with a message naming the file and the fix,
/// before any connection is opened (the brokers here do not exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_file_that_cannot_be_used_stops_start_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        (
            dir.path().join("missing.json"),
            128,
            "cannot read the schema file",
        ),
        (
            schema_file(&dir, "not-json.json", "{\"type\": ")?,
            128,
            "is not JSON",
        ),
        (
            schema_file(&dir, "bad-type.json", r#"{"type": 12}"#)?,
            128,
            "is not a valid JSON Schema",
        ),
        (
            schema_file(
                &dir,
                "remote-ref.json",
                r#"{"$ref": "https://schemas.invalid/record.json"}"#,
            )?,
            128,
            "is not a valid JSON Schema",
        ),
        (
            schema_file(&dir, "fine.json", USER_SCHEMA)?,
            500,
            "invalid setting `max-depth`",
        ),
    ];
    for (path, max_depth, needle) in cases {
        let mut s = Settings::new("127.0.0.1:9", TOPIC);
        s.listen = "127.0.0.1:0".parse()?;
        s.schema = Some(path.clone());
        s.max_depth = max_depth;
        let err = start(s)
            .await
            .expect_err("an unusable schema must stop start-up");
        let msg = err.to_string();
        assert!(msg.contains(needle), "{}: {msg}", path.display());
        if max_depth == 128 {
            assert!(
                matches!(err, StartError::Schema(_)) && msg.contains(&*path.to_string_lossy()),
                "{msg}"
            );
        }
    }
    Ok(())
}

/// A message read back from Kafka: its key, if any, and its payload (the envelope).
type KeyedMessage = (Option<Vec<u8>>, Vec<u8>);

/// Every message of `topic` by (partition, offset), with its key, read by a plain consumer
/// from each partition's start to its end.
fn read_with_keys(bootstrap: &str, topic: &str) -> Result<BTreeMap<(i32, i64), KeyedMessage>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let mut ends = BTreeMap::new();
    let mut from = TopicPartitionList::new();
    for (partition, (low, high)) in watermarks(bootstrap, topic)? {
        if high > low {
            ends.insert(partition, high);
            from.add_partition_offset(topic, partition, Offset::Offset(low))?;
        }
    }
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "spillway-producer-test-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.assign(&from)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = BTreeMap::new();
    while !ends.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "partitions {ends:?} of {topic} not read to their end within 30 s"
        );
        // Connection errors are events, not the end: librdkafka keeps reconnecting.
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let (key, payload) = (m.key().map(<[u8]>::to_vec), m.payload().unwrap_or_default());
            out.insert((m.partition(), m.offset()), (key, payload.to_vec()));
            if ends.get(&m.partition()) == Some(&(m.offset() + 1)) {
                ends.remove(&m.partition());
            }
        }
    }
    Ok(out)
}

/// CRC-32 (IEEE), the hash of librdkafka's `consistent_random` partitioner.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Writing by key (`--upsert-key`) needs every request of a key in one partition, in order.
/// Requests with one `X-Spillway-Key`, sent to two producers in turn (as behind a load
/// balancer), all land in one partition of a 4-partition topic at rising offsets, and each
/// message carries the key; a request without the header still has no key. The partition is
/// the key's CRC-32 modulo 4 (`consistent_random`, which the producer pins so that a key's
/// partition never moves with a librdkafka upgrade); these keys use all four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_one_x_spillway_key_share_a_partition_in_order_and_carry_the_key(
) -> Result<()> {
    const KEYED: &str = "keyed";
    let broker = blocking(Tansu::start).await?;
    broker.create_topic(KEYED, 4).await?;
    let on_keyed = || {
        let mut s = settings(&broker);
        s.topic = KEYED.into();
        s
    };
    let producers = [start(on_keyed()).await?, start(on_keyed()).await?];
    let http = HttpClient::new();
    let longest = "k".repeat(255);
    let keys = [
        "user-7",
        "user-8",
        "order 2024/42 ~!\"",
        longest.as_str(),
        "x",
    ];
    // What each 200 pointed at: the key sent (if any) and the one record.
    let mut sent: Vec<((i32, i64), Option<&str>, String)> = Vec::new();
    for round in 0..4 {
        for key in keys.iter().map(Some).chain([None]) {
            for producer in &producers {
                let record = serde_json::json!({ "key": key, "round": round }).to_string();
                let mut headers = vec![("content-type", "application/json")];
                headers.extend(key.map(|k| ("x-spillway-key", *k)));
                let a = http
                    .send(
                        hyper::Method::POST,
                        &producer.store_url(),
                        &headers,
                        record.clone(),
                    )
                    .await?;
                assert_eq!(a.status, 200, "key {key:?}: {}", a.body);
                sent.push((coordinates(&a)?, key.copied(), record));
            }
        }
    }
    for producer in producers {
        producer.shutdown().await;
    }

    let bootstrap = broker.bootstrap();
    let in_kafka = blocking(move || read_with_keys(&bootstrap, KEYED)).await?;
    assert_eq!(in_kafka.len(), sent.len(), "one message per request");
    let mut placed: BTreeMap<&str, Vec<(i32, i64)>> = BTreeMap::new();
    for (at, key, record) in &sent {
        let (got_key, payload) = in_kafka
            .get(at)
            .with_context(|| format!("acknowledged message {at:?} is not in Kafka"))?;
        assert_eq!(
            got_key.as_deref(),
            key.map(str::as_bytes),
            "the message at {at:?} carries the request's key, or none without the header"
        );
        assert_eq!(Envelope::decode(payload)?.records, vec![record.as_bytes()]);
        if let Some(key) = key {
            placed.entry(key).or_default().push(*at);
        }
    }
    for (key, ats) in &placed {
        let partition = (crc32(key.as_bytes()) % 4) as i32;
        assert!(
            ats.iter().all(|(p, _)| *p == partition),
            "key {key:?} belongs in partition {partition} but landed at {ats:?}"
        );
        assert!(
            ats.windows(2).all(|w| w[0].1 < w[1].1),
            "key {key:?}: offsets not in the order the requests were sent: {ats:?}"
        );
    }
    Ok(())
}

/// A malformed `X-Spillway-Key` is a 400 whose JSON error names the header and says what a key
/// may be, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_x_spillway_key_gets_a_400_and_writes_nothing() -> Result<()> {
    let broker = tansu().await?;
    let producer = start(settings(&broker)).await?;
    let http = HttpClient::new();
    let too_long = "k".repeat(256);
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("empty", vec![""], "is empty"),
        // HTTP drops a value's leading and trailing spaces: nothing is left.
        ("only spaces", vec!["   "], "is empty"),
        (
            "too long",
            vec![&too_long],
            "is 256 bytes, more than 255, the limit",
        ),
        (
            "not ASCII",
            vec!["cl\u{e9}"],
            "not printable ASCII: byte 0xc3 at offset 2",
        ),
        (
            "a tab",
            vec!["a\tb"],
            "not printable ASCII: byte 0x09 at offset 1",
        ),
        ("twice", vec!["a", "a"], "is given 2 times: send it once"),
        ("twice, differing", vec!["a", "b"], "is given 2 times"),
    ];
    for (name, values, needle) in &cases {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(values.iter().map(|v| ("x-spillway-key", *v)));
        let a = http
            .send(hyper::Method::POST, &producer.store_url(), &headers, "{}")
            .await?;
        assert_eq!(a.status, 400, "{name}: {}", a.body);
        let body = a.json();
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}");
        assert!(
            msg.starts_with("X-Spillway-Key ")
                && msg.ends_with(
                    "send 1 to 255 bytes of printable ASCII (space to `~`). Nothing was written."
                ),
            "{name}: {msg:?}"
        );
        assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{name}: {body}");
    }
    // Other control characters never reach the producer: HTTP itself refuses them (a bare
    // 400 from the HTTP server, without the JSON).
    let addr = producer.addr();
    let head = format!(
        "POST /store HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         x-spillway-key: a\x01b\r\ncontent-length: 2\r\nconnection: close\r\n\r\n"
    );
    let answer = blocking(move || write_everything_then_read(addr, &head, b"{}")).await?;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:.300}");

    let bootstrap = broker.bootstrap();
    assert_eq!(
        blocking(move || message_count(&bootstrap, TOPIC)).await?,
        0,
        "nothing was written"
    );
    assert_eq!(
        metric(
            &producer.metrics_text()?,
            "spillway_producer_requests_total{status=\"400\"}"
        ),
        Some(cases.len().to_string().as_str())
    );
    producer.shutdown().await;
    Ok(())
}
