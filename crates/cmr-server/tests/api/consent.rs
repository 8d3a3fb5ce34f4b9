//! Consent over HTTP: expiry at the server clock, blocks, other companies' grants, one-time grants, request floods.

use crate::common::*;

#[tokio::test]
async fn an_expired_grant_at_the_server_clock() {
    let mut f = flow().await;
    let base = format!("/v1/vaults/{}", f.customer.id.to_hex());
    // A 10-day grant on the same family.
    let g = Grant {
        grantee: f.acme.id,
        request: None,
        purpose: "a short look".into(),
        duration: Duration::TimeBound {
            seconds: 10 * 86_400,
        },
        not_before: T0,
        expires: Some(T0 + 10 * 86_400),
        lookback_start: Period::from_year_month(2025, 6).unwrap(),
        window_months: None,
        scopes: vec![(Scope::Transactions, Access::Read)],
        families: vec![GrantFamily {
            family: f.tx,
            scope: Scope::Transactions,
            epoch: 1,
            access: Access::Read,
        }],
        append_family: None,
        grantee_kem: f.kem.public_key(),
    };
    let st = Statement {
        customer: f.customer.id,
        author: f.customer.id,
        device: f.customer.device.id(),
        issued_at: T0,
        body: StBody::Grant(g.clone()),
    };
    let gid = SignedStatement::grant_id(&st);
    let bundle = KeyBundle { entries: vec![] }.seal(
        &mut rand::rng(),
        f.customer.id,
        f.acme.id,
        &f.kem.public_key(),
        gid.0,
    );
    let grant = SignedStatement::sign(st, Some(bundle), &f.customer.device.signing).unwrap();
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(grant.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let path = format!("{base}/families/{}/read", f.tx.to_hex());
    let body = json!({"from": "2025-06", "to": "2026-12", "grant": gid.to_hex()});
    // One second before expiry: served, and no rotation is owed yet. At the expiry instant: refused (the
    // bound is exclusive), and the grant's end makes a rotation owed (PRODUCT.md, "Rotation").
    f.env.clock.store(T0 + 10 * 86_400 - 1, Ordering::SeqCst);
    let (s, _) = f
        .env
        .call("POST", &path, body.clone(), Signer::Device(&f.acme.device))
        .await;
    assert_eq!(s, StatusCode::OK);
    let w = customer_writes_one(&mut f, 20).await;
    assert_eq!(w.0, StatusCode::OK, "{}", w.1);
    f.env.clock.store(T0 + 10 * 86_400, Ordering::SeqCst);
    let w = customer_writes_one(&mut f, 21).await;
    assert!(rotation_pending(&w), "{w:?}");
    let (s, v) = f
        .env
        .call("POST", &path, body, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (StatusCode::FORBIDDEN, "urn:cmr-vault:problem:grant-expired"),
        "{v}"
    );
}

#[tokio::test]
async fn a_blocked_company_is_refused() {
    let mut f = flow().await;
    let base = format!("/v1/vaults/{}", f.customer.id.to_hex());
    let block = statement(
        &f.customer,
        f.customer.id,
        StBody::Block {
            company: f.acme.id,
            blocked: true,
        },
        None,
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(block.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let req = statement(
        &f.acme,
        f.customer.id,
        StBody::Request(AccessRequest {
            scopes: vec![(Scope::ProfileContact, Access::Read)],
            purpose: "again".into(),
            duration: Duration::OneTime,
            lookback_months: 0,
            counterparty: Counterparty::Any,
        }),
        None,
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(req.encode())}),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::FORBIDDEN,
            "urn:cmr-vault:problem:company-blocked"
        )
    );
}

/// Rules `evaluate` enforces, checked in `cmr-core`, hold over HTTP too: another company presenting a
/// grant id is refused; a one-time grant serves one read and then none. A refusal logs nothing.
#[tokio::test]
async fn another_companys_grant_and_a_one_time_grants_second_read_are_refused_over_http() {
    let mut f = flow().await;
    let read_path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let eve = register(&mut f.env, Role::Company).await;
    let before = f.env.store.checkpoint().unwrap();
    let read = json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()});
    let (s, v) = f
        .env
        .call("POST", &read_path, read, Signer::Device(&eve.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap_or_default()),
        (StatusCode::FORBIDDEN, "urn:cmr-vault:problem:wrong-company"),
        "{v}"
    );
    assert_eq!(f.env.store.checkpoint().unwrap(), before);

    // A one-time grant to acme.
    let (grant, gid) = read_grant(
        &f.customer,
        f.acme.id,
        f.tx,
        &f.kem,
        None,
        ("one look", Duration::OneTime),
        |g| {
            vec![BundleEntry {
                family: f.tx,
                epoch: 1,
                key: EpochSecret::generate(&mut rand::rng()).read_key(g.lookback_start),
            }]
        },
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("/v1/vaults/{}/statements", f.customer.id.to_hex()),
            json!({"statement": B64.encode(grant.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let once = json!({"from": "2025-06", "to": "2026-12", "grant": gid.to_hex()});
    // Before the one read, nothing is owed.
    let w = customer_writes_one(&mut f, 30).await;
    assert_eq!(w.0, StatusCode::OK, "{}", w.1);
    let (s, v) = f
        .env
        .call(
            "POST",
            &read_path,
            once.clone(),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let before = f.env.store.checkpoint().unwrap();
    let (s, v) = f
        .env
        .call("POST", &read_path, once, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap_or_default()),
        (
            StatusCode::FORBIDDEN,
            "urn:cmr-vault:problem:grant-consumed"
        ),
        "{v}"
    );
    assert_eq!(f.env.store.checkpoint().unwrap(), before);
    // The read used the grant up: its keys were exposed, so a rotation is owed and stays owed.
    let w = customer_writes_one(&mut f, 31).await;
    assert!(rotation_pending(&w), "{w:?}");
}

#[tokio::test]
async fn new_identities_cannot_flood_a_customer_with_requests() {
    use cmr_core::decision::{MAX_PENDING_PER_COMPANY, MAX_PENDING_PER_VAULT};
    let mut f = flow().await;
    // The identity limit is generous here: the flood is many companies, each within its own budget.
    let path = format!("/v1/vaults/{}/statements", f.customer.id.to_hex());
    let request = |p: &Party, i: u32| {
        statement(
            p,
            f.customer.id,
            StBody::Request(AccessRequest {
                scopes: vec![(Scope::ProfileContact, Access::Read)],
                purpose: format!("ask {i}"),
                duration: Duration::OneTime,
                lookback_months: 0,
                counterparty: Counterparty::Any,
            }),
            None,
        )
    };
    let mut sent = 0u32;
    let mut refused = Vec::new();
    let companies = MAX_PENDING_PER_VAULT / MAX_PENDING_PER_COMPANY + 2;
    for c in 0..companies {
        let company = register(&mut f.env, Role::Company).await;
        for i in 0..=MAX_PENDING_PER_COMPANY {
            let st = request(&company, c * 100 + i);
            let (s, v) = f
                .env
                .call(
                    "POST",
                    &path,
                    json!({"statement": B64.encode(st.encode())}),
                    Signer::Device(&company.device),
                )
                .await;
            match s {
                StatusCode::OK => sent += 1,
                _ => refused.push((s, v)),
            }
            // Keep within this company's own rate budget.
            f.env.clock.fetch_add(1, Ordering::SeqCst);
        }
    }
    assert_eq!(sent, MAX_PENDING_PER_VAULT);
    // Each company's sixth request, and every request once the vault's share is full, is 429.
    for (s, v) in &refused {
        assert_eq!(*s, StatusCode::TOO_MANY_REQUESTS, "{v}");
        assert_eq!(v["type"], "urn:cmr-vault:problem:too-many-requests");
    }
    assert!(
        refused
            .iter()
            .any(|(_, v)| v["detail"].as_str().unwrap().contains("from one company"))
    );
    assert!(
        refused
            .iter()
            .any(|(_, v)| v["detail"].as_str().unwrap().contains("in all"))
    );
    // The customer's listing holds exactly the waiting ones, every duration and access in words.
    let listing = format!("/v1/vaults/{}/requests", f.customer.id.to_hex());
    let (s, v) = f
        .env
        .call(
            "POST",
            &listing,
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let pending = v["pending"].as_array().unwrap();
    assert_eq!(pending.len() as u32, MAX_PENDING_PER_VAULT);
    assert_eq!(pending[0]["duration"], "one read");
    assert_eq!(pending[0]["scopes"][0]["access"], "read");
    // Denying one frees a place.
    let first = StatementId(
        Digest::from_hex(pending[0]["id"].as_str().unwrap())
            .unwrap()
            .0,
    );
    let deny = statement(
        &f.customer,
        f.customer.id,
        StBody::Denial {
            request: first,
            reason: "no".into(),
        },
        None,
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &path,
            json!({"statement": B64.encode(deny.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = f
        .env
        .call(
            "POST",
            &listing,
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(
        v["pending"].as_array().unwrap().len() as u32,
        MAX_PENDING_PER_VAULT - 1
    );
    // A stranger sees nothing of the vault's relationships.
    let stranger = register(&mut f.env, Role::Company).await;
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("/v1/vaults/{}/relationship", f.customer.id.to_hex()),
            json!({}),
            Signer::Device(&stranger.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["entries"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["next"].is_null());
}
