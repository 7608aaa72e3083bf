//! Typed columns: where a value comes from (a JSON Pointer into the record, or a piece of
//! metadata), which Postgres type it lands in, and the conversion of one value straight into
//! that type's COPY BINARY field.
//!
//! A mapping is written `NAME:TYPE=SOURCE` (`--column user_id:bigint=/user/id`):
//! - `NAME`: `[a-z_][a-z0-9_]*`, at most 63 bytes, not one of the columns Spillway always
//!   writes (`kafka_partition`, `kafka_offset`, `record_index`, `received_at`, `data`). It is
//!   always double-quoted in SQL; lowercase only, so that unquoted queries find it.
//! - `TYPE`: one of [`ColumnType`]'s names; a `!` suffix (`bigint!`) makes a missing or null
//!   value an error (the record is dead-lettered) instead of a NULL.
//! - `SOURCE`: an RFC 6901 JSON Pointer (`/user/id`, `""` for the whole record, `~1` for `/`
//!   and `~0` for `~` inside a name), or `@` and a metadata name ([`Meta`]).
//!
//! Conversions are strict: a value is converted only when its JSON type is the one the column
//! takes (a string `"42"` never becomes a bigint), with one lenient exception, `text`, which
//! stores any non-string value as its JSON text. The rules per type are on [`ColumnType`].
//!
//! This module does no IO; the consumer's shell sends the bytes it writes.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, DeserializeSeed, IgnoredAny, SeqAccess, Visitor};
use serde::Deserializer as _;

use crate::batcher::{KafkaMeta, Record};
use crate::calendar::days_from_civil;
use crate::scan;
use crate::topics::kafka_partition;
use crate::upsert::{Matcher, Upsert};

/// The base columns every row fills first, in COPY order.
const BASE_COPY_COLUMNS: [&str; 4] = [
    "kafka_partition",
    "kafka_offset",
    "record_index",
    "received_at",
];

/// The staging column that marks a record deleting its key's row (`--delete-when`).
pub const DELETE_FLAG: &str = "spillway_delete";

/// Columns Spillway always writes; a mapping cannot reuse their names.
pub const BASE_COLUMNS: [&str; 5] = [
    "kafka_partition",
    "kafka_offset",
    "record_index",
    "received_at",
    "data",
];

/// Microseconds between the Unix epoch and Postgres' epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// Days between the Unix epoch and Postgres' epoch.
const PG_EPOCH_OFFSET_DAYS: i64 = 10_957;
/// Postgres' smallest timestamp (4714-11-24 BC), microseconds since 2000-01-01.
const PG_MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;
/// The first timestamp Postgres refuses (294277-01-01), microseconds since 2000-01-01.
const PG_END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;
/// Postgres' type oid of `text` (the element type of `text[]`).
const TEXT_OID: i32 = 25;
/// How much of a value an error message shows.
const SHOWN_VALUE_CHARS: usize = 80;

/// A column's Postgres type, and what each accepts. JSON `null` or a missing value is NULL for
/// every type (an error with `!`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// A JSON string, stored as is; any other value is stored as its JSON text (`42` → `'42'`).
    Text,
    /// A JSON number with an integral value in range (`42`, `42.0`, `4.2e1`); no strings.
    Bigint,
    /// As `Bigint`, within -2^31..2^31.
    Integer,
    /// As `Bigint`, within -2^15..2^15.
    Smallint,
    /// A JSON number, read as the nearest double (integers above 2^53 lose precision); a
    /// number too large for a double is an error.
    Double,
    /// A JSON number, exactly as written (no rounding through a double; `1.50` keeps its scale).
    Numeric,
    /// `true` or `false`.
    Boolean,
    /// An RFC 3339 string (`2026-11-27T16:03:18.123456Z`, an offset or `Z` required; `T`, `t` or
    /// a space between date and time); fractions past the microsecond are rounded.
    Timestamptz,
    /// A JSON number of seconds since the Unix epoch, fractions allowed (rounded to the µs).
    TimestamptzSeconds,
    /// A JSON number of milliseconds since the Unix epoch, fractions allowed.
    TimestamptzMillis,
    /// A `YYYY-MM-DD` string.
    Date,
    /// A string of 32 hex digits in the 8-4-4-4-12 hyphenated form, any case.
    Uuid,
    /// Any JSON value, stored as the JSON text that was sent.
    Jsonb,
    /// An array of strings and nulls.
    TextArray,
}

impl ColumnType {
    const ALL: [ColumnType; 14] = [
        ColumnType::Text,
        ColumnType::Bigint,
        ColumnType::Integer,
        ColumnType::Smallint,
        ColumnType::Double,
        ColumnType::Numeric,
        ColumnType::Boolean,
        ColumnType::Timestamptz,
        ColumnType::TimestamptzSeconds,
        ColumnType::TimestamptzMillis,
        ColumnType::Date,
        ColumnType::Uuid,
        ColumnType::Jsonb,
        ColumnType::TextArray,
    ];

    /// The name in a mapping.
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Bigint => "bigint",
            ColumnType::Integer => "integer",
            ColumnType::Smallint => "smallint",
            ColumnType::Double => "double precision",
            ColumnType::Numeric => "numeric",
            ColumnType::Boolean => "boolean",
            ColumnType::Timestamptz => "timestamptz",
            ColumnType::TimestamptzSeconds => "timestamptz(s)",
            ColumnType::TimestamptzMillis => "timestamptz(ms)",
            ColumnType::Date => "date",
            ColumnType::Uuid => "uuid",
            ColumnType::Jsonb => "jsonb",
            ColumnType::TextArray => "text[]",
        }
    }

    /// Whether two values of this type are equal in Postgres (the staging table's default
    /// equality, as `DISTINCT ON` would compare them) exactly when their COPY BINARY encodings
    /// are the same bytes: integers, booleans, dates, timestamps, uuids, and text (the
    /// staging table's collation is the database's, deterministic: text compares by bytes).
    /// Not so for `numeric` (`1.0 = 1`), `double precision` (`-0 = 0`), `jsonb` (`{"a":1.0}`
    /// equals `{"a":1}`) and arrays, whose encoding differs between equal values.
    pub fn equal_as_encoded(self) -> bool {
        match self {
            ColumnType::Text
            | ColumnType::Bigint
            | ColumnType::Integer
            | ColumnType::Smallint
            | ColumnType::Boolean
            | ColumnType::Timestamptz
            | ColumnType::TimestamptzSeconds
            | ColumnType::TimestamptzMillis
            | ColumnType::Date
            | ColumnType::Uuid => true,
            ColumnType::Double
            | ColumnType::Numeric
            | ColumnType::Jsonb
            | ColumnType::TextArray => false,
        }
    }

    /// The type in `CREATE TABLE` / `ADD COLUMN`.
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::Timestamptz
            | ColumnType::TimestamptzSeconds
            | ColumnType::TimestamptzMillis => "timestamptz",
            other => other.name(),
        }
    }

    /// The type as Postgres' `format_type(atttypid, NULL)` shows an existing column's.
    pub fn catalog_name(self) -> &'static str {
        match self {
            ColumnType::Timestamptz
            | ColumnType::TimestamptzSeconds
            | ColumnType::TimestamptzMillis => "timestamp with time zone",
            other => other.name(),
        }
    }

    fn parse(s: &str) -> Option<Self> {
        let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
        let s = s.to_ascii_lowercase();
        let alias = match s.as_str() {
            "int8" => "bigint",
            "int" | "int4" => "integer",
            "int2" => "smallint",
            "float8" | "double" => "double precision",
            "bool" => "boolean",
            other => other,
        };
        Self::ALL.into_iter().find(|t| t.name() == alias)
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Metadata a column can take instead of a field of the record (`@name` in a mapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Meta {
    /// `@request_id`: the id the producer gave the request (`text`: 32 hex digits, or `uuid`).
    RequestId,
    /// `@received_at`: when the producer accepted the request (`timestamptz`).
    ReceivedAt,
    /// `@kafka_key`: the Kafka message's key (`text`, which must be UTF-8, or `jsonb`); NULL
    /// when the message has none.
    KafkaKey,
    /// `@kafka_timestamp`: the Kafka message's timestamp (`timestamptz`); NULL when it has none.
    KafkaTimestamp,
    /// `@kafka_partition` (`integer` or `bigint`).
    KafkaPartition,
    /// `@kafka_offset` (`bigint`).
    KafkaOffset,
    /// `@record_index`: the record's index inside its request (`integer` or `bigint`).
    RecordIndex,
    /// `@headers`: the Kafka message's headers as a JSON object of strings (`jsonb`; a value
    /// that is not UTF-8 has its bad bytes replaced, a header without a value is `null`).
    Headers,
}

impl Meta {
    const ALL: [Meta; 8] = [
        Meta::RequestId,
        Meta::ReceivedAt,
        Meta::KafkaKey,
        Meta::KafkaTimestamp,
        Meta::KafkaPartition,
        Meta::KafkaOffset,
        Meta::RecordIndex,
        Meta::Headers,
    ];

    /// The name after `@`.
    pub fn name(self) -> &'static str {
        match self {
            Meta::RequestId => "request_id",
            Meta::ReceivedAt => "received_at",
            Meta::KafkaKey => "kafka_key",
            Meta::KafkaTimestamp => "kafka_timestamp",
            Meta::KafkaPartition => "kafka_partition",
            Meta::KafkaOffset => "kafka_offset",
            Meta::RecordIndex => "record_index",
            Meta::Headers => "headers",
        }
    }

    /// The column types this metadata can land in.
    pub fn types(self) -> &'static [ColumnType] {
        use ColumnType::*;
        match self {
            Meta::RequestId => &[Text, Uuid],
            Meta::ReceivedAt | Meta::KafkaTimestamp => &[Timestamptz],
            Meta::KafkaKey => &[Text, Jsonb],
            Meta::KafkaPartition | Meta::RecordIndex => &[Integer, Bigint],
            Meta::KafkaOffset => &[Bigint],
            Meta::Headers => &[Jsonb],
        }
    }

    /// Whether it comes from the Kafka message rather than the envelope.
    pub fn from_kafka_message(self) -> bool {
        matches!(self, Meta::KafkaKey | Meta::KafkaTimestamp | Meta::Headers)
    }
}

/// Where a column's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A JSON Pointer into the record.
    Pointer(Pointer),
    /// Metadata.
    Meta(Meta),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Pointer(p) => write!(f, "{p}"),
            Source::Meta(m) => write!(f, "@{}", m.name()),
        }
    }
}

/// An RFC 6901 JSON Pointer, parsed into its reference tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pointer {
    text: String,
    tokens: Vec<String>,
}

impl Pointer {
    /// Parses `""` (the whole document) or `/token/token...`, unescaping `~1` and `~0`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(Pointer {
                text: String::new(),
                tokens: vec![],
            });
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Err(format!(
                "{s:?} is not a JSON Pointer: it must start with / (or be empty for the whole record)"
            ));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c != '~' {
                    token.push(c);
                    continue;
                }
                match chars.next() {
                    Some('0') => token.push('~'),
                    Some('1') => token.push('/'),
                    _ => {
                        return Err(format!(
                        "{s:?} is not a JSON Pointer: ~ must be followed by 0 (for ~) or 1 (for /)"
                    ))
                    }
                }
            }
            tokens.push(token);
        }
        Ok(Pointer {
            text: s.to_string(),
            tokens,
        })
    }

    /// The reference tokens, unescaped.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// The pointer as written.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            f.write_str("\"\" (the whole record)")
        } else {
            f.write_str(&self.text)
        }
    }
}

/// One mapped column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnSpec {
    /// The column's name (validated: needs no quoting, but is quoted anyway).
    pub name: String,
    /// Its type.
    pub ty: ColumnType,
    /// Missing or null is an error rather than NULL.
    pub not_null: bool,
    /// Where its value comes from.
    pub source: Source,
}

/// Why a mapping is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("column mapping {spec:?}: {problem}")]
pub struct SpecError {
    /// The mapping as written.
    pub spec: String,
    /// What is wrong and how to write it.
    pub problem: String,
}

impl ColumnSpec {
    /// The name, double-quoted for SQL.
    pub fn quoted_name(&self) -> String {
        format!("\"{}\"", self.name)
    }
}

impl FromStr for ColumnSpec {
    type Err = SpecError;

    /// Parses `NAME:TYPE[!]=SOURCE`.
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let err = |problem: String| SpecError {
            spec: spec.to_string(),
            problem,
        };
        let shape = "write NAME:TYPE=POINTER, e.g. user_id:bigint=/user/id";
        let (name, rest) = spec
            .split_once(':')
            .ok_or_else(|| err(format!("no ':' after the column name: {shape}")))?;
        let (ty, source) = rest
            .split_once('=')
            .ok_or_else(|| err(format!("no '=' after the type: {shape}")))?;
        let name = name.trim();
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == b'_')
            && name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
        if !name_ok {
            return Err(err(format!(
                "{name:?} is not a column name: use lowercase letters, digits and _ (not first), at most 63"
            )));
        }
        if BASE_COLUMNS.contains(&name) {
            return Err(err(format!(
                "{name:?} is a column Spillway always writes; pick another name (the metadata is also available as @{name} where it exists)"
            )));
        }
        let ty = ty.trim();
        let (ty, not_null) = match ty.strip_suffix('!') {
            Some(t) => (t, true),
            None => (ty, false),
        };
        let ty = ColumnType::parse(ty).ok_or_else(|| {
            let names: Vec<_> = ColumnType::ALL.iter().map(|t| t.name()).collect();
            err(format!(
                "unknown type {ty:?}: use one of {}",
                names.join(", ")
            ))
        })?;
        let source = match source.strip_prefix('@') {
            Some(meta) => {
                let m = Meta::ALL
                    .into_iter()
                    .find(|m| m.name() == meta)
                    .ok_or_else(|| {
                        let names: Vec<_> =
                            Meta::ALL.iter().map(|m| format!("@{}", m.name())).collect();
                        err(format!(
                            "unknown metadata @{meta}: use one of {}",
                            names.join(", ")
                        ))
                    })?;
                if !m.types().contains(&ty) {
                    let names: Vec<_> = m.types().iter().map(|t| t.name()).collect();
                    return Err(err(format!(
                        "@{} cannot be stored as {ty}: use {}",
                        m.name(),
                        names.join(" or ")
                    )));
                }
                Source::Meta(m)
            }
            None => Source::Pointer(Pointer::parse(source).map_err(err)?),
        };
        Ok(ColumnSpec {
            name: name.to_string(),
            ty,
            not_null,
            source,
        })
    }
}

impl fmt::Display for ColumnSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bang = if self.not_null { "!" } else { "" };
        match &self.source {
            Source::Pointer(p) => write!(f, "{}:{}{bang}={}", self.name, self.ty, p.text),
            Source::Meta(m) => write!(f, "{}:{}{bang}=@{}", self.name, self.ty, m.name()),
        }
    }
}

/// The columns of the records table: the base columns (with or without `data`) and the
/// mapped ones, compiled for extraction in one pass over each record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    columns: Vec<ColumnSpec>,
    keep_data: bool,
    tree: Node,
    upsert: Option<Upsert>,
}

impl Default for Mapping {
    /// No typed columns, the record kept in `data`: the table as before typed columns.
    fn default() -> Self {
        Mapping {
            columns: vec![],
            keep_data: true,
            tree: Node::default(),
            upsert: None,
        }
    }
}

/// The pointers of a mapping as a tree of tokens, walked once per record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Node {
    /// Columns whose pointer ends here.
    slots: Vec<usize>,
    /// Columns whose pointer ends here or below: a duplicate key forgets what an earlier
    /// member of that name gave them.
    below: Vec<usize>,
    children: Vec<(String, Option<usize>, Node)>,
}

impl Node {
    /// Fills in `below` everywhere under this node; returns this node's.
    fn settle(&mut self) -> Vec<usize> {
        let mut below = self.slots.clone();
        for (_, _, child) in &mut self.children {
            below.extend(child.settle());
        }
        self.below = below.clone();
        below
    }

    fn child(&self, key: &str) -> Option<&Node> {
        self.children
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, n)| n)
    }

    fn element(&self, index: usize) -> Option<&Node> {
        self.children
            .iter()
            .find(|(_, i, _)| *i == Some(index))
            .map(|(_, _, n)| n)
    }
}

/// The pointers of `columns` (slot i is column i) and `extra`'s (slot `columns.len()`) as
/// one tree.
fn compile(columns: &[ColumnSpec], extra: Option<&Pointer>) -> Node {
    let pointers = columns
        .iter()
        .map(|c| match &c.source {
            Source::Pointer(p) => Some(p),
            Source::Meta(_) => None,
        })
        .chain(extra.map(Some));
    compile_pointers(pointers)
}

/// Slot i is the i-th pointer (none: no slot), as one tree.
pub(crate) fn compile_pointers<'p>(pointers: impl Iterator<Item = Option<&'p Pointer>>) -> Node {
    let mut tree = Node::default();
    for (i, p) in pointers.enumerate() {
        let Some(p) = p else { continue };
        let mut node = &mut tree;
        for t in &p.tokens {
            let at = match node.children.iter().position(|(k, _, _)| k == t) {
                Some(at) => at,
                None => {
                    node.children
                        .push((t.clone(), array_index(t), Node::default()));
                    node.children.len() - 1
                }
            };
            node = &mut node.children[at].2;
        }
        node.slots.push(i);
    }
    tree.settle();
    tree
}

/// An array index token: `0`, or digits without a leading zero (RFC 6901).
fn array_index(token: &str) -> Option<usize> {
    let ok = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    ok.then(|| token.parse().ok()).flatten()
}

impl Mapping {
    /// Checks the columns together (no name twice) and compiles their pointers.
    pub fn new(columns: Vec<ColumnSpec>, keep_data: bool) -> Result<Self, SpecError> {
        for (i, c) in columns.iter().enumerate() {
            if columns[..i].iter().any(|o| o.name == c.name) {
                return Err(SpecError {
                    spec: c.to_string(),
                    problem: format!("column {:?} is mapped twice", c.name),
                });
            }
        }
        let tree = compile(&columns, None);
        Ok(Mapping {
            columns,
            keep_data,
            tree,
            upsert: None,
        })
    }

    /// The same columns, written by key ([`Upsert`]): each key column must be mapped and
    /// becomes required (a record without its key is dead-lettered), and the `--delete-when`
    /// pointer is compiled beside the columns' so one pass still finds everything.
    pub fn with_upsert(mut self, upsert: Upsert) -> Result<Self, SpecError> {
        let refuse = |problem: String| SpecError {
            spec: format!("--upsert-key {}", upsert.key.join(",")),
            problem,
        };
        if upsert.key.is_empty() {
            return Err(refuse("name at least one mapped column".into()));
        }
        for (i, k) in upsert.key.iter().enumerate() {
            if upsert.key[..i].contains(k) {
                return Err(refuse(format!("{k:?} is named twice")));
            }
            let Some(c) = self.columns.iter_mut().find(|c| &c.name == k) else {
                return Err(refuse(format!(
                    "{k:?} is not a mapped column: the key is made of typed columns, so map it \
                     first (for example --column {k}:bigint=/{k})"
                )));
            };
            c.not_null = true;
        }
        if upsert.delete_when.is_some() && self.columns.iter().any(|c| c.name == DELETE_FLAG) {
            return Err(refuse(format!(
                "a mapped column is named {DELETE_FLAG}, the name --delete-when uses for its \
                 flag: rename the column"
            )));
        }
        self.tree = compile(
            &self.columns,
            upsert.delete_when.as_ref().map(Matcher::pointer),
        );
        self.upsert = Some(upsert);
        Ok(self)
    }

    /// How rows are written by key, if they are.
    pub fn upsert(&self) -> Option<&Upsert> {
        self.upsert.as_ref()
    }

    /// Whether the rows are written by a key whose values Postgres finds equal exactly when
    /// their encodings are ([`ColumnType::equal_as_encoded`]): then the records a batch holds
    /// for each key can be chosen before the staging COPY ([`crate::upsert::deciding_rows`]),
    /// comparing encoded bytes, with the same outcome as choosing them in SQL.
    pub fn key_compares_as_encoded(&self) -> bool {
        self.upsert.as_ref().is_some_and(|u| {
            u.key.iter().all(|k| {
                self.columns
                    .iter()
                    .any(|c| &c.name == k && c.ty.equal_as_encoded())
            })
        })
    }

    /// Whether each row carries the `spillway_delete` flag (an upsert with `--delete-when`).
    fn deletes(&self) -> Option<&Matcher> {
        self.upsert.as_ref()?.delete_when.as_ref()
    }

    /// Slots [`Mapping::extract`] fills: one per column, then the `--delete-when` pointer's.
    pub(crate) fn slots(&self) -> usize {
        self.columns.len() + usize::from(self.deletes().is_some())
    }

    /// Whether the record (its values as [`Mapping::extract`] found them) deletes its key's row.
    pub(crate) fn is_delete(&self, found: &[Option<&str>]) -> bool {
        self.deletes()
            .is_some_and(|m| m.matches(found[self.columns.len()]))
    }

    /// The mapped columns, in the order they are written.
    pub fn columns(&self) -> &[ColumnSpec] {
        &self.columns
    }

    /// Whether the whole record is kept in `data jsonb`.
    pub fn keep_data(&self) -> bool {
        self.keep_data
    }

    /// Whether some column needs the Kafka message's key, timestamp or headers (the source
    /// copies them only then).
    pub fn needs_kafka_meta(&self) -> bool {
        self.columns
            .iter()
            .any(|c| matches!(c.source, Source::Meta(m) if m.from_kafka_message()))
    }

    /// The table's columns a row fills, quoted, in the order [`crate::pgcopy`] writes them:
    /// the base columns, `data` unless dropped, the mapped columns (not the `--delete-when`
    /// flag, which only a staging table has).
    pub fn row_columns(&self) -> Vec<String> {
        let mut out: Vec<String> = BASE_COPY_COLUMNS.iter().map(|c| c.to_string()).collect();
        if self.keep_data {
            out.push("data".into());
        }
        out.extend(self.columns.iter().map(ColumnSpec::quoted_name));
        out
    }

    /// The COPY column list, quoted, in the order [`crate::pgcopy`] writes the fields: the
    /// [`Mapping::row_columns`], then the `--delete-when` flag if there is one.
    pub fn copy_columns(&self) -> String {
        let mut out = self.row_columns();
        if self.deletes().is_some() {
            out.push(DELETE_FLAG.into());
        }
        out.join(", ")
    }

    /// Fields per row.
    pub fn field_count(&self) -> usize {
        4 + usize::from(self.keep_data) + self.columns.len() + usize::from(self.deletes().is_some())
    }

    /// Whether a row needs anything from inside the record.
    pub(crate) fn needs_record(&self) -> bool {
        !self.tree.children.is_empty() || !self.tree.slots.is_empty()
    }

    /// Finds every pointed-to value of `json` in one pass ([`crate::scan`], which also
    /// validates the whole record): `found[i]` is column i's raw JSON text, `None` when its
    /// pointer does not resolve.
    pub(crate) fn extract<'a>(
        &self,
        json: &'a [u8],
        found: &mut [Option<&'a str>],
    ) -> Result<(), String> {
        found.iter_mut().for_each(|f| *f = None);
        if !self.needs_record() {
            return Ok(());
        }
        let text = std::str::from_utf8(json).map_err(|_| "the record is not UTF-8".to_string())?;
        scan::scan(text, &self.tree, found)
    }
}

impl scan::PathNode for Node {
    fn slots(&self) -> &[usize] {
        &self.slots
    }

    fn slots_below(&self) -> &[usize] {
        &self.below
    }

    fn has_children(&self) -> bool {
        !self.children.is_empty()
    }

    fn member(&self, key: &str) -> Option<&Self> {
        self.child(key)
    }

    fn element(&self, index: usize) -> Option<&Self> {
        Node::element(self, index)
    }
}

struct StrVisitor;

impl<'de> Visitor<'de> for StrVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
}

/// A value that does not fit its column: the record is dead-lettered with this text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("column {column} ({ty} from {from}): {reason}; value: {value}")]
pub struct ConvertError {
    /// The column's name.
    pub column: String,
    /// Its type, as mapped.
    pub ty: ColumnType,
    /// Where the value came from (the pointer or the metadata).
    pub from: String,
    /// The value, truncated, or `(missing)`.
    pub value: String,
    /// Why it does not convert.
    pub reason: String,
}

/// Shows at most [`SHOWN_VALUE_CHARS`] characters of a value.
fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN_VALUE_CHARS) {
        Some((cut, _)) => format!("{}… ({} bytes)", &value[..cut], value.len()),
        None => value.to_string(),
    }
}

/// Writes the COPY BINARY field of one column for one record.
pub(crate) fn encode_field(
    spec: &ColumnSpec,
    raw: Option<&str>,
    record: &Record,
    out: &mut Vec<u8>,
) -> Result<(), ConvertError> {
    match &spec.source {
        Source::Pointer(_) => match raw {
            None => put_null(spec, out, "missing"),
            Some("null") => put_null(spec, out, "null"),
            Some(raw) => convert(spec.ty, raw, out).map_err(|reason| refusal(spec, raw, reason)),
        },
        Source::Meta(m) => encode_meta(spec, *m, record, out),
    }
}

fn refusal(spec: &ColumnSpec, value: &str, reason: String) -> ConvertError {
    ConvertError {
        column: spec.name.clone(),
        ty: spec.ty,
        from: spec.source.to_string(),
        value: shown(value),
        reason,
    }
}

/// NULL, or the refusal of a NOT NULL column's missing value.
fn put_null(spec: &ColumnSpec, out: &mut Vec<u8>, value: &str) -> Result<(), ConvertError> {
    if spec.not_null {
        Err(refusal(
            spec,
            value,
            format!("{} is required (NOT NULL) but is {value}", spec.source),
        ))
    } else {
        out.extend_from_slice(&(-1i32).to_be_bytes());
        Ok(())
    }
}

fn encode_meta(
    spec: &ColumnSpec,
    m: Meta,
    record: &Record,
    out: &mut Vec<u8>,
) -> Result<(), ConvertError> {
    let ty = spec.ty;
    let null = |out: &mut Vec<u8>, value: &str| put_null(spec, out, value);
    let fail = |value: &str, reason: String| refusal(spec, value, reason);
    let kafka: Option<&KafkaMeta> = record.kafka.as_deref();
    match (m, ty) {
        (Meta::RequestId, ColumnType::Uuid) => put_field(out, &record.request_id.0),
        (Meta::RequestId, _) => {
            let start = begin_field(out);
            for b in record.request_id.0 {
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 15)]);
            }
            end_field(out, start);
        }
        (Meta::ReceivedAt, _) => put_timestamp(out, record.received_at_micros)
            .map_err(|r| fail(&record.received_at_micros.to_string(), r))?,
        (Meta::KafkaPartition, ColumnType::Bigint) => put_field(
            out,
            &i64::from(kafka_partition(record.partition)).to_be_bytes(),
        ),
        (Meta::KafkaPartition, _) => {
            put_field(out, &kafka_partition(record.partition).to_be_bytes())
        }
        (Meta::KafkaOffset, _) => put_field(out, &record.offset.to_be_bytes()),
        (Meta::RecordIndex, ColumnType::Bigint) => {
            put_field(out, &i64::from(record.index).to_be_bytes())
        }
        (Meta::RecordIndex, _) => match i32::try_from(record.index) {
            Ok(i) => put_field(out, &i.to_be_bytes()),
            Err(_) => return Err(fail(&record.index.to_string(), "out of range".into())),
        },
        (Meta::KafkaKey, ty) => match kafka.and_then(|k| k.key.as_deref()) {
            None => return null(out, "missing (the message has no key)"),
            Some(key) if ty == ColumnType::Jsonb => {
                if serde_json::from_slice::<IgnoredAny>(key).is_err() {
                    return Err(fail(
                        &String::from_utf8_lossy(key),
                        "the key is not JSON (map it to a text column instead)".into(),
                    ));
                }
                let start = begin_field(out);
                out.push(1);
                out.extend_from_slice(key);
                end_field(out, start);
            }
            Some(key) => match std::str::from_utf8(key) {
                Ok(s) if s.contains('\0') => return Err(fail(s, NUL_IN_TEXT.into())),
                Ok(s) => put_field(out, s.as_bytes()),
                Err(_) => {
                    return Err(fail(
                        &String::from_utf8_lossy(key),
                        "the key is not UTF-8 text".into(),
                    ))
                }
            },
        },
        (Meta::KafkaTimestamp, _) => match kafka.and_then(|k| k.timestamp_millis) {
            None => return null(out, "missing (the message has no timestamp)"),
            Some(ms) => {
                let micros = ms
                    .checked_mul(1000)
                    .ok_or_else(|| fail(&ms.to_string(), "out of range for timestamptz".into()))?;
                put_timestamp(out, micros).map_err(|r| fail(&ms.to_string(), r))?
            }
        },
        (Meta::Headers, _) => match kafka {
            None => return null(out, "missing (the message has no headers)"),
            Some(k) => {
                let start = begin_field(out);
                out.push(1);
                out.push(b'{');
                for (i, (name, value)) in k.headers.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    put_json_string(out, name);
                    out.push(b':');
                    match value {
                        Some(v) => put_json_string(out, &String::from_utf8_lossy(v)),
                        None => out.extend_from_slice(b"null"),
                    }
                }
                out.push(b'}');
                end_field(out, start);
            }
        },
    }
    Ok(())
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Postgres text cannot hold U+0000: refused here, before anything is sent.
const NUL_IN_TEXT: &str = "text cannot hold the character U+0000 (Postgres refuses it)";

fn put_json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            // jsonb refuses \u0000: a NUL in a header becomes U+FFFD.
            '\0' => out.extend_from_slice("\u{fffd}".as_bytes()),
            c if (c as u32) < 0x20 => {
                let n = c as u32;
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(n >> 4) as usize]);
                out.push(HEX[(n & 15) as usize]);
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// Reserves a field's length; [`end_field`] fills it in.
fn begin_field(out: &mut Vec<u8>) -> usize {
    out.extend_from_slice(&[0; 4]);
    out.len()
}

fn end_field(out: &mut [u8], start: usize) {
    let len = (out.len() - start) as i32;
    out[start - 4..start].copy_from_slice(&len.to_be_bytes());
}

fn put_field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A timestamptz field from Unix microseconds, refused outside Postgres' range.
fn put_timestamp(out: &mut Vec<u8>, unix_micros: i64) -> Result<(), String> {
    let pg = unix_micros
        .checked_sub(PG_EPOCH_OFFSET_MICROS)
        .filter(|t| (PG_MIN_TIMESTAMP..PG_END_TIMESTAMP).contains(t))
        .ok_or("out of range for timestamptz (4713 BC to 294276 AD)")?;
    put_field(out, &pg.to_be_bytes());
    Ok(())
}

/// The JSON type of a raw value, for messages.
fn json_type(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn is_number(raw: &str) -> bool {
    matches!(raw.as_bytes().first(), Some(b'-' | b'0'..=b'9'))
}

/// Converts one non-null raw JSON value into `ty`'s COPY BINARY field. `raw` is a value the
/// scanner ([`crate::scan`]) validated: a string without escapes is taken as the text between
/// its quotes.
fn convert(ty: ColumnType, raw: &str, out: &mut Vec<u8>) -> Result<(), String> {
    use ColumnType::*;
    let want = |what: &str| format!("{ty} takes {what}, not {}", json_type(raw));
    match ty {
        Text => {
            if raw.starts_with('"') {
                let s = json_str(raw)?;
                if s.contains('\0') {
                    return Err(NUL_IN_TEXT.into());
                }
                put_field(out, s.as_bytes());
            } else {
                put_field(out, raw.as_bytes());
            }
        }
        Bigint | Integer | Smallint => {
            if !is_number(raw) {
                let hint = if raw.starts_with('"') {
                    " (strings are not converted: send 42, not \"42\")"
                } else {
                    ""
                };
                return Err(format!("{}{hint}", want("a JSON number")));
            }
            let d = Decimal::parse(raw)?;
            let v = d.integer(0, false)?;
            match ty {
                Bigint => put_field(
                    out,
                    &i64::try_from(v)
                        .map_err(|_| "out of range for bigint".to_string())?
                        .to_be_bytes(),
                ),
                Integer => put_field(
                    out,
                    &i32::try_from(v)
                        .map_err(|_| "out of range for integer".to_string())?
                        .to_be_bytes(),
                ),
                _ => put_field(
                    out,
                    &i16::try_from(v)
                        .map_err(|_| "out of range for smallint".to_string())?
                        .to_be_bytes(),
                ),
            }
        }
        Double => {
            if !is_number(raw) {
                return Err(want("a JSON number"));
            }
            let v: f64 = raw.parse().map_err(|_| format!("{raw} is not a number"))?;
            if !v.is_finite() {
                return Err("out of range for double precision".into());
            }
            put_field(out, &v.to_be_bytes());
        }
        Numeric => {
            if !is_number(raw) {
                return Err(want("a JSON number"));
            }
            Decimal::parse(raw)?.put_numeric(out)?;
        }
        Boolean => match raw {
            "true" => put_field(out, &[1]),
            "false" => put_field(out, &[0]),
            _ => return Err(want("true or false")),
        },
        Timestamptz => {
            if !raw.starts_with('"') {
                let hint = if is_number(raw) {
                    " (for epoch numbers map the column as timestamptz(s) or timestamptz(ms))"
                } else {
                    ""
                };
                return Err(format!("{}{hint}", want("an RFC 3339 string")));
            }
            let micros = parse_rfc3339(&json_str(raw)?)?;
            put_timestamp(out, micros)?;
        }
        TimestamptzSeconds | TimestamptzMillis => {
            if !is_number(raw) {
                return Err(want("a JSON number"));
            }
            let scale = if ty == TimestamptzSeconds { 6 } else { 3 };
            let micros = Decimal::parse(raw)?.integer(scale, true)?;
            let micros =
                i64::try_from(micros).map_err(|_| "out of range for timestamptz".to_string())?;
            put_timestamp(out, micros)?;
        }
        Date => {
            if !raw.starts_with('"') {
                return Err(want("a YYYY-MM-DD string"));
            }
            let days = parse_date(json_str(raw)?.as_bytes())?;
            put_field(out, &((days - PG_EPOCH_OFFSET_DAYS) as i32).to_be_bytes());
        }
        Uuid => {
            if !raw.starts_with('"') {
                return Err(want("a UUID string"));
            }
            put_field(out, &parse_uuid(json_str(raw)?.as_bytes())?);
        }
        Jsonb => {
            let start = begin_field(out);
            out.push(1);
            out.extend_from_slice(raw.as_bytes());
            end_field(out, start);
        }
        TextArray => {
            if !raw.starts_with('[') {
                return Err(want("an array of strings"));
            }
            put_text_array(raw, out)?;
        }
    }
    Ok(())
}

/// A JSON string's content, borrowed unless it has escapes.
pub(crate) fn json_str(raw: &str) -> Result<Cow<'_, str>, String> {
    // The scanner validated it: without escapes, its content is what lies between the quotes.
    if let Some(plain) = scan::unescaped(raw) {
        return Ok(Cow::Borrowed(plain));
    }
    let mut de = serde_json::Deserializer::from_str(raw);
    de.deserialize_str(StrVisitor)
        .map_err(|e| format!("not a JSON string: {e}"))
}

/// `text[]`'s binary form: ndim, has-nulls, element oid, (length, lower bound) per dimension,
/// then each element as length + bytes, or -1 for NULL.
fn put_text_array(raw: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let start = begin_field(out);
    let header = out.len();
    out.extend_from_slice(&1i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&TEXT_OID.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&1i32.to_be_bytes());
    let mut de = serde_json::Deserializer::from_str(raw);
    let (count, nulls) = de
        .deserialize_seq(TextElements { out: &mut *out })
        .map_err(|e| e.to_string())?;
    if count == 0 {
        // An empty array has no dimensions.
        out.truncate(header);
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&TEXT_OID.to_be_bytes());
    } else {
        out[header + 4..header + 8].copy_from_slice(&i32::from(nulls).to_be_bytes());
        out[header + 12..header + 16].copy_from_slice(&(count as i32).to_be_bytes());
    }
    end_field(out, start);
    Ok(())
}

struct TextElements<'o> {
    out: &'o mut Vec<u8>,
}

struct TextElement<'o> {
    out: &'o mut Vec<u8>,
}

impl<'de> Visitor<'de> for TextElements<'_> {
    type Value = (usize, bool);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (mut count, mut nulls) = (0usize, false);
        while let Some(is_null) = seq
            .next_element_seed(TextElement {
                out: &mut *self.out,
            })
            .map_err(|e| de::Error::custom(format!("element {count}: {e}")))?
        {
            nulls |= is_null;
            count += 1;
        }
        Ok((count, nulls))
    }
}

impl<'de> DeserializeSeed<'de> for TextElement<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TextElement<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or null (text[] takes only those)")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        if v.contains('\0') {
            return Err(E::custom(NUL_IN_TEXT));
        }
        put_field(self.out, v.as_bytes());
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        self.out.extend_from_slice(&(-1i32).to_be_bytes());
        Ok(true)
    }
}

/// A JSON number as written: sign, integer and fraction digits, exponent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decimal<'a> {
    negative: bool,
    int: &'a [u8],
    frac: &'a [u8],
    exp: i64,
}

impl<'a> Decimal<'a> {
    fn parse(raw: &'a str) -> Result<Self, String> {
        let bad = || format!("{raw} is not a JSON number");
        let b = raw.as_bytes();
        let mut i = 0;
        let negative = b.first() == Some(&b'-');
        if negative {
            i += 1;
        }
        let digits = |i: usize| b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        let n = digits(i);
        if n == 0 {
            return Err(bad());
        }
        let int = &b[i..i + n];
        i += n;
        let mut frac: &[u8] = &[];
        if b.get(i) == Some(&b'.') {
            let n = digits(i + 1);
            if n == 0 {
                return Err(bad());
            }
            frac = &b[i + 1..i + 1 + n];
            i += 1 + n;
        }
        let mut exp = 0i64;
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            let sign = match b.get(i) {
                Some(b'-') => {
                    i += 1;
                    -1
                }
                Some(b'+') => {
                    i += 1;
                    1
                }
                _ => 1,
            };
            let n = digits(i);
            if n == 0 {
                return Err(bad());
            }
            for &c in &b[i..i + n] {
                // Saturates: an exponent this large is out of every type's range anyway.
                exp = exp.saturating_mul(10).saturating_add(i64::from(c - b'0'));
            }
            exp *= sign;
            i += n;
        }
        if i != b.len() {
            return Err(bad());
        }
        Ok(Decimal {
            negative,
            int,
            frac,
            exp,
        })
    }

    fn len(&self) -> i64 {
        (self.int.len() + self.frac.len()) as i64
    }

    /// The digit at position `i` of int ++ frac (0 outside).
    fn digit(&self, i: i64) -> u8 {
        if i < 0 {
            return 0;
        }
        let i = i as usize;
        match i.checked_sub(self.int.len()) {
            None => self.int[i] - b'0',
            Some(j) => self.frac.get(j).map_or(0, |c| c - b'0'),
        }
    }

    /// Where the decimal point sits in int ++ frac.
    fn point(&self) -> i64 {
        (self.int.len() as i64).saturating_add(self.exp)
    }

    fn first_nonzero(&self) -> Option<i64> {
        (0..self.len()).find(|&i| self.digit(i) != 0)
    }

    fn last_nonzero(&self) -> Option<i64> {
        (0..self.len()).rev().find(|&i| self.digit(i) != 0)
    }

    /// The value times 10^`scale` as an integer. A fraction left over is an error, or, with
    /// `round`, rounded half away from zero.
    fn integer(self, scale: i64, round: bool) -> Result<i128, String> {
        let Some(first) = self.first_nonzero() else {
            return Ok(0);
        };
        let point = self.point().saturating_add(scale);
        if point.saturating_sub(first) > 38 {
            return Err("out of range".into());
        }
        let mut v: i128 = 0;
        for i in first..point {
            v = v * 10 + i128::from(self.digit(i));
        }
        let has_fraction = self.last_nonzero().is_some_and(|l| l >= point);
        if has_fraction {
            if !round {
                return Err("has a fraction, and an integer column takes whole numbers".into());
            }
            if self.digit(point) >= 5 && point >= 0 {
                v += 1;
            }
        }
        Ok(if self.negative { -v } else { v })
    }

    /// numeric's binary form: ndigits, weight, sign, dscale (each 16 bits), then base-10000
    /// digits, most significant first; the value is sum(digit[i] * 10000^(weight - i)).
    fn put_numeric(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let range = "out of range for numeric".to_string();
        let dscale = (self.frac.len() as i64).saturating_sub(self.exp).max(0);
        if dscale > 0x3FFF {
            return Err(range);
        }
        let (Some(first), Some(last)) = (self.first_nonzero(), self.last_nonzero()) else {
            let start = begin_field(out);
            for v in [0u16, 0, 0, dscale as u16] {
                out.extend_from_slice(&v.to_be_bytes());
            }
            end_field(out, start);
            return Ok(());
        };
        let point = self.point();
        // The decimal exponent of a position: 10^(point - 1 - i).
        let weight = point.saturating_sub(1).saturating_sub(first).div_euclid(4);
        let last_group = point.saturating_sub(1).saturating_sub(last).div_euclid(4);
        let ndigits = weight - last_group + 1;
        if !(i64::from(i16::MIN)..=i64::from(i16::MAX)).contains(&weight) || ndigits > 3000 {
            return Err(range);
        }
        let start = begin_field(out);
        out.extend_from_slice(&(ndigits as i16).to_be_bytes());
        out.extend_from_slice(&(weight as i16).to_be_bytes());
        let sign: u16 = if self.negative { 0x4000 } else { 0 };
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&(dscale as u16).to_be_bytes());
        for g in (last_group..=weight).rev() {
            let mut group = 0u16;
            for k in (0..4).rev() {
                group = group * 10 + u16::from(self.digit(point - 1 - (4 * g + k)));
            }
            out.extend_from_slice(&group.to_be_bytes());
        }
        end_field(out, start);
        Ok(())
    }
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn number(b: &[u8], what: &str) -> Result<i64, String> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return Err(format!("bad {what}"));
    }
    Ok(b.iter().fold(0, |v, c| v * 10 + i64::from(c - b'0')))
}

/// `YYYY-MM-DD` → days since 1970-01-01.
fn parse_date(b: &[u8]) -> Result<i64, String> {
    let shape = "not a date: write YYYY-MM-DD";
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(shape.into());
    }
    let y = number(&b[0..4], "year").map_err(|_| shape)?;
    let m = number(&b[5..7], "month").map_err(|_| shape)?;
    let d = number(&b[8..10], "day").map_err(|_| shape)?;
    if !(1..=12).contains(&m) || !(1..=days_in_month(y, m)).contains(&d) {
        return Err(format!("no such date: month {m}, day {d} of {y}"));
    }
    Ok(days_from_civil(y, m, d))
}

/// An RFC 3339 date-time → microseconds since the Unix epoch.
fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let shape = || {
        "not an RFC 3339 timestamp: write 2026-11-27T16:03:18Z or 2026-11-27T16:03:18.5+01:00"
            .to_string()
    };
    let b = s.as_bytes();
    if b.len() < 20 || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return Err(shape());
    }
    let days =
        parse_date(&b[..10]).map_err(|e| if e.starts_with("no such") { e } else { shape() })?;
    let hh = number(&b[11..13], "hour").map_err(|_| shape())?;
    let mm = number(&b[14..16], "minute").map_err(|_| shape())?;
    let ss = number(&b[17..19], "second").map_err(|_| shape())?;
    if hh > 23 || mm > 59 || ss > 60 {
        return Err(format!("no such time: {hh:02}:{mm:02}:{ss:02}"));
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b[i] == b'.' {
        let n = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return Err(shape());
        }
        let frac = &b[i + 1..i + 1 + n];
        for k in 0..6 {
            micros = micros * 10 + frac.get(k).map_or(0, |c| i64::from(c - b'0'));
        }
        if frac.get(6).is_some_and(|&c| c >= b'5') {
            micros += 1;
        }
        i += 1 + n;
    }
    let offset = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let oh = number(&[*h1, *h2], "offset").map_err(|_| shape())?;
            let om = number(&[*m1, *m2], "offset").map_err(|_| shape())?;
            if oh > 23 || om > 59 {
                return Err(format!("no such offset: {}", &s[i..]));
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return Err(shape()),
    };
    // A leap second (:60) counts as the next minute's first, as Postgres reads it.
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss - offset;
    Ok(secs * 1_000_000 + micros)
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (any case) → 16 bytes.
fn parse_uuid(b: &[u8]) -> Result<[u8; 16], String> {
    let shape =
        "not a UUID: write 8-4-4-4-12 hex digits, e.g. 3f2504e0-4f89-11d3-9a0c-0305e82c3301";
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return Err(shape.into());
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 16];
    let hex = (0..36).filter(|i| ![8, 13, 18, 23].contains(i));
    for (n, i) in hex.enumerate() {
        let v = nibble(b[i]).ok_or(shape)?;
        out[n / 2] |= if n % 2 == 0 { v << 4 } else { v };
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
