//! Upsert by key: which mapped columns form the key, what a conflict does, and which records
//! delete their key's row instead of writing one. The consumer's shell turns this into SQL
//! (a staging table merged with `INSERT … ON CONFLICT` in the flush transaction); here is only
//! what decides it, with no IO.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::columns::{json_str, Pointer};

/// What a record whose key is already in the table does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnConflict {
    /// The row takes the record's values (the latest record per key wins).
    #[default]
    Update,
    /// The row keeps its values (the first record per key wins).
    Ignore,
}

impl FromStr for OnConflict {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "update" => Ok(OnConflict::Update),
            "ignore" => Ok(OnConflict::Ignore),
            _ => Err(format!(
                "{s:?} is not an --on-conflict action: use update (the latest record per key \
                 wins) or ignore (the row already there stays)"
            )),
        }
    }
}

impl fmt::Display for OnConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnConflict::Update => "update",
            OnConflict::Ignore => "ignore",
        })
    }
}

/// `POINTER=VALUE`: holds for a record whose value at `POINTER` is `VALUE`, either a JSON
/// string whose content is `VALUE` (`/op=delete` matches `{"op":"delete"}`) or another JSON
/// value written exactly as `VALUE` (`/deleted=true`, `/v=3`; compared as text, so `3.0` is not
/// `3`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matcher {
    pointer: Pointer,
    value: String,
}

impl Matcher {
    /// The pointer whose value is compared.
    pub fn pointer(&self) -> &Pointer {
        &self.pointer
    }

    /// Whether the pointed value's raw JSON text (`None`: the pointer does not resolve) is the
    /// matcher's value.
    pub fn matches(&self, raw: Option<&str>) -> bool {
        match raw {
            None => false,
            Some(raw) if raw.starts_with('"') => {
                json_str(raw).is_ok_and(|s| s.as_ref() == self.value)
            }
            Some(raw) => raw == self.value,
        }
    }
}

impl FromStr for Matcher {
    type Err = String;

    /// Parses `POINTER=VALUE`; the pointer ends at the first `=` (write `=` inside a key as
    /// it is: JSON Pointer does not escape it, so such a key cannot be matched).
    fn from_str(s: &str) -> Result<Self, String> {
        let (pointer, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not POINTER=VALUE: write for example /op=delete"))?;
        let pointer = Pointer::parse(pointer).map_err(|e| format!("{s:?}: {e}"))?;
        Ok(Matcher {
            pointer,
            value: value.to_string(),
        })
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.pointer.text(), self.value)
    }
}

/// `--upsert-key`, `--on-conflict` and `--delete-when` together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upsert {
    /// The mapped columns that identify a row, in the order given.
    pub key: Vec<String>,
    /// What a record whose key is already in the table does.
    pub on_conflict: OnConflict,
    /// Records that delete their key's row.
    pub delete_when: Option<Matcher>,
}

impl fmt::Display for Upsert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key ({}), on conflict {}",
            self.key.join(", "),
            self.on_conflict
        )?;
        if let Some(d) = &self.delete_when {
            write!(f, ", delete when {d}")?;
        }
        Ok(())
    }
}

/// The rows of a batch that decide their key's row, in their order (ascending indexes), given
/// each row's key (its encoded key values) and whether it deletes, in Kafka order: per key, its
/// last delete, and after that the record that decides the row (the last one for
/// [`OnConflict::Update`], the first for [`OnConflict::Ignore`]), if any. Applying only these
/// leaves each key's row as applying every record one by one does: the delete removes the row
/// there was, the record after it writes the row again. Every other row changes nothing, so
/// the staging table need not hold it, and holds at most one delete and one record per key.
pub fn deciding_rows<'k>(
    rows: impl IntoIterator<Item = (&'k [u8], bool)>,
    on_conflict: OnConflict,
) -> Vec<usize> {
    /// A key's last delete and the record after it that decides its row.
    #[derive(Default)]
    struct Decided {
        delete: Option<usize>,
        record: Option<usize>,
    }
    let mut keys: HashMap<&[u8], Decided> = HashMap::new();
    for (i, (key, delete)) in rows.into_iter().enumerate() {
        let d = keys.entry(key).or_default();
        if delete {
            *d = Decided {
                delete: Some(i),
                record: None,
            };
        } else if on_conflict == OnConflict::Update || d.record.is_none() {
            d.record = Some(i);
        }
    }
    let mut kept: Vec<usize> = keys
        .into_values()
        .flat_map(|d| d.delete.into_iter().chain(d.record))
        .collect();
    kept.sort_unstable();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Matcher {
        s.parse().unwrap()
    }

    #[test]
    fn a_key_keeps_its_last_delete_and_the_record_after_it_that_decides_its_row() {
        // Keys: a, b, a(delete), a, c, a, b(delete), c.
        let rows: Vec<(&[u8], bool)> = vec![
            (b"a", false),
            (b"b", false),
            (b"a", true),
            (b"a", false),
            (b"c", false),
            (b"a", false),
            (b"b", true),
            (b"c", false),
        ];
        assert_eq!(
            deciding_rows(rows.iter().copied(), OnConflict::Update),
            [2, 5, 6, 7],
            "a: its delete and its last record; b: its delete only; c: its last record"
        );
        assert_eq!(
            deciding_rows(rows.iter().copied(), OnConflict::Ignore),
            [2, 3, 4, 6],
            "the first record after the last delete"
        );
        assert_eq!(
            deciding_rows([(&b"a"[..], true), (b"a", true)], OnConflict::Update),
            [1]
        );
        assert!(deciding_rows([], OnConflict::Update).is_empty());
    }

    #[test]
    fn a_string_matches_by_content_and_anything_else_by_text() {
        let op = m("/op=delete");
        assert!(op.matches(Some("\"delete\"")));
        assert!(op.matches(Some("\"d\\u0065lete\"")), "escapes are undone");
        assert!(!op.matches(Some("\"Delete\"")));
        assert!(!op.matches(Some("\"delete \"")));
        assert!(!op.matches(None), "a missing value never matches");
        let flag = m("/deleted=true");
        assert!(flag.matches(Some("true")));
        assert!(!flag.matches(Some("false")));
        let n = m("/v=3");
        assert!(n.matches(Some("3")));
        assert!(!n.matches(Some("3.0")), "numbers compare as text");
    }

    #[test]
    fn a_string_value_matches_the_same_text_as_a_string() {
        // `/deleted=true` also holds for the string "true": VALUE is text, and a string's
        // content is compared with it.
        assert!(m("/deleted=true").matches(Some("\"true\"")));
    }

    #[test]
    fn matchers_and_actions_are_parsed_or_refused_with_the_way_to_write_them() {
        assert_eq!(m("/a/b=x=y").to_string(), "/a/b=x=y");
        assert_eq!(m("/a~1b=1").pointer().tokens(), ["a/b"]);
        let e = "op".parse::<Matcher>().unwrap_err();
        assert!(e.contains("POINTER=VALUE"), "{e}");
        let e = "op=x".parse::<Matcher>().unwrap_err();
        assert!(e.contains("must start with /"), "{e}");
        assert_eq!("ignore".parse(), Ok(OnConflict::Ignore));
        let e = "merge".parse::<OnConflict>().unwrap_err();
        assert!(e.contains("update") && e.contains("ignore"), "{e}");
    }
}
