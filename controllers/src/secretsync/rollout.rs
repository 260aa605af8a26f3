//! Restarting the Deployments that use a Secret, as `kubectl rollout restart` does,
//! and telling when they have rolled out.

use super::{Ctx, leases::RolloutMark, reasons};
use capstan_crds::SecretSync;
use k8s_openapi::{api::apps::v1::Deployment, jiff::Timestamp};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::EventType,
};

pub const RESTARTED_AT: &str = "capstan.dev/restartedAt";

/// Sets the pod template annotation; returns the generation the change produced, or
/// None when the Deployment does not exist.
pub async fn restart(api: &Api<Deployment>, name: &str, at: &str) -> Result<Option<i64>, kube::Error> {
    let patch = serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: at}}}}
    });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(deployment) => Ok(Some(deployment.metadata.generation.unwrap_or(0))),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

impl Ctx {
    /// Restarts every Deployment of `rolloutRestart`; the marks of those that exist.
    pub(super) async fn restart_all(&self, obj: &SecretSync) -> Vec<RolloutMark> {
        let ns = obj.namespace().unwrap_or_default();
        let api = Api::<Deployment>::namespaced(self.client.clone(), &ns);
        let at = Timestamp::now().to_string();
        let mut marks = vec![];
        for target in &obj.spec.rollout_restart {
            let (type_, reason, note) = match restart(&api, &target.name, &at).await {
                Ok(Some(generation)) => {
                    marks.push(RolloutMark {
                        name: target.name.clone(),
                        generation,
                    });
                    (
                        EventType::Normal,
                        reasons::ROLLOUT_RESTARTED,
                        format!("Restarted Deployment {} for the new Secret value", target.name),
                    )
                }
                Ok(None) => (
                    EventType::Warning,
                    reasons::ROLLOUT_TARGET_MISSING,
                    format!("Deployment {} of rolloutRestart does not exist", target.name),
                ),
                Err(error) => {
                    tracing::warn!(%error, deployment = %target.name, "Restarting a Deployment");
                    (
                        EventType::Warning,
                        reasons::ROLLOUT_RESTART_FAILED,
                        format!("Restarting Deployment {}: {error}", target.name),
                    )
                }
            };
            self.event(obj, type_, reason, "Restart", note).await;
        }
        marks
    }
}

/// Whether `deployment` has rolled out the template of `generation`: observed, every
/// replica updated and available, no old replica left (`kubectl rollout status`).
pub fn rolled_out(deployment: &Deployment, generation: i64) -> bool {
    let Some(status) = deployment.status.as_ref() else {
        return false;
    };
    let wanted = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    status.observed_generation.unwrap_or(0) >= generation
        && status.updated_replicas.unwrap_or(0) >= wanted
        && status.replicas.unwrap_or(0) <= status.updated_replicas.unwrap_or(0)
        && status.available_replicas.unwrap_or(0) >= status.updated_replicas.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(replicas: i32, observed: i64, updated: i32, total: i32, available: i32) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "generation": 3},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
            "status": {"observedGeneration": observed, "updatedReplicas": updated,
                       "replicas": total, "availableReplicas": available},
        }))
        .unwrap()
    }

    #[test]
    fn rolled_out_only_when_every_replica_is_new_and_available() {
        assert!(rolled_out(&deployment(2, 3, 2, 2, 2), 3));
        assert!(
            !rolled_out(&deployment(2, 2, 2, 2, 2), 3),
            "generation not observed yet"
        );
        assert!(
            !rolled_out(&deployment(2, 3, 1, 3, 2), 3),
            "one replica still old"
        );
        assert!(
            !rolled_out(&deployment(2, 3, 2, 3, 2), 3),
            "an old replica still running"
        );
        assert!(
            !rolled_out(&deployment(2, 3, 2, 2, 1), 3),
            "a new replica not available"
        );
        assert!(rolled_out(&deployment(0, 3, 0, 0, 0), 3), "scaled to zero");
    }
}
