use proptest::prelude::*;

use super::*;
use crate::columns::ColumnSpec;
use crate::upsert::Upsert;

/// `2026-11-28 14:37:12` (UTC) in microseconds since the Unix epoch, plus `us`.
fn at(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64, us: i64) -> i64 {
    days_from_civil(y, mo, d) * DAY + h * HOUR + mi * 60_000_000 + s * 1_000_000 + us
}

fn day(y: i64, mo: i64, d: i64) -> i64 {
    at(y, mo, d, 0, 0, 0, 0)
}

fn range(from: i64, to: i64) -> Range {
    Range { from, to }
}

fn mapping(columns: &[&str]) -> Mapping {
    let specs: Vec<ColumnSpec> = columns.iter().map(|c| c.parse().unwrap()).collect();
    Mapping::new(specs, true).unwrap()
}

fn by(column: &str, interval: Interval, retention: Option<&str>) -> Partitioning {
    Partitioning::new(
        column,
        interval,
        retention.map(|r| Retention::parse(r).unwrap()),
        &mapping(&["at:timestamptz=/at", "ms:timestamptz(ms)=/ms", "d:date=/d"]),
    )
    .unwrap()
}

fn existing(name: &str, from: Option<i64>, to: Option<i64>) -> ExistingPartition {
    ExistingPartition {
        name: name.into(),
        from,
        to,
    }
}

#[test]
fn intervals_parse_and_the_error_names_the_setting_and_the_choices() {
    for (s, i) in [
        ("hour", Interval::Hour),
        ("day", Interval::Day),
        (" week", Interval::Week),
        ("month", Interval::Month),
    ] {
        assert_eq!(Interval::parse(s), Ok(i));
        assert_eq!(Interval::parse(i.name()), Ok(i));
    }
    for bad in ["", "days", "Day", "1d", "year"] {
        let e = Interval::parse(bad).unwrap_err();
        assert_eq!(e.setting, "partition-interval");
        assert!(e.problem.contains("hour, day, week"), "{e}");
    }
}

#[test]
fn retention_takes_hours_days_or_weeks_and_says_how_to_write_it() {
    assert_eq!(Retention::parse("12h").unwrap().micros(), 12 * HOUR);
    assert_eq!(Retention::parse("30d").unwrap().micros(), 30 * DAY);
    assert_eq!(Retention::parse(" 2w ").unwrap().micros(), 14 * DAY);
    assert_eq!(Retention::parse("30d").unwrap().to_string(), "30d");
    // Up to the 10,000 years a partition can span.
    assert_eq!(
        Retention::parse("500000w").unwrap().micros(),
        3_500_000 * DAY
    );
    for bad in [
        "",
        "30",
        "d",
        "0d",
        "30 d",
        "30days",
        "-1d",
        "1.5d",
        "+3d",
        "30D",
        "3m",
        "99999999999999999999w",
        "600000w",
        "530000w",
    ] {
        let e = Retention::parse(bad).unwrap_err();
        assert_eq!(e.setting, "retention", "{bad}");
        assert!(
            e.problem.contains("h (hours), d (days) or w (weeks)"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn the_interval_holding_an_instant_is_aligned_in_utc() {
    let t = at(2026, 11, 28, 14, 37, 12, 500_000);
    let check = |i: Interval, from: i64, to: i64| {
        assert_eq!(i.containing(t), Some(range(from, to)), "{i}");
        assert_eq!(i.containing(from), Some(range(from, to)), "{i} from");
        assert_eq!(i.containing(to - 1), Some(range(from, to)), "{i} last µs");
        assert_ne!(i.containing(to), Some(range(from, to)), "{i} to");
    };
    check(
        Interval::Hour,
        at(2026, 11, 28, 14, 0, 0, 0),
        at(2026, 11, 28, 15, 0, 0, 0),
    );
    check(Interval::Day, day(2026, 11, 28), day(2026, 11, 29));
    // 2026-11-28 is a Saturday: its ISO week starts on Monday the 23rd.
    check(Interval::Week, day(2026, 11, 23), day(2026, 11, 30));
    check(Interval::Month, day(2026, 11, 1), day(2026, 12, 1));
    // Months of every length, and the year's turn.
    let month = |y, m| Interval::Month.containing(day(y, m, 15)).unwrap();
    assert_eq!(month(2026, 12), range(day(2026, 12, 1), day(2027, 1, 1)));
    assert_eq!(month(2028, 2).to - month(2028, 2).from, 29 * DAY);
    assert_eq!(month(2027, 2).to - month(2027, 2).from, 28 * DAY);
    assert_eq!(month(2100, 2).to - month(2100, 2).from, 28 * DAY);
    assert_eq!(month(2000, 2).to - month(2000, 2).from, 29 * DAY);
    // Before the epoch (negative instants).
    let before = at(1969, 12, 31, 23, 59, 59, 999_999);
    assert_eq!(
        Interval::Day.containing(before),
        Some(range(day(1969, 12, 31), 0))
    );
    assert_eq!(Interval::Hour.containing(before), Some(range(-HOUR, 0)));
    assert_eq!(
        Interval::Week.containing(0),
        Some(range(day(1969, 12, 29), day(1970, 1, 5)))
    );
    // Outside the years 1 to 9999 there is no partition.
    for t in [i64::MIN, i64::MAX, day(10_000, 1, 1), day(1, 1, 1) - 1] {
        for i in [
            Interval::Hour,
            Interval::Day,
            Interval::Week,
            Interval::Month,
        ] {
            assert_eq!(i.containing(t), None, "{i} at {t}");
        }
    }
    assert_eq!(
        Interval::Day.containing(day(9999, 12, 31)),
        Some(range(day(9999, 12, 31), day(10_000, 1, 1)))
    );
    // 0001-01-01 was a Monday; 9999-12-31 a Friday, whose week ends in the year 10000.
    assert!(Interval::Week.containing(day(1, 1, 1)).is_some());
    assert_eq!(Interval::Week.containing(day(9999, 12, 31)), None);
    assert!(Interval::Week.containing(day(9999, 12, 26)).is_some());
    let r = range(10, 20);
    assert!(r.contains(10) && r.contains(19) && !r.contains(20) && !r.contains(9));
}

#[test]
fn partitions_are_named_by_their_start_and_fit_63_bytes() {
    let t = at(2026, 11, 28, 14, 37, 12, 0);
    let name = |i: Interval, table: &str, t: i64| {
        let p = by("received_at", i, None);
        p.partition_name(table, i.containing(t).unwrap())
    };
    assert_eq!(name(Interval::Hour, "events", t), "events_p2026112814");
    assert_eq!(name(Interval::Day, "events", t), "events_p20261128");
    assert_eq!(name(Interval::Week, "events", t), "events_p2026w48");
    assert_eq!(name(Interval::Month, "events", t), "events_p202611");
    // ISO weeks belong to the year of their Thursday.
    assert_eq!(name(Interval::Week, "e", day(2024, 12, 31)), "e_p2025w01");
    assert_eq!(name(Interval::Week, "e", day(2027, 1, 1)), "e_p2026w53");
    assert_eq!(name(Interval::Week, "e", day(2027, 1, 4)), "e_p2027w01");
    assert_eq!(name(Interval::Week, "e", day(2021, 1, 3)), "e_p2020w53");
    assert_eq!(name(Interval::Hour, "e", 0), "e_p1970010100");
    let long = "t".repeat(60);
    for i in [
        Interval::Hour,
        Interval::Day,
        Interval::Week,
        Interval::Month,
    ] {
        let n = name(i, &long, t);
        assert!(n.len() <= 63, "{n}");
        assert!(n.starts_with("ttt") && n.contains("_p2026"), "{n}");
    }
    assert_eq!(Partitioning::default_name("events"), "events_default");
    assert_eq!(Partitioning::default_name(&long).len(), 63);
    // Cut on a character's boundary (table names are ASCII, but the name is total).
    let wide = "é".repeat(40);
    let n = name(Interval::Day, &wide, t);
    assert!(n.len() <= 63 && n.ends_with("_p20261128"), "{n}");
    assert_eq!(n.len(), 62, "{n}: 26 two-byte letters and the suffix");
    // The longest table name Spillway accepts (50) keeps its whole name.
    let fifty = "x".repeat(50);
    assert!(name(Interval::Hour, &fifty, t).starts_with(&fifty));
}

#[test]
fn wanted_is_the_interval_holding_now_and_two_ahead_and_at_least_a_day() {
    for (i, now, n) in [
        (Interval::Hour, at(2026, 11, 28, 23, 59, 59, 999_999), 25),
        (Interval::Hour, at(2026, 11, 28, 14, 0, 0, 0), 24),
        (Interval::Day, day(2026, 12, 31), 3),
        (Interval::Day, at(2026, 12, 31, 23, 0, 0, 0), 3),
        (Interval::Week, at(2026, 11, 29, 12, 0, 0, 0), 3),
        (Interval::Month, day(2026, 11, 30), 3),
    ] {
        let w = by("received_at", i, None).wanted(now);
        assert_eq!(w.len(), n, "{i} at {now}");
        assert!(w[0].contains(now), "{i}");
        for pair in w.windows(2) {
            assert_eq!(pair[0].to, pair[1].from, "{i}: contiguous");
        }
        let last = w[w.len() - 1];
        assert!(last.to >= now + DAY, "{i}: a day ahead at least");
        assert!(
            last.from < now + DAY || w.len() == 1 + AHEAD,
            "{i}: no more than that"
        );
    }
    let w = by("received_at", Interval::Month, None).wanted(day(2026, 11, 28));
    assert_eq!(
        w,
        [
            range(day(2026, 11, 1), day(2026, 12, 1)),
            range(day(2026, 12, 1), day(2027, 1, 1)),
            range(day(2027, 1, 1), day(2027, 2, 1)),
        ]
    );
    // Near the end of time only what can be named.
    let end = by("received_at", Interval::Day, None).wanted(day(9999, 12, 30));
    assert_eq!(end.len(), 2);
}

#[test]
fn a_partition_expires_only_when_its_whole_range_is_older_than_the_retention() {
    let now = at(2026, 11, 28, 14, 0, 0, 0);
    let cut = now - 30 * DAY;
    let p = by("received_at", Interval::Day, Some("30d"));
    assert_eq!(p.retention().map(Retention::micros), Some(30 * DAY));
    let parts = [
        existing("old", Some(cut - 2 * DAY), Some(cut - DAY)),
        existing("ends_at_cut", Some(cut - DAY), Some(cut)),
        existing("straddles_cut", Some(cut - DAY + 1), Some(cut + 1)),
        existing("recent", Some(now - DAY), Some(now)),
        existing("from_minvalue", None, Some(cut - DAY)),
        existing("to_maxvalue", Some(cut - 5 * DAY), None),
    ];
    let names: Vec<&str> = p
        .expired_partitions(&parts, now)
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, ["old", "ends_at_cut", "from_minvalue"]);
    assert!(p.expired(range(cut - DAY, cut), now));
    assert!(!p.expired(range(cut - DAY + 1, cut + 1), now));
    // Without a retention nothing expires.
    let keep = by("received_at", Interval::Day, None);
    assert!(keep.expired_partitions(&parts, now).is_empty());
    assert!(!keep.expired(range(0, 1), now));
    // A retention shorter than the interval still waits for the whole range.
    let short = by("received_at", Interval::Day, Some("1h"));
    let today = Interval::Day.containing(now).unwrap();
    assert!(!short.expired(today, now));
    assert!(!short.expired(today, today.to));
    assert!(short.expired(today, today.to + HOUR));
}

#[test]
fn changes_that_cannot_get_the_lock_wait_longer_each_time_up_to_an_hour() {
    let minute = 60_000_000;
    let after: Vec<i64> = (0..10)
        .map(Partitioning::retry_after_lock_timeouts)
        .collect();
    assert_eq!(
        after,
        [
            0,
            minute,
            2 * minute,
            4 * minute,
            8 * minute,
            16 * minute,
            32 * minute,
            HOUR,
            HOUR,
            HOUR
        ]
    );
    assert_eq!(Partitioning::retry_after_lock_timeouts(u32::MAX), HOUR);
}

#[test]
fn the_plan_creates_what_is_missing_and_drops_what_expired() {
    let now = at(2026, 11, 28, 14, 0, 0, 0);
    let p = by("received_at", Interval::Day, Some("7d"));
    let d = |n: i64| day(2026, 11, 28) + n * DAY;
    let parts = [
        existing("\"events_p20261110\"", Some(d(-18)), Some(d(-17))),
        existing("\"events_p20261121\"", Some(d(-7)), Some(d(-6))),
        existing("\"events_p20261128\"", Some(d(0)), Some(d(1))),
    ];
    let plan = p.plan("events", &parts, now);
    assert_eq!(plan.drop, ["\"events_p20261110\""]);
    assert_eq!(
        plan.create,
        [
            NewPartition {
                name: "events_p20261129".into(),
                range: range(d(1), d(2)),
            },
            NewPartition {
                name: "events_p20261130".into(),
                range: range(d(2), d(3)),
            },
        ]
    );
    assert!(plan.overlapped.is_empty());
    // Nothing to do once it is done.
    let mut all = parts[1..].to_vec();
    all.extend(
        plan.create
            .iter()
            .map(|c| existing(&c.name, Some(c.range.from), Some(c.range.to))),
    );
    assert_eq!(p.plan("events", &all, now), Plan::default());
    // Someone else's partitions: two halves cover a day; one that covers half of another
    // blocks it; one up to MAXVALUE covers everything after it.
    let odd = [
        existing("am", Some(d(0)), Some(d(0) + 12 * HOUR)),
        existing("pm", Some(d(0) + 12 * HOUR), Some(d(1))),
        existing("half", Some(d(1)), Some(d(1) + 12 * HOUR)),
    ];
    let plan = p.plan("events", &odd, now);
    assert_eq!(plan.create.len(), 1);
    assert_eq!(plan.create[0].range, range(d(2), d(3)));
    assert_eq!(
        plan.overlapped,
        [(range(d(1), d(2)), vec!["half".to_string()])]
    );
    let rest = [existing("rest", Some(d(0)), None)];
    assert_eq!(p.plan("events", &rest, now), Plan::default());
    // A partition that starts where a wanted range ends does not cover it.
    let tomorrow = [existing("tomorrow", Some(d(1)), Some(d(2)))];
    let plan = p.plan("events", &tomorrow, now);
    let made: Vec<Range> = plan.create.iter().map(|c| c.range).collect();
    assert_eq!(made, [range(d(0), d(1)), range(d(2), d(3))]);
    let yesterday = [existing("yesterday", Some(d(-1)), Some(d(0)))];
    assert_eq!(p.plan("events", &yesterday, now).create.len(), 3);
}

#[test]
fn a_batch_needs_the_partitions_of_its_times_unless_they_exist_or_expired() {
    let now = at(2026, 11, 28, 14, 0, 0, 0);
    let p = by("received_at", Interval::Hour, Some("12h"));
    let h = |n: i64| at(2026, 11, 28, 14, 0, 0, 0) + n * HOUR;
    let times = [
        h(0),
        h(1) - 1,
        h(0) + 5,
        h(0) + 7,
        h(-3) + 1,
        h(0) + 9,
        h(5),
        h(-20),
        h(-3) + 2,
    ];
    let ranges = p.ranges_of(times);
    assert_eq!(
        ranges.iter().copied().collect::<Vec<_>>(),
        [
            range(h(-20), h(-19)),
            range(h(-3), h(-2)),
            range(h(0), h(1)),
            range(h(5), h(6)),
        ]
    );
    let have = [existing("now", Some(h(0)), Some(h(1)))];
    let missing = p.missing("events", &ranges, &have, now);
    let got: Vec<(&str, Range)> = missing.iter().map(|m| (m.name.as_str(), m.range)).collect();
    assert_eq!(
        got,
        [
            ("events_p2026112811", range(h(-3), h(-2))),
            ("events_p2026112819", range(h(5), h(6))),
        ],
        "the hour 20 h ago is past the 12 h retention: its rows go to the default partition"
    );
    assert!(p.ranges_of([i64::MAX, i64::MIN]).is_empty());
    // Each boundary starts the next interval.
    assert_eq!(p.ranges_of([h(0), h(1), h(2) - 1, h(2)]).len(), 3);
}

#[test]
fn the_column_is_received_at_or_a_mapped_timestamp_or_date() {
    let m = mapping(&[
        "at:timestamptz=/at",
        "n:bigint=/n",
        "d:date=/d",
        "s:timestamptz(s)=/s",
    ]);
    let new = |c: &str, i: Interval, m: &Mapping| Partitioning::new(c, i, None, m);
    assert!(new("received_at", Interval::Hour, &m)
        .unwrap()
        .by_received_at());
    let at = new("at", Interval::Day, &m).unwrap();
    assert_eq!(
        (at.column(), at.bound_kind()),
        ("at", BoundKind::Timestamptz)
    );
    assert!(!at.by_received_at());
    assert_eq!(
        new("s", Interval::Hour, &m).unwrap().bound_kind(),
        BoundKind::Timestamptz
    );
    assert_eq!(
        new("d", Interval::Month, &m).unwrap().bound_kind(),
        BoundKind::Date
    );
    for (column, interval, setting, says) in [
        (
            "missing",
            Interval::Day,
            "partition-by",
            "neither received_at nor a mapped column",
        ),
        (
            "n",
            Interval::Day,
            "partition-by",
            "is bigint, which has no time ranges",
        ),
        (
            "kafka_offset",
            Interval::Day,
            "partition-by",
            "timestamptz(ms)",
        ),
        (
            "d",
            Interval::Hour,
            "partition-interval",
            "use day, week or month",
        ),
    ] {
        let e = new(column, interval, &m).unwrap_err();
        assert_eq!(e.setting, setting, "{column}");
        assert!(e.problem.contains(says), "{column}: {e}");
    }
}

#[test]
fn writing_by_key_needs_the_partition_column_in_the_key() {
    let keyed = |key: &[&str]| {
        mapping(&["id:bigint=/id", "at:timestamptz=/at"])
            .with_upsert(Upsert {
                key: key.iter().map(|k| k.to_string()).collect(),
                on_conflict: Default::default(),
                delete_when: None,
            })
            .unwrap()
    };
    let ok = Partitioning::new("at", Interval::Day, None, &keyed(&["id", "at"]));
    assert!(ok.is_ok());
    for column in ["at", "received_at"] {
        let e = Partitioning::new(column, Interval::Day, None, &keyed(&["id"])).unwrap_err();
        assert_eq!(e.setting, "upsert-key");
        assert!(
            e.problem.contains("must include the partition column"),
            "{e}"
        );
        assert!(e.problem.contains(&format!("{column:?}")), "{e}");
    }
}

#[test]
fn bounds_are_written_as_the_column_reads_them() {
    let t = at(2026, 11, 28, 14, 0, 0, 0);
    let ts = by("at", Interval::Day, None);
    assert_eq!(ts.bound_literal(t), "'2026-11-28 14:00:00+00'");
    assert_eq!(ts.bound_literal(t + 5), "'2026-11-28 14:00:00.000005+00'");
    assert_eq!(ts.bound_literal(0), "'1970-01-01 00:00:00+00'");
    assert_eq!(ts.bound_literal(-1), "'1969-12-31 23:59:59.999999+00'");
    let d = by("d", Interval::Week, None);
    assert_eq!(d.bound_literal(day(2026, 11, 23)), "'2026-11-23'");
    assert_eq!(
        range(day(2026, 11, 28), day(2026, 11, 29)).to_string(),
        "[2026-11-28 00:00:00+00, 2026-11-29 00:00:00+00)"
    );
    assert_eq!(
        by("at", Interval::Week, Some("2w")).to_string(),
        "by at per week, kept 2w"
    );
}

fn interval() -> impl Strategy<Value = Interval> {
    prop_oneof![
        Just(Interval::Hour),
        Just(Interval::Day),
        Just(Interval::Week),
        Just(Interval::Month),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every instant of the years 1 to 9999 is in exactly one interval: the one holding it
    /// starts on a boundary, the next starts where it ends, and names sort like the ranges.
    #[test]
    fn intervals_tile_time_and_names_sort_with_them(
        i in interval(),
        t in (FIRST_DAY * DAY + 31 * DAY)..(END_DAY * DAY - 62 * DAY),
    ) {
        let r = i.containing(t).unwrap();
        prop_assert!(r.contains(t));
        prop_assert_eq!(i.containing(r.from), Some(r));
        prop_assert_eq!(i.containing(r.to - 1), Some(r));
        let next = i.containing(r.to).unwrap();
        prop_assert_eq!(next.from, r.to);
        let before = i.containing(r.from - 1).unwrap();
        prop_assert_eq!(before.to, r.from);
        prop_assert!(r.from.rem_euclid(HOUR) == 0);
        if i != Interval::Hour {
            prop_assert!(r.from.rem_euclid(DAY) == 0);
        }
        let p = by("received_at", i, None);
        let (a, b, c) = (
            p.partition_name("t", before),
            p.partition_name("t", r),
            p.partition_name("t", next),
        );
        prop_assert!(a < b && b < c, "{} {} {}", a, b, c);
        prop_assert_eq!(civil_from_days(r.from.div_euclid(DAY)).0 >= 1, true);
    }

    /// Days and dates convert both ways.
    #[test]
    fn days_and_dates_round_trip(d in FIRST_DAY..END_DAY) {
        let (y, m, dd) = civil_from_days(d);
        prop_assert_eq!(days_from_civil(y, m, dd), d);
    }
}
