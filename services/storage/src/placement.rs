//! Where a blob lives: rendezvous (highest-random-weight) hashing of its digest over the
//! storage nodes. Every frontend computes the same owners from the same node list, a node
//! that joins or leaves moves only the blobs it gains or loses, and no table is kept.

use berth_core::Digest;

/// The score of `node` for `digest`: the first eight bytes of BLAKE3(node, digest). The NUL
/// between them keeps `("ab", "c…")` and `("a", "bc…")` apart.
fn score(node: &str, digest: &Digest) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(node.as_bytes());
    h.update(&[0]);
    h.update(digest.to_string().as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_be_bytes(first)
}

/// Indices of `nodes` in rendezvous order for `digest`: the first R are the blob's owners,
/// the ones after stand in, in turn, for owners that are down.
pub fn ranked(nodes: &[String], digest: &Digest) -> Vec<usize> {
    let mut order: Vec<(u64, usize)> = nodes.iter().enumerate().map(|(i, n)| (score(n, digest), i)).collect();
    // Ties (practically never) are broken by the node name, so every caller agrees.
    order.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| nodes[a.1].cmp(&nodes[b.1])));
    order.into_iter().map(|(_, i)| i).collect()
}

/// Indices of `nodes` in placement order for `digest`, where `zones[i]` is node `i`'s zone: the
/// first `r` are the blob's owners, the rest stand in for owners that are down. Without zones
/// this is [`ranked`]. With zones, owners are taken in rendezvous order but one per zone while
/// a zone without a copy remains, so that copies spread over as many zones as there are (up to
/// `r`); a node without a zone counts as one zone of its own kind.
pub fn placed(nodes: &[String], zones: &[Option<String>], digest: &Digest, r: usize) -> Vec<usize> {
    let ranking = ranked(nodes, digest);
    if zones.iter().all(Option::is_none) {
        return ranking;
    }
    let zone = |i: usize| zones.get(i).and_then(Option::as_deref).unwrap_or("");
    let mut owners: Vec<usize> = Vec::with_capacity(r);
    let mut used: Vec<&str> = vec![];
    for &i in &ranking {
        if owners.len() == r {
            break;
        }
        if !used.contains(&zone(i)) {
            used.push(zone(i));
            owners.push(i);
        }
    }
    for &i in &ranking {
        if owners.len() == r {
            break;
        }
        if !owners.contains(&i) {
            owners.push(i);
        }
    }
    let rest: Vec<usize> = ranking.into_iter().filter(|i| !owners.contains(i)).collect();
    owners.extend(rest);
    owners
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_spread_over_zones() {
        let ns = nodes(9);
        let zones: Vec<Option<String>> = (0..9).map(|i| Some(format!("zone{}", i % 3))).collect();
        for i in 0..10_000 {
            let order = placed(&ns, &zones, &digest(i), 3);
            assert_eq!(order.len(), 9);
            let mut owner_zones: Vec<&Option<String>> = order[..3].iter().map(|o| &zones[*o]).collect();
            owner_zones.dedup();
            owner_zones.sort();
            owner_zones.dedup();
            assert_eq!(owner_zones.len(), 3, "three copies in three zones");
        }
        // Two zones for three copies: both zones hold one, the third goes by rank.
        let two: Vec<Option<String>> = (0..9).map(|i| Some(format!("zone{}", i % 2))).collect();
        let order = placed(&ns, &two, &digest(1), 3);
        let mut z: Vec<&Option<String>> = order[..3].iter().map(|o| &two[*o]).collect();
        z.sort();
        z.dedup();
        assert_eq!(z.len(), 2);
        // No zones: plain rendezvous order.
        assert_eq!(placed(&ns, &vec![None; 9], &digest(2), 3), ranked(&ns, &digest(2)));
    }

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:7100")).collect()
    }

    fn digest(i: u64) -> Digest {
        Digest::sha256_of(&i.to_le_bytes())
    }

    #[test]
    fn owners_are_spread_evenly() {
        let ns = nodes(10);
        let mut first = [0usize; 10];
        for i in 0..100_000 {
            first[ranked(&ns, &digest(i))[0]] += 1;
        }
        for count in first {
            assert!((9_000..11_000).contains(&count), "{first:?}");
        }
    }

    #[test]
    fn a_node_leaving_moves_only_its_own_blobs() {
        let ns = nodes(10);
        let fewer: Vec<String> = ns[..9].to_vec();
        let mut moved = 0;
        for i in 0..20_000 {
            let d = digest(i);
            let before = &ns[ranked(&ns, &d)[0]];
            let after = &fewer[ranked(&fewer, &d)[0]];
            if before != after {
                assert_eq!(before, &ns[9], "only the leaving node's blobs move");
                moved += 1;
            }
        }
        // About a tenth.
        assert!((1_600..2_400).contains(&moved), "{moved}");
    }

    proptest::proptest! {
        #[test]
        fn ranking_is_a_permutation_and_stable(n in 1usize..20, i in proptest::num::u64::ANY) {
            let ns = nodes(n);
            let r = ranked(&ns, &digest(i));
            let mut sorted = r.clone();
            sorted.sort();
            proptest::prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            proptest::prop_assert_eq!(r, ranked(&ns, &digest(i)));
        }
    }
}
