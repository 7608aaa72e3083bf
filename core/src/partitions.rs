//! Time partitions (`--partition-by`, `--partition-interval`, `--retention`): which native range
//! partitions a table should have at `now`, which ones are past the retention, and what each is
//! called. The consumer's shell lists the partitions Postgres has, asks [`Partitioning::plan`]
//! what to create and drop, and runs the DDL; every decision is here, with no IO and no clock.
//!
//! Time is microseconds since the Unix epoch (as a record's `received_at_micros`), always in
//! UTC: an hour, a day (00:00 to 00:00 UTC), an ISO week (Monday 00:00 UTC to the next Monday)
//! or a calendar month. A range is half-open, `[from, to)`, as Postgres' `FOR VALUES FROM (..)
//! TO (..)`.

use std::collections::BTreeSet;
use std::fmt;

use crate::calendar::{civil_from_days, days_from_civil};
use crate::columns::{ColumnType, Mapping};
use crate::error::ConfigError;

/// Microseconds in an hour.
const HOUR: i64 = 3_600_000_000;
/// Microseconds in a day.
const DAY: i64 = 24 * HOUR;
/// Days from 0001-01-01 to 1970-01-01: the first day a partition may start.
const FIRST_DAY: i64 = -719_162;
/// Days from 10000-01-01 to 1970-01-01: no partition reaches past it (names and bounds are
/// written with four-digit years).
const END_DAY: i64 = 2_932_897;

/// How many whole intervals after the one holding `now` are created ahead, at least.
pub const AHEAD: usize = 2;

/// How far past `now` the partitions made ahead reach, at least (µs): a day, so that hourly
/// partitions ride out a day-long lock on the table (a `pg_dump` holds one on every partition;
/// attaching a partition needs the default partition to itself).
pub const AHEAD_AT_LEAST: i64 = DAY;

/// The base column a table can be partitioned by without mapping one.
pub const RECEIVED_AT: &str = "received_at";

/// Postgres' longest identifier, in bytes.
const MAX_IDENTIFIER: usize = 63;

/// How long each partition's range is (`--partition-interval`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Interval {
    /// An hour, from minute 0.
    Hour,
    /// A day, 00:00 to 00:00 UTC.
    Day,
    /// An ISO week, Monday 00:00 UTC to the next Monday.
    Week,
    /// A calendar month, from the 1st 00:00 UTC.
    Month,
}

impl Interval {
    /// Parses `hour`, `day`, `week` or `month`; the error names `--partition-interval`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s.trim() {
            "hour" => Ok(Interval::Hour),
            "day" => Ok(Interval::Day),
            "week" => Ok(Interval::Week),
            "month" => Ok(Interval::Month),
            other => Err(ConfigError::new(
                "partition-interval",
                format!(
                    "{other:?} is not a partition interval: use hour, day, week (ISO, from \
                     Monday) or month (calendar), all in UTC"
                ),
            )),
        }
    }

    /// The name a setting takes.
    pub fn name(self) -> &'static str {
        match self {
            Interval::Hour => "hour",
            Interval::Day => "day",
            Interval::Week => "week",
            Interval::Month => "month",
        }
    }

    /// The range of the interval holding `at`, aligned in UTC. `None` outside the years 1 to
    /// 9999 (a partition there could not be named or written as a bound).
    pub fn containing(self, at: i64) -> Option<Range> {
        if !(FIRST_DAY * DAY..END_DAY * DAY).contains(&at) {
            return None;
        }
        let day = at.div_euclid(DAY);
        let (from, to) = match self {
            Interval::Hour => {
                let from = at.div_euclid(HOUR) * HOUR;
                (from, from + HOUR)
            }
            Interval::Day => (day * DAY, (day + 1) * DAY),
            Interval::Week => {
                // 1970-01-01 was a Thursday: Monday is weekday 0.
                let monday = day - (day + 3).rem_euclid(7);
                (monday * DAY, (monday + 7) * DAY)
            }
            Interval::Month => {
                let (y, m, _) = civil_from_days(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (
                    days_from_civil(y, m, 1) * DAY,
                    days_from_civil(ny, nm, 1) * DAY,
                )
            }
        };
        (from >= FIRST_DAY * DAY && to <= END_DAY * DAY).then_some(Range { from, to })
    }

    /// The name's suffix after `_p`: `2026112814` (hour), `20261128` (day), `2026w48` (ISO
    /// week-year and week), `202611` (month).
    fn suffix(self, r: Range) -> String {
        let day = r.from.div_euclid(DAY);
        let (y, m, d) = civil_from_days(day);
        match self {
            Interval::Hour => {
                let h = r.from.rem_euclid(DAY) / HOUR;
                format!("{y:04}{m:02}{d:02}{h:02}")
            }
            Interval::Day => format!("{y:04}{m:02}{d:02}"),
            Interval::Week => {
                // The range starts on a Monday; its ISO week-year is the year of its Thursday.
                let thursday = day + 3;
                let (iso_year, _, _) = civil_from_days(thursday);
                let week = (thursday - days_from_civil(iso_year, 1, 1)) / 7 + 1;
                format!("{iso_year:04}w{week:02}")
            }
            Interval::Month => format!("{y:04}{m:02}"),
        }
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How long rows are kept (`--retention`): a partition is dropped once its whole range is older
/// than `now - retention`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    micros: i64,
    text: String,
}

impl Retention {
    /// Parses a whole number followed by `h` (hours), `d` (days) or `w` (weeks): `12h`, `30d`,
    /// `2w`. The error names `--retention` and the accepted forms.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let text = s.trim();
        let refuse = |why: &str| {
            ConfigError::new(
                "retention",
                format!(
                    "{text:?} {why}: write a whole number followed by h (hours), d (days) or w \
                     (weeks), e.g. 12h, 30d or 2w"
                ),
            )
        };
        let unit = match text.chars().last() {
            Some('h') => HOUR,
            Some('d') => DAY,
            Some('w') => 7 * DAY,
            _ => return Err(refuse("has no unit")),
        };
        let digits = &text[..text.len() - 1];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(refuse("is not a retention"));
        }
        let n: i64 = digits.parse().map_err(|_| refuse("is too long"))?;
        if n == 0 {
            return Err(refuse("would drop every partition at once"));
        }
        // Past 10,000 years nothing could be dropped anyway.
        let micros = n
            .checked_mul(unit)
            .filter(|m| *m <= (END_DAY - FIRST_DAY) * DAY)
            .ok_or_else(|| refuse("is too long"))?;
        Ok(Retention {
            micros,
            text: text.to_string(),
        })
    }

    /// The retention in microseconds.
    pub fn micros(&self) -> i64 {
        self.micros
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A half-open range of time, `[from, to)`, in microseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    /// The first instant in it.
    pub from: i64,
    /// The first instant after it.
    pub to: i64,
}

impl Range {
    /// Whether `at` is in it.
    pub fn contains(&self, at: i64) -> bool {
        self.from <= at && at < self.to
    }
}

impl fmt::Display for Range {
    /// `[2026-11-28 00:00:00+00, 2026-11-29 00:00:00+00)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", timestamp(self.from), timestamp(self.to))
    }
}

/// What the partition column holds, which decides how its bounds are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundKind {
    /// A `timestamptz`: bounds are instants (`'2026-11-28 00:00:00+00'`).
    Timestamptz,
    /// A `date`: bounds are days (`'2026-11-28'`), each the UTC day of the instant.
    Date,
}

/// A partition Postgres has, as the shell read it from the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingPartition {
    /// How the shell names it (ready for SQL); the core only passes it back.
    pub name: String,
    /// Its lower bound; `None` for `MINVALUE`.
    pub from: Option<i64>,
    /// Its upper bound; `None` for `MAXVALUE`.
    pub to: Option<i64>,
}

impl ExistingPartition {
    fn overlaps(&self, r: Range) -> bool {
        self.from.is_none_or(|f| f < r.to) && self.to.is_none_or(|t| r.from < t)
    }
}

/// A partition to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPartition {
    /// Its name, unquoted, without a schema (it goes in its table's schema).
    pub name: String,
    /// Its range.
    pub range: Range,
}

/// What a table's partitions need at `now` ([`Partitioning::plan`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Wanted ranges no partition covers, oldest first.
    pub create: Vec<NewPartition>,
    /// Partitions whose whole range is older than `now - retention` (names as given).
    pub drop: Vec<String>,
    /// Wanted ranges that partitions with other bounds cover in part only (someone else's
    /// partitions): they cannot be created, and rows of the gaps go to the default partition.
    pub overlapped: Vec<(Range, Vec<String>)>,
}

/// How a table is partitioned: the column, the interval and the retention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partitioning {
    column: String,
    bound: BoundKind,
    interval: Interval,
    retention: Option<Retention>,
}

impl Partitioning {
    /// Partitions by `column`: `received_at` (when the producer received the request, always
    /// written) or a column of `mapping` of type `timestamptz`, `timestamptz(ms)`,
    /// `timestamptz(s)` or `date` (not with hourly partitions). Written by key, the key must
    /// hold the column: Postgres' unique indexes on a partitioned table include its partition
    /// column. Errors name the setting.
    pub fn new(
        column: &str,
        interval: Interval,
        retention: Option<Retention>,
        mapping: &Mapping,
    ) -> Result<Self, ConfigError> {
        let column = column.trim();
        let allowed = "received_at, or a mapped column of type timestamptz, timestamptz(ms), \
                       timestamptz(s) or date";
        let bound = if column == RECEIVED_AT {
            BoundKind::Timestamptz
        } else {
            let Some(c) = mapping.columns().iter().find(|c| c.name == column) else {
                return Err(ConfigError::new(
                    "partition-by",
                    format!("{column:?} is neither received_at nor a mapped column: use {allowed}"),
                ));
            };
            match c.ty {
                ColumnType::Timestamptz
                | ColumnType::TimestamptzMillis
                | ColumnType::TimestamptzSeconds => BoundKind::Timestamptz,
                ColumnType::Date => BoundKind::Date,
                other => {
                    return Err(ConfigError::new(
                        "partition-by",
                        format!(
                            "column {column:?} is {other}, which has no time ranges: use {allowed}"
                        ),
                    ))
                }
            }
        };
        if bound == BoundKind::Date && interval == Interval::Hour {
            return Err(ConfigError::new(
                "partition-interval",
                format!(
                    "column {column:?} is a date, so hourly partitions would hold a whole day in \
                     their first hour: use day, week or month"
                ),
            ));
        }
        if let Some(upsert) = mapping.upsert() {
            if !upsert.key.iter().any(|k| k == column) {
                return Err(ConfigError::new(
                    "upsert-key",
                    format!(
                        "the key ({}) does not hold the partition column {column:?}: a unique \
                         index on a partitioned table must include the partition column, so \
                         Postgres could not keep one row per key. Add a mapped timestamp \
                         column that is part of each record's identity to the key and \
                         partition by it (for example --partition-by created_at --upsert-key \
                         id,created_at), or do not partition this table",
                        upsert.key.join(",")
                    ),
                ));
            }
        }
        Ok(Partitioning {
            column: column.to_string(),
            bound,
            interval,
            retention,
        })
    }

    /// The partition column.
    pub fn column(&self) -> &str {
        &self.column
    }

    /// Whether the column is `received_at`, known for every record before it is written (the
    /// shell can then create a missing partition before a flush needs it).
    pub fn by_received_at(&self) -> bool {
        self.column == RECEIVED_AT
    }

    /// What the column holds.
    pub fn bound_kind(&self) -> BoundKind {
        self.bound
    }

    /// The interval.
    pub fn interval(&self) -> Interval {
        self.interval
    }

    /// The retention, if partitions are ever dropped.
    pub fn retention(&self) -> Option<&Retention> {
        self.retention.as_ref()
    }

    /// The ranges a table should have at `now`, oldest first: the interval holding `now` and
    /// the ones after it, at least [`AHEAD`] and up to [`AHEAD_AT_LEAST`] past `now` (two for
    /// days, weeks and months; 24 for hours).
    pub fn wanted(&self, now: i64) -> Vec<Range> {
        let mut out = Vec::with_capacity(AHEAD + 1);
        let mut at = now;
        while let Some(r) = self.interval.containing(at) {
            out.push(r);
            if out.len() > AHEAD && r.to >= now.saturating_add(AHEAD_AT_LEAST) {
                break;
            }
            at = r.to;
        }
        out
    }

    /// Whether rows of `r` are older than the retention at `now` (no retention: never).
    pub fn expired(&self, r: Range, now: i64) -> bool {
        self.expired_to(Some(r.to), now)
    }

    fn expired_to(&self, to: Option<i64>, now: i64) -> bool {
        match (&self.retention, to) {
            (Some(keep), Some(to)) => now.checked_sub(keep.micros).is_some_and(|c| to <= c),
            _ => false,
        }
    }

    /// Of `existing`, the partitions whose whole range is older than `now - retention`: each
    /// ends at or before it. A partition up to `MAXVALUE` never expires.
    pub fn expired_partitions<'a>(
        &self,
        existing: &'a [ExistingPartition],
        now: i64,
    ) -> Vec<&'a ExistingPartition> {
        existing
            .iter()
            .filter(|p| self.expired_to(p.to, now))
            .collect()
    }

    /// What `table`'s partitions need at `now`, given the range partitions it has (not the
    /// default one): the wanted ranges no partition overlaps are created, the expired ones
    /// dropped.
    pub fn plan(&self, table: &str, existing: &[ExistingPartition], now: i64) -> Plan {
        let mut plan = Plan {
            drop: self
                .expired_partitions(existing, now)
                .into_iter()
                .map(|p| p.name.clone())
                .collect(),
            ..Plan::default()
        };
        for r in self.wanted(now) {
            let over: Vec<&ExistingPartition> = existing.iter().filter(|p| p.overlaps(r)).collect();
            if over.is_empty() {
                plan.create.push(NewPartition {
                    name: self.partition_name(table, r),
                    range: r,
                });
            } else if !covers(&over, r) {
                plan.overlapped
                    .push((r, over.iter().map(|p| p.name.clone()).collect()));
            }
        }
        plan
    }

    /// The distinct intervals holding the instants `at` (each a record's time), oldest first.
    pub fn ranges_of(&self, at: impl IntoIterator<Item = i64>) -> BTreeSet<Range> {
        let mut out = BTreeSet::new();
        let mut last: Option<Range> = None;
        for t in at {
            if last.is_some_and(|r| r.contains(t)) {
                continue;
            }
            if let Some(r) = self.interval.containing(t) {
                out.insert(r);
                last = Some(r);
            }
        }
        out
    }

    /// Of `ranges` (a batch's, [`Partitioning::ranges_of`]), the partitions of `table` to
    /// create before the batch is written: no partition of `existing` overlaps them and they
    /// are not past the retention at `now` (rows older than the retention go to the default
    /// partition, which is never dropped).
    pub fn missing(
        &self,
        table: &str,
        ranges: &BTreeSet<Range>,
        existing: &[ExistingPartition],
        now: i64,
    ) -> Vec<NewPartition> {
        ranges
            .iter()
            .filter(|r| !self.expired(**r, now))
            .filter(|r| !existing.iter().any(|p| p.overlaps(**r)))
            .map(|r| NewPartition {
                name: self.partition_name(table, *r),
                range: *r,
            })
            .collect()
    }

    /// How long to leave a table's partitions alone after `timeouts` changes in a row gave up
    /// waiting for a lock (a long query or a dump holds the table; each try of a drop makes
    /// flushes wait up to the lock timeout): nothing after none, then a minute, doubling up to
    /// an hour. Partitions are made far enough ahead for that, and a drop is never urgent.
    pub fn retry_after_lock_timeouts(timeouts: u32) -> i64 {
        match timeouts {
            0 => 0,
            n => ((60_000_000_i64) << (n - 1).min(6)).min(HOUR),
        }
    }

    /// The partition of `table` (its name without schema) for `r`: `<table>_p2026112814`
    /// (hour), `_p20261128` (day), `_p2026w48` (ISO week), `_p202611` (month). The table's
    /// part is cut so the name fits Postgres' 63 bytes.
    pub fn partition_name(&self, table: &str, r: Range) -> String {
        with_suffix(table, &format!("_p{}", self.interval.suffix(r)))
    }

    /// The default partition of `table`: `<table>_default`.
    pub fn default_name(table: &str) -> String {
        with_suffix(table, "_default")
    }

    /// `at` as a bound of this column, a quoted SQL literal: `'2026-11-28 14:00:00+00'`, or
    /// `'2026-11-28'` for a date (the UTC day of `at`).
    pub fn bound_literal(&self, at: i64) -> String {
        match self.bound {
            BoundKind::Timestamptz => format!("'{}'", timestamp(at)),
            BoundKind::Date => {
                let (y, m, d) = civil_from_days(at.div_euclid(DAY));
                format!("'{y:04}-{m:02}-{d:02}'")
            }
        }
    }
}

impl fmt::Display for Partitioning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "by {} per {}", self.column, self.interval)?;
        if let Some(r) = &self.retention {
            write!(f, ", kept {r}")?;
        }
        Ok(())
    }
}

/// Whether the partitions `over` (each overlapping `r`) cover all of `r` together.
fn covers(over: &[&ExistingPartition], r: Range) -> bool {
    let mut sorted: Vec<(Option<i64>, Option<i64>)> = over.iter().map(|p| (p.from, p.to)).collect();
    sorted.sort();
    let mut reached = r.from;
    for (from, to) in sorted {
        if from.is_some_and(|f| f > reached) {
            return false;
        }
        match to {
            None => return true,
            Some(t) => reached = reached.max(t),
        }
        if reached >= r.to {
            return true;
        }
    }
    reached >= r.to
}

/// `table` + `suffix` within 63 bytes (table names are ASCII).
fn with_suffix(table: &str, suffix: &str) -> String {
    let keep = MAX_IDENTIFIER.saturating_sub(suffix.len());
    let mut end = table.len().min(keep);
    while !table.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{suffix}", &table[..end])
}

/// `2026-11-28 14:00:00+00` (UTC, whole seconds and, when not zero, microseconds).
fn timestamp(at: i64) -> String {
    let (y, m, d) = civil_from_days(at.div_euclid(DAY));
    let in_day = at.rem_euclid(DAY);
    let (h, min, s, us) = (
        in_day / HOUR,
        in_day % HOUR / 60_000_000,
        in_day % 60_000_000 / 1_000_000,
        in_day % 1_000_000,
    );
    if us == 0 {
        format!("{y:04}-{m:02}-{d:02} {h:02}:{min:02}:{s:02}+00")
    } else {
        format!("{y:04}-{m:02}-{d:02} {h:02}:{min:02}:{s:02}.{us:06}+00")
    }
}

#[cfg(test)]
mod tests;
