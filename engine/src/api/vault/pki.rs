//! The PKI mount's paths: `root/generate/internal`, `cert/ca`, `roles/<name>`,
//! `issue/<role>`.

use super::{ApiError, Engine, Operation, Reply, Request, route::Tail};
use crate::secrets::pki::{PkiError, Role};
use serde_json::json;

impl From<PkiError> for ApiError {
    fn from(error: PkiError) -> Self {
        match error {
            PkiError::Storage(e) => e.into(),
            PkiError::Sign => Self::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
            other => Self::bad_request(other.to_string()),
        }
    }
}

/// The routes with a name after a prefix (`route::resolve`).
pub const ROUTES: &[(&str, Tail)] = &[
    ("roles/", Tail::Name { lower: false }),
    ("issue/", Tail::Name { lower: false }),
];

/// The CA certificate is public: reading it needs no token.
pub const UNAUTHENTICATED: &[&str] = &["cert/ca"];

pub async fn route(engine: &Engine, request: &Request, rest: &str) -> Result<Reply, ApiError> {
    let pki = &engine.pki;
    let op = request.operation;
    let write = matches!(op, Operation::create | Operation::update);
    let (section, after) = rest.split_once('/').unwrap_or((rest, ""));
    let name = request.name();
    match (section, after, op) {
        ("root", "generate/internal", _) if write => {
            let common_name = request.str("common_name").unwrap_or_default();
            let certificate = pki.generate_root(common_name, request.seconds(&["ttl"])?).await?;
            Ok(Reply::data(
                json!({ "certificate": certificate, "issuing_ca": certificate }),
            ))
        }
        ("cert", "ca", Operation::read) => Ok(Reply::data(json!({ "certificate": pki.ca_pem().await? }))),
        ("roles", _, Operation::list) => Ok(Reply::data(json!({ "keys": pki.list_roles().await? }))),
        ("roles", _, Operation::read) => {
            let role = pki.role(name).await?.ok_or_else(ApiError::not_found)?;
            Ok(Reply::data(serde_json::to_value(role).unwrap_or_default()))
        }
        ("roles", _, _) if write => {
            let role = Role {
                allowed_domains: request.list("allowed_domains")?.unwrap_or_default(),
                allow_subdomains: request.flag("allow_subdomains", false)?,
                allow_bare_domains: request.flag("allow_bare_domains", false)?,
                allow_glob_domains: request.flag("allow_glob_domains", false)?,
                allow_localhost: request.flag("allow_localhost", false)?,
                allow_ip_sans: request.flag("allow_ip_sans", false)?,
                allow_any_name: request.flag("allow_any_name", false)?,
                server_flag: request.flag("server_flag", true)?,
                client_flag: request.flag("client_flag", false)?,
                ttl: request.seconds(&["ttl"])?,
                max_ttl: request.seconds(&["max_ttl"])?,
            };
            pki.write_role(name, role).await?;
            Ok(Reply::no_content())
        }
        ("roles", _, Operation::delete) => {
            pki.delete_role(name).await?;
            Ok(Reply::no_content())
        }
        ("issue", _, _) if write => {
            let common_name = request
                .str("common_name")
                .filter(|c| !c.is_empty())
                .ok_or_else(|| ApiError::bad_request("missing required parameter: common_name"))?;
            if request.str("format").is_some_and(|f| f != "pem") {
                return Err(ApiError::bad_request("only format pem is supported"));
            }
            let issued = pki
                .issue(
                    name,
                    common_name,
                    &request.list("alt_names")?.unwrap_or_default(),
                    &request.list("ip_sans")?.unwrap_or_default(),
                    request.seconds(&["ttl"])?,
                )
                .await?;
            Ok(Reply::data(json!({
                "certificate": issued.certificate,
                "issuing_ca": issued.issuing_ca,
                "ca_chain": [issued.issuing_ca],
                "private_key": issued.private_key,
                "private_key_type": "ec",
                "serial_number": issued.serial_number,
                "expiration": issued.expiration,
            })))
        }
        (_, _, op) => Err(ApiError::unsupported(&request.path, op)),
    }
}
