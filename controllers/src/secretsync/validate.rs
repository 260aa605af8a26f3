//! What the API server's schema cannot check of a SecretSync (pure): exactly one
//! source, templates that parse, durations in the one grammar
//! (`capstan_contract::duration`), and the fingerprint of what a leased credential was
//! issued for.

use super::{schedule::RenewBefore, template};
use capstan_crds::{SecretSyncSpec, SourceKind};
use std::{collections::BTreeMap, time::Duration};

/// How often a KV source is read again when `refreshInterval` is not set.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Validated {
    pub kind: SourceKind,
    pub templates: Option<BTreeMap<String, template::Template>>,
    pub renew_before: RenewBefore,
    pub refresh: Duration,
}

pub fn validate(spec: &SecretSyncSpec) -> Result<Validated, String> {
    let kind = spec
        .source
        .kind()
        .ok_or("source: set exactly one of kv, database and pki")?;
    let templates = spec
        .target
        .template
        .as_ref()
        .map(template::parse_all)
        .transpose()
        .map_err(|e| e.to_string())?;
    let templates = match (templates, kind, spec.target.type_) {
        (None, SourceKind::Pki, capstan_crds::TargetType::Tls) => Some(default_tls_template()),
        (t, _, _) => t,
    };
    let renew_before = RenewBefore::parse(spec.renew_before.as_deref())?;
    let refresh = match &spec.refresh_interval {
        Some(text) => capstan_contract::duration::parse(text).map_err(|e| format!("refreshInterval: {e}"))?,
        None => DEFAULT_REFRESH,
    }
    .max(Duration::from_millis(100));
    if let Some(pki) = &spec.source.pki
        && let Some(ttl) = &pki.ttl
    {
        capstan_contract::duration::parse(ttl).map_err(|e| format!("source.pki.ttl: {e}"))?;
    }
    Ok(Validated {
        kind,
        templates,
        renew_before,
        refresh,
    })
}

/// A PKI source written to a `kubernetes.io/tls` Secret with no template: the layout
/// cert-manager and ingress controllers read.
fn default_tls_template() -> BTreeMap<String, template::Template> {
    [
        ("tls.crt", "{{ certificate }}"),
        ("tls.key", "{{ private_key }}"),
        ("ca.crt", "{{ issuing_ca }}"),
    ]
    .into_iter()
    .map(|(k, v)| {
        (
            k.to_owned(),
            template::parse(k, v).expect("a valid built-in template"),
        )
    })
    .collect()
}

/// SHA-256 (hex) of what a leased credential was issued for.
pub fn fingerprint(spec: &SecretSyncSpec) -> String {
    let text = serde_json::to_vec(&(&spec.source, &spec.auth)).expect("a spec serializes");
    ring::digest::digest(&ring::digest::SHA256, &text)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secretsync::tests::database_sync as obj;

    fn spec(value: serde_json::Value) -> SecretSyncSpec {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn validation_reports_what_the_schema_cannot() {
        let ok = validate(&obj().spec).unwrap();
        assert_eq!(ok.kind, SourceKind::Database);
        assert_eq!(ok.refresh, DEFAULT_REFRESH);
        let mut bad = obj().spec;
        bad.target.template = Some(BTreeMap::from([("url".into(), "{{ user".into())]));
        assert!(validate(&bad).unwrap_err().contains("not closed"));
        let mut bad = obj().spec;
        bad.source.kv = Some(capstan_crds::KvSource {
            mount: "secret".into(),
            path: "x".into(),
            version: None,
        });
        assert!(validate(&bad).unwrap_err().contains("exactly one"));
        let mut bad = obj().spec;
        bad.renew_before = Some("150%".into());
        assert!(validate(&bad).is_err());
        let mut bad = obj().spec;
        bad.target.template = Some(BTreeMap::from([("../x".into(), "{{ username }}".into())]));
        assert!(validate(&bad).unwrap_err().contains("not a valid Secret key"));
    }

    #[test]
    fn a_pki_source_into_a_tls_secret_gets_the_tls_layout() {
        let spec = spec(serde_json::json!({
            "source": {"pki": {"role": "web", "commonName": "web.team.svc"}},
            "auth": {"role": "web", "serviceAccountName": "web"},
            "target": {"name": "web-tls", "type": "kubernetes.io/tls"},
        }));
        let v = validate(&spec).unwrap();
        let fields: template::Fields = [("certificate", "C"), ("private_key", "K"), ("issuing_ca", "I")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let data = template::render(v.templates.as_ref(), &fields).unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), ["ca.crt", "tls.crt", "tls.key"]);
    }

    #[test]
    fn the_fingerprint_follows_source_and_auth_only() {
        let a = obj();
        let mut b = obj();
        b.spec.rollout_restart.push(capstan_crds::RolloutTarget {
            kind: capstan_crds::RolloutKind::Deployment,
            name: "web".into(),
        });
        assert_eq!(fingerprint(&a.spec), fingerprint(&b.spec));
        b.spec.auth.role = "other".into();
        assert_ne!(fingerprint(&a.spec), fingerprint(&b.spec));
    }
}
