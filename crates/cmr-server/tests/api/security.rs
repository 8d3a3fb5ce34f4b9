//! Attacks answered with the right problem code and the state unchanged: signatures, other vaults, revoked devices, other deployments, who may read what.

use crate::common::*;

#[tokio::test]
async fn signature_attacks_are_refused_and_change_nothing() {
    let mut f = flow().await;
    let path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let body = json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()});
    let before = f.env.store.checkpoint().unwrap();
    let code = |v: &Value| {
        v["type"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("urn:cmr-vault:problem:")
            .to_string()
    };

    let (s, v) = f.env.call("POST", &path, body.clone(), Signer::None).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "missing-signature")
    );

    // A body changed after signing.
    let mut req = f
        .env
        .request("POST", &path, &body, Signer::Device(&f.acme.device), 0);
    *req.body_mut() = Body::from(
        serde_json::to_vec(&json!({"from": "2025-01", "to": "2026-12", "grant": f.grant.to_hex()}))
            .unwrap(),
    );
    let (s, v) = f.env.send(req).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "content-digest")
    );

    // Replayed: the same signed request twice.
    let req = f
        .env
        .request("POST", &path, &body, Signer::Device(&f.acme.device), 0);
    let (parts, b) = req.into_parts();
    let bytes = b.collect().await.unwrap().to_bytes();
    let first = Request::from_parts(parts.clone(), Body::from(bytes.clone()));
    let again = Request::from_parts(parts, Body::from(bytes));
    assert_eq!(f.env.send(first).await.0, StatusCode::OK);
    let (s, v) = f.env.send(again).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "replayed")
    );

    // Stale and future `created`, and one before the server started.
    let req = f
        .env
        .request("POST", &path, &body, Signer::Device(&f.acme.device), -61);
    let (s, v) = f.env.send(req).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "clock-skew")
    );
    assert!(v["detail"].as_str().unwrap().contains("61 s ago"));
    let req = f
        .env
        .request("POST", &path, &body, Signer::Device(&f.acme.device), 6);
    let (s, v) = f.env.send(req).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "clock-skew")
    );
    let req = f.env.request(
        "POST",
        &path,
        &body,
        Signer::Device(&f.acme.device),
        -(f.env.now() - T0 as i64) + 1,
    );
    let (s, v) = f.env.send(req).await;
    assert!(
        s == StatusCode::UNAUTHORIZED
            && (code(&v) == "created-before-start" || code(&v) == "clock-skew"),
        "{v}"
    );

    // An unknown key, and a signature by another key under a known keyid.
    let stranger = DeviceKeys::generate(&mut rand::rng());
    let (s, v) = f
        .env
        .call("POST", &path, body.clone(), Signer::Device(&stranger))
        .await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "unknown-key")
    );
    let mut req = f
        .env
        .request("POST", &path, &body, Signer::Device(&stranger), 0);
    let sig_input = req
        .headers()
        .get("signature-input")
        .unwrap()
        .to_str()
        .unwrap()
        .replace(&stranger.id().to_hex(), &f.acme.device.id().to_hex());
    req.headers_mut()
        .insert("signature-input", sig_input.parse().unwrap());
    let (s, v) = f.env.send(req).await;
    assert_eq!(
        (s, code(&v).as_str()),
        (StatusCode::UNAUTHORIZED, "bad-signature")
    );

    // Only the one allowed read above was logged.
    let after = f.env.store.checkpoint().unwrap();
    assert_ne!(before, after);
    let size = |n: &Option<String>| {
        cmr_log::checkpoint::Checkpoint::parse_text(
            &cmr_log::note::Note::parse(n.as_ref().unwrap())
                .unwrap()
                .text,
        )
        .unwrap()
        .size
    };
    assert_eq!(size(&after), size(&before) + 1);
}

#[tokio::test]
async fn bad_input_and_other_vaults() {
    let mut f = flow().await;
    let code = |v: &Value| {
        v["type"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("urn:cmr-vault:problem:")
            .to_string()
    };
    // The company acting on the customer's directory; the customer on another vault.
    let path = format!("/v1/vaults/{}/directory", f.customer.id.to_hex());
    let (s, _) = f
        .env
        .call(
            "POST",
            &path,
            json!({"directory": ""}),
            Signer::Device(&f.acme.device),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let other = format!(
        "/v1/vaults/{}/families/{}/read",
        f.acme.id.to_hex(),
        f.tx.to_hex()
    );
    let (s, _) = f
        .env
        .call(
            "POST",
            &other,
            json!({"from": "2025-06", "to": "2026-12"}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert!(s == StatusCode::FORBIDDEN || s == StatusCode::NOT_FOUND);
    // Malformed JSON fields, unknown fields, bad base64, overlong or traversal ids.
    let st = format!("/v1/vaults/{}/statements", f.customer.id.to_hex());
    for body in [
        json!({"statement": "!!!"}),
        json!({"statement": "AAAA", "extra": 1}),
        json!({"nope": 1}),
    ] {
        let (s, v) = f
            .env
            .call("POST", &st, body, Signer::Device(&f.customer.device))
            .await;
        assert_eq!(
            (s, code(&v).as_str()),
            (StatusCode::BAD_REQUEST, "malformed"),
            "{v}"
        );
    }
    for id in ["..%2F..%2Fetc", &"a".repeat(65), "zz"] {
        let (s, _) = f
            .env
            .call(
                "POST",
                &format!("/v1/vaults/{id}/statements"),
                json!({"statement": "AAAA"}),
                Signer::Device(&f.customer.device),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{id}");
    }
    // An oversized body.
    let big = json!({"statement": "A".repeat(Config::default().max_small_body)});
    let (s, v) = f
        .env
        .call("POST", &st, big, Signer::Device(&f.customer.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap_or_default()),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "urn:cmr-vault:problem:too-large"
        )
    );
    let _ = (&f.kem, f.grant);
}

#[tokio::test]
async fn log_bodies_only_for_the_parties_involved_and_admitted_auditors() {
    let mut f = flow().await;
    let other = register(&mut f.env, Role::Company).await;
    let auditor = register(&mut f.env, Role::Auditor).await;
    // Entry 0 is the customer's registration.
    let (s, _) = f
        .env
        .call(
            "POST",
            "/v1/log/entries/0",
            json!({}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/log/entries/0",
            json!({}),
            Signer::Device(&other.device),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (StatusCode::FORBIDDEN, "urn:cmr-vault:problem:forbidden")
    );
    // Registering as an auditor gives nothing: the operator has not admitted it.
    let body_of_0 = |env: &mut Env, who: &DeviceKeys| {
        let req = env.request(
            "POST",
            "/v1/log/entries/0",
            &json!({}),
            Signer::Device(who),
            0,
        );
        let app = env.app.clone();
        async move { app.oneshot(req).await.unwrap().status() }
    };
    assert_eq!(
        body_of_0(&mut f.env, &auditor.device).await,
        StatusCode::FORBIDDEN
    );
    // Nor does an admission it signs itself, with any key but the log key.
    let admission = |admit: bool, time: u64, key: &NoteSigner| json!({"statement": cmr_log::admission::Admission { auditor: auditor.id, admit, time }.sign(key)});
    let forged = NoteSigner::new(
        "vault.test/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[66; 32]),
    )
    .unwrap();
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(true, T0, &forged),
            Signer::None,
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::UNAUTHORIZED,
            "urn:cmr-vault:problem:bad-signature"
        )
    );
    // A company cannot be admitted as an auditor.
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            json!({"statement": cmr_log::admission::Admission { auditor: other.id, admit: true, time: T0 }.sign(&log_key())}),
            Signer::None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(
        body_of_0(&mut f.env, &auditor.device).await,
        StatusCode::FORBIDDEN
    );
    // The operator admits it with the log key.
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(true, T0, &log_key()),
            Signer::None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let admitted_at = v["index"].as_u64().unwrap();
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/log/entries/0",
            json!({}),
            Signer::Device(&auditor.device),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // What the auditor gets opens the public commitment.
    let salt: [u8; 32] = B64
        .decode(v["salt"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let body = B64.decode(v["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        cmr_log::entry::commitment(&salt, &body),
        f.env.store.commitments(0, 1).unwrap()[0]
    );
    // An unsigned request for a body is refused.
    let (s, _) = f
        .env
        .call("POST", "/v1/log/entries/0", json!({}), Signer::None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Anyone sees who is an auditor and since when: the admission entry, with its inclusion proof.
    let (s, v) = f
        .env
        .call("GET", "/v1/auditors", json!({}), Signer::None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["index"].as_u64(), Some(admitted_at));
    // The same admission sent again is answered with its original index, and changes nothing.
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(true, T0, &log_key()),
            Signer::None,
        )
        .await;
    assert_eq!(
        (s, v["index"].as_u64()),
        (StatusCode::OK, Some(admitted_at))
    );
    // A dismissal signed before the admission cannot be played after it.
    let (s, _) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(false, T0 - 1, &log_key()),
            Signer::None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body_of_0(&mut f.env, &auditor.device).await, StatusCode::OK);
    // Dismissed, it reads no body it is not a party to.
    let (s, _) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(false, T0 + 1, &log_key()),
            Signer::None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        body_of_0(&mut f.env, &auditor.device).await,
        StatusCode::FORBIDDEN
    );
    // And replaying the old admission does not bring it back.
    let (s, v) = f
        .env
        .call(
            "POST",
            "/v1/auditors",
            admission(true, T0, &log_key()),
            Signer::None,
        )
        .await;
    assert_eq!((s, v["repeated"].as_bool()), (StatusCode::OK, Some(true)));
    assert_eq!(
        body_of_0(&mut f.env, &auditor.device).await,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn a_revoked_device_can_no_longer_act() {
    let mut f = flow().await;
    let path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let read = json!({"from": "2025-06", "to": "2026-12", "grant": f.grant.to_hex()});
    let (s, _) = f
        .env
        .call("POST", &path, read.clone(), Signer::Device(&f.acme.device))
        .await;
    assert_eq!(s, StatusCode::OK);
    // Acme's identity key revokes its device.
    let rev = cmr_core::identity::revoke_device(
        f.acme.id,
        0,
        &f.acme.identity_key,
        f.acme.device.id(),
        T0,
    );
    let revoke_path = format!("/v1/identities/{}/devices/revoke", f.acme.id.to_hex());
    let (s, v) = f
        .env
        .call(
            "POST",
            &revoke_path,
            json!({"revocation": B64.encode(rev.encode())}),
            Signer::Identity(&f.acme.id, &f.acme.identity_key),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The device's requests still verify cryptographically, but its key no longer authenticates.
    let (s, v) = f
        .env
        .call("POST", &path, read, Signer::Device(&f.acme.device))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::UNAUTHORIZED,
            "urn:cmr-vault:problem:unknown-key"
        ),
        "{v}"
    );
    // Another identity cannot revoke acme's devices.
    let (s, _) = f
        .env
        .call(
            "POST",
            &revoke_path,
            json!({"revocation": B64.encode(rev.encode())}),
            Signer::Device(&f.customer.device),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_revoked_customer_device_can_no_longer_read_its_vault() {
    let mut f = flow().await;
    // A second device of the customer reads the customer's own records (not logged)...
    let laptop = DeviceKeys::generate(&mut rand::rng());
    let cert = laptop.certify(f.customer.id, 0, &f.customer.identity_key, T0);
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("/v1/identities/{}/devices", f.customer.id.to_hex()),
            json!({"certificate": B64.encode(cert.encode())}),
            Signer::Identity(&f.customer.id, &f.customer.identity_key),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let path = format!(
        "/v1/vaults/{}/families/{}/read",
        f.customer.id.to_hex(),
        f.tx.to_hex()
    );
    let read = json!({"from": "2026-01", "to": "2026-12"});
    let (s, v) = f
        .env
        .call("POST", &path, read.clone(), Signer::Device(&laptop))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // ...until the identity key revokes it.
    let rev = cmr_core::identity::revoke_device(
        f.customer.id,
        0,
        &f.customer.identity_key,
        laptop.id(),
        T0,
    );
    let (s, v) = f
        .env
        .call(
            "POST",
            &format!("/v1/identities/{}/devices/revoke", f.customer.id.to_hex()),
            json!({"revocation": B64.encode(rev.encode())}),
            Signer::Identity(&f.customer.id, &f.customer.identity_key),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f
        .env
        .call("POST", &path, read.clone(), Signer::Device(&laptop))
        .await;
    assert_eq!(
        (s, v["type"].as_str().unwrap()),
        (
            StatusCode::UNAUTHORIZED,
            "urn:cmr-vault:problem:unknown-key"
        ),
        "{v}"
    );
    // The other device carries on.
    let (s, _) = f
        .env
        .call("POST", &path, read, Signer::Device(&f.customer.device))
        .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn a_request_signed_for_another_deployment_is_refused_whatever_its_host() {
    let mut f = flow().await;
    let path = format!("/v1/vaults/{}/history", f.customer.id.to_hex());
    let body = serde_json::to_vec(&json!({})).unwrap();
    // Signed for `other.test`, and sent with Host `other.test`: the server verifies for its own
    // configured authority, `vault.test`, and refuses, saying which authority it expects.
    let send = |env: &mut Env, authority: &'static str, host: &'static str| {
        env.nonce += 1;
        let req = httpsig::Request::new("POST", "http", authority, &path, vec![]);
        let h = httpsig::sign_request(
            &req,
            &body,
            &f.customer.device.signing,
            &f.customer.device.id().to_hex(),
            &format!("auth{}", env.nonce),
            env.now(),
        )
        .unwrap();
        Request::builder()
            .method("POST")
            .uri(&path)
            .header("host", host)
            .header("content-type", "application/json")
            .header("content-digest", h.content_digest)
            .header("signature-input", h.signature_input)
            .header("signature", h.signature)
            .body(Body::from(body.clone()))
            .unwrap()
    };
    let req = send(&mut f.env, "other.test", "other.test");
    let (s, v) = f.env.send(req).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("vault.test"), "{v}");
    // Signed for this deployment, the request passes even if a proxy rewrote its Host.
    let req = send(&mut f.env, "vault.test", "10.0.0.7:8080");
    let (s, v) = f.env.send(req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// A customer's key events (whose bodies link the customer's chain) go only to the customer, a party its
/// chain involves, an admitted auditor and a device recovering with the phrase; anyone else is answered
/// as if the identity did not exist. A company's go to any registered caller. Every answer carries the
/// key-event head signed with the log key.
#[tokio::test]
async fn a_customers_key_events_only_for_those_who_need_them() {
    let mut f = flow().await;
    let stranger = register(&mut f.env, Role::Company).await;
    let auditor = register(&mut f.env, Role::Auditor).await;
    let events = |id: &IdentityId| format!("/v1/identities/{}/events", id.to_hex());
    let customer_events = events(&f.customer.id);
    // The customer itself, and the company it granted to.
    for device in [&f.customer.device, &f.acme.device] {
        let (s, v) = call(
            &mut f.env,
            &customer_events,
            json!({}),
            Signer::Device(device),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let head =
            cmr_log::keyhead::KeyHead::open(v["head"].as_str().unwrap(), &log_key().verifier())
                .unwrap();
        assert_eq!(head.identity, f.customer.id);
        assert_eq!(head.count as usize, v["events"].as_array().unwrap().len());
    }
    // A stranger, an auditor not admitted, and an unsigned caller learn nothing.
    for device in [&stranger.device, &auditor.device] {
        let (s, v) = call(
            &mut f.env,
            &customer_events,
            json!({}),
            Signer::Device(device),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        let unknown = events(&IdentityId([9; 32]));
        let (s2, v2) = call(&mut f.env, &unknown, json!({}), Signer::Device(device)).await;
        assert_eq!((s2, v2["detail"].clone()), (s, v["detail"].clone()));
    }
    let (s, _) = call(&mut f.env, &customer_events, json!({}), Signer::None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Admitted, the auditor may.
    let (s, v) = call(
        &mut f.env,
        "/v1/auditors",
        json!({"statement": cmr_log::admission::Admission { auditor: auditor.id, admit: true, time: T0 }.sign(&log_key())}),
        Signer::None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = call(
        &mut f.env,
        &customer_events,
        json!({}),
        Signer::Device(&auditor.device),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // A company finds the vaults that concern it; nobody else may list them.
    let vaults = |id: &IdentityId| format!("/v1/identities/{}/vaults", id.to_hex());
    let (s, v) = call(
        &mut f.env,
        &vaults(&f.acme.id),
        json!({}),
        Signer::Device(&f.acme.device),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["vaults"], json!([f.customer.id.to_hex()]));
    let (s, _) = call(
        &mut f.env,
        &vaults(&f.acme.id),
        json!({}),
        Signer::Device(&stranger.device),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = call(
        &mut f.env,
        &vaults(&stranger.id),
        json!({}),
        Signer::Device(&stranger.device),
    )
    .await;
    assert_eq!((s, v["vaults"].clone()), (StatusCode::OK, json!([])));
    // A company's events are for any registered caller.
    let (s, _) = call(
        &mut f.env,
        &events(&f.acme.id),
        json!({}),
        Signer::Device(&stranger.device),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // A device recovering with the phrase signs with the next identity key it reveals; a key the
    // current event does not commit to is answered as if the identity did not exist.
    let new = create_identity(&mut rand::rng(), Role::Customer);
    let id = new.inception.identity();
    let (s, v) = call(
        &mut f.env,
        "/v1/identities",
        json!({"event": B64.encode(new.inception.encode())}),
        Signer::Identity(&id, &new.identity_key),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let next = new.recovery.identity_key();
    let reveal = |k: &SigningKey| json!({"reveal": B64.encode(k.verifying_key().to_bytes())});
    let (s, v) = call(
        &mut f.env,
        &events(&id),
        reveal(&next),
        Signer::Identity(&id, &next),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    let wrong = SigningKey::generate(&mut rand::rng());
    let (s, _) = call(
        &mut f.env,
        &events(&id),
        reveal(&wrong),
        Signer::Identity(&id, &wrong),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Revealing the right key but signing with another is a bad signature.
    let (s, _) = call(
        &mut f.env,
        &events(&id),
        reveal(&next),
        Signer::Identity(&id, &wrong),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
