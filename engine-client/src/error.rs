//! What a call can end with. No variant carries a token, a lease id or a value the engine
//! returned: paths, statuses and the engine's own error messages (which name paths,
//! roles and reasons), with any token or lease id those messages echo redacted.

use http::StatusCode;
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("the engine URL {0:?} is not https://host[:port]")]
    Url(String),
    #[error("the trust bundle: {0}")]
    Roots(String),
    #[error("the engine's trust roots are not loaded yet")]
    NoRoots,
    #[error("the token is not a valid HTTP header value")]
    BadToken,
    /// No request was sent: the connection (TCP or TLS) could not be made.
    #[error("connecting to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{url} did not answer {path} within {after:?}")]
    Timeout {
        url: String,
        path: String,
        after: Duration,
    },
    /// The request may have been sent: the exchange failed midway.
    #[error("HTTP with {url} on {path}: {reason}")]
    Http {
        url: String,
        path: String,
        reason: String,
    },
    #[error("the answer to {path} is larger than {limit} bytes")]
    TooLarge { path: String, limit: usize },
    #[error("the answer to {path} is not JSON")]
    NotJson { path: String },
    #[error("the answer to {path} is not what the API documents: {reason}")]
    Protocol { path: String, reason: String },
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// A non-2xx answer, with the messages of Vault's error body (`{"errors": [...]}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the engine refused {path}: {status}: {}", errors.join("; "))]
pub struct ApiError {
    /// The path without its query.
    pub path: String,
    pub status: StatusCode,
    /// Each message cut at [`MESSAGE_CHARS`] characters, tokens and lease ids redacted.
    pub errors: Vec<String>,
}

/// The longest error message kept: the engine's are a sentence.
pub const MESSAGE_CHARS: usize = 200;

impl Error {
    /// The status the engine answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api(api) => Some(api.status),
            _ => None,
        }
    }

    /// The engine's answer, if it answered with an error.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Self::Api(api) => Some(api),
            _ => None,
        }
    }
}

impl ApiError {
    /// Parses an error answer's body. A body that is not Vault's error shape becomes one
    /// message of its text (the mesh CA and proxies in between may answer in plain text).
    pub(crate) fn parse(path: &str, status: StatusCode, body: &[u8], sensitive: &[&str]) -> Self {
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(default)]
            errors: Vec<serde_json::Value>,
        }
        let errors = match serde_json::from_slice::<Body>(body) {
            Ok(body) => body
                .errors
                .iter()
                .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
                .collect(),
            Err(_) if body.is_empty() => Vec::new(),
            Err(_) => vec![String::from_utf8_lossy(body).trim().to_owned()],
        };
        Self {
            path: path.to_owned(),
            status,
            errors: errors
                .iter()
                .map(|e| redact(&e.chars().take(MESSAGE_CHARS).collect::<String>(), sensitive))
                .collect(),
        }
    }

    /// The messages as one line.
    pub fn message(&self) -> String {
        self.errors.join("; ")
    }
}

/// `text` with every `sensitive` string (tokens, lease ids) of four characters or more
/// replaced by `<redacted>`: the engine's messages may echo what a request sent.
pub fn redact(text: &str, sensitive: &[&str]) -> String {
    let mut out = text.to_owned();
    for s in sensitive.iter().filter(|s| s.len() >= 4) {
        out = out.replace(s, "<redacted>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_redact_tokens_and_lease_ids() {
        assert_eq!(
            redact(
                "lease database/creds/app/abcd not found for hvs.TOKEN",
                &["database/creds/app/abcd", "hvs.TOKEN", "x"]
            ),
            "lease <redacted> not found for <redacted>"
        );
    }

    #[test]
    fn vault_error_bodies_are_parsed() {
        let e = ApiError::parse(
            "sys/leases/renew",
            StatusCode::BAD_REQUEST,
            br#"{"errors": ["lease abcd-1234 not found", "second"]}"#,
            &["abcd-1234"],
        );
        assert_eq!(e.errors, ["lease <redacted> not found", "second"]);
        assert_eq!(
            e.to_string(),
            "the engine refused sys/leases/renew: 400 Bad Request: lease <redacted> not found; second"
        );
        let long = format!(r#"{{"errors": ["{}"]}}"#, "x".repeat(1000));
        let e = ApiError::parse("p", StatusCode::FORBIDDEN, long.as_bytes(), &[]);
        assert_eq!(e.errors[0].len(), MESSAGE_CHARS);
        let plain = ApiError::parse("p", StatusCode::BAD_GATEWAY, b"upstream down\n", &[]);
        assert_eq!(plain.errors, ["upstream down"]);
        assert!(
            ApiError::parse("p", StatusCode::NOT_FOUND, b"", &[])
                .errors
                .is_empty()
        );
    }
}
