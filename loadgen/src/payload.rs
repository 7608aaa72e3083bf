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
    /// Fraction (0..=1) of records made unstorable on purpose: valid JSON that Postgres's jsonb
    /// refuses (a `"poison": "\u0000"` field), to exercise the dead-letter path. Which records
    /// is fixed by their sequence number: see [`PayloadSpec::is_poison`].
    /// With `typed`, a poison record has a string where the mapping wants a bigint instead.
    pub poison_rate: f64,
    /// Generate records that fit [`typed_columns`] (ignored with `file_records`).
    pub typed: bool,
    /// Keyed traffic for writing by key (ignored with `file_records` and `typed`): each
    /// request belongs to one key below this, sent as its `X-Spillway-Key` (so all of a key's
    /// requests share a Kafka partition); about half of its records are states of that key
    /// (see [`PayloadSpec::is_state`] and [`state_columns`]), the rest ordinary records.
    pub keys: Option<u64>,
}

/// The columns of a table written by key that keyed traffic's states fit: `key` (the upsert
/// key), `seq` (the record's sequence number) and `id`. A state with `"op":"delete"` deletes
/// its key's row (`--delete-when /op=delete`); states are routed by `/kind=state`.
pub fn state_columns(id_field: &str) -> Vec<String> {
    let pointer = id_field.replace('~', "~0").replace('/', "~1");
    vec![
        "key:bigint=/key".into(),
        "seq:bigint=/seq".into(),
        format!("id:text=/{pointer}"),
    ]
}

/// SplitMix64's finaliser of `seq` and a salt, as a fraction in [0, 1): a well-spread,
/// deterministic choice per sequence number.
fn fraction(seq: u64, salt: u64) -> f64 {
    let mut z = seq.wrapping_add(salt);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z as f64 / u64::MAX as f64
}

/// The consumer mapping typed records fit: the id (as text, from `id_field`) and six typed
/// columns, `n` bigint, `name` text, `at` timestamptz, `score` double precision, `ok` boolean
/// and `doc` jsonb.
pub fn typed_columns(id_field: &str) -> Vec<String> {
    let pointer = id_field.replace('~', "~0").replace('/', "~1");
    vec![
        format!("id:text!=/{pointer}"),
        "n:bigint!=/n".into(),
        "name:text=/name".into(),
        "at:timestamptz=/at".into(),
        "score:double precision=/score".into(),
        "ok:boolean=/ok".into(),
        "doc:jsonb=/doc".into(),
    ]
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
            poison_rate: 0.0,
            typed: false,
            keys: None,
        }
    }

    /// Whether record `seq` is a poison record (deterministic: the same in every run).
    pub fn is_poison(&self, seq: u64) -> bool {
        self.poison_rate > 0.0 && fraction(seq, 0x9E37_79B9_7F4A_7C15) < self.poison_rate
    }

    /// With `keys`: whether record `seq` is a state of its request's key (about half are).
    pub fn is_state(&self, seq: u64) -> bool {
        self.keys.is_some() && !self.typed && fraction(seq, 0x51A7_E5EE_D000_0001) < 0.5
    }

    /// Of `acked`, the records that are not states ([`PayloadSpec::is_state`]): those the
    /// set verdict checks exactly once in the records table (the keyed verdict judges the
    /// states).
    pub fn without_states(&self, acked: &crate::runner::AckSet) -> crate::runner::AckSet {
        if self.keys.is_none() {
            return acked.clone();
        }
        let mut rest = crate::runner::AckSet::default();
        for seq in acked.iter().filter(|s| !self.is_state(*s)) {
            rest.insert_range(seq, 1);
        }
        rest
    }

    /// Whether state `seq` deletes its key's row (about one in seven states).
    pub fn is_delete(&self, seq: u64) -> bool {
        self.is_state(seq) && fraction(seq, 0xDE1E_7E00_0000_0007) < 1.0 / 7.0
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
    /// With keyed traffic: the request's key (its `X-Spillway-Key`).
    pub key: Option<u64>,
}

/// Makes bodies in order; deterministic for a seed.
#[derive(Debug)]
pub struct PayloadGen {
    spec: PayloadSpec,
    run_id: String,
    next_seq: u64,
    next_file: usize,
    rng: fastrand::Rng,
    /// `"<id field>":"<run id>-` as JSON, written before each generated record's sequence.
    id_prefix: Vec<u8>,
    /// Random alphanumeric text that generated records take their padding from.
    pad: Vec<u8>,
}

impl PayloadGen {
    /// A generator for run `run_id`.
    pub fn new(spec: PayloadSpec, run_id: &str, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let pad_len = (spec.record_size.1 * 2).max(1 << 16);
        let pad = std::iter::repeat_with(|| rng.alphanumeric() as u8)
            .take(pad_len)
            .collect();
        // Both strings are escaped once here; the body is then written without serde.
        let field = serde_json::to_string(&spec.id_field).unwrap_or_default();
        let run = serde_json::to_string(run_id).unwrap_or_default();
        let mut id_prefix = field.into_bytes();
        id_prefix.extend_from_slice(b":");
        id_prefix.extend_from_slice(&run.as_bytes()[..run.len().saturating_sub(1)]);
        id_prefix.extend_from_slice(b"-");
        PayloadGen {
            spec,
            run_id: run_id.to_string(),
            next_seq: 0,
            next_file: 0,
            rng,
            id_prefix,
            pad,
        }
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.run_id
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
        let key = match self.spec.keys {
            Some(keys) if self.spec.file_records.is_none() && !self.spec.typed => {
                Some(self.rng.u64(..keys.max(1)))
            }
            _ => None,
        };
        let json = match &self.spec.file_records {
            Some(file) if !file.is_empty() => {
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let mut obj = file[self.next_file % file.len()].clone();
                    self.next_file += 1;
                    let id = Value::String(Self::id(&self.run_id, seq));
                    obj.insert(self.spec.id_field.clone(), id);
                    if self.spec.is_poison(seq) {
                        obj.insert("poison".into(), Value::String("\0".into()));
                    }
                    records.push(Value::Object(obj));
                }
                serde_json::to_vec(&Value::Array(records)).unwrap_or_default()
            }
            _ if self.spec.typed => self.records(n, Self::typed_record),
            _ => match key {
                Some(k) => self.records(n, |g, out, seq| {
                    if g.spec.is_state(seq) {
                        Self::state_record(out, seq, k, g.spec.is_delete(seq));
                    } else {
                        g.generated_record(out, seq);
                    }
                }),
                None => self.records(n, Self::generated_record),
            },
        };
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
            key,
        }
    }

    /// `n` records as a JSON array, written straight into the buffer (this is the hot path of
    /// a high-rate run): each `{"id":"<run>-<seq>` and what `rest` writes after it.
    fn records(&mut self, n: usize, mut rest: impl FnMut(&mut Self, &mut Vec<u8>, u64)) -> Vec<u8> {
        let (lo, hi) = self.spec.record_size;
        let mut out = Vec::with_capacity(n * (hi.max(lo) + 16) + 2);
        out.push(b'[');
        for i in 0..n {
            let seq = self.next_seq;
            self.next_seq += 1;
            if i > 0 {
                out.push(b',');
            }
            out.push(b'{');
            out.extend_from_slice(&self.id_prefix);
            let _ = write!(out, "{seq}\"");
            rest(self, &mut out, seq);
        }
        out.push(b']');
        out
    }

    /// The rest of a generated record: `{"id":"<run>-<seq>","n":<u32>,"pad":"<text>"}`.
    fn generated_record(&mut self, out: &mut Vec<u8>, seq: u64) {
        let (lo, hi) = self.spec.record_size;
        let _ = write!(out, ",\"n\":{},\"pad\":\"", self.rng.u32(..));
        let size = self.rng.usize(lo..=hi.max(lo));
        let len = size.saturating_sub(60).min(self.pad.len());
        let at = self.rng.usize(0..=self.pad.len() - len);
        out.extend_from_slice(&self.pad[at..at + len]);
        if self.spec.is_poison(seq) {
            out.extend_from_slice(br#"","poison":"\u0000"}"#);
        } else {
            out.extend_from_slice(b"\"}");
        }
    }

    /// The rest of a state of key `key`: `{"id":"<run>-<seq>","kind":"state","key":<key>,
    /// "seq":<seq>}`, with `"op":"delete"` when it deletes the key's row.
    fn state_record(out: &mut Vec<u8>, seq: u64, key: u64, delete: bool) {
        let _ = write!(out, ",\"kind\":\"state\",\"key\":{key},\"seq\":{seq}");
        if delete {
            out.extend_from_slice(br#","op":"delete""#);
        }
        out.push(b'}');
    }

    /// The rest of a record that fits [`typed_columns`]:
    /// `{"id":"<run>-<seq>","n":<i64>,"name":"<text>","at":"<RFC 3339>","score":<f64>,
    /// "ok":<bool>,"doc":{"k":"<text>","v":[<u8>,<u8>]}}`, padded in `name` and `doc` to the
    /// record size. A poison record has `"n":"poison"`, which the bigint column refuses.
    fn typed_record(&mut self, out: &mut Vec<u8>, seq: u64) {
        let (lo, hi) = self.spec.record_size;
        if self.spec.is_poison(seq) {
            out.extend_from_slice(br#","n":"poison""#);
        } else {
            let _ = write!(out, ",\"n\":{}", self.rng.i64(..));
        }
        let size = self.rng.usize(lo..=hi.max(lo));
        // About 150 bytes besides the padding, which goes half to name, half to doc.
        let pad = size.saturating_sub(150).clamp(2, self.pad.len() / 2);
        let at = self.rng.usize(0..=self.pad.len() - 2 * pad);
        out.extend_from_slice(br#","name":""#);
        out.extend_from_slice(&self.pad[at..at + pad / 2 + 1]);
        let micros = self.rng.u64(..86_400_000_000);
        let secs = micros / 1_000_000;
        let _ = write!(
            out,
            "\",\"at\":\"2026-11-27T{:02}:{:02}:{:02}.{:06}Z\",\"score\":{},\"ok\":{},\"doc\":{{\"k\":\"",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            micros % 1_000_000,
            self.rng.f64() * 1000.0,
            self.rng.bool(),
        );
        out.extend_from_slice(&self.pad[at + pad..at + pad + pad / 2 + 1]);
        let _ = write!(
            out,
            "\",\"v\":[{},{}]}}}}",
            self.rng.u8(..),
            self.rng.u8(..)
        );
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
        let spec = PayloadSpec::generated((1, 5), (200, 300));
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
    fn keyed_requests_carry_one_key_and_states_of_it_beside_ordinary_records() {
        let mut spec = PayloadSpec::generated((1, 6), (100, 120));
        spec.keys = Some(10);
        let mut g = PayloadGen::new(spec.clone(), "r", 7);
        let (mut states, mut deletes, mut others) = (0, 0, 0);
        for _ in 0..300 {
            let p = g.next_payload();
            let key = p.key.expect("a keyed request has a key");
            assert!(key < 10);
            let v: Vec<Value> = serde_json::from_slice(&p.body).unwrap();
            for (i, r) in v.iter().enumerate() {
                let seq = p.first_seq + i as u64;
                assert_eq!(r["id"], format!("r-{seq}"));
                if spec.is_state(seq) {
                    assert_eq!(
                        (&r["kind"], &r["key"], &r["seq"]),
                        (&"state".into(), &key.into(), &seq.into())
                    );
                    assert_eq!(r.get("op").is_some(), spec.is_delete(seq));
                    states += 1;
                    deletes += u32::from(spec.is_delete(seq));
                } else {
                    assert!(r.get("kind").is_none() && r["pad"].is_string());
                    others += 1;
                }
            }
        }
        assert!(
            states > 200 && others > 200 && deletes > 20,
            "{states} {others} {deletes}"
        );
        let plain =
            PayloadGen::new(PayloadSpec::generated((1, 1), (100, 100)), "r", 7).next_payload();
        assert_eq!(plain.key, None);
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
            poison_rate: 0.0,
            typed: false,
            keys: None,
        };
        let p = PayloadGen::new(spec, "r", 1).next_payload();
        let v: Vec<Value> = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v[2]["a"], 1);
        assert_eq!(v[2]["uid"], "r-2");
        assert!(read_records_file("[1]").is_err());
    }

    #[test]
    fn typed_records_fit_the_typed_mapping_and_poison_breaks_only_the_bigint() {
        let mut spec = PayloadSpec::generated((1, 5), (180, 220));
        spec.typed = true;
        spec.poison_rate = 0.1;
        let mut g = PayloadGen::new(spec.clone(), "t", 5);
        let (mut sizes, mut poison) = (vec![], 0);
        for _ in 0..100 {
            let p = g.next_payload();
            let v: Vec<Value> = serde_json::from_slice(&p.body).unwrap();
            for (i, r) in v.iter().enumerate() {
                let seq = p.first_seq + i as u64;
                assert_eq!(r["id"], format!("t-{seq}"));
                if spec.is_poison(seq) {
                    assert_eq!(r["n"], "poison");
                    poison += 1;
                } else {
                    assert!(r["n"].is_i64(), "{r}");
                }
                assert!(r["name"].is_string() && r["score"].is_number() && r["ok"].is_boolean());
                assert!(r["doc"]["v"].is_array(), "{r}");
                let at = r["at"].as_str().unwrap();
                assert!(
                    at.starts_with("2026-11-27T") && at.ends_with('Z') && at.len() == 27,
                    "{at}"
                );
                sizes.push(serde_json::to_string(r).unwrap().len());
            }
        }
        assert!(poison > 0);
        let mean = sizes.iter().sum::<usize>() / sizes.len();
        assert!((170..=240).contains(&mean), "mean record size {mean}");
        assert_eq!(typed_columns("id")[0], "id:text!=/id");
        assert_eq!(typed_columns("a/b")[0], "id:text!=/a~1b");
    }

    #[test]
    fn poison_records_are_the_chosen_share_and_jsonb_would_refuse_them() {
        let mut spec = PayloadSpec::generated((10, 10), (100, 100));
        spec.poison_rate = 0.05;
        let mut g = PayloadGen::new(spec.clone(), "p", 3);
        let (mut poison, mut total) = (0, 0);
        for _ in 0..200 {
            let p = g.next_payload();
            let v: Vec<Value> = serde_json::from_slice(&p.body).unwrap();
            for (i, r) in v.iter().enumerate() {
                let is = spec.is_poison(p.first_seq + i as u64);
                assert_eq!(r.get("poison").is_some(), is);
                poison += usize::from(is);
                total += 1;
            }
        }
        assert!((50..=150).contains(&poison), "{poison} of {total} poisoned");
        // The NUL travels as the JSON escape that Postgres's jsonb rejects.
        let body = loop {
            let p = g.next_payload();
            if (p.first_seq..p.first_seq + p.records).any(|s| spec.is_poison(s)) {
                break String::from_utf8(p.body.to_vec()).unwrap();
            }
        };
        assert!(body.contains(r#""poison":"\u0000""#), "{body}");
    }
}
