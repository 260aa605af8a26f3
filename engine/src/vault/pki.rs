//! The PKI mount's paths: `root/generate/internal`, `cert/ca`, `roles/<name>`,
//! `issue/<role>`.

use super::{ApiError, Engine, Operation, Reply, Request};
use crate::{
    auth_kubernetes::parse_duration,
    pki::{PkiError, Role},
};
use serde_json::{Value, json};

impl From<PkiError> for ApiError {
    fn from(error: PkiError) -> Self {
        match error {
            PkiError::Storage(e) => e.into(),
            PkiError::Sign => Self::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
            other => Self::bad_request(other.to_string()),
        }
    }
}

fn list(request: &Request, key: &str) -> Result<Vec<String>, ApiError> {
    match request.body.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s
            .split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad_request(format!("invalid {key}")))
            })
            .collect(),
        Some(_) => Err(ApiError::bad_request(format!("invalid {key}"))),
    }
}

fn seconds(request: &Request, key: &str) -> Result<u64, ApiError> {
    match request.body.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| ApiError::bad_request(format!("invalid {key}"))),
        Some(Value::String(s)) => parse_duration(s).map_err(ApiError::bad_request),
        Some(_) => Err(ApiError::bad_request(format!("invalid {key}"))),
    }
}

fn flag(request: &Request, key: &str, default: bool) -> bool {
    request.body.get(key).and_then(Value::as_bool).unwrap_or(default)
}

pub async fn route(engine: &Engine, request: &Request, rest: &str) -> Result<Reply, ApiError> {
    let pki = &engine.pki;
    let op = request.operation;
    let write = matches!(op, Operation::create | Operation::update);
    let (section, name) = rest.split_once('/').unwrap_or((rest, ""));
    match (section, name, op) {
        ("root", "generate/internal", _) if write => {
            let common_name = request.str("common_name").unwrap_or_default();
            let certificate = pki.generate_root(common_name, seconds(request, "ttl")?).await?;
            Ok(Reply::data(
                json!({ "certificate": certificate, "issuing_ca": certificate }),
            ))
        }
        ("cert", "ca", Operation::read) => Ok(Reply::data(json!({ "certificate": pki.ca_pem().await? }))),
        ("roles", _, Operation::list) => Ok(Reply::data(json!({ "keys": pki.list_roles().await? }))),
        ("roles", name, Operation::read) => {
            let role = pki.role(name).await?.ok_or_else(ApiError::not_found)?;
            Ok(Reply::data(serde_json::to_value(role).unwrap_or_default()))
        }
        ("roles", name, _) if write => {
            let role = Role {
                allowed_domains: list(request, "allowed_domains")?,
                allow_subdomains: flag(request, "allow_subdomains", false),
                allow_bare_domains: flag(request, "allow_bare_domains", false),
                allow_localhost: flag(request, "allow_localhost", false),
                allow_ip_sans: flag(request, "allow_ip_sans", false),
                allow_any_name: flag(request, "allow_any_name", false),
                server_flag: flag(request, "server_flag", true),
                client_flag: flag(request, "client_flag", false),
                ttl: seconds(request, "ttl")?,
                max_ttl: seconds(request, "max_ttl")?,
            };
            pki.write_role(name, role).await?;
            Ok(Reply::no_content())
        }
        ("roles", name, Operation::delete) => {
            pki.delete_role(name).await?;
            Ok(Reply::no_content())
        }
        ("issue", role, _) if write => {
            let common_name = request
                .str("common_name")
                .filter(|c| !c.is_empty())
                .ok_or_else(|| ApiError::bad_request("missing required parameter: common_name"))?;
            if request.str("format").is_some_and(|f| f != "pem") {
                return Err(ApiError::bad_request("only format pem is supported"));
            }
            let issued = pki
                .issue(
                    role,
                    common_name,
                    &list(request, "alt_names")?,
                    &list(request, "ip_sans")?,
                    seconds(request, "ttl")?,
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
