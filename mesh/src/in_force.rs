//! Which ServiceIntentions is in force for a destination (pure).
//!
//! Consul keeps one intentions entry per destination; Kubernetes cannot stop two objects
//! from naming the same one. The oldest (by creation, then namespace/name) is in force,
//! so a new object can never silently change what an existing one decided; the others
//! report the conflict in their status until it is resolved.

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
}

pub fn verdict<'a>(obj: &ServiceIntentions, all: impl IntoIterator<Item = &'a ServiceIntentions>) -> Verdict {
    let dest = destination(obj);
    let me = key(obj);
    let mut rivals: Vec<&ServiceIntentions> = all
        .into_iter()
        .filter(|o| key(o) != me && o.metadata.deletion_timestamp.is_none() && destination(o) == dest)
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

    fn intention(name: &str, dest: &str, created_secs: i64) -> ServiceIntentions {
        let mut obj = ServiceIntentions::new(
            name,
            ServiceIntentionsSpec {
                destination: IntentionDestination {
                    name: dest.into(),
                    namespace: None,
                },
                sources: vec![],
            },
        );
        obj.metadata.namespace = Some("shop".into());
        obj.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created_secs).unwrap()));
        obj
    }

    #[test]
    fn alone_is_in_force() {
        let a = intention("a", "api", 10);
        assert_eq!(verdict(&a, [&a]), Verdict::InForce { shadowed: vec![] });
    }

    #[test]
    fn oldest_wins_and_reports_the_rest() {
        let a = intention("a", "api", 10);
        let b = intention("b", "api", 20);
        let other = intention("c", "web", 5);
        assert_eq!(
            verdict(&a, [&a, &b, &other]),
            Verdict::InForce {
                shadowed: vec!["shop/b".into()]
            }
        );
        assert_eq!(
            verdict(&b, [&a, &b, &other]),
            Verdict::Shadowed { by: "shop/a".into() }
        );
    }

    #[test]
    fn same_age_breaks_ties_by_name() {
        let a = intention("a", "api", 10);
        let b = intention("b", "api", 10);
        assert_eq!(verdict(&b, [&a, &b]), Verdict::Shadowed { by: "shop/a".into() });
    }

    #[test]
    fn explicit_namespace_equal_to_own_is_the_same_destination() {
        let a = intention("a", "api", 10);
        let mut b = intention("b", "api", 20);
        b.spec.destination.namespace = Some("shop".into());
        assert_eq!(verdict(&b, [&a, &b]), Verdict::Shadowed { by: "shop/a".into() });
    }

    #[test]
    fn deleting_objects_do_not_count() {
        let mut a = intention("a", "api", 10);
        a.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(30).unwrap()));
        let b = intention("b", "api", 20);
        assert_eq!(verdict(&b, [&a, &b]), Verdict::InForce { shadowed: vec![] });
    }
}
