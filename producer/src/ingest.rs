//! Turning a request body into records: content type, decompression under a hard cap, UTF-8,
//! nesting depth and JSON validation; and reading the request's Kafka message key
//! ([`message_key`]) and idempotency key ([`idempotency_key`]). Pure functions; the HTTP
//! layer maps [`Rejection`] to a status.
//!
//! Nothing here recurses on the input's nesting: the depth is counted by one loop over the
//! bytes before any parser sees them, and splitting into raw records uses serde_json's
//! iterative skipping. Only [`parsed_records`] (for `--schema`) builds trees, and only of
//! records whose depth was checked first.

use std::io::Read;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// How the body holds its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json`: one object, or an array of records.
    Json,
    /// `application/x-ndjson`: one JSON value per line.
    NdJson,
}

/// Why a request is refused. Nothing is written for any of these.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// 400: the body is not valid input.
    #[error("{0}")]
    BadRequest(String),
    /// 413: the body (or its decompressed form) is over the limit.
    #[error("{0}")]
    TooLarge(String),
    /// 415: a content type or encoding we do not read.
    #[error("{0}")]
    Unsupported(String),
}

const NOTHING_WRITTEN: &str = "Nothing was written.";

/// Reads the `Content-Type` header.
pub fn body_kind(content_type: Option<&str>) -> Result<BodyKind, Rejection> {
    let Some(ct) = content_type else {
        return Err(Rejection::Unsupported(format!(
            "missing Content-Type: send application/json or application/x-ndjson. {NOTHING_WRITTEN}"
        )));
    };
    let mut parts = ct.split(';');
    let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let charset_ok = parts.all(|p| {
        let p = p.trim().to_ascii_lowercase();
        !p.starts_with("charset=") || p == "charset=utf-8" || p == "charset=\"utf-8\""
    });
    if !charset_ok {
        return Err(Rejection::Unsupported(format!(
            "Content-Type {ct:?}: only UTF-8 is accepted. {NOTHING_WRITTEN}"
        )));
    }
    match mime.as_str() {
        "application/json" => Ok(BodyKind::Json),
        "application/x-ndjson"
        | "application/ndjson"
        | "application/jsonl"
        | "application/x-jsonlines" => Ok(BodyKind::NdJson),
        _ => Err(Rejection::Unsupported(format!(
            "Content-Type {ct:?} is not accepted: send application/json (an object or an array of \
             records) or application/x-ndjson (one record per line). {NOTHING_WRITTEN}"
        ))),
    }
}

/// The longest `X-Spillway-Key`, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// Reads the `X-Spillway-Key` header, given every value the request sent for it, as sent:
/// `None` without the header, else its one value, which must be 1 to [`MAX_KEY_BYTES`] bytes
/// of printable ASCII (space to `~`). It becomes the Kafka message key, so that the
/// partitioner puts every request of one key in one partition, in the order Kafka
/// acknowledged them. A key given twice is refused rather than one of them chosen: the two
/// could name different keys.
pub fn message_key<'h>(
    values: impl IntoIterator<Item = &'h [u8]>,
) -> Result<Option<&'h [u8]>, Rejection> {
    let rule = format!(
        "send 1 to {MAX_KEY_BYTES} bytes of printable ASCII (space to `~`). {NOTHING_WRITTEN}"
    );
    let Some(key) = only_value("X-Spillway-Key", values, &format!("send it once; {rule}"))? else {
        return Ok(None);
    };
    if key.is_empty() {
        return Err(Rejection::BadRequest(format!(
            "X-Spillway-Key is empty: leave it out for no key, or {rule}"
        )));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Rejection::BadRequest(format!(
            "X-Spillway-Key is {} bytes, more than {MAX_KEY_BYTES}, the limit: {rule}",
            key.len()
        )));
    }
    if let Some(at) = key.iter().position(|b| !(0x20..=0x7e).contains(b)) {
        return Err(Rejection::BadRequest(format!(
            "X-Spillway-Key is not printable ASCII: byte 0x{:02x} at offset {at}; {rule}",
            key[at]
        )));
    }
    Ok(Some(key))
}

/// Reads the `Idempotency-Key` header, given every value the request sent for it, as sent:
/// `None` without the header, else its one value, which must be a key
/// [`spillway_core::envelope::check_idempotency_key`] accepts (1 to 255 printable ASCII
/// characters). It travels in the envelope; the consumer writes the records of one key once.
/// A key given twice is refused rather than one of them chosen: the two could differ.
pub fn idempotency_key<'h>(
    values: impl IntoIterator<Item = &'h [u8]>,
) -> Result<Option<&'h str>, Rejection> {
    let what = format!("send it once, with one key per request. {NOTHING_WRITTEN}");
    let Some(key) = only_value("Idempotency-Key", values, &what)? else {
        return Ok(None);
    };
    spillway_core::envelope::check_idempotency_key(key)
        .map(Some)
        .map_err(|problem| {
            Rejection::BadRequest(format!(
                "Idempotency-Key {problem}; fix the key (or leave the header out) and send the \
                 request again. {NOTHING_WRITTEN}"
            ))
        })
}

/// The one value of the header `name` (`None` without it); a header given more than once is
/// refused, saying how many times and `what` to do, rather than one of the values chosen.
fn only_value<'h>(
    name: &str,
    values: impl IntoIterator<Item = &'h [u8]>,
    what: &str,
) -> Result<Option<&'h [u8]>, Rejection> {
    let mut values = values.into_iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    match values.count() {
        0 => Ok(Some(value)),
        also => Err(Rejection::BadRequest(format!(
            "{name} is given {} times: {what}",
            also + 1
        ))),
    }
}

/// Applies `Content-Encoding`, never producing more than `limit` bytes (a gzip bomb stops at
/// the cap instead of eating memory).
pub fn decode(
    encoding: Option<&str>,
    body: bytes::Bytes,
    limit: usize,
) -> Result<bytes::Bytes, Rejection> {
    match encoding.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("identity") => Ok(body),
        Some("gzip") | Some("x-gzip") => {
            let mut out = Vec::with_capacity((body.len() * 4).min(limit));
            let mut decoder = flate2::read::MultiGzDecoder::new(&body[..]).take(limit as u64 + 1);
            decoder.read_to_end(&mut out).map_err(|e| {
                Rejection::BadRequest(format!("the gzip body does not decompress: {e}. {NOTHING_WRITTEN}"))
            })?;
            if out.len() > limit {
                return Err(Rejection::TooLarge(format!(
                    "the body decompresses to more than {limit} bytes, the limit: split it into \
                     smaller requests. {NOTHING_WRITTEN}"
                )));
            }
            Ok(out.into())
        }
        Some(other) => Err(Rejection::Unsupported(format!(
            "Content-Encoding {other:?} is not accepted: send gzip or no encoding. {NOTHING_WRITTEN}"
        ))),
    }
}

/// Splits a decoded body into the raw bytes of each record, validating UTF-8, the nesting depth
/// (at most `max_depth` levels of arrays and objects in a record) and JSON. The slices are
/// exactly what the client sent (no re-serialisation).
pub fn records(kind: BodyKind, body: &[u8], max_depth: usize) -> Result<Vec<&[u8]>, Rejection> {
    let text = checked_text(kind, body, max_depth)?;
    split(kind, text)
}

/// As [`records`], but parses each record into a [`Value`] too, in the same single pass over
/// the body (a record is never parsed twice). `max_depth` bounds the trees built, so keep it
/// small (the schema check caps it at [`crate::schema::MAX_DEPTH`]).
///
/// Each record's tree is handed to `each` and dropped before the next is parsed, so a request
/// never holds more than one tree (a tree takes many times its record's bytes).
pub fn parsed_records(
    kind: BodyKind,
    body: &[u8],
    max_depth: usize,
    mut each: impl FnMut(&Value),
) -> Result<Vec<&[u8]>, Rejection> {
    let text = checked_text(kind, body, max_depth)?;
    let parsed = match kind {
        BodyKind::Json => json_values(text, &mut each),
        BodyKind::NdJson => ndjson_values(text, &mut each),
    };
    if let Some(parsed) = parsed {
        return Ok(parsed);
    }
    // Rare: let the raw split name the syntax error, with its line and column. A body it
    // accepts holds a record that JSON allows but a tree cannot hold (a number beyond f64).
    let raws = split(kind, text)?;
    for (index, raw) in raws.iter().enumerate() {
        if let Err(e) = whole_value(raw) {
            return Err(Rejection::BadRequest(format!(
                "record {index} cannot be checked against the schema: {}. {NOTHING_WRITTEN}",
                strip_position(&e)
            )));
        }
    }
    Err(Rejection::BadRequest(format!(
        "the body could not be read as records. {NOTHING_WRITTEN}"
    )))
}

fn checked_text(kind: BodyKind, body: &[u8], max_depth: usize) -> Result<&str, Rejection> {
    let text = std::str::from_utf8(body).map_err(|e| {
        Rejection::BadRequest(format!(
            "the body is not UTF-8: invalid byte at offset {}. {NOTHING_WRITTEN}",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(Rejection::BadRequest(format!(
            "the body is empty: send at least one record. {NOTHING_WRITTEN}"
        )));
    }
    check_depth(kind, text, max_depth)?;
    Ok(text)
}

fn split(kind: BodyKind, text: &str) -> Result<Vec<&[u8]>, Rejection> {
    match kind {
        BodyKind::Json => json_records(text),
        BodyKind::NdJson => ndjson_records(text),
    }
}

/// Refuses a body with a record nested more than `max_depth` arrays and objects deep (a
/// scalar has depth 0, `{"a": [1]}` depth 2), naming the first such record. One loop over the
/// bytes (string content eight at a time), whatever the depth; it runs before the JSON is
/// parsed, so on a body that is also malformed it may speak first.
pub fn check_depth(kind: BodyKind, text: &str, max_depth: usize) -> Result<(), Rejection> {
    // The records of a JSON array body sit one level inside it.
    let wrapped = kind == BodyKind::Json && text.trim_start().starts_with('[');
    let limit = max_depth.saturating_add(usize::from(wrapped));
    let (mut depth, mut index) = (0usize, 0usize);
    let (mut in_string, mut escaped, mut line_has_record) = (false, false, false);
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if in_string && !escaped {
            // String content holds no bracket: skip it eight bytes at a time, up to a quote,
            // a backslash or a control character (a newline among them).
            i += spillway_core::plain_run(&bytes[i..]);
            if i == bytes.len() {
                break;
            }
        }
        let b = bytes[i];
        i += 1;
        if b == b'\n' && kind == BodyKind::NdJson {
            // Each line is a record of its own (a JSON string holds no raw newline).
            index += usize::from(line_has_record);
            (depth, in_string, escaped, line_has_record) = (0, false, false, false);
            continue;
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Err(Rejection::BadRequest(format!(
                        "record {index} is nested more than {max_depth} levels deep (arrays and \
                         objects), the limit (--max-depth): flatten it. {NOTHING_WRITTEN}"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if wrapped && depth == 1 => index += 1,
            b'"' => in_string = true,
            b' ' | b'\t' | b'\r' | b'\n' => continue,
            _ => {}
        }
        line_has_record = true;
    }
    Ok(())
}

const JSON_WHITESPACE: [char; 4] = [' ', '\t', '\n', '\r'];

/// Parses `text` as one JSON value with nothing after it. serde_json's own limit of 128
/// nested levels is lifted: callers bound the depth with [`check_depth`] first.
fn whole_value(text: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(text);
    de.disable_recursion_limit();
    let value = Value::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// The JSON value at the start of `text` and its length in bytes.
fn leading_value(text: &str) -> Option<(Value, usize)> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let mut values = de.into_iter::<Value>();
    let value = values.next()?.ok()?;
    Some((value, values.byte_offset()))
}

/// One parse of a JSON body into records, each with its raw span; `None` on anything
/// [`json_records`] would refuse (it then names the error).
fn json_values<'b>(text: &'b str, each: &mut dyn FnMut(&Value)) -> Option<Vec<&'b [u8]>> {
    let body = text.trim_matches(JSON_WHITESPACE);
    if !body.starts_with('[') {
        let value = whole_value(body.as_bytes()).ok()?;
        if !value.is_object() {
            return None;
        }
        each(&value);
        return Some(vec![body.as_bytes()]);
    }
    let bytes = body.as_bytes();
    let skip = |mut at: usize| {
        while bytes.get(at).is_some_and(u8::is_ascii_whitespace) {
            at += 1;
        }
        at
    };
    let mut out = Vec::new();
    let mut at = 1;
    loop {
        at = skip(at);
        let (value, len) = leading_value(body.get(at..)?)?;
        each(&value);
        drop(value);
        out.push(bytes.get(at..at + len)?);
        at = skip(at + len);
        match bytes.get(at)? {
            b',' => at += 1,
            b']' => break,
            _ => return None,
        }
    }
    (at + 1 == bytes.len()).then_some(out)
}

fn ndjson_values<'b>(text: &'b str, each: &mut dyn FnMut(&Value)) -> Option<Vec<&'b [u8]>> {
    let mut out = Vec::new();
    for line in text.split('\n') {
        if line.trim().is_empty() {
            continue;
        }
        let raw = line.trim_matches(JSON_WHITESPACE).as_bytes();
        each(&whole_value(raw).ok()?);
        out.push(raw);
    }
    Some(out)
}

fn malformed(e: &serde_json::Error, line_offset: usize) -> Rejection {
    Rejection::BadRequest(format!(
        "malformed JSON at line {}, column {}: {}. {NOTHING_WRITTEN}",
        e.line() + line_offset,
        e.column(),
        strip_position(e)
    ))
}

/// serde_json appends " at line L column C" to its messages; we print the position ourselves.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn json_records(text: &str) -> Result<Vec<&[u8]>, Rejection> {
    let first = text.trim_start().as_bytes()[0];
    match first {
        b'[' => {
            let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| malformed(&e, 0))?;
            if items.is_empty() {
                return Err(Rejection::BadRequest(format!(
                    "the array holds no records: send at least one. {NOTHING_WRITTEN}"
                )));
            }
            Ok(items.into_iter().map(|r| r.get().as_bytes()).collect())
        }
        b'{' => {
            let one: &RawValue = serde_json::from_str(text).map_err(|e| malformed(&e, 0))?;
            Ok(vec![one.get().as_bytes()])
        }
        _ => {
            // Report a syntax error as such; a valid scalar is the wrong shape.
            serde_json::from_str::<&RawValue>(text).map_err(|e| malformed(&e, 0))?;
            Err(Rejection::BadRequest(format!(
                "the JSON body is a bare value: send an object (one record) or an array of \
                 records. {NOTHING_WRITTEN}"
            )))
        }
    }
}

fn ndjson_records(text: &str) -> Result<Vec<&[u8]>, Rejection> {
    let mut out = Vec::new();
    for (n, line) in text.split('\n').enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let raw: &RawValue = serde_json::from_str(line).map_err(|e| malformed(&e, n))?;
        out.push(raw.get().as_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Checks both ways of reading a body: [`records`] and [`parsed_records`] must agree.
    fn check(kind: BodyKind, body: &str, want: Result<Vec<&str>, &str>) {
        let mut trees = Vec::new();
        let parsed = parsed_records(kind, body.as_bytes(), 128, |v| trees.push(v.clone()));
        if let Ok(raws) = &parsed {
            let reparsed: Vec<Value> = raws.iter().map(|r| whole_value(r).unwrap()).collect();
            assert_eq!(trees, reparsed, "body {body:?}");
        }
        let got = records(kind, body.as_bytes(), 128);
        assert_eq!(
            parsed, got,
            "body {body:?}: parsed_records differs from records"
        );
        match (got, want) {
            (Ok(got), Ok(want)) => {
                let got: Vec<&str> = got
                    .iter()
                    .map(|r| std::str::from_utf8(r).unwrap())
                    .collect();
                assert_eq!(got, want, "body {body:?}");
            }
            (Err(Rejection::BadRequest(msg)), Err(needle)) => {
                assert!(
                    msg.contains(needle),
                    "body {body:?}: {msg:?} lacks {needle:?}"
                );
                assert!(msg.ends_with("Nothing was written."), "{msg}");
            }
            (got, want) => panic!("body {body:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn json_bodies() {
        use BodyKind::Json;
        check(Json, r#"{"a": 1}"#, Ok(vec![r#"{"a": 1}"#]));
        check(
            Json,
            r#" [ {"a":1} , 2, "x" ,{"b" : [1]}] "#,
            Ok(vec![r#"{"a":1}"#, "2", r#""x""#, r#"{"b" : [1]}"#]),
        );
        check(
            Json,
            r#"{"a": 1"#,
            Err("malformed JSON at line 1, column 7"),
        );
        check(Json, "[1,\n 2,,]", Err("line 2, column 4"));
        check(Json, "[]", Err("no records"));
        check(Json, "42", Err("bare value"));
        check(Json, "   ", Err("empty"));
        check(Json, r#"{"a":1} {"b":2}"#, Err("trailing characters"));
    }

    #[test]
    fn ndjson_bodies() {
        use BodyKind::NdJson;
        check(
            NdJson,
            "{\"a\":1}\r\n\n[2]\n3\n",
            Ok(vec![r#"{"a":1}"#, "[2]", "3"]),
        );
        check(NdJson, "{\"a\":1}\n{oops}\n", Err("line 2, column 2"));
    }

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn depth_is_counted_per_record_without_recursion() {
        use BodyKind::{Json, NdJson};
        let at_limit = nested(128);
        let over = nested(129);
        let deep = nested(100_000);
        check(Json, &format!("[{at_limit}]"), Ok(vec![at_limit.as_str()]));
        check(
            Json,
            &deep,
            Err("record 0 is nested more than 128 levels deep"),
        );
        check(
            Json,
            &format!("[1, {{\"a\": \"[[[,\\\"[\"}}, {over}]"),
            Err("record 2 is nested more than 128 levels deep"),
        );
        // Brackets, commas, escaped quotes and backslashes inside strings, at every place in
        // an eight-byte block (string content is skipped eight bytes at a time).
        for pad in 0..9 {
            let p = "x".repeat(pad);
            let tricky = format!("{{\"{p}\": \"{p}[[[,\\\\\\\"{{{p}\\\\\", \"b\": [\"]]]{p}\"]}}");
            check(
                Json,
                &format!("[{tricky}, {over}]"),
                Err("record 1 is nested more than 128"),
            );
            check(
                Json,
                &format!("[{tricky},1]"),
                Ok(vec![tricky.as_str(), "1"]),
            );
        }
        let objects = format!("{}1{}", "{\"a\":".repeat(129), "}".repeat(129));
        check(Json, &objects, Err("record 0 is nested more than 128"));
        check(
            NdJson,
            &format!("{{}}\n\n[\"]\"]\n{deep}\n"),
            Err("record 2 is nested more than 128"),
        );
        check(
            NdJson,
            &format!("{at_limit}\n"),
            Ok(vec![at_limit.as_str()]),
        );
        // A JSON array body holds records: here one record `[[1]]`, depth 2.
        assert!(records(Json, b"[[[1]]]", 2).is_ok());
        assert!(records(Json, b"[[[[1]]]]", 2).is_err());
        assert!(records(Json, br#"{"a": {"b": 1}}"#, 1).is_err());
    }

    #[test]
    fn a_number_no_tree_can_hold_is_named_for_the_schema_check() {
        let body = br#"[{"a": 1}, {"big": 1e400}]"#;
        assert!(records(BodyKind::Json, body, 128).is_ok());
        let err = parsed_records(BodyKind::Json, body, 128, |_| {}).unwrap_err();
        assert!(
            err.to_string().contains("record 1 cannot be checked"),
            "{err}"
        );
    }

    #[test]
    fn invalid_utf8_names_the_offset() {
        let err = records(BodyKind::Json, b"{\"a\":\"\xff\"}", 128).unwrap_err();
        assert!(
            err.to_string()
                .contains("not UTF-8: invalid byte at offset 6"),
            "{err}"
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(
            body_kind(Some("application/json; charset=UTF-8")),
            Ok(BodyKind::Json)
        );
        assert_eq!(
            body_kind(Some("application/x-ndjson")),
            Ok(BodyKind::NdJson)
        );
        assert!(matches!(
            body_kind(Some("text/plain")),
            Err(Rejection::Unsupported(_))
        ));
        assert!(matches!(
            body_kind(Some("application/json; charset=latin1")),
            Err(Rejection::Unsupported(_))
        ));
        assert!(matches!(body_kind(None), Err(Rejection::Unsupported(_))));
    }

    /// Checks [`message_key`] on the header's `values`: the key, or a 400 whose message holds
    /// `needle` and says what a key may be.
    fn check_key(values: &[&[u8]], want: Result<Option<&[u8]>, &str>) {
        let got = message_key(values.iter().copied());
        match (got, want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "values {values:?}"),
            (Err(Rejection::BadRequest(msg)), Err(needle)) => {
                assert!(
                    msg.starts_with("X-Spillway-Key ") && msg.contains(needle),
                    "values {values:?}: {msg:?} lacks {needle:?}"
                );
                assert!(
                    msg.ends_with(
                        "send 1 to 255 bytes of printable ASCII (space to `~`). Nothing was written."
                    ),
                    "{msg}"
                );
            }
            (got, want) => panic!("values {values:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn message_keys() {
        let longest = [b'k'; MAX_KEY_BYTES];
        let too_long = [b'k'; MAX_KEY_BYTES + 1];
        check_key(&[], Ok(None));
        check_key(&[b"user-7"], Ok(Some(b"user-7")));
        check_key(&[b" a b ~"], Ok(Some(b" a b ~")));
        check_key(&[b"~"], Ok(Some(b"~")));
        check_key(&[&longest], Ok(Some(&longest)));
        check_key(&[b""], Err("is empty: leave it out for no key, or send"));
        check_key(&[&too_long], Err("is 256 bytes, more than 255, the limit"));
        check_key(&[b"a", b"a"], Err("is given 2 times: send it once"));
        check_key(&[b"a", b"", b"c"], Err("is given 3 times"));
        check_key(&["cl\u{e9}".as_bytes()], Err("byte 0xc3 at offset 2"));
        check_key(
            &[b"a\tb"],
            Err("not printable ASCII: byte 0x09 at offset 1"),
        );
        check_key(&[b"\x1f"], Err("byte 0x1f at offset 0"));
        check_key(&[b"a\x7f"], Err("byte 0x7f at offset 1"));
    }

    #[test]
    fn idempotency_keys() {
        let longest = [b'k'; 255];
        fn ok<'h>(values: &[&'h [u8]]) -> Result<Option<&'h str>, Rejection> {
            idempotency_key(values.iter().copied())
        }
        assert_eq!(ok(&[]), Ok(None));
        assert_eq!(ok(&[b"order-42 retry ~"]), Ok(Some("order-42 retry ~")));
        assert_eq!(ok(&[&longest]).map(|k| k.map(str::len)), Ok(Some(255)));
        let refused: [(&[&[u8]], &str); 5] = [
            (&[b""], "is 0 bytes long"),
            (&[&[b'k'; 256]], "is 256 bytes long"),
            (&[b"a\tb"], "holds byte 0x09 at position 1"),
            (&["cl\u{e9}".as_bytes()], "holds byte 0xc3 at position 2"),
            (&[b"a", b"a"], "is given 2 times: send it once"),
        ];
        for (values, needle) in refused {
            let Err(Rejection::BadRequest(msg)) = ok(values) else {
                panic!("{values:?} accepted");
            };
            assert!(
                msg.starts_with("Idempotency-Key ") && msg.contains(needle),
                "{values:?}: {msg:?} lacks {needle:?}"
            );
            assert!(msg.ends_with(NOTHING_WRITTEN), "{msg}");
        }
    }

    fn gzip(data: &[u8]) -> bytes::Bytes {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap().into()
    }

    #[test]
    fn gzip_is_decoded_and_a_bomb_stops_at_the_cap() {
        let body = decode(Some("gzip"), gzip(b"[1,2]"), 100).unwrap();
        assert_eq!(&body[..], b"[1,2]");
        // 64 MiB of zeros compresses to ~64 KiB; decoding must stop right after the 1 MiB cap.
        let bomb = gzip(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 100_000);
        assert!(matches!(
            decode(Some("gzip"), bomb, 1 << 20),
            Err(Rejection::TooLarge(_))
        ));
        assert!(matches!(
            decode(Some("gzip"), "not gzip".into(), 100),
            Err(Rejection::BadRequest(_))
        ));
        assert!(matches!(
            decode(Some("br"), "x".into(), 100),
            Err(Rejection::Unsupported(_))
        ));
    }
}
