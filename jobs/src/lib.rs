//! Nomad's job model on Kubernetes, as pure functions over a [`capstan_crds::jobs::Job`]:
//!
//! - `attributes`: Nomad's node attributes (`${node.datacenter}`, `${meta.rack}`) as node labels;
//! - `validate`: what the schema cannot say (regexps, versions, crons, dispatch meta), with
//!   the field named;
//! - `compile`: the native objects a Job runs as (ReplicaSets, batch Jobs, CronJobs,
//!   DaemonSets, Services, PriorityClasses) and where their pods may go;
//! - `plan`: what applying a new spec over the stored one changes, group by group.
//!
//! No IO: the controller, the webhook and the CLI all call these, so what the webhook
//! accepts is exactly what the controller can compile.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod attributes;
pub mod compile;
pub mod plan;
pub mod validate;
