//! [`SledStorage`] against a model: whatever the mix of bundles and pieces' own rows (a folder of
//! format 10 written on by format 11), every read sees the rows the store wrote, in key order.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

/// A key of a bundled table (entries, nodes, records) or of another one, over a few chunks.
fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (0u64..200).prop_map(|i| crate::layout::key(tag::ENTRIES, &[&i.to_be_bytes()])),
        (0u64..200).prop_map(|i| crate::layout::key(tag::NODES, &[&i.to_be_bytes()])),
        (0u64..2, 0u32..2, 0u64..150).prop_map(|(f, p, n)| crate::layout::records_piece(
            f,
            cmr_core::family::Period(p),
            n
        )),
        (0u8..8).prop_map(|b| vec![tag::IDEMPOTENCY, b]),
    ]
}

/// Where a scan starts or ends: a key, a table's or a period's prefix, past a table, or a key past a
/// piece's (a bundle's own, or longer).
fn bound() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => key(),
        1 => key().prop_map(|mut k| {
            k.push(0);
            k
        }),
        1 => key().prop_map(|k| bundle::bundle_of(&k).map_or(k, |(b, _)| b)),
        1 => prop_oneof![
            Just(vec![tag::ENTRIES]),
            Just(vec![tag::NODES]),
            Just(vec![tag::RECORDS]),
            Just(vec![tag::RECORDS + 1]),
            Just(vec![tag::RECORDS, 0, 0, 0, 0, 0, 0, 0, 1]),
            Just(vec![tag::RECORDS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]),
            Just(vec![0]),
            Just(vec![0xff]),
        ],
    ]
}

#[derive(Debug, Clone)]
enum Step {
    /// A group of writes through the storage.
    Write(Vec<(Vec<u8>, Option<Vec<u8>>)>),
    /// A piece's own row as format 10 wrote it (a pointer, or the tree nodes themselves).
    OwnRow(Vec<u8>, Vec<u8>),
}

fn step() -> impl Strategy<Value = Step> {
    let value = proptest::collection::vec(any::<u8>(), 0..40);
    prop_oneof![
        4 => proptest::collection::vec((key(), proptest::option::weighted(0.8, value.clone())), 1..12)
            .prop_map(Step::Write),
        1 => (key(), value).prop_map(|(k, v)| Step::OwnRow(k, v)),
    ]
}

fn check(s: &SledStorage, model: &BTreeMap<Vec<u8>, Vec<u8>>, probes: &[(Vec<u8>, Vec<u8>)]) {
    for (a, b) in probes {
        assert_eq!(s.get(a).unwrap().as_ref(), model.get(a), "get {a:02x?}");
        let want: Vec<_> = if a < b {
            model
                .range(a.clone()..b.clone())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            Vec::new()
        };
        let got: Vec<_> = s.range(a, b).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, want, "range {a:02x?}..{b:02x?}");
        assert_eq!(s.last(a, b).unwrap(), want.last().cloned(), "last");
        let want: Vec<_> = model
            .iter()
            .filter(|(k, _)| k.starts_with(a))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let got: Vec<_> = s.scan_prefix(a).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, want, "prefix {a:02x?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn reads_see_what_was_written_across_bundles_and_own_rows(
        steps in proptest::collection::vec(step(), 1..24),
        probes in proptest::collection::vec((bound(), bound()), 12),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SledStorage::open_folder(dir.path(), 1 << 20).unwrap();
        let mut model = BTreeMap::new();
        for step in steps {
            match step {
                Step::Write(writes) => {
                    let writes: Writes = writes.into_iter().collect();
                    for (k, v) in &writes {
                        match v {
                            Some(v) => model.insert(k.clone(), v.clone()),
                            None => model.remove(k),
                        };
                    }
                    s.write(writes).unwrap();
                }
                // Only where the key is not written yet: an earlier format wrote before this one.
                Step::OwnRow(k, v) if !model.contains_key(&k) => {
                    let row = match s.file_of(&k) {
                        Some(file) => file.append(&v).unwrap().to_vec(),
                        None if k[0] == tag::NODES => v.clone(),
                        None => continue,
                    };
                    s.tree().unwrap().insert(&k, row).unwrap();
                    model.insert(k, v);
                }
                Step::OwnRow(..) => {}
            }
            check(&s, &model, &probes);
        }
        // And after a reopen, once synced.
        s.sync(0, &[0; 32], "").unwrap();
        drop(s);
        s = SledStorage::open_folder(dir.path(), 1 << 20).unwrap();
        check(&s, &model, &probes);
    }
}

#[test]
fn a_groups_pieces_share_one_row_and_their_nodes_are_in_their_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStorage::open_folder(dir.path(), 1 << 20).unwrap();
    // 200 groups of one entry each: an entries piece and a nodes piece apiece.
    for i in 0u64..200 {
        s.write(Writes::from([
            (
                crate::layout::key(tag::ENTRIES, &[&i.to_be_bytes()]),
                Some(vec![1; 300]),
            ),
            (
                crate::layout::key(tag::NODES, &[&i.to_be_bytes()]),
                Some(vec![2; 32]),
            ),
        ]))
        .unwrap();
    }
    let rows = s.tree().unwrap().len();
    assert_eq!(rows, 8, "two bundles for each of the 4 chunks");
    assert_eq!(s.nodes.len(), 200 * 32);
    assert_eq!(s.entries.len(), 200 * 300);
}

#[test]
fn an_erased_piece_leaves_its_bundle_and_is_scrubbed_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStorage::open_folder(dir.path(), 1 << 20).unwrap();
    let piece = |n: u64| crate::layout::records_piece(1, cmr_core::family::Period(0), n);
    s.write(Writes::from([
        (piece(0), Some(vec![7; 100])),
        (piece(5), Some(vec![8; 100])),
    ]))
    .unwrap();
    s.write(Writes::from([(piece(0), None)])).unwrap();
    assert_eq!(s.get(&piece(0)).unwrap(), None);
    assert_eq!(s.get(&piece(5)).unwrap(), Some(vec![8; 100]));
    s.sync(1, &[0; 32], "").unwrap();
    let bytes = std::fs::read(dir.path().join(RECORDS_FILE)).unwrap();
    assert_eq!(
        &bytes[..100],
        &[0; 100][..],
        "the erased piece's bytes are zeros"
    );
    assert_eq!(&bytes[100..], &[8; 100][..]);
    // The last piece of a bundle gone: so is the bundle.
    s.write(Writes::from([(piece(5), None)])).unwrap();
    assert_eq!(s.tree().unwrap().len(), 0);
}

#[test]
fn a_damaged_bundle_is_refused_by_every_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStorage::open_folder(dir.path(), 1 << 20).unwrap();
    let entries = |i: u64| crate::layout::key(tag::ENTRIES, &[&i.to_be_bytes()]);
    let k = entries(70);
    s.write(Writes::from([
        (entries(63), Some(vec![9; 20])),
        (k.clone(), Some(vec![1; 50])),
    ]))
    .unwrap();
    let (b, _) = bundle::bundle_of(&k).unwrap();
    s.tree()
        .unwrap()
        .insert(&b, &[bundle::VERSION, 3][..])
        .unwrap();
    assert!(matches!(s.get(&k), Err(StoreError::Format(_))));
    assert!(matches!(
        s.last(&[tag::ENTRIES], &[tag::ENTRIES + 1]),
        Err(StoreError::Format(_))
    ));
    assert!(
        s.scan_prefix(&[tag::ENTRIES])
            .any(|r| matches!(r, Err(StoreError::Format(_))))
    );
    // The chunk before it still reads, up to its last piece.
    assert_eq!(
        s.last(&entries(0), &entries(64)).unwrap(),
        Some((entries(63), vec![9; 20]))
    );
    // A write into that chunk is refused too, and changes nothing, not even in the files.
    let before = s.entries.len();
    assert!(
        s.write(Writes::from([
            (entries(5), Some(vec![3; 5])),
            (entries(71), Some(vec![2; 5])),
        ]))
        .is_err()
    );
    assert_eq!(s.entries.len(), before);
    assert_eq!(s.get(&entries(5)).unwrap(), None);
    assert_eq!(
        s.tree().unwrap().get(&b).unwrap().unwrap(),
        &[bundle::VERSION, 3][..]
    );
}
