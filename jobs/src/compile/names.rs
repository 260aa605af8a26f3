//! Names of the objects a Job runs as. Each is at most 63 characters, fewer where
//! Kubernetes appends to it (batch Jobs, CronJobs): a longer one is truncated and ends
//! with a hash of the whole, so two long names never collide and the same inputs always
//! give the same name.

use serde::Serialize;

/// Most object names (and label values) are DNS labels: at most 63 characters.
pub const MAX: usize = 63;
/// A batch/v1 Job's name: in Indexed mode each pod's hostname is `<job>-<index>`, a DNS
/// label, and the API server refuses a Job whose last index would not fit (a count is at
/// most 10,000: `-9999`).
pub const BATCH_JOB_MAX: usize = MAX - 5;
/// A CronJob's name: its runs are batch Jobs named `<cronjob>-<11 characters>`.
pub const CRON_JOB_MAX: usize = BATCH_JOB_MAX - 11;
/// How many hex digits a hash in a name has.
const HASH_LEN: usize = 10;

/// `parts` joined by `-`, at most [`MAX`] characters.
pub fn object_name(parts: &[&str]) -> String {
    bounded(parts, MAX)
}

/// `parts` joined by `-`; when longer than `max`, cut to leave room for `-<hash>` of the
/// full name (and never ending in `-` or `.` at the cut).
pub fn bounded(parts: &[&str], max: usize) -> String {
    let full = parts.join("-");
    if full.len() <= max {
        return full;
    }
    let digest = hash(full.as_bytes());
    let keep = max - HASH_LEN - 1;
    let cut = full[..keep].trim_end_matches(['-', '.']);
    format!("{cut}-{digest}")
}

/// A short, stable hash (FNV-1a 64, the first 10 hex digits): the same bytes give the
/// same hash in every build and on every machine.
pub fn hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")[..HASH_LEN].to_owned()
}

/// [`hash`] of a value's JSON (serde_json writes struct fields in declaration order and
/// maps sorted, so equal values hash equally).
pub fn template_hash(value: &impl Serialize) -> String {
    let json = serde_json::to_vec(value).expect("a Kubernetes or jobs type serializes to JSON");
    hash(&json)
}

/// A service group's ReplicaSet: `<job>-<group>-<hash>`.
pub fn replica_set(job: &str, group: &str, hash: &str) -> String {
    object_name(&[job, group, hash])
}

/// A batch group's run of `version`: `<job>-<group>-v<N>`.
pub fn batch_job(job: &str, group: &str, version: i64) -> String {
    bounded(&[job, group, &format!("v{version}")], BATCH_JOB_MAX)
}

/// A system group's DaemonSet: `<job>-<group>` (it rolls itself to new versions).
pub fn daemon_set(job: &str, group: &str) -> String {
    object_name(&[job, group])
}

/// A sysbatch group's run of `version` on `node`: `<job>-<group>-v<N>-<hash of node>`.
pub fn sysbatch_job(job: &str, group: &str, version: i64, node: &str) -> String {
    bounded(
        &[job, group, &format!("v{version}"), &hash(node.as_bytes())],
        BATCH_JOB_MAX,
    )
}

/// A periodic group's CronJob for its `index`th cron: `<job>-<group>-cron<i>`.
pub fn cron_job(job: &str, group: &str, index: usize) -> String {
    bounded(&[job, group, &format!("cron{index}")], CRON_JOB_MAX)
}

/// A group service's Service: `<job>-<service>`.
pub fn service(job: &str, service: &str) -> String {
    object_name(&[job, service])
}

/// The PriorityClass of priority `priority`: `capstan-priority-<n>`.
pub fn priority_class(priority: i32) -> String {
    format!("capstan-priority-{priority}")
}

/// A dispatched child's payload Secret: `<child>-payload`.
pub fn payload_secret(child: &str) -> String {
    object_name(&[child, "payload"])
}

/// The ControllerRevision of a version: `<job>-v<N>`.
pub fn revision(job: &str, version: i64) -> String {
    object_name(&[job, &format!("v{version}")])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_joined() {
        assert_eq!(replica_set("web", "api", "0123456789"), "web-api-0123456789");
        assert_eq!(batch_job("etl", "load", 3), "etl-load-v3");
        assert_eq!(daemon_set("agent", "node"), "agent-node");
        assert_eq!(cron_job("report", "send", 0), "report-send-cron0");
        assert_eq!(service("web", "http"), "web-http");
        assert_eq!(priority_class(80), "capstan-priority-80");
        assert_eq!(payload_secret("task-ab12"), "task-ab12-payload");
        assert_eq!(revision("web", 7), "web-v7");
        let node = sysbatch_job("gc", "sweep", 2, "node-1");
        assert!(node.starts_with("gc-sweep-v2-") && node.len() == "gc-sweep-v2-".len() + 10);
    }

    #[test]
    fn long_names_are_cut_and_hashed() {
        let job = "a".repeat(40);
        let group = "b".repeat(20);
        let name = batch_job(&job, &group, 12);
        assert_eq!(name.len(), BATCH_JOB_MAX);
        assert!(name.starts_with(&format!("{job}-bbb")));
        let other = batch_job(&job, &group, 13);
        assert!(other.len() <= BATCH_JOB_MAX);
        assert!(sysbatch_job(&job, &group, 12, "node-1").len() <= BATCH_JOB_MAX);
        assert_eq!(replica_set(&job, &group, "0123456789").len(), MAX);
        assert_ne!(name, other, "the hash keeps truncated names apart");
        let cron = cron_job(&job, &group, 1);
        assert!(cron.len() <= CRON_JOB_MAX);
        // A cut never leaves a dangling separator before the hash.
        let dashed = bounded(&["x".repeat(51).as_str(), "yyyyyyyyyyyyyy"], MAX);
        assert!(!dashed.contains("--"), "{dashed}");
    }

    #[test]
    fn hashes_are_stable() {
        // FNV-1a 64 of "" and "a", the algorithm's published values.
        assert_eq!(hash(b""), "cbf29ce484");
        assert_eq!(hash(b"a"), "af63dc4c86");
        assert_eq!(template_hash(&vec![1, 2]), template_hash(&vec![1, 2]));
        assert_ne!(template_hash(&vec![1, 2]), template_hash(&vec![2, 1]));
    }
}
