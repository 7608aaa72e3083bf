//! The core's hot paths: batcher bookkeeping per record, envelope encode and decode, and the
//! COPY BINARY encoding of a batch, jsonb only and typed (the CPU a typed column costs).

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use spillway_benches::{record, rows, typed_mapping, typed_rows};
use spillway_core::pgcopy::CopyRows;
use spillway_core::Mapping;
use spillway_core::{
    AdaptiveConfig, Batcher, BatcherConfig, Envelope, FlushOutcome, Position, Record, RequestId,
};

fn batcher(c: &mut Criterion) {
    let n = 100_000u64;
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            partition: (i % 4) as i32,
            offset: (i / 4) as i64,
            index: 0,
            last_in_message: true,
            received_at_micros: 0,
            request_id: RequestId::from_u128(0),
            sequenced: false,
            idempotency_key: None,
            kafka: None,
            payload: record(i),
        })
        .collect();
    let mut g = c.benchmark_group("core/batcher");
    g.throughput(Throughput::Elements(n));
    g.bench_function("push_poll_flush_100k", |b| {
        b.iter_batched(
            || records.clone(),
            |records| {
                let cfg = BatcherConfig {
                    capacity_records: 1_000_000,
                    capacity_bytes: 1 << 30,
                    size: AdaptiveConfig::fixed(5_000),
                    ..BatcherConfig::default()
                };
                let mut batcher = Batcher::new(cfg).expect("valid config");
                for p in 0..4 {
                    batcher.assign(p, Position::BEGINNING);
                }
                let now = Instant::now();
                let mut written = 0;
                for r in records {
                    batcher.push(r, now);
                    while let Some(batch) = batcher.poll_batch(now) {
                        written += batch.entries.len();
                        batcher.on_flush_result(batch, FlushOutcome::Written, now);
                    }
                }
                batcher.set_draining(true);
                while let Some(batch) = batcher.poll_batch(now + Duration::from_secs(1)) {
                    written += batch.entries.len();
                    batcher.on_flush_result(batch, FlushOutcome::Written, now);
                }
                black_box(written)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn envelope(c: &mut Criterion) {
    let mut g = c.benchmark_group("core/envelope");
    for per in [1usize, 10] {
        let recs: Vec<Vec<u8>> = (0..per as u64).map(record).collect();
        let env = Envelope {
            received_at_micros: 1,
            request_id: RequestId::from_u128(7),
            sequenced: false,
            idempotency_key: None,
            source: None,
            records: recs.iter().map(|r| r.as_slice()).collect(),
        };
        let bytes = env.encode();
        g.throughput(Throughput::Elements(per as u64));
        g.bench_function(format!("encode_{per}_records"), |b| {
            b.iter(|| black_box(env.encode()))
        });
        g.bench_function(format!("decode_{per}_records"), |b| {
            b.iter(|| black_box(Envelope::decode(black_box(&bytes)).map(|e| e.records.len())))
        });
    }
    g.finish();
}

/// One batch of 10,000 ~200-byte records into COPY BINARY: the record kept whole in `data
/// jsonb` (bytes copied), or converted into the six typed columns (parsed, converted), or both.
fn copy_encoding(c: &mut Criterion) {
    let n = 10_000u64;
    let (plain, typed) = (rows(n), typed_rows(n));
    let typed_and_data = typed_mapping().columns().to_vec();
    let cases = [
        ("jsonb_only", &plain, Mapping::default()),
        ("jsonb_only_typed_records", &typed, Mapping::default()),
        ("typed_6_columns", &typed, typed_mapping()),
        (
            "typed_6_columns_and_data",
            &typed,
            Mapping::new(typed_and_data, true).expect("valid"),
        ),
    ];
    let mut g = c.benchmark_group("core/copy_encoding");
    g.throughput(Throughput::Elements(n));
    for (name, rows, mapping) in &cases {
        g.bench_function(*name, |b| {
            b.iter(|| {
                let mut copy = CopyRows::new(mapping, rows.len() * 256);
                for r in rows.iter() {
                    copy.push(r).expect("the bench rows fit the mapping");
                }
                black_box(copy.finish().len())
            })
        });
    }
    // The floor of the serde_json walk the scanner replaced: one pass that validates each
    // record and skips every value (no capture, no conversion, no encoding).
    g.bench_function("serde_json_validate_only", |b| {
        b.iter(|| {
            for r in typed.iter() {
                black_box(
                    serde_json::from_slice::<&serde_json::value::RawValue>(&r.payload).is_ok(),
                );
            }
        })
    });
    g.finish();
}

criterion_group!(benches, batcher, envelope, copy_encoding);
criterion_main!(benches);
