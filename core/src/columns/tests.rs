use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::calendar::civil_from_days;
use crate::envelope::RequestId;
use crate::pgcopy::CopyRows;

fn spec(s: &str) -> ColumnSpec {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// One value converted into `ty`'s field, without its length prefix.
fn conv(ty: ColumnType, raw: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    convert(ty, raw, &mut out)?;
    let len = i32::from_be_bytes(out[..4].try_into().unwrap());
    assert_eq!(len as usize, out.len() - 4, "length prefix of {raw}");
    Ok(out[4..].to_vec())
}

fn record(payload: &str) -> Record {
    Record {
        partition: 2,
        offset: 40,
        index: 3,
        last_in_message: false,
        received_at_micros: PG_EPOCH_OFFSET_MICROS + 1_000_000,
        request_id: RequestId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
        sequenced: false,
        idempotency_key: None,
        kafka: None,
        payload: payload.as_bytes().to_vec(),
    }
}

/// The mapped fields of one row (after the four base columns), each `None` for NULL.
fn row(columns: &[&str], r: &Record) -> Result<Vec<Option<Vec<u8>>>, ConvertError> {
    let m = Mapping::new(columns.iter().map(|c| spec(c)).collect(), false).unwrap();
    let mut rows = CopyRows::new(&m, 0);
    rows.push(r)?;
    let buf = rows.finish();
    let mut at = 11 + 8;
    let fields = i16::from_be_bytes(buf[at..at + 2].try_into().unwrap()) as usize;
    assert_eq!(fields, 4 + columns.len());
    at += 2;
    let mut out = Vec::new();
    for _ in 0..fields {
        let len = i32::from_be_bytes(buf[at..at + 4].try_into().unwrap());
        at += 4;
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(buf[at..at + len as usize].to_vec()));
            at += len as usize;
        }
    }
    assert_eq!(&buf[at..], &(-1i16).to_be_bytes());
    Ok(out.split_off(4))
}

#[test]
fn mappings_parse_with_their_type_nullability_and_source() {
    let c = spec("user_id:bigint!=/user/id");
    assert_eq!(c.name, "user_id");
    assert_eq!(c.ty, ColumnType::Bigint);
    assert!(c.not_null);
    let Source::Pointer(p) = &c.source else {
        panic!("a pointer")
    };
    assert_eq!(p.tokens(), ["user", "id"]);
    assert_eq!(c.quoted_name(), "\"user_id\"");

    for (text, ty) in [
        ("text", ColumnType::Text),
        ("BIGINT", ColumnType::Bigint),
        ("int8", ColumnType::Bigint),
        ("int", ColumnType::Integer),
        ("int2", ColumnType::Smallint),
        ("double  precision", ColumnType::Double),
        ("float8", ColumnType::Double),
        ("numeric", ColumnType::Numeric),
        ("bool", ColumnType::Boolean),
        ("timestamptz", ColumnType::Timestamptz),
        ("timestamptz(s)", ColumnType::TimestamptzSeconds),
        ("timestamptz(ms)", ColumnType::TimestamptzMillis),
        ("date", ColumnType::Date),
        ("uuid", ColumnType::Uuid),
        ("jsonb", ColumnType::Jsonb),
        ("text[]", ColumnType::TextArray),
    ] {
        assert_eq!(spec(&format!("c:{text}=/c")).ty, ty, "{text}");
    }
    assert_eq!(
        spec("at:timestamptz(ms)=/ts").ty.catalog_name(),
        "timestamp with time zone"
    );
    assert_eq!(spec("at:timestamptz(ms)=/ts").ty.sql(), "timestamptz");
    assert_eq!(
        spec("all:jsonb=").source,
        Source::Pointer(Pointer::parse("").unwrap())
    );
}

#[test]
fn pointers_follow_rfc_6901_escapes() {
    let p = Pointer::parse("/a~1b/~0c/~01/").unwrap();
    assert_eq!(p.tokens(), ["a/b", "~c", "~1", ""]);
    assert!(Pointer::parse("").unwrap().tokens().is_empty());
    for bad in ["a/b", "/a~2", "/a~"] {
        assert!(Pointer::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn metadata_columns_take_only_their_types() {
    assert_eq!(
        spec("rid:text=@request_id").source,
        Source::Meta(Meta::RequestId)
    );
    for ok in [
        "rid:uuid=@request_id",
        "at:timestamptz=@received_at",
        "k:text=@kafka_key",
        "k:jsonb=@kafka_key",
        "kt:timestamptz!=@kafka_timestamp",
        "p:integer=@kafka_partition",
        "o:bigint=@kafka_offset",
        "i:bigint=@record_index",
        "h:jsonb=@headers",
    ] {
        spec(ok);
    }
    let err = |s: &str| s.parse::<ColumnSpec>().unwrap_err().problem;
    assert!(err("rid:bigint=@request_id").contains("use text or uuid"));
    assert!(err("x:text=@nope").contains("@kafka_key"));
}

#[test]
fn bad_mappings_say_what_to_write() {
    let err = |s: &str| s.parse::<ColumnSpec>().unwrap_err().to_string();
    assert!(err("user_id").contains("NAME:TYPE=POINTER"));
    assert!(err("user_id:bigint").contains("no '='"));
    assert!(err("UserId:bigint=/u").contains("lowercase"));
    assert!(err("1a:bigint=/u").contains("not a column name"));
    assert!(err("a;drop:bigint=/u").contains("not a column name"));
    assert!(err(&format!("{}:bigint=/u", "a".repeat(64))).contains("at most 63"));
    assert!(err("data:jsonb=/d").contains("always writes"));
    assert!(err("n:varchar=/n").contains("unknown type"));
    assert!(err("n:bigint=n").contains("start with /"));
    let dup = Mapping::new(vec![spec("a:text=/a"), spec("a:bigint=/b")], true).unwrap_err();
    assert!(dup.problem.contains("mapped twice"), "{dup}");
}

#[test]
fn integers_are_strict_numbers_in_range() {
    let i64_of = |raw: &str| {
        conv(ColumnType::Bigint, raw).map(|b| i64::from_be_bytes(b.try_into().unwrap()))
    };
    assert_eq!(i64_of("42"), Ok(42));
    assert_eq!(i64_of("-0"), Ok(0));
    assert_eq!(i64_of("42.0"), Ok(42));
    assert_eq!(i64_of("4.2e1"), Ok(42));
    assert_eq!(i64_of("4200e-2"), Ok(42));
    assert_eq!(i64_of("-9223372036854775808"), Ok(i64::MIN));
    assert!(i64_of("9223372036854775808")
        .unwrap_err()
        .contains("out of range for bigint"));
    assert!(i64_of("1e400").unwrap_err().contains("out of range"));
    assert!(i64_of("1.5").unwrap_err().contains("fraction"));
    assert!(i64_of("1e-400").unwrap_err().contains("fraction"));
    assert!(i64_of("\"42\"")
        .unwrap_err()
        .contains("strings are not converted"));
    assert!(i64_of("true").unwrap_err().contains("not a boolean"));
    assert_eq!(
        conv(ColumnType::Integer, "-2147483648"),
        Ok(i32::MIN.to_be_bytes().to_vec())
    );
    assert!(conv(ColumnType::Integer, "2147483648")
        .unwrap_err()
        .contains("integer"));
    assert_eq!(
        conv(ColumnType::Smallint, "-32768"),
        Ok(i16::MIN.to_be_bytes().to_vec())
    );
    assert!(conv(ColumnType::Smallint, "32768")
        .unwrap_err()
        .contains("smallint"));
}

#[test]
fn doubles_booleans_text_and_jsonb() {
    assert_eq!(
        conv(ColumnType::Double, "1.5"),
        Ok(1.5f64.to_be_bytes().to_vec())
    );
    assert_eq!(
        conv(ColumnType::Double, "-2e-3"),
        Ok((-2e-3f64).to_be_bytes().to_vec())
    );
    assert!(conv(ColumnType::Double, "1e400")
        .unwrap_err()
        .contains("out of range"));
    assert!(conv(ColumnType::Double, "\"1\"").is_err());
    assert_eq!(conv(ColumnType::Boolean, "true"), Ok(vec![1]));
    assert_eq!(conv(ColumnType::Boolean, "false"), Ok(vec![0]));
    assert!(conv(ColumnType::Boolean, "1")
        .unwrap_err()
        .contains("true or false"));
    assert_eq!(
        conv(ColumnType::Text, r#""a\nb\u00e9""#),
        Ok("a\nbé".as_bytes().to_vec())
    );
    assert_eq!(conv(ColumnType::Text, "42"), Ok(b"42".to_vec()));
    assert_eq!(
        conv(ColumnType::Text, r#"{"x": 1}"#),
        Ok(br#"{"x": 1}"#.to_vec())
    );
    let mut jsonb = vec![1];
    jsonb.extend_from_slice(br#"{"a": [1, 2]}"#);
    assert_eq!(conv(ColumnType::Jsonb, r#"{"a": [1, 2]}"#), Ok(jsonb));
}

/// numeric's binary form (Postgres' `numeric_send`): ndigits, weight, sign, dscale, then
/// base-10000 digits.
fn numeric(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&ndigits.to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&dscale.to_be_bytes());
    for d in digits {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out
}

#[test]
fn numeric_follows_postgres_base_10000_format() {
    let n = |raw| conv(ColumnType::Numeric, raw).unwrap();
    assert_eq!(n("0"), numeric(0, 0, 0, 0, &[]));
    assert_eq!(n("-0.00"), numeric(0, 0, 0, 2, &[]));
    assert_eq!(n("1.50"), numeric(2, 0, 0, 2, &[1, 5000]));
    assert_eq!(n("-12345.678"), numeric(3, 1, 0x4000, 3, &[1, 2345, 6780]));
    assert_eq!(n("10000"), numeric(1, 1, 0, 0, &[1]));
    assert_eq!(n("100000000.5"), numeric(4, 2, 0, 1, &[1, 0, 0, 5000]));
    assert_eq!(n("0.0001"), numeric(1, -1, 0, 4, &[1]));
    assert_eq!(n("1e-5"), numeric(1, -2, 0, 5, &[1000]));
    assert_eq!(n("1.5e2"), numeric(1, 0, 0, 0, &[150]));
    assert_eq!(
        n("12345678901234567890123"),
        numeric(6, 5, 0, 0, &[123, 4567, 8901, 2345, 6789, 123])
    );
    assert!(conv(ColumnType::Numeric, "1e200000")
        .unwrap_err()
        .contains("out of range"));
    assert!(conv(ColumnType::Numeric, "\"1.5\"").is_err());
}

/// Reads numeric's binary form back into a plain decimal string (the property's oracle).
fn numeric_text(b: &[u8]) -> String {
    let at = |i: usize| i16::from_be_bytes([b[i], b[i + 1]]);
    let (ndigits, weight, sign, dscale) = (at(0) as i64, at(2) as i64, at(4) as u16, at(6) as i64);
    let digits: Vec<i64> = (0..ndigits)
        .map(|i| at(8 + 2 * i as usize) as i64)
        .collect();
    let mut int = String::new();
    for g in (0..=weight.max(0)).rev() {
        let d = usize::try_from(weight - g)
            .ok()
            .and_then(|i| digits.get(i))
            .copied()
            .unwrap_or(0);
        int.push_str(&format!("{d:04}"));
    }
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let mut frac = String::new();
    for g in 1..=((dscale + 3) / 4) {
        let d = usize::try_from(weight + g)
            .ok()
            .and_then(|i| digits.get(i))
            .copied()
            .unwrap_or(0);
        frac.push_str(&format!("{d:04}"));
    }
    frac.truncate(dscale as usize);
    let sign = if sign == 0x4000 { "-" } else { "" };
    if dscale > 0 {
        format!("{sign}{int}.{frac}")
    } else {
        format!("{sign}{int}")
    }
}

#[test]
fn timestamps_are_microseconds_since_2000() {
    let t = |raw: &str| {
        conv(ColumnType::Timestamptz, raw).map(|b| i64::from_be_bytes(b.try_into().unwrap()))
    };
    assert_eq!(t("\"2000-01-01T00:00:00Z\""), Ok(0));
    assert_eq!(t("\"1970-01-01T00:00:00Z\""), Ok(-PG_EPOCH_OFFSET_MICROS));
    assert_eq!(t("\"2000-01-01T01:00:00+01:00\""), Ok(0));
    assert_eq!(t("\"1999-12-31t23:30:00-00:30\""), Ok(0));
    assert_eq!(t("\"2000-01-01 00:00:00.000001Z\""), Ok(1));
    assert_eq!(t("\"2000-01-01T00:00:00.0000015Z\""), Ok(2));
    assert_eq!(t("\"2000-01-01T00:00:00.5z\""), Ok(500_000));
    assert_eq!(t("\"1999-12-31T23:59:60Z\""), Ok(0));
    assert_eq!(t("\"2024-02-29T12:00:00Z\""), Ok(762_523_200_000_000));
    assert!(t("\"2023-02-29T00:00:00Z\"")
        .unwrap_err()
        .contains("no such date"));
    assert!(t("\"2000-01-01T24:00:00Z\"")
        .unwrap_err()
        .contains("no such time"));
    assert!(t("\"2000-01-01T00:00:00\"")
        .unwrap_err()
        .contains("RFC 3339"));
    assert!(t("\"yesterday\"").unwrap_err().contains("RFC 3339"));
    assert!(t("946684800").unwrap_err().contains("timestamptz(s)"));

    let s = |ty, raw: &str| conv(ty, raw).map(|b| i64::from_be_bytes(b.try_into().unwrap()));
    assert_eq!(s(ColumnType::TimestamptzSeconds, "946684800"), Ok(0));
    assert_eq!(
        s(ColumnType::TimestamptzSeconds, "946684800.25"),
        Ok(250_000)
    );
    assert_eq!(
        s(ColumnType::TimestamptzSeconds, "0"),
        Ok(-PG_EPOCH_OFFSET_MICROS)
    );
    assert_eq!(s(ColumnType::TimestamptzMillis, "946684800001"), Ok(1000));
    assert_eq!(s(ColumnType::TimestamptzMillis, "946684800000.0006"), Ok(1));
    assert_eq!(
        s(ColumnType::TimestamptzMillis, "-1"),
        Ok(-PG_EPOCH_OFFSET_MICROS - 1000)
    );
    assert!(s(ColumnType::TimestamptzSeconds, "1e20")
        .unwrap_err()
        .contains("out of range"));
    assert!(s(ColumnType::TimestamptzMillis, "\"1\"").is_err());
}

#[test]
fn dates_are_days_since_2000_and_uuids_16_bytes() {
    let d =
        |raw: &str| conv(ColumnType::Date, raw).map(|b| i32::from_be_bytes(b.try_into().unwrap()));
    assert_eq!(d("\"2000-01-01\""), Ok(0));
    assert_eq!(d("\"1999-12-31\""), Ok(-1));
    assert_eq!(d("\"2000-03-01\""), Ok(60));
    assert_eq!(d("\"1970-01-01\""), Ok(-10_957));
    assert!(d("\"2000-02-30\"").unwrap_err().contains("no such date"));
    assert!(d("\"2000-1-1\"").unwrap_err().contains("YYYY-MM-DD"));
    assert!(d("20000101").is_err());

    let want = [
        0x3f, 0x25, 0x04, 0xe0, 0x4f, 0x89, 0x11, 0xd3, 0x9a, 0x0c, 0x03, 0x05, 0xe8, 0x2c, 0x33,
        0x01,
    ];
    assert_eq!(
        conv(ColumnType::Uuid, "\"3f2504e0-4f89-11d3-9a0c-0305e82c3301\""),
        Ok(want.to_vec())
    );
    assert_eq!(
        conv(ColumnType::Uuid, "\"3F2504E0-4F89-11D3-9A0C-0305E82C3301\""),
        Ok(want.to_vec())
    );
    for bad in [
        "\"3f2504e04f8911d39a0c0305e82c3301\"",
        "\"3f2504e0-4f89-11d3-9a0c-0305e82c330g\"",
        "\"3f2504e0-4f89-11d3-9a0c-0305e82c33-1\"",
        "17",
    ] {
        assert!(conv(ColumnType::Uuid, bad).is_err(), "{bad}");
    }
}

#[test]
fn text_arrays_follow_postgres_array_format() {
    let mut want = Vec::new();
    for v in [1i32, 1, 25, 3, 1] {
        want.extend_from_slice(&v.to_be_bytes()); // ndim, has nulls, oid, length, lower bound
    }
    want.extend_from_slice(&1i32.to_be_bytes());
    want.push(b'a');
    want.extend_from_slice(&(-1i32).to_be_bytes());
    want.extend_from_slice(&2i32.to_be_bytes());
    want.extend_from_slice("é".as_bytes());
    assert_eq!(
        conv(ColumnType::TextArray, r#"["a", null, "\u00e9"]"#),
        Ok(want)
    );
    let mut empty = Vec::new();
    for v in [0i32, 0, 25] {
        empty.extend_from_slice(&v.to_be_bytes());
    }
    assert_eq!(conv(ColumnType::TextArray, "[]"), Ok(empty));
    assert!(conv(ColumnType::TextArray, r#"["a", 1]"#)
        .unwrap_err()
        .contains("element 1"));
    assert!(conv(ColumnType::TextArray, r#""a""#)
        .unwrap_err()
        .contains("an array of strings"));
}

#[test]
fn one_pass_finds_nested_indexed_escaped_and_overlapping_pointers() {
    let r = record(
        r#"{"user": {"id": 7, "tags": ["x", "y"]}, "a/b": 1, "~c": 2, "e\u0073c": 3, "n": null, "s": "v"}"#,
    );
    let cols = [
        "id:bigint=/user/id",
        "second:text=/user/tags/1",
        "leading_zero:text=/user/tags/01",
        "slash:integer=/a~1b",
        "tilde:integer=/~0c",
        "escaped_key:integer=/esc",
        "user_doc:jsonb=/user",
        "missing:text=/nope/deeper",
        "into_scalar:text=/s/x",
        "null_value:text=/n",
        "whole:jsonb=",
    ];
    let got = row(&cols, &r).unwrap();
    assert_eq!(got[0], Some(7i64.to_be_bytes().to_vec()));
    assert_eq!(got[1], Some(b"y".to_vec()));
    assert_eq!(got[2], None);
    assert_eq!(got[3], Some(1i32.to_be_bytes().to_vec()));
    assert_eq!(got[4], Some(2i32.to_be_bytes().to_vec()));
    assert_eq!(got[5], Some(3i32.to_be_bytes().to_vec()));
    assert_eq!(
        got[6].as_deref().unwrap()[1..],
        br#"{"id": 7, "tags": ["x", "y"]}"#[..]
    );
    assert_eq!(got[7], None);
    assert_eq!(got[8], None);
    assert_eq!(got[9], None);
    assert_eq!(got[10].as_deref().unwrap()[1..], r.payload[..]);
}

#[test]
fn a_value_that_does_not_convert_names_column_pointer_value_and_reason() {
    let r = record(
        r#"{"user": {"id": "abc"}, "long": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
    );
    let e = row(&["user_id:bigint=/user/id"], &r).unwrap_err();
    let text = e.to_string();
    for part in [
        "user_id",
        "bigint",
        "/user/id",
        "\"abc\"",
        "strings are not converted",
    ] {
        assert!(text.contains(part), "{part} in {text}");
    }
    let e = row(&["at:timestamptz=/long"], &r).unwrap_err();
    assert!(e.value.contains("…") && e.value.len() < 120, "{}", e.value);

    let e = row(&["need:text!=/absent"], &r).unwrap_err();
    assert!(
        e.to_string().contains("required (NOT NULL) but is missing"),
        "{e}"
    );
    let e = row(&["need:text!=/x"], &record(r#"{"x": null}"#)).unwrap_err();
    assert!(e.to_string().contains("is null"), "{e}");
    let e = row(&["x:text=/x"], &record("{not json")).unwrap_err();
    assert!(e.reason.contains("not valid JSON"), "{e}");
}

#[test]
fn metadata_columns_carry_the_envelope_and_the_kafka_message() {
    let mut r = record(r#"{}"#);
    let cols = [
        "rid:text=@request_id",
        "rid_uuid:uuid=@request_id",
        "at:timestamptz=@received_at",
        "p:bigint=@kafka_partition",
        "o:bigint=@kafka_offset",
        "i:integer=@record_index",
        "k:text=@kafka_key",
        "kt:timestamptz=@kafka_timestamp",
        "h:jsonb=@headers",
    ];
    let got = row(&cols, &r).unwrap();
    assert_eq!(got[0], Some(b"0123456789abcdef0011223344556677".to_vec()));
    assert_eq!(got[1], Some(r.request_id.0.to_vec()));
    assert_eq!(got[2], Some(1_000_000i64.to_be_bytes().to_vec()));
    assert_eq!(got[3], Some(2i64.to_be_bytes().to_vec()));
    assert_eq!(got[4], Some(40i64.to_be_bytes().to_vec()));
    assert_eq!(got[5], Some(3i32.to_be_bytes().to_vec()));
    assert_eq!(&got[6..], [None, None, None]);

    r.kafka = Some(Arc::new(KafkaMeta {
        key: Some(b"k1".to_vec()),
        timestamp_millis: Some(946_684_800_001),
        headers: vec![
            ("a\"b".into(), Some(b"v\n".to_vec())),
            ("empty".into(), None),
        ],
    }));
    let got = row(&cols, &r).unwrap();
    assert_eq!(got[6], Some(b"k1".to_vec()));
    assert_eq!(got[7], Some(1000i64.to_be_bytes().to_vec()));
    assert_eq!(
        got[8].as_deref().unwrap(),
        b"\x01{\"a\\\"b\":\"v\\u000a\",\"empty\":null}"
    );

    r.kafka = Some(Arc::new(KafkaMeta {
        key: Some(vec![0xff]),
        ..KafkaMeta::default()
    }));
    let e = row(&["k:text=@kafka_key"], &r).unwrap_err();
    assert!(e.reason.contains("not UTF-8"), "{e}");
    let e = row(&["kt:timestamptz!=@kafka_timestamp"], &r).unwrap_err();
    assert!(e.reason.contains("required"), "{e}");
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn column_type() -> impl Strategy<Value = ColumnType> {
    (0..ColumnType::ALL.len()).prop_map(|i| ColumnType::ALL[i])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// A spec printed back parses to itself.
    #[test]
    fn specs_round_trip(
        name in "[a-z_][a-z0-9_]{0,20}",
        ty in column_type(),
        not_null in any::<bool>(),
        tokens in proptest::collection::vec("[a-z~/0-9]{0,4}", 0..4),
    ) {
        prop_assume!(!BASE_COLUMNS.contains(&name.as_str()));
        let pointer: String = tokens.iter().map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1"))).collect();
        let text = format!("{name}:{ty}{}={pointer}", if not_null { "!" } else { "" });
        let parsed: ColumnSpec = text.parse().unwrap();
        prop_assert_eq!(parsed.to_string(), text);
        let Source::Pointer(p) = &parsed.source else { unreachable!() };
        prop_assert_eq!(p.tokens(), tokens.as_slice());
    }

    /// Every Unix microsecond from year 1 to 9999, written in RFC 3339 with any offset,
    /// reads back as itself.
    #[test]
    fn rfc3339_round_trips(
        micros in -62_135_596_800_000_000i64..253_402_300_799_999_999,
        offset_minutes in -1439i64..1440,
    ) {
        let local = micros + offset_minutes * 60_000_000;
        let (days, rest) = (local.div_euclid(86_400_000_000), local.rem_euclid(86_400_000_000));
        let (y, m, d) = civil_from_days(days);
        prop_assume!((1..=9999).contains(&y));
        let secs = rest / 1_000_000;
        let sign = if offset_minutes < 0 { '-' } else { '+' };
        let text = format!(
            "\"{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}{sign}{:02}:{:02}\"",
            secs / 3600, secs / 60 % 60, secs % 60, rest % 1_000_000,
            offset_minutes.abs() / 60, offset_minutes.abs() % 60,
        );
        let got = conv(ColumnType::Timestamptz, &text).unwrap();
        prop_assert_eq!(i64::from_be_bytes(got.try_into().unwrap()), micros - PG_EPOCH_OFFSET_MICROS);
        let date = format!("\"{y:04}-{m:02}-{d:02}\"");
        let got = conv(ColumnType::Date, &date).unwrap();
        prop_assert_eq!(i64::from(i32::from_be_bytes(got.try_into().unwrap())), days - PG_EPOCH_OFFSET_DAYS);
    }

    /// Any decimal, in any notation, reads back from numeric's binary form as its value with
    /// its scale; the integer types take exactly the integral ones in range.
    #[test]
    fn numbers_keep_their_exact_value(
        mantissa in any::<i64>(),
        scale in 0u32..12,
    ) {
        let digits = mantissa.unsigned_abs().to_string();
        let sign = if mantissa < 0 { "-" } else { "" };
        let plain = if scale == 0 {
            format!("{sign}{digits}")
        } else {
            let padded = format!("{digits:0>width$}", width = scale as usize + 1);
            let (i, f) = padded.split_at(padded.len() - scale as usize);
            format!("{sign}{i}.{f}")
        };
        let normal = if mantissa == 0 { plain.trim_start_matches('-').to_string() } else { plain.clone() };
        prop_assert_eq!(numeric_text(&conv(ColumnType::Numeric, &plain).unwrap()), normal.clone());
        // The same value with an exponent: the same value and scale.
        let exp = format!("{sign}{digits}e-{scale}");
        prop_assert_eq!(numeric_text(&conv(ColumnType::Numeric, &exp).unwrap()), normal);
        let as_int = conv(ColumnType::Bigint, &plain);
        let integral = 10i128.pow(scale);
        if i128::from(mantissa) % integral == 0 {
            prop_assert_eq!(as_int.map(|b| i64::from_be_bytes(b.try_into().unwrap())), Ok((i128::from(mantissa) / integral) as i64));
        } else {
            prop_assert!(as_int.unwrap_err().contains("fraction"));
        }
        let d = conv(ColumnType::Double, &plain).unwrap();
        prop_assert_eq!(f64::from_be_bytes(d.try_into().unwrap()), plain.parse::<f64>().unwrap());
    }

    /// No input makes a conversion panic, whatever the type; a failure leaves no bytes.
    #[test]
    fn any_value_converts_or_fails_cleanly(
        ty in column_type(),
        value in prop_oneof![
            "\\PC{0,20}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| f.to_string()),
            any::<i64>().prop_map(|i| i.to_string()),
            "-?[0-9]{1,30}(\\.[0-9]{1,30})?([eE][+-]?[0-9]{1,6})?",
            Just("[\"a\", null, 1]".to_string()),
            Just("{\"a\": 1}".to_string()),
            Just("true".to_string()),
        ],
    ) {
        let mut out = Vec::new();
        if convert(ty, &value, &mut out).is_err() {
            // The caller truncates on error; conversions that fail before writing write nothing.
            prop_assert!(out.is_empty() || matches!(ty, ColumnType::TextArray));
        }
    }

    /// Arbitrary bytes as a record never panic the encoder, and a refused row leaves the
    /// buffer as it was.
    #[test]
    fn arbitrary_records_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let m = Mapping::new(vec![spec("a:bigint=/a"), spec("b:text[]=/b/0")], true).unwrap();
        let r = Record { payload: bytes, ..record("") };
        let before = CopyRows::new(&m, 0).finish().len();
        let mut rows = CopyRows::new(&m, 0);
        if rows.push(&r).is_err() {
            prop_assert_eq!(rows.finish().len(), before);
        }
    }
}

/// Exponents at the ends of i64 saturate instead of overflowing (a panic in the flush task
/// would block the partition), and a U+0000, which Postgres text refuses, is refused here
/// with the reason rather than found by bisection after a failed COPY.
#[test]
fn extreme_exponents_and_nul_characters_are_refused_not_panics() {
    use ColumnType::*;
    for raw in [
        "0.001e-99999999999999999999",
        "1e99999999999999999999",
        "-7.5e-9223372036854775808",
        "1e9223372036854775807",
    ] {
        for ty in [
            Bigint,
            Integer,
            Smallint,
            Numeric,
            Double,
            TimestamptzSeconds,
            TimestamptzMillis,
        ] {
            let _ = conv(ty, raw);
        }
    }
    assert!(conv(Bigint, "0.001e-99999999999999999999").is_err());
    assert!(conv(Bigint, "1e99999999999999999999").is_err());
    assert!(conv(Text, r#""a\u0000b""#).unwrap_err().contains("U+0000"));
    assert!(conv(TextArray, r#"["a", "b\u0000"]"#)
        .unwrap_err()
        .contains("U+0000"));
    assert_eq!(conv(Text, r#""a\u0001b""#), Ok(b"a\x01b".to_vec()));
}
