//! The small vocabulary of failure the shells translate their errors into.

/// What a failure means for the pipeline. The shells classify `rdkafka` and `tokio_postgres`
/// errors into this enum; the core only ever sees the class, never the error type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The operation may succeed later unchanged (connection lost, server restarting, timeout,
    /// serialization failure). Retry with backoff, forever; never drop the data.
    Retriable,
    /// The data itself is rejected (a record the database cannot store). Retrying the same
    /// data fails again: isolate the offending record and dead-letter it.
    Poison,
    /// Misconfiguration (bad credentials, missing permission, unknown topic). Stop with a
    /// message that names the setting.
    Fatal,
}

/// A setting that cannot work, named so the user can fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid setting `{setting}`: {problem}")]
pub struct ConfigError {
    /// The setting's name as the user spells it (a flag without dashes).
    pub setting: &'static str,
    /// What is wrong with it and what would be accepted.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `setting`.
    pub fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            setting,
            problem: problem.into(),
        }
    }
}
