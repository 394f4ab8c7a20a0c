//! Integrity checksums that a read checks while it streams.
//!
//! **BLAKE3's own tree, cut in units of 1 MiB.** BLAKE3 hashes 1 KiB chunks and merges their
//! chaining values pairwise up a binary tree whose left subtrees are always whole powers of
//! two. A blob of more than one [`UNIT`] (1,024 chunks) is therefore the root of a tree whose
//! leaves are the chaining values of its 1 MiB units, the last one possibly shorter. A node
//! keeps those chaining values (32 bytes per MiB: 32 KiB for a 1 GiB layer) beside the blob's
//! BLAKE3, and a read checks each unit against its value before sending any byte of it. The
//! values themselves are checked against the blob's BLAKE3 by merging them up the tree (see
//! [`root_of_units`]), so neither can be damaged unnoticed. A blob of one unit or less is
//! checked against its BLAKE3 alone.
//!
//! Why this rather than a hash per fixed-size chunk: the units' values are the very nodes of
//! the tree that gives the whole blob's BLAKE3, so they come out of the one pass that hashes an
//! upload as it arrives (each unit by its own hasher positioned at its offset) at no extra
//! cost, and the blob's BLAKE3 is merged from them instead of hashed a second time.

use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};

/// Bytes per checked unit: 1,024 BLAKE3 chunks, a subtree of the blob's tree.
pub const UNIT: u64 = 1 << 20;

/// A blob's integrity checksums: its BLAKE3 and, when it has more than one unit, each unit's
/// chaining value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksums {
    /// BLAKE3 of the whole blob.
    pub blake3: [u8; 32],
    /// Chaining values of its units (empty for a blob of one unit or less).
    pub units: Vec<[u8; 32]>,
}

/// Hashes a blob as it arrives, keeping the chaining value of each unit.
#[derive(Clone)]
pub struct TreeHasher {
    /// The hasher of the unit being filled.
    unit: blake3::Hasher,
    /// Bytes in that unit so far.
    fill: u64,
    /// Chaining values of the units before it.
    done: Vec<ChainingValue>,
}

impl Default for TreeHasher {
    fn default() -> Self {
        TreeHasher { unit: blake3::Hasher::new(), fill: 0, done: vec![] }
    }
}

impl TreeHasher {
    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.done.len() as u64 * UNIT + self.fill
    }

    /// Whether nothing was hashed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hashes the next bytes.
    pub fn update(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.fill == UNIT {
                // A full unit is closed only once a byte follows it: a blob of exactly one
                // unit is a root, not a subtree.
                self.done.push(self.unit.finalize_non_root());
                let mut next = blake3::Hasher::new();
                next.set_input_offset(self.done.len() as u64 * UNIT);
                self.unit = next;
                self.fill = 0;
            }
            let take = ((UNIT - self.fill) as usize).min(buf.len());
            self.unit.update(&buf[..take]);
            self.fill += take as u64;
            buf = &buf[take..];
        }
    }

    /// The blob's checksums.
    pub fn finish(&self) -> Checksums {
        if self.done.is_empty() {
            return Checksums { blake3: *self.unit.finalize().as_bytes(), units: vec![] };
        }
        let mut units = self.done.clone();
        units.push(self.unit.finalize_non_root());
        Checksums { blake3: root_of_units(&units, self.len()), units }
    }
}

/// The BLAKE3 of a blob of `len` bytes (more than one unit) from its units' chaining values.
pub fn root_of_units(units: &[[u8; 32]], len: u64) -> [u8; 32] {
    let left = left_subtree_len(len);
    let split = (left / UNIT) as usize;
    let l = subtree(&units[..split], left);
    let r = subtree(&units[split..], len - left);
    *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
}

/// The chaining value of the subtree of `len` bytes whose units are `units`.
fn subtree(units: &[[u8; 32]], len: u64) -> ChainingValue {
    if units.len() == 1 {
        return units[0];
    }
    let left = left_subtree_len(len);
    let split = (left / UNIT) as usize;
    merge_subtrees_non_root(&subtree(&units[..split], left), &subtree(&units[split..], len - left), Mode::Hash)
}

/// Whether `units` (32 bytes each) are the units of a blob of `len` bytes whose BLAKE3 is
/// `root`.
pub fn units_match(units: &[[u8; 32]], len: u64, root: &[u8; 32]) -> bool {
    len > UNIT && units.len() as u64 == len.div_ceil(UNIT) && root_of_units(units, len) == *root
}

/// Whether `data`, unit `index` of a blob of `len` bytes, is intact: checked against its
/// chaining value in `units`, or, for a blob of one unit, against the blob's BLAKE3 `root`.
pub fn unit_intact(data: &[u8], index: u64, len: u64, units: &[[u8; 32]], root: &[u8; 32]) -> bool {
    if len <= UNIT {
        return index == 0 && blake3::hash(data).as_bytes() == root;
    }
    let Some(expected) = units.get(index as usize) else { return false };
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * UNIT);
    h.update(data);
    h.finalize_non_root() == *expected
}

/// Unit chaining values as stored: 32 bytes each, back to back.
pub fn encode_units(units: &[[u8; 32]]) -> Vec<u8> {
    units.concat()
}

/// The stored form back, or `None` when its length is not a multiple of 32.
pub fn decode_units(bytes: &[u8]) -> Option<Vec<[u8; 32]>> {
    if !bytes.len().is_multiple_of(32) {
        return None;
    }
    Some(bytes.chunks_exact(32).map(|c| c.try_into().expect("32-byte chunk")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// The tree hasher gives BLAKE3 itself, at lengths around every unit boundary, fed in
    /// pieces of awkward sizes; every unit checks, and a flipped byte in any unit does not.
    #[test]
    fn units_give_blake3_and_catch_a_flipped_byte() {
        let u = UNIT as usize;
        for len in [0, 1, 1023, 1024, u - 1, u, u + 1, 2 * u, 2 * u + 5, 3 * u, 5 * u - 7, 8 * u, 9 * u + 1] {
            let d = data(len);
            let mut t = TreeHasher::default();
            for piece in d.chunks(77_777) {
                t.update(piece);
            }
            let Checksums { blake3: root, units } = t.finish();
            assert_eq!(root, *blake3::hash(&d).as_bytes(), "length {len}");
            assert_eq!(t.len(), len as u64);
            if len as u64 > UNIT {
                assert!(units_match(&units, len as u64, &root), "length {len}");
                assert_eq!(decode_units(&encode_units(&units)).unwrap(), units);
            } else {
                assert!(units.is_empty());
            }
            for (i, unit) in d.chunks(u).enumerate() {
                assert!(unit_intact(unit, i as u64, len as u64, &units, &root), "length {len} unit {i}");
                let mut bad = unit.to_vec();
                bad[unit.len() / 2] ^= 1;
                assert!(!unit_intact(&bad, i as u64, len as u64, &units, &root), "length {len} unit {i}");
            }
            if units.len() > 1 {
                let mut wrong = units.clone();
                wrong[1][0] ^= 1;
                assert!(!units_match(&wrong, len as u64, &root));
            }
        }
    }
}
