//! Leader election on a coordination.k8s.io Lease.
//!
//! One replica holds the Lease and runs the reconcilers; the others wait. Every write
//! to the Lease carries the resourceVersion it was computed from, so two candidates can
//! never both believe they took it. Expiry is judged the way client-go judges it: by
//! how long *this* process has watched the record stay unchanged, on its own monotonic
//! clock, never by comparing another node's `renewTime` with our wall clock, so clock
//! skew between nodes cannot hand the Lease to two holders.
//!
//! A holder trusts its term only until `renew_deadline` after the start of its last
//! successful renewal (`renew_deadline` < `lease_duration`). A holder that was paused
//! (SIGSTOP, a long GC, a frozen VM) past that finds its term over the moment it
//! resumes, before it writes anything: that is the fence reconcilers check.
//!
//! Why this is kept rather than a maintained lease manager (issue 16 asked for one
//! unless it lacks this fence). kube-lease-manager 0.13 is compatible (kube 5,
//! k8s-openapi 0.29) but reports leadership through a watch channel that its
//! background task updates, and judges expiry from the Lease's `renewTime` against the
//! local wall clock. A holder paused past its term (SIGSTOP: e2e_leader and
//! e2e_secretsync_failover freeze a leader and check that it writes nothing when it
//! thaws) resumes still reading "leader" until that task has run again, and a
//! reconcile can write in that window; `Leadership::ensure` answers synchronously from
//! this process's monotonic clock, with the renew deadline's margin below the lease
//! duration, before every write. kubert's lease module stamps its claims with the
//! Lease's wall-clock expiry (skew between nodes then decides who believes it leads)
//! and needs the Lease created beforehand. kube-lease-manager would also bring a
//! second `rand` (0.10 beside our 0.9).

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use parking_lot::Mutex;
use std::{sync::Arc, time::Duration};
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct Config {
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this replica does not hold the leader lease")]
    NotLeader,
}

/// Whether this replica may act as leader right now. Cheap to clone and to check.
#[derive(Clone, Debug, Default)]
pub struct Leadership(Arc<Mutex<Option<Instant>>>);

impl Leadership {
    /// Ok while the current term is valid; reconcilers call this before every write.
    pub fn ensure(&self) -> Result<(), Error> {
        match *self.0.lock() {
            Some(until) if Instant::now() < until => Ok(()),
            _ => Err(Error::NotLeader),
        }
    }

    /// A term that lasts `term` from now, for tests that drive a reconciler directly.
    #[cfg(test)]
    pub fn held_for(term: Duration) -> Self {
        let leadership = Self::default();
        leadership.extend(Instant::now() + term);
        leadership
    }

    fn extend(&self, until: Instant) {
        *self.0.lock() = Some(until);
    }

    fn end(&self) {
        *self.0.lock() = None;
    }
}

/// What this process last saw of the Lease, and when it first saw it that way.
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    since: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    config: Config,
    leadership: Leadership,
    observed: Option<Observed>,
}

/// How a term ended.
#[derive(Debug, PartialEq, Eq)]
pub enum TermEnd {
    /// Renewal did not succeed within the renew deadline, or another holder took over.
    Lost,
}

impl Elector {
    pub fn new(api: Api<Lease>, config: Config) -> Self {
        assert!(
            config.renew_deadline < config.lease_duration,
            "renew deadline must be below the lease duration"
        );
        Self {
            api,
            config,
            leadership: Leadership::default(),
            observed: None,
        }
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.config.lease_name, identity = %self.config.identity, "Acquired leadership");
                    return;
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, lease = %self.config.lease_name, "Acquiring the leader lease")
                }
            }
            tokio::time::sleep(jittered(self.config.retry_period)).await;
        }
    }

    /// Renews the Lease every retry period until a renewal fails to land within the
    /// renew deadline. Returns when the term is over; the caller must stop acting.
    pub async fn hold(&mut self) -> TermEnd {
        let mut last_success = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let attempt = tokio::time::timeout(self.config.renew_deadline, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(true)) => last_success = Instant::now(),
                Ok(Ok(false)) => {
                    self.leadership.end();
                    tracing::warn!(lease = %self.config.lease_name, "Lost leadership: another replica holds the lease");
                    return TermEnd::Lost;
                }
                Ok(Err(error)) => tracing::warn!(%error, "Renewing the leader lease"),
                Err(_) => tracing::warn!("Renewing the leader lease timed out"),
            }
            if last_success.elapsed() >= self.config.renew_deadline || self.leadership.ensure().is_err() {
                self.leadership.end();
                tracing::warn!(lease = %self.config.lease_name, "Lost leadership: could not renew within the deadline");
                return TermEnd::Lost;
            }
        }
    }

    /// Gives the Lease up (on clean shutdown) so a standby takes over at once instead of
    /// waiting out the lease duration. Only a Lease still ours is touched.
    pub async fn release(&mut self) {
        self.leadership.end();
        let Ok(Some(lease)) = self.api.get_opt(&self.config.lease_name).await else {
            return;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(&self.config.identity) {
            return;
        }
        let released = Lease {
            metadata: lease.metadata.clone(),
            spec: Some(LeaseSpec {
                holder_identity: None,
                lease_duration_seconds: Some(1),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..spec
            }),
        };
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &released)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.config.lease_name, "Released leadership"),
            Err(error) => tracing::warn!(%error, "Releasing the leader lease"),
        }
    }

    /// One round of the election. Returns whether this replica holds the Lease after it.
    async fn try_acquire_or_renew(&mut self) -> kube::Result<bool> {
        let started = Instant::now();
        let now = MicroTime(Timestamp::now());
        let duration_secs = self.config.lease_duration.as_secs().max(1) as i32;
        let Some(current) = self.api.get_opt(&self.config.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(self.won(started)),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };

        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.config.identity.as_str());
        let observed_changed = match &self.observed {
            Some(o) => o.holder != holder || o.renew_time != spec.renew_time,
            None => true,
        };
        if observed_changed {
            self.observed = Some(Observed {
                holder: holder.clone(),
                renew_time: spec.renew_time.clone(),
                since: started,
            });
        }
        if !ours && holder.is_some() {
            let held_for =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration_secs).max(1) as u64);
            let since = self.observed.as_ref().map(|o| o.since).unwrap_or(started);
            if since.elapsed() < held_for {
                return Ok(false);
            }
            tracing::info!(
                previous = holder.as_deref().unwrap_or(""),
                "Leader lease expired; taking over"
            );
        }

        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let next = Lease {
            metadata: current.metadata.clone(),
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: if ours {
                    spec.acquire_time.clone()
                } else {
                    Some(now.clone())
                },
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..spec
            }),
        };
        // `current.metadata` carries its resourceVersion: the API server refuses this write
        // with 409 if anyone else wrote the Lease since we read it.
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(self.won(started)),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn won(&mut self, started: Instant) -> bool {
        self.leadership.extend(started + self.config.renew_deadline);
        self.observed = None;
        true
    }
}

/// Up to 20% longer, so standbys do not poll in lockstep.
fn jittered(period: Duration) -> Duration {
    period.mul_f64(1.0 + rand::random::<f64>() * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leadership_expires_without_renewal() {
        let leadership = Leadership::default();
        assert!(leadership.ensure().is_err(), "not leader before the first term");
        leadership.extend(Instant::now() + Duration::from_secs(10));
        assert!(leadership.ensure().is_ok());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            leadership.ensure().is_err(),
            "a paused holder must not act past its deadline"
        );
    }
}
