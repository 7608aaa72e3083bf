//! Several topics in one consumer. The core keys everything by one [`Partition`] number; a
//! consumer of several topics gives each of their partitions its own number:
//! `topic's place in the list × STRIDE + Kafka's partition number`. The first topic's
//! partitions keep Kafka's numbers, so a consumer of one topic sees nothing of this. The shell
//! translates at its edges (Kafka's calls, the stored positions, the lag) with [`Topics`];
//! rows and dead letters take Kafka's number from [`kafka_partition`]. No IO.

use crate::error::ConfigError;
use crate::ledger::Partition;

/// The span of partition numbers each topic has: a topic may have up to this many partitions.
pub const STRIDE: i32 = 1 << 20;

/// The most topics one consumer reads.
pub const MAX_TOPICS: usize = 64;

/// Kafka's number of the partition the core numbers `p`.
pub fn kafka_partition(p: Partition) -> i32 {
    p.rem_euclid(STRIDE)
}

/// The place in [`Topics`] of the topic of the partition the core numbers `p`.
pub fn topic_index(p: Partition) -> usize {
    p.div_euclid(STRIDE) as usize
}

/// The topics a consumer reads, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics(Vec<String>);

impl Topics {
    /// One topic.
    pub fn one(name: impl Into<String>) -> Self {
        Topics(vec![name.into()])
    }

    /// One to [`MAX_TOPICS`] distinct names.
    pub fn new(names: Vec<String>) -> Result<Self, ConfigError> {
        let bad = |problem: String| ConfigError::new("topic", problem);
        if names.is_empty() || names.len() > MAX_TOPICS {
            return Err(bad(format!(
                "{} topics given: a consumer reads 1 to {MAX_TOPICS}",
                names.len()
            )));
        }
        for (i, n) in names.iter().enumerate() {
            if n.trim().is_empty() {
                return Err(bad("an empty topic name".into()));
            }
            if names[..i].contains(n) {
                return Err(bad(format!("{n:?} is given twice")));
            }
        }
        Ok(Topics(names))
    }

    /// The names, in order.
    pub fn names(&self) -> &[String] {
        &self.0
    }

    /// Whether there is more than one.
    pub fn several(&self) -> bool {
        self.0.len() > 1
    }

    /// The core's number for Kafka's partition `kafka` of `topic`; `None` for a topic not in
    /// the list or a partition number past [`STRIDE`].
    pub fn number(&self, topic: &str, kafka: i32) -> Option<Partition> {
        let t = self.0.iter().position(|n| n == topic)?;
        (0..STRIDE)
            .contains(&kafka)
            .then(|| t as i32 * STRIDE + kafka)
    }

    /// The topic and Kafka's partition number of the partition the core numbers `p`.
    pub fn split(&self, p: Partition) -> Option<(&str, i32)> {
        let topic = self.0.get(topic_index(p))?;
        Some((topic, kafka_partition(p)))
    }
}

impl std::fmt::Display for Topics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_topic_keeps_kafkas_numbers_and_the_others_get_their_own() {
        let t = Topics::new(vec!["a".into(), "b".into()]).unwrap();
        assert_eq!(t.number("a", 3), Some(3));
        let b3 = t.number("b", 3).unwrap();
        assert_ne!(b3, 3);
        assert_eq!(t.split(b3), Some(("b", 3)));
        assert_eq!(t.split(3), Some(("a", 3)));
        assert_eq!(kafka_partition(b3), 3);
        assert_eq!(t.split(b3).map(|(topic, _)| topic), Some("b"));
        assert_eq!(t.number("c", 0), None, "not a topic of the list");
        assert_eq!(t.number("a", STRIDE), None, "past the stride");
        assert_eq!(t.number("a", -1), None);
        let last = t.number("b", STRIDE - 1).unwrap();
        assert_eq!(t.split(last), Some(("b", STRIDE - 1)));
        assert_eq!(t.split(2 * STRIDE), None);
    }

    #[test]
    fn a_list_is_one_to_sixty_four_distinct_names() {
        assert!(Topics::new(vec![]).is_err());
        assert!(Topics::new(vec!["a".into(), "a".into()]).is_err());
        assert!(Topics::new(vec![" ".into()]).is_err());
        let many: Vec<String> = (0..=MAX_TOPICS).map(|i| format!("t{i}")).collect();
        assert!(Topics::new(many[..MAX_TOPICS].to_vec()).is_ok());
        assert!(Topics::new(many).is_err());
        // The highest number fits an i32.
        let t = Topics::new((0..MAX_TOPICS).map(|i| format!("t{i}")).collect()).unwrap();
        let top = t
            .number(&format!("t{}", MAX_TOPICS - 1), STRIDE - 1)
            .unwrap();
        assert!(top > 0);
        assert!(!Topics::one("a").several() && t.several());
    }
}
