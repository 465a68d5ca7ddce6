//! The router's waiting line: a bounded queue with priority classes and per-request deadlines.
//!
//! Requests wait here while every worker slot is busy or a worker is still loading. The next one
//! out is the oldest of the most urgent class that has one waiting (interactive before standard
//! before batch), so a burst of batch work never delays a person typing. Every entry has a
//! deadline: the caller sweeps expired entries out and answers them with an error instead of
//! letting them hang. An entry whose client went away is removed by its ticket at once. Pure data
//! structure: time is passed in.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Priority class, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Interactive,
    Standard,
    Batch,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Interactive, Class::Standard, Class::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Interactive => "interactive",
            Class::Standard => "standard",
            Class::Batch => "batch",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Class, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "interactive" => Ok(Class::Interactive),
            "standard" => Ok(Class::Standard),
            "batch" => Ok(Class::Batch),
            other => Err(format!(
                "unknown priority `{}` (expected interactive, standard or batch)",
                tidepool_bounds::clip(other)
            )),
        }
    }
}

/// Identifies one queued entry (to remove it when its client goes away).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// The queue is at capacity; `retry_after_s` is a hint for the `Retry-After` header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the queue is full ({capacity} waiting); retry in about {retry_after_s} s")]
pub struct QueueFull {
    pub capacity: usize,
    pub retry_after_s: u64,
}

#[derive(Debug)]
struct Entry<T> {
    ticket: Ticket,
    deadline: f64,
    enqueued: f64,
    item: T,
}

/// A bounded multi-class queue of `T`.
#[derive(Debug)]
pub struct PriorityQueue<T> {
    lanes: [VecDeque<Entry<T>>; 3],
    capacity: usize,
    next: u64,
}

impl<T> PriorityQueue<T> {
    pub fn new(capacity: usize) -> PriorityQueue<T> {
        PriorityQueue {
            lanes: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
            capacity,
            next: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.lanes.iter().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn depth(&self, class: Class) -> usize {
        self.lanes[class.index()].len()
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// Queues `item` at time `now`, to be served by `deadline`. `drain_rate` (requests/s the pool
    /// completes) only shapes the retry hint when the queue is full.
    pub fn push(
        &mut self,
        item: T,
        class: Class,
        now: f64,
        deadline: f64,
        drain_rate: f64,
    ) -> Result<Ticket, (T, QueueFull)> {
        if self.len() >= self.capacity {
            let retry = if drain_rate > 0.0 {
                (self.len() as f64 / drain_rate).ceil().clamp(1.0, 60.0) as u64
            } else {
                5
            };
            return Err((
                item,
                QueueFull {
                    capacity: self.capacity,
                    retry_after_s: retry,
                },
            ));
        }
        let ticket = Ticket(self.next);
        self.next += 1;
        self.lanes[class.index()].push_back(Entry {
            ticket,
            deadline,
            enqueued: now,
            item,
        });
        Ok(ticket)
    }

    /// The next entry to serve: the oldest of the most urgent non-empty class, with the seconds
    /// it waited.
    pub fn pop(&mut self, now: f64) -> Option<(Ticket, T, f64)> {
        self.lanes
            .iter_mut()
            .find_map(VecDeque::pop_front)
            .map(|e| (e.ticket, e.item, now - e.enqueued))
    }

    /// The next entry to serve among those `fits` accepts: the oldest of the most urgent class
    /// that has one (entries that nothing can serve now do not hold up the others).
    pub fn pop_where(
        &mut self,
        now: f64,
        mut fits: impl FnMut(&T) -> bool,
    ) -> Option<(Ticket, T, f64)> {
        for lane in &mut self.lanes {
            if let Some(i) = lane.iter().position(|e| fits(&e.item)) {
                return lane.remove(i).map(|e| (e.ticket, e.item, now - e.enqueued));
            }
        }
        None
    }

    /// Every waiting item, most urgent first.
    pub fn items(&self) -> impl Iterator<Item = &T> {
        self.lanes.iter().flat_map(|l| l.iter().map(|e| &e.item))
    }

    /// Removes entries whose deadline has passed, returning them (to be answered with an error).
    pub fn expire(&mut self, now: f64) -> Vec<(Ticket, T)> {
        let mut out = Vec::new();
        for lane in &mut self.lanes {
            let mut kept = VecDeque::with_capacity(lane.len());
            for e in lane.drain(..) {
                if e.deadline <= now {
                    out.push((e.ticket, e.item));
                } else {
                    kept.push_back(e);
                }
            }
            *lane = kept;
        }
        out
    }

    /// Removes one entry (its client went away).
    pub fn remove(&mut self, ticket: Ticket) -> Option<T> {
        for lane in &mut self.lanes {
            if let Some(i) = lane.iter().position(|e| e.ticket == ticket) {
                return lane.remove(i).map(|e| e.item);
            }
        }
        None
    }

    /// The earliest deadline waiting, for the caller's next sweep.
    pub fn next_deadline(&self) -> Option<f64> {
        self.lanes
            .iter()
            .flat_map(|l| l.iter().map(|e| e.deadline))
            .min_by(f64::total_cmp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_urgent_class_first_fifo_within_a_class() {
        let mut q = PriorityQueue::new(10);
        q.push("b1", Class::Batch, 0.0, 99.0, 1.0).unwrap();
        q.push("s1", Class::Standard, 1.0, 99.0, 1.0).unwrap();
        q.push("i1", Class::Interactive, 2.0, 99.0, 1.0).unwrap();
        q.push("s2", Class::Standard, 3.0, 99.0, 1.0).unwrap();
        assert_eq!(q.depth(Class::Standard), 2);
        let order: Vec<&str> = std::iter::from_fn(|| q.pop(5.0).map(|(_, x, _)| x)).collect();
        assert_eq!(order, ["i1", "s1", "s2", "b1"]);
        assert!(q.is_empty());
    }

    #[test]
    fn full_queue_refuses_with_a_retry_hint_and_gives_the_item_back() {
        let mut q = PriorityQueue::new(2);
        q.push(1, Class::Standard, 0.0, 9.0, 0.5).unwrap();
        q.push(2, Class::Standard, 0.0, 9.0, 0.5).unwrap();
        let (item, full) = q.push(3, Class::Interactive, 0.0, 9.0, 0.5).unwrap_err();
        assert_eq!(item, 3);
        assert_eq!(full.capacity, 2);
        assert_eq!(full.retry_after_s, 4);
    }

    #[test]
    fn deadlines_expire_and_removed_entries_are_gone() {
        let mut q = PriorityQueue::new(10);
        let a = q.push("a", Class::Standard, 0.0, 30.0, 1.0).unwrap();
        q.push("b", Class::Batch, 0.0, 10.0, 1.0).unwrap();
        q.push("c", Class::Interactive, 0.0, 60.0, 1.0).unwrap();
        assert_eq!(q.next_deadline(), Some(10.0));
        let gone: Vec<&str> = q.expire(10.0).into_iter().map(|(_, x)| x).collect();
        assert_eq!(gone, ["b"]);
        assert_eq!(q.remove(a), Some("a"));
        assert_eq!(q.remove(a), None);
        let (_, x, waited) = q.pop(12.5).unwrap();
        assert_eq!((x, waited), ("c", 12.5));
        assert!(q.pop(13.0).is_none());
    }

    #[test]
    fn pop_where_skips_what_cannot_be_served_without_reordering_the_rest() {
        let mut q = PriorityQueue::new(10);
        q.push(4096, Class::Interactive, 0.0, 99.0, 1.0).unwrap();
        q.push(100, Class::Standard, 1.0, 99.0, 1.0).unwrap();
        q.push(200, Class::Standard, 2.0, 99.0, 1.0).unwrap();
        q.push(300, Class::Batch, 3.0, 99.0, 1.0).unwrap();
        let small = |n: &u32| *n <= 512;
        assert_eq!(q.pop_where(5.0, small).map(|(_, n, _)| n), Some(100));
        assert_eq!(q.pop_where(5.0, small).map(|(_, n, _)| n), Some(200));
        assert_eq!(q.items().copied().collect::<Vec<_>>(), [4096, 300]);
        assert_eq!(q.pop_where(5.0, |n| *n > 9000), None);
        assert_eq!(q.pop(5.0).map(|(_, n, _)| n), Some(4096));
    }

    #[test]
    fn class_names_parse() {
        assert_eq!("Interactive".parse::<Class>().unwrap(), Class::Interactive);
        assert!("urgent".parse::<Class>().unwrap_err().contains("expected"));
    }
}
