//! `Idempotency-Key`: a client's retry never duplicates. The key travels in the request's
//! envelope (the consumer writes one key's records once); the producer refuses a malformed key
//! with 400, and a key it handed to Kafka with another body with 422, writing nothing either
//! way; the same key with the same body is produced again and answered as usual.

use super::*;

fn keyed<'a>(key: &'a str, content_type: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("content-type", content_type), ("idempotency-key", key)]
}

async fn post_keyed(
    http: &HttpClient,
    producer: &RunningProducer,
    headers: &[(&str, &str)],
    body: impl Into<hyper::Body>,
) -> Result<Answer> {
    Ok(http
        .send(hyper::Method::POST, &producer.store_url(), headers, body)
        .await?)
}

fn key_outcomes(metrics: &str) -> [Option<&str>; 4] {
    [
        metric(
            metrics,
            "spillway_producer_idempotency_keys_total{outcome=\"new\"}",
        ),
        metric(
            metrics,
            "spillway_producer_idempotency_keys_total{outcome=\"repeat\"}",
        ),
        metric(
            metrics,
            "spillway_producer_idempotency_keys_total{outcome=\"conflict\"}",
        ),
        metric(metrics, "spillway_producer_idempotency_keys_remembered"),
    ]
}

/// A keyed request's message carries the key in Kafka; the same key with the same body (also
/// gzipped: the body is compared after decompression) is accepted again, each time produced
/// and answered 200; the same key with another body is a 422 naming the header, and nothing of
/// it is written. The 200 echoes the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_key_and_body_is_accepted_and_another_body_is_refused() -> Result<()>
{
    let broker = tansu().await?;
    let producer = start(settings(&broker)).await?;
    let http = HttpClient::new();
    let key = "order-42 attempt \"1\" ~";
    let body = r#"[{"order": 42, "sku": "a"}, {"order": 42, "sku": "b"}]"#;

    let first = post_keyed(&http, &producer, &keyed(key, "application/json"), body).await?;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.json()["idempotency_key"], key, "{}", first.body);
    let bytes = acknowledged_message(&broker, &first).await?;
    let env = Envelope::decode(&bytes)?;
    assert_eq!(
        env.idempotency_key,
        Some(key),
        "the key travels in the envelope"
    );
    assert_eq!(env.records.len(), 2);

    // A retry: the same key and body, plain and then gzipped.
    let again = post_keyed(&http, &producer, &keyed(key, "application/json"), body).await?;
    assert_eq!(again.status, 200, "{}", again.body);
    let mut gz_headers = keyed(key, "application/json");
    gz_headers.push(("content-encoding", "gzip"));
    let gzipped = post_keyed(&http, &producer, &gz_headers, gzip(body.as_bytes())?).await?;
    assert_eq!(gzipped.status, 200, "{}", gzipped.body);
    for answer in [&again, &gzipped] {
        let env_bytes = acknowledged_message(&broker, answer).await?;
        let env = Envelope::decode(&env_bytes)?;
        assert_eq!(env.idempotency_key, Some(key));
        assert_eq!(
            env.records,
            vec![
                &br#"{"order": 42, "sku": "a"}"#[..],
                br#"{"order": 42, "sku": "b"}"#
            ]
        );
    }

    // The key reused for another body: refused, nothing written.
    let other = r#"[{"order": 43}]"#;
    let conflict = post_keyed(&http, &producer, &keyed(key, "application/json"), other).await?;
    assert_eq!(conflict.status, 422, "{}", conflict.body);
    let msg = conflict.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.starts_with(&format!(
            "Idempotency-Key {key:?} was used with a different body"
        )) && msg.contains("nothing was written")
            && msg.contains("a new request needs a new key"),
        "{msg}"
    );
    assert_eq!(conflict.json()["idempotency_key"], key);
    assert!(
        conflict.retry_after.is_none(),
        "a 422 is not to be retried as is"
    );
    // The body itself was fine: under a new key it is accepted.
    let fresh = post_keyed(
        &http,
        &producer,
        &keyed("order-43", "application/json"),
        other,
    )
    .await?;
    assert_eq!(fresh.status, 200, "{}", fresh.body);

    let bootstrap = broker.bootstrap();
    assert_eq!(
        blocking(move || message_count(&bootstrap, TOPIC)).await?,
        4,
        "three attempts of order-42 and order-43; nothing of the refused request"
    );
    let metrics = producer.metrics_text()?;
    assert_eq!(
        key_outcomes(&metrics),
        [Some("2"), Some("2"), Some("1"), Some("2")],
        "new, repeat, conflict, remembered"
    );
    assert_eq!(
        metric(&metrics, "spillway_producer_requests_total{status=\"422\"}"),
        Some("1")
    );
    producer.shutdown().await;
    Ok(())
}

/// A key the envelope cannot carry (empty, 256 characters, a tab, a byte that is not ASCII),
/// or the header given twice, is a 400 whose JSON error names the header and says what is
/// wrong, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_idempotency_key_gets_a_400_and_writes_nothing() -> Result<()> {
    let broker = tansu().await?;
    let producer = start(settings(&broker)).await?;
    let http = HttpClient::new();
    let too_long = "k".repeat(256);
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("empty", vec![""], "is 0 bytes long"),
        ("too long", vec![&too_long], "is 256 bytes long"),
        ("a tab", vec!["a\tb"], "holds byte 0x09 at position 1"),
        (
            "not ASCII",
            vec!["cl\u{e9}"],
            "holds byte 0xc3 at position 2",
        ),
        ("twice", vec!["a", "a"], "is given 2 times: send it once"),
        ("twice, differing", vec!["a", "b"], "is given 2 times"),
    ];
    for (name, values, needle) in &cases {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(values.iter().map(|v| ("idempotency-key", *v)));
        let a = post_keyed(&http, &producer, &headers, "{}").await?;
        assert_eq!(a.status, 400, "{name}: {}", a.body);
        let msg = a.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(
            msg.starts_with("Idempotency-Key ")
                && msg.contains(needle)
                && msg.ends_with("Nothing was written."),
            "{name}: {msg:?} lacks {needle:?}"
        );
    }
    let bootstrap = broker.bootstrap();
    assert_eq!(
        blocking(move || message_count(&bootstrap, TOPIC)).await?,
        0,
        "nothing was written"
    );
    let metrics = producer.metrics_text()?;
    assert_eq!(
        metric(&metrics, "spillway_producer_requests_total{status=\"400\"}"),
        Some(cases.len().to_string().as_str())
    );
    assert_eq!(
        key_outcomes(&metrics),
        [Some("0"), Some("0"), Some("0"), Some("0")],
        "a refused key is never remembered"
    );
    producer.shutdown().await;
    Ok(())
}

/// Fault: Kafka does not acknowledge the first attempt (503, the outcome unknown: it may be
/// stored). The key was remembered when its message was handed to Kafka, so the retry with
/// the same body is accepted, and a retry with another body is refused (422) although no
/// attempt was ever acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_503_the_same_body_is_accepted_and_another_is_refused() -> Result<()> {
    let (mock, producer) =
        mock_producer(None, |s| s.produce_timeout = Duration::from_millis(1500)).await?;
    let http = HttpClient::new();
    let headers = keyed("k-503", "application/json");
    mock.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 500],
    );
    let down = post_keyed(&http, &producer, &headers, r#"{"n": 1}"#).await?;
    assert_eq!(down.status, 503, "{}", down.body);
    assert!(down.retry_after.is_some(), "a 503 says when to retry");
    mock.cluster().clear_request_errors(RDKafkaApiKey::Produce);

    let other = post_keyed(&http, &producer, &headers, r#"{"n": 2}"#).await?;
    assert_eq!(other.status, 422, "{}", other.body);
    let retry = post_keyed(&http, &producer, &headers, r#"{"n": 1}"#).await?;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.json()["idempotency_key"], "k-503");
    assert_eq!(
        key_outcomes(&producer.metrics_text()?),
        [Some("1"), Some("1"), Some("1"), Some("1")]
    );
    drop(mock);
    producer.shutdown().await;
    Ok(())
}

/// The memory is bounded (`max_idempotency_keys`): past it the oldest key is forgotten, and
/// then another body is accepted for it (the consumer's guard still holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_the_oldest_key_is_forgotten() -> Result<()> {
    let (mock, producer) = mock_producer(None, |s| s.max_idempotency_keys = 2).await?;
    let http = HttpClient::new();
    for key in ["a", "b", "c"] {
        let a = post_keyed(&http, &producer, &keyed(key, "application/json"), "{}").await?;
        assert_eq!(a.status, 200, "{key}: {}", a.body);
    }
    let b = post_keyed(&http, &producer, &keyed("b", "application/json"), "[1]").await?;
    assert_eq!(b.status, 422, "`b` is remembered: {}", b.body);
    let a = post_keyed(&http, &producer, &keyed("a", "application/json"), "[1]").await?;
    assert_eq!(a.status, 200, "`a` was forgotten for `c`: {}", a.body);
    assert_eq!(
        key_outcomes(&producer.metrics_text()?)[3],
        Some("2"),
        "remembered"
    );
    drop(mock);
    producer.shutdown().await;
    Ok(())
}
