//! What the server measures, served as `/metrics` in the Prometheus text format (OpenMetrics): requests
//! by route, method and status, their latency by route, refusals by problem code, the store's own
//! metrics (group commits, syncs, stops and recoveries), and, read at each scrape, the durable log's
//! size and the storage's bytes on disk. Routes are named by their template (`/v1/vaults/{customer}/…`),
//! never by an id: nothing here names a party.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::AppState;

/// `cmr_store_size_bytes` is given in whole MiB. The log's entries are stored compressed against the
/// entries before them (docs/durability.md), so the exact bytes one entry adds say whether it repeated
/// what came just before it: read before and after an entry of one's own, that would let anyone who can
/// log one guess at another party's entry (docs/threat-model.md, "The store's size"). Disk space is
/// watched in MiB anyway.
pub const STORE_BYTES_UNIT: u64 = 1 << 20;

/// The problem code of a refusal, left on the response for [`track`] to count.
#[derive(Clone, Copy, Debug)]
pub struct ProblemCode(pub &'static str);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

type Latency = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_buckets() -> Histogram {
    // 100 µs to about 3 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

/// The server's metrics and the registry that lists them with the store's.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Latency,
    refusals: Family<CodeLabels, Counter>,
    log_entries: Gauge,
    store_bytes: Gauge,
    connections: Gauge,
    resident: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The server's metrics, with those of `store` registered beside them (names start with `cmr_`).
    pub fn new(store: &cmr_store::metrics::StoreMetrics) -> Self {
        let mut registry = Registry::with_prefix("cmr");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: Latency = Family::new_with_constructor(latency_buckets);
        let refusals = Family::<CodeLabels, Counter>::default();
        let (log_entries, store_bytes) = (Gauge::default(), Gauge::default());
        let (connections, resident) = (Gauge::default(), Gauge::default());
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time to answer an HTTP request, by route",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register(
            "refusals",
            "Requests refused, by problem code",
            refusals.clone(),
        );
        registry.register(
            "log_entries",
            "Entries in the durable log",
            log_entries.clone(),
        );
        registry.register_with_unit(
            "store_size",
            "Bytes the storage takes on disk (-1: the engine cannot tell)",
            Unit::Bytes,
            store_bytes.clone(),
        );
        registry.register(
            "http_connections",
            "Connections open now (capped; past the cap new ones are answered 503)",
            connections.clone(),
        );
        registry.register_with_unit(
            "process_resident_memory",
            "The server process's resident memory (VmRSS; -1 where /proc cannot tell)",
            Unit::Bytes,
            resident.clone(),
        );
        store.register(&mut registry);
        Self {
            registry,
            requests,
            latency,
            refusals,
            log_entries,
            store_bytes,
            connections,
            resident,
        }
    }

    /// Counts one answered request.
    fn observe(
        &self,
        route: String,
        method: String,
        status: u16,
        took: f64,
        code: Option<ProblemCode>,
    ) {
        self.latency
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .observe(took);
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .inc();
        if let Some(ProblemCode(code)) = code {
            self.refusals
                .get_or_create(&CodeLabels {
                    code: code.to_string(),
                })
                .inc();
        }
    }

    /// The text exposition, with the log's size and the storage's size read now (in whole
    /// [`STORE_BYTES_UNIT`]s).
    pub fn encode(&self, log_entries: u64, store_bytes: Option<u64>, connections: usize) -> String {
        self.connections
            .set(i64::try_from(connections).unwrap_or(i64::MAX));
        self.resident.set(resident_bytes().unwrap_or(-1));
        self.log_entries
            .set(i64::try_from(log_entries).unwrap_or(i64::MAX));
        self.store_bytes.set(
            store_bytes
                .map(|b| b - b % STORE_BYTES_UNIT)
                .and_then(|b| i64::try_from(b).ok())
                .unwrap_or(-1),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// This process's resident memory, from `/proc/self/status` (Linux).
fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Middleware on the matched routes: counts each request by its route's template, method and status,
/// times it, and counts a refusal by its problem code.
pub async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    state.metrics.observe(
        route,
        method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
        response.extensions().get::<ProblemCode>().copied(),
    );
    response
}
