//! The lease record: which leases a SecretSync holds, kept in a Secret the controller
//! owns, `<secretsync>-capstan-lease` in the SecretSync's namespace.
//!
//! Why a Secret of its own and not status or an annotation on the target: status is for
//! users and must never show a lease id; the target Secret's annotations can be edited
//! or dropped by whoever edits the target (which the controller then restores, but the
//! lease ids would be lost), and a Retain'd target would carry stale ids. A lease id
//! is not a credential, but with a token allowed `sys/leases/revoke` it ends one, so it
//! is kept in a Secret, readable by exactly those who can read the target. It is owned
//! by the SecretSync (garbage-collected with it, after the finalizer revoked the leases)
//! and survives controller restarts: a SecretSync deleted while the controller was down
//! still has its leases revoked (K3).

use super::schedule::Lease;
use k8s_openapi::{ByteString, api::core::v1::Secret, jiff::Timestamp};
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, time::Duration};

pub const SECRET_TYPE: &str = "capstan.dev/secretsync-leases";
const FIELD: &str = "leases.json";

/// The record's Secret name for SecretSync `name` (the CRD limits names to 239
/// characters, so this is a valid Secret name).
pub fn secret_name(name: &str) -> String {
    format!("{name}-capstan-lease")
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// SHA-256 of the source and auth the current lease was issued for: a spec change
    /// replaces the credential.
    #[serde(default)]
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<Current>,
    /// Replaced leases, revoked once the workloads rolled onto the new credential.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<Retiring>,
    /// A credential being issued (a write-ahead intent): saved before the engine is
    /// asked, cleared in the same write that records the lease id. A controller that
    /// stops in between (killed, or paused past its leader Lease) leaves it behind, and
    /// whoever reconciles next revokes its token before anything else (K1, K4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuing: Option<Issuing>,
}

/// The intent to issue one credential. The engine names a lease only in its answer, so
/// an answer lost to a crash leaves a lease nobody knows the id of; what is known is
/// the token that asked for it. Each issue uses a login of its own, which asks for
/// nothing else, and the engine revokes a token's leases with the token (Vault's rule):
/// revoking that token (`auth/token/revoke-self`, which every token may do) ends
/// exactly the unrecorded lease, and nothing else. The token is kept sealed under the
/// controller's key (`hmac::Key::seal`), bound to the SecretSync's UID, so a reader of
/// this Secret cannot use it, and only for as long as the issue takes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Issuing {
    pub sealed_token: String,
    pub since: Timestamp,
    /// Whether the token's policy let it revoke itself when it was made
    /// (`sys/capabilities-self`): only then does the engine's refusal of revoke-self
    /// mean that the token is gone (the engine refuses an unknown token and a token
    /// without the grant alike). Absent in older records: not known, so false.
    #[serde(default)]
    pub revocable: bool,
    /// When the token ends, and with it whatever it obtained, as its login said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<Timestamp>,
    /// Claimed by whoever found the intent (a conditional write, before it revokes the
    /// token): the issuer's own conditional write of the lease id then fails, so it can
    /// never record or deliver the credential being revoked. A reconcile that finds it
    /// claimed (the claimant stopped) revokes again, which changes nothing if done.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoking: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Current {
    /// None for a certificate issued without a lease (it simply expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub granted_at: Timestamp,
    pub ttl_seconds: u64,
    pub original_ttl_seconds: u64,
    pub renewable: bool,
    pub at_max: bool,
    /// HMAC of the target data rendered from this credential: whether the target holds it.
    pub hmac: String,
    /// When the token that issued it ends, as last known (the lease ends with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<Timestamp>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Retiring {
    pub id: String,
    pub expires_at: Timestamp,
    /// Whether the restarts were requested; until then the lease is not revoked, even
    /// after a crash between writing the new credential and restarting the workloads.
    #[serde(default)]
    pub restarted: bool,
    /// Each Deployment restarted and the generation that restart produced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<RolloutMark>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutMark {
    pub name: String,
    pub generation: i64,
}

impl Current {
    pub fn new(id: Option<String>, lease: &Lease, hmac: String) -> Self {
        let mut current = Self {
            id,
            granted_at: lease.granted_at,
            ttl_seconds: 0,
            original_ttl_seconds: lease.original_ttl.as_secs(),
            renewable: false,
            at_max: false,
            hmac,
            token_expires_at: None,
        };
        current.set_lease(lease);
        current
    }

    pub fn lease(&self) -> Lease {
        Lease {
            granted_at: self.granted_at,
            ttl: Duration::from_secs(self.ttl_seconds),
            original_ttl: Duration::from_secs(self.original_ttl_seconds),
            renewable: self.renewable,
            at_max: self.at_max,
        }
    }

    pub fn set_lease(&mut self, lease: &Lease) {
        self.granted_at = lease.granted_at;
        self.ttl_seconds = lease.ttl.as_secs();
        self.renewable = lease.renewable;
        self.at_max = lease.at_max;
    }
}

impl Record {
    pub fn from_secret(secret: &Secret) -> Result<Self, serde_json::Error> {
        match secret.data.as_ref().and_then(|d| d.get(FIELD)) {
            Some(bytes) => serde_json::from_slice(&bytes.0),
            None => Ok(Self::default()),
        }
    }

    pub fn data(&self) -> BTreeMap<String, ByteString> {
        BTreeMap::from([(
            FIELD.to_owned(),
            ByteString(serde_json::to_vec(self).expect("a record serializes")),
        )])
    }

    /// Every lease id held, current and retiring.
    pub fn lease_ids(&self) -> Vec<String> {
        self.current
            .iter()
            .filter_map(|c| c.id.clone())
            .chain(self.retiring.iter().map(|r| r.id.clone()))
            .collect()
    }

    /// Makes `next` current; the current lease (if it has an id) starts retiring.
    pub fn replace(&mut self, next: Current) {
        if let Some(old) = self.current.take()
            && let Some(id) = old.id.clone()
        {
            self.retiring.push(Retiring {
                id,
                expires_at: super::schedule::capped(old.lease(), old.token_expires_at).expires_at(),
                restarted: false,
                rollouts: vec![],
            });
        }
        self.current = Some(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacing_retires_the_old_lease_and_round_trips() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let lease = Lease::issued(now, Duration::from_secs(300), true);
        let mut record = Record::default();
        record.replace(Current::new(Some("db/creds/app/1".into()), &lease, "h1".into()));
        assert!(record.retiring.is_empty());
        record.replace(Current::new(Some("db/creds/app/2".into()), &lease, "h2".into()));
        assert_eq!(record.retiring.len(), 1);
        assert_eq!(record.retiring[0].id, "db/creds/app/1");
        assert!(!record.retiring[0].restarted);
        assert_eq!(record.lease_ids(), ["db/creds/app/2", "db/creds/app/1"]);
        let secret = Secret {
            data: Some(record.data()),
            ..Default::default()
        };
        assert_eq!(Record::from_secret(&secret).unwrap(), record);
        assert_eq!(record.current.as_ref().unwrap().lease(), lease);
        // A certificate without a lease retires nothing.
        record.current.as_mut().unwrap().id = None;
        record.replace(Current::new(None, &lease, "h3".into()));
        assert_eq!(record.retiring.len(), 1);
    }

    #[test]
    fn an_intent_round_trips_and_older_records_read_without_one() {
        let secret = |text: &str| Secret {
            data: Some(BTreeMap::from([(FIELD.to_owned(), ByteString(text.into()))])),
            ..Default::default()
        };
        let old = Record::from_secret(&secret(r#"{"fingerprint":"f"}"#)).unwrap();
        assert_eq!(old.issuing, None);
        let mut record = Record {
            issuing: Some(Issuing {
                sealed_token: "00ff".into(),
                since: Timestamp::from_second(1_800_000_000).unwrap(),
                revocable: true,
                token_expires_at: Some(Timestamp::from_second(1_800_003_600).unwrap()),
                revoking: false,
            }),
            ..old
        };
        let text = String::from_utf8(record.data()[FIELD].0.clone()).unwrap();
        assert!(text.contains("\"issuing\":{\"sealedToken\":\"00ff\""), "{text}");
        assert!(!text.contains("revoking"), "{text}");
        assert_eq!(Record::from_secret(&secret(&text)).unwrap(), record);
        // Claimed: the mark is written and read back.
        record.issuing.as_mut().unwrap().revoking = true;
        let text = String::from_utf8(record.data()[FIELD].0.clone()).unwrap();
        assert!(text.contains("\"revoking\":true"), "{text}");
        assert_eq!(Record::from_secret(&secret(&text)).unwrap(), record);
        // An intent of an older controller: revocability not known.
        let older = Record::from_secret(&secret(
            r#"{"issuing":{"sealedToken":"00ff","since":"2027-01-15T08:00:00Z"}}"#,
        ))
        .unwrap();
        let issuing = older.issuing.unwrap();
        assert!(!issuing.revocable && !issuing.revoking);
        assert_eq!(issuing.token_expires_at, None);
    }
}
