//! A linearizability check for one register (a tag) written by one writer with increasing
//! values and read by many: the history of what clients saw, and its violations.

use std::time::Instant;

/// One operation on the tag, as the client saw it.
#[derive(Debug, Clone)]
pub struct Op {
    /// When the client sent it.
    pub start: Instant,
    /// When the client had its answer.
    pub end: Instant,
    /// The value written (a write) or read (`None`: the tag was not there yet).
    pub value: Option<u64>,
    /// For a write: whether it was acknowledged.
    pub acked: bool,
}

/// What the clients saw.
#[derive(Default)]
pub struct History {
    /// Writes, in the writer's order.
    pub writes: Vec<Op>,
    /// Reads that were answered.
    pub reads: Vec<Op>,
}

/// Checks a single-writer register history with increasing values: a read never returns a
/// value older than one acknowledged before it began, nor one not yet written when it ended,
/// and reads that follow each other in time never go backwards. Returns the violations.
pub fn violations(h: &History) -> Vec<String> {
    let mut out = vec![];
    for r in &h.reads {
        let latest_acked = h.writes.iter().filter(|w| w.acked && w.end < r.start).filter_map(|w| w.value).max();
        if r.value < latest_acked {
            out.push(format!("stale read: {:?} after {:?} was acknowledged", r.value, latest_acked));
        }
        if let Some(v) = r.value {
            if !h.writes.iter().any(|w| w.value == Some(v) && w.start < r.end) {
                out.push(format!("read {v} before it was written"));
            }
        }
    }
    let mut reads = h.reads.clone();
    reads.sort_by_key(|r| r.start);
    for (i, r2) in reads.iter().enumerate() {
        if let Some(r1) = reads[..i].iter().filter(|r1| r1.end < r2.start).max_by_key(|r1| r1.value) {
            if r2.value < r1.value {
                out.push(format!("read went back from {:?} to {:?}", r1.value, r2.value));
            }
        }
    }
    out
}
