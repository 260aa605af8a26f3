//! The audit log: every request and its response, one JSON line each, with every string
//! value (tokens, accessors, secret data) replaced by its HMAC-SHA256 under a key kept in
//! the barrier, so the log shows that a value was seen and lets an operator check a
//! suspected value (`sys/audit-hash`), without holding it. Fail-closed (DESIGN decision
//! 4): a request whose record no sink accepted does not run, and a response whose record
//! no sink accepted is replaced by an error. A sink that hangs counts as failed after
//! `WRITE_TIMEOUT`.

use crate::{
    auth::token::TokenEntry,
    store::logical::{Logical, LogicalError},
    store::storage::Precondition,
};
use parking_lot::{Mutex, RwLock};
use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

/// How long one sink may take to accept a record.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

const HMAC_KEY_PATH: &str = "core/audit-hmac-key";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("no audit sink succeeded; the request was not processed")]
    NoSink,
    #[error("audit sink {path}: {reason}")]
    Config { path: String, reason: String },
    #[error("the audit HMAC key: {0}")]
    Key(&'static str),
    #[error(transparent)]
    Storage(#[from] LogicalError),
}

/// Where records go.
pub enum Sink {
    File {
        path: PathBuf,
        file: Mutex<File>,
    },
    /// A named pipe (a log shipper's FIFO): opened by the sink's writer thread at its
    /// first record, since opening a FIFO for writing waits for a reader; reopened after
    /// the reader went away. A FIFO nobody reads, or a reader that stops reading, holds
    /// only that thread: the requests fail after `WRITE_TIMEOUT` (V16), and the engine
    /// starts, answers `sys/health` and recovers once a reader drains it.
    Fifo {
        path: PathBuf,
        file: Mutex<Option<File>>,
    },
    Stdout,
}

impl Sink {
    /// A file sink: created 0600 if absent; an existing file must be a regular file no
    /// one else can read or write and that nobody can execute (V19).
    pub fn file(path: &Path) -> Result<Self, AuditError> {
        let config = |reason: String| AuditError::Config {
            path: path.display().to_string(),
            reason,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            let kind = meta.file_type();
            if kind.is_dir() || kind.is_symlink() {
                return Err(config("a directory or a symbolic link, not a file".into()));
            }
            let mode = meta.permissions().mode() & 0o777;
            // Devices and pipes (a log shipper's FIFO) keep their own modes; an
            // executable bit is refused on anything.
            if !kind.is_file() && mode & 0o111 == 0 {
                use std::os::unix::fs::FileTypeExt as _;
                if kind.is_fifo() {
                    return Ok(Self::Fifo {
                        path: path.to_owned(),
                        file: Mutex::new(None),
                    });
                }
                return Self::open(path).map_err(config);
            }
            if mode & 0o177 != 0 {
                return Err(config(format!(
                    "mode {mode:04o} is too open: an audit file must be 0600 or stricter, never executable"
                )));
            }
        }
        Self::open(path).map_err(config)
    }

    fn open(path: &Path) -> Result<Self, String> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| e.to_string())?;
        Ok(Self::File {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    fn name(&self) -> String {
        match self {
            Self::File { path, .. } | Self::Fifo { path, .. } => path.display().to_string(),
            Self::Stdout => "stdout".into(),
        }
    }

    /// Called on the sink's own thread only: may block (a hanging sink).
    fn write(&self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Self::File { file, .. } => file.lock().write_all(line),
            Self::Fifo { path, file } => {
                let mut file = file.lock();
                if file.is_none() {
                    // Blocks until a reader opens the FIFO.
                    *file = Some(OpenOptions::new().append(true).open(path)?);
                }
                let result = file.as_mut().map_or(Ok(()), |f| f.write_all(line));
                if result.is_err() {
                    *file = None; // the reader went away (EPIPE): reopen for the next one
                }
                result
            }
            Self::Stdout => std::io::stdout().lock().write_all(line),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct HmacKey {
    key: String,
}

/// Who made a request, as the record shows it (HMAC'd where secret): the token it
/// carried and that token's entry (none on unauthenticated paths).
#[derive(Clone, Copy, Debug, Default)]
pub struct AuthInfo<'a> {
    pub token: Option<&'a str>,
    pub entry: Option<&'a TokenEntry>,
}

/// Records waiting for one sink, at most: a sink that stops taking them fails requests
/// at once past this, instead of piling them up.
const QUEUE: usize = 4096;

type Job = (Arc<[u8]>, tokio::sync::oneshot::Sender<Result<(), String>>);

/// After a write that carried more than one record (requests are arriving together),
/// the writer lets records gather this long before the next write instead of sleeping
/// on the queue: a request's record then no longer wakes the writer (a futex wake and
/// two context switches, a sixth of a KV read's CPU in the profile), and the write and
/// the wake-ups of the requests waiting on it are shared by more records. A lone request
/// is written at once. KV reads at 32 clients, audit to a file, 2 cores: without it
/// 46 k/s with p99 1.5 ms; 50 µs 50 k/s, p99 1.2 ms; 100 µs about the same; 200 µs
/// 42 k/s. Every record is still written before its request goes on.
const GROUP_COMMIT_WINDOW: Duration = Duration::from_micros(50);

/// One thread per sink writes what requests hand it, as many records as are waiting in
/// one write (group commit), and answers each request when its record is written: a
/// request costs no thread of its own, and a hanging sink holds only its thread.
struct Writer {
    name: String,
    tx: std::sync::mpsc::SyncSender<Job>,
}

impl Writer {
    fn start(sink: Sink) -> Self {
        let name = sink.name();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
        let thread_name = format!("audit-{}", name.chars().take(8).collect::<String>());
        let spawned = std::thread::Builder::new().name(thread_name).spawn(move || {
            let mut buffer = Vec::new();
            let mut batch = Vec::with_capacity(256);
            // Sleeping until the next record, not spinning for it: a writer that yielded
            // its CPU a few times before sleeping read 5-8% faster but had a worse p99
            // (1.6 against 1.4 ms) on 2 cores shared with the load generator. Under
            // concurrency it sleeps GROUP_COMMIT_WINDOW after a write instead, see there.
            while let Ok(first) = rx.recv() {
                batch.push(first);
                while batch.len() < 256 {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                buffer.clear();
                for (line, _) in &batch {
                    buffer.extend_from_slice(line);
                }
                let result = sink.write(&buffer).map_err(|e| e.to_string());
                let concurrent = batch.len() > 1;
                for (_, ack) in batch.drain(..) {
                    let _ = ack.send(result.clone());
                }
                if concurrent {
                    std::thread::sleep(GROUP_COMMIT_WINDOW);
                }
            }
        });
        if let Err(error) = spawned {
            tracing::error!(%error, sink = %name, "Starting an audit writer");
        }
        Self { name, tx }
    }
}

#[derive(Clone)]
pub struct Audit {
    sinks: Arc<Vec<Writer>>,
    /// ring's HMAC key holds the hash states after the inner and outer pads, so each
    /// HMAC costs only the hashing of its input; shared, not copied, per record.
    key: Arc<RwLock<Option<Arc<ring::hmac::Key>>>>,
    failures: Family<Vec<(String, String)>, Counter>,
}

const HMAC_PREFIX: &str = "hmac-sha256:";
const HMAC_UNAVAILABLE: &str = "hmac-sha256:unavailable";

/// `hmac-sha256:<hex>` of `value` under `key`, as the log shows it.
fn hmac_string(key: &ring::hmac::Key, value: &str) -> String {
    let tag = ring::hmac::sign(key, value.as_bytes());
    let mut hex = [0u8; 64];
    // Cannot fail: the buffer is exactly twice the SHA-256 tag.
    let _ = hex::encode_to_slice(tag.as_ref(), &mut hex);
    let mut out = String::with_capacity(HMAC_PREFIX.len() + hex.len());
    out.push_str(HMAC_PREFIX);
    out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    out
}

/// A string as the log shows it: its HMAC, or a placeholder while there is no key
/// (never the string itself).
struct HashedStr<'a> {
    key: Option<&'a ring::hmac::Key>,
    value: &'a str,
}

impl Serialize for HashedStr<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.key {
            Some(key) => serializer.serialize_str(&hmac_string(key, self.value)),
            None => serializer.serialize_str(HMAC_UNAVAILABLE),
        }
    }
}

/// `value` with every string at any depth replaced by its HMAC (numbers and booleans
/// stay: they are not secrets in any engine we have, and they help reading the log),
/// serialized straight from the original: no hashed copy of the tree is built.
struct Hashed<'a> {
    key: Option<&'a ring::hmac::Key>,
    value: &'a Value,
}

impl Serialize for Hashed<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq as _;
        match self.value {
            Value::String(s) => HashedStr {
                key: self.key,
                value: s,
            }
            .serialize(serializer),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for value in items {
                    seq.serialize_element(&Hashed { key: self.key, value })?;
                }
                seq.end()
            }
            Value::Object(map) => HashedMap { key: self.key, map }.serialize(serializer),
            other => other.serialize(serializer),
        }
    }
}

/// A JSON object hashed as `Hashed` does.
struct HashedMap<'a> {
    key: Option<&'a ring::hmac::Key>,
    map: &'a Map<String, Value>,
}

impl Serialize for HashedMap<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let key = self.key;
        serializer.collect_map(self.map.iter().map(|(name, value)| (name, Hashed { key, value })))
    }
}

/// The `auth` block of a record (fields in the order the log has always had them).
#[derive(Serialize)]
struct AuthRecord<'a> {
    accessor: Option<HashedStr<'a>>,
    client_token: Option<HashedStr<'a>>,
    display_name: &'a str,
    metadata: Metadata<'a>,
    policies: &'a [String],
}

/// The token's metadata, `{}` without a token.
struct Metadata<'a>(Option<&'a BTreeMap<String, String>>);

impl Serialize for Metadata<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.into_iter().flatten())
    }
}

impl<'a> AuthRecord<'a> {
    fn new(key: Option<&'a ring::hmac::Key>, auth: &AuthInfo<'a>) -> Self {
        let entry = auth.entry;
        Self {
            accessor: entry.map(|e| HashedStr {
                key,
                value: &e.accessor,
            }),
            client_token: auth.token.map(|value| HashedStr { key, value }),
            display_name: entry.map_or("", |e| &e.display_name),
            metadata: Metadata(entry.map(|e| &e.meta)),
            policies: entry.map_or(&[], |e| &e.policies),
        }
    }
}

/// One line of the log: a request record has no `response` block.
#[derive(Serialize)]
struct Record<'a> {
    auth: AuthRecord<'a>,
    request: RequestBlock<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<ResponseBlock<'a>>,
    #[serde(serialize_with = "as_text")]
    time: jiff::Timestamp,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// A timestamp in its RFC 3339 text, written into the line without a String between.
fn as_text<S: serde::Serializer>(time: &jiff::Timestamp, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(time)
}

#[derive(Serialize)]
struct RequestBlock<'a> {
    /// Shown in the request record (`null` without data), left out of the response's.
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Option<HashedMap<'a>>>,
    id: &'a str,
    operation: &'a str,
    path: &'a str,
    remote_address: &'a str,
}

#[derive(Serialize)]
struct ResponseBlock<'a> {
    body: Option<Hashed<'a>>,
    status: u16,
}

impl Audit {
    pub fn new(sinks: Vec<Sink>, failures: Family<Vec<(String, String)>, Counter>) -> Self {
        Self {
            sinks: Arc::new(sinks.into_iter().map(Writer::start).collect()),
            key: Arc::default(),
            failures,
        }
    }

    pub fn enabled(&self) -> bool {
        !self.sinks.is_empty()
    }

    /// Loads (or creates, once across replicas) the HMAC key; called after unseal.
    pub async fn load_key(&self, logical: &Logical) -> Result<(), AuditError> {
        let stored = match logical.get_fresh::<HmacKey>(HMAC_KEY_PATH).await? {
            Some(v) => v.value,
            None => {
                let fresh = HmacKey {
                    key: hex::encode(rand::random::<[u8; 32]>()),
                };
                match logical.put(HMAC_KEY_PATH, &fresh, Precondition::Absent).await {
                    Ok(_) => fresh,
                    Err(LogicalError::Storage(crate::store::storage::StorageError::Conflict(_))) => {
                        logical
                            .get_fresh::<HmacKey>(HMAC_KEY_PATH)
                            .await?
                            .ok_or(AuditError::Key("vanished after a conflict"))?
                            .value
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let bytes = hex::decode(&stored.key).map_err(|_| AuditError::Key("stored key is not hex"))?;
        *self.key.write() = Some(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes)));
        Ok(())
    }

    pub fn forget_key(&self) {
        *self.key.write() = None;
    }

    fn current_key(&self) -> Option<Arc<ring::hmac::Key>> {
        self.key.read().clone()
    }

    /// `hmac-sha256:<hex>` of `value`, as the log shows it.
    pub fn hash(&self, value: &str) -> Option<String> {
        self.current_key().map(|key| hmac_string(&key, value))
    }

    /// Records a request before it runs.
    pub async fn request(
        &self,
        id: &str,
        operation: &str,
        path: &str,
        auth: &AuthInfo<'_>,
        data: Option<&Map<String, Value>>,
        remote: &str,
    ) -> Result<(), AuditError> {
        if !self.enabled() {
            return Ok(());
        }
        let key = self.current_key();
        let key = key.as_deref();
        let record = Record {
            auth: AuthRecord::new(key, auth),
            request: RequestBlock {
                data: Some(data.map(|map| HashedMap { key, map })),
                id,
                operation,
                path,
                remote_address: remote,
            },
            response: None,
            time: jiff::Timestamp::now(),
            kind: "request",
        };
        self.write(&record).await
    }

    /// Records a response before it is sent.
    #[allow(clippy::too_many_arguments)]
    pub async fn response(
        &self,
        id: &str,
        operation: &str,
        path: &str,
        auth: &AuthInfo<'_>,
        status: u16,
        body: Option<&Value>,
        remote: &str,
    ) -> Result<(), AuditError> {
        if !self.enabled() {
            return Ok(());
        }
        let key = self.current_key();
        let key = key.as_deref();
        let record = Record {
            auth: AuthRecord::new(key, auth),
            request: RequestBlock {
                data: None,
                id,
                operation,
                path,
                remote_address: remote,
            },
            response: Some(ResponseBlock {
                body: body.map(|value| Hashed { key, value }),
                status,
            }),
            time: jiff::Timestamp::now(),
            kind: "response",
        };
        self.write(&record).await
    }

    /// Writes one record to every sink at once; Ok once at least one accepted it.
    async fn write(&self, record: &Record<'_>) -> Result<(), AuditError> {
        let mut line = Vec::with_capacity(1024);
        serde_json::to_writer(&mut line, record).map_err(|_| AuditError::NoSink)?;
        line.push(b'\n');
        let line: Arc<[u8]> = line.into();
        let writes = self.sinks.iter().map(|writer| {
            let line = line.clone();
            async move {
                let name = writer.name.clone();
                let (ack, done) = tokio::sync::oneshot::channel();
                let result = match writer.tx.try_send((line, ack)) {
                    Ok(()) => tokio::time::timeout(WRITE_TIMEOUT, done)
                        .await
                        .map(|r| r.map_err(|_| ())),
                    // Full (the sink stopped taking records) or its writer is gone.
                    Err(_) => Ok(Err(())),
                };
                match result {
                    Ok(Ok(Ok(()))) => true,
                    Ok(Ok(Err(error))) => {
                        tracing::error!(sink = %name, %error, "Writing an audit record failed");
                        self.failures
                            .get_or_create(&vec![("sink".into(), name), ("reason".into(), "error".into())])
                            .inc();
                        false
                    }
                    Ok(Err(())) | Err(_) => {
                        // Vault's `audit.log_request_failure`: alert on the counter.
                        tracing::error!(sink = %name, "An audit sink did not accept a record in time");
                        self.failures
                            .get_or_create(&vec![("sink".into(), name), ("reason".into(), "timeout".into())])
                            .inc();
                        false
                    }
                }
            }
        });
        let results = futures::future::join_all(writes).await;
        if results.iter().any(|ok| *ok) {
            Ok(())
        } else {
            Err(AuditError::NoSink)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn audit(sinks: Vec<Sink>) -> Audit {
        Audit::new(sinks, Family::default())
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("capstan-audit-{name}-{:08x}", rand::random::<u32>()))
    }

    #[tokio::test]
    async fn one_working_sink_is_enough_none_fails_the_request() {
        let good = temp("good");
        let both = audit(vec![
            Sink::file(Path::new("/dev/full")).unwrap(),
            Sink::file(&good).unwrap(),
        ]);
        both.request("1", "read", "secret/data/x", &AuthInfo::default(), None, "")
            .await
            .unwrap();
        assert!(std::fs::read_to_string(&good).unwrap().contains("secret/data/x"));
        assert_eq!(
            std::fs::metadata(&good).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let failing = audit(vec![Sink::file(Path::new("/dev/full")).unwrap()]);
        assert!(matches!(
            failing
                .request("2", "read", "secret/data/x", &AuthInfo::default(), None, "")
                .await,
            Err(AuditError::NoSink)
        ));
        let _ = std::fs::remove_file(good);
    }

    #[tokio::test]
    async fn a_hanging_sink_fails_within_the_timeout() {
        // A FIFO whose reader never reads: writes block once the pipe is full (V16).
        let fifo = temp("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let mut reader = std::process::Command::new("sh")
            .args(["-c", &format!("exec sleep 60 3<'{}'", fifo.display())])
            .spawn()
            .unwrap();
        let sink = Sink::file(&fifo).unwrap();
        let hanging = audit(vec![sink]);
        let mut data = Map::new();
        data.insert("v".into(), Value::String("x".repeat(4096)));
        let started = Instant::now();
        let mut failed = false;
        for i in 0..1024 {
            if hanging
                .request(
                    &i.to_string(),
                    "update",
                    "secret/data/x",
                    &AuthInfo::default(),
                    Some(&data),
                    "",
                )
                .await
                .is_err()
            {
                failed = true;
                break;
            }
        }
        assert!(
            failed,
            "a sink that stops accepting records must fail the request"
        );
        assert!(started.elapsed() < WRITE_TIMEOUT * 3);
        let _ = reader.kill();
        let _ = reader.wait();
        let _ = std::fs::remove_file(fifo);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_arriving_together_are_each_written_before_they_return() {
        let path = temp("group");
        let audit = audit(vec![Sink::file(&path).unwrap()]);
        let requests: Vec<_> = (0..200)
            .map(|i| {
                let audit = audit.clone();
                let path = path.clone();
                tokio::spawn(async move {
                    let id = format!("req-{i}");
                    audit
                        .request(&id, "read", "secret/data/x", &AuthInfo::default(), None, "")
                        .await
                        .unwrap();
                    // Written by the time it returns: the record is in the file already.
                    let text = std::fs::read_to_string(&path).unwrap();
                    assert!(text.contains(&format!("\"req-{i}\"")), "req-{i} not written");
                })
            })
            .collect();
        for request in requests {
            request.await.unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 200);
        assert!(text.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn files_others_can_read_or_execute_are_refused() {
        for mode in [0o644, 0o755, 0o700] {
            let path = temp("mode");
            std::fs::write(&path, "").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(
                matches!(Sink::file(&path), Err(AuditError::Config { .. })),
                "{mode:o}"
            );
            let _ = std::fs::remove_file(path);
        }
        assert!(Sink::file(&std::env::temp_dir()).is_err(), "a directory");
    }

    #[tokio::test]
    async fn strings_are_hmacd_and_the_hash_is_reproducible() {
        let path = temp("hmac");
        let audit = audit(vec![Sink::file(&path).unwrap()]);
        let logical = crate::auth::token::tests::unsealed().await;
        audit.load_key(&logical).await.unwrap();
        let entry = TokenEntry {
            id_hash: String::new(),
            accessor: "accessor-1".into(),
            policies: vec!["app".into()],
            parent: None,
            path: "auth/token/create".into(),
            display_name: "token-app".into(),
            meta: BTreeMap::from([("team".into(), "blue".into())]),
            creation_time: 0,
            ttl: 60,
            expire_time: Some(60),
            max_expire_time: Some(60),
            renewable: true,
            num_uses: 0,
            pod_uid: None,
        };
        let auth = AuthInfo {
            token: Some("hvs.secret-token"),
            entry: Some(&entry),
        };
        let data = serde_json::json!({"data": {"password": "hunter2", "n": 3}});
        audit
            .request("1", "update", "secret/data/x", &auth, data.as_object(), "")
            .await
            .unwrap();
        let body = serde_json::json!({"data": {"keys": ["key-one", 7, {"deep": "deep-secret"}], "ok": true}});
        audit
            .response("1", "read", "secret/data/x", &auth, 200, Some(&body), "")
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for secret in [
            "hunter2",
            "hvs.secret-token",
            "accessor-1",
            "key-one",
            "deep-secret",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
            assert!(text.contains(&audit.hash(secret).unwrap()));
        }
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let hash = |s: &str| Value::String(audit.hash(s).unwrap());
        // The records' shape: what log readers parse.
        assert_eq!(lines[0]["type"], "request");
        assert_eq!(lines[0]["request"]["data"]["data"]["n"], 3);
        assert_eq!(lines[0]["request"]["data"]["data"]["password"], hash("hunter2"));
        assert_eq!(
            lines[0]["auth"],
            serde_json::json!({
                "accessor": hash("accessor-1"), "client_token": hash("hvs.secret-token"),
                "display_name": "token-app", "metadata": {"team": "blue"}, "policies": ["app"],
            })
        );
        assert_eq!(lines[1]["type"], "response");
        assert_eq!(lines[1]["request"]["path"], "secret/data/x");
        assert!(lines[1]["request"].get("data").is_none());
        assert_eq!(lines[1]["response"]["status"], 200);
        assert_eq!(
            lines[1]["response"]["body"],
            serde_json::json!({"data": {"keys": [hash("key-one"), 7, {"deep": hash("deep-secret")}], "ok": true}})
        );
        let _ = std::fs::remove_file(path);
    }
}
