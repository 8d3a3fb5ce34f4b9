//! Reads through the company gateway against the SDK's own reads, in the same run.
//!
//! `cargo bench -p cmr-cli --bench gateway` starts a vault (`cmr serve` over sled), a customer with a
//! hundred transactions, a company holding a grant on them, and `cmr company gateway` for it. Then, in
//! alternating rounds, the company reads the whole family: once through the SDK in this process (the
//! reference: what a Rust backend gets), once through the gateway's JSON API (what a backend in any
//! language gets). Every read is logged and proven complete either way. It prints each round and the
//! medians, and the ratio (the target: the gateway at 70 % of the SDK or better).
#![allow(clippy::unwrap_used, clippy::print_stdout)] // A benchmark's driver: a panic is a failed run.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const PASSPHRASE: &str = "amber-quarry-lantern-nimbus-71";
const ROWS: usize = 100;
const READS: usize = 100;
const ROUNDS: usize = 5;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cmr(home: &Path, server: &str, vkey: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cmr"))
        .arg("--home")
        .arg(home)
        .env("CMR_PASSPHRASE", PASSPHRASE)
        .env("CMR_SERVER", server)
        .env("CMR_LOG_VKEY", vkey)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cmr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Starts `cmr ARGS` and returns it with the first `lines` lines it printed.
fn start(args: &[&str], env: &[(&str, &str)], lines: usize) -> (Kill, Vec<String>) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cmr"));
    c.args(args)
        .env("CMR_PASSPHRASE", PASSPHRASE)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Vec<String> = (0..lines).map(|_| out.next().unwrap().unwrap()).collect();
    std::thread::spawn(move || for _ in out {});
    (Kill(child), first)
}

/// Serves one key document over plain http (the company's domain, in the explicit test mode).
fn domain(doc: String) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{doc}",
                doc.len()
            );
        }
    });
    addr
}

/// The company as its configuration folder holds it, opened for the SDK (what `cmr company` does).
fn company(home: &Path, server: &str, vkey: &str) -> cmr_client::company::Company {
    let sealed = std::fs::read(home.join("company/identity.key")).unwrap();
    let c = cmr_core::keyfile::open(&sealed, PASSPHRASE).unwrap();
    let keys = cmr_client::session::Keys {
        identity: c.identity,
        role: c.role,
        device: c.device,
        identity_key: c.identity_key,
    };
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("company/state.json")).unwrap()).unwrap();
    let saved: cmr_client::state::CompanyState =
        serde_json::from_value(state["role"].clone()).unwrap();
    let session = cmr_client::session::Session::new(
        cmr_client::transport::Connection::new(server).unwrap(),
        keys,
        cmr_log::note::NoteVerifier::from_vkey(vkey).unwrap(),
    );
    saved.restore(session).unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes its own flags (`--bench`); this driver takes none.
    let dir = tempfile::tempdir().unwrap();
    let (_server, said) = start(
        &[
            "serve",
            "--data",
            dir.path().join("data").to_str().unwrap(),
            "--log-key",
            dir.path().join("log.key").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        // A load test raises the per-identity rate limit (the company reads back to back).
        &[("CMR_RATE", "100000"), ("CMR_BURST", "100000")],
        2,
    );
    let server = said[0].rsplit_once(" on ").unwrap().1.trim().to_string();
    let vkey = said[1].rsplit_once(": ").unwrap().1.trim().to_string();
    let (alex, bank) = (dir.path().join("alex"), dir.path().join("bank"));
    cmr(&alex, &server, &vkey, &["customer", "init"]);
    cmr(&alex, &server, &vkey, &["customer", "register"]);
    cmr(&bank, &server, &vkey, &["company", "init"]);
    cmr(&bank, &server, &vkey, &["company", "register"]);
    let bank_id = cmr(&bank, &server, &vkey, &["company", "id"])
        .trim()
        .to_string();
    let doc = cmr(
        &bank,
        &server,
        &vkey,
        &["company", "key-document", "--name", "Acme Bank"],
    );
    let bank_domain = domain(doc);
    let month = cmr_core::family::Period::from_unix(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
    )
    .unwrap();
    let csv: String = (0..ROWS)
        .map(|i| format!("{month},purchase {i} {}.{:02}\n", 3 + i % 40, i % 100))
        .collect();
    std::fs::write(dir.path().join("rows.csv"), csv).unwrap();
    cmr(
        &alex,
        &server,
        &vkey,
        &[
            "customer",
            "tx",
            "import",
            "--company",
            &bank_id,
            dir.path().join("rows.csv").to_str().unwrap(),
        ],
    );
    let granted: serde_json::Value = serde_json::from_str(&cmr(
        &alex,
        &server,
        &vkey,
        &[
            "--json",
            "customer",
            "grant",
            "--company",
            &bank_id,
            "--domain",
            &bank_domain,
            "--scope",
            "transactions:read",
            "--purpose",
            "benchmark",
            "--insecure-http-for-tests",
        ],
    ))
    .unwrap();
    let grant = granted["grant"].as_str().unwrap().to_string();
    cmr(&bank, &server, &vkey, &["company", "status"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    // The SDK's company, from the folder as `cmr company` left it, before the gateway holds it.
    let mut sdk = company(&bank, &server, &vkey);
    let gid = cmr_core::consent::StatementId(cmr_core::hash::Digest::from_hex(&grant).unwrap().0);
    let held = sdk.grants.get(&gid).unwrap();
    let g = held.grant().unwrap();
    let family = g.families[0].family;
    let from = g.lookback_start;

    let (_gateway, said) = start(
        &[
            "--home",
            bank.to_str().unwrap(),
            "company",
            "gateway",
            "--listen",
            "127.0.0.1:0",
        ],
        &[("CMR_SERVER", &server), ("CMR_LOG_VKEY", &vkey)],
        1,
    );
    let gateway = said[0]
        .rsplit_once("listening on ")
        .unwrap()
        .1
        .trim()
        .to_string();
    let token = std::fs::read_to_string(bank.join("gateway.token"))
        .unwrap()
        .trim()
        .to_string();
    let http = reqwest::Client::new();
    let url = format!("{gateway}/v1/grants/{grant}/read");

    println!(
        "reads of a family of {ROWS} records, {READS} a round, one at a time (each logged and proven complete)"
    );
    println!("round   SDK reads/s   gateway reads/s   gateway/SDK");
    let (mut sdk_rates, mut gw_rates) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for round in 0..=ROUNDS {
            let t = Instant::now();
            for _ in 0..READS {
                let (_, records) = sdk.read(gid, family, from, month).await.unwrap();
                assert_eq!(records.len(), ROWS);
            }
            let sdk_rate = READS as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..READS {
                let answer = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(r#"{"scope":"transactions"}"#)
                    .send()
                    .await
                    .unwrap();
                assert!(answer.status().is_success(), "{}", answer.status());
                let v: serde_json::Value =
                    serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
                assert_eq!(v["records"].as_array().unwrap().len(), ROWS);
            }
            let gw_rate = READS as f64 / t.elapsed().as_secs_f64();
            // Round 0 warms both up and is not counted.
            if round == 0 {
                continue;
            }
            println!(
                "{round:>5}   {sdk_rate:>11.1}   {gw_rate:>15.1}   {:>11.2}",
                gw_rate / sdk_rate
            );
            sdk_rates.push(sdk_rate);
            gw_rates.push(gw_rate);
        }
    });
    let (s, g) = (median(sdk_rates), median(gw_rates));
    println!(
        "median  {s:>11.1}   {g:>15.1}   {:>11.2}   (target: 0.70 or more)",
        g / s
    );
}
