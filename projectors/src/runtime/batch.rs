//! From the records one consumer delivered to what each projector of the set
//! applies. Pure bookkeeping, no I/O, so its rules are tested on their own.
//!
//! - [`Gathered`]: records in delivery order, each partition's once and in log
//!   order even when the consumer restarts a partition below what it already
//!   delivered (a seek after a conflict, a partition revoked and assigned again).
//! - [`Decoded`]: a batch decoded once, grouped by topic, for every projector.
//! - [`Decoded::select`]: one projector's share: the partitions it owns, from its
//!   own position on, borrowed from the batch whenever nothing has to be cut.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use rdkafka::message::{BorrowedMessage, Message};
use worldline_schemas::decode_envelope;

use crate::projector::Event;
use crate::store::DeadLetter;

/// `(topic, partition)`, as positions and stored offsets are keyed.
pub(super) type PartitionKey = (String, i32);

/// Where a projector stands on each partition it owns: the next offset to
/// apply, or `None` when no offset row exists yet (apply from the log's start).
pub(super) type Positions = HashMap<PartitionKey, Option<i64>>;

/// What a batch keeps of one Kafka record. Not an `OwnedMessage`: detaching
/// one copies its topic name and every header (nothing here reads headers),
/// a dozen allocations per record that took a quarter of a projector's CPU.
/// Here the topic name is shared and only the key and value are copied.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// The producer's create time, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

impl Record {
    pub fn copied_from(message: &BorrowedMessage<'_>, topic: Arc<str>) -> Record {
        Record {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
        }
    }
}

/// Records gathered for the next batch, in delivery order.
///
/// A consumer delivers each partition's records in log order from where it
/// was started. When it starts a partition again at or below a record already
/// gathered, the gathered records from that offset on are dropped and the new
/// delivery takes their place: the batch then holds every record of the
/// partition once, contiguously from its first. Keeping the first copies
/// instead could leave a gap below them once a position moves back (a batch
/// that conflicted), and keeping both would apply them twice.
#[derive(Debug, Default)]
pub(super) struct Gathered {
    records: Vec<Record>,
    last_offset: HashMap<(Arc<str>, i32), i64>,
    first_at: Option<tokio::time::Instant>,
}

impl Gathered {
    pub fn push(&mut self, record: Record) {
        let key = (record.topic.clone(), record.partition);
        if let Some(last) = self.last_offset.get(&key)
            && record.offset <= *last
        {
            let restart = record.offset;
            self.records.retain(|gathered| {
                gathered.partition != record.partition
                    || gathered.topic != record.topic
                    || gathered.offset < restart
            });
        }
        self.last_offset.insert(key, record.offset);
        if self.first_at.is_none() {
            self.first_at = Some(tokio::time::Instant::now());
        }
        self.records.push(record);
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// When the oldest record now gathered arrived.
    pub fn first_at(&self) -> Option<tokio::time::Instant> {
        self.first_at.filter(|_| !self.records.is_empty())
    }

    /// Drops the gathered records of one partition, which the consumer was
    /// sent back on and delivers again. Read before the seek, they may start
    /// above the position a conflict moved a projector to, and a batch cut
    /// before their redelivery arrived would apply them over a gap.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.records
            .retain(|record| record.partition != partition || &*record.topic != topic);
        self.last_offset
            .retain(|(t, p), _| *p != partition || &**t != topic);
        if self.records.is_empty() {
            self.first_at = None;
        }
    }

    /// The records gathered so far; gathering starts again empty.
    pub fn take(&mut self) -> Vec<Record> {
        self.last_offset.clear();
        self.first_at = None;
        std::mem::take(&mut self.records)
    }
}

/// The records of one partition in a batch: first and last offset, and the
/// first record's timestamp.
#[derive(Debug, Clone, Copy)]
struct Span {
    first: i64,
    last: i64,
    first_timestamp_ms: Option<i64>,
}

/// A batch decoded once for every projector of a set. Events and dead letters
/// are grouped by topic, in the order of the set's topics, each partition's in
/// log order: a projector reading one topic (or a run of adjacent ones) gets a
/// slice of the batch without a copy.
#[derive(Debug)]
pub(super) struct Decoded {
    records: Vec<Record>,
    events: Vec<Event>,
    letters: Vec<DeadLetter>,
    /// Per topic index: its events and its dead letters.
    by_topic: Vec<(Range<usize>, Range<usize>)>,
    spans: BTreeMap<(usize, i32), Span>,
    topics: Vec<Arc<str>>,
}

/// One projector's share of a batch.
#[derive(Debug)]
pub(super) struct Selection<'b> {
    pub events: Cow<'b, [Event]>,
    pub letters: Cow<'b, [DeadLetter]>,
    /// Each partition with a record in the share: the offset after its last.
    pub next_offsets: BTreeMap<PartitionKey, i64>,
    /// Each partition's oldest record in the share: its Kafka timestamp (ms).
    pub oldest_timestamps: Vec<(PartitionKey, i64)>,
}

impl Selection<'_> {
    pub fn is_empty(&self) -> bool {
        self.next_offsets.is_empty()
    }
}

/// The offsets of one partition a projector applies from a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Share {
    All,
    None,
    /// `[from, until)`: a position inside the batch, or a stop offset.
    Between(i64, i64),
}

impl Decoded {
    /// Decodes `records` (as gathered) once. `topics` are the set's topics;
    /// a record of any other topic (none should arrive) is ignored.
    pub fn new(records: Vec<Record>, topics: &[Arc<str>]) -> Decoded {
        let index_of = |topic: &Arc<str>| {
            topics
                .iter()
                .position(|t| Arc::ptr_eq(t, topic) || **t == **topic)
        };
        let mut indexed: Vec<(usize, Record)> = records
            .into_iter()
            .filter_map(|record| Some((index_of(&record.topic)?, record)))
            .collect();
        // Stable: each partition keeps its log order.
        indexed.sort_by_key(|(index, _)| *index);
        let mut events = Vec::with_capacity(indexed.len());
        let mut letters = Vec::new();
        // Per topic, where its events and dead letters end; a topic without a
        // record in the batch is an empty run where it would have been.
        let mut ends = vec![(0, 0); topics.len()];
        let mut spans: BTreeMap<(usize, i32), Span> = BTreeMap::new();
        let mut records = Vec::with_capacity(indexed.len());
        for (index, record) in indexed {
            spans
                .entry((index, record.partition))
                .and_modify(|span| span.last = record.offset)
                .or_insert(Span {
                    first: record.offset,
                    last: record.offset,
                    first_timestamp_ms: record.timestamp_ms,
                });
            match decode_envelope(record.payload.as_deref().unwrap_or_default()) {
                Ok(envelope) => events.push(Event {
                    topic: record.topic.clone(),
                    partition: record.partition,
                    offset: record.offset,
                    timestamp_ms: record.timestamp_ms.unwrap_or_default(),
                    envelope,
                }),
                Err(error) => {
                    tracing::warn!(topic = &*record.topic, partition = record.partition, offset = record.offset, %error, "dead letter");
                    letters.push(DeadLetter {
                        topic: record.topic.to_string(),
                        partition: record.partition,
                        offset: record.offset,
                        key: record.key.clone(),
                        payload: record.payload.clone(),
                        error_class: error.class(),
                        error_message: error.to_string(),
                    });
                }
            }
            ends[index] = (events.len(), letters.len());
            records.push(record);
        }
        let mut by_topic = Vec::with_capacity(topics.len());
        let mut start = (0, 0);
        for end in ends {
            let end = (end.0.max(start.0), end.1.max(start.1));
            by_topic.push((start.0..end.0, start.1..end.1));
            start = end;
        }
        Decoded {
            records,
            events,
            letters,
            by_topic,
            spans,
            topics: topics.to_vec(),
        }
    }

    /// The raw record at a position, for a dead letter made of a rejected event.
    pub fn record(&self, topic: &str, partition: i32, offset: i64) -> Option<&Record> {
        self.records.iter().find(|record| {
            record.partition == partition && record.offset == offset && &*record.topic == topic
        })
    }

    /// The share of a projector reading the topics at `topic_indexes`
    /// (ascending), standing at `positions`: records of partitions it owns, at
    /// or past its position, and before `stop` when given (a partition `stop`
    /// does not list gets nothing).
    pub fn select(
        &self,
        topic_indexes: &[usize],
        positions: &Positions,
        stop: Option<&HashMap<PartitionKey, i64>>,
    ) -> Selection<'_> {
        let mut shares: HashMap<(usize, i32), Share> = HashMap::new();
        let mut cut = false;
        let mut next_offsets = BTreeMap::new();
        let mut oldest_timestamps = Vec::new();
        for (&(index, partition), span) in self.spans.range((topic_indexes[0], i32::MIN)..) {
            if !topic_indexes.contains(&index) {
                continue;
            }
            let key = (self.topics[index].to_string(), partition);
            // Not owned: `None`; owned with nothing stored: from the start.
            let from = positions
                .get(&key)
                .map(|position| position.unwrap_or(i64::MIN));
            let until = match stop {
                None => i64::MAX,
                Some(stop) => stop.get(&key).copied().unwrap_or(0),
            };
            let share = match from {
                None => Share::None,
                Some(from) if span.first >= from && span.last < until => Share::All,
                Some(from) if span.last < from || span.first >= until || from >= until => {
                    Share::None
                }
                Some(from) => Share::Between(from, until),
            };
            match share {
                Share::All => {
                    next_offsets.insert(key.clone(), span.last + 1);
                    if let Some(ts) = span.first_timestamp_ms {
                        oldest_timestamps.push((key, ts));
                    }
                }
                Share::None => cut = true,
                Share::Between(from, until) => {
                    cut = true;
                    let kept = self.records.iter().filter(|record| {
                        record.partition == partition
                            && *record.topic == *self.topics[index]
                            && (from..until).contains(&record.offset)
                    });
                    let mut first_timestamp = None;
                    let mut last = None;
                    for record in kept {
                        if last.is_none() {
                            first_timestamp = record.timestamp_ms;
                        }
                        last = Some(record.offset);
                    }
                    if let Some(last) = last {
                        next_offsets.insert(key.clone(), last + 1);
                        if let Some(ts) = first_timestamp {
                            oldest_timestamps.push((key, ts));
                        }
                    }
                }
            }
            shares.insert((index, partition), share);
        }
        let contiguous = topic_indexes.windows(2).all(|pair| pair[1] == pair[0] + 1);
        if !cut && contiguous {
            let first = topic_indexes[0];
            let last = topic_indexes[topic_indexes.len() - 1];
            let events = self.by_topic[first].0.start..self.by_topic[last].0.end;
            let letters = self.by_topic[first].1.start..self.by_topic[last].1.end;
            return Selection {
                events: Cow::Borrowed(&self.events[events]),
                letters: Cow::Borrowed(&self.letters[letters]),
                next_offsets,
                oldest_timestamps,
            };
        }
        let kept = |index: usize, partition: i32, offset: i64| match shares
            .get(&(index, partition))
            .copied()
            .unwrap_or(Share::None)
        {
            Share::All => true,
            Share::None => false,
            Share::Between(from, until) => (from..until).contains(&offset),
        };
        let mut events = Vec::new();
        let mut letters = Vec::new();
        for &index in topic_indexes {
            let (event_range, letter_range) = self.by_topic[index].clone();
            events.extend(
                self.events[event_range]
                    .iter()
                    .filter(|e| kept(index, e.partition, e.offset))
                    .cloned(),
            );
            letters.extend(
                self.letters[letter_range]
                    .iter()
                    .filter(|l| kept(index, l.partition, l.offset))
                    .cloned(),
            );
        }
        Selection {
            events: Cow::Owned(events),
            letters: Cow::Owned(letters),
            next_offsets,
            oldest_timestamps,
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use worldline_schemas::WorldId;
    use worldline_schemas::envelope::new_envelope;
    use worldline_schemas::pb::envelope::Body;
    use worldline_schemas::pb::{ClockTicked, Season};

    use super::*;

    fn topics() -> Vec<Arc<str>> {
        vec![Arc::from("w"), Arc::from("c"), Arc::from("s")]
    }

    fn tick_bytes(tick: u64) -> Vec<u8> {
        let world = WorldId::parse("w1").expect("a valid world id");
        new_envelope(
            &world,
            tick,
            "test",
            Body::ClockTicked(ClockTicked {
                game_time_s: tick * 60,
                day: 0,
                season: Season::Spring as i32,
                time_scale: 60,
            }),
        )
        .encode_to_vec()
    }

    fn record(topics: &[Arc<str>], topic: usize, partition: i32, offset: i64) -> Record {
        Record {
            topic: topics[topic].clone(),
            partition,
            offset,
            timestamp_ms: Some(offset * 10),
            key: None,
            payload: Some(tick_bytes(u64::try_from(offset).unwrap() + 1)),
        }
    }

    fn offsets(records: &[Record]) -> Vec<(String, i32, i64)> {
        records
            .iter()
            .map(|r| (r.topic.to_string(), r.partition, r.offset))
            .collect()
    }

    fn event_offsets(events: &[Event]) -> Vec<(String, i32, i64)> {
        events
            .iter()
            .map(|e| (e.topic.to_string(), e.partition, e.offset))
            .collect()
    }

    fn owning(entries: &[(&str, i32, Option<i64>)]) -> Positions {
        entries
            .iter()
            .map(|(t, p, at)| (((*t).to_owned(), *p), *at))
            .collect()
    }

    /// Records `first..end` of partition 0 of topic "c", then offset 7 of its partition 1.
    fn gathered_from(t: &[Arc<str>], first: i64, end: i64) -> Gathered {
        let mut gathered = Gathered::default();
        for offset in first..end {
            gathered.push(record(t, 1, 0, offset));
        }
        gathered.push(record(t, 1, 1, 7));
        gathered
    }

    #[test]
    fn given_a_partition_delivered_again_from_below_then_the_new_delivery_replaces_the_old() {
        let t = topics();
        let mut gathered = gathered_from(&t, 10, 15);
        // The consumer restarted partition 0 at 12 (a seek, a re-assignment).
        for offset in 12..14 {
            gathered.push(record(&t, 1, 0, offset));
        }
        let records = gathered.take();
        assert_eq!(
            offsets(&records),
            [
                ("c".to_owned(), 0, 10),
                ("c".to_owned(), 0, 11),
                ("c".to_owned(), 1, 7),
                ("c".to_owned(), 0, 12),
                ("c".to_owned(), 0, 13),
            ]
        );
        assert!(gathered.is_empty() && gathered.first_at().is_none());
    }

    #[test]
    fn given_a_partition_sent_back_then_its_gathered_records_wait_for_the_redelivery() {
        let t = topics();
        let mut gathered = gathered_from(&t, 10, 13);
        gathered.forget("c", 0);
        assert_eq!(offsets(&gathered.take()), [("c".to_owned(), 1, 7)]);
        // The redelivery starts the partition afresh, below what was dropped.
        gathered.push(record(&t, 1, 0, 4));
        gathered.forget("c", 1);
        assert_eq!(offsets(&gathered.take()), [("c".to_owned(), 0, 4)]);
        gathered.push(record(&t, 1, 0, 9));
        gathered.forget("c", 0);
        assert!(gathered.is_empty() && gathered.first_at().is_none());
    }

    #[test]
    fn given_records_of_several_topics_when_decoded_then_each_topic_is_one_run_in_log_order() {
        let t = topics();
        let records = vec![
            record(&t, 2, 0, 5),
            record(&t, 1, 0, 1),
            record(&t, 2, 0, 6),
            record(&t, 1, 1, 3),
            record(&t, 1, 0, 2),
        ];
        let decoded = Decoded::new(records, &t);
        assert_eq!(
            event_offsets(&decoded.events),
            [
                ("c".to_owned(), 0, 1),
                ("c".to_owned(), 1, 3),
                ("c".to_owned(), 0, 2),
                ("s".to_owned(), 0, 5),
                ("s".to_owned(), 0, 6),
            ]
        );
        let all = owning(&[("c", 0, None), ("c", 1, Some(3)), ("s", 0, Some(5))]);
        let clock = decoded.select(&[1], &all, None);
        assert!(matches!(clock.events, Cow::Borrowed(_)), "no copy");
        assert_eq!(clock.events.len(), 3);
        assert_eq!(
            clock.next_offsets,
            BTreeMap::from([(("c".to_owned(), 0), 3), (("c".to_owned(), 1), 4)])
        );
        let everything = decoded.select(&[0, 1, 2], &all, None);
        assert!(matches!(everything.events, Cow::Borrowed(_)), "no copy");
        assert_eq!(everything.events.len(), 5);
        assert_eq!(everything.next_offsets.len(), 3);
    }

    #[test]
    fn given_a_batch_without_some_of_a_projectors_topics_then_it_still_gets_every_record() {
        let t = topics();
        // Only the middle topic has records; a projector of all three reads them all.
        let records = vec![record(&t, 1, 0, 0), record(&t, 1, 0, 1)];
        let decoded = Decoded::new(records, &t);
        let positions = owning(&[("w", 0, None), ("c", 0, None), ("s", 0, None)]);
        for topics in [&[0, 1, 2][..], &[0, 1], &[1, 2], &[1]] {
            let share = decoded.select(topics, &positions, None);
            assert_eq!(share.events.len(), 2, "{topics:?}");
            assert_eq!(
                share.next_offsets,
                BTreeMap::from([(("c".to_owned(), 0), 2)])
            );
        }
        let story = decoded.select(&[2], &positions, None);
        assert!(story.is_empty() && story.events.is_empty());
        let mixed = Decoded::new(vec![record(&t, 2, 0, 0), record(&t, 0, 0, 0)], &t);
        let everything = mixed.select(&[0, 1, 2], &positions, None);
        assert_eq!(everything.events.len(), 2);
        assert_eq!(mixed.select(&[1], &positions, None).events.len(), 0);
        assert_eq!(mixed.select(&[2], &positions, None).events.len(), 1);
    }

    #[test]
    fn given_a_projector_ahead_in_one_partition_then_it_gets_only_what_it_has_not_applied() {
        let t = topics();
        let records: Vec<Record> = (0..6)
            .map(|o| record(&t, 1, 0, o))
            .chain((0..3).map(|o| record(&t, 1, 1, o)))
            .collect();
        let decoded = Decoded::new(records, &t);
        // At 4 on partition 0 (applied 0..4 before), at the start of partition 1.
        let positions = owning(&[("c", 0, Some(4)), ("c", 1, Some(0))]);
        let share = decoded.select(&[1], &positions, None);
        assert_eq!(
            event_offsets(&share.events),
            [
                ("c".to_owned(), 0, 4),
                ("c".to_owned(), 0, 5),
                ("c".to_owned(), 1, 0),
                ("c".to_owned(), 1, 1),
                ("c".to_owned(), 1, 2),
            ]
        );
        assert_eq!(
            share.next_offsets,
            BTreeMap::from([(("c".to_owned(), 0), 6), (("c".to_owned(), 1), 3)])
        );
        assert_eq!(
            share.oldest_timestamps,
            [(("c".to_owned(), 0), 40), (("c".to_owned(), 1), 0)]
        );
        // Past the whole batch on partition 0, and partition 1 not owned.
        let ahead = owning(&[("c", 0, Some(9))]);
        let none = decoded.select(&[1], &ahead, None);
        assert!(none.is_empty() && none.events.is_empty());
    }

    #[test]
    fn given_stop_offsets_then_nothing_at_or_past_them_is_selected() {
        let t = topics();
        let records: Vec<Record> = (0..6).map(|o| record(&t, 1, 0, o)).collect();
        let decoded = Decoded::new(records, &t);
        let positions = owning(&[("c", 0, None), ("c", 1, None)]);
        let stop = HashMap::from([(("c".to_owned(), 0), 3)]);
        let share = decoded.select(&[1], &positions, Some(&stop));
        assert_eq!(share.events.len(), 3);
        assert_eq!(
            share.next_offsets,
            BTreeMap::from([(("c".to_owned(), 0), 3)])
        );
    }

    #[test]
    fn given_undecodable_records_then_each_reader_of_the_topic_gets_its_dead_letter() {
        let t = topics();
        let mut poisoned = record(&t, 2, 0, 1);
        poisoned.payload = Some(vec![0xff, 0x01]);
        let records = vec![record(&t, 2, 0, 0), poisoned, record(&t, 1, 0, 0)];
        let decoded = Decoded::new(records, &t);
        let positions = owning(&[("s", 0, None), ("c", 0, None)]);
        let story = decoded.select(&[2], &positions, None);
        assert_eq!(story.events.len(), 1);
        assert_eq!(story.letters.len(), 1);
        assert_eq!(story.letters[0].offset, 1);
        assert_eq!(
            story.next_offsets,
            BTreeMap::from([(("s".to_owned(), 0), 2)])
        );
        let clock = decoded.select(&[1], &positions, None);
        assert!(clock.letters.is_empty());
        assert!(decoded.record("s", 0, 1).is_some());
    }
}
