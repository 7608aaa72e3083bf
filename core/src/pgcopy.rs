//! The COPY BINARY wire format of the records table, written by hand: one pass over a batch
//! into one buffer. Per row: the base columns (`kafka_partition`, `kafka_offset`,
//! `record_index`, `received_at`), `data jsonb` unless the mapping drops it (jsonb's binary
//! input is a version byte and the JSON text, so the record's bytes are copied as they came),
//! then each mapped column converted straight from the record ([`crate::columns`]).
//!
//! No IO: the consumer's shell sends the buffer.

use crate::batcher::Record;
use crate::columns::{encode_field, ConvertError, Mapping, PG_EPOCH_OFFSET_MICROS};
use crate::topics::kafka_partition;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// A NULL field.
const NULL: [u8; 4] = (-1i32).to_be_bytes();

/// Bytes per row besides the JSON itself and the mapped columns.
pub const ROW_OVERHEAD: usize = 2 + 4 * 5 + 4 + 8 + 4 + 8 + 1;

/// Rows for `COPY table (mapping.copy_columns()) FROM STDIN (FORMAT binary)`, one at a time.
#[derive(Debug)]
pub struct CopyRows<'m, 'a> {
    mapping: &'m Mapping,
    buf: Vec<u8>,
    rows: usize,
    /// Each column's value in the row being written (reused: no allocation per row).
    found: Vec<Option<&'a str>>,
    /// With a key compared as encoded ([`Mapping::key_compares_as_encoded`]): each row's keys.
    keys: Option<RowKeys>,
}

/// Each row's start in the buffer, its key (the key columns' encoded fields, one after the
/// other, ending at `end` in `bytes`) and whether it deletes.
#[derive(Debug, Default)]
struct RowKeys {
    bytes: Vec<u8>,
    rows: Vec<(usize, usize, bool)>,
}

impl<'m, 'a> CopyRows<'m, 'a> {
    /// A buffer with the COPY header, sized for about `size_hint` bytes of rows.
    pub fn new(mapping: &'m Mapping, size_hint: usize) -> Self {
        let mut buf = Vec::with_capacity(size_hint + 64);
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        CopyRows {
            mapping,
            buf,
            rows: 0,
            found: vec![None; mapping.slots()],
            keys: mapping.key_compares_as_encoded().then(RowKeys::default),
        }
    }

    /// Appends `record` as one row, or, when one of its values does not convert, appends
    /// nothing and says which.
    pub fn push(&mut self, record: &'a Record) -> Result<(), ConvertError> {
        let start = self.buf.len();
        let keys_end = self.keys.as_ref().map_or(0, |k| k.bytes.len());
        let written = self.write_row(record);
        match (&written, &mut self.keys) {
            (Err(_), keys) => {
                self.buf.truncate(start);
                if let Some(k) = keys {
                    k.bytes.truncate(keys_end);
                }
            }
            (Ok(delete), keys) => {
                self.rows += 1;
                if let Some(k) = keys {
                    k.rows.push((start, k.bytes.len(), *delete));
                }
            }
        }
        written.map(|_| ())
    }

    /// Writes one row; says whether it deletes its key's row.
    fn write_row(&mut self, r: &'a Record) -> Result<bool, ConvertError> {
        let m = self.mapping;
        if let Err(reason) = m.extract(&r.payload, &mut self.found) {
            let c = &m.columns()[0];
            return Err(ConvertError {
                column: c.name.clone(),
                ty: c.ty,
                from: c.source.to_string(),
                value: "(the whole record)".into(),
                reason,
            });
        }
        // A record that deletes its key's row carries its key and nothing else.
        let delete = m.is_delete(&self.found);
        let key = m.upsert().map(|u| u.key.as_slice()).unwrap_or_default();
        let buf = &mut self.buf;
        buf.extend_from_slice(&(m.field_count() as i16).to_be_bytes());
        buf.extend_from_slice(&4i32.to_be_bytes());
        buf.extend_from_slice(&kafka_partition(r.partition).to_be_bytes());
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(&r.offset.to_be_bytes());
        buf.extend_from_slice(&4i32.to_be_bytes());
        buf.extend_from_slice(&(r.index as i32).to_be_bytes());
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(&(r.received_at_micros - PG_EPOCH_OFFSET_MICROS).to_be_bytes());
        if m.keep_data() && delete {
            buf.extend_from_slice(&NULL);
        } else if m.keep_data() {
            buf.extend_from_slice(&(r.payload.len() as i32 + 1).to_be_bytes());
            buf.push(1); // jsonb binary format version
            buf.extend_from_slice(&r.payload);
        }
        for (spec, raw) in m.columns().iter().zip(&self.found) {
            if delete && !key.contains(&spec.name) {
                buf.extend_from_slice(&NULL);
            } else {
                let at = buf.len();
                encode_field(spec, *raw, r, buf)?;
                if let Some(k) = &mut self.keys {
                    if key.contains(&spec.name) {
                        k.bytes.extend_from_slice(&buf[at..]);
                    }
                }
            }
        }
        if m.upsert().is_some_and(|u| u.delete_when.is_some()) {
            buf.extend_from_slice(&1i32.to_be_bytes());
            buf.push(u8::from(delete));
        }
        Ok(delete)
    }

    /// Rows appended so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The buffer with its trailer, ready to send.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }

    /// As [`CopyRows::finish`], keeping only the rows that decide their key's row when the
    /// key compares as encoded ([`Mapping::key_compares_as_encoded`],
    /// [`crate::upsert::deciding_rows`]); also says which rows it kept (their indexes among
    /// the rows appended, ascending). Otherwise every row is kept.
    pub fn finish_deciding(self) -> (Vec<u8>, Vec<usize>) {
        let (Some(keys), Some(upsert)) = (&self.keys, self.mapping.upsert()) else {
            let all = (0..self.rows).collect();
            return (self.finish(), all);
        };
        let mut key_start = 0;
        let rows = keys.rows.iter().map(|(_, end, delete)| {
            let key = &keys.bytes[key_start..*end];
            key_start = *end;
            (key, *delete)
        });
        let kept = crate::upsert::deciding_rows(rows, upsert.on_conflict);
        if kept.len() == self.rows {
            return (self.finish(), kept);
        }
        let header = keys.rows.first().map_or(self.buf.len(), |r| r.0);
        let mut buf = Vec::with_capacity(self.buf.len() + 2);
        buf.extend_from_slice(&self.buf[..header]);
        for i in &kept {
            let start = keys.rows[*i].0;
            let end = keys.rows.get(i + 1).map_or(self.buf.len(), |r| r.0);
            buf.extend_from_slice(&self.buf[start..end]);
        }
        buf.extend_from_slice(&(-1i16).to_be_bytes());
        (buf, kept)
    }
}

/// Encodes every record of `rows` (benches, tests): the first that does not convert stops it.
pub fn encode_all<'a>(
    mapping: &Mapping,
    rows: impl IntoIterator<Item = &'a Record>,
    size_hint: usize,
) -> Result<Vec<u8>, ConvertError> {
    let mut copy = CopyRows::new(mapping, size_hint);
    for r in rows {
        copy.push(r)?;
    }
    Ok(copy.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::RequestId;

    fn record(payload: &str) -> Record {
        Record {
            partition: 3,
            offset: 7,
            index: 1,
            last_in_message: true,
            received_at_micros: PG_EPOCH_OFFSET_MICROS + 5,
            request_id: RequestId::from_u128(1),
            sequenced: false,
            idempotency_key: None,
            kafka: None,
            payload: payload.as_bytes().to_vec(),
        }
    }

    #[test]
    fn the_default_mapping_writes_the_base_columns_and_data_as_before() {
        let m = Mapping::default();
        let r = record(r#"{"a":1}"#);
        let mut rows = CopyRows::new(&m, 0);
        rows.push(&r).unwrap();
        let buf = rows.finish();
        let mut want = SIGNATURE.to_vec();
        want.extend_from_slice(&[0; 8]);
        want.extend_from_slice(&5i16.to_be_bytes());
        for field in [
            &[0, 0, 0, 4, 0, 0, 0, 3][..],
            &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7],
            &[0, 0, 0, 4, 0, 0, 0, 1],
            &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 5],
            &[0, 0, 0, 8, 1],
            br#"{"a":1}"#,
        ] {
            want.extend_from_slice(field);
        }
        want.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(buf, want);
        assert_eq!(
            m.copy_columns(),
            "kafka_partition, kafka_offset, record_index, received_at, data"
        );
    }

    #[test]
    fn a_row_that_does_not_convert_leaves_nothing_behind() {
        let spec = "n:bigint=/n".parse().unwrap();
        let m = Mapping::new(vec![spec], false).unwrap();
        let (good, bad) = (record(r#"{"n":1}"#), record(r#"{"n":"x"}"#));
        let mut rows = CopyRows::new(&m, 0);
        rows.push(&good).unwrap();
        let len = rows.buf.len();
        let err = rows.push(&bad).unwrap_err();
        assert_eq!(err.column, "n");
        assert_eq!(rows.buf.len(), len);
        assert_eq!(rows.rows(), 1);
        assert_eq!(m.field_count(), 5);
        assert_eq!(
            m.copy_columns(),
            "kafka_partition, kafka_offset, record_index, received_at, \"n\""
        );
    }

    /// Splits one row of `buf` (after the header) into its fields.
    fn fields(buf: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut at = SIGNATURE.len() + 8;
        let n = i16::from_be_bytes([buf[at], buf[at + 1]]);
        at += 2;
        (0..n)
            .map(|_| {
                let len = i32::from_be_bytes(buf[at..at + 4].try_into().unwrap());
                at += 4;
                (len >= 0).then(|| {
                    at += len as usize;
                    buf[at - len as usize..at].to_vec()
                })
            })
            .collect()
    }

    fn upsert(delete_when: Option<&str>) -> Mapping {
        let columns = ["id:bigint=/id", "name:text=/name"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        Mapping::new(columns, true)
            .unwrap()
            .with_upsert(crate::Upsert {
                key: vec!["id".into()],
                on_conflict: Default::default(),
                delete_when: delete_when.map(|d| d.parse().unwrap()),
            })
            .unwrap()
    }

    fn one_row(m: &Mapping, payload: &str) -> Result<Vec<Option<Vec<u8>>>, ConvertError> {
        let r = record(payload);
        let mut rows = CopyRows::new(m, 0);
        rows.push(&r)?;
        Ok(fields(&rows.finish()))
    }

    #[test]
    fn a_deleting_record_carries_its_key_and_the_flag_and_nothing_else() {
        let m = upsert(Some("/op=delete"));
        assert!(m
            .copy_columns()
            .ends_with("\"id\", \"name\", spillway_delete"));
        let kept = one_row(&m, r#"{"id":4,"name":"a","op":"put"}"#).unwrap();
        assert_eq!(kept.len(), m.field_count());
        assert_eq!(kept[5], Some(4i64.to_be_bytes().to_vec()));
        assert_eq!(kept[6].as_deref(), Some(&b"a"[..]));
        assert_eq!(kept[7], Some(vec![0]), "not a delete");
        assert!(kept[4].is_some(), "data is kept");
        let gone = one_row(&m, r#"{"id":4,"name":"a","op":"delete"}"#).unwrap();
        assert_eq!(gone[5], Some(4i64.to_be_bytes().to_vec()), "the key");
        assert_eq!((gone[4].as_ref(), gone[6].as_ref()), (None, None));
        assert_eq!(gone[7], Some(vec![1]), "a delete");
    }

    #[test]
    fn only_the_rows_deciding_their_key_are_staged_when_the_key_compares_as_encoded() {
        let m = upsert(Some("/op=delete"));
        assert!(m.key_compares_as_encoded());
        let records: Vec<Record> = [
            r#"{"id":1,"name":"a"}"#,
            r#"{"id":2,"name":"b"}"#,
            r#"{"id":1,"name":"c"}"#,
            r#"{"id":3,"name":"x"}"#,
            r#"{"id":"bad"}"#,
            r#"{"id":3,"op":"delete"}"#,
            r#"{"id":4,"op":"delete"}"#,
            r#"{"id":4,"name":"e"}"#,
        ]
        .iter()
        .map(|p| record(p))
        .collect();
        let mut rows = CopyRows::new(&m, 0);
        for r in &records {
            let _ = rows.push(r);
        }
        let (buf, kept) = rows.finish_deciding();
        // Rows (the bad record appended none): 1a, 2b, 1c, 3x, 3 delete, 4 delete, 4e.
        assert_eq!(kept, [1, 2, 4, 5, 6]);
        let want = encode_all(&m, [1, 2, 5, 6, 7].map(|i| &records[i]), 0).unwrap();
        assert_eq!(buf, want, "the kept rows, whole, in order");
        // A key Postgres may find equal under other bytes (numeric) keeps every row.
        let columns = vec!["id:numeric=/id".parse().unwrap()];
        let numeric = Mapping::new(columns, false)
            .unwrap()
            .with_upsert(crate::Upsert {
                key: vec!["id".into()],
                on_conflict: Default::default(),
                delete_when: None,
            })
            .unwrap();
        assert!(!numeric.key_compares_as_encoded());
        let same = [r#"{"id":1}"#, r#"{"id":1.0}"#, r#"{"id":1}"#].map(record);
        let mut rows = CopyRows::new(&numeric, 0);
        for r in &same {
            rows.push(r).unwrap();
        }
        assert_eq!(rows.finish_deciding().1, [0, 1, 2]);
        assert!(!Mapping::default().key_compares_as_encoded());
    }

    #[test]
    fn a_record_without_its_key_does_not_convert_even_to_delete() {
        for m in [upsert(None), upsert(Some("/op=delete"))] {
            let err = one_row(&m, r#"{"name":"a","op":"delete"}"#).unwrap_err();
            assert_eq!(err.column, "id");
            assert!(err.reason.contains("required"), "{err}");
        }
        let plain = upsert(None);
        assert_eq!(plain.field_count(), 7, "no flag without --delete-when");
        assert_eq!(
            one_row(&plain, r#"{"id":1,"op":"delete"}"#).unwrap().len(),
            7
        );
    }

    #[test]
    fn the_key_must_be_mapped_columns_named_once() {
        let m = || Mapping::new(vec!["id:bigint=/id".parse().unwrap()], true).unwrap();
        let up = |key: &[&str]| crate::Upsert {
            key: key.iter().map(|k| k.to_string()).collect(),
            on_conflict: Default::default(),
            delete_when: None,
        };
        let e = m().with_upsert(up(&["user"])).unwrap_err();
        assert!(e.problem.contains("--column user:"), "{e}");
        assert!(m().with_upsert(up(&["id", "id"])).is_err());
        assert!(m().with_upsert(up(&[])).is_err());
        let flag = Mapping::new(vec!["spillway_delete:bigint=/id".parse().unwrap()], true)
            .unwrap()
            .with_upsert(crate::Upsert {
                delete_when: Some("/op=x".parse().unwrap()),
                ..up(&["spillway_delete"])
            });
        assert!(flag.is_err());
    }
}
