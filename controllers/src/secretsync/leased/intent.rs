//! The write-ahead issue (K1, K4): the intent to issue, with the sealed token of a login
//! made for this one issue, is recorded before the engine is asked, and replaced by the
//! lease id in one conditional write. What a stopped issue left (an intent without a
//! lease id) is finished by the next reconcile before it issues anything: claimed,
//! its token revoked (and with it whatever it obtained), cleared. The fault points
//! (`fault::point`) sit between those steps.

use super::{
    super::{
        Ctx, Job, engine, fault,
        leases::{Current, Issuing, Record},
        outcome::{Failure, Write},
        reasons,
        schedule::Lease,
        target, template,
    },
    revoke, store,
};
use capstan_crds::{SecretSync, SourceKind};
use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{Api, ResourceExt, runtime::events::EventType};

/// Issues a new credential in place of the current one (`why` is for the Event), by
/// the write-ahead protocol: a login of its own for this issue, put on record (sealed)
/// before the engine is asked, so that if this process stops before the lease id is
/// recorded, whoever comes next revokes that token and with it the lease
/// (`leases::Issuing`). Returns the record's Secret as stored, and the write.
pub async fn replace(
    job: &Job<'_>,
    record: &mut Record,
    mut stored: Option<Secret>,
    fingerprint: &str,
    why: &str,
) -> Result<(Option<Secret>, Write), Failure> {
    let uid = job.obj.uid().unwrap_or_default();
    // A login of its own for this issue, put on record (sealed) before the engine is
    // asked: if this process stops before the lease id is recorded, whoever comes
    // next revokes that token and with it the lease (leases::Issuing).
    job.ctx.drop_token(job.obj);
    let token = job.ctx.token_info(job.obj).await?;
    // Whether that token may revoke itself: only then does a later refusal of
    // revoke-self mean that it is gone (leases::Issuing::revocable).
    let revocable = job
        .ctx
        .state
        .engine
        .can_revoke_self(&token.token)
        .await
        .map_err(Failure::engine)?;
    if !revocable {
        tracing::warn!(
            "The role's tokens cannot revoke themselves (auth/token/revoke-self, which the engine's \
             default policy grants): should this issue be interrupted, its credential lives until \
             its token ends"
        );
    }
    record.issuing = Some(Issuing {
        sealed_token: job.ctx.state.hmac.seal(&uid, token.token.as_bytes()),
        since: Timestamp::now(),
        revocable,
        token_expires_at: Some(token.expires_at),
        revoking: false,
    });
    stored = Some(store::save(job.secrets, job.obj, record, stored).await?);
    fault::point("intent").await;
    // A leader paused past its term must not issue when it thaws; the successor has
    // the intent (and revokes the token) if this check passes just too early.
    if job.ctx.leadership.ensure().is_err() {
        return Err(Failure::transient(
            reasons::KUBERNETES_ERROR,
            "no longer the leader: not issuing",
        ));
    }
    let issued = issue(job.obj, job.ctx, job.v.kind, &token.token).await?;
    tracing::info!(kind = ?job.v.kind, leased = issued.lease_id.is_some(), "Issued a credential");
    fault::point("issued").await;
    let issued_at = Timestamp::now();
    let data = match template::render(job.v.templates.as_ref(), &issued.fields) {
        Ok(data) => data,
        Err(error) => {
            // Never delivered: revoke it at once.
            if let Some(id) = &issued.lease_id {
                revoke::lease(job.obj, job.ctx, id).await;
            }
            return Err(Failure::permanent(reasons::INVALID_SPEC, error.to_string()));
        }
    };
    let hmac = job.ctx.state.hmac.digest(&data);
    let lease = Lease::issued(issued_at, issued.ttl, issued.renewable);
    let first = record.current.is_none();
    record.fingerprint = fingerprint.to_owned();
    let mut next = Current::new(issued.lease_id.clone(), &lease, hmac.clone());
    // Only a lease ends with its token; a certificate without one just expires.
    next.token_expires_at = issued.lease_id.as_ref().map(|_| token.expires_at);
    // A replaced credential without a lease (a certificate) retires nothing, but the
    // workloads still roll onto the new one.
    let restart_now = record.current.as_ref().is_some_and(|c| c.id.is_none());
    record.replace(next);
    // The lease id replaces the intent in one conditional write: a successor that
    // claimed the intent meanwhile (before it revokes this token) makes it fail.
    record.issuing = None;
    // The lease id is on record before the credential is used anywhere.
    match store::save(job.secrets, job.obj, record, stored).await {
        Ok(s) => stored = Some(s),
        Err(failure) => {
            abandon_issue(
                job.obj,
                job.ctx,
                &token.token,
                revocable,
                issued.lease_id.as_deref(),
            )
            .await;
            return Err(failure);
        }
    }
    if issued.lease_id.is_some() {
        job.ctx.state.issuers.lock().insert(uid.clone(), token.generation);
    } else {
        job.ctx.state.issuers.lock().remove(&uid);
    }
    job.ctx.state.delivered.lock().insert(
        uid.clone(),
        (issued.lease_id.clone().unwrap_or_default(), data.clone()),
    );
    target::write(job.secrets, job.obj, job.target.as_ref(), &data).await?;
    job.ctx
        .metrics()
        .propagation
        .observe(Timestamp::now().duration_since(issued_at).as_secs_f64().max(0.0));
    if restart_now {
        job.ctx.restart_all(job.obj).await;
    }
    let write = if first { Write::Created } else { Write::Rotated };
    job.ctx
        .event(
            job.obj,
            EventType::Normal,
            if first { reasons::SYNCED } else { reasons::ROTATED },
            "Issue",
            format!(
                "Wrote a new credential to Secret {} ({why}); valid until {}",
                job.obj.spec.target.name,
                lease.expires_at()
            ),
        )
        .await;
    Ok((stored, write))
}

/// A new credential, issued with `token` (a login of its own, see `leases::Issuing`).
/// No second attempt with another token: a refusal means the policy refuses, or that a
/// successor revoked this token (it found the intent), and then nothing may be issued.
pub async fn issue(
    obj: &SecretSync,
    ctx: &Ctx,
    kind: SourceKind,
    token: &str,
) -> Result<engine::Issued, Failure> {
    let result = match kind {
        SourceKind::Database => {
            let db = obj
                .spec
                .source
                .database
                .as_ref()
                .expect("validated: a database source");
            ctx.state.engine.database_creds(token, &db.mount, &db.role).await
        }
        _ => {
            let pki = obj.spec.source.pki.as_ref().expect("validated: a pki source");
            ctx.state.engine.pki_issue(token, pki).await
        }
    };
    result.map_err(Failure::engine)
}

/// Finishes what a stopped issue left (an intent without a recorded lease), in three
/// steps, each safe to repeat (K1, K4): claim the intent (a conditional write marking it
/// `revoking`: from then on the issuer's own conditional write of its lease id fails,
/// so a thawed issuer cannot record or deliver the credential about to be revoked),
/// revoke its token (and with it the lease it may have obtained), clear the intent. A
/// reconcile that finds the intent claimed (its claimant stopped) revokes again, which
/// changes nothing if it was done. Returns the record's Secret as stored.
pub async fn finish_orphan(
    secrets: &Api<Secret>,
    obj: &SecretSync,
    ctx: &Ctx,
    record: &mut Record,
    mut stored: Option<Secret>,
) -> Result<Option<Secret>, Failure> {
    let Some(mut issuing) = record.issuing.clone() else {
        return Ok(stored);
    };
    if !issuing.revoking {
        issuing.revoking = true;
        record.issuing = Some(issuing.clone());
        stored = Some(store::save(secrets, obj, record, stored).await?);
        fault::point("claimed").await;
    }
    revoke_orphan(obj, ctx, &issuing).await.map_err(Failure::engine)?;
    fault::point("revoked").await;
    record.issuing = None;
    Ok(Some(store::save(secrets, obj, record, stored).await?))
}

/// What revoking an orphan's token achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Orphan {
    /// Revoked now, with whatever it obtained.
    Revoked,
    /// The engine no longer knows it (revoked or expired already): nothing is left.
    Gone,
    /// Refused, and nothing shows that the token is gone: whatever it obtained may stay
    /// valid until the token ends.
    NotRevoked,
}

/// Reads the engine's answer to revoke-self (pure). The engine refuses an unknown token
/// and a token without the grant alike; a token that had the grant when it was made
/// (`revocable`) is refused only because it is gone.
pub fn orphan_outcome(revoked: Result<(), engine::Error>, revocable: bool) -> Result<Orphan, engine::Error> {
    match revoked {
        Ok(()) => Ok(Orphan::Revoked),
        Err(engine::Error::Denied { .. }) if revocable => Ok(Orphan::Gone),
        Err(engine::Error::Denied { .. }) => Ok(Orphan::NotRevoked),
        Err(error) => Err(error),
    }
}

/// Revokes the token of an intent, and so the lease it may have issued; Ok once nothing
/// more can be done (revoked, gone, or refused: reported, never claimed as revoked).
async fn revoke_orphan(obj: &SecretSync, ctx: &Ctx, issuing: &Issuing) -> Result<(), engine::Error> {
    let uid = obj.uid().unwrap_or_default();
    let Some(token) = ctx
        .state
        .hmac
        .open(&uid, &issuing.sealed_token)
        .and_then(|t| String::from_utf8(t).ok())
    else {
        // Not sealed under this key (the key Secret was replaced): nothing can be done
        // but let the engine end the lease with its token.
        abandon_orphan(
            obj,
            ctx,
            issuing,
            "The intent of an unrecorded issue cannot be opened; its lease ends with its token",
            "An interrupted issue left a token that cannot be opened (the controller's key changed)",
        )
        .await;
        return Ok(());
    };
    let outcome = orphan_outcome(ctx.state.engine.revoke_self(&token).await, issuing.revocable)?;
    if ctx.state.tokens.holds(&uid, &token) {
        ctx.drop_token(obj);
    }
    match outcome {
        Orphan::Revoked => {
            tracing::info!(since = %issuing.since, "Revoked the token of an issue that was never recorded");
            ctx.revocation(
                obj,
                "revoked",
                reasons::LEASE_REVOKED,
                "Revoked whatever an interrupted issue obtained (its lease was never recorded)".to_owned(),
            )
            .await;
        }
        Orphan::Gone => {
            tracing::info!(
                since = %issuing.since,
                "The token of an issue that was never recorded is already gone (revoked or expired): nothing to revoke"
            );
        }
        Orphan::NotRevoked => {
            abandon_orphan(
                obj,
                ctx,
                issuing,
                "The engine refused to revoke the token of an issue that was never recorded; what it obtained ends with it",
                "An interrupted issue's token could not be revoked (the engine refused auth/token/revoke-self, \
                 which the role's policy did not grant)",
            )
            .await;
        }
    }
    Ok(())
}

/// An orphan that cannot be revoked: counted, logged and told in an Event, never claimed
/// as revoked; what it obtained stays valid until its token ends.
async fn abandon_orphan(obj: &SecretSync, ctx: &Ctx, issuing: &Issuing, log: &str, why: &str) {
    tracing::warn!(since = %issuing.since, "{log}");
    ctx.revocation(
        obj,
        "abandoned",
        reasons::ORPHAN_NOT_REVOKED,
        format!(
            "{why}: a credential it may have obtained stays valid until that token ends{}",
            until(issuing)
        ),
    )
    .await;
}

/// " at <time>" when an intent's token expiry is known.
pub fn until(issuing: &Issuing) -> String {
    issuing
        .token_expires_at
        .map(|t| format!(" at {t}"))
        .unwrap_or_default()
}

/// Ends a credential this reconcile obtained but could not record (its record changed
/// since the intent: a successor claimed it, or the write failed): revoking the issue's
/// own token ends exactly that credential, also when the successor got there first (the
/// token is then gone). Without the grant, the lease id is revoked instead.
pub async fn abandon_issue(
    obj: &SecretSync,
    ctx: &Ctx,
    token: &str,
    revocable: bool,
    lease_id: Option<&str>,
) {
    match orphan_outcome(ctx.state.engine.revoke_self(token).await, revocable) {
        Ok(outcome @ (Orphan::Revoked | Orphan::Gone)) => {
            ctx.drop_token(obj);
            tracing::info!(
                already = outcome == Orphan::Gone,
                "Revoked the token (and credential) of an issue whose lease id could not be recorded"
            );
        }
        Ok(Orphan::NotRevoked) | Err(_) => {
            if let Some(id) = lease_id {
                revoke::lease(obj, ctx, id).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_revoke_self_counts_as_gone_only_for_a_token_that_had_the_grant() {
        let denied = || {
            Err(engine::Error::Denied {
                path: "auth/token/revoke-self".into(),
                message: "permission denied".into(),
            })
        };
        assert_eq!(orphan_outcome(Ok(()), true).unwrap(), Orphan::Revoked);
        assert_eq!(orphan_outcome(Ok(()), false).unwrap(), Orphan::Revoked);
        // Had the grant: refused because the engine no longer knows it.
        assert_eq!(orphan_outcome(denied(), true).unwrap(), Orphan::Gone);
        // Never had it (or not known, an older record): possibly live, reported as such.
        assert_eq!(orphan_outcome(denied(), false).unwrap(), Orphan::NotRevoked);
        // An engine that could not answer: retried, the intent kept.
        let down = orphan_outcome(
            Err(engine::Error::Sealed {
                path: "auth/token/revoke-self".into(),
            }),
            true,
        );
        assert!(matches!(down, Err(engine::Error::Sealed { .. })));
        let issuing = Issuing {
            sealed_token: String::new(),
            since: Timestamp::from_second(1_800_000_000).unwrap(),
            revocable: false,
            token_expires_at: Some(Timestamp::from_second(1_800_003_600).unwrap()),
            revoking: true,
        };
        assert_eq!(until(&issuing), " at 2027-01-15T09:00:00Z");
    }
}
