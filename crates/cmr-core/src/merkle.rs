//! RFC 6962 / RFC 9162 Merkle hashing over in-memory leaves, and proofs for a contiguous run of leaves.
//!
//! Owns the two hash prefixes (`0x00` leaf, `0x01` node), the root of a list of leaf hashes, and range
//! proofs: the sibling hashes that let a verifier recompute the root from leaves `lo..hi` alone, which
//! proves that no leaf inside the run was dropped, injected or reordered. Family heads use it for their
//! per-period roots and their tree of periods. The verifiable log's incremental tree, with inclusion and
//! consistency proofs over stored nodes, lives in `cmr-log` and reuses [`leaf_hash`] and [`node_hash`].

use ring::digest::{Context, SHA256};
use thiserror::Error;

/// A 32-byte Merkle hash.
pub type Hash = [u8; 32];

/// `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x00]);
    ctx.update(data);
    finish(ctx)
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x01]);
    ctx.update(left);
    ctx.update(right);
    finish(ctx)
}

fn finish(ctx: Context) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    finish(Context::new(&SHA256))
}

/// The largest power of two strictly less than `n` (n ≥ 2): RFC 6962's split point.
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The root over already-hashed leaves (RFC 6962 §2.1 MTH).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// A range proof failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RangeProofError {
    /// The range is empty or does not fit in the tree.
    #[error("range {lo}..{hi} does not fit a tree of {size} leaves")]
    BadRange {
        /// First leaf.
        lo: usize,
        /// One past the last leaf.
        hi: usize,
        /// Tree size.
        size: usize,
    },
    /// The proof has too few or too many hashes.
    #[error("range proof has the wrong number of hashes")]
    WrongLength,
    /// The recomputed root differs from the expected one.
    #[error("range proof does not lead to the expected root")]
    RootMismatch,
}

/// The proof for leaves `lo..hi` of `leaves`: the roots of the maximal subtrees outside the range, left to
/// right, in the order [`root_from_range`] consumes them.
pub fn range_proof(leaves: &[Hash], lo: usize, hi: usize) -> Result<Vec<Hash>, RangeProofError> {
    let outside = |offset: u64, len: u64| {
        Ok::<_, std::convert::Infallible>(root(&leaves[offset as usize..(offset + len) as usize]))
    };
    match range_proof_over(leaves.len() as u64, lo as u64, hi as u64, outside) {
        Ok(proof) => proof,
        Err(never) => match never {},
    }
}

/// [`range_proof`] for a tree of `size` leaves that are not in memory: `subtree(offset, len)` gives the
/// root of the subtree over leaves `offset..offset + len`. It is asked only for the O(log size) maximal
/// subtrees outside the range, each of which is either perfect (a power of two, aligned) or on the
/// tree's right edge. The outer error is `subtree`'s.
pub fn range_proof_over<E>(
    size: u64,
    lo: u64,
    hi: u64,
    mut subtree: impl FnMut(u64, u64) -> Result<Hash, E>,
) -> Result<Result<Vec<Hash>, RangeProofError>, E> {
    if lo >= hi || hi > size {
        return Ok(Err(RangeProofError::BadRange {
            lo: lo as usize,
            hi: hi as usize,
            size: size as usize,
        }));
    }
    let mut proof = Vec::new();
    collect(size, 0, lo, hi, &mut subtree, &mut proof)?;
    Ok(Ok(proof))
}

fn collect<E>(
    len: u64,
    offset: u64,
    lo: u64,
    hi: u64,
    subtree: &mut impl FnMut(u64, u64) -> Result<Hash, E>,
    proof: &mut Vec<Hash>,
) -> Result<(), E> {
    let end = offset + len;
    if end <= lo || offset >= hi {
        proof.push(subtree(offset, len)?);
    } else if lo <= offset && end <= hi {
        // Inside the range: the verifier recomputes it from the leaves it has.
    } else {
        let k = split(len as usize) as u64;
        collect(k, offset, lo, hi, subtree, proof)?;
        collect(len - k, offset + k, lo, hi, subtree, proof)?;
    }
    Ok(())
}

/// The root over leaves `offset..offset + len` of a tree whose leaves are not in memory, from its
/// perfect subtrees: `perfect(level, index)` is the root of the 2^level leaves from index·2^level
/// (level 0: the leaf hash). A perfect, aligned run is one call; any other run (the right edge of a
/// tree) is split as RFC 6962 splits it, O(log len) calls in all.
pub fn subtree_root<E>(
    offset: u64,
    len: u64,
    perfect: &mut impl FnMut(u8, u64) -> Result<Hash, E>,
) -> Result<Hash, E> {
    if len == 0 {
        return Ok(empty_root());
    }
    if len.is_power_of_two() && offset.is_multiple_of(len) {
        return perfect(len.trailing_zeros() as u8, offset / len);
    }
    let k = split(len as usize) as u64;
    let left = subtree_root(offset, k, perfect)?;
    let right = subtree_root(offset + k, len - k, perfect)?;
    Ok(node_hash(&left, &right))
}

/// Recomputes the root of a tree of `size` leaves from the leaves `lo..lo + range.len()` and their proof.
pub fn root_from_range(
    size: usize,
    lo: usize,
    range: &[Hash],
    proof: &[Hash],
) -> Result<Hash, RangeProofError> {
    let hi = lo
        .checked_add(range.len())
        .ok_or(RangeProofError::BadRange { lo, hi: lo, size })?;
    if range.is_empty() || hi > size {
        return Err(RangeProofError::BadRange { lo, hi, size });
    }
    let mut proof = proof.iter();
    let root = rebuild(0, size, lo, range, &mut proof)?;
    if proof.next().is_some() {
        return Err(RangeProofError::WrongLength);
    }
    Ok(root)
}

fn rebuild<'a>(
    offset: usize,
    size: usize,
    lo: usize,
    range: &[Hash],
    proof: &mut impl Iterator<Item = &'a Hash>,
) -> Result<Hash, RangeProofError> {
    let end = offset + size;
    let hi = lo + range.len();
    if end <= lo || offset >= hi {
        proof.next().copied().ok_or(RangeProofError::WrongLength)
    } else if lo <= offset && end <= hi {
        Ok(root(&range[offset - lo..end - lo]))
    } else {
        let k = split(size);
        let left = rebuild(offset, k, lo, range, proof)?;
        let right = rebuild(offset + k, size - k, lo, range, proof)?;
        Ok(node_hash(&left, &right))
    }
}

/// Verifies that `range` are exactly the leaves `lo..` of the tree of `size` leaves with root `expected`.
pub fn verify_range(
    expected: &Hash,
    size: usize,
    lo: usize,
    range: &[Hash],
    proof: &[Hash],
) -> Result<(), RangeProofError> {
    if root_from_range(size, lo, range, proof)? != *expected {
        return Err(RangeProofError::RootMismatch);
    }
    Ok(())
}

/// An append-only RFC 6962 tree kept as its perfect subtrees, largest first: appending and taking the root
/// are O(log n), without the leaves. Family heads and the auditor both extend roots this way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    subtrees: Vec<(u64, Hash)>,
}

impl CompactRange {
    /// Rebuilds a range from its size and its perfect subtrees (as saved by [`CompactRange::subtrees`]).
    /// `None` if the subtrees do not add up to `size` as strictly decreasing powers of two.
    pub fn from_parts(size: u64, subtrees: Vec<(u64, Hash)>) -> Option<Self> {
        let valid = subtrees.iter().all(|(n, _)| n.is_power_of_two())
            && subtrees.windows(2).all(|w| w[0].0 > w[1].0)
            && subtrees.iter().map(|(n, _)| *n).sum::<u64>() == size;
        valid.then_some(Self { size, subtrees })
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The perfect subtrees, largest first: (leaf count, root).
    pub fn subtrees(&self) -> &[(u64, Hash)] {
        &self.subtrees
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        self.push_completing(leaf, |_, _, _| {});
    }

    /// Appends a leaf hash, and tells `completed` each perfect subtree of two leaves or more that the
    /// leaf completes, as (level, index, root): the 2^level leaves from index·2^level. A store that keeps
    /// these beside the leaves can prove any range later without holding the leaves in memory.
    pub fn push_completing(&mut self, leaf: Hash, mut completed: impl FnMut(u8, u64, Hash)) {
        let mut node = (1u64, leaf);
        while let Some(&(size, left)) = self.subtrees.last() {
            if size != node.0 {
                break;
            }
            self.subtrees.pop();
            node = (size * 2, node_hash(&left, &node.1));
            let level = node.0.trailing_zeros() as u8;
            completed(level, (self.size + 1) / node.0 - 1, node.1);
        }
        self.subtrees.push(node);
        self.size += 1;
    }

    /// The root of the leaves appended so far.
    pub fn root(&self) -> Hash {
        let mut iter = self.subtrees.iter().rev();
        let Some(&(_, mut acc)) = iter.next() else {
            return empty_root();
        };
        for (_, left) in iter {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;
    use proptest::prelude::*;

    #[test]
    fn reproduces_the_rfc6962_reference_tree() {
        let v = testdata::json("merkle/reference-tree.json");
        let inputs: Vec<Vec<u8>> = v["leaf_inputs_hex"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| hex::decode(h.as_str().unwrap()).unwrap())
            .collect();
        let roots = v["root_for_first_n_leaves_hex"].as_array().unwrap();
        let hashes: Vec<Hash> = inputs.iter().map(|d| leaf_hash(d)).collect();
        for (n, expected) in roots.iter().enumerate() {
            assert_eq!(
                hex::encode(root(&hashes[..n])),
                expected.as_str().unwrap(),
                "n = {n}"
            );
        }
    }

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(&(i as u64).to_be_bytes()))
            .collect()
    }

    #[test]
    fn every_range_of_small_trees_verifies() {
        for n in 1..=17 {
            let l = leaves(n);
            let r = root(&l);
            for lo in 0..n {
                for hi in lo + 1..=n {
                    let proof = range_proof(&l, lo, hi).unwrap();
                    verify_range(&r, n, lo, &l[lo..hi], &proof).unwrap();
                    // Proof size stays logarithmic.
                    assert!(proof.len() <= 2 * (usize::BITS - n.leading_zeros()) as usize);
                }
            }
        }
    }

    #[test]
    fn dropped_injected_and_reordered_leaves_fail() {
        let l = leaves(10);
        let r = root(&l);
        let proof = range_proof(&l, 2, 7).unwrap();
        // Dropped: one leaf fewer.
        assert!(verify_range(&r, 10, 2, &l[2..6], &proof).is_err());
        // Injected: one extra leaf.
        let mut injected = l[2..7].to_vec();
        injected.insert(2, leaf_hash(b"evil"));
        assert!(verify_range(&r, 10, 2, &injected, &proof).is_err());
        // Reordered.
        let mut swapped = l[2..7].to_vec();
        swapped.swap(0, 1);
        assert_eq!(
            verify_range(&r, 10, 2, &swapped, &proof),
            Err(RangeProofError::RootMismatch)
        );
        // Shifted: the same leaves claimed at another position.
        assert!(verify_range(&r, 10, 3, &l[2..7], &proof).is_err());
        // A proof hash removed or added.
        assert!(verify_range(&r, 10, 2, &l[2..7], &proof[1..]).is_err());
        let mut longer = proof.clone();
        longer.push([0; 32]);
        assert_eq!(
            verify_range(&r, 10, 2, &l[2..7], &longer),
            Err(RangeProofError::WrongLength)
        );
        assert!(range_proof(&l, 3, 3).is_err());
        assert!(range_proof(&l, 3, 11).is_err());
        assert!(root_from_range(10, usize::MAX, &l[..1], &[]).is_err());
    }

    #[test]
    fn compact_range_matches_the_full_root() {
        let l = leaves(37);
        let mut c = CompactRange::default();
        for (i, leaf) in l.iter().enumerate() {
            assert_eq!(c.root(), root(&l[..i]));
            c.push(*leaf);
        }
        assert_eq!(c.root(), root(&l));
        let again = CompactRange::from_parts(c.size(), c.subtrees().to_vec()).unwrap();
        assert_eq!(again, c);
        assert!(CompactRange::from_parts(36, c.subtrees().to_vec()).is_none());
    }

    proptest! {
        /// A tree kept as the nodes `push_completing` reports (and its leaves) gives every root and
        /// range proof that the leaves in memory give, at every size it passes through.
        #[test]
        fn stored_nodes_prove_what_the_leaves_prove(n in 1usize..80, a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()) {
            let l = leaves(n);
            let mut reported = Vec::new();
            let mut c = CompactRange::default();
            for leaf in &l {
                c.push_completing(*leaf, |level, index, hash| reported.push(((level, index), hash)));
            }
            let nodes: std::collections::HashMap<(u8, u64), Hash> = reported.iter().copied().collect();
            // Each node once, and one fewer than the leaves in all (a tree's internal nodes).
            prop_assert_eq!(nodes.len(), reported.len());
            prop_assert_eq!(reported.len() + c.subtrees().len(), n);
            let mut perfect = |level: u8, index: u64| -> Result<Hash, ()> {
                if level == 0 {
                    return Ok(l[index as usize]);
                }
                nodes.get(&(level, index)).copied().ok_or(())
            };
            for size in 1..=n {
                prop_assert_eq!(subtree_root(0, size as u64, &mut perfect), Ok(root(&l[..size])));
            }
            let (x, y) = (a.index(n), b.index(n));
            let (lo, hi) = (x.min(y), x.max(y) + 1);
            let over = range_proof_over(n as u64, lo as u64, hi as u64, |o, len| {
                subtree_root(o, len, &mut perfect)
            });
            prop_assert_eq!(over, Ok(Ok(range_proof(&l, lo, hi).unwrap())));
        }

        #[test]
        fn any_one_bit_change_fails(n in 1usize..40, a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>(), bit in 0usize..256, which in any::<bool>()) {
            let l = leaves(n);
            let r = root(&l);
            let (x, y) = (a.index(n), b.index(n));
            let (lo, hi) = (x.min(y), x.max(y) + 1);
            let mut proof = range_proof(&l, lo, hi).unwrap();
            let mut range = l[lo..hi].to_vec();
            prop_assert!(verify_range(&r, n, lo, &range, &proof).is_ok());
            if which && !proof.is_empty() {
                let i = bit % proof.len();
                proof[i][bit / 8] ^= 1 << (bit % 8);
            } else {
                let i = bit % range.len();
                range[i][bit / 8] ^= 1 << (bit % 8);
            }
            prop_assert!(verify_range(&r, n, lo, &range, &proof).is_err());
        }
    }
}
