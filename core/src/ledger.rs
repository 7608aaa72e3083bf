//! Which Kafka position is safe to commit, per partition.
//!
//! One Kafka message carries one HTTP request and may hold many records, so a position is a
//! message offset *and* a record index inside it: a batch may end in the middle of a message,
//! and the next consumer must resume at the record after it, not re-write the message's start.

use std::collections::BTreeMap;
use std::fmt;

/// A partition: Kafka's number, or for a consumer of several topics the number
/// [`crate::topics`] gives it.
pub type Partition = i32;

/// The next record to write on a partition: record `index` of the message at `offset`.
/// Positions order lexicographically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Kafka offset of the message.
    pub offset: i64,
    /// Index of the record inside that message.
    pub index: u32,
}

impl Position {
    /// The start of a partition that has never been written.
    pub const BEGINNING: Position = Position {
        offset: 0,
        index: 0,
    };

    /// Record `index` of message `offset`.
    pub const fn new(offset: i64, index: u32) -> Self {
        Position { offset, index }
    }

    /// The offset to commit to Kafka (and to seek to) so that nothing unwritten is skipped.
    /// A message that is only partly written is delivered again; the records before `index`
    /// are then skipped by position.
    pub const fn kafka_offset(self) -> i64 {
        self.offset
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.offset, self.index)
    }
}

/// The durable position per partition. It moves only from the position a batch started at to
/// the position after its last record, so it can never jump over records that were not
/// written or dead-lettered.
#[derive(Clone, Debug, Default)]
pub struct OffsetLedger {
    positions: BTreeMap<Partition, Position>,
}

/// The ledger refused to move: a batch did not start where the partition stands.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "partition {partition} is at {at}, but the batch started at {start}: refusing to skip records"
)]
pub struct Gap {
    /// The partition.
    pub partition: Partition,
    /// Where the ledger stands.
    pub at: Position,
    /// Where the batch claimed to start.
    pub start: Position,
}

impl OffsetLedger {
    /// An empty ledger: no partition is known.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records where a partition stands, as read from the durable store on assignment.
    pub fn set(&mut self, partition: Partition, at: Position) {
        self.positions.insert(partition, at);
    }

    /// Forgets a partition (it was revoked).
    pub fn remove(&mut self, partition: Partition) {
        self.positions.remove(&partition);
    }

    /// Where a partition stands, if assigned.
    pub fn position(&self, partition: Partition) -> Option<Position> {
        self.positions.get(&partition).copied()
    }

    /// Every assigned partition and its position, in partition order.
    pub fn positions(&self) -> impl Iterator<Item = (Partition, Position)> + '_ {
        self.positions.iter().map(|(p, pos)| (*p, *pos))
    }

    /// Moves `partition` from `start` to `end` after a batch covering exactly that range became
    /// durable. Refuses (and changes nothing) if the partition is not at `start`.
    pub fn advance(
        &mut self,
        partition: Partition,
        start: Position,
        end: Position,
    ) -> Result<(), Gap> {
        let at = self.position(partition).unwrap_or(start);
        if at != start || end < start {
            return Err(Gap {
                partition,
                at,
                start,
            });
        }
        self.positions.insert(partition, end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_only_from_where_it_stands() {
        let mut l = OffsetLedger::new();
        l.set(0, Position::new(10, 0));
        assert!(l
            .advance(0, Position::new(10, 0), Position::new(12, 3))
            .is_ok());
        assert_eq!(l.position(0), Some(Position::new(12, 3)));
        let gap = l
            .advance(0, Position::new(13, 0), Position::new(20, 0))
            .unwrap_err();
        assert_eq!(gap.at, Position::new(12, 3));
        assert_eq!(
            l.position(0),
            Some(Position::new(12, 3)),
            "a refused advance moves nothing"
        );
    }

    #[test]
    fn a_partly_written_message_is_delivered_again() {
        assert_eq!(Position::new(7, 3).kafka_offset(), 7);
        assert!(Position::new(7, 3) < Position::new(8, 0));
    }
}
