//! A few requests over a real socket on 127.0.0.1, and a graceful shutdown.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use std::io::{Read, Write};
use std::sync::Arc;

use cmr_core::keys::SigningKey;
use cmr_log::note::{NoteSigner, TYPE_ED25519};
use cmr_server::{AppState, Config, serve};
use cmr_store::{Store, StoreConfig};

fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A server on a store in a new folder (kept while the server runs), on a free port: its address, the
/// sender that stops it, and its task.
async fn start() -> (
    tempfile::TempDir,
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    start_with(Config::default()).await
}

/// [`start`] with `config`.
async fn start_with(
    config: Config,
) -> (
    tempfile::TempDir,
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let dir = tempfile::tempdir().unwrap();
    let key = NoteSigner::new(
        "vault.test/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[1; 32]),
    )
    .unwrap();
    let mut cfg = StoreConfig::new(dir.path(), key);
    cfg.cache_capacity = 16 * 1024 * 1024;
    let store = Arc::new(Store::open(cfg).unwrap());
    let state = Arc::new(AppState::new(store, config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    (dir, addr, stop, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_a_socket_and_shuts_down_gracefully() {
    let (_dir, addr, stop, server) = start().await;
    let health = tokio::task::spawn_blocking(move || get(addr, "/healthz"))
        .await
        .unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let missing = tokio::task::spawn_blocking(move || get(addr, "/v1/log/checkpoint"))
        .await
        .unwrap();
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert!(missing.contains("application/problem+json"));
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the server still listens after shutdown"
    );
}

#[test]
fn the_log_key_file_is_private_and_outside_the_data_folder() {
    use cmr_server::logkey::{LogKeyError, create, load};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cmr-data");
    std::fs::create_dir(&data).unwrap();
    let key_path = dir.path().join("log.key");
    let created = create(&key_path, Some(&data), "vault.test/log").unwrap();
    assert_eq!(
        std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let loaded = load(&key_path, Some(&data)).unwrap();
    assert_eq!(loaded.verifier(), created.verifier());
    // Never overwritten, never inside the data folder, never readable by others.
    assert!(matches!(
        create(&key_path, Some(&data), "vault.test/log"),
        Err(LogKeyError::Io(_))
    ));
    assert!(matches!(
        create(&data.join("log.key"), Some(&data), "vault.test/log"),
        Err(LogKeyError::InsideDataFolder)
    ));
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        load(&key_path, Some(&data)),
        Err(LogKeyError::Permissions(_))
    ));
}

/// A generic RFC 9421 client written in Python (tests/interop/rfc9421_client.py) calls the API over a
/// socket: the customer reads their own history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_rfc9421_client_in_python_calls_the_api() {
    use cmr_core::identity::{DeviceKeys, Role, create_identity};
    use cmr_store::Op;
    let dir = tempfile::tempdir().unwrap();
    let key = NoteSigner::new(
        "vault.test/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[1; 32]),
    )
    .unwrap();
    let mut cfg = StoreConfig::new(dir.path(), key);
    cfg.cache_capacity = 16 * 1024 * 1024;
    let store = Arc::new(Store::open(cfg).unwrap());
    let mut rng = rand::rng();
    let customer = create_identity(&mut rng, Role::Customer);
    let id = customer.inception.identity();
    let device = DeviceKeys::generate(&mut rng);
    let cert = device.certify(id, 0, &customer.identity_key, 0);
    for op in [Op::Register(customer.inception), Op::Certify(cert)] {
        store.submit(op).await.unwrap().unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        authority: addr.to_string(),
        scheme: "http".into(),
        ..Config::default()
    };
    let state = Arc::new(AppState::new(store, config));
    // The server refuses requests created within 5 s of its start (the replay horizon).
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/interop/rfc9421_client.py"
    );
    let seed = hex::encode(*device.signing.seed());
    let path = format!("/v1/vaults/{}/history", id.to_hex());
    let keyid = device.id().to_hex();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, &addr.to_string(), &path, &seed, &keyid])
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs (CI installs the `cryptography` package)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("200"),
        "python client: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("\"kind\":\"device-certificate\""),
        "{stdout}"
    );
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// Exhaustion at the connection: a request head past the limit gets 431 and the connection closes; a
/// client that trickles its headers (slowloris) is cut off after the header deadline; a keep-alive
/// connection left idle, or one that never sends a byte, is closed after it too. Other clients are
/// served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_heads_get_431_and_slow_or_idle_connections_are_closed() {
    let (_dir, addr, stop, server) = start().await;
    let checks = tokio::task::spawn_blocking(move || {
        let big = format!(
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(cmr_server::MAX_HEAD_BYTES * 2)
        );
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(big.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");

        // Until it is closed, how long a connection stays open after `sent`.
        let open_for = move |sent: &[u8]| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(sent).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
                .unwrap();
            let started = std::time::Instant::now();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            (
                started.elapsed(),
                String::from_utf8_lossy(&buf).into_owned(),
            )
        };
        let limit = cmr_server::HEADER_READ_TIMEOUT;
        // Meanwhile, a connection that sends nothing at all.
        let silent = std::thread::spawn(move || open_for(b"").0);
        let (slow, _) = open_for(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        assert!(
            slow >= limit - std::time::Duration::from_secs(1)
                && slow < limit + std::time::Duration::from_secs(5),
            "a trickled head was cut off after {slow:?}"
        );
        let (idle, answered) = open_for(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
        assert!(
            idle < limit + std::time::Duration::from_secs(5),
            "an idle keep-alive connection stayed open {idle:?}"
        );
        let silent = silent.join().unwrap();
        assert!(
            silent >= limit - std::time::Duration::from_secs(1)
                && silent < limit + std::time::Duration::from_secs(5),
            "a connection that sent nothing was closed after {silent:?}"
        );
        get(addr, "/healthz")
    })
    .await
    .unwrap();
    assert!(checks.starts_with("HTTP/1.1 200"), "{checks}");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// Past the cap on open connections a new one is answered 503 `unavailable` at once and closed, while
/// those open are served; once they close there is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_a_new_connection_gets_503_and_room_comes_back() {
    let config = Config {
        max_connections: 16,
        ..Config::default()
    };
    let (_dir, addr, stop, server) = start_with(config).await;
    let checks = tokio::task::spawn_blocking(move || {
        // Sixteen keep-alive connections, each having been served once.
        let mut held: Vec<std::net::TcpStream> = (0..16)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                write!(s, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).unwrap();
                assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
                s
            })
            .collect();
        let refused = get(addr, "/healthz");
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.contains("retry-after: 1"), "{refused}");
        assert!(refused.contains("unavailable"), "{refused}");
        // Those open are still served.
        write!(held[0], "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        let n = held[0].read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.clear();
        // The server sees them close a moment later.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let answer = get(addr, "/healthz");
            if answer.starts_with("HTTP/1.1 200") {
                return answer;
            }
            assert!(std::time::Instant::now() < deadline, "{answer}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(checks.starts_with("HTTP/1.1 200"), "{checks}");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// An HTTP/2 connection with no stream open has no request head to time out: it is closed once
/// nothing moved on it for the idle timeout (here 1 s), so such connections cannot pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let config = Config {
        idle_timeout: std::time::Duration::from_secs(1),
        ..Config::default()
    };
    let (_dir, addr, stop, server) = start_with(config).await;
    let lasted = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        // The HTTP/2 preface and an empty SETTINGS frame, then nothing.
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        // The server spoke HTTP/2 (its own SETTINGS frame, type 4), then closed.
        assert!(buf.len() >= 9 && buf[3] == 4, "{buf:?}");
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(
        lasted >= std::time::Duration::from_millis(900)
            && lasted < std::time::Duration::from_secs(5),
        "an idle HTTP/2 connection stayed open {lasted:?}"
    );
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
