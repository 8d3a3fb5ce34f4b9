//! What the store measures of itself, for an operator's monitoring (the server serves it as `/metrics`):
//! the group commit (operations per group, time to decide and write a group), the syncs that make groups
//! durable, and the failures it stopped on and came back from. Counters and
//! histograms only: nothing here does I/O or names a party.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The store's metrics. Cheap to clone (each metric is shared); the sequencer and the syncer update
/// them, and [`StoreMetrics::register`] lists them in a registry.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    /// Operations per group (1 to the configured maximum).
    pub(crate) group_operations: Histogram,
    /// From a group's first operation taken to its rows written (deciding, the tree, the write).
    pub(crate) group_seconds: Histogram,
    /// One sync of the storage engine (on sled: flush and `fdatasync`; on PostgreSQL: a synchronous
    /// commit).
    pub(crate) sync_seconds: Histogram,
    /// Times the store stopped after a storage failure, and times it came back by itself.
    pub(crate) stopped: Counter,
    pub(crate) recovered: Counter,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            group_operations: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            // 50 µs to about 1.6 s.
            group_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            sync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            stopped: Counter::default(),
            recovered: Counter::default(),
        }
    }
}

impl StoreMetrics {
    /// Lists the metrics in `registry` (names start with `store_`; the server adds its own prefix).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("store");
        r.register(
            "group_operations",
            "Operations per group commit",
            self.group_operations.clone(),
        );
        r.register_with_unit(
            "group",
            "Time from a group's first operation to its rows written",
            Unit::Seconds,
            self.group_seconds.clone(),
        );
        r.register_with_unit(
            "sync",
            "Time of one sync that makes written groups durable",
            Unit::Seconds,
            self.sync_seconds.clone(),
        );
        r.register(
            "stopped",
            "Times the store stopped taking operations after a storage failure",
            self.stopped.clone(),
        );
        r.register(
            "recovered",
            "Times the store came back by itself after its database did",
            self.recovered.clone(),
        );
    }
}
