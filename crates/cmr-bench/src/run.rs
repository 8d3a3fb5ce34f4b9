//! The load generator's runs: seeding, the workers, the race, the report.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration as StdDuration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cmr_client::company::{Company, read_page};
use cmr_client::customer::{Approval, Customer};
use cmr_client::session::Session;
use cmr_client::transport::Signer;
use cmr_client::verify::{LogView, Needs, check_inclusion};
use cmr_client::wellknown::CompanyProof;
use cmr_client::{ClientError, Connection};
use cmr_core::batch::{Batch, SignedBatch};
use cmr_core::consent::{Access, AccessRequest, Counterparty, Duration, StatementId};
use cmr_core::epoch::{Chain, ChainKey};
use cmr_core::family::{FamilyId, FamilyName, Period, PseudonymKey, Scope};
use cmr_core::hash::Digest;
use cmr_core::identity::{DeviceKeys, IdentityId, Role};
use cmr_core::keys::{SigningKey, VerifyingKey};
use cmr_core::record::{FamilyKeys, RecordId, RecordSealer};
use cmr_log::entry::{AccessRecord, EntryKind, SaltedBody};
use cmr_log::note::NoteVerifier;
use cmr_wire::log::{AckJson, CommitmentsJson, ProofJson};
use cmr_wire::read::ReadAnswerJson;
use serde_json::{Value, json};

use crate::{BenchError, Out, Result, now};

/// What `cmr bench` is told.
#[derive(clap::Args, Clone)]
pub struct BenchArgs {
    /// A server already running (default: start `cmr serve` in a temporary folder).
    #[arg(long)]
    pub server: Option<String>,
    /// With --server: its log verifier key.
    #[arg(long, env = "CMR_LOG_VKEY")]
    pub log_vkey: Option<String>,
    /// Customers to seed, each with ten 1 KiB transactions in one batch.
    #[arg(long, default_value_t = 64)]
    pub customers: usize,
    /// Companies to seed; each customer grants one of them read and append on its transactions.
    #[arg(long, default_value_t = 8)]
    pub companies: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// The mix, in parts: reads, appends, customer writes, grant/revoke churn, proof fetches.
    #[arg(long, default_value = "reads=90,appends=5,writes=2,churn=1,proofs=2")]
    pub mix: String,
    /// Percent of reads fully verified and decrypted (at least 1).
    #[arg(long, default_value_t = 1.0)]
    pub sample: f64,
    /// Rounds of the revocation race (0: none).
    #[arg(long, default_value_t = 0)]
    pub race_rounds: usize,
    /// A soak: fail if the server's open file descriptors or threads grow over the load's second half
    /// (more than 5 descriptors or 1 thread a minute); its memory's slope is reported either way.
    #[arg(long)]
    pub soak: bool,
    /// Records stored in all before the load, for the scale curves (a tenth of them, at most 100,000, in
    /// the family the latency probe reads).
    #[arg(long, default_value_t = 0)]
    pub stored: usize,
    /// With its own server: sled's page cache for it, in MiB (`cmr serve --cache-mib`).
    #[arg(long)]
    pub cache_mib: Option<u64>,
    /// With its own server: where it keeps the state (`cmr serve --store`, such as an empty
    /// PostgreSQL database `postgres://…`); sled in a temporary folder if not given.
    #[arg(long)]
    pub store: Option<String>,
    /// With its own server: its log key file (created if missing; a temporary one if not given). With
    /// `--store sled:PATH`, it lets `cmr serve --data PATH --log-key FILE` serve that folder again.
    #[arg(long)]
    pub log_key: Option<std::path::PathBuf>,
    /// Grantees that keep access through each race's rotation.
    #[arg(long, default_value_t = 10)]
    pub keepers: usize,
}

const RECORD_SIZE: usize = 1024;
const RECORDS_PER_READ: usize = 10;

/// The kinds of operation.
const KINDS: [&str; 6] = [
    "read",
    "append",
    "write",
    "churn-grant",
    "churn-revoke",
    "proof",
];

/// A customer's transactions family as a company reaches it.
struct Target {
    company: usize,
    customer: IdentityId,
    family: FamilyId,
    grant: StatementId,
    /// The company's keys for the family (read chain from the look-back, its own append chain).
    keys: Vec<(u64, ChainKey)>,
    /// Its append key and epoch.
    append: (u64, ChainKey),
    /// The family's head, as the last acknowledged batch named it.
    head: tokio::sync::Mutex<Digest>,
}

/// What the workers share.
struct World {
    conn: Connection,
    pinned: NoteVerifier,
    month: Period,
    companies: Vec<(IdentityId, DeviceKeys)>,
    /// Device keys by device id, for verifying batches in sampled reads.
    device_keys: HashMap<cmr_core::identity::DeviceId, VerifyingKey>,
    targets: Vec<Target>,
    customers: Vec<tokio::sync::Mutex<Customer>>,
    prefs: Vec<FamilyId>,
}

fn copy_device(d: &DeviceKeys) -> DeviceKeys {
    DeviceKeys {
        signing: SigningKey::from_seed(&d.signing.seed()),
        kem: d.kem.clone(),
    }
}

fn record(i: usize) -> Vec<u8> {
    let mut v = format!("transaction {i}: ").into_bytes();
    v.resize(RECORD_SIZE, b'.');
    v
}

/// A small, fast generator for choosing operations (not for anything secret).
struct Pick(u64);

impl Pick {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn parse_mix(s: &str) -> Result<Vec<(usize, u64)>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            BenchError::local(
                format!("bad mix part {part:?}"),
                "write kind=parts, e.g. reads=90,appends=10",
            )
        })?;
        let kind = match k.trim() {
            "reads" => 0,
            "appends" => 1,
            "writes" => 2,
            "churn" => 3,
            "proofs" => 5,
            other => {
                return Err(BenchError::local(
                    format!("unknown kind {other:?}"),
                    "kinds: reads, appends, writes, churn, proofs",
                ));
            }
        };
        let parts: u64 = v
            .trim()
            .parse()
            .map_err(|_| BenchError::local(format!("bad parts {v:?}"), "a whole number"))?;
        out.push((kind, parts));
    }
    if out.iter().map(|(_, p)| p).sum::<u64>() == 0 {
        return Err(BenchError::local("the mix is empty", "give some parts"));
    }
    Ok(out)
}

/// A server this run started: a `cmr serve` child on a free port, stopped at the end.
struct Child {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(
    cache_mib: Option<u64>,
    store: Option<&str>,
    log_key: Option<&std::path::Path>,
) -> Result<(Child, String, String)> {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().map_err(|e| BenchError::local(e.to_string(), "check TMPDIR"))?;
    let exe =
        std::env::current_exe().map_err(|e| BenchError::local(e.to_string(), "report this"))?;
    let mut child = std::process::Command::new(exe)
        // The per-identity rate limit protects a real vault from one noisy company; the load generator's
        // few companies are that noisy on purpose.
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--rate-per-identity",
            "1000000",
            "--burst-per-identity",
            "1000000",
            "--data",
        ])
        .arg(dir.path().join("data"))
        .arg("--log-key")
        .arg(log_key.map_or_else(|| dir.path().join("log.key"), std::path::Path::to_path_buf))
        .args(
            cache_mib
                .map(|c| vec!["--cache-mib".to_string(), c.to_string()])
                .unwrap_or_default(),
        )
        .args(
            store
                .map(|s| vec!["--store".to_string(), s.to_string()])
                .unwrap_or_default(),
        )
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError::local(format!("cannot start the server: {e}"), "report this"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::local("no server output", "report this"))?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let (mut base, mut vkey) = (String::new(), String::new());
    while base.is_empty() || vkey.is_empty() {
        let line = lines.next().and_then(Result::ok).ok_or_else(|| {
            BenchError::local(
                "the server stopped while starting",
                "run `cmr serve` to see why",
            )
        })?;
        if let Some(rest) = line
            .strip_prefix("CMR Vault serving ")
            .and_then(|l| l.split(" on ").nth(1))
        {
            base = rest.trim().to_string();
        }
        if let Some(k) = line.strip_prefix("log verifier key (clients pin it): ") {
            vkey = k.trim().to_string();
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Ok((Child { child, _dir: dir }, base, vkey))
}

/// One look at the server process during a soak: seconds since the load began, resident memory (MiB),
/// open file descriptors, threads.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: f64,
    rss_mib: f64,
    fds: f64,
    threads: f64,
}

/// The server process's resources now, from /proc.
fn sample(pid: u32, at: f64) -> Option<Sample> {
    let status = ProcStatus::read(pid)?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as f64;
    Some(Sample {
        at,
        rss_mib: status.field("VmRSS:")? / 1024.0,
        fds,
        threads: status.field("Threads:")?,
    })
}

/// A process's `/proc/PID/status`.
struct ProcStatus(String);

impl ProcStatus {
    fn read(pid: u32) -> Option<Self> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .map(Self)
    }

    /// The number on the line that starts with `name` (`VmRSS:` is in KiB).
    fn field(&self, name: &str) -> Option<f64> {
        self.0
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<f64>()
            .ok()
    }
}

/// The least-squares slope of `value` against time, per minute.
fn slope_per_minute(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> f64 {
    let points: Vec<(f64, f64)> = samples.iter().map(|s| (s.at, value(s))).collect();
    slope_of(&points)
}

/// The least-squares slope of `(seconds, value)` points, per minute.
fn slope_of(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (t, v) in points {
        num += (t - mean_t) * (v - mean_v);
        den += (t - mean_t) * (t - mean_t);
    }
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

/// The slope of the floor of `value`: its least value in each run of `window` samples. Open
/// connections make a process's descriptors swing by dozens from one second to the next, and answers
/// in flight (a history page, a read of large records) its memory by tens of MiB over a minute; a
/// leak raises the floor.
fn floor_slope_per_minute(
    samples: &[Sample],
    window: usize,
    value: impl Fn(&Sample) -> f64,
) -> f64 {
    let floors: Vec<(f64, f64)> = samples
        .chunks(window)
        .filter(|c| c.len() == window)
        .map(|c| {
            let at = c.iter().map(|s| s.at).sum::<f64>() / c.len() as f64;
            (at, c.iter().map(&value).fold(f64::INFINITY, f64::min))
        })
        .collect();
    slope_of(&floors)
}

/// What a soak found: the resources at the start and end of the load, and their slopes over its second
/// half (after the caches and the replay window have filled); for descriptors, the slope of their floor
/// (its least value in each 10 s); for memory, both its slope and that of its floor (each minute's least).
fn soak_report(samples: &[Sample]) -> Option<Value> {
    let (first, last) = (samples.first()?, samples.last()?);
    let half = &samples[samples.len() / 2..];
    Some(json!({
        "samples": samples.len(),
        "rss_mib": {
            "start": first.rss_mib,
            "end": last.rss_mib,
            "slope_per_min": slope_per_minute(half, |s| s.rss_mib),
            "floor_slope_per_min": floor_slope_per_minute(half, 60, |s| s.rss_mib),
        },
        // Descriptors by their floor (connections come and go); threads as they are.
        "fds": {"start": first.fds, "end": last.fds, "slope_per_min": floor_slope_per_minute(half, 10, |s| s.fds)},
        "threads": {"start": first.threads, "end": last.threads, "slope_per_min": slope_per_minute(half, |s| s.threads)},
    }))
}

/// Resident and peak memory of a process, in MiB, from /proc.
fn rss(pid: u32) -> Option<(f64, f64)> {
    let status = ProcStatus::read(pid)?;
    Some((
        status.field("VmRSS:")? / 1024.0,
        status.field("VmHWM:")? / 1024.0,
    ))
}

async fn seed(
    conn: &Connection,
    pinned: &NoteVerifier,
    args: &BenchArgs,
) -> Result<World, ClientError> {
    let t = now();
    let month = Period::from_unix(t as i64)
        .ok_or_else(|| ClientError::Local("clock before 2000".into()))?;
    let mut companies = Vec::new();
    for _ in 0..args.companies.max(1) {
        let (s, _) = Session::register(conn.clone(), Role::Company, pinned.clone(), t).await?;
        companies.push(Company::new(s));
    }
    let mut customers = Vec::new();
    let mut pending = Vec::new();
    let mut prefs = Vec::new();
    let mut heads = Vec::new();
    let records: Vec<Vec<u8>> = (0..RECORDS_PER_READ).map(record).collect();
    let refs: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
    for i in 0..args.customers.max(1) {
        let j = i % companies.len();
        let (s, _) = Session::register(conn.clone(), Role::Customer, pinned.clone(), t).await?;
        let mut c = Customer::new(s, PseudonymKey::generate(&mut rand::rng()));
        let tx = c.transactions_with(&companies[j].id());
        let pf = FamilyName::profile(Scope::ProfilePreferences)
            .ok_or_else(|| ClientError::Local("no section".into()))?;
        c.declare(&[tx, pf], t).await?;
        if i == 0 {
            // The same ten records, but from ten batches, a month earlier: the client-cost reference.
            for r in &refs {
                c.write(c.family_id(&tx), Period(month.0 - 1), &[r]).await?;
            }
        }
        let acked = c.write(c.family_id(&tx), month, &refs).await?;
        heads.push(
            acked
                .head
                .ok_or_else(|| ClientError::Malformed("no head in the acknowledgement".into()))?,
        );
        c.write(c.family_id(&pf), Period::ORIGIN, &[b"channel: email"])
            .await?;
        prefs.push(c.family_id(&pf));
        let req = companies[j]
            .request(
                c.id(),
                AccessRequest {
                    scopes: vec![(Scope::Transactions, Access::ReadAppend)],
                    purpose: "load test".into(),
                    duration: Duration::Persistent,
                    lookback_months: 12,
                    counterparty: Counterparty::OnlyRequester,
                },
                t,
            )
            .await?;
        pending.push((i, j, req, tx));
        customers.push(c);
    }
    let mut grants = Vec::new();
    for (i, j, req, tx) in pending {
        let c = &mut customers[i];
        let p = c
            .pending()
            .await?
            .into_iter()
            .find(|p| p.statement.id() == req)
            .ok_or_else(|| ClientError::Local("a request was not seen".into()))?;
        let proof = CompanyProof {
            domain: "bench.invalid".into(),
            name: format!("company {j}"),
            identity: companies[j].id(),
        };
        let approval = Approval {
            scopes: vec![(Scope::Transactions, Access::ReadAppend)],
            lookback_months: 12,
            families: vec![tx],
            append_family: Some(tx),
        };
        grants.push((
            i,
            j,
            c.approve(&p, &proof, &approval, t).await?,
            c.family_id(&tx),
        ));
    }
    let mut device_keys = HashMap::new();
    for c in &customers {
        device_keys.insert(
            c.session.keys.device.id(),
            c.session.keys.device.signing.verifying_key(),
        );
    }
    for co in &companies {
        device_keys.insert(
            co.session.keys.device.id(),
            co.session.keys.device.signing.verifying_key(),
        );
    }
    let mut targets = Vec::new();
    for (i, j, grant, family) in grants {
        let customer = customers[i].id();
        companies[j].sync(customer).await?;
        let held = companies[j]
            .grants
            .get(&grant)
            .ok_or_else(|| ClientError::Local("a grant did not arrive".into()))?;
        let me = companies[j].id();
        let keys: Vec<(u64, ChainKey)> = held
            .keys
            .entries
            .iter()
            .filter(|e| e.family == family)
            .map(|e| (e.epoch, e.key.clone()))
            .collect();
        let append = keys
            .iter()
            .find(|(_, k)| k.chain() == Chain::Append(me))
            .cloned()
            .ok_or_else(|| ClientError::Local("no append key in a grant".into()))?;
        targets.push(Target {
            company: j,
            customer,
            family,
            grant,
            keys,
            append,
            head: tokio::sync::Mutex::new(heads[i]),
        });
    }
    Ok(World {
        conn: conn.clone(),
        pinned: pinned.clone(),
        month,
        companies: companies
            .iter()
            .map(|c| (c.id(), copy_device(&c.session.keys.device)))
            .collect(),
        device_keys,
        targets,
        customers: customers.into_iter().map(tokio::sync::Mutex::new).collect(),
        prefs,
    })
}

/// How one operation ended.
enum Outcome {
    Ok,
    /// A refusal the workload expects (a stale head when two appenders race, say).
    Expected(String),
    Error(String),
}

fn outcome(r: Result<(), ClientError>, expected: &[&str]) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(e) => match e.code() {
            Some(c) if expected.contains(&c) => Outcome::Expected(c.to_string()),
            Some(c) => Outcome::Error(c.to_string()),
            None => Outcome::Error(match e {
                ClientError::Transport(_) => "transport".into(),
                ClientError::Verification(_) | ClientError::Malformed(_) => {
                    format!("verification: {e}")
                }
                _ => format!("{e}"),
            }),
        },
    }
}

/// What each worker keeps.
#[derive(Default)]
struct Tally {
    latencies: Vec<Vec<u32>>,
    ok: Vec<u64>,
    expected: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    sampled: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            latencies: vec![Vec::new(); KINDS.len()],
            ok: vec![0; KINDS.len()],
            ..Default::default()
        }
    }

    fn add(&mut self, kind: usize, started: Instant, o: Outcome) {
        match o {
            Outcome::Ok => {
                self.ok[kind] += 1;
                self.latencies[kind]
                    .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Outcome::Expected(c) => {
                *self
                    .expected
                    .entry(format!("{} {c}", KINDS[kind]))
                    .or_default() += 1
            }
            Outcome::Error(c) => {
                *self
                    .errors
                    .entry(format!("{} {c}", KINDS[kind]))
                    .or_default() += 1
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        for (k, l) in other.latencies.into_iter().enumerate() {
            self.latencies[k].extend(l);
            self.ok[k] += other.ok[k];
        }
        for (k, v) in other.expected {
            *self.expected.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.sampled += other.sampled;
    }
}

/// A company's signed read of `t`'s family in `month` under `grant`, answered as JSON (a `Value`, or
/// only the fields a caller reads).
async fn signed_read<T: serde::de::DeserializeOwned>(
    w: &World,
    t: &Target,
    grant: StatementId,
    month: Period,
) -> Result<T, ClientError> {
    let (_, device) = &w.companies[t.company];
    let target = cmr_log::entry::access_target(
        &t.customer,
        &t.family,
        cmr_core::decision::AccessKind::Read,
        &grant,
        None,
        month,
        month,
    );
    let m = month.to_string();
    w.conn
        .post_as(
            &target,
            // The first ten records of the month, however many appends added since: a read costs the
            // same at the end of a long run as at its start.
            &json!({"from": m, "to": m, "grant": grant.to_hex(), "limit": RECORDS_PER_READ}),
            Signer::Device(device),
            None,
        )
        .await
        .map(|(answer, _)| answer)
}

/// What an unsampled read checks of its answer: that it holds the records (each skipped, not copied).
#[derive(serde::Deserialize)]
struct RecordsOnly {
    records: Vec<serde::de::IgnoredAny>,
}

/// A read page checked against its own head: complete, every record in a batch signed by its author's
/// device (known from the seeding).
fn verify_page<'a>(
    w: &World,
    page: &'a cmr_client::company::ReadPage,
) -> Result<cmr_core::batch::VerifiedRead<'a>, ClientError> {
    cmr_core::batch::verify_read(
        &page.proof.head.digest(),
        &page.proof,
        &page.records,
        &page.batches,
        |b| w.device_keys.get(&b.device).copied(),
        None,
    )
    .map_err(|e| cmr_client::error::VerifyError::Read(e.to_string()).into())
}

/// A company's signed read of a target's ten records this month. A sampled one is verified in full: the
/// checkpoint under the pinned key and consistent with the worker's view, the access entry included and
/// naming this read, the read complete against its head, every batch signed by its author's device, and
/// every record decrypted.
async fn read(w: &World, t: &Target, view: Option<&mut LogView>) -> Result<(), ClientError> {
    let (company, device) = &w.companies[t.company];
    let enough = |n: usize| {
        if n < RECORDS_PER_READ {
            Err(ClientError::Malformed(format!(
                "a read returned {n} records"
            )))
        } else {
            Ok(())
        }
    };
    // An unsampled read is counted once its records are there; the load generator reads nothing more
    // of it, so that its own cost stays out of the server's figures.
    let Some(view) = view else {
        let answer: RecordsOnly = signed_read(w, t, t.grant, w.month).await?;
        return enough(answer.records.len());
    };
    let answer: ReadAnswerJson = signed_read(w, t, t.grant, w.month).await?;
    enough(answer.records.len())?;
    let note = answer.ack.checkpoint.as_str();
    let (cp, needs) = view.check(note)?;
    match needs {
        Needs::Nothing => view.accept(cp.clone(), note, None)?,
        Needs::Consistency { old, new } => {
            let p: ProofJson = typed(
                w.conn
                    .get_json(&format!("/v1/log/proofs/consistency?old={old}&new={new}"))
                    .await?,
            )?;
            let proof = hashes("proof", &p.proof)?;
            view.accept(cp.clone(), note, Some(&proof))?;
        }
    }
    let (index, salted, proof) = logged_entry(&answer.ack)?;
    let entry = check_inclusion(&cp, index, &salted, &proof)?;
    let keyid = device.id().to_hex();
    let names_this_read = entry.kind == EntryKind::Access
        && entry.subject == *company
        && AccessRecord::decode(&entry.payload)
            .is_ok_and(|a| a.grant == t.grant && a.keyid == keyid);
    if !names_this_read {
        return Err(cmr_client::error::VerifyError::NotWhatWasSent(index).into());
    }
    let page = read_page(&answer)?;
    if page.proof.head.customer != t.customer || page.proof.head.family != t.family {
        return Err(cmr_client::error::VerifyError::Read("another vault or family".into()).into());
    }
    let verified = verify_page(w, &page)?;
    let mut keys = FamilyKeys::new(t.customer, t.family);
    for (epoch, k) in &t.keys {
        keys.insert(*epoch, k.clone());
    }
    for r in verified.records {
        let content = keys
            .open(r)
            .map_err(|e| cmr_client::error::VerifyError::Read(e.to_string()))?;
        if content.len() != RECORD_SIZE {
            return Err(
                cmr_client::error::VerifyError::Read("a record of the wrong size".into()).into(),
            );
        }
    }
    Ok(())
}

/// An answer read into its wire type (`cmr-wire`).
fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ClientError> {
    serde_json::from_value(v).map_err(|e| ClientError::Malformed(e.to_string()))
}

/// Base64 hashes of an answer's `field`.
fn hashes(field: &'static str, v: &[String]) -> Result<Vec<[u8; 32]>, ClientError> {
    cmr_wire::log::parse_hashes(field, v).map_err(|e| ClientError::Malformed(e.to_string()))
}

/// The entry an acknowledgement says was logged: its index, salted body and inclusion proof.
fn logged_entry(
    ack: &cmr_wire::log::AckJson,
) -> Result<(u64, SaltedBody, Vec<cmr_core::merkle::Hash>), ClientError> {
    let bad = |what: &str| ClientError::Malformed(format!("acknowledgement: {what}"));
    let index = ack.index.ok_or_else(|| bad("no index"))?;
    let entry = ack.entry.as_ref().ok_or_else(|| bad("no entry"))?;
    let salted = SaltedBody {
        salt: B64
            .decode(&entry.salt)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| bad("salt"))?,
        body: B64.decode(&entry.body).map_err(|_| bad("body"))?,
    };
    let proof =
        cmr_wire::log::parse_hashes("proof", &ack.proof).map_err(|e| bad(&e.to_string()))?;
    Ok((index, salted, proof))
}

/// What one read costs the client in steady state (grant keys and checkpoint cached), from the answer's
/// bytes: parse, check the access entry's inclusion in the checkpoint, verify completeness and every
/// batch signature, decrypt the ten records. Returns microseconds per read of `month`.
async fn client_cost(w: &World, month: Period) -> Result<f64, ClientError> {
    let t = &w.targets[0];
    let v: ReadAnswerJson = signed_read(w, t, t.grant, month).await?;
    let bytes = serde_json::to_vec(&v).map_err(|e| ClientError::Local(e.to_string()))?;
    let cp = cmr_log::checkpoint::open(&v.ack.checkpoint, &w.pinned, &[], 0)
        .map_err(|e| cmr_client::error::VerifyError::Checkpoint(e.to_string()))?
        .checkpoint;
    let mut keys = FamilyKeys::new(t.customer, t.family);
    for (epoch, k) in &t.keys {
        keys.insert(*epoch, k.clone());
    }
    let one = |keys: &mut FamilyKeys| -> Result<usize, ClientError> {
        let v: ReadAnswerJson =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Malformed(e.to_string()))?;
        let (index, salted, proof) = logged_entry(&v.ack)?;
        check_inclusion(&cp, index, &salted, &proof)?;
        let page = read_page(&v)?;
        let verified = verify_page(w, &page)?;
        let mut n = 0;
        for r in verified.records {
            n += keys
                .open(r)
                .map_err(|e| cmr_client::error::VerifyError::Read(e.to_string()))?
                .len();
        }
        Ok(n)
    };
    if one(&mut keys)? != RECORDS_PER_READ * RECORD_SIZE {
        return Err(cmr_client::error::VerifyError::Read(
            "the reference read is not ten 1 KiB records".into(),
        )
        .into());
    }
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < StdDuration::from_millis(300) {
        one(&mut keys)?;
        n += 1;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(n))
}

/// A company's append of one 1 KiB record to a target's family, on the head the last batch named.
async fn append(w: &World, t: &Target) -> Result<(), ClientError> {
    let (company, device) = &w.companies[t.company];
    let mut head = t.head.lock().await;
    let (epoch, key) = &t.append;
    let sealer = RecordSealer::new(t.customer, t.family, *epoch, *company, key, w.month)
        .map_err(|e| ClientError::Local(e.to_string()))?;
    let rec = sealer
        .seal(
            &mut rand::rng(),
            RecordId::generate(&mut rand::rng()),
            &record(0),
        )
        .map_err(|e| ClientError::Local(e.to_string()))?;
    let batch = Batch::for_records(device.id(), *head, std::slice::from_ref(&rec))
        .map_err(|e| ClientError::Local(e.to_string()))?;
    let bytes = SignedBatch::sign(batch, &device.signing).encode();
    let target = cmr_log::entry::access_target(
        &t.customer,
        &t.family,
        cmr_core::decision::AccessKind::Append,
        &t.grant,
        Some(*epoch),
        w.month,
        w.month,
    );
    let body = json!({"batch": B64.encode(&bytes), "records": [B64.encode(rec.as_bytes())], "grant": t.grant.to_hex()});
    let ack: AckJson = typed(w.conn.post(&target, &body, Signer::Device(device)).await?)?;
    *head = ack
        .head
        .as_deref()
        .and_then(Digest::from_hex)
        .ok_or_else(|| ClientError::Malformed("no head".into()))?;
    Ok(())
}

/// An auditor-style proof fetch: the checkpoint, one leaf commitment, and its inclusion proof, checked.
async fn proof(w: &World, pick: &mut Pick) -> Result<(), ClientError> {
    let note = w.conn.get_text("/v1/log/checkpoint").await?;
    let cp = cmr_log::checkpoint::open(&note, &w.pinned, &[], 0)
        .map_err(|e| cmr_client::error::VerifyError::Checkpoint(e.to_string()))?
        .checkpoint;
    let i = pick.next() % cp.size.max(1);
    let c: CommitmentsJson = typed(
        w.conn
            .get_json(&format!("/v1/log/commitments?from={i}&to={}", i + 1))
            .await?,
    )?;
    let leaf = *hashes("commitments", &c.commitments)?
        .first()
        .ok_or_else(|| ClientError::Malformed("no commitment".into()))?;
    let p: ProofJson = typed(
        w.conn
            .get_json(&format!(
                "/v1/log/proofs/inclusion?index={i}&size={}",
                cp.size
            ))
            .await?,
    )?;
    let leaf = cmr_log::entry::commitment_leaf(&Digest(leaf));
    cmr_log::verify::verify_inclusion(i, cp.size, &leaf, &hashes("proof", &p.proof)?, &cp.root)
        .map_err(|_| cmr_client::error::VerifyError::NotIncluded(i).into())
}

async fn worker(
    w: Arc<World>,
    id: usize,
    mix: Arc<Vec<(usize, u64)>>,
    deadline: Instant,
    sample: f64,
) -> Tally {
    let mut tally = Tally::new();
    let mut pick =
        Pick(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let total: u64 = mix.iter().map(|(_, p)| p).sum();
    let mut view = LogView::new(w.pinned.clone());
    let every = (100.0 / sample.clamp(1.0, 100.0)).round().max(1.0) as u64;
    let mut reads = 0u64;
    while Instant::now() < deadline {
        let mut r = pick.next() % total;
        let kind = mix
            .iter()
            .find(|(_, p)| {
                if r < *p {
                    true
                } else {
                    r -= p;
                    false
                }
            })
            .map_or(0, |(k, _)| *k);
        let started = Instant::now();
        match kind {
            0 => {
                let t = &w.targets[pick.below(w.targets.len())];
                reads += 1;
                let full = reads.is_multiple_of(every);
                if full {
                    tally.sampled += 1;
                }
                let o = outcome(read(&w, t, full.then_some(&mut view)).await, &[]);
                tally.add(0, started, o);
            }
            1 => {
                // Each client appends to its own family when there are enough; a shared one may race.
                let t = &w.targets[id % w.targets.len()];
                let o = outcome(append(&w, t).await, &["stale-head"]);
                tally.add(1, started, o);
            }
            2 => {
                let i = pick.below(w.customers.len());
                let mut c = w.customers[i].lock().await;
                let r = c
                    .write(w.prefs[i], Period::ORIGIN, &[&record(1)])
                    .await
                    .map(|_| ());
                tally.add(2, started, outcome(r, &["stale-head"]));
            }
            3 => {
                let i = pick.below(w.customers.len());
                let (company, _) = &w.companies[pick.below(w.companies.len())];
                let mut c = w.customers[i].lock().await;
                let proof = CompanyProof {
                    domain: "bench.invalid".into(),
                    name: "churn".into(),
                    identity: *company,
                };
                let approval = Approval {
                    scopes: vec![(Scope::ProfilePreferences, Access::Read)],
                    lookback_months: 0,
                    families: vec![
                        FamilyName::profile(Scope::ProfilePreferences)
                            .unwrap_or(FamilyName::Profile(Scope::ProfilePreferences)),
                    ],
                    append_family: None,
                };
                let g = c
                    .grant(&proof, "churn", Duration::Persistent, &approval, now())
                    .await;
                let gid = match g {
                    Ok(g) => {
                        tally.add(3, started, Outcome::Ok);
                        g
                    }
                    Err(e) => {
                        tally.add(3, started, outcome(Err(e), &[]));
                        continue;
                    }
                };
                let started = Instant::now();
                let r = c.revoke(gid, "churn", now()).await.map(|_| ());
                tally.add(4, started, outcome(r, &[]));
            }
            _ => {
                let o = outcome(proof(&w, &mut pick).await, &[]);
                tally.add(5, started, o);
            }
        }
    }
    tally
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// Reference figures on this machine, in this run.
struct References {
    aead_ops: f64,
    aead_mb: f64,
    verify_strict: f64,
    healthz: f64,
}

fn aead_reference() -> (f64, f64) {
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    let Ok(key) = UnboundKey::new(&CHACHA20_POLY1305, &[7; 32]) else {
        return (0.0, 0.0);
    };
    let key = LessSafeKey::new(key);
    let mut buf = vec![0u8; 1024];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < StdDuration::from_millis(300) {
        for _ in 0..256 {
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&n.to_le_bytes());
            let _ = key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut buf,
            );
            n += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    (n as f64 / secs, n as f64 * 1024.0 / secs / 1e6)
}

fn verify_reference() -> f64 {
    let key = SigningKey::from_seed(&[9; 32]);
    let vk = key.verifying_key();
    let msg = [0u8; 256];
    let sig = key.sign(&msg);
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < StdDuration::from_millis(300) {
        for _ in 0..64 {
            let _ = vk.verify(&msg, &sig);
            n += 1;
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn healthz_reference(conn: &Connection, clients: usize) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + StdDuration::from_secs(1);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (conn, done) = (conn.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if conn.get_text("/healthz").await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64
}

/// The revocation race, `rounds` times: readers hammer a fresh grant; the customer revokes it, then
/// rotates the family for the keepers. No read may be served at a log position after the revocation.
async fn race(
    w: &Arc<World>,
    args: &BenchArgs,
    conn: &Connection,
    pinned: &NoteVerifier,
) -> Result<Value, ClientError> {
    let t0 = &w.targets[0];
    let (bank, _) = w.companies[t0.company];
    let t = now();
    // The keepers: other companies that keep reading the family through every rotation.
    let mut keepers = Vec::new();
    {
        let mut c = w.customers[0].lock().await;
        let tx = c.transactions_with(&bank);
        for _ in 0..args.keepers {
            let (s, _) = Session::register(conn.clone(), Role::Company, pinned.clone(), t).await?;
            let k = Company::new(s);
            let proof = CompanyProof {
                domain: "bench.invalid".into(),
                name: "keeper".into(),
                identity: k.id(),
            };
            let approval = Approval {
                scopes: vec![(Scope::Transactions, Access::Read)],
                lookback_months: 12,
                families: vec![tx],
                append_family: None,
            };
            c.grant(&proof, "keeper", Duration::Persistent, &approval, t)
                .await?;
            keepers.push(k);
        }
    }
    let (mut served, mut refused, mut violations) = (0u64, 0u64, 0u64);
    let (mut revoke_ms, mut rotate_ms) = (Vec::new(), Vec::new());
    let readers = (args.clients / 2).max(1);
    for _ in 0..args.race_rounds {
        // A fresh grant for the bank, read by the readers until the revocation and a little after.
        let grant = {
            let mut c = w.customers[0].lock().await;
            let tx = c.transactions_with(&bank);
            let proof = CompanyProof {
                domain: "bench.invalid".into(),
                name: "bank".into(),
                identity: bank,
            };
            let approval = Approval {
                scopes: vec![(Scope::Transactions, Access::Read)],
                lookback_months: 12,
                families: vec![tx],
                append_family: None,
            };
            c.grant(&proof, "race", Duration::Persistent, &approval, now())
                .await?
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..readers {
            let (w, stop) = (w.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = signed_read(&w, &w.targets[0], grant, w.month).await;
                    seen.push(
                        r.map(|a: ReadAnswerJson| a.ack.index.unwrap_or(u64::MAX))
                            .map_err(|e| e.code().unwrap_or("other").to_string()),
                    );
                }
                seen
            }));
        }
        tokio::time::sleep(StdDuration::from_millis(200)).await;
        let revocation = {
            let mut c = w.customers[0].lock().await;
            let started = Instant::now();
            let (acked, families) = c.revoke_grant(grant, "race", now()).await?;
            revoke_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            let started = Instant::now();
            for f in families {
                c.rotate(f, now()).await?;
            }
            rotate_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            acked.index
        };
        tokio::time::sleep(StdDuration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            for r in task.await.unwrap_or_default() {
                match r {
                    Ok(index) if index > revocation => violations += 1,
                    Ok(_) => served += 1,
                    Err(code) if code == "grant-revoked" => refused += 1,
                    Err(code) => {
                        return Err(ClientError::Local(format!(
                            "a racing read failed unexpectedly: {code}"
                        )));
                    }
                }
            }
        }
    }
    revoke_ms.sort_by(f64::total_cmp);
    rotate_ms.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(json!({
        "rounds": args.race_rounds,
        "readers": readers,
        "keepers": args.keepers,
        "reads_served_before": served,
        "reads_refused_after": refused,
        "reads_served_after_revocation": violations,
        "revoke_ms": {"p50": pct(&revoke_ms, 0.5), "p99": pct(&revoke_ms, 0.99), "max": revoke_ms.last().copied().unwrap_or(0.0)},
        "rotation_ms": {"p50": pct(&rotate_ms, 0.5), "p99": pct(&rotate_ms, 0.99), "max": rotate_ms.last().copied().unwrap_or(0.0)},
    }))
}

/// Stores `total` records in all (beyond the seeded ones), for the scale curves: a tenth of them (at
/// most 100,000) in earlier months of the family the latency probe reads, the rest spread over the other
/// customers' families; batches of 1,000.
async fn seed_scale(w: &World, total: usize, out: Out) -> Result<(), ClientError> {
    let seeded = w.targets.len() * RECORDS_PER_READ + RECORDS_PER_READ;
    let extra = total.saturating_sub(seeded);
    if extra == 0 {
        return Ok(());
    }
    let in_probe = (extra / 10).min(100_000);
    let content = record(2);
    let bar = indicatif::ProgressBar::new(extra as u64);
    if out.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut left = extra;
    let mut customer = 0;
    let mut batch_no = 0u32;
    while left > 0 {
        // The probe's family first, then round-robin over the others.
        let (i, n) = if extra - left < in_probe {
            (0, (in_probe - (extra - left)).min(1000))
        } else {
            customer = customer % (w.targets.len().max(2) - 1) + 1;
            (customer.min(w.targets.len() - 1), left.min(1000))
        };
        let t = &w.targets[i];
        // Months before the probed one, a thousand records a month.
        batch_no += 1;
        let month = Period(w.month.0.saturating_sub(2 + batch_no % 240));
        let refs: Vec<&[u8]> = (0..n).map(|_| content.as_slice()).collect();
        let mut c = w.customers[i].lock().await;
        let acked = c.write(t.family, month, &refs).await?;
        if let Some(h) = acked.head {
            *t.head.lock().await = h;
        }
        left -= n;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

/// The inclusion proof of one read's access entry: its size in bytes, and the log size it is for.
async fn proof_size(w: &World) -> Result<(usize, u64), ClientError> {
    let t = &w.targets[0];
    let answer: ReadAnswerJson = signed_read(w, t, t.grant, w.month).await?;
    Ok((answer.ack.proof.len() * 32, answer.ack.size))
}

/// Unloaded latency of one client's reads of the probe family's ten records (a scale-curve point).
async fn probe(w: &World, secs: f64) -> Result<(f64, f64, u32), ClientError> {
    let t = &w.targets[0];
    let started = Instant::now();
    let mut l = Vec::new();
    while started.elapsed().as_secs_f64() < secs {
        let one = Instant::now();
        read(w, t, None).await?;
        l.push(one.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    l.sort_unstable();
    Ok((percentile(&l, 0.5), percentile(&l, 0.99), l.len() as u32))
}

/// The log's size, from the latest checkpoint.
async fn log_size(conn: &Connection, pinned: &NoteVerifier) -> Result<u64, ClientError> {
    let note = conn.get_text("/v1/log/checkpoint").await?;
    Ok(cmr_log::checkpoint::open(&note, pinned, &[], 0)
        .map_err(|e| cmr_client::error::VerifyError::Checkpoint(e.to_string()))?
        .checkpoint
        .size)
}

/// The bytes in a folder, recursively.
/// The stored rows of the stopped server's folder, by table: rows and bytes (keys and values) per log
/// entry, over the whole log of `entries` entries. Logical bytes: what the store writes, before sled's
/// own overhead (which the folder's growth shows).
fn table_sizes(data: &std::path::Path, entries: u64) -> Option<Value> {
    let rows = cmr_store::SledStorage::open_folder(data, 16 << 20).ok()?;
    let sizes = cmr_store::layout::table_sizes(&rows).ok()?;
    let per = |n: u64| n as f64 / entries.max(1) as f64;
    let mut tables = serde_json::Map::new();
    for t in &sizes {
        tables.insert(
            cmr_store::layout::table_name(t.tag).to_string(),
            json!({
                "rows_per_entry": per(t.rows),
                "bytes_per_entry": per(t.key_bytes + t.value_bytes),
            }),
        );
    }
    let total: u64 = sizes.iter().map(|t| t.key_bytes + t.value_bytes).sum();
    tables.insert(
        "all".into(),
        json!({"bytes_per_entry": per(total), "entries": entries}),
    );
    Some(Value::Object(tables))
}

fn folder_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|d| {
            d.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => folder_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Runs `cmr bench`.
pub async fn run(out: Out, args: BenchArgs) -> Result {
    let mix = Arc::new(parse_mix(&args.mix)?);
    let (mut child, base, vkey) = match (&args.server, &args.log_vkey) {
        (Some(s), Some(k)) => (None, s.clone(), k.clone()),
        (Some(_), None) => {
            return Err(BenchError::local(
                "--server needs --log-vkey",
                "give the server's log verifier key",
            ));
        }
        (None, _) => {
            let (c, b, k) = spawn_server(
                args.cache_mib,
                args.store.as_deref(),
                args.log_key.as_deref(),
            )?;
            (Some(c), b, k)
        }
    };
    let pid = child.as_ref().map(|c| c.child.id());
    if args.soak && pid.is_none() {
        return Err(BenchError::local(
            "--soak samples the server's process, so it needs the bench's own server",
            "leave out --server (the bench starts `cmr serve` itself, on --store if given)",
        ));
    }
    let conn = Connection::new(&base)?;
    let pinned = NoteVerifier::from_vkey(&vkey)
        .map_err(|e| BenchError::local(e.to_string(), "check --log-vkey"))?;
    out.line(format!(
        "seeding {} customers (ten 1 KiB transactions each) and {} companies on {base}",
        args.customers, args.companies
    ));
    let seeded = Instant::now();
    let w = Arc::new(
        seed(&conn, &pinned, &args)
            .await
            .map_err(|e| BenchError::verification(format!("seeding failed: {e}"), None))?,
    );
    seed_scale(&w, args.stored, out).await.map_err(|e| {
        BenchError::verification(format!("seeding the scale records failed: {e}"), None)
    })?;
    let seed_secs = seeded.elapsed().as_secs_f64();
    let probed = probe(&w, 2.0)
        .await
        .map_err(|e| BenchError::verification(format!("the latency probe failed: {e}"), None))?;
    let (proof_bytes, proof_at) = proof_size(&w)
        .await
        .map_err(|e| BenchError::verification(format!("the proof-size probe failed: {e}"), None))?;
    let data_dir = child.as_ref().map(|c| c._dir.path().join("data"));
    let size_before = log_size(&conn, &pinned).await?;
    let bytes_before = data_dir.as_deref().map(folder_bytes);
    let rss_before = pid.and_then(rss);
    let (aead_ops, aead_mb) = aead_reference();
    let refs = References {
        aead_ops,
        aead_mb,
        verify_strict: verify_reference(),
        healthz: healthz_reference(&conn, args.clients).await,
    };
    let cost = |e: ClientError| {
        BenchError::verification(format!("the client-cost reference failed: {e}"), None)
    };
    let cost_one = client_cost(&w, w.month).await.map_err(cost)?;
    let cost_ten = client_cost(&w, Period(w.month.0 - 1)).await.map_err(cost)?;
    let verify_us = 1e6 / refs.verify_strict;
    out.line(format!(
        "running {} clients for {} s: {}",
        args.clients, args.duration, args.mix
    ));
    let deadline = Instant::now() + StdDuration::from_secs(args.duration);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..args.clients.max(1) {
        tasks.push(tokio::spawn(worker(
            w.clone(),
            id,
            mix.clone(),
            deadline,
            args.sample,
        )));
    }
    // The server's memory, descriptors and threads, once a second while the load runs (a soak reads
    // their slopes).
    let sampler = pid.map(|pid| {
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < deadline {
                if let Some(s) = sample(pid, started.elapsed().as_secs_f64()) {
                    samples.push(s);
                }
                tokio::time::sleep(StdDuration::from_secs(1)).await;
            }
            samples
        })
    });
    let mut tally = Tally::new();
    for t in tasks {
        tally.merge(
            t.await
                .map_err(|e| BenchError::local(e.to_string(), "report this"))?,
        );
    }
    let secs = started.elapsed().as_secs_f64();
    let soak = match sampler {
        Some(task) => soak_report(&task.await.unwrap_or_default()),
        None => None,
    };
    let rss_after = pid.and_then(rss);
    let size_after = log_size(&conn, &pinned).await?;
    let entries = size_after.saturating_sub(size_before);
    let growth = match (bytes_before, data_dir.as_deref().map(folder_bytes)) {
        (Some(b), Some(a)) if entries > 0 => Some(a.saturating_sub(b) as f64 / entries as f64),
        _ => None,
    };
    let race = if args.race_rounds > 0 {
        Some(race(&w, &args, &conn, &pinned).await.map_err(|e| {
            BenchError::verification(format!("the revocation race failed: {e}"), None)
        })?)
    } else {
        None
    };
    // Where the bytes go: the bench's own server on sled is stopped, and its folder's tables counted.
    let log_size_end = log_size(&conn, &pinned).await?;
    let tables = match (child.as_mut(), data_dir.as_deref()) {
        (Some(c), Some(data)) if args.store.is_none() => {
            let _ = c.child.kill();
            let _ = c.child.wait();
            table_sizes(data, log_size_end)
        }
        _ => None,
    };
    let mut kinds = serde_json::Map::new();
    out.line(format!(
        "\n{:<13} {:>9} {:>10} {:>9} {:>9} {:>9}",
        "operation", "ok", "per s", "p50 ms", "p95 ms", "p99 ms"
    ));
    for (k, name) in KINDS.iter().enumerate() {
        let mut l = std::mem::take(&mut tally.latencies[k]);
        l.sort_unstable();
        let rate = tally.ok[k] as f64 / secs;
        let (p50, p95, p99) = (
            percentile(&l, 0.5),
            percentile(&l, 0.95),
            percentile(&l, 0.99),
        );
        if tally.ok[k] > 0 {
            out.line(format!(
                "{name:<13} {:>9} {rate:>10.1} {p50:>9.2} {p95:>9.2} {p99:>9.2}",
                tally.ok[k]
            ));
        }
        kinds.insert(
            name.to_string(),
            json!({"ok": tally.ok[k], "per_s": rate, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99}),
        );
    }
    let reads_per_s = tally.ok[0] as f64 / secs;
    out.line(format!(
        "\nreads fully verified and decrypted (sample): {}",
        tally.sampled
    ));
    out.line(format!("expected refusals: {:?}", tally.expected));
    out.line(format!("errors: {:?}", tally.errors));
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        out.line(format!(
            "server RSS: {:.0} MiB after seeding, {:.0} MiB after the load (peak {:.0} MiB)",
            b.0, a.0, a.1
        ));
    }
    out.line(format!(
        "references (same run): ChaCha20-Poly1305 1 KiB {:.0}/s ({:.0} MB/s); verify_strict {:.0}/s on one core; /healthz {:.0}/s with {} clients",
        refs.aead_ops, refs.aead_mb, refs.verify_strict, refs.healthz, args.clients
    ));
    out.line(format!(
        "reads per second / single-core verify_strict rate: {:.3}",
        reads_per_s / refs.verify_strict
    ));
    out.line(format!(
        "client cost of one verified, decrypted read: {cost_one:.0} µs from one batch ({:.2}× verify_strict), {cost_ten:.0} µs from ten batches ({:.2}×)",
        cost_one / verify_us,
        cost_ten / verify_us
    ));
    out.line(format!(
        "latency probe (one client, the probed family's ten records, {} stored): p50 {:.2} ms, p99 {:.2} ms over {} reads",
        args.stored.max(w.targets.len() * RECORDS_PER_READ),
        probed.0,
        probed.1,
        probed.2
    ));
    out.line(format!(
        "inclusion proof of an access entry: {proof_bytes} bytes at a log of {proof_at} entries"
    ));
    if let Some(g) = growth {
        out.line(format!(
            "log: {entries} entries during the load; the data folder grew {g:.0} bytes per entry, {:.1} GB a day at this rate",
            g * entries as f64 / secs * 86_400.0 / 1e9
        ));
    }
    if let Some(t) = tables.as_ref().and_then(Value::as_object) {
        let mut parts: Vec<(f64, String)> = t
            .iter()
            .filter(|(name, _)| name.as_str() != "all")
            .map(|(name, v)| {
                let b = v["bytes_per_entry"].as_f64().unwrap_or_default();
                (
                    b,
                    format!(
                        "{name} {b:.0} ({:.2} rows)",
                        v["rows_per_entry"].as_f64().unwrap_or_default()
                    ),
                )
            })
            .collect();
        parts.sort_by(|a, b| b.0.total_cmp(&a.0));
        out.line(format!(
            "stored per log entry (logical bytes, keys and values, over all {} entries): {:.0} in all: {}",
            t["all"]["entries"],
            t["all"]["bytes_per_entry"].as_f64().unwrap_or_default(),
            parts.into_iter().map(|p| p.1).collect::<Vec<_>>().join(", ")
        ));
    }
    if let Some(s) = &soak {
        let part = |name: &str, unit: &str| {
            let floor = s[name]["floor_slope_per_min"]
                .as_f64()
                .map(|f| format!(", of its floor {f:+.2}{unit}/min"))
                .unwrap_or_default();
            format!(
                "{name} {:.0} → {:.0}{unit} (slope over the second half {:+.2}{unit}/min{floor})",
                s[name]["start"].as_f64().unwrap_or_default(),
                s[name]["end"].as_f64().unwrap_or_default(),
                s[name]["slope_per_min"].as_f64().unwrap_or_default(),
            )
        };
        out.line(format!(
            "server over the load ({} samples): {}; {}; {}",
            s["samples"],
            part("rss_mib", " MiB"),
            part("fds", ""),
            part("threads", "")
        ));
    }
    if let Some(r) = &race {
        out.line(format!("\nrevocation race: {r}"));
    }
    out.line(format!("(seeding took {seed_secs:.1} s)"));
    let report = json!({
        "server": base,
        "clients": args.clients,
        "duration_s": secs,
        "customers": args.customers,
        "companies": args.companies,
        "mix": args.mix,
        "operations": kinds,
        "sampled_reads": tally.sampled,
        "expected": tally.expected,
        "errors": tally.errors,
        "server_rss_mib": rss_after.map(|r| json!({"after_seeding": rss_before.map(|b| b.0), "after_load": r.0, "peak": r.1})),
        "references": {"aead_1k_per_s": refs.aead_ops, "aead_1k_mb_s": refs.aead_mb, "verify_strict_per_s": refs.verify_strict, "healthz_per_s": refs.healthz},
        "reads_per_verify_strict": reads_per_s / refs.verify_strict,
        "probe": {"stored": args.stored, "p50_ms": probed.0, "p99_ms": probed.1, "reads": probed.2},
        "log": {"entries": entries, "bytes_per_entry": growth, "inclusion_proof_bytes": proof_bytes, "at_size": proof_at, "tables": tables},
        "client_cost_us": {"one_batch": cost_one, "ten_batches": cost_ten, "verify_strict": verify_us},
        "race": race,
        "seed_s": seed_secs,
        "server_over_load": soak,
    });
    out.value(&report);
    drop(child);
    let violations = race
        .as_ref()
        .and_then(|r| r["reads_served_after_revocation"].as_u64())
        .unwrap_or(0);
    if args.soak {
        let slope = |what: &str| {
            soak.as_ref()
                .and_then(|s| s[what]["slope_per_min"].as_f64())
                .unwrap_or(0.0)
        };
        let (fds, threads) = (slope("fds"), slope("threads"));
        if soak.is_none() || fds > 5.0 || threads > 1.0 {
            return Err(BenchError::verification(
                format!(
                    "soak: the server's descriptors grew {fds:+.2}/min and threads {threads:+.2}/min over the second half"
                ),
                Some("a leak of connections, files or threads: see the report above"),
            ));
        }
    }
    if !tally.errors.is_empty() || violations > 0 {
        return Err(BenchError::verification(
            format!(
                "{} unexpected errors, {violations} reads served after a revocation",
                tally.errors.values().sum::<u64>()
            ),
            Some("see the report above"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(fds: impl Fn(usize) -> f64) -> Vec<Sample> {
        samples_over(60, fds)
    }

    /// `n` samples a second apart, the series in `fds` (the floor does not care which resource).
    fn samples_over(n: usize, fds: impl Fn(usize) -> f64) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                at: i as f64,
                rss_mib: 0.0,
                fds: fds(i),
                threads: 0.0,
            })
            .collect()
    }

    #[test]
    fn descriptors_that_swing_with_connections_are_flat_and_a_leak_is_not() {
        // Connections come and go: dozens up and down, the floor flat.
        let swinging = samples(|i| {
            if i % 7 < 3 {
                80.0
            } else {
                80.0 + (i % 5) as f64 * 6.0
            }
        });
        assert!(floor_slope_per_minute(&swinging, 10, |s| s.fds).abs() < 1.0);
        // One descriptor lost every six seconds: ten a minute, under the same swings.
        let leaking = samples(|i| 80.0 + (i / 6) as f64 + if i % 7 < 3 { 0.0 } else { 20.0 });
        let slope = floor_slope_per_minute(&leaking, 10, |s| s.fds);
        assert!((8.0..12.0).contains(&slope), "{slope}");
    }

    #[test]
    fn memory_that_swings_with_answers_in_flight_has_a_flat_floor_and_a_leak_does_not() {
        // Tens of MiB up for tens of seconds at a time (answers in flight), over a flat floor.
        let swinging = samples_over(1200, |i| {
            170.0 + if i % 97 < 40 { 25.0 } else { (i % 3) as f64 }
        });
        assert!(floor_slope_per_minute(&swinging, 60, |s| s.fds).abs() < 0.5);
        // Half a MiB a minute lost under the same swings.
        let leaking = samples_over(1200, |i| {
            170.0 + i as f64 / 120.0 + if i % 97 < 40 { 25.0 } else { 0.0 }
        });
        let slope = floor_slope_per_minute(&leaking, 60, |s| s.fds);
        assert!((0.4..0.6).contains(&slope), "{slope}");
    }
}
