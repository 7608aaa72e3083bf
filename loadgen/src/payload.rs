//! Request bodies: generated JSON records (or records from a file), each carrying a unique id
//! `<run id>-<sequence>`, so the verdict can tell every record apart.

use std::io::Write;

use serde_json::{Map, Value};

/// What to put in requests.
#[derive(Clone, Debug)]
pub struct PayloadSpec {
    /// Records per request, inclusive range.
    pub records_per_request: (usize, usize),
    /// Approximate record size in bytes, inclusive range.
    pub record_size: (usize, usize),
    /// Records to cycle through instead of generated ones (JSON objects; the id field is added).
    pub file_records: Option<Vec<Map<String, Value>>>,
    /// Gzip the bodies.
    pub gzip: bool,
    /// Name of the id field.
    pub id_field: String,
}

impl PayloadSpec {
    /// Generated records: `records` per request and `size` bytes each (inclusive ranges), id
    /// field `id`, no gzip.
    pub fn generated(records: (usize, usize), size: (usize, usize)) -> Self {
        PayloadSpec {
            records_per_request: records,
            record_size: size,
            file_records: None,
            gzip: false,
            id_field: "id".into(),
        }
    }
}

/// One request body and the sequence numbers of its records.
#[derive(Clone, Debug)]
pub struct Payload {
    /// The body.
    pub body: bytes::Bytes,
    /// First sequence number.
    pub first_seq: u64,
    /// Number of records.
    pub records: u64,
}

/// Makes bodies in order; deterministic for a seed.
#[derive(Debug)]
pub struct PayloadGen {
    spec: PayloadSpec,
    run_id: String,
    next_seq: u64,
    next_file: usize,
    rng: fastrand::Rng,
}

impl PayloadGen {
    /// A generator for run `run_id`.
    pub fn new(spec: PayloadSpec, run_id: &str, seed: u64) -> Self {
        PayloadGen {
            spec,
            run_id: run_id.to_string(),
            next_seq: 0,
            next_file: 0,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// The id of sequence number `seq` in this run.
    pub fn id(run_id: &str, seq: u64) -> String {
        format!("{run_id}-{seq}")
    }

    /// The next body.
    pub fn next_payload(&mut self) -> Payload {
        let (lo, hi) = self.spec.records_per_request;
        let n = self.rng.usize(lo..=hi.max(lo));
        let first_seq = self.next_seq;
        let mut records = Vec::with_capacity(n);
        for _ in 0..n {
            let id = Value::String(Self::id(&self.run_id, self.next_seq));
            self.next_seq += 1;
            let record = match &self.spec.file_records {
                Some(file) if !file.is_empty() => {
                    let mut obj = file[self.next_file % file.len()].clone();
                    self.next_file += 1;
                    obj.insert(self.spec.id_field.clone(), id);
                    Value::Object(obj)
                }
                _ => {
                    let (lo, hi) = self.spec.record_size;
                    let size = self.rng.usize(lo..=hi.max(lo));
                    let pad: String = std::iter::repeat_with(|| self.rng.alphanumeric())
                        .take(size.saturating_sub(60))
                        .collect();
                    let mut obj = Map::new();
                    obj.insert(self.spec.id_field.clone(), id);
                    obj.insert("n".into(), Value::from(self.rng.u32(..)));
                    obj.insert("pad".into(), Value::String(pad));
                    Value::Object(obj)
                }
            };
            records.push(record);
        }
        let json = serde_json::to_vec(&Value::Array(records)).unwrap_or_default();
        let body = if self.spec.gzip {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = e.write_all(&json);
            e.finish().unwrap_or_default()
        } else {
            json
        };
        Payload {
            body: body.into(),
            first_seq,
            records: n as u64,
        }
    }

    /// Records generated so far.
    pub fn generated(&self) -> u64 {
        self.next_seq
    }
}

/// Reads a records file: NDJSON or a JSON array of objects.
pub fn read_records_file(text: &str) -> Result<Vec<Map<String, Value>>, String> {
    let values: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).map_err(|e| format!("records file: {e}"))?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(n, l)| {
                serde_json::from_str(l).map_err(|e| format!("records file line {}: {e}", n + 1))
            })
            .collect::<Result<_, _>>()?
    };
    values
        .into_iter()
        .map(|v| match v {
            Value::Object(m) => Ok(m),
            other => Err(format!(
                "records file: every record must be a JSON object, got {other}"
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_sizes_follow_the_spec() {
        let spec = PayloadSpec {
            records_per_request: (1, 5),
            record_size: (200, 300),
            file_records: None,
            gzip: false,
            id_field: "id".into(),
        };
        let mut g = PayloadGen::new(spec, "r1", 9);
        let mut ids = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let p = g.next_payload();
            let v: Vec<Value> = serde_json::from_slice(&p.body).unwrap();
            assert_eq!(v.len() as u64, p.records);
            for (i, r) in v.iter().enumerate() {
                assert_eq!(r["id"], format!("r1-{}", p.first_seq + i as u64));
                assert!(ids.insert(r["id"].to_string()));
                let len = serde_json::to_string(r).unwrap().len();
                assert!((150..=330).contains(&len), "record of {len} bytes");
            }
        }
    }

    #[test]
    fn file_records_get_the_id_added() {
        let recs = read_records_file("{\"a\":1}\n{\"b\":2}\n").unwrap();
        let spec = PayloadSpec {
            records_per_request: (3, 3),
            record_size: (0, 0),
            file_records: Some(recs),
            gzip: false,
            id_field: "uid".into(),
        };
        let p = PayloadGen::new(spec, "r", 1).next_payload();
        let v: Vec<Value> = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v[2]["a"], 1);
        assert_eq!(v[2]["uid"], "r-2");
        assert!(read_records_file("[1]").is_err());
    }
}
