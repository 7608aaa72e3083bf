//! Writing each request once by its `Idempotency-Key`. No IO.
//!
//! A client that retries a request (after a `503`, or a connection lost before the answer)
//! sends the same key; Kafka may then hold the request twice, in any partitions. The consumer
//! keeps, per table, the keys it has written (`<table>_request_keys`) with the message that
//! *owns* each: the first one written. In each batch's transaction it claims the keys of the
//! batch's messages (an insert that keeps an existing owner), reads their owners back, and
//! writes a message's records only if the message owns its key. A message that owns its key
//! is written whole even when its records span batches (each batch finds it the owner), and a
//! batch replayed after a crash is fenced by the position before it gets here.
//!
//! This module decides which keys a batch claims and which of its entries are repeats; the
//! shell runs the statements.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::batcher::Batch;
use crate::ledger::Partition;

/// The message that owns a key: its partition and offset.
pub type Owner = (Partition, i64);

/// The keys the entries `entries` of `batch` (indexes into `batch.entries`, all going to one
/// table) claim, each with the first message carrying it, in key order (so that two
/// transactions claiming the same keys take their locks in the same order).
pub fn claims(batch: &Batch, entries: impl IntoIterator<Item = usize>) -> Vec<(Arc<str>, i64)> {
    let mut first: BTreeMap<Arc<str>, i64> = BTreeMap::new();
    for i in entries {
        let Some(e) = batch.entries.get(i) else {
            continue;
        };
        if e.copy {
            continue;
        }
        if let Some(key) = &e.record.idempotency_key {
            let offset = first.entry(key.clone()).or_insert(e.record.offset);
            *offset = (*offset).min(e.record.offset);
        }
    }
    first.into_iter().collect()
}

/// Of `entries` (as for [`claims`]), those whose message does not own its key: `owner` gives a
/// key's owner as stored after the claim (`None`: not stored, e.g. deleted past the retention
/// meanwhile; then the message is written).
pub fn repeated(
    batch: &Batch,
    entries: impl IntoIterator<Item = usize>,
    owner: impl Fn(&str) -> Option<Owner>,
) -> BTreeSet<usize> {
    let mut owners: BTreeMap<&str, Option<Owner>> = BTreeMap::new();
    entries
        .into_iter()
        .filter(|i| {
            let Some(e) = batch.entries.get(*i) else {
                return false;
            };
            let Some(key) = e.record.idempotency_key.as_deref() else {
                return false;
            };
            if e.copy {
                return false;
            }
            let stored = *owners.entry(key).or_insert_with(|| owner(key));
            stored.is_some_and(|o| o != (batch.partition, e.record.offset))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::{Entry, Record};
    use crate::ledger::Position;
    use crate::RequestId;
    use std::time::Instant;

    fn entry(offset: i64, index: u32, key: Option<&str>) -> Entry {
        Entry {
            record: Record {
                partition: 3,
                offset,
                index,
                last_in_message: true,
                received_at_micros: 0,
                request_id: RequestId::from_u128(0),
                sequenced: false,
                idempotency_key: key.map(Arc::from),
                kafka: None,
                payload: b"{}".to_vec(),
            },
            dead_reason: None,
            copy: false,
        }
    }

    fn batch(entries: Vec<Entry>) -> Batch {
        Batch {
            id: crate::BatchId(1),
            partition: 3,
            start: Position::BEGINNING,
            end: Position::new(10, 0),
            entries,
            attempt: 1,
            oldest_pushed_at: Instant::now(),
            check_start: true,
            position_with_rows: true,
        }
    }

    #[test]
    fn a_batch_claims_each_key_for_its_first_message_in_key_order() {
        let mut copy = entry(9, 0, Some("z"));
        copy.copy = true;
        let b = batch(vec![
            entry(5, 0, Some("b")),
            entry(5, 1, Some("b")),
            entry(6, 0, None),
            entry(7, 0, Some("a")),
            entry(8, 0, Some("b")),
            copy,
        ]);
        let claims = claims(&b, 0..b.entries.len());
        let got: Vec<(&str, i64)> = claims.iter().map(|(k, o)| (&**k, *o)).collect();
        assert_eq!(got, [("a", 7), ("b", 5)], "a copy claims nothing");
        assert!(super::claims(&b, [2]).is_empty());
    }

    #[test]
    fn only_the_owning_message_is_written_whole_even_across_batches() {
        let b = batch(vec![
            entry(5, 2, Some("k")), // the rest of message 5, begun in the batch before
            entry(6, 0, Some("k")), // a retry of the same request
            entry(7, 0, Some("other")),
            entry(8, 0, None),
        ]);
        let stored = |key: &str| match key {
            "k" => Some((3, 5)),
            "other" => Some((4, 7)), // owned by a message of another partition
            _ => None,
        };
        assert_eq!(
            repeated(&b, 0..4, stored),
            BTreeSet::from([1, 2]),
            "message 6 repeats message 5; message 7 repeats partition 4's"
        );
        // Not stored any more (past the retention): written.
        assert!(repeated(&b, 0..4, |_| None).is_empty());
        // A table that gets only some entries looks only at those.
        assert_eq!(repeated(&b, [0, 3], stored), BTreeSet::new());
    }
}
