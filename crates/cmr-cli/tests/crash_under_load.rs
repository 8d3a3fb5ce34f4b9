//! Crash under load, end to end. The real `cmr serve` carries a mixed load from SDK clients — customers
//! writing records, granting, revoking (sometimes leaving the rotation for later) and rotating; a bank
//! reading and appending under its grant; a company whose grants come and go reading under them — and is
//! killed with SIGKILL at a random moment, then started again on the same folder and port, over and over.
//! Requests in flight at the kill are sent again by the SDK (same bytes, signed afresh) once the server is
//! back.
//!
//! After every restart, checked from the outside with what the clients kept:
//! - every acknowledged write is in the log at the index it was acknowledged with, and the checkpoint
//!   that acknowledged it is a prefix of today's log (its root recomputed from the public commitments);
//! - every client's view (all checkpoints it saw, acknowledgements included) is consistent with the
//!   restarted server's checkpoint, and each customer's chain holds every entry it was acknowledged;
//! - a write sent again gives one result: no statement or batch is logged twice, and re-sending an
//!   acknowledged statement returns its original index;
//! - revoked grants stay revoked, and an append to a family whose rotation is pending is still refused;
//! - an auditor following the log since the start finds no violation.
//!
//! Rounds: `CMR_SERVER_KILLS` (5 by default on sled, 28 on PostgreSQL, where every fourth round restarts
//! the database instead of killing a server; the full runs in docs/reliability.md use 50). Seed:
//! `CMR_CRASH_SEED` (printed).
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant, SystemTime, UNIX_EPOCH};

use cmr_client::company::Company;
use cmr_client::customer::{Approval, Customer};
use cmr_client::error::VerifyError;
use cmr_client::session::{Acked, Session};
use cmr_client::wellknown::CompanyProof;
use cmr_client::{ClientError, Connection};
use cmr_core::consent::{
    Access, AccessRequest, Counterparty, Duration, SignedStatement, StatementId,
};
use cmr_core::family::{FamilyId, FamilyName, Period, PseudonymKey, Scope};
use cmr_core::hash::sha256;
use cmr_core::identity::{IdentityId, Role};
use cmr_core::merkle::CompactRange;
use cmr_log::auditor::Auditor;
use cmr_log::entry::{EntryKind, commitment, commitment_leaf};
use cmr_log::note::NoteVerifier;

/// A running `cmr serve`, killed with SIGKILL when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    /// Starts `cmr serve` on `dir` and `port` (retrying while the port is still held by the process
    /// just killed), over the data folder in `dir` or the database `store`. Returns the server and its
    /// log verifier key.
    fn start(dir: &Path, port: u16, store: Option<&str>) -> (Server, String) {
        for _ in 0..100 {
            let mut child = Command::new(env!("CARGO_BIN_EXE_cmr"))
                .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .args(store.map(|s| vec!["--store", s]).unwrap_or_default())
                // The load is a few very busy identities on purpose.
                .args([
                    "--rate-per-identity",
                    "1000000",
                    "--burst-per-identity",
                    "1000000",
                ])
                .arg("--data")
                .arg(dir.join("data"))
                .arg("--log-key")
                .arg(dir.join("log.key"))
                .env("RUST_LOG", "error")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let (mut serving, mut vkey) = (false, None);
            for line in lines.by_ref() {
                let line = line.unwrap_or_default();
                serving |= line.starts_with("CMR Vault serving ");
                if let Some(k) = line.strip_prefix("log verifier key (clients pin it): ") {
                    vkey = Some(k.trim().to_string());
                }
                if serving && vkey.is_some() {
                    break;
                }
            }
            if let (true, Some(vkey)) = (serving, vkey) {
                // The server's error log goes on to the test's output, for when a run fails.
                std::thread::spawn(move || {
                    for line in lines.map_while(Result::ok) {
                        eprintln!("server: {line}");
                    }
                });
                return (Server(child), vkey);
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(StdDuration::from_millis(100));
        }
        panic!("cmr serve did not start");
    }

    /// SIGKILL, and wait until the process is gone.
    fn kill_9(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn month() -> Period {
    Period::from_unix(now() as i64).unwrap()
}

/// xorshift64*: reproducible from the printed seed.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A customer's vault as the load sees it.
struct Vault {
    c: Customer,
    tx_name: FamilyName,
    tx: FamilyId,
    pref: FamilyId,
    /// Grants to the churning company, not revoked.
    active: Vec<StatementId>,
    /// Grants whose revocation was acknowledged.
    revoked: Vec<StatementId>,
    /// Families whose rotation is owed: a revocation was acknowledged, the rotation not yet.
    pending: Vec<FamilyId>,
}

/// The bank: read and append under one grant per vault.
struct Bank {
    co: Company,
    grants: Vec<(IdentityId, StatementId, FamilyId)>,
}

/// Outcomes by operation: successes, the refusals the workload expects, and everything else.
#[derive(Default)]
struct Tally {
    ok: BTreeMap<&'static str, u64>,
    expected: BTreeMap<String, u64>,
    unexpected: Vec<String>,
    /// The last outcome was "unreachable": the server is down, so the load waits a little.
    down: bool,
    /// The database was crashed on purpose: servers answer "unavailable" until they reconnected, and
    /// a read whose answer was lost is in doubt (never "internal").
    database_down: bool,
}

impl Tally {
    fn note(&mut self, op: &'static str, r: Result<(), ClientError>, expected: &[&str]) {
        self.down = matches!(r, Err(ClientError::Transport(_)));
        match r {
            Ok(()) => *self.ok.entry(op).or_default() += 1,
            Err(e) => {
                let kind = kind(&e);
                // A request made while the server is down never reaches it (the SDK fails at once
                // when it cannot connect, and sends again only what may have arrived).
                let database =
                    self.database_down && matches!(kind.as_str(), "unavailable" | "in-doubt");
                if expected.contains(&kind.as_str()) || kind == "unreachable" || database {
                    *self.expected.entry(format!("{op}: {kind}")).or_default() += 1;
                } else {
                    self.unexpected.push(format!("{op}: {e}"));
                }
            }
        }
    }
}

/// A refusal's code; a record that does not open yet because its epoch's key arrives with the next
/// sync is `keys-not-synced`.
fn kind(e: &ClientError) -> String {
    match e {
        ClientError::Refused { code, .. } => code.clone(),
        ClientError::Verification(VerifyError::Read(m)) if m.starts_with("record ") => {
            "keys-not-synced".into()
        }
        // The same, said by the SDK when the reader was never given the key: with several servers, the
        // sync before the read may have come from a server that had not yet followed the customer's
        // newest key bundle (it does within 100 ms), while the read itself, logged, followed first.
        ClientError::Local(m) if m.contains("sealed under a key this reader does not hold") => {
            "keys-not-synced".into()
        }
        ClientError::Transport(_) => "unreachable".into(),
        // A company's read under a grant is logged, so the SDK does not send it again when its answer is
        // lost. A write in doubt would be a failure of the retry: it is not expected anywhere.
        ClientError::InDoubt(_) => "in-doubt".into(),
        other => other.to_string(),
    }
}

type Shared = Arc<Mutex<Tally>>;

/// While the server is down, a client tries again every 20 ms rather than spinning.
async fn pause_if_down(tally: &Shared) {
    let down = tally.lock().unwrap().down;
    if down {
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
}

async fn customer_load(
    mut v: Vault,
    churn: IdentityId,
    stop: Arc<AtomicBool>,
    seed: u64,
    tally: Shared,
) -> Vault {
    let mut dice = Dice(seed | 1);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        pause_if_down(&tally).await;
        i += 1;
        let content = format!("record {seed:x}/{i}");
        match dice.below(10) {
            0..=2 => {
                let r =
                    v.c.write(v.pref, Period::ORIGIN, &[content.as_bytes()])
                        .await;
                tally
                    .lock()
                    .unwrap()
                    .note("customer write", r.map(drop), &[]);
            }
            3..=4 => {
                let r = v.c.write(v.tx, month(), &[content.as_bytes()]).await;
                // The bank appends to the same family: one of two racing writers is stale. A family
                // whose rotation is owed takes no records until it is rotated.
                tally.lock().unwrap().note(
                    "customer write",
                    r.map(drop),
                    &["stale-head", "rotation-pending"],
                );
            }
            5..=6 => {
                let proof = CompanyProof {
                    domain: "crash.invalid".into(),
                    name: "churn".into(),
                    identity: churn,
                };
                let approval = Approval {
                    scopes: vec![(Scope::Transactions, Access::Read)],
                    lookback_months: 1,
                    families: vec![v.tx_name],
                    append_family: None,
                };
                let r =
                    v.c.grant(
                        &proof,
                        &format!("churn {i}"),
                        Duration::Persistent,
                        &approval,
                        now(),
                    )
                    .await;
                if let Ok(g) = &r {
                    v.active.push(*g);
                }
                tally.lock().unwrap().note("grant", r.map(drop), &[]);
            }
            7..=8 if !v.active.is_empty() => {
                let g = v.active.remove(0);
                let r = v.c.revoke_grant(g, "crash test", now()).await;
                if let Ok((_, families)) = &r {
                    v.revoked.push(g);
                    for f in families {
                        if !v.pending.contains(f) {
                            v.pending.push(*f);
                        }
                    }
                }
                tally.lock().unwrap().note("revoke", r.map(drop), &[]);
            }
            _ if !v.pending.is_empty() && dice.below(2) == 0 => {
                let f = v.pending[0];
                let r = v.c.rotate(f, now()).await;
                if r.is_ok() {
                    v.pending.retain(|p| *p != f);
                }
                tally.lock().unwrap().note("rotate", r.map(drop), &[]);
            }
            _ => {}
        }
    }
    v
}

async fn bank_load(mut b: Bank, stop: Arc<AtomicBool>, seed: u64, tally: Shared) -> Bank {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for (customer, grant, family) in b.grants.clone() {
            pause_if_down(&tally).await;
            i += 1;
            let r = b.co.sync(customer).await;
            tally.lock().unwrap().note("company sync", r, &[]);
            let read = b.co.read(grant, family, month(), month()).await;
            let head = match read {
                Ok((head, _)) => {
                    tally.lock().unwrap().note("company read", Ok(()), &[]);
                    head
                }
                Err(e) => {
                    let r = Err(e);
                    tally
                        .lock()
                        .unwrap()
                        .note("company read", r, &["keys-not-synced", "in-doubt"]);
                    continue;
                }
            };
            let content = format!("bank {seed:x}/{i}");
            let r =
                b.co.append(grant, &head, month(), &[content.as_bytes()])
                    .await;
            // Racing the customer's own writes (stale head), a revocation whose rotation is owed
            // (rotation pending), and a rotation not yet synced (stale epoch).
            tally.lock().unwrap().note(
                "company append",
                r.map(drop),
                &["stale-head", "rotation-pending", "stale-epoch"],
            );
        }
    }
    b
}

async fn churn_load(
    mut co: Company,
    customers: Vec<(IdentityId, FamilyId)>,
    stop: Arc<AtomicBool>,
    tally: Shared,
) -> Company {
    while !stop.load(Ordering::Relaxed) {
        for (customer, tx) in &customers {
            pause_if_down(&tally).await;
            let r = co.sync(*customer).await;
            tally.lock().unwrap().note("churn sync", r, &[]);
            let newest = co
                .grants
                .values()
                .filter(|g| g.customer == *customer && !g.revoked)
                .max_by_key(|g| g.statement.statement().issued_at)
                .map(|g| g.id);
            if let Some(g) = newest {
                let r = co.read(g, *tx, month(), month()).await.map(drop);
                // Revoked between the sync and the read.
                tally.lock().unwrap().note(
                    "churn read",
                    r,
                    &["grant-revoked", "keys-not-synced", "in-doubt"],
                );
            }
        }
    }
    co
}

/// Everything the clients were acknowledged, with who.
struct Receipts(Vec<Acked>);

impl Receipts {
    fn take(&mut self, s: &mut Session) {
        self.0.append(&mut s.take_receipts());
    }
}

async fn fetch_commitments(conn: &Connection, size: u64) -> Vec<cmr_core::hash::Digest> {
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let from = out.len() as u64;
        let to = (from + 1000).min(size);
        let v = conn
            .get_json(&format!("/v1/log/commitments?from={from}&to={to}"))
            .await
            .unwrap();
        for c in v["commitments"].as_array().unwrap() {
            let bytes = cmr_client::session::Session::field(c, "commitment").unwrap();
            out.push(cmr_core::hash::Digest(bytes.try_into().unwrap()));
        }
    }
    out
}

/// Figures of a whole run.
#[derive(Default)]
struct Run {
    kills: usize,
    database_crashes: usize,
    acknowledged: usize,
    repeated: usize,
    resent_again: usize,
    revoked_checked: usize,
    pending_checked: usize,
    audited: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_is_lost_when_the_server_is_killed_under_load() {
    crash_under_load(None, 1).await;
}

/// The same on PostgreSQL with two `cmr serve` processes on one database (`CMR_CRASH_SERVERS` for
/// another number), the clients spread over them:
/// one of them is killed at random each round, and every fourth round the database itself restarts
/// under the load, alternately crashing (`pg_ctl stop -m immediate`) and as an operator restarts it
/// (`-m fast`); the servers stay up and come back by themselves. On a real
/// PostgreSQL (skipped with a note when it is not installed, unless `CMR_REQUIRE_POSTGRES` is set).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_is_lost_when_servers_or_the_database_crash_under_load() {
    let Some(cluster) = cmr_postgres::cluster::Cluster::start().unwrap() else {
        eprintln!("skipped: PostgreSQL is not installed");
        return;
    };
    cluster.create_database("crash").unwrap();
    let servers = std::env::var("CMR_CRASH_SERVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    crash_under_load(Some(cluster), servers).await;
}

/// The servers of a run: their ports, and the running processes.
struct Fleet {
    servers: Vec<(Option<Server>, u16)>,
}

async fn crash_under_load(cluster: Option<cmr_postgres::cluster::Cluster>, servers: usize) {
    // On PostgreSQL, enough rounds by default for 21 server kills and 7 database restarts.
    let kills: usize = std::env::var("CMR_SERVER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cluster.is_some() { 28 } else { 5 });
    let seed: u64 = std::env::var("CMR_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| now() ^ u64::from(std::process::id()) << 32);
    println!("crash under load: {kills} rounds, {servers} server(s), CMR_CRASH_SEED={seed}");
    let mut dice = Dice(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let store = cluster.as_ref().map(|c| {
        format!(
            "postgresql://cmr@localhost/crash?host={}",
            c.socket_dir().display()
        )
    });
    let mut fleet = Fleet {
        servers: Vec::new(),
    };
    let mut vkey = String::new();
    for _ in 0..servers {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (server, key) = Server::start(dir.path(), port, store.as_deref());
        vkey = key;
        fleet.servers.push((Some(server), port));
    }
    let pinned = NoteVerifier::from_vkey(&vkey).unwrap();
    // One connection per server; the parties are spread over them.
    let conns: Vec<Connection> = fleet
        .servers
        .iter()
        .map(|(_, port)| Connection::new(&format!("http://127.0.0.1:{port}")).unwrap())
        .collect();
    let conn = conns[0].clone();
    let every_conn = conns.clone();
    let mut next_conn = 0;
    let mut spread = move || {
        next_conn += 1;
        conns[next_conn % conns.len()].clone()
    };
    let t = now();

    // The parties: two customers, a bank granted read and append on each one's transactions with it, a
    // company whose grants the customers issue and revoke under load, and an auditor.
    let session = |role, conn: Connection| {
        let pinned = pinned.clone();
        async move {
            let (mut s, _) = Session::register(conn, role, pinned, now()).await.unwrap();
            s.keep_receipts();
            s
        }
    };
    let mut bank = Bank {
        co: Company::new(session(Role::Company, spread()).await),
        grants: Vec::new(),
    };
    let mut churn = Company::new(session(Role::Company, spread()).await);
    let mut auditor_session = session(Role::Auditor, conn.clone()).await;
    // The operator admits the auditor with the log key (kept beside the data folder here).
    let log_key = std::fs::read_to_string(dir.path().join("log.key")).unwrap();
    let log_key = cmr_log::note::NoteSigner::from_skey(log_key.trim()).unwrap();
    let admission = cmr_log::admission::Admission {
        auditor: auditor_session.keys.identity,
        admit: true,
        time: now(),
    };
    cmr_client::auditor::submit_admission(&conn, &admission.sign(&log_key))
        .await
        .unwrap();
    let mut auditor = Auditor::new(pinned.clone());
    let mut vaults = Vec::new();
    for _ in 0..2 {
        let mut c = Customer::new(
            session(Role::Customer, spread()).await,
            PseudonymKey::generate(&mut rand::rng()),
        );
        let tx_name = c.transactions_with(&bank.co.id());
        let pref_name = FamilyName::profile(Scope::ProfilePreferences).unwrap();
        c.declare(&[tx_name, pref_name], t).await.unwrap();
        let req = bank
            .co
            .request(
                c.id(),
                AccessRequest {
                    scopes: vec![(Scope::Transactions, Access::ReadAppend)],
                    purpose: "statements".into(),
                    duration: Duration::Persistent,
                    lookback_months: 1,
                    counterparty: Counterparty::OnlyRequester,
                },
                t,
            )
            .await
            .unwrap();
        // Through another server than the bank's, the request shows once that server has followed the
        // shared log (within 100 ms).
        let mut pending = c.pending().await.unwrap();
        for _ in 0..50 {
            if pending.iter().any(|p| p.statement.id() == req) {
                break;
            }
            tokio::time::sleep(StdDuration::from_millis(20)).await;
            pending = c.pending().await.unwrap();
        }
        let p = pending.iter().find(|p| p.statement.id() == req).unwrap();
        let proof = CompanyProof {
            domain: "crash.invalid".into(),
            name: "bank".into(),
            identity: bank.co.id(),
        };
        let approval = Approval {
            scopes: vec![(Scope::Transactions, Access::ReadAppend)],
            lookback_months: 1,
            families: vec![tx_name],
            append_family: Some(tx_name),
        };
        let g = c.approve(p, &proof, &approval, t).await.unwrap();
        let (tx, pref) = (c.family_id(&tx_name), c.family_id(&pref_name));
        bank.grants.push((c.id(), g, tx));
        vaults.push(Vault {
            c,
            tx_name,
            tx,
            pref,
            active: Vec::new(),
            revoked: Vec::new(),
            pending: Vec::new(),
        });
    }
    let customers: Vec<(IdentityId, FamilyId)> = vaults.iter().map(|v| (v.c.id(), v.tx)).collect();

    let tally: Shared = Arc::default();
    let mut receipts = Receipts(Vec::new());
    let mut run = Run::default();
    let started = Instant::now();
    for round in 0..kills {
        // Load, then SIGKILL at a random moment; the server comes back at once on the same port while the
        // clients' requests in flight wait to be sent again.
        let stop = Arc::new(AtomicBool::new(false));
        let mut customer_tasks = Vec::new();
        for v in vaults.drain(..) {
            let (stop, tally) = (stop.clone(), tally.clone());
            let s = dice.next();
            customer_tasks.push(tokio::spawn(customer_load(v, churn.id(), stop, s, tally)));
        }
        let bank_task = tokio::spawn(bank_load(bank, stop.clone(), dice.next(), tally.clone()));
        let churn_task = tokio::spawn(churn_load(
            churn,
            customers.clone(),
            stop.clone(),
            tally.clone(),
        ));
        tokio::time::sleep(StdDuration::from_millis(200 + dice.below(1300))).await;
        let database_crash = cluster.is_some() && round % 4 == 3;
        let victims: Vec<usize> = if database_crash {
            // The database stops like a crash under the load: the servers stop taking writes (what
            // they wrote and had not made durable may be gone; none of it was acknowledged), then
            // reconnect and rebuild from the database by themselves, while the clients retry.
            // Every other time, an operator's restart instead (`pg_ctl stop -m fast`).
            tally.lock().unwrap().database_down = true;
            let cluster = cluster.as_ref().unwrap();
            if run.database_crashes % 2 == 0 {
                cluster.crash_and_restart().unwrap();
            } else {
                cluster.fast_restart().unwrap();
            }
            run.database_crashes += 1;
            Vec::new()
        } else {
            vec![dice.below(fleet.servers.len() as u64) as usize]
        };
        for &i in &victims {
            fleet.servers[i].0.take().unwrap().kill_9();
            run.kills += 1;
        }
        for &i in &victims {
            let port = fleet.servers[i].1;
            let (restarted, again) = Server::start(dir.path(), port, store.as_deref());
            fleet.servers[i].0 = Some(restarted);
            assert_eq!(again, vkey, "the log key changed across a restart");
        }
        tokio::time::sleep(StdDuration::from_millis(dice.below(300))).await;
        stop.store(true, Ordering::Relaxed);
        for task in customer_tasks {
            vaults.push(task.await.unwrap());
        }
        bank = bank_task.await.unwrap();
        churn = churn_task.await.unwrap();
        tally.lock().unwrap().database_down = false;
        {
            let t = tally.lock().unwrap();
            assert!(
                t.unexpected.is_empty(),
                "round {round}: unexpected failures under load: {:#?}",
                t.unexpected
            );
        }

        if database_crash {
            // The servers stay up across the database's crash: each reconnects and rebuilds by
            // itself once the database answers again, and says so on /readyz.
            for c in &every_conn {
                let mut healthy = false;
                for _ in 0..300 {
                    if c.get_text("/readyz").await.is_ok() {
                        healthy = true;
                        break;
                    }
                    tokio::time::sleep(StdDuration::from_millis(100)).await;
                }
                assert!(
                    healthy,
                    "round {round}: a server did not come back after the database did"
                );
            }
        }
        // Every client's view is consistent with the restarted server's checkpoint.
        for v in &mut vaults {
            v.c.session.refresh().await.unwrap();
            receipts.take(&mut v.c.session);
        }
        bank.co.session.refresh().await.unwrap();
        churn.session.refresh().await.unwrap();
        receipts.take(&mut bank.co.session);
        receipts.take(&mut churn.session);
        // Another server than the auditor's acknowledged some of them: its server shows them once it has
        // followed the shared log (within 100 ms).
        let acknowledged = receipts.0.iter().map(|r| r.checkpoint.size).max();
        let mut latest = auditor_session.refresh().await.unwrap();
        for _ in 0..50 {
            if Some(latest.size) >= acknowledged {
                break;
            }
            tokio::time::sleep(StdDuration::from_millis(20)).await;
            latest = auditor_session.refresh().await.unwrap();
        }

        // Every acknowledged write is where it was acknowledged, under a checkpoint that is a prefix of
        // today's log: the roots are recomputed from the public commitments.
        let commitments = fetch_commitments(&conn, latest.size).await;
        let mut sizes: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, r) in receipts.0.iter().enumerate() {
            assert!(
                r.checkpoint.size <= latest.size,
                "an acknowledged checkpoint is gone"
            );
            sizes.entry(r.checkpoint.size).or_default().push(i);
        }
        let mut range = CompactRange::default();
        for (i, c) in commitments.iter().enumerate() {
            range.push(commitment_leaf(c));
            for &r in sizes
                .get(&(i as u64 + 1))
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                assert_eq!(
                    range.root(),
                    receipts.0[r].checkpoint.root,
                    "round {round}: the checkpoint that acknowledged entry {} is not a prefix of the log",
                    receipts.0[r].index
                );
            }
        }
        assert_eq!(
            range.root(),
            latest.root,
            "the commitments do not make the checkpoint"
        );
        let mut once: HashMap<cmr_core::hash::Digest, u64> = HashMap::new();
        for r in &receipts.0 {
            assert_eq!(
                commitments[r.index as usize],
                commitment(&r.salted.salt, &r.salted.body),
                "round {round}: acknowledged entry {} changed or is gone",
                r.index
            );
            // A statement or a batch is logged once, whatever the retries.
            if matches!(r.body.kind, EntryKind::Statement | EntryKind::FamilyHead) {
                let first = *once.entry(sha256(&r.body.payload)).or_insert(r.index);
                assert_eq!(first, r.index, "round {round}: a write was logged twice");
            }
        }
        run.acknowledged = receipts.0.len();
        run.repeated = receipts.0.iter().filter(|r| r.repeated).count();

        for v in &mut vaults {
            // The customer's chain holds every entry it was acknowledged (the SDK checks), and no signed
            // write twice.
            let chain = v.c.history().await.unwrap();
            let mut seen = HashMap::new();
            for e in chain
                .iter()
                .filter(|e| matches!(e.body.kind, EntryKind::Statement | EntryKind::FamilyHead))
            {
                if let Some(other) = seen.insert(sha256(&e.body.payload), e.index) {
                    panic!(
                        "round {round}: entries {other} and {} log the same write",
                        e.index
                    );
                }
            }
            // Sending an acknowledged statement again gives its original index.
            if let Some(r) = receipts
                .0
                .iter()
                .rev()
                .find(|r| r.body.kind == EntryKind::Statement && r.body.subject == v.c.id())
            {
                let st = SignedStatement::decode(&r.body.payload).unwrap();
                let again = v.c.send_statement(&st).await.unwrap();
                assert_eq!(
                    again.index, r.index,
                    "round {round}: a statement sent again got a new index"
                );
                assert!(
                    again.repeated,
                    "round {round}: a statement sent again was not recognised"
                );
                run.resent_again += 1;
            }
            let _ = v.c.session.take_receipts();
        }

        // Revoked grants stay revoked.
        for v in &vaults {
            churn.sync(v.c.id()).await.unwrap();
            for g in v.revoked.iter().rev().take(3) {
                let r = churn.read(*g, v.tx, month(), month()).await;
                assert_eq!(
                    r.as_ref().err().and_then(ClientError::code),
                    Some("grant-revoked"),
                    "round {round}: a revoked grant was served after a restart"
                );
                run.revoked_checked += 1;
            }
        }
        // A rotation owed stays owed: the bank's append to the family is refused.
        for v in &vaults {
            if !v.pending.contains(&v.tx) {
                continue;
            }
            let (customer, grant, family) =
                *bank.grants.iter().find(|(c, _, _)| *c == v.c.id()).unwrap();
            bank.co.sync(customer).await.unwrap();
            let head = match bank.co.read(grant, family, month(), month()).await {
                Ok((head, _)) => head,
                Err(e) if kind(&e) == "keys-not-synced" => continue,
                Err(e) => panic!("round {round}: the bank's read failed: {e}"),
            };
            let r = bank
                .co
                .append(grant, &head, month(), &[b"while the rotation is owed"])
                .await;
            assert_eq!(
                r.as_ref().err().and_then(ClientError::code),
                Some("rotation-pending"),
                "round {round}: an append went through while a rotation was owed"
            );
            run.pending_checked += 1;
        }
        let _ = bank.co.session.take_receipts();
        let _ = churn.session.take_receipts();

        // The auditor, following the log since the start, finds nothing wrong.
        let report = cmr_client::auditor::audit(&mut auditor, &auditor_session).unwrap();
        assert!(
            report.is_clean(),
            "round {round}: the auditor found {:#?}",
            report.violations
        );
        run.audited = report.size;
    }
    let t = tally.lock().unwrap();
    let resent: u64 = every_conn.iter().map(Connection::resent).sum();
    // With four clients busy, some request is in flight at almost every kill: the retry path ran.
    assert!(
        kills < 3 || resent > 0,
        "no request was ever in flight at a kill"
    );
    println!(
        "crash under load: {} server kills and {} database restarts (every other one a crash) in {:.1} s; {} writes acknowledged ({} answered as repeats of a \
         write logged before the kill), {} requests sent again after a lost answer, {} statements \
         re-sent for their original index, {} reads under revoked grants refused, {} appends refused \
         while a rotation was owed, auditor clean at {} entries",
        run.kills,
        run.database_crashes,
        started.elapsed().as_secs_f64(),
        run.acknowledged,
        run.repeated,
        resent,
        run.resent_again,
        run.revoked_checked,
        run.pending_checked,
        run.audited
    );
    println!("successes: {:?}", t.ok);
    println!("expected refusals: {:?}", t.expected);
}
