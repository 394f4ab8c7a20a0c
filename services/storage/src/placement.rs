//! Where a blob lives: weighted rendezvous (highest-random-weight) hashing of its digest over
//! the storage nodes. Every frontend and node computes the same owners from the same map, a
//! node that joins or leaves moves only the blobs it gains or loses, and no table is kept.
//!
//! **Score.** Node `i` scores `w_i / -ln(u)` for a digest, where `u` in (0, 1) is a hash of the
//! node and the digest and `w_i` the node's weight (its capacity). The highest score wins, so a
//! node is first for a share of blobs equal to its share of the total weight, and removing or
//! adding a node changes the winner only where that node wins or was winning. With equal
//! weights the order is the order of `u`.
//!
//! **Hash.** `u` comes from a 64-bit mix of the node's key (the first eight bytes of BLAKE3 of
//! its name, computed once per map) and the digest's first eight bytes (a digest is already a
//! cryptographic hash, so its leading bytes are uniform). Ranking n nodes costs n mixes of a
//! few nanoseconds each: a 1,000-node map is ranked in microseconds, where a cryptographic
//! hash per node and request would cost about as much as the request itself.
//!
//! **Zones.** Owners are taken in rendezvous order but one per zone while a zone without a copy
//! remains, so the R copies of a blob spread over as many zones as there are (up to R).
//!
//! # What limits a cluster of 100 nodes
//! Figures from the simulation in this module's tests (`cargo test --release -p berth-storage
//! placement_at_scale -- --nocapture --test-threads 1` prints them) on a 2-core machine:
//! - **Placement** is not the limit. The full placement order of one digest (what a frontend
//!   computes per blob request) took 0.36 µs over 10 nodes, 4.6 µs over 100 and 52 µs over
//!   1,000. A million blobs over 100 nodes in 10 zones, weighted 2/3/4: every node held
//!   0.987–1.016 of its weight's share of copies; a node joining moved 1.0% of copies (0.99 of
//!   the ideal, all of them onto the joiner), one leaving 0.69% (1.00 of the ideal); no blob
//!   had two copies in a zone. The map is one record of about 100 bytes per node, read by
//!   each frontend and storage node every 2 s and rebuilt only when its version changes.
//! - **Metadata writes** are. Every push is a handful of Raft writes (upload session, link,
//!   manifest, tag) through one leader, batched into shared log entries; with 100 storage
//!   nodes the heartbeats add 33 writes a second (one per node every 3 s). The leader's write
//!   rate bounds pushes per second however many storage nodes there are (see the cluster
//!   rows of `loadtest/bench.sh`).
//! - **Repair traffic** scales out. When a node holding C bytes dies, its blobs' new owners are
//!   spread over the survivors by the same hashing, so each of the 99 others receives about
//!   C/99 and sends about as much; the time to get back to R copies is C over 99 times the
//!   per-node move bandwidth (`--move-bandwidth`), unless the network saturates first. Each
//!   pass also asks R − 1 owners about every blob a node holds: with a million blobs per node
//!   that is two million small calls per pass, the cost to watch as nodes grow.

use berth_core::store::{NodeState, PlacementMap, StorageNode};
use berth_core::Digest;

/// A storage node as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Its name (stable across restarts: placement hashes it).
    pub name: String,
    /// Its zone, if it has one.
    pub zone: Option<String>,
    /// Its weight: the share of blobs it owns is its share of the total weight. Its capacity
    /// in bytes; 0 (unknown) counts as the mean of the others'.
    pub weight: u64,
    /// Whether it owns blobs (it is live). A member that does not (dead, draining) comes after
    /// every one that does, so it is asked for a blob only when no owner has it.
    pub owns: bool,
}

impl Member {
    /// A storage node of the placement map: its zone, its capacity as weight, owning blobs
    /// while it is live.
    pub fn of_node(n: &StorageNode) -> Member {
        Member { name: n.name.clone(), zone: n.zone.clone(), weight: n.capacity, owns: n.state == NodeState::Live }
    }

    /// A live member without zone, of weight 1.
    pub fn named(name: impl Into<String>) -> Member {
        Member { name: name.into(), zone: None, weight: 1, owns: true }
    }
}

/// The nodes blobs are placed on, with what ranking them needs precomputed.
#[derive(Debug, Clone)]
pub struct Placement {
    members: Vec<Member>,
    keys: Vec<u64>,
    weights: Vec<f64>,
    zoned: bool,
}

/// One node's score for one digest: compared by weighted score, then by the raw hash, then
/// (practically never needed) by name, so that every caller agrees on the order.
#[derive(Debug, Clone, Copy)]
pub struct Score {
    /// `w / -ln(u)`.
    pub weighted: f64,
    /// The raw 64-bit hash `u` is taken from.
    pub hash: u64,
    /// The node's index in the placement.
    pub node: usize,
}

/// The finalizer of SplitMix64: a bijection of u64 in which every input bit flips each output
/// bit with probability close to one half.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A node's key: the first eight bytes of BLAKE3 of its name.
fn node_key(name: &str) -> u64 {
    let out = blake3::hash(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_be_bytes(first)
}

/// The first eight bytes of a digest's hash (its first 16 hex digits).
fn digest_key(digest: &Digest) -> u64 {
    let hex = digest.hex();
    u64::from_str_radix(hex.get(..16).unwrap_or(hex), 16).unwrap_or_else(|_| node_key(hex))
}

/// `weight / -ln(u)` with `u` from the top 52 bits of `hash`, strictly inside (0, 1) (with 53
/// bits the largest value plus a half rounds up to 1).
fn weighted(hash: u64, weight: f64) -> f64 {
    let u = ((hash >> 12) as f64 + 0.5) / (1u64 << 52) as f64;
    weight / -u.ln()
}

impl Placement {
    /// A placement over `members`, in the order given (indices refer to it).
    pub fn new(members: Vec<Member>) -> Placement {
        let known: Vec<f64> = members.iter().filter(|m| m.weight > 0).map(|m| m.weight as f64).collect();
        let mean = if known.is_empty() { 1.0 } else { known.iter().sum::<f64>() / known.len() as f64 };
        let weights = members.iter().map(|m| if m.weight > 0 { m.weight as f64 } else { mean }).collect();
        let keys = members.iter().map(|m| node_key(&m.name)).collect();
        let zoned = members.iter().any(|m| m.zone.is_some());
        Placement { members, keys, weights, zoned }
    }

    /// The nodes of a placement map, in map order.
    pub fn of_map(map: &PlacementMap) -> Placement {
        Placement::new(map.nodes.iter().map(Member::of_node).collect())
    }

    /// Equal weights, no zones.
    pub fn of_names<S: AsRef<str>>(names: &[S]) -> Placement {
        Placement::new(names.iter().map(|n| Member::named(n.as_ref())).collect())
    }

    /// The members, in the order given.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `node`'s score for `digest`.
    pub fn score(&self, node: usize, digest: &Digest) -> Score {
        self.score_key(node, digest_key(digest))
    }

    fn score_key(&self, node: usize, d: u64) -> Score {
        let hash = mix64(self.keys[node] ^ d);
        Score { weighted: weighted(hash, self.weights[node]), hash, node }
    }

    /// Every member's score for `digest`, in member order.
    pub fn scores(&self, digest: &Digest) -> Vec<Score> {
        let d = digest_key(digest);
        (0..self.members.len()).map(|i| self.score_key(i, d)).collect()
    }

    /// Whether `a` ranks before `b`: members that own blobs first.
    pub fn cmp(&self, a: &Score, b: &Score) -> std::cmp::Ordering {
        let owns = |s: &Score| self.members[s.node].owns;
        owns(b)
            .cmp(&owns(a))
            .then_with(|| b.weighted.total_cmp(&a.weighted))
            .then_with(|| b.hash.cmp(&a.hash))
            .then_with(|| self.members[a.node].name.cmp(&self.members[b.node].name))
    }

    /// Indices of the members in rendezvous order for `digest`, zones aside (members that own
    /// blobs first).
    pub fn ranked(&self, digest: &Digest) -> Vec<usize> {
        let mut s = self.scores(digest);
        s.sort_by(|a, b| self.cmp(a, b));
        s.into_iter().map(|s| s.node).collect()
    }

    /// Indices of the members in placement order for `digest`: the first `r` are the blob's
    /// owners (one per zone while a zone without a copy remains; members that own nothing
    /// only when fewer than `r` do), the rest stand in for owners that are down, in
    /// rendezvous order.
    pub fn placed(&self, digest: &Digest, r: usize) -> Vec<usize> {
        let ranking = self.ranked(digest);
        if !self.zoned {
            return ranking;
        }
        let mut owners = self.spread(&ranking, r);
        let rest: Vec<usize> = ranking.into_iter().filter(|i| !owners.contains(i)).collect();
        owners.extend(rest);
        owners
    }

    /// The first of [`Placement::placed`] (for any `r`): the member reads of `digest` go to
    /// first while it is up, found without sorting. `None` when there are no members.
    pub fn first_owner(&self, digest: &Digest) -> Option<usize> {
        self.scores(digest).into_iter().min_by(|a, b| self.cmp(a, b)).map(|s| s.node)
    }

    /// The first `r` of [`Placement::placed`] (all members when there are fewer), found
    /// without sorting every member: what the simulation and inventory sweeps use.
    pub fn owners(&self, digest: &Digest, r: usize) -> Vec<usize> {
        self.owners_of(self.scores(digest), r)
    }

    /// The owners among `scores` (any subset of the members' scores, e.g. with a member left
    /// out to see where its blobs would go).
    pub fn owners_of(&self, mut scores: Vec<Score>, r: usize) -> Vec<usize> {
        let r = r.min(scores.len());
        if r == 0 {
            return vec![];
        }
        // The owners are almost always among the best few; only when zones are fewer than r
        // (or the best few share zones) is the whole ranking needed.
        let k = (4 * r).min(scores.len());
        if k < scores.len() {
            scores.select_nth_unstable_by(k - 1, |a, b| self.cmp(a, b));
        }
        let mut head: Vec<Score> = scores[..k].to_vec();
        head.sort_by(|a, b| self.cmp(a, b));
        let ranking: Vec<usize> = head.iter().map(|s| s.node).collect();
        if !self.zoned {
            return ranking[..r].to_vec();
        }
        let zones_seen = self.distinct_zones(&ranking, r);
        if zones_seen == r {
            return self.spread(&ranking, r);
        }
        scores.sort_by(|a, b| self.cmp(a, b));
        let ranking: Vec<usize> = scores.iter().map(|s| s.node).collect();
        self.spread(&ranking, r)
    }

    fn zone(&self, i: usize) -> &str {
        self.members[i].zone.as_deref().unwrap_or("")
    }

    /// How many distinct zones the owning members of `ranking` have, counting up to `r`.
    fn distinct_zones(&self, ranking: &[usize], r: usize) -> usize {
        let mut used: Vec<&str> = vec![];
        for &i in ranking.iter().filter(|&&i| self.members[i].owns) {
            if used.len() == r {
                break;
            }
            if !used.contains(&self.zone(i)) {
                used.push(self.zone(i));
            }
        }
        used.len()
    }

    /// The first `r` owners along `ranking`: owning members one per zone first, then owning
    /// members by rank, then (when fewer than `r` own blobs) the others by rank.
    fn spread(&self, ranking: &[usize], r: usize) -> Vec<usize> {
        let mut owners: Vec<usize> = Vec::with_capacity(r);
        let mut used: Vec<&str> = vec![];
        for &i in ranking.iter().filter(|&&i| self.members[i].owns) {
            if owners.len() == r {
                break;
            }
            if !used.contains(&self.zone(i)) {
                used.push(self.zone(i));
                owners.push(i);
            }
        }
        for pass_owns in [true, false] {
            for &i in ranking.iter().filter(|&&i| self.members[i].owns == pass_owns) {
                if owners.len() == r {
                    return owners;
                }
                if !owners.contains(&i) {
                    owners.push(i);
                }
            }
        }
        owners
    }
}

#[cfg(test)]
mod tests;
