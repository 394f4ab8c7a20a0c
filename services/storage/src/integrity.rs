//! Integrity checksums that a read checks while it streams.
//!
//! **Units of 1 MiB.** A blob is cut into [`UNIT`]s of 1 MiB (the last one shorter). For each
//! unit a node keeps two checksums, both computed in the one pass that hashes an upload as it
//! arrives:
//! - its **BLAKE3 chaining value**: BLAKE3 hashes 1 KiB chunks and merges their chaining values
//!   pairwise up a binary tree whose left subtrees are whole powers of two, so a blob of more
//!   than one unit is the root of a tree whose leaves are its units (1,024 chunks each). Each
//!   unit is hashed by its own hasher positioned at its offset, and the blob's BLAKE3 is merged
//!   from the units' values ([`root_of_units`]) instead of being hashed a second time; the
//!   values are checked against that BLAKE3 whenever they are read back ([`units_match`]).
//! - its **CRC-32**, which every read checks before sending any byte of the unit.
//!
//! **Why a CRC on reads and BLAKE3 for the scrub.** Checking BLAKE3 on every read cost a fifth
//! to a quarter of the pull rate of a large blob on a 2-core machine (one core hashes BLAKE3 at
//! 6.5 GB/s; a 512 MiB pull moves 2.5 GB/s over loopback with both cores busy): 0.74 and 0.81
//! of the rate without checks, side by side with the previous build (which against itself gave
//! 1.07). Checking a CRC-32 instead gave 0.97 and 1.12, and 0.99 on a pull of many small
//! images. CRC-32 runs at 58 GB/s on the same core and catches what a read must catch, bytes
//! that changed on the disk (every burst of up to 32 flipped bits, and all but one in four
//! billion other changes). The scrub, which reads every copy at a bounded rate, checks the
//! BLAKE3 of every unit, so a change a CRC could miss is found there; a copy that fails
//! either check is taken out of service and replaced from a good replica.
//!
//! Stored per blob (beside its index entry): the units' chaining values (32 bytes each, only
//! for a blob of more than one unit, whose BLAKE3 is then their root) and the units' CRCs
//! (4 bytes each): 36 KiB for a 1 GiB layer.

use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};

/// Bytes per checked unit: 1,024 BLAKE3 chunks, a subtree of the blob's tree.
pub const UNIT: u64 = 1 << 20;

/// A blob's integrity checksums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksums {
    /// BLAKE3 of the whole blob.
    pub blake3: [u8; 32],
    /// Per unit: the BLAKE3 chaining values (empty for a blob of one unit or less) and CRCs.
    pub units: UnitSums,
}

/// The checksums of a blob's units.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitSums {
    /// BLAKE3 chaining value of each unit, for a blob of more than one unit; empty otherwise.
    pub cvs: Vec<[u8; 32]>,
    /// CRC-32 of each unit (one for a blob of one unit or less).
    pub crcs: Vec<u32>,
}

/// Hashes a blob as it arrives, keeping the checksums of each unit.
#[derive(Clone)]
pub struct TreeHasher {
    /// The hasher of the unit being filled.
    unit: blake3::Hasher,
    /// Its CRC so far.
    crc: crc32fast::Hasher,
    /// Bytes in that unit so far.
    fill: u64,
    /// Chaining values and CRCs of the units before it.
    done: Vec<ChainingValue>,
    crcs: Vec<u32>,
}

impl Default for TreeHasher {
    fn default() -> Self {
        TreeHasher { unit: blake3::Hasher::new(), crc: crc32fast::Hasher::new(), fill: 0, done: vec![], crcs: vec![] }
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
                self.crcs.push(std::mem::take(&mut self.crc).finalize());
                let mut next = blake3::Hasher::new();
                next.set_input_offset(self.done.len() as u64 * UNIT);
                self.unit = next;
                self.fill = 0;
            }
            let take = ((UNIT - self.fill) as usize).min(buf.len());
            self.unit.update(&buf[..take]);
            self.crc.update(&buf[..take]);
            self.fill += take as u64;
            buf = &buf[take..];
        }
    }

    /// The blob's checksums.
    pub fn finish(&self) -> Checksums {
        let mut crcs = self.crcs.clone();
        crcs.push(self.crc.clone().finalize());
        if self.done.is_empty() {
            return Checksums { blake3: *self.unit.finalize().as_bytes(), units: UnitSums { cvs: vec![], crcs } };
        }
        let mut cvs = self.done.clone();
        cvs.push(self.unit.finalize_non_root());
        Checksums { blake3: root_of_units(&cvs, self.len()), units: UnitSums { cvs, crcs } }
    }
}

/// Units in a blob of `len` bytes (one for an empty blob).
pub fn unit_count(len: u64) -> usize {
    len.div_ceil(UNIT).max(1) as usize
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

/// Whether `sums` fit a blob of `len` bytes whose BLAKE3 is `root`: a CRC per unit and, for a
/// blob of more than one unit, chaining values that merge to `root`.
pub fn units_match(sums: &UnitSums, len: u64, root: &[u8; 32]) -> bool {
    let n = unit_count(len);
    if sums.crcs.len() != n {
        return false;
    }
    if len <= UNIT {
        return sums.cvs.is_empty();
    }
    sums.cvs.len() == n && root_of_units(&sums.cvs, len) == *root
}

/// The read check: whether `data`, unit `index` of a blob, has its CRC.
pub fn unit_crc_ok(data: &[u8], index: u64, sums: &UnitSums) -> bool {
    sums.crcs.get(index as usize).is_some_and(|c| *c == crc32fast::hash(data))
}

/// The scrub check: whether `data`, unit `index` of a blob of `len` bytes, has its BLAKE3
/// chaining value in `sums`, or, for a blob of one unit, the blob's BLAKE3 `root`.
pub fn unit_blake3_ok(data: &[u8], index: u64, len: u64, sums: &UnitSums, root: &[u8; 32]) -> bool {
    if len <= UNIT {
        return index == 0 && blake3::hash(data).as_bytes() == root;
    }
    let Some(expected) = sums.cvs.get(index as usize) else { return false };
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * UNIT);
    h.update(data);
    h.finalize_non_root() == *expected
}

/// Unit checksums as stored: the chaining values (32 bytes each), then the CRCs (4 bytes
/// each, little-endian).
pub fn encode_units(sums: &UnitSums) -> Vec<u8> {
    let mut out = Vec::with_capacity(sums.cvs.len() * 32 + sums.crcs.len() * 4);
    for cv in &sums.cvs {
        out.extend_from_slice(cv);
    }
    for crc in &sums.crcs {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    out
}

/// The stored form of the unit checksums of a blob of `len` bytes, or `None` when its length
/// does not fit.
pub fn decode_units(bytes: &[u8], len: u64) -> Option<UnitSums> {
    let n = unit_count(len);
    let with_cvs = len > UNIT;
    let cv_bytes = if with_cvs { 32 * n } else { 0 };
    if bytes.len() != cv_bytes + 4 * n {
        return None;
    }
    let (cvs, crcs) = bytes.split_at(cv_bytes);
    Some(UnitSums {
        cvs: cvs.chunks_exact(32).map(|c| c.try_into().expect("32-byte chunk")).collect(),
        crcs: crcs.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4-byte chunk"))).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// The tree hasher gives BLAKE3 itself, at lengths around every unit boundary, fed in
    /// pieces of awkward sizes; every unit passes both checks, and a flipped byte in any unit
    /// fails both.
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
            assert!(units_match(&units, len as u64, &root), "length {len}");
            assert_eq!(decode_units(&encode_units(&units), len as u64).unwrap(), units);
            assert_eq!(units.crcs.len(), unit_count(len as u64));
            assert_eq!(units.cvs.is_empty(), len as u64 <= UNIT);
            for (i, unit) in d.chunks(u).enumerate() {
                let i = i as u64;
                assert!(unit_crc_ok(unit, i, &units), "length {len} unit {i}");
                assert!(unit_blake3_ok(unit, i, len as u64, &units, &root), "length {len} unit {i}");
                let mut bad = unit.to_vec();
                bad[unit.len() / 2] ^= 1;
                assert!(!unit_crc_ok(&bad, i, &units), "length {len} unit {i}");
                assert!(!unit_blake3_ok(&bad, i, len as u64, &units, &root), "length {len} unit {i}");
            }
            if units.cvs.len() > 1 {
                let mut wrong = units.clone();
                wrong.cvs[1][0] ^= 1;
                assert!(!units_match(&wrong, len as u64, &root));
            }
            let mut short = units.clone();
            short.crcs.pop();
            assert!(!units_match(&short, len as u64, &root));
        }
    }
}
