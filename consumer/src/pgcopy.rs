//! The COPY BINARY wire format for the records table, written by hand: one pass over the
//! batch into one buffer, JSON bytes copied as they came (jsonb's binary input is a version
//! byte followed by the JSON text, so nothing is parsed or re-serialised here).

use bytes::{BufMut, BytesMut};
use spillway_core::Record;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds between the Unix epoch and Postgres' epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The column list the encoder writes, in order.
pub const COLUMNS: &str = "kafka_partition, kafka_offset, record_index, received_at, data";

/// Encodes rows for `COPY table (COLUMNS) FROM STDIN (FORMAT binary)`.
pub fn encode<'a>(rows: impl Iterator<Item = &'a Record>, size_hint: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(size_hint + 64);
    buf.put_slice(SIGNATURE);
    buf.put_i32(0); // flags
    buf.put_i32(0); // header extension length
    for r in rows {
        buf.put_i16(5);
        buf.put_i32(4);
        buf.put_i32(r.partition);
        buf.put_i32(8);
        buf.put_i64(r.offset);
        buf.put_i32(4);
        buf.put_i32(r.index as i32);
        buf.put_i32(8);
        buf.put_i64(r.received_at_micros - PG_EPOCH_OFFSET_MICROS);
        buf.put_i32(r.payload.len() as i32 + 1);
        buf.put_u8(1); // jsonb binary format version
        buf.put_slice(&r.payload);
    }
    buf.put_i16(-1);
    buf
}

/// Bytes per row besides the JSON itself.
pub const ROW_OVERHEAD: usize = 2 + 4 * 5 + 4 + 8 + 4 + 8 + 1;
