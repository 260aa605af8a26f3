//! The agent's configuration: flags, each with the environment variable the webhook
//! sets, and the secrets it renders (file name, engine path, optional template), checked
//! before anything is fetched.

use anyhow::{Context as _, bail};
use capstan_contract::env::{agent as vars, proxy};
use std::{net::SocketAddr, path::PathBuf, time::Duration};

#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// The secrets engine (capstan-engine), HTTPS.
    #[arg(long, env = vars::ENGINE_URL)]
    pub engine_url: String,
    /// The Kubernetes auth role to log in with.
    #[arg(long, env = vars::ROLE)]
    pub role: String,
    /// The auth method's mount.
    #[arg(long, env = vars::AUTH_MOUNT, default_value = "kubernetes")]
    pub auth_mount: String,
    /// The projected ServiceAccount token (audience capstan-engine); re-read at every
    /// login, since the kubelet rotates it.
    #[arg(
        long,
        env = vars::TOKEN_FILE,
        default_value = "/var/run/secrets/capstan.dev/engine/token"
    )]
    pub token_file: PathBuf,
    /// The mesh's trust bundle (PEM) the engine's serving certificate chains to.
    #[arg(long, env = vars::CA_BUNDLE, hide_env_values = true)]
    pub ca_bundle: Option<String>,
    /// The same, from a file (re-read at every new connection).
    #[arg(long, env = vars::CA_BUNDLE_FILE, conflicts_with = "ca_bundle")]
    pub ca_bundle_file: Option<PathBuf>,
    /// The folder the files are rendered into (the pod's memory-backed shared volume).
    #[arg(long, env = vars::DIR, default_value = vars::SECRETS_DIR)]
    pub dir: PathBuf,
    /// A secret to render: `FILE=PATH`, PATH being `<kv-mount>/data/<key>` or
    /// `<database-mount>/creds/<role>` (repeatable).
    #[arg(long = "secret", value_name = "FILE=PATH")]
    pub secrets: Vec<String>,
    /// A template for a file: `FILE=TEXT`, `{{ field }}` replaced by the secret's field
    /// (repeatable).
    #[arg(long = "template", value_name = "FILE=TEXT")]
    pub templates: Vec<String>,
    /// The secrets as JSON, as the webhook passes them:
    /// `[{"file": "db", "path": "database/creds/app", "template": "..."}]`.
    #[arg(long, env = vars::SECRETS, hide_env_values = true)]
    pub secrets_json: Option<String>,
    /// Render every file once and exit 0 (an init container); the leases then live until
    /// their token or TTL ends, or the pod is deleted.
    #[arg(long, env = vars::INIT_ONLY)]
    pub init_only: bool,
    /// /healthz, /ready (the startup probe: every file rendered) and /metrics.
    #[arg(long, env = vars::ADMIN_ADDR, default_value = "0.0.0.0:15021")]
    pub admin_addr: SocketAddr,
    /// How often a KV secret's version is read (a change reaches its file within this
    /// plus one request).
    #[arg(long, env = vars::POLL_INTERVAL, value_parser = capstan_contract::duration::parse, default_value = "250ms")]
    pub poll_interval: Duration,
    /// The pod's namespace and name, for log lines (downward API).
    #[arg(long, env = proxy::NAMESPACE, default_value = "")]
    pub namespace: String,
    #[arg(long, env = proxy::POD_NAME, default_value = "")]
    pub pod_name: String,
}

/// Where a secret comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// KV version 2: `<mount>/data/<key>`; re-rendered when its version changes.
    Kv { path: String },
    /// A leased dynamic credential: `<mount>/creds/<role>`; renewed, re-issued at max TTL.
    Database { path: String },
}

impl Source {
    pub fn path(&self) -> &str {
        match self {
            Self::Kv { path } | Self::Database { path } => path,
        }
    }
}

/// One file to render.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretSpec {
    pub file: String,
    pub source: Source,
    pub template: Option<crate::agent::render::Template>,
}

impl AgentArgs {
    /// Every secret from `--secret`/`--template` and `CAPSTAN_AGENT_SECRETS`, checked.
    pub fn specs(&self) -> anyhow::Result<Vec<SecretSpec>> {
        let mut raw: Vec<(String, String, Option<String>)> = Vec::new();
        if let Some(json) = &self.secrets_json {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Entry {
                file: String,
                path: String,
                #[serde(default)]
                template: Option<String>,
            }
            // serde's messages can quote input; the input here is configuration, not a
            // secret, but keep the message to the position anyway.
            let entries: Vec<Entry> = serde_json::from_str(json).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a JSON list of {{file, path, template}} (line {}, column {})",
                    vars::SECRETS,
                    e.line(),
                    e.column()
                )
            })?;
            raw.extend(entries.into_iter().map(|e| (e.file, e.path, e.template)));
        }
        for item in &self.secrets {
            let (file, path) = item
                .split_once('=')
                .with_context(|| format!("--secret {item:?}: expected FILE=PATH"))?;
            raw.push((file.to_owned(), path.to_owned(), None));
        }
        for item in &self.templates {
            let (file, text) = item
                .split_once('=')
                .with_context(|| format!("--template for {item:?}: expected FILE=TEXT"))?;
            let Some(entry) = raw.iter_mut().find(|(f, _, _)| f == file) else {
                bail!("--template for {file:?}: no --secret names that file");
            };
            entry.2 = Some(text.to_owned());
        }
        if raw.is_empty() {
            bail!(
                "no secret to render: give --secret FILE=PATH or {}",
                vars::SECRETS
            );
        }
        let mut specs: Vec<SecretSpec> = Vec::new();
        for (file, path, template) in raw {
            check_file_name(&file).map_err(|e| anyhow::anyhow!("secret file {file:?}: {e}"))?;
            if specs.iter().any(|s| s.file == file) {
                bail!("secret file {file:?} is named twice");
            }
            let source = parse_path(&path).map_err(|e| anyhow::anyhow!("secret file {file:?}: {e}"))?;
            let template = template
                .map(|t| crate::agent::render::Template::parse(&t))
                .transpose()
                .map_err(|e| anyhow::anyhow!("secret file {file:?}: template: {e}"))?;
            specs.push(SecretSpec {
                file,
                source,
                template,
            });
        }
        Ok(specs)
    }
}

pub use capstan_crds::secrets::check_file_name;

/// An engine path the agent knows how to render: `<mount>/data/<key>` (KV v2) or
/// `<mount>/creds/<role>` (database).
pub fn parse_path(path: &str) -> Result<Source, String> {
    let path = path.to_owned();
    Ok(match capstan_crds::secrets::agent_path_kind(&path)? {
        capstan_crds::secrets::AgentPathKind::Kv => Source::Kv { path },
        capstan_crds::secrets::AgentPathKind::Database => Source::Database { path },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s4_file_names_that_leave_the_folder_are_refused() {
        for bad in [
            "",
            "..",
            ".",
            "../etc/passwd",
            "a/b",
            "/etc/passwd",
            "a..b",
            ".hidden",
            "a\\b",
            "a b",
            "a\0b",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        for good in ["db", "config.json", "app_creds-1", "a.b.c"] {
            assert!(check_file_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn paths_are_kv_or_database_and_nothing_else() {
        assert_eq!(
            parse_path("secret/data/app/config"),
            Ok(Source::Kv {
                path: "secret/data/app/config".into()
            })
        );
        assert_eq!(
            parse_path("database/creds/app"),
            Ok(Source::Database {
                path: "database/creds/app".into()
            })
        );
        for bad in [
            "secret/metadata/app",
            "pki/issue/web",
            "database/creds/app/x",
            "secret/data/../x",
            "secret/data/",
            "secret//data/x",
            "secret/data/a?b",
            "sys/policies/acl/x",
            "secret/data",
        ] {
            assert!(parse_path(bad).is_err(), "{bad:?}");
        }
    }

    fn args(secrets: &[&str], templates: &[&str], json: Option<&str>) -> AgentArgs {
        AgentArgs {
            engine_url: "https://e".into(),
            role: "r".into(),
            auth_mount: "kubernetes".into(),
            token_file: "/t".into(),
            ca_bundle: None,
            ca_bundle_file: None,
            dir: "/d".into(),
            secrets: secrets.iter().map(|s| (*s).to_owned()).collect(),
            templates: templates.iter().map(|s| (*s).to_owned()).collect(),
            secrets_json: json.map(str::to_owned),
            init_only: false,
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            poll_interval: Duration::from_millis(250),
            namespace: String::new(),
            pod_name: String::new(),
        }
    }

    #[test]
    fn specs_come_from_flags_and_json_and_are_checked() {
        let specs = args(
            &["db=database/creds/app"],
            &["db=user={{ username }}"],
            Some(r#"[{"file": "cfg", "path": "secret/data/app"}]"#),
        )
        .specs()
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].file, "cfg");
        assert!(specs[1].template.is_some());
        for (secrets, templates) in [
            (&["../x=secret/data/a"][..], &[][..]),
            (&["x=pki/issue/a"], &[]),
            (&["x=secret/data/a", "x=secret/data/b"], &[]),
            (&["x=secret/data/a"], &["y=t"]),
            (&["x=secret/data/a"], &["x={{ unclosed"]),
            (&[], &[]),
        ] {
            assert!(args(secrets, templates, None).specs().is_err(), "{secrets:?}");
        }
    }
}
