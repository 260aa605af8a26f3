//! Which ServiceIntentions is in force for a destination (pure).
//!
//! Consul keeps one intentions entry per destination; Kubernetes cannot stop two objects
//! from naming the same one. The oldest (by creation, then namespace/name) is in force,
//! so a new object can never silently change what an existing one decided; the others
//! report the conflict in their status until it is resolved.
//!
//! Tenancy comes first: an object governs destinations in its own namespace only, so a
//! tenant can neither grant itself access to another namespace's services nor shadow
//! their own intentions. Only Capstan's own namespace (the control namespace) may name
//! other namespaces, `*` included, for cluster-wide rules. The API server refuses such
//! objects at the door (the chart's ValidatingAdmissionPolicy and the webhook), and
//! everyone who reads intentions (reconciler, sidecars, CLI) ignores one stored anyway:
//! created before the rule, or while the webhook was down.

use capstan_crds::ServiceIntentions;
use kube::ResourceExt;

/// The destination an object protects, as (namespace, name).
pub fn destination(obj: &ServiceIntentions) -> (String, String) {
    (
        obj.destination_namespace().unwrap_or_default().to_owned(),
        obj.spec.destination.name.clone(),
    )
}

fn age_key(obj: &ServiceIntentions) -> (Option<k8s_openapi::jiff::Timestamp>, String, String) {
    (
        obj.creation_timestamp().map(|t| t.0),
        obj.namespace().unwrap_or_default(),
        obj.name_any(),
    )
}

/// Why `obj` may not govern the destination it names, or None when it may. The message
/// names the field, as the admission checks that share it report it.
pub fn out_of_bounds(obj: &ServiceIntentions, control_namespace: &str) -> Option<String> {
    let own = obj.metadata.namespace.as_deref().unwrap_or_default();
    let named = obj.spec.destination.namespace.as_deref()?;
    if named == own || own == control_namespace {
        return None;
    }
    Some(format!(
        "spec.destination.namespace: {named:?} is not this object's namespace ({own:?}); a \
         ServiceIntentions governs only destinations in its own namespace (leave the field \
         unset or set it to {own:?}); cluster-wide rules belong in Capstan's namespace \
         ({control_namespace:?})"
    ))
}

pub fn key(obj: &ServiceIntentions) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// The verdict for `obj` among `all` (which may or may not include `obj` itself).
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `obj` is in force; the listed objects name the same destination and are not.
    InForce { shadowed: Vec<String> },
    /// The listed object is in force instead of `obj`.
    Shadowed { by: String },
    /// `obj` names a destination outside its own namespace: it governs nothing.
    OutOfBounds { reason: String },
}

/// `control_namespace` is Capstan's own namespace (see [`out_of_bounds`]); an object out
/// of bounds is never in force and never shadows another.
pub fn verdict<'a>(
    obj: &ServiceIntentions,
    all: impl IntoIterator<Item = &'a ServiceIntentions>,
    control_namespace: &str,
) -> Verdict {
    if let Some(reason) = out_of_bounds(obj, control_namespace) {
        return Verdict::OutOfBounds { reason };
    }
    let dest = destination(obj);
    let me = key(obj);
    let mut rivals: Vec<&ServiceIntentions> = all
        .into_iter()
        .filter(|o| {
            key(o) != me
                && o.metadata.deletion_timestamp.is_none()
                && destination(o) == dest
                && out_of_bounds(o, control_namespace).is_none()
        })
        .collect();
    rivals.sort_by_key(|o| age_key(o));
    match rivals.first() {
        Some(oldest) if age_key(oldest) < age_key(obj) => Verdict::Shadowed { by: key(oldest) },
        _ => Verdict::InForce {
            shadowed: rivals.iter().map(|o| key(o)).collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_crds::{IntentionDestination, ServiceIntentionsSpec};
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

    const CONTROL: &str = "capstan-system";

    fn intention(name: &str, dest: &str, created_secs: i64) -> ServiceIntentions {
        let mut obj = ServiceIntentions::new(
            name,
            ServiceIntentionsSpec {
                destination: IntentionDestination {
                    name: dest.into(),
                    namespace: None,
                },
                sources: vec![],
                jwt: None,
            },
        );
        obj.metadata.namespace = Some("shop".into());
        obj.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created_secs).unwrap()));
        obj
    }

    #[test]
    fn alone_is_in_force() {
        let a = intention("a", "api", 10);
        assert_eq!(verdict(&a, [&a], CONTROL), Verdict::InForce { shadowed: vec![] });
    }

    #[test]
    fn oldest_wins_and_reports_the_rest() {
        let a = intention("a", "api", 10);
        let b = intention("b", "api", 20);
        let other = intention("c", "web", 5);
        assert_eq!(
            verdict(&a, [&a, &b, &other], CONTROL),
            Verdict::InForce {
                shadowed: vec!["shop/b".into()]
            }
        );
        assert_eq!(
            verdict(&b, [&a, &b, &other], CONTROL),
            Verdict::Shadowed { by: "shop/a".into() }
        );
    }

    #[test]
    fn same_age_breaks_ties_by_name() {
        let a = intention("a", "api", 10);
        let b = intention("b", "api", 10);
        assert_eq!(
            verdict(&b, [&a, &b], CONTROL),
            Verdict::Shadowed { by: "shop/a".into() }
        );
    }

    #[test]
    fn explicit_namespace_equal_to_own_is_the_same_destination() {
        let a = intention("a", "api", 10);
        let mut b = intention("b", "api", 20);
        b.spec.destination.namespace = Some("shop".into());
        assert_eq!(
            verdict(&b, [&a, &b], CONTROL),
            Verdict::Shadowed { by: "shop/a".into() }
        );
    }

    #[test]
    fn deleting_objects_do_not_count() {
        let mut a = intention("a", "api", 10);
        a.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(30).unwrap()));
        let b = intention("b", "api", 20);
        assert_eq!(
            verdict(&b, [&a, &b], CONTROL),
            Verdict::InForce { shadowed: vec![] }
        );
    }

    #[test]
    fn a_tenant_governs_only_its_own_namespace() {
        // Older than the owner's own object: were it counted, it would shadow it.
        let mut grab = intention("grab", "db", 1);
        grab.metadata.namespace = Some("evil".into());
        grab.spec.destination.namespace = Some("shop".into());
        let owner = intention("db", "db", 10);
        assert!(matches!(
            verdict(&grab, [&grab, &owner], CONTROL),
            Verdict::OutOfBounds { reason } if reason.starts_with("spec.destination.namespace:")
        ));
        assert_eq!(
            verdict(&owner, [&grab, &owner], CONTROL),
            Verdict::InForce { shadowed: vec![] }
        );

        let mut everywhere = intention("all", "*", 1);
        everywhere.metadata.namespace = Some("evil".into());
        everywhere.spec.destination.namespace = Some("*".into());
        assert!(matches!(
            verdict(&everywhere, [&everywhere], CONTROL),
            Verdict::OutOfBounds { .. }
        ));
    }

    #[test]
    fn capstans_namespace_may_name_any_namespace() {
        let mut defaults = intention("defaults", "*", 1);
        defaults.metadata.namespace = Some(CONTROL.into());
        defaults.spec.destination.namespace = Some("*".into());
        assert_eq!(
            verdict(&defaults, [&defaults], CONTROL),
            Verdict::InForce { shadowed: vec![] }
        );
        assert_eq!(
            verdict(&defaults, [&defaults], "other-capstan"),
            Verdict::OutOfBounds {
                reason: out_of_bounds(&defaults, "other-capstan").unwrap()
            }
        );
    }
}
