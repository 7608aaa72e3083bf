//! HTTP to Kafka-acknowledged records per second through the producer, 1 and 10 records per
//! request, 64, 400 and 2,000 requests outstanding, against Tansu (when installed), the fast
//! broker (when built: `ci/fast-broker.sh`) and the mock cluster; beside it the ceiling: a
//! plain rdkafka producer sending the same envelopes straight to the broker (no HTTP), same
//! settings, as many outstanding. `compare-baseline` measures the same beside the original.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::stream::{self, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use spillway_benches::{print_ratios, record};
use spillway_core::{Envelope, RequestId};
use spillway_harness::http::HttpClient;
use spillway_harness::{kafka, KafkaBroker, Mock, Tansu};

/// Requests per iteration: at least five rounds of the outstanding ones.
fn requests(concurrency: usize) -> u64 {
    (concurrency as u64 * 5).max(2_000)
}
/// Requests outstanding at once: 64 (the ids without a suffix, as before), then what many
/// clients bring.
const CONCURRENCY: [usize; 3] = [64, 400, 2_000];
const GROUP: &str = "producer";

fn bodies(per: usize, n: u64) -> Vec<String> {
    (0..n)
        .map(|r| {
            let recs: Vec<String> = (0..per as u64)
                .map(|i| String::from_utf8_lossy(&record(r * 100 + i)).into_owned())
                .collect();
            format!("[{}]", recs.join(","))
        })
        .collect()
}

fn envelopes(per: usize, n: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|r| {
            let recs: Vec<Vec<u8>> = (0..per as u64).map(|i| record(r * 100 + i)).collect();
            Envelope {
                received_at_micros: 1,
                request_id: RequestId::from_u128(r as u128),
                sequenced: false,
                idempotency_key: None,
                source: None,
                records: recs.iter().map(|x| x.as_slice()).collect(),
            }
            .encode()
        })
        .collect()
}

fn bench_broker(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    broker: &dyn KafkaBroker,
    ids: &mut Vec<(String, u64)>,
) {
    let kind = match broker.kind() {
        "fast (in-memory)" => "fast",
        other => other,
    };
    rt.block_on(broker.create_topic("bench", 4)).expect("topic");
    let mut settings = spillway_producer::Settings::new(broker.bootstrap(), "bench");
    settings.listen = "127.0.0.1:0".parse().expect("addr");
    let producer = rt
        .block_on(spillway_producer::start(settings))
        .expect("producer");
    let url = producer.store_url();
    let direct: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()
        .expect("rdkafka producer");
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    for (per, concurrency) in [1usize, 10]
        .into_iter()
        .flat_map(|per| CONCURRENCY.map(|c| (per, c)))
    {
        let n = requests(concurrency);
        g.throughput(Throughput::Elements(n * per as u64));
        let bodies = bodies(per, n);
        let http = HttpClient::new();
        let suffix = match concurrency {
            64 => String::new(),
            c => format!("/{c}_outstanding"),
        };
        let id = format!("{kind}/http/{per}_per_request{suffix}");
        g.bench_function(&id, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    rt.block_on(
                        stream::iter(bodies.iter().cloned())
                            .map(|body| {
                                let (http, url) = (http.clone(), url.clone());
                                async move {
                                    let a = http
                                        .post(&url, "application/json", body)
                                        .await
                                        .expect("http");
                                    assert_eq!(a.status, 200, "{}", a.body);
                                }
                            })
                            .buffer_unordered(concurrency)
                            .collect::<Vec<_>>(),
                    );
                }
                t.elapsed()
            })
        });
        ids.push((id, n * per as u64));
        let envs = envelopes(per, n);
        let id = format!("{kind}/ceiling_rdkafka/{per}_per_request{suffix}");
        g.bench_function(&id, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    rt.block_on(
                        stream::iter(envs.iter())
                            .map(|e| {
                                let direct = direct.clone();
                                async move {
                                    direct
                                        .send(
                                            FutureRecord::<(), _>::to("bench").payload(e),
                                            Duration::from_secs(10),
                                        )
                                        .await
                                        .expect("produce");
                                }
                            })
                            .buffer_unordered(concurrency)
                            .collect::<Vec<_>>(),
                    );
                }
                t.elapsed()
            })
        });
        ids.push((id, n * per as u64));
    }
    g.finish();
    rt.block_on(producer.shutdown());
}

fn producer(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut ids = vec![];
    if kafka::tansu_bin().is_some() {
        let tansu = Tansu::start().expect("tansu");
        bench_broker(c, &rt, &tansu, &mut ids);
        print_ratios(GROUP, &ids, "tansu/ceiling_rdkafka/10_per_request");
    } else {
        eprintln!(
            "Tansu not installed (ci/test.sh installs it): benchmarking the mock cluster only"
        );
    }
    if kafka::fast_broker_bin().is_some() {
        let fast = Tansu::start_in_memory().expect("fast broker");
        let mut fast_ids = vec![];
        bench_broker(c, &rt, &fast, &mut fast_ids);
        print_ratios(GROUP, &fast_ids, "fast/ceiling_rdkafka/10_per_request");
    }
    let mock = rt.block_on(async { Mock::start(1) }).expect("mock");
    let mut mock_ids = vec![];
    bench_broker(c, &rt, &mock, &mut mock_ids);
    print_ratios(GROUP, &mock_ids, "mock/ceiling_rdkafka/10_per_request");
}

criterion_group!(benches, producer);
criterion_main!(benches);
