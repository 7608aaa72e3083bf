//! A known bug a test can switch on, to show that the chaos suite catches it
//! (`cargo test -p spillway-integration --features mutations --test chaos_mutations`).
//!
//! Only with the cargo feature `mutations`, which refuses release builds: then
//! `SPILLWAY_MUTATE=<name>` is read once, when the producer starts, and an unknown name stops
//! it. Without the feature, [`active`] is `false` and the hook is dead code. The hook in the
//! producer is marked `MUTATION <name>`.

/// The environment variable naming the mutation.
pub const ENV: &str = "SPILLWAY_MUTATE";

/// A known bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// `ack-before-kafka`: `/store` answers 200 as soon as the message is queued in the Kafka
    /// client, before Kafka acknowledged it.
    AckBeforeKafka,
}

impl Mutation {
    /// Every mutation of the producer.
    pub const ALL: [Mutation; 1] = [Mutation::AckBeforeKafka];

    /// Its `SPILLWAY_MUTATE` name.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::AckBeforeKafka => "ack-before-kafka",
        }
    }

    /// The mutation called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Mutation::ALL.into_iter().find(|m| m.name() == name)
    }
}

#[cfg(feature = "mutations")]
static ACTIVE: std::sync::OnceLock<Option<Mutation>> = std::sync::OnceLock::new();

/// Reads `SPILLWAY_MUTATE` (with the feature only; without it, nothing is read and `Ok(None)`
/// is returned). Call once at start-up. The error names the known mutations.
pub fn init() -> Result<Option<Mutation>, String> {
    #[cfg(feature = "mutations")]
    {
        let chosen = match std::env::var(ENV) {
            Ok(name) if !name.is_empty() => Some(Mutation::parse(&name).ok_or_else(|| {
                format!(
                    "{ENV}: unknown mutation {name:?}; the producer's are: {}",
                    Mutation::ALL.map(Mutation::name).join(", ")
                )
            })?),
            _ => None,
        };
        let active = *ACTIVE.get_or_init(|| chosen);
        if let Some(m) = active {
            tracing::warn!(
                mutation = m.name(),
                "{ENV}: running with a known bug switched on, for a test"
            );
        }
        Ok(active)
    }
    #[cfg(not(feature = "mutations"))]
    Ok(None)
}

/// Whether `m` is switched on.
pub fn active(m: Mutation) -> bool {
    #[cfg(feature = "mutations")]
    {
        ACTIVE.get().copied().flatten() == Some(m)
    }
    #[cfg(not(feature = "mutations"))]
    {
        let _ = m;
        false
    }
}
