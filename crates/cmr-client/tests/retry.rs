//! A write whose answer is lost: the request reaches the server and is logged, then the connection breaks
//! before the answer comes back (a crash, a cut). A TCP proxy in front of a real server plays the cut.
//! The SDK sends the same bytes again, signed afresh; the server recognises them and answers with the
//! original index, so the write is logged exactly once (PRODUCT.md, "Requests": idempotent writes).
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use cmr_client::Connection;
use cmr_client::company::Company;
use cmr_client::customer::{Approval, Customer};
use cmr_client::session::Session;
use cmr_client::wellknown::CompanyProof;
use cmr_core::consent::{Access, Duration};
use cmr_core::family::{FamilyName, Period, PseudonymKey, Scope};
use cmr_core::identity::Role;
use cmr_log::entry::EntryKind;
use common::now;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The proxy's listener, and a server that verifies requests signed for the proxy's address (as a
/// deployment behind a reverse proxy is configured with its public authority).
async fn behind_a_proxy(dir: &std::path::Path) -> (TcpListener, common::Server) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap().to_string();
    let server = common::serve_configured(dir, "retry.test/log", 9, Arc::new(now), |c| {
        c.authority = front;
    })
    .await;
    (listener, server)
}

/// Forwards every connection to `upstream`. While `cut` is above zero, the answer to a request whose first
/// line names `path_part` is swallowed: the request goes through whole, the server answers (so it has
/// logged the write), and the client's connection is closed instead of receiving that answer — or, with
/// `instead`, receives those bytes in its place.
async fn proxy(
    listener: TcpListener,
    upstream: String,
    path_part: &'static str,
    cut: Arc<AtomicUsize>,
    instead: Option<Arc<String>>,
) -> String {
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let (upstream, cut, instead) = (upstream.clone(), cut.clone(), instead.clone());
            tokio::spawn(async move {
                let server = TcpStream::connect(&upstream).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let swallow = Arc::new(AtomicBool::new(false));
                let answers = {
                    let swallow = swallow.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                // The server answered: the write is logged; the client never hears.
                                Ok(_) if swallow.load(Ordering::SeqCst) => {
                                    if let Some(bytes) = &instead {
                                        let _ = cw.write_all(bytes.as_bytes()).await;
                                    }
                                    return;
                                }
                                Ok(n) => {
                                    if cw.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    })
                };
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let first_line = buf[..n].split(|b| *b == b'\n').next().unwrap_or_default();
                    if first_line.starts_with(b"POST ")
                        && first_line
                            .windows(path_part.len())
                            .any(|w| w == path_part.as_bytes())
                        && cut
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                            .is_ok()
                    {
                        swallow.store(true, Ordering::SeqCst);
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                answers.abort();
            });
        }
    });
    addr
}

/// A real server behind a proxy that cuts the answers to requests naming `path_part` while the
/// returned counter is above zero: the server, the proxy's address and the counter.
async fn cutting_proxy(
    dir: &std::path::Path,
    path_part: &'static str,
    instead: Option<Arc<String>>,
) -> (common::Server, String, Arc<AtomicUsize>) {
    let (listener, server) = behind_a_proxy(dir).await;
    let upstream = server.conn.base().trim_start_matches("http://").to_string();
    let cut = Arc::new(AtomicUsize::new(0));
    let front = proxy(listener, upstream, path_part, cut.clone(), instead).await;
    (server, front, cut)
}

/// Alex, registered through `conn`, with the contact family declared.
async fn alex_with_contact(
    conn: &Connection,
    server: &common::Server,
) -> (Customer, cmr_core::family::FamilyId) {
    let (s, _) = Session::register(conn.clone(), Role::Customer, server.pinned.clone(), now())
        .await
        .unwrap();
    let mut alex = Customer::new(s, PseudonymKey::generate(&mut rand::rng()));
    let contact = FamilyName::profile(Scope::ProfileContact).unwrap();
    alex.declare(&[contact], now()).await.unwrap();
    let fam = alex.family_id(&contact);
    (alex, fam)
}

/// Alex writes a batch through a proxy that cuts its first answer (or, with `instead`, puts those bytes in
/// its place). The SDK must send the batch again, once; the server must recognise the repeat; the chain
/// must hold the batch exactly once, at the acknowledged index, and it must read back.
async fn a_batch_whose_first_answer_is_lost(instead: Option<Arc<String>>) {
    let dir = tempfile::tempdir().unwrap();
    let (server, front, cut) = cutting_proxy(dir.path(), "/batches", instead).await;
    let conn = Connection::new(&format!("http://{front}")).unwrap();
    let (mut alex, fam) = alex_with_contact(&conn, &server).await;
    let before = server.store.checkpoint().unwrap();

    // The batch reaches the server, is logged, and its answer is lost once.
    cut.store(1, Ordering::SeqCst);
    let acked = alex
        .write(fam, Period::ORIGIN, &[b"email: alex@example.org"])
        .await
        .unwrap();
    assert_eq!(cut.load(Ordering::SeqCst), 0, "the answer was not cut");
    assert_eq!(conn.resent(), 1, "the SDK did not send it again");
    assert!(acked.repeated, "the server did not recognise the repeat");
    assert_ne!(server.store.checkpoint().unwrap(), before);

    // Logged exactly once, at the acknowledged index, and readable.
    let chain = alex.history().await.unwrap();
    let batches: Vec<u64> = chain
        .iter()
        .filter(|e| e.body.kind == EntryKind::FamilyHead)
        .map(|e| e.index)
        .collect();
    assert_eq!(batches, vec![acked.index]);
    let records = alex
        .read(fam, Period::ORIGIN, Period::ORIGIN)
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_answer_was_lost_is_sent_again_and_logged_once() {
    a_batch_whose_first_answer_is_lost(None).await;
}

/// A key backup is a compare-and-swap on its version: sent again after it landed it would be refused as a
/// conflict, so its lost answer is reported as in doubt at once, and nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_whose_answer_was_lost_is_in_doubt_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let (server, front, cut) = cutting_proxy(dir.path(), "/backup ", None).await;
    let conn = Connection::new(&format!("http://{front}")).unwrap();
    let (s, _) = Session::register(conn.clone(), Role::Customer, server.pinned.clone(), now())
        .await
        .unwrap();
    let mut alex = Customer::new(s, PseudonymKey::generate(&mut rand::rng()));
    let vault = cmr_core::vault::VaultKey::generate(&mut rand::rng());
    let backup = cmr_client::state::KeyBackup::seal(
        0,
        "wrap".into(),
        &cmr_client::state::CustomerState::save(&alex, &vault),
        &vault,
        alex.id(),
    );
    cut.store(1, Ordering::SeqCst);
    let e = alex.put_backup(&backup, 1).await.unwrap_err();
    assert!(matches!(e, cmr_client::ClientError::InDoubt(_)), "{e}");
    assert_eq!(conn.resent(), 0);
    // It had landed: version 1 is stored, and a second put of version 1 is the conflict a retry would
    // have met.
    let stored = Customer::get_backup(&alex.session).await.unwrap().unwrap();
    assert_eq!(stored.0, 1);
    let again = alex.put_backup(&backup, 1).await.unwrap_err();
    assert_eq!(again.code(), Some("backup-conflict"), "{again}");
}

/// A server that does not know whether it applied a write (it timed out while the write was queued, or
/// the store failed while making it durable) answers 503 `in-doubt`. The SDK treats that like a lost
/// answer: it sends the write again, and gets the original result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_answered_in_doubt_is_sent_again_and_logged_once() {
    let problem = r#"{"type":"urn:cmr-vault:problem:in-doubt","title":"in-doubt","status":503,"detail":"the request took too long; it may or may not have been applied: send it again to know"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{problem}",
        problem.len()
    );
    a_batch_whose_first_answer_is_lost(Some(Arc::new(answer))).await;
}

/// Alex, with a record written, rotates the family; the completion reaches the server and is logged,
/// and its answer never comes back (the SDK's retries are off).
struct LostRotation {
    _dir: tempfile::TempDir,
    server: common::Server,
    conn: Connection,
    alex: Customer,
    fam: cmr_core::family::FamilyId,
    /// The epoch before the rotation, and the one the log holds after it.
    before: u64,
    logged: u64,
}

async fn a_rotation_whose_answer_is_lost() -> LostRotation {
    let dir = tempfile::tempdir().unwrap();
    let (server, front, cut) = cutting_proxy(dir.path(), "/statements", None).await;
    let conn = Connection::new(&format!("http://{front}"))
        .unwrap()
        .with_retry(std::time::Duration::ZERO);
    let (mut alex, fam) = alex_with_contact(&conn, &server).await;
    alex.write(fam, Period::ORIGIN, &[b"before the rotation"])
        .await
        .unwrap();
    let before = alex.consent().await.unwrap().epoch(&fam).unwrap();

    // The completion reaches the server and is logged; its answer never comes back.
    cut.store(1, Ordering::SeqCst);
    let e = alex.rotate(fam, now()).await.unwrap_err();
    assert!(matches!(e, cmr_client::ClientError::InDoubt(_)), "{e}");
    assert_eq!(cut.load(Ordering::SeqCst), 0, "the answer was not cut");
    let logged = alex.consent().await.unwrap().epoch(&fam).unwrap();
    assert_eq!(logged, before + 1, "the rotation was not logged");
    LostRotation {
        _dir: dir,
        server,
        conn,
        alex,
        fam,
        before,
        logged,
    }
}

/// A rotation whose completion is logged while its answer is lost, and the SDK gives up on it (retries
/// off here; under load, a database that stays down past the retry budget): the client still writes
/// under the old epoch. The next write is refused `stale-epoch`; the SDK reads the family's epoch from the
/// customer's verified chain, holds that epoch's secret (kept before the directory naming it was
/// published), moves to it and writes again. The record lands under the new epoch and reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_whose_answer_was_lost_is_followed_at_the_next_write() {
    let LostRotation {
        _dir,
        server: _server,
        conn: _conn,
        mut alex,
        fam,
        before,
        logged,
    } = a_rotation_whose_answer_is_lost().await;

    // The next write follows the logged epoch, and both records open.
    alex.write(fam, Period::ORIGIN, &[b"after the rotation"])
        .await
        .unwrap();
    let records = alex
        .read(fam, Period::ORIGIN, Period::ORIGIN)
        .await
        .unwrap();
    let mut opened: Vec<(&[u8], u64)> = records
        .iter()
        .map(|r| (r.content.as_slice(), r.epoch))
        .collect();
    opened.sort();
    assert_eq!(
        opened,
        vec![
            (&b"after the rotation"[..], logged),
            (&b"before the rotation"[..], before)
        ]
    );
}

/// The same lost rotation, met by a grant rather than a write: the grant names the family's epoch, so it
/// is refused `stale-epoch` (seen under load in the crash harness, a database crash round); the SDK moves
/// to the logged epoch and grants again. The company then opens the records of both epochs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_whose_answer_was_lost_is_followed_at_the_next_grant() {
    let LostRotation {
        _dir,
        server,
        conn,
        mut alex,
        fam,
        before: _,
        logged,
    } = a_rotation_whose_answer_is_lost().await;

    // The grant follows the logged epoch; the company reads what was written before the rotation.
    let (s, _) = Session::register(conn.clone(), Role::Company, server.pinned.clone(), now())
        .await
        .unwrap();
    let mut shop = Company::new(s);
    let contact = FamilyName::profile(Scope::ProfileContact).unwrap();
    let grant = alex
        .grant(
            &CompanyProof {
                domain: "retry.invalid".into(),
                name: "shop".into(),
                identity: shop.id(),
            },
            "deliveries",
            Duration::Persistent,
            &Approval {
                scopes: vec![(Scope::ProfileContact, Access::Read)],
                lookback_months: 0,
                families: vec![contact],
                append_family: None,
            },
            now(),
        )
        .await
        .unwrap();
    let consent = alex.consent().await.unwrap();
    let families = &consent.grant(&grant).expect("the grant is live").families;
    assert_eq!(
        families[0].epoch, logged,
        "the grant names the logged epoch"
    );

    alex.write(fam, Period::ORIGIN, &[b"after the rotation"])
        .await
        .unwrap();
    shop.sync(alex.id()).await.unwrap();
    let (_, records) = shop
        .read(grant, fam, Period::ORIGIN, Period::ORIGIN)
        .await
        .unwrap();
    let mut opened: Vec<&[u8]> = records.iter().map(|r| r.content.as_slice()).collect();
    opened.sort();
    assert_eq!(opened, [&b"after the rotation"[..], b"before the rotation"]);
}
