//! `--schema`: a JSON Schema every record of a request must match before anything of it
//! reaches Kafka. Compiled once at start-up; a request is checked on the trees
//! [`crate::ingest::parsed_records`] built while splitting it, never by parsing it again.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

/// The deepest records a schema check accepts (`--max-depth` must not be larger with
/// `--schema`): parsing into a tree, validating and dropping it all recurse on the depth.
pub const MAX_DEPTH: usize = 128;

/// How many errors a 422 lists; the rest are only counted.
pub const MAX_LISTED_ERRORS: usize = 10;

/// A reason is cut to this many characters (it may quote a large value).
const MAX_REASON_CHARS: usize = 300;

/// Why the schema file cannot be used. The producer does not start.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The file cannot be read.
    #[error("cannot read the schema file {}: {source}; fix the path given to --schema", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("the schema file {} is not JSON ({source}); a JSON Schema is a JSON document", path.display())]
    NotJson {
        /// The file.
        path: PathBuf,
        /// Where the JSON broke.
        source: serde_json::Error,
    },
    /// The JSON is not a usable schema (against its draft's meta-schema, or a `$ref` that does
    /// not resolve inside the file).
    #[error("the schema file {} is not a valid JSON Schema ({detail}); fix the schema (draft 2020-12 unless its $schema names another draft; every $ref must point inside the file)", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// A compiled `--schema`.
pub struct RecordSchema {
    path: PathBuf,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for RecordSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordSchema")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// One way a record fails the schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordError {
    /// The record's index in the request (0-based, in the order sent).
    pub record: usize,
    /// Where in the record, as a JSON Pointer ("" is the record itself).
    pub instance_path: String,
    /// The schema keyword that failed, as a JSON Pointer into the schema.
    pub schema_path: String,
    /// Why.
    pub reason: String,
}

/// A request whose records do not all match: answered 422, nothing written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Records in the request.
    pub records: usize,
    /// Records that do not match.
    pub failing_records: usize,
    /// The first errors, at most [`MAX_LISTED_ERRORS`].
    pub errors: Vec<RecordError>,
    /// Whether there were more errors than listed.
    pub truncated: bool,
}

impl Mismatch {
    /// The answer's message.
    pub fn message(&self) -> String {
        format!(
            "{} of the {} records do not match the schema (--schema): nothing was written. Fix \
             them and send the whole request again{}.",
            self.failing_records,
            self.records,
            if self.truncated {
                format!("; the first {} errors are listed", self.errors.len())
            } else {
                String::new()
            }
        )
    }
}

impl RecordSchema {
    /// Reads and compiles the schema file. Drafts follow the schema's `$schema`, 2020-12 when
    /// it names none. Only references inside the file resolve: nothing is fetched.
    pub fn load(path: &Path) -> Result<Self, SchemaError> {
        let text = std::fs::read(path).map_err(|source| SchemaError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let schema: Value =
            serde_json::from_slice(&text).map_err(|source| SchemaError::NotJson {
                path: path.to_path_buf(),
                source,
            })?;
        let validator = jsonschema::options()
            .build(&schema)
            .map_err(|e| SchemaError::Invalid {
                path: path.to_path_buf(),
                detail: match e.instance_path().as_str() {
                    "" => describe(&e),
                    at => format!("at {at}: {}", describe(&e)),
                },
            })?;
        Ok(RecordSchema {
            path: path.to_path_buf(),
            validator,
        })
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks every record; lists the first [`MAX_LISTED_ERRORS`] errors and counts the
    /// failing records (past the listed errors, only whether a record is valid is asked).
    pub fn check<'v>(&self, records: impl IntoIterator<Item = &'v Value>) -> Result<(), Mismatch> {
        let mut check = self.begin();
        for record in records {
            check.record(record);
        }
        check.finish()
    }

    /// A check fed one record at a time, so that each record's tree can be dropped as soon as
    /// it is checked: a request holds one tree at a time, never all of them.
    pub fn begin(&self) -> Check<'_> {
        Check {
            schema: self,
            mismatch: Mismatch {
                records: 0,
                failing_records: 0,
                errors: Vec::new(),
                truncated: false,
            },
        }
    }
}

/// A request's records being checked against the schema ([`RecordSchema::begin`]).
#[derive(Debug)]
pub struct Check<'s> {
    schema: &'s RecordSchema,
    mismatch: Mismatch,
}

impl Check<'_> {
    /// Checks the next record.
    pub fn record(&mut self, record: &Value) {
        let mismatch = &mut self.mismatch;
        let index = mismatch.records;
        mismatch.records += 1;
        let validator = &self.schema.validator;
        if mismatch.errors.len() >= MAX_LISTED_ERRORS {
            if !validator.is_valid(record) {
                mismatch.failing_records += 1;
                mismatch.truncated = true;
            }
            return;
        }
        let mut errors = validator.iter_errors(record).peekable();
        if errors.peek().is_none() {
            return;
        }
        mismatch.failing_records += 1;
        for e in errors {
            if mismatch.errors.len() == MAX_LISTED_ERRORS {
                mismatch.truncated = true;
                break;
            }
            mismatch.errors.push(RecordError {
                record: index,
                instance_path: e.instance_path().as_str().to_string(),
                schema_path: e.schema_path().as_str().to_string(),
                reason: describe(&e),
            });
        }
    }

    /// The verdict over every record checked.
    pub fn finish(self) -> Result<(), Mismatch> {
        if self.mismatch.failing_records == 0 {
            Ok(())
        } else {
            Err(self.mismatch)
        }
    }
}

fn describe(e: &jsonschema::ValidationError<'_>) -> String {
    let reason = e.to_string();
    match reason.char_indices().nth(MAX_REASON_CHARS) {
        Some((cut, _)) => format!("{}…", &reason[..cut]),
        None => reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(value: Value) -> RecordSchema {
        let path = std::env::temp_dir().join(format!("spillway-schema-{}.json", fastrand::u64(..)));
        std::fs::write(&path, value.to_string()).unwrap();
        let schema = RecordSchema::load(&path);
        std::fs::remove_file(&path).unwrap();
        schema.unwrap()
    }

    #[test]
    fn failures_name_the_record_the_paths_and_the_reason_and_the_list_is_capped() {
        let s = schema(json!({
            "type": "object",
            "required": ["id"],
            "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}
        }));
        let good = json!({"id": 1, "tags": ["a"]});
        assert_eq!(s.check([&good, &good]), Ok(()));
        let bad = json!({"id": "x", "tags": ["a", 2]});
        let err = s.check([&good, &bad]).unwrap_err();
        assert_eq!(
            (err.records, err.failing_records, err.truncated),
            (2, 1, false)
        );
        let mut paths: Vec<_> = err
            .errors
            .iter()
            .map(|e| (e.record, e.instance_path.as_str(), e.schema_path.as_str()))
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            vec![
                (1, "/id", "/properties/id/type"),
                (1, "/tags/1", "/properties/tags/items/type")
            ]
        );
        assert!(
            err.errors
                .iter()
                .all(|e| e.reason.contains("is not of type")),
            "{err:?}"
        );
        let many: Vec<Value> = (0..15).map(|_| json!({})).collect();
        let err = s.check(&many).unwrap_err();
        assert_eq!(err.errors.len(), MAX_LISTED_ERRORS);
        assert_eq!((err.failing_records, err.truncated), (15, true));
        assert!(
            err.message().contains("15 of the 15 records"),
            "{}",
            err.message()
        );
    }
}
