//! A company's domain proof under attack: the document a domain serves is fetched and checked before any
//! approval, so a hostile or broken domain must give a clear refusal — never a proof for something the
//! domain did not say. A canned HTTP server on 127.0.0.1 plays the domain (plain http is the explicit
//! test mode; `Mode::Tls` against it fails).
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use cmr_client::ClientError;
use cmr_client::error::VerifyError;
use cmr_client::wellknown::{Mode, fetch};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Serves `response` (status line, headers and body, as raw bytes) to every connection; returns the
/// `host:port` to fetch.
async fn domain(response: Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    // Not plain HTTP (a TLS client hello): hang up, as a plain server would.
                    if !b"GET ".starts_with(&got[..got.len().min(4)]) {
                        return;
                    }
                }
                let _ = sock.write_all(&response).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    addr.to_string()
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn refused(e: ClientError) -> String {
    match e {
        ClientError::Verification(VerifyError::CompanyIdentity(m)) => m,
        other => panic!("not a domain-proof refusal: {other}"),
    }
}

const ID: &str = "11c9ca66193a4f17cc0e4bd13f0523d16cb32a9e088c7ed63e1b90bc8f124c8c";

#[tokio::test]
async fn a_good_document_gives_exactly_what_it_says() {
    let d = domain(ok(&format!(r#"{{"identity":"{ID}","name":"Bank"}}"#))).await;
    let proof = fetch(&d, Mode::InsecureTestHttp).await.unwrap();
    assert_eq!(proof.identity.to_hex(), ID);
    assert_eq!(
        (proof.domain.as_str(), proof.name.as_str()),
        (d.as_str(), "Bank")
    );
    assert_eq!(proof.fingerprint(), "11c9 ca66 193a 4f17");
}

#[tokio::test]
async fn hostile_or_broken_documents_are_refused() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", ok("<html>hello</html>"), "does not parse"),
        (
            "an extra field",
            ok(&format!(r#"{{"identity":"{ID}","name":"Bank","keys":[]}}"#)),
            "does not parse",
        ),
        (
            "an identity that is not 64 hex digits",
            ok(r#"{"identity":"11c9ca66","name":"Bank"}"#),
            "not 64 hex digits",
        ),
        ("no identity", ok(r#"{"name":"Bank"}"#), "does not parse"),
        (
            "a redirect to another host",
            b"HTTP/1.1 302 Found\r\nlocation: http://evil.invalid/.well-known/cmr-vault\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
            "answered 302",
        ),
        (
            "not found",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
            "answered 404",
        ),
        (
            "a document over 16 KiB",
            ok(&format!(r#"{{"identity":"{ID}","name":"{}"}}"#, "B".repeat(20_000))),
            "larger than 16 KiB",
        ),
    ];
    for (what, response, says) in cases {
        let d = domain(response).await;
        let m = refused(fetch(&d, Mode::InsecureTestHttp).await.unwrap_err());
        assert!(m.contains(says), "{what}: {m}");
    }
}

#[tokio::test]
async fn a_domain_that_is_not_a_bare_host_is_refused_before_any_request() {
    for bad in [
        "",
        "bank.example/evil",
        "bank.example?x=1",
        "user@bank.example",
        "bank.example#frag",
        "bank example",
    ] {
        let m = refused(fetch(bad, Mode::InsecureTestHttp).await.unwrap_err());
        assert!(m.contains("is not a domain"), "{bad:?}: {m}");
    }
}

#[tokio::test]
async fn plain_http_is_not_a_domain_proof_outside_test_mode() {
    let d = domain(ok(&format!(r#"{{"identity":"{ID}","name":"Bank"}}"#))).await;
    let m = refused(fetch(&d, Mode::Tls).await.unwrap_err());
    assert!(m.contains("cannot fetch"), "{m}");
}
