//! The flow through the API: writes, reads, history, requests, heads, appends around a rotation.

use crate::common::*;

#[tokio::test]
async fn the_flow_through_the_api() {
    let mut f = flow().await;
    let read_path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let read = json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()});
    let (s, v) = f
        .env
        .call(
            "POST",
            &read_path,
            read.clone(),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["records"].as_array().unwrap().len(), 3);
    assert!(v["index"].is_u64());
    // The company verifies, from the JSON alone, that the read is complete against the named head and
    // that every record is in a batch signed by the customer's device, then opens the records.
    let (proof, records, batches) = parse_read(&v);
    let customer_key = f.customer.device.signing.verifying_key();
    let verified = cmr_core::batch::verify_read(
        &proof.head.digest(),
        &proof,
        &records,
        &batches,
        |_| Some(customer_key),
        None,
    )
    .unwrap();
    assert_eq!(verified.records.len(), 3);
    // Outside the look-back, or another family: refused with the decision's code.
    let early = json!({"from": "2025-01", "to": "2026-12", "grant": f.grant.to_hex()});
    let (s, v) = f
        .env
        .call("POST", &read_path, early, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::FORBIDDEN,
            "urn:cmr-vault:problem:outside-look-back"
        )
    );
    // The profile's contact family was not granted.
    let contact = FamilyName::profile(Scope::ProfileContact)
        .unwrap()
        .id(&f.customer.id);
    let contact_path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        contact.to_hex()
    );
    let body = json!({"from": "2000-01", "to": "2000-01", "grant": f.grant.to_hex()});
    let (s, v) = f
        .env
        .call("POST", &contact_path, body, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::FORBIDDEN,
            "urn:cmr-vault:problem:family-not-granted"
        )
    );
    // The customer revokes; the next read is 403 grant-revoked.
    let rev = statement(
        &f.customer,
        f.customer.id,
        StBody::Revocation(Revocation {
            grant: f.grant,
            initiator: Initiator::Customer,
            reason: "done".into(),
        }),
        None,
    );
    let base = format!("/v1/vaults/{}", f.customer.id.to_hex());
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(rev.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f
        .env
        .call("POST", &read_path, read, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (StatusCode::FORBIDDEN, "urn:cmr-vault:problem:grant-revoked")
    );
    // The public log: checkpoint, and an auditor finds nothing wrong.
    let resp = f
        .env
        .app
        .clone()
        .oneshot(
            Request::get("/v1/log/checkpoint")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut auditor = cmr_log::auditor::Auditor::new(log_key().verifier());
    let report = auditor.run(&mut &*f.env.store).unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
    let _ = &f.kem;
}

#[tokio::test]
async fn appends_wait_for_the_rotation_after_a_revocation() {
    let mut f = flow().await;
    let base = format!("/v1/vaults/{}", f.customer.id.to_hex());
    // The customer also grants acme appends to its own transactions family (not answering a request).
    let secret = EpochSecret::generate(&mut rand::rng());
    let g = Grant {
        grantee: f.acme.id,
        request: None,
        purpose: "invoices".into(),
        duration: Duration::Persistent,
        not_before: T0,
        expires: None,
        lookback_start: Period::from_year_month(2026, 1).unwrap(),
        window_months: None,
        scopes: vec![(Scope::Transactions, Access::ReadAppend)],
        families: vec![GrantFamily {
            family: f.tx,
            scope: Scope::Transactions,
            epoch: 1,
            access: Access::ReadAppend,
        }],
        append_family: Some(f.tx),
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
    let bundle = KeyBundle {
        entries: vec![BundleEntry {
            family: f.tx,
            epoch: 1,
            key: secret.append_key(&f.acme.id, g.lookback_start),
        }],
    }
    .seal(
        &mut rand::rng(),
        f.customer.id,
        f.acme.id,
        &f.kem.public_key(),
        gid.0,
    );
    // The same grant with its keys sealed again: other bytes under the same id.
    let resealed = KeyBundle {
        entries: vec![BundleEntry {
            family: f.tx,
            epoch: 1,
            key: secret.append_key(&f.acme.id, g.lookback_start),
        }],
    }
    .seal(
        &mut rand::rng(),
        f.customer.id,
        f.acme.id,
        &f.kem.public_key(),
        gid.0,
    );
    let other =
        SignedStatement::sign(st.clone(), Some(resealed), &f.customer.device.signing).unwrap();
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
    // Idempotent over HTTP: the same bytes again give the original index; other bytes under the same id
    // get 409 `conflict` and change nothing.
    let first = v["index"].as_u64().unwrap();
    let before = f.env.store.checkpoint().unwrap();
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(grant.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(
        (s, v["index"].as_u64(), v["repeated"].as_bool()),
        (StatusCode::OK, Some(first), Some(true)),
        "{v}"
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(other.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap_or_default()),
        (StatusCode::CONFLICT, "urn:cmr-vault:problem:conflict"),
        "{v}"
    );
    assert_eq!(f.env.store.checkpoint().unwrap(), before);
    // Acme appends an invoice, extending the head its read showed.
    let read_path = format!("{base}/families/{}/read", f.tx.to_hex());
    let (_, v) = f
        .env
        .call(
            "POST",
            &read_path,
            json!({"from": "2026-01", "to": "2026-12"}),
            Signer::Device(&f.customer.device),
        )
        .await;
    let head = Digest::from_hex(v["proof_of_read"]["head"]["digest"].as_str().unwrap()).unwrap();
    let period = Period::from_year_month(2026, 2).unwrap();
    let key = secret.append_key(&f.acme.id, period);
    let rec = RecordSealer::new(f.customer.id, f.tx, 1, f.acme.id, &key, period)
        .unwrap()
        .seal(&mut rand::rng(), RecordId([9; 16]), b"invoice 7")
        .unwrap();
    let append = |head| {
        let b = SignedBatch::sign(
            Batch::for_records(f.acme.device.id(), head, std::slice::from_ref(&rec)).unwrap(),
            &f.acme.device.signing,
        );
        json!({"batch": B64.encode(b.encode()), "records": [B64.encode(rec.as_bytes())], "grant": gid.to_hex()})
    };
    let batches = format!("{base}/families/{}/batches", f.tx.to_hex());
    let (s, v) = f
        .env
        .call(
            "POST",
            &batches,
            append(head),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The customer sees the append.
    let (_, v) = f
        .env
        .call(
            "POST",
            &read_path,
            json!({"from": "2026-01", "to": "2026-12"}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(v["records"].as_array().unwrap().len(), 4);
    let head = Digest::from_hex(v["proof_of_read"]["head"]["digest"].as_str().unwrap()).unwrap();
    // The first (read) grant is revoked: the family's keys are exposed, appends wait for the rotation.
    let rev = statement(
        &f.customer,
        f.customer.id,
        StBody::Revocation(Revocation {
            grant: f.grant,
            initiator: Initiator::Customer,
            reason: "done".into(),
        }),
        None,
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(rev.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f
        .env
        .call(
            "POST",
            &batches,
            append(head),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::CONFLICT,
            "urn:cmr-vault:problem:rotation-pending"
        ),
        "{v}"
    );
    // A company's refusal does not carry the directory (it names the customer's other relationships)...
    assert!(v.get("directory").is_none(), "{v}");
    // ...the customer's own refused write does, to rotate from.
    let mine = RecordSealer::new(
        f.customer.id,
        f.tx,
        1,
        f.customer.id,
        &secret.read_key(Period::ORIGIN),
        period,
    )
    .unwrap()
    .seal(&mut rand::rng(), RecordId([10; 16]), b"mine")
    .unwrap();
    let own = SignedBatch::sign(
        Batch::for_records(f.customer.device.id(), head, std::slice::from_ref(&mine)).unwrap(),
        &f.customer.device.signing,
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &batches,
            json!({"batch": B64.encode(own.encode()), "records": [B64.encode(mine.as_bytes())]}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap_or_default()),
        (
            StatusCode::CONFLICT,
            "urn:cmr-vault:problem:rotation-pending"
        ),
        "{v}"
    );
    let dir = cmr_core::directory::SignedDirectory::decode(
        &B64.decode(v["directory"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(dir.directory().customer, f.customer.id);
    // The customer's client completes the rotation, keeping the append grant.
    let rc = cmr_core::consent::RotationCompletion {
        family: f.tx,
        epoch: 2,
        directory: Digest([0; 32]),
        keepers: vec![(gid, grant.bundle().unwrap().clone())],
    };
    let s2 = statement(
        &f.customer,
        f.customer.id,
        StBody::RotationCompletion(rc),
        None,
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(s2.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // An append still sealed to epoch 1 is stale.
    let (s, v) = f
        .env
        .call(
            "POST",
            &batches,
            append(head),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (StatusCode::CONFLICT, "urn:cmr-vault:problem:stale-epoch"),
        "{v}"
    );
}

#[tokio::test]
async fn the_customer_sees_every_access_in_the_history() {
    let mut f = flow().await;
    let read_path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &read_path,
            json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()}),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let path = format!("/v1/vaults/{}/history", f.customer.id.to_hex());
    let (s, v) = f
        .env
        .call("POST", &path, json!({}), Signer::Device(&f.customer.device))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let entries = v["entries"].as_array().unwrap();
    // Newest first: the company's read, the batch, the grant, the request, the directory, ...
    assert_eq!(entries[0]["kind"], "access");
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"statement")
            && kinds.contains(&"family-head")
            && kinds.contains(&"directory")
    );
    // Each entry opens its public commitment, is included in the checkpoint, and links to the one before.
    let cp = cmr_log::checkpoint::open(
        v["checkpoint"].as_str().unwrap(),
        &log_key().verifier(),
        &[],
        0,
    )
    .unwrap()
    .checkpoint;
    let mut expected_prev: Option<u64> = None;
    for e in entries.iter().rev() {
        let index = e["index"].as_u64().unwrap();
        let salt: [u8; 32] = B64
            .decode(e["salt"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let body = B64.decode(e["body"].as_str().unwrap()).unwrap();
        let c = cmr_log::entry::commitment(&salt, &body);
        let proof: Vec<[u8; 32]> = e["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| B64.decode(h.as_str().unwrap()).unwrap().try_into().unwrap())
            .collect();
        cmr_log::verify::verify_inclusion(
            index,
            cp.size,
            &cmr_log::entry::commitment_leaf(&c),
            &proof,
            &cp.root,
        )
        .unwrap();
        let entry = cmr_log::entry::EntryBody::decode(&body).unwrap();
        assert_eq!(entry.prev.map(|p| p.index), expected_prev);
        expected_prev = Some(index);
    }
    // Nobody else reads it.
    let (s, _) = f
        .env
        .call("POST", &path, json!({}), Signer::Device(&f.acme.device))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_customer_lists_unanswered_requests() {
    let mut f = flow().await;
    let base = format!("/v1/vaults/{}", f.customer.id.to_hex());
    // The flow's request was answered by the grant; a new one is pending.
    let req = statement(
        &f.acme,
        f.customer.id,
        StBody::Request(AccessRequest {
            scopes: vec![(Scope::ProfileContact, Access::Read)],
            purpose: "delivery address".into(),
            duration: Duration::OneTime,
            lookback_months: 0,
            counterparty: Counterparty::Any,
        }),
        None,
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(req.encode())}),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/requests"),
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let pending = v["pending"].as_array().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["id"], req.id().to_hex());
    assert_eq!(pending[0]["purpose"], "delivery address");
    assert_eq!(pending[0]["company"], f.acme.id.to_hex());
    // Denied, it is no longer pending; and nobody else lists them.
    let denial = statement(
        &f.customer,
        f.customer.id,
        StBody::Denial {
            request: req.id(),
            reason: "no".into(),
        },
        None,
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &format!("{base}/statements"),
            json!({"statement": B64.encode(denial.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = f
        .env
        .call(
            "POST",
            &format!("{base}/requests"),
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert!(v["pending"].as_array().unwrap().is_empty());
    let (s, _) = f
        .env
        .call(
            "POST",
            &format!("{base}/requests"),
            json!({}),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_history_page_starts_only_at_the_callers_own_entry() {
    let mut f = flow().await;
    let other = register(&mut f.env, Role::Customer).await;
    let path = format!("/v1/vaults/{}/history", f.customer.id.to_hex());
    let own = f.env.store.customer_head(&f.customer.id).unwrap().unwrap();
    let theirs = f.env.store.customer_head(&other.id).unwrap().unwrap();
    let (s, _) = f
        .env
        .call(
            "POST",
            &path,
            json!({"before": own}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // Another customer's entry, an entry of no one (a company's registration), and an index past the
    // log all get the same answer: the route says nothing about entries that are not the caller's.
    let (s0, v0) = f
        .env
        .call(
            "POST",
            &path,
            json!({"before": theirs}),
            Signer::Device(&f.customer.device),
        )
        .await;
    for before in [2u64, 1_000_000] {
        let (s, v) = f
            .env
            .call(
                "POST",
                &path,
                json!({"before": before}),
                Signer::Device(&f.customer.device),
            )
            .await;
        assert_eq!((s, &v["detail"]), (s0, &v0["detail"]), "before {before}");
    }
    assert_eq!(s0, StatusCode::FORBIDDEN);
}

/// `down_to` ends a history page at the entry the caller verified last, which the page includes: the
/// same entries as the whole chain's newest ones, and nothing below. An index between two entries ends
/// the page at the older one; one below the chain's oldest entry gives the whole chain.
#[tokio::test]
async fn a_history_page_stops_at_down_to_and_includes_it() {
    let mut f = flow().await;
    let path = format!("/v1/vaults/{}/history", f.customer.id.to_hex());
    let indexes = |v: &serde_json::Value| -> Vec<u64> {
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["index"].as_u64().unwrap())
            .collect()
    };
    let (s, all) = call(
        &mut f.env,
        &path,
        json!({"limit": 1000}),
        Signer::Device(&f.customer.device),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{all}");
    let chain = indexes(&all);
    assert!(chain.len() >= 4, "{chain:?}");
    for (at, &d) in chain.iter().enumerate() {
        let (s, v) = call(
            &mut f.env,
            &path,
            json!({"limit": 1000, "down_to": d}),
            Signer::Device(&f.customer.device),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(indexes(&v), chain[..=at], "down_to {d}");
        assert_eq!(
            v["entries"].as_array().unwrap()[..],
            all["entries"].as_array().unwrap()[..=at]
        );
    }
    // An index between two entries stops at the older one; below the chain's start, the whole chain.
    let between = chain[0] - 1;
    if between > chain[1] {
        let (_, v) = call(
            &mut f.env,
            &path,
            json!({"down_to": between}),
            Signer::Device(&f.customer.device),
        )
        .await;
        assert_eq!(indexes(&v), chain[..=1]);
    }
    let (_, v) = call(
        &mut f.env,
        &path,
        json!({"limit": 1000, "down_to": 0}),
        Signer::Device(&f.customer.device),
    )
    .await;
    assert_eq!(indexes(&v), chain);
}

/// A family's head digest goes to the customer and to a company that may append to the family now; a
/// reader, a stranger with another's grant, and a company without a grant are refused, and nothing is
/// logged.
#[tokio::test]
async fn a_familys_head_only_for_the_customer_and_its_appenders() {
    let mut f = flow().await;
    let stranger = register(&mut f.env, Role::Company).await;
    let path = format!(
        "/v1/vaults/{}/families/{}/head",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let history = format!("/v1/vaults/{}/history", f.customer.id.to_hex());
    let (_, before) = call(
        &mut f.env,
        &history,
        json!({"limit": 1000}),
        Signer::Device(&f.customer.device),
    )
    .await;
    let (s, v) = call(
        &mut f.env,
        &path,
        json!({}),
        Signer::Device(&f.customer.device),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["head"].as_str().unwrap().len(), 64);
    let grant = json!({"grant": f.grant.to_hex()});
    // The flow's grant reads only: no head for appending.
    let (s, v) = call(
        &mut f.env,
        &path,
        grant.clone(),
        Signer::Device(&f.acme.device),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = call(&mut f.env, &path, grant, Signer::Device(&stranger.device)).await;
    assert_eq!(
        (s, v["title"].clone()),
        (StatusCode::FORBIDDEN, json!("wrong-company")),
        "{v}"
    );
    let (s, _) = call(
        &mut f.env,
        &path,
        json!({}),
        Signer::Device(&stranger.device),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (_, after) = call(
        &mut f.env,
        &history,
        json!({"limit": 1000}),
        Signer::Device(&f.customer.device),
    )
    .await;
    assert!(before["entries"].as_array().is_some_and(|e| !e.is_empty()));
    assert_eq!(before["entries"], after["entries"], "nothing is logged");
}

/// The customer's chain as events: the first event says where the chain is, a company's request is
/// pushed as the next one; another party may not follow the chain; an identity holds at most
/// `MAX_STREAMS_PER_IDENTITY` streams, and a closed one frees its place.
#[tokio::test]
async fn the_customers_chain_is_pushed_as_events_to_the_customer_only() {
    let mut f = flow().await;
    let path = format!("/v1/vaults/{}/events", f.customer.id.to_hex());
    let head = f.env.store.customer_head(&f.customer.id).unwrap().unwrap();
    let req = f.env.request(
        "POST",
        &path,
        &json!({}),
        Signer::Device(&f.customer.device),
        0,
    );
    let resp = f.env.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = resp.into_body();
    let mut next_event = async || {
        let mut text = String::new();
        while !text.contains("\n\n") {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
                .await
                .expect("an event within 10 s")
                .unwrap()
                .unwrap();
            if let Ok(data) = frame.into_data() {
                text.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
        text
    };
    let first = next_event().await;
    assert!(
        first.contains("event: head") && first.contains(&format!("id: {head}")),
        "{first}"
    );
    // A company's request lands on the chain: the next event names it.
    let req = statement(
        &f.acme,
        f.customer.id,
        StBody::Request(AccessRequest {
            scopes: vec![(Scope::ProfileContact, Access::Read)],
            purpose: "newsletter".into(),
            duration: Duration::Persistent,
            lookback_months: 0,
            counterparty: Counterparty::Any,
        }),
        None,
    );
    let (s, v) = call(
        &mut f.env,
        &format!("/v1/vaults/{}/statements", f.customer.id.to_hex()),
        json!({"statement": B64.encode(req.encode())}),
        Signer::Device(&f.acme.device),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let now_head = f.env.store.customer_head(&f.customer.id).unwrap().unwrap();
    assert!(now_head > head);
    let second = next_event().await;
    assert!(
        second.contains(&format!("data: {{\"head\":{now_head}}}")),
        "{second}"
    );

    // The company may not follow the customer's chain.
    let (s, _) = call(&mut f.env, &path, json!({}), Signer::Device(&f.acme.device)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Seven more streams fit beside the first one; the ninth is refused until one closes.
    let mut open = Vec::new();
    for _ in 1..cmr_server::MAX_STREAMS_PER_IDENTITY {
        let req = f.env.request(
            "POST",
            &path,
            &json!({"after": now_head}),
            Signer::Device(&f.customer.device),
            0,
        );
        let resp = f.env.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        open.push(resp);
    }
    let (s, v) = call(
        &mut f.env,
        &path,
        json!({}),
        Signer::Device(&f.customer.device),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    drop(open.pop());
    // The stream's task notices its reader is gone on its next look (every 500 ms).
    let mut freed = false;
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let req = f.env.request(
            "POST",
            &path,
            &json!({"after": now_head}),
            Signer::Device(&f.customer.device),
            0,
        );
        let resp = f.env.app.clone().oneshot(req).await.unwrap();
        if resp.status() == StatusCode::OK {
            freed = true;
            break;
        }
    }
    assert!(freed, "a closed stream's place was not freed");
}

/// A grant carrying the largest key bundle a client builds (`MAX_BUNDLE_ENTRIES` keys of the largest
/// kind: what a family rotated about a thousand times needs) is logged: the envelope and the sealed
/// field hold it, and so does the request body. (At 64 KiB for both, a grant on a family rotated about
/// 850 times was refused as malformed.)
#[tokio::test]
async fn a_grant_with_the_largest_bundle_is_logged() {
    let mut f = flow().await;
    let secret = EpochSecret::generate(&mut rand::rng());
    let (grant, gid) = read_grant(
        &f.customer,
        f.acme.id,
        f.tx,
        &f.kem,
        None,
        ("every epoch", Duration::Persistent),
        |g| {
            (0..cmr_core::epoch::MAX_BUNDLE_ENTRIES as u64)
                .map(|epoch| BundleEntry {
                    family: f.tx,
                    epoch,
                    key: secret.append_key(&f.acme.id, g.lookback_start),
                })
                .collect()
        },
    );
    assert!(grant.encode().len() > 100 * 1024);
    let base = format!("/v1/vaults/{}", f.customer.id.to_hex());
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
    // The company opens every key of it.
    let back = SignedStatement::decode(&grant.encode()).unwrap();
    let opened = KeyBundle::open(
        back.bundle().unwrap(),
        f.customer.id,
        f.acme.id,
        &f.kem,
        gid.0,
    )
    .unwrap();
    assert_eq!(opened.entries.len(), cmr_core::epoch::MAX_BUNDLE_ENTRIES);
}
