//! The family ledgers' record index over the store's rows: what grows with a family's records (its ids,
//! its periods' tree nodes) is read from the rows as a group sees them, so the sequencer keeps only each
//! family's [`FamilyState`] in memory, whatever the number of records.

use cmr_core::batch::{Applied, Batch, RecordIndex};
use cmr_core::merkle;
use cmr_core::record::RecordId;

use super::*;

/// One family's [`RecordIndex`] over a group's overlay: level-0 nodes are rebuilt from the record rows
/// (the leaf hash of the record's digest), the nodes above from `RECORD_NODE` rows, ids from
/// `RECORD_ID` rows.
pub(super) struct FamilyRows<'a, 'o> {
    pub(super) overlay: &'a Overlay<'o>,
    pub(super) number: u64,
}

fn damaged(what: String) -> StoreError {
    StoreError::Format(format!("{what}: the stored data is damaged"))
}

impl RecordIndex for FamilyRows<'_, '_> {
    type Error = StoreError;

    fn node(&self, period: Period, level: u8, index: u64) -> Result<Hash, StoreError> {
        if level == 0 {
            let v = self
                .overlay
                .get(&layout::record(self.number, period, index))?
                .ok_or_else(|| damaged(format!("record {index} of {period} is missing")))?;
            let bytes = v
                .get(8..)
                .ok_or_else(|| damaged(format!("record {index} of {period} is cut short")))?;
            return Ok(merkle::leaf_hash(&SealedRecord::digest_of(bytes).0));
        }
        let v = self
            .overlay
            .get(&layout::record_node(self.number, period, level, index))?
            .ok_or_else(|| {
                damaged(format!(
                    "the tree node ({level}, {index}) of {period} is missing"
                ))
            })?;
        Hash::try_from(v.as_slice())
            .map_err(|_| damaged(format!("the tree node ({level}, {index}) of {period}")))
    }

    fn ids(&self, period: Period, start: u64, end: u64) -> Result<Vec<RecordId>, StoreError> {
        let rows = self.overlay.range(
            &layout::record(self.number, period, start),
            &layout::record(self.number, period, end),
        )?;
        if rows.len() as u64 != end - start {
            return Err(damaged(format!(
                "records {start}..{end} of {period} are not all stored"
            )));
        }
        rows.into_iter()
            .map(|(_, v)| {
                let record = SealedRecord::decode(v.get(8..).unwrap_or_default().to_vec())
                    .map_err(|e| damaged(format!("a record of {period}: {e}")))?;
                Ok(record.header().id)
            })
            .collect()
    }

    fn contains(&self, id: &RecordId) -> Result<bool, StoreError> {
        Ok(self
            .overlay
            .get(&layout::record_id(self.number, &id.0))?
            .is_some())
    }
}

/// The index rows a batch applied as `applied` adds to family `number`: each record's id (valued with
/// its place) and the tree nodes it completed. One function for the sequencer and for a replay that
/// adds the index to a folder written before it.
pub(super) fn index_rows(number: u64, batch: &Batch, applied: &Applied) -> Vec<(Vec<u8>, Vec<u8>)> {
    let ids = batch
        .entries
        .iter()
        .zip(&applied.placements)
        .map(move |(e, (period, n))| {
            (
                layout::record_id(number, &e.id.0),
                layout::record_place(*period, *n),
            )
        });
    let nodes = applied
        .nodes
        .iter()
        .map(move |(period, level, index, hash)| {
            (
                layout::record_node(number, *period, *level, *index),
                hash.to_vec(),
            )
        });
    ids.chain(nodes).collect()
}
