//! The OpenAPI 3.1 document at `/v1/openapi.json`, generated: every route is registered once, with its
//! `#[utoipa::path]` description, through [`api`]; the served router and the document are the two parts
//! of that one registration (`split_for_parts`), so neither can list a route the other lacks. Request
//! and answer schemas come from the types themselves (`cmr-wire`'s answers and problem details, and the
//! request bodies, which refuse unknown fields).

use std::sync::{Arc, LazyLock};

use axum::Json;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::Problem;
use crate::AppState;

/// Every route, each with its description.
pub fn api() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(base())
        .merge(super::log::router())
        .merge(super::identities::router())
        .merge(super::vaults::router())
        .routes(routes!(openapi_json))
}

/// The document's frame: title, version and the request-signature scheme.
fn base() -> OpenApi {
    let mut doc = utoipa::openapi::OpenApiBuilder::new()
        .info(
            utoipa::openapi::InfoBuilder::new()
                .title("CMR Vault")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "A customer-managed data vault: identities, consent statements, sealed records, and \
                     a transparency log that auditors verify. See docs/api.md.",
                ))
                .build(),
        )
        .build();
    let mut scheme = ApiKey::Header(ApiKeyValue::with_description(
        "Signature",
        "RFC 9421 HTTP Message Signature (Ed25519) over @method, @authority, @path, @query and \
         content-digest, with created, keyid and nonce; see docs/api.md",
    ));
    if let ApiKey::Header(v) = &mut scheme {
        v.name = "Signature".into();
    }
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme("rfc9421", SecurityScheme::ApiKey(scheme));
    // Every route's default answer refers to it.
    let mut problem = <cmr_wire::problem::ProblemJson as utoipa::PartialSchema>::schema();
    // The title is one of the stable codes: the one list (`cmr_core::problem::Code`).
    if let utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(o)) = &mut problem
        && let Some(utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(title))) =
            o.properties.get_mut("title")
    {
        title.enum_values = Some(
            cmr_core::problem::Code::ALL
                .iter()
                .map(|c| c.as_str().into())
                .collect(),
        );
    }
    components.schemas.insert("ProblemJson".into(), problem);
    doc
}

/// The document, generated once.
pub fn document() -> &'static OpenApi {
    static DOC: LazyLock<OpenApi> = LazyLock::new(|| api().split_for_parts().1);
    &DOC
}

#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    summary = "This document",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document", body = Object),
        Problem
    )
)]
async fn openapi_json() -> Json<&'static OpenApi> {
    Json(document())
}
