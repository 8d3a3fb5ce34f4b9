//! The contract: the generated OpenAPI document, and witness cosignatures on checkpoints.

use crate::common::*;

#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let f = flow().await;
    let resp = f
        .env
        .app
        .clone()
        .oneshot(
            Request::get("/v1/openapi.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let doc: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    // The router and the document are one registration (`routes::openapi::api`): a route cannot be
    // served undocumented. Here the other way: every documented operation is served (unsigned, a signed
    // route answers 401, a malformed one 400, never the router's 404 or 405), and its description is
    // complete: a typed success, the problem details, the signature scheme where it is signed.
    let mut operations = 0;
    // Client generators name a function after each operation id: two alike make the document invalid.
    let mut ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let id = op["operationId"].as_str().unwrap_or_default().to_string();
            assert!(
                ids.insert(id.clone()),
                "operation id {id:?} twice ({method} {path})"
            );
            let concrete = path
                .replace("{index}", "0")
                .replace("{id}", &f.customer.id.to_hex())
                .replace("{customer}", &f.customer.id.to_hex())
                .replace("{family}", &f.tx.to_hex());
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&concrete)
                .header("host", "vault.test")
                .body(Body::empty())
                .unwrap();
            let resp = f.env.app.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let routed = !String::from_utf8_lossy(&body).contains("no such route")
                && status != StatusCode::METHOD_NOT_ALLOWED;
            assert!(
                routed,
                "{method} {path} is documented but not served ({status})"
            );
            let ok = &op["responses"]["200"];
            assert!(
                ok["content"].is_object(),
                "{method} {path}: no typed success"
            );
            assert!(
                op["responses"]["default"]["content"]["application/problem+json"].is_object(),
                "{method} {path}: no problem details"
            );
            let signed = op["security"].as_array().is_some_and(|s| !s.is_empty());
            if signed {
                // Refused unsigned (a registration or recovery reads its key from the body first).
                assert!(
                    status == StatusCode::UNAUTHORIZED || status == StatusCode::BAD_REQUEST,
                    "{method} {path}: signed, but answered an unsigned request with {status}"
                );
            }
        }
    }
    assert!(operations >= 26, "{operations} operations documented");
    // Every schema reference resolves, and the wire types are described field by field.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = r.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "dangling reference to {name}");
    }
    for (name, fields) in [
        (
            "AckJson",
            &["index", "size", "proof", "checkpoint", "entry"][..],
        ),
        (
            "ReadProofJson",
            &["head", "from", "to", "pages", "next"][..],
        ),
        ("ProblemJson", &["type", "title", "status", "detail"][..]),
        ("ReadBody", &["from", "to", "grant", "cursor", "limit"][..]),
    ] {
        for field in fields {
            assert!(
                schemas[name]["properties"][field].is_object(),
                "{name}.{field} is not described"
            );
        }
    }
    // Ids are typed down to their pattern.
    assert_eq!(
        schemas["HeadJson"]["properties"]["customer"]["pattern"],
        "^[0-9a-f]{64}$"
    );
}

#[tokio::test]
async fn a_witness_cosigns_and_clients_require_it() {
    let f = flow().await;
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let resp = f
        .env
        .app
        .clone()
        .oneshot(get("/v1/log/checkpoint"))
        .await
        .unwrap();
    let note = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    // The witness checks consistency from nothing (its first checkpoint) and cosigns.
    let mut witness = cmr_log::witness::Witness::new(witness_key(), log_key().verifier()).unwrap();
    let line = witness.cosign(&note, &[], T0 + 100).unwrap();
    let post = |body: Value| {
        Request::post("/v1/log/cosignatures")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let resp = f
        .env
        .app
        .clone()
        .oneshot(post(json!({"line": line})))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Clients that require one witness now accept the served checkpoint.
    let resp = f
        .env
        .app
        .clone()
        .oneshot(get("/v1/log/checkpoint"))
        .await
        .unwrap();
    let cosigned = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let v = cmr_log::checkpoint::open(
        &cosigned,
        &log_key().verifier(),
        &[witness_key().verifier()],
        1,
    )
    .unwrap();
    assert_eq!(v.cosigners.len(), 1);
    // A cosignature by an unknown key, or over another checkpoint, is refused.
    let stranger = NoteSigner::new(
        "witness.test/w1",
        cmr_log::note::TYPE_COSIGNATURE,
        SigningKey::from_seed(&[8; 32]),
    )
    .unwrap();
    let text = cmr_log::note::Note::parse(&note).unwrap().text;
    for bad in [
        stranger.signature_line(&text, T0),
        witness_key().signature_line("other\n1\nAAAA\n", T0),
    ] {
        let resp = f
            .env
            .app
            .clone()
            .oneshot(post(json!({"line": bad})))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
