//! The shared test kit (`cmr_store::testkit`), and what is particular to sled.
#![allow(dead_code, clippy::unwrap_used)] // Shared test code: a panic is a failed test.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use cmr_store::testkit::*;
use cmr_store::{Store, StoreConfig};

/// Opens a store whose clock starts at T0 and moves only when the test says so.
pub fn open(path: &Path, clock: Arc<AtomicU64>) -> Store {
    open_checked(path, clock, false)
}

/// [`open`], with `verify_on_open`: every stored record is read back and checked against its batch.
pub fn open_checked(path: &Path, clock: Arc<AtomicU64>, verify_on_open: bool) -> Store {
    Store::open(config(path, clock, verify_on_open)).unwrap()
}

/// The configuration [`open_checked`] opens with.
pub fn config(path: &Path, clock: Arc<AtomicU64>, verify_on_open: bool) -> StoreConfig {
    let mut cfg = StoreConfig::new(path, log_key());
    cfg.cache_capacity = 32 * 1024 * 1024;
    cfg.clock = Arc::new(move || clock.load(Ordering::SeqCst));
    cfg.verify_on_open = verify_on_open;
    cfg
}

/// sled itself, on the folder of a closed store. sled lets go of its folder lock a moment after the store
/// is dropped (its I/O threads still hold the files): wait for it, as `Store::open` does.
/// The rows of table `tag` in a closed store's folder as the store sees them, through the storage
/// engine (the entries and records pieces live in files beside sled's, its rows only point to them).
pub fn engine_rows(path: &std::path::Path, tag: u8) -> Vec<(Vec<u8>, Vec<u8>)> {
    let engine = cmr_store::SledStorage::open_folder(path, 16 << 20).unwrap();
    cmr_store::Storage::scan_prefix(&engine, &[tag])
        .map(Result::unwrap)
        .collect()
}

/// Keeps every piece of the folder in a row of sled's of its own, as format 10 did (no bundles), so a
/// test can turn the folder into an earlier format's row by row.
pub fn unbundle(path: &std::path::Path) {
    cmr_store::SledStorage::open_folder(path, 16 << 20)
        .unwrap()
        .unbundle()
        .unwrap();
}

pub fn raw_sled(path: &std::path::Path) -> sled::Db {
    let mut tries = 0;
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if tries < 200 => {
                assert!(e.to_string().contains("could not acquire lock"), "{e}");
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The rule engine's state, limited to the working set [`cmr_log::ledger::Ledger::needs`] names for the
/// entry being applied (and the owners of the devices it names): what a state kept on disk would have
/// loaded. Reading or changing anything else fails the test.
#[derive(Default)]
pub struct WorkingSet {
    full: cmr_log::ledger::InMemory,
    identities: std::collections::HashSet<cmr_core::identity::IdentityId>,
    customers: std::collections::HashSet<cmr_core::identity::IdentityId>,
    devices: std::collections::HashSet<cmr_core::identity::DeviceId>,
}

impl WorkingSet {
    /// Loads the working set of the next entry.
    pub fn prepare(&mut self, needs: &cmr_log::ledger::Needs) {
        use cmr_log::ledger::LedgerState as _;
        self.identities = needs.identities.iter().copied().collect();
        self.customers = needs.customers.iter().copied().collect();
        self.devices = needs.devices.iter().copied().collect();
        for d in &needs.devices {
            if let Some(owner) = self.full.device_owner(d) {
                self.identities.insert(owner);
            }
        }
    }

    fn identity_in(&self, id: &cmr_core::identity::IdentityId) {
        assert!(
            self.identities.contains(id),
            "the rules used identity {id}, which Ledger::needs did not name"
        );
    }

    fn customer_in(&self, id: &cmr_core::identity::IdentityId) {
        assert!(
            self.customers.contains(id),
            "the rules used the consent state of {id}, which Ledger::needs did not name"
        );
    }
}

impl cmr_log::ledger::LedgerState for WorkingSet {
    fn identity(
        &self,
        id: &cmr_core::identity::IdentityId,
    ) -> Option<&cmr_core::identity::IdentityState> {
        self.identity_in(id);
        self.full.identity(id)
    }
    fn identity_mut(
        &mut self,
        id: &cmr_core::identity::IdentityId,
    ) -> Option<&mut cmr_core::identity::IdentityState> {
        self.identity_in(id);
        self.full.identity_mut(id)
    }
    fn put_identity(
        &mut self,
        id: cmr_core::identity::IdentityId,
        state: cmr_core::identity::IdentityState,
    ) {
        self.identity_in(&id);
        self.full.put_identity(id, state)
    }
    fn consent(
        &self,
        customer: &cmr_core::identity::IdentityId,
    ) -> Option<&cmr_core::decision::ConsentState> {
        self.customer_in(customer);
        self.full.consent(customer)
    }
    fn consent_mut(
        &mut self,
        customer: &cmr_core::identity::IdentityId,
    ) -> Option<&mut cmr_core::decision::ConsentState> {
        self.customer_in(customer);
        self.full.consent_mut(customer)
    }
    fn put_consent(
        &mut self,
        customer: cmr_core::identity::IdentityId,
        state: cmr_core::decision::ConsentState,
    ) {
        self.customer_in(&customer);
        self.full.put_consent(customer, state)
    }
    fn directory(
        &self,
        customer: &cmr_core::identity::IdentityId,
    ) -> Option<(u64, cmr_core::hash::Digest)> {
        self.customer_in(customer);
        self.full.directory(customer)
    }
    fn put_directory(
        &mut self,
        customer: cmr_core::identity::IdentityId,
        version: u64,
        digest: cmr_core::hash::Digest,
    ) {
        self.customer_in(&customer);
        self.full.put_directory(customer, version, digest)
    }
    fn device_owner(
        &self,
        device: &cmr_core::identity::DeviceId,
    ) -> Option<cmr_core::identity::IdentityId> {
        assert!(
            self.devices.contains(device),
            "the rules used the owner of a device Ledger::needs did not name"
        );
        self.full.device_owner(device)
    }
    fn put_device_owner(
        &mut self,
        device: cmr_core::identity::DeviceId,
        owner: cmr_core::identity::IdentityId,
    ) {
        assert!(
            self.devices.contains(&device),
            "the rules recorded the owner of a device Ledger::needs did not name"
        );
        self.full.put_device_owner(device, owner)
    }
    fn auditors(&self) -> &cmr_log::admission::Auditors {
        self.full.auditors()
    }
    fn auditors_mut(&mut self) -> &mut cmr_log::admission::Auditors {
        self.full.auditors_mut()
    }
}

/// Applies the store's durable log again, entry by entry, through the rule engine over a
/// [`WorkingSet`]: every entry applies, and the rules touch only the state [`Ledger::needs`] names, so
/// a state kept on disk may load just that before each entry.
///
/// [`Ledger::needs`]: cmr_log::ledger::Ledger::needs
pub fn replay_with_working_sets(store: &Store) -> u64 {
    use cmr_log::entry::EntryBody;
    use cmr_log::ledger::{Header, Ledger, Parsed, Signatures};
    let size = latest_checkpoint(store).size;
    let verifier = log_key().verifier();
    let mut ledger = Ledger::over(WorkingSet::default());
    let mut applied = 0;
    for i in 0..size {
        // An erased vault's entries are redacted; the replay stops being complete there.
        let Some(salted) = store.body(i).unwrap() else {
            return applied;
        };
        let body = EntryBody::decode(&salted.body).unwrap();
        let parsed = Parsed::decode(body.kind, &body.payload, &verifier).unwrap();
        ledger
            .state_mut()
            .prepare(&Ledger::<WorkingSet>::needs(&parsed));
        ledger
            .apply(
                &parsed,
                i,
                body.time,
                Some(Header::of(&body)),
                Signatures::Verify,
            )
            .unwrap_or_else(|e| panic!("entry {i} ({}) does not apply: {e}", body.kind.name()));
        applied += 1;
    }
    applied
}
