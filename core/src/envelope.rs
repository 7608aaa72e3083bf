//! The Kafka message that carries one accepted HTTP request.
//!
//! One request becomes one message, so a request is atomic: all its records reach Kafka or
//! none do. Records travel as the raw JSON bytes the client sent (validated by the producer,
//! never re-serialised), so the consumer can hand them to Postgres without parsing them again.
//!
//! Wire format, version 1 (all integers big-endian):
//!
//! ```text
//! "SPWY"  u8 version=1  u8 flags(bit0: has source, bit1: sequenced request id,
//!                                  bit2: has idempotency key)
//! i64 received_at (UTC microseconds since the Unix epoch)
//! [16] request id (sequenced: u64 producer id, then u64 sequence number)
//! if has source: u16 length, UTF-8 bytes
//! if has idempotency key: u8 length (1 to 255), printable ASCII bytes
//! u32 record count, then per record: u32 length, bytes
//! ```
//!
//! The *idempotency key* is the client's `Idempotency-Key` header: the consumer writes the
//! records of one key once ([`check_idempotency_key`] says what a key may be). A reader built
//! before bit 2 cannot read such a message (it dead-letters it as undecodable): upgrade the
//! consumers before the producers.
//!
//! A *sequenced* request id names the producer's Kafka client and numbers its messages in the
//! order it handed them to that client, so within one partition one producer's messages are in
//! increasing sequence order, except a copy: the same message stored again after an answer was
//! lost (librdkafka re-sends it at a new epoch after a timeout). The consumer skips copies by
//! that order ([`crate::consumer`]). A reader that does not know bit 1 ignores it.

use std::fmt;

const MAGIC: &[u8; 4] = b"SPWY";
/// The format version this crate writes.
pub const VERSION: u8 = 1;
const FLAG_SOURCE: u8 = 1;
const FLAG_SEQUENCED: u8 = 2;
const FLAG_KEY: u8 = 4;

/// The longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Whether `key` may be an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY`] printable ASCII
/// characters (space to `~`). The error says what is wrong.
pub fn check_idempotency_key(key: &[u8]) -> Result<&str, String> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(format!(
            "is {} bytes long: a key is 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters",
            key.len()
        ));
    }
    if let Some(at) = key.iter().position(|b| !(b' '..=b'~').contains(b)) {
        return Err(format!(
            "holds byte 0x{:02x} at position {at}: a key is printable ASCII (space to ~)",
            key[at]
        ));
    }
    std::str::from_utf8(key).map_err(|e| e.to_string())
}
const HEADER_LEN: usize = 4 + 1 + 1 + 8 + 16;
/// Where the request id is in an encoded envelope.
const REQUEST_ID_AT: usize = 4 + 1 + 1 + 8;

/// A request id: 128 bits, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub [u8; 16]);

impl RequestId {
    /// Builds an id from a 128-bit number.
    pub fn from_u128(n: u128) -> Self {
        RequestId(n.to_be_bytes())
    }

    /// The id of a producer's `sequence`-th message: the producer's id, then the number.
    pub fn sequenced(at: ProducerSequence) -> Self {
        Self::from_u128((u128::from(at.producer) << 64) | u128::from(at.sequence))
    }

    /// Reads an id built by [`RequestId::sequenced`].
    pub fn producer_sequence(&self) -> ProducerSequence {
        let n = u128::from_be_bytes(self.0);
        ProducerSequence {
            producer: (n >> 64) as u64,
            sequence: n as u64,
        }
    }
}

/// Which producer client wrote a message, and its place in that client's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProducerSequence {
    /// Random, one per Kafka client of a producer process.
    pub producer: u64,
    /// Counts that client's messages in the order it was given them.
    pub sequence: u64,
}

impl ProducerSequence {
    /// Raises `highest`'s entry for this producer to this sequence if it is lower (or has
    /// none): the highest sequence seen per producer.
    pub fn raise(self, highest: &mut std::collections::BTreeMap<u64, u64>) {
        let high = highest.entry(self.producer).or_insert(self.sequence);
        *high = (*high).max(self.sequence);
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

/// One accepted request, borrowing its records from the buffer it was built or decoded from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// When the producer accepted the request, in UTC microseconds since the Unix epoch.
    pub received_at_micros: i64,
    /// The id the producer gave the request (also returned to the client).
    pub request_id: RequestId,
    /// Whether the id is [sequenced](RequestId::sequenced).
    pub sequenced: bool,
    /// The client's `Idempotency-Key`, if it sent one (checked by [`check_idempotency_key`]).
    pub idempotency_key: Option<&'a str>,
    /// Optional free-form origin (for example the client's address or token name).
    pub source: Option<&'a str>,
    /// The records, each the exact JSON bytes the client sent.
    pub records: Vec<&'a [u8]>,
}

/// Why a message is not a valid envelope.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeErrorKind {
    /// The message does not start with the envelope magic: it was not written by Spillway.
    #[error("not a Spillway envelope (no SPWY magic)")]
    NotAnEnvelope,
    /// Written by a newer (or unknown) format version.
    #[error("unsupported envelope version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u8),
    /// The message ends before a field it announces.
    #[error("truncated envelope: {0}")]
    Truncated(&'static str),
    /// The source metadata is not UTF-8.
    #[error("source metadata is not UTF-8")]
    BadSource,
    /// The idempotency key is not one [`check_idempotency_key`] accepts.
    #[error("bad idempotency key: {0}")]
    BadKey(String),
    /// Bytes are left after the last record.
    #[error("{0} unexpected bytes after the last record")]
    TrailingBytes(usize),
}

/// A message that does not decode, with its raw bytes so it can be dead-lettered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct DecodeError {
    /// What is wrong.
    pub kind: DecodeErrorKind,
    /// The whole message as received.
    pub raw: Vec<u8>,
}

impl<'a> Envelope<'a> {
    /// The number of bytes [`Envelope::encode`] will produce.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + self.source.map_or(0, |s| 2 + s.len())
            + self.idempotency_key.map_or(0, |k| 1 + k.len())
            + 4
            + self.records.iter().map(|r| 4 + r.len()).sum::<usize>()
    }

    /// Encodes into a new buffer.
    ///
    /// # Panics
    /// If the source is longer than 65,535 bytes, the idempotency key longer than 255, a record longer than 4 GiB or there are more
    /// than 2^32 records: the producer's request limits keep far below these.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        let source = if self.source.is_some() {
            FLAG_SOURCE
        } else {
            0
        };
        let sequenced = if self.sequenced { FLAG_SEQUENCED } else { 0 };
        let key = if self.idempotency_key.is_some() {
            FLAG_KEY
        } else {
            0
        };
        out.push(source | sequenced | key);
        out.extend_from_slice(&self.received_at_micros.to_be_bytes());
        out.extend_from_slice(&self.request_id.0);
        if let Some(source) = self.source {
            let len = u16::try_from(source.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&source.as_bytes()[..len as usize]);
        }
        if let Some(key) = self.idempotency_key {
            let len = u8::try_from(key.len()).unwrap_or(u8::MAX);
            out.push(len);
            out.extend_from_slice(&key.as_bytes()[..len as usize]);
        }
        let count = u32::try_from(self.records.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for record in self.records.iter().take(count as usize) {
            let len = u32::try_from(record.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&record[..len as usize]);
        }
        out
    }

    /// Replaces the request id of an envelope [`Envelope::encode`] made (the producer stamps
    /// the sequenced id at the moment it hands the message to Kafka). Does nothing to bytes
    /// too short to be one.
    pub fn stamp_request_id(encoded: &mut [u8], id: RequestId) {
        if let Some(at) = encoded.get_mut(REQUEST_ID_AT..HEADER_LEN) {
            at.copy_from_slice(&id.0);
        }
    }

    /// Decodes a message, borrowing the records from `bytes`.
    pub fn decode(bytes: &'a [u8]) -> Result<Envelope<'a>, DecodeError> {
        Self::decode_inner(bytes).map_err(|kind| DecodeError {
            kind,
            raw: bytes.to_vec(),
        })
    }

    fn decode_inner(bytes: &'a [u8]) -> Result<Envelope<'a>, DecodeErrorKind> {
        let mut r = Reader(bytes);
        if r.take(4, "magic").ok() != Some(&MAGIC[..]) {
            return Err(DecodeErrorKind::NotAnEnvelope);
        }
        let version = r.take(1, "version")?[0];
        if version != VERSION {
            return Err(DecodeErrorKind::UnsupportedVersion(version));
        }
        let flags = r.take(1, "flags")?[0];
        let received_at_micros = i64::from_be_bytes(r.array("received-at")?);
        let request_id = RequestId(r.array("request id")?);
        let source = if flags & FLAG_SOURCE != 0 {
            let len = u16::from_be_bytes(r.array("source length")?) as usize;
            let raw = r.take(len, "source")?;
            Some(std::str::from_utf8(raw).map_err(|_| DecodeErrorKind::BadSource)?)
        } else {
            None
        };
        let idempotency_key = if flags & FLAG_KEY != 0 {
            let len = r.take(1, "idempotency key length")?[0] as usize;
            let raw = r.take(len, "idempotency key")?;
            Some(check_idempotency_key(raw).map_err(DecodeErrorKind::BadKey)?)
        } else {
            None
        };
        let count = u32::from_be_bytes(r.array("record count")?) as usize;
        // Each record needs at least its 4-byte length: bound the allocation by what is there.
        let mut records = Vec::with_capacity(count.min(r.0.len() / 4));
        for _ in 0..count {
            let len = u32::from_be_bytes(r.array("record length")?) as usize;
            records.push(r.take(len, "record")?);
        }
        if !r.0.is_empty() {
            return Err(DecodeErrorKind::TrailingBytes(r.0.len()));
        }
        Ok(Envelope {
            received_at_micros,
            request_id,
            sequenced: flags & FLAG_SEQUENCED != 0,
            idempotency_key,
            source,
            records,
        })
    }

    /// Where the message stands in its producer's order, if its id is sequenced.
    pub fn producer_sequence(&self) -> Option<ProducerSequence> {
        self.sequenced.then(|| self.request_id.producer_sequence())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeErrorKind> {
        if self.0.len() < n {
            return Err(DecodeErrorKind::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeErrorKind> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Envelope<'static> {
        Envelope {
            received_at_micros: 1_764_000_000_123_456,
            request_id: RequestId::from_u128(0xDEAD_BEEF),
            sequenced: false,
            idempotency_key: None,
            source: Some("10.0.0.1"),
            records: vec![br#"{"a":1}"#, b"[1, 2]", b"\"x\""],
        }
    }

    #[test]
    fn round_trips_and_keeps_record_bytes_exactly() {
        let e = sample();
        let bytes = e.encode();
        assert_eq!(bytes.len(), e.encoded_len());
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
    }

    #[test]
    fn a_sequenced_id_carries_its_producer_and_number_and_says_so() {
        let at = ProducerSequence {
            producer: 0xFEED_0000_0000_0001,
            sequence: 41,
        };
        let e = Envelope {
            request_id: RequestId::sequenced(at),
            sequenced: true,
            idempotency_key: None,
            ..sample()
        };
        let mut bytes = Envelope {
            request_id: RequestId::from_u128(0),
            ..e.clone()
        }
        .encode();
        Envelope::stamp_request_id(&mut bytes, e.request_id);
        assert_eq!(bytes, e.encode());
        let back = Envelope::decode(&bytes).unwrap();
        assert_eq!(back.producer_sequence(), Some(at));
        assert_eq!(back.source, Some("10.0.0.1"));
        assert_eq!(
            Envelope::decode(&sample().encode())
                .unwrap()
                .producer_sequence(),
            None
        );
    }

    #[test]
    fn an_idempotency_key_travels_with_its_request_and_a_bad_one_is_refused() {
        let e = Envelope {
            idempotency_key: Some("order-42 retry"),
            ..sample()
        };
        let bytes = e.encode();
        assert_eq!(bytes.len(), e.encoded_len());
        let back = Envelope::decode(&bytes).unwrap();
        assert_eq!(back.idempotency_key, Some("order-42 retry"));
        assert_eq!(back.source, Some("10.0.0.1"));
        assert_eq!(back.records, e.records);
        assert!(check_idempotency_key(b"").is_err());
        assert!(check_idempotency_key(&[b'a'; 256]).is_err());
        assert!(check_idempotency_key(&[b'a'; 255]).is_ok());
        let tab = check_idempotency_key(b"a\tb").unwrap_err();
        assert!(tab.contains("0x09 at position 1"), "{tab}");
        assert!(check_idempotency_key("é".as_bytes()).is_err());
        // A key byte made unprintable in transit is a decode error, not a key.
        let at = bytes.windows(5).position(|w| w == b"order").unwrap();
        let mut bad = bytes.clone();
        bad[at] = 0x7f;
        assert!(matches!(
            Envelope::decode(&bad).unwrap_err().kind,
            DecodeErrorKind::BadKey(_)
        ));
    }

    #[test]
    fn bad_messages_are_typed_errors_carrying_the_raw_bytes() {
        let good = sample().encode();
        let check = |bytes: &[u8], want: DecodeErrorKind| {
            let err = Envelope::decode(bytes).unwrap_err();
            assert_eq!(err.kind, want);
            assert_eq!(err.raw, bytes);
        };
        check(br#"{"data": 1}"#, DecodeErrorKind::NotAnEnvelope);
        let mut v2 = good.clone();
        v2[4] = 2;
        check(&v2, DecodeErrorKind::UnsupportedVersion(2));
        check(
            &good[..good.len() - 1],
            DecodeErrorKind::Truncated("record"),
        );
        let mut extra = good.clone();
        extra.push(0);
        check(&extra, DecodeErrorKind::TrailingBytes(1));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn any_envelope_round_trips(
            at in any::<i64>(),
            id in any::<u128>(),
            sequenced in any::<bool>(),
            key in proptest::option::of("[ -~]{1,255}"),
            source in proptest::option::of(".{0,40}"),
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..20),
        ) {
            let e = Envelope {
                received_at_micros: at,
                request_id: RequestId::from_u128(id),
                sequenced,
                idempotency_key: key.as_deref(),
                source: source.as_deref(),
                records: records.iter().map(|r| r.as_slice()).collect(),
            };
            let bytes = e.encode();
            prop_assert_eq!(Envelope::decode(&bytes).unwrap(), e);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Envelope::decode(&bytes);
        }
    }
}
