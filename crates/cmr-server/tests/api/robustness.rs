//! Bad input and load: floods, panics, malformed paths and bodies, timeouts in doubt.

use crate::common::*;

#[tokio::test]
async fn a_flood_from_one_company_gets_429_while_others_are_served() {
    let mut f = flow().await;
    let path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let body = json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()});
    let mut limited = 0;
    for _ in 0..60 {
        let (s, v) = f
            .env
            .call("POST", &path, body.clone(), Signer::Device(&f.acme.device))
            .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(v["type"], "urn:cmr-vault:problem:rate-limited");
            limited += 1;
        }
    }
    assert!(limited > 0, "the flood was never limited");
    // The customer is still served.
    let own = json!({"from": "2025-06", "to": "2026-12"});
    let (s, v) = f
        .env
        .call("POST", &path, own, Signer::Device(&f.customer.device))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[test]
fn no_input_makes_a_handler_panic_or_answer_500() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let f = rt.block_on(flow());
    let customer = f.customer.id.to_hex();
    let family = f.tx.to_hex();
    let paths = [
        "/v1/identities".to_string(),
        format!("/v1/identities/{customer}/devices"),
        format!("/v1/identities/{customer}/rotate"),
        format!("/v1/vaults/{customer}/directory"),
        format!("/v1/vaults/{customer}/statements"),
        format!("/v1/vaults/{customer}/families/{family}/batches"),
        format!("/v1/vaults/{customer}/families/{family}/read"),
        "/v1/log/entries/0".to_string(),
    ];
    let env = std::sync::Mutex::new(f.env);
    let device = f.customer.device;
    proptest!(ProptestConfig::with_cases(64), |(which in 0usize..8, body in "\\PC{0,200}", field in "[a-z]{1,10}", value in "\\PC{0,80}", signed in any::<bool>())| {
        let json_body = if body.len() % 2 == 0 { json!({ field: value }) } else { Value::String(body.clone()) };
        let mut env = env.lock().unwrap();
        let req = if signed {
            env.request("POST", &paths[which], &json_body, Signer::Device(&device), 0)
        } else {
            Request::post(paths[which].as_str()).header("host", "vault.test").body(Body::from(body.clone())).unwrap()
        };
        let (status, _) = rt.block_on(env.send(req));
        prop_assert!(status.as_u16() < 500, "{} on {}", status, paths[which]);
    });
}

/// A read whose months run backwards gets 400 and changes nothing; the server stays healthy and keeps
/// taking writes (the read once panicked inside the sequencer, after which every write got 503 while
/// `/healthz` still said ok).
#[tokio::test]
async fn a_backwards_read_gets_400_and_the_server_carries_on() {
    let mut f = flow().await;
    let path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let before = f.env.store.checkpoint().unwrap();
    for (who, body) in [
        (0, json!({"from": "2026-12", "to": "2025-01"})),
        (
            1,
            json!({"from": "2026-12", "to": "2025-01", "grant": f.grant.to_hex()}),
        ),
    ] {
        let device = if who == 0 {
            &f.customer.device
        } else {
            &f.acme.device
        };
        let (s, v) = f
            .env
            .call("POST", &path, body, Signer::Device(device))
            .await;
        assert_eq!(
            (s, v["type"].as_str().unwrap_or_default()),
            (StatusCode::BAD_REQUEST, "urn:cmr-vault:problem:malformed"),
            "{v}"
        );
    }
    assert_eq!(f.env.store.checkpoint().unwrap(), before);
    let resp = f
        .env
        .app
        .clone()
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let w = customer_writes_one(&mut f, 40).await;
    assert_eq!(w.0, StatusCode::OK, "{}", w.1);
}

/// A write that runs past the server's timeout is answered 503 `in-doubt` (it may still be queued in the
/// store), not a plain failure; sent again, it is logged exactly once.
#[tokio::test]
async fn a_write_past_the_timeout_is_in_doubt_and_logged_once_when_sent_again() {
    let mut f = flow().await;
    let statements = format!("/v1/vaults/{}/statements", f.customer.id.to_hex());
    // The same store behind a server with a 1 s timeout, on a paused clock: once the handler waits for
    // the store, the runtime is idle and the clock jumps past the timeout while the write is queued.
    let normal = f.env.app.clone();
    let c = f.env.clock.clone();
    f.env.app = app(Arc::new(AppState::with_clock(
        f.env.store.clone(),
        Config {
            authority: "vault.test".into(),
            scheme: "http".into(),
            timeout: std::time::Duration::from_secs(1),
            ..Config::default()
        },
        Arc::new(move || c.load(Ordering::SeqCst)),
    )));
    // On a loaded machine the store may answer before the runtime goes idle: try a few requests.
    let mut in_doubt = None;
    for attempt in 0..5 {
        let req = statement(
            &f.acme,
            f.customer.id,
            StBody::Request(AccessRequest {
                scopes: vec![(Scope::Transactions, Access::Read)],
                purpose: format!("look {attempt}"),
                duration: Duration::OneTime,
                lookback_months: 3,
                counterparty: Counterparty::OnlyRequester,
            }),
            None,
        );
        let body = json!({"statement": B64.encode(req.encode())});
        tokio::time::pause();
        let (s, v) = f
            .env
            .call(
                "POST",
                &statements,
                body.clone(),
                Signer::Device(&f.acme.device),
            )
            .await;
        tokio::time::resume();
        if s == StatusCode::OK {
            continue;
        }
        assert_eq!(
            (s, v["type"].as_str().unwrap_or_default()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "urn:cmr-vault:problem:in-doubt"
            ),
            "{v}"
        );
        in_doubt = Some((req, body));
        break;
    }
    let (req, body) = in_doubt.expect("no request ran past the timeout in five tries");
    // Sent again to the normal server: one result, and the statement is in the log once.
    f.env.app = normal;
    let (s, v) = f
        .env
        .call(
            "POST",
            &statements,
            body.clone(),
            Signer::Device(&f.acme.device),
        )
        .await;
    // It had been applied after the 503: the server recognises it.
    assert_eq!(
        (s, v["repeated"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{v}"
    );
    let index = v["index"].as_u64().unwrap();
    let size = f.env.store.checkpoint().unwrap().unwrap();
    let size: u64 = size.lines().nth(1).unwrap().parse().unwrap();
    let logged = (0..size)
        .filter(|i| {
            let b = f.env.store.body(*i).unwrap().unwrap();
            cmr_log::entry::EntryBody::decode(&b.body).unwrap().payload == req.encode()
        })
        .collect::<Vec<_>>();
    assert_eq!(logged, vec![index]);
}

#[tokio::test]
async fn malformed_paths_queries_unknown_routes_and_methods_are_problem_details() {
    let mut f = flow().await;
    let problem = |v: &Value| v["type"].as_str().unwrap_or_default().to_string();
    for (method, path, status, code) in [
        ("GET", "/v1/log/commitments?from=x&to=2", 400, "malformed"),
        ("GET", "/v1/log/commitments", 400, "malformed"),
        (
            "GET",
            "/v1/log/proofs/inclusion?index=-1&size=2",
            400,
            "malformed",
        ),
        ("GET", "/v1/log/proofs/consistency?old=1", 400, "malformed"),
        ("GET", "/v1/no/such/route", 404, "not-found"),
        ("DELETE", "/v1/log/checkpoint", 405, "method-not-allowed"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "vault.test")
            .body(Body::empty())
            .unwrap();
        let resp = f.env.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/problem+json",
            "{method} {path}"
        );
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            problem(&v),
            format!("urn:cmr-vault:problem:{code}"),
            "{method} {path}"
        );
    }
    // A signed request to a path whose number does not parse.
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/log/entries/seven",
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(problem(&v), "urn:cmr-vault:problem:malformed");
}

/// `/metrics` counts what an operator monitors — requests by route template and status, refusals by
/// code, group commits and syncs, the log's size — in the Prometheus text format, and names no party.
/// `/healthz` (liveness) and `/readyz` (the store takes operations) both say ok.
#[tokio::test]
async fn metrics_count_requests_refusals_and_commits_and_name_no_party() {
    let mut f = flow().await;
    let w = customer_writes_one(&mut f, 41).await;
    assert_eq!(w.0, StatusCode::OK, "{}", w.1);
    // A refused read (months backwards): counted under its code.
    let path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &path,
            json!({"from": "2026-12", "to": "2025-01"}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    for route in ["/healthz", "/readyz"] {
        let resp = f
            .env
            .app
            .clone()
            .oneshot(Request::get(route).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{route}");
    }
    let resp = f
        .env
        .app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()[axum::http::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in:\n{text}"))
    };
    assert_eq!(
        value(
            "cmr_http_requests_total{route=\"/v1/vaults/{customer}/families/{family}/read\",method=\"POST\",status=\"400\"}"
        ),
        1.0
    );
    assert_eq!(value("cmr_refusals_total{code=\"malformed\"}"), 1.0);
    assert!(value("cmr_store_group_operations_count") >= 1.0);
    assert!(value("cmr_store_sync_seconds_count") >= 1.0);
    assert_eq!(value("cmr_store_stopped_total"), 0.0);
    let size = cmr_log::checkpoint::Checkpoint::parse_text(
        &cmr_log::note::Note::parse(&f.env.store.checkpoint().unwrap().unwrap())
            .unwrap()
            .text,
    )
    .unwrap()
    .size;
    assert_eq!(value("cmr_log_entries "), size as f64);
    // In whole MiB: the exact size would show what one compressed entry repeated of another.
    let unit = cmr_server::metrics::STORE_BYTES_UNIT;
    let shown = value("cmr_store_size_bytes ") as u64;
    let on_disk = f.env.store.size_on_disk().unwrap().unwrap();
    assert_eq!(shown % unit, 0, "{shown}");
    // Read after the scrape (sled may have grown its files since): within a unit or two.
    assert!(
        shown <= on_disk && on_disk - shown < 2 * unit,
        "{shown} {on_disk}"
    );
    assert!(value("cmr_process_resident_memory_bytes ") > 1e6);
    // A oneshot test serves no connection.
    assert_eq!(value("cmr_http_connections "), 0.0);
    // Routes by template, never by id.
    for id in [f.customer.id.to_hex(), f.acme.id.to_hex(), f.tx.to_hex()] {
        assert!(!text.contains(&id), "a party's id in /metrics");
    }
}
