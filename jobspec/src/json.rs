//! The JSON front end: the API's Job as `nomad job run -output` prints it (`{"Job":
//! {...}}`, or the bare Job), PascalCase, durations in nanoseconds, every unset field
//! null. It is rewritten into the HCL front end's tree, each key under its HCL name, so
//! one mapper reads both; each block and attribute keeps its JSON path for messages
//! (JSON has no lines). A key this file does not know stays in the tree under its JSON
//! name, and so is reported as untranslated.

use crate::hcl::Read;
use crate::tree::{Attr, Block, is_unset};
use crate::{Error, Result};
use serde_json::{Map, Value};

pub fn read(source: &str) -> Result<Read> {
    // serde_json refuses input nested deeper than 128 levels, so deep input cannot
    // overflow the stack here or in the mapper.
    let value: Value = serde_json::from_str(source).map_err(|e| Error::Syntax {
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    let (job, path) = match value {
        Value::Object(mut map) if map.contains_key("Job") => (map.remove("Job").unwrap_or_default(), "Job"),
        Value::Object(map) if map.contains_key("job") => {
            return Err(Error::Invalid {
                block: "job".into(),
                line: 0,
                message: format!(
                    "HCL's JSON syntax ({{\"job\": ...}}) is not read: convert the HCL file, or `nomad job run -output` JSON ({} keys)",
                    map.len()
                ),
            });
        }
        other => (other, ""),
    };
    let job = obj("job", job, path)?.job()?;
    Ok(Read {
        job,
        untranslated: Vec::new(),
    })
}

/// A JSON object being moved, key by key, into a tree block.
struct Obj {
    map: Map<String, Value>,
    block: Block,
}

fn obj(kind: &str, value: Value, path: &str) -> Result<Obj> {
    match value {
        Value::Object(map) => Ok(Obj {
            map,
            block: Block {
                kind: kind.to_owned(),
                path: path.to_owned(),
                ..Block::default()
            },
        }),
        other => Err(Error::Invalid {
            block: if path.is_empty() {
                "(the job)".into()
            } else {
                path.to_owned()
            },
            line: 0,
            message: format!("expected an object, found {}", kind_of(&other)),
        }),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Obj {
    fn key_path(&self, key: &str) -> String {
        if self.block.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.block.path)
        }
    }

    /// Moves `key` to the attribute `name`.
    fn attr(&mut self, key: &str, name: &str) -> &mut Self {
        if let Some(value) = self.map.remove(key).filter(|v| !v.is_null()) {
            let path = self.key_path(key);
            self.block.attrs.push(Attr {
                name: name.to_owned(),
                value,
                path,
                line: 0,
            });
        }
        self
    }

    /// Moves `key`, an object, to a block `kind` built by `build`.
    fn block(&mut self, key: &str, kind: &str, build: fn(Obj) -> Result<Block>) -> Result<&mut Self> {
        if let Some(value) = self.map.remove(key).filter(|v| !is_unset(v)) {
            let path = self.key_path(key);
            let block = build(obj(kind, value, &path)?)?;
            self.block.blocks.push(block);
        }
        Ok(self)
    }

    /// Moves `key`, an array of objects, to blocks `kind` built by `build`.
    fn blocks(&mut self, key: &str, kind: &str, build: fn(Obj) -> Result<Block>) -> Result<&mut Self> {
        let Some(value) = self.map.remove(key).filter(|v| !is_unset(v)) else {
            return Ok(self);
        };
        let path = self.key_path(key);
        let Value::Array(items) = value else {
            return Err(Error::Invalid {
                block: path,
                line: 0,
                message: format!("expected an array, found {}", kind_of(&value)),
            });
        };
        for (i, item) in items.into_iter().enumerate() {
            let block = build(obj(kind, item, &format!("{path}[{i}]"))?)?;
            self.block.blocks.push(block);
        }
        Ok(self)
    }

    /// Uses the string at `key` as the block's label.
    fn label(&mut self, key: &str) -> &mut Self {
        if let Some(Value::String(label)) = self.map.get(key) {
            self.block.label = Some(label.clone());
            self.map.remove(key);
        }
        self
    }

    /// The block, with every key not moved yet left as an attribute under its HCL name
    /// when it has one Nomad documents ([`hcl_name`]), its JSON name otherwise.
    fn done(&mut self) -> Block {
        let mut block = std::mem::take(&mut self.block);
        for (key, value) in std::mem::take(&mut self.map) {
            let path = if block.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", block.path)
            };
            block.attrs.push(Attr {
                name: hcl_name(&key).unwrap_or(&key).to_owned(),
                value,
                path,
                line: 0,
            });
        }
        block
    }

    fn job(mut self) -> Result<Block> {
        self.label("ID");
        if self.block.label.is_none() {
            self.label("Name");
        } else if self.map.get("Name") == self.block.label.clone().map(Value::String).as_ref() {
            self.map.remove("Name");
        }
        self.attr("Type", "type")
            .attr("Priority", "priority")
            .attr("Datacenters", "datacenters")
            .attr("Namespace", "namespace")
            .attr("Region", "region")
            .attr("Meta", "meta");
        self.blocks("Constraints", "constraint", constraint)?
            .blocks("Affinities", "affinity", affinity)?
            .blocks("Spreads", "spread", spread)?
            .block("Update", "update", update)?
            .block("Periodic", "periodic", periodic)?
            .block("ParameterizedJob", "parameterized", parameterized)?
            .block("Reschedule", "reschedule", reschedule)?
            .blocks("TaskGroups", "group", group)?;
        Ok(self.done())
    }
}

fn constraint(mut o: Obj) -> Result<Block> {
    o.attr("LTarget", "attribute")
        .attr("RTarget", "value")
        .attr("Operand", "operator");
    Ok(o.done())
}

fn affinity(mut o: Obj) -> Result<Block> {
    o.attr("LTarget", "attribute")
        .attr("RTarget", "value")
        .attr("Operand", "operator")
        .attr("Weight", "weight");
    Ok(o.done())
}

fn spread(mut o: Obj) -> Result<Block> {
    o.attr("Attribute", "attribute").attr("Weight", "weight");
    o.blocks("SpreadTarget", "target", |mut t| {
        t.label("Value").attr("Percent", "percent");
        Ok(t.done())
    })?;
    Ok(o.done())
}

fn update(mut o: Obj) -> Result<Block> {
    o.attr("Stagger", "stagger")
        .attr("MaxParallel", "max_parallel")
        .attr("HealthCheck", "health_check")
        .attr("MinHealthyTime", "min_healthy_time")
        .attr("HealthyDeadline", "healthy_deadline")
        .attr("ProgressDeadline", "progress_deadline")
        .attr("AutoRevert", "auto_revert")
        .attr("AutoPromote", "auto_promote")
        .attr("Canary", "canary");
    Ok(o.done())
}

fn periodic(mut o: Obj) -> Result<Block> {
    o.attr("Enabled", "enabled")
        .attr("Spec", "cron")
        .attr("Specs", "crons")
        .attr("SpecType", "spec_type")
        .attr("ProhibitOverlap", "prohibit_overlap")
        .attr("TimeZone", "time_zone");
    Ok(o.done())
}

fn parameterized(mut o: Obj) -> Result<Block> {
    o.attr("Payload", "payload")
        .attr("MetaRequired", "meta_required")
        .attr("MetaOptional", "meta_optional");
    Ok(o.done())
}

fn restart(mut o: Obj) -> Result<Block> {
    o.attr("Attempts", "attempts")
        .attr("Interval", "interval")
        .attr("Delay", "delay")
        .attr("Mode", "mode")
        .attr("RenderTemplates", "render_templates");
    Ok(o.done())
}

fn reschedule(mut o: Obj) -> Result<Block> {
    o.attr("Attempts", "attempts")
        .attr("Interval", "interval")
        .attr("Delay", "delay")
        .attr("DelayFunction", "delay_function")
        .attr("MaxDelay", "max_delay")
        .attr("Unlimited", "unlimited");
    Ok(o.done())
}

fn group(mut o: Obj) -> Result<Block> {
    o.label("Name").attr("Count", "count").attr("Meta", "meta");
    o.blocks("Constraints", "constraint", constraint)?
        .blocks("Affinities", "affinity", affinity)?
        .blocks("Spreads", "spread", spread)?
        .blocks("Networks", "network", network)?
        .blocks("Services", "service", service)?
        .block("RestartPolicy", "restart", restart)?
        .block("ReschedulePolicy", "reschedule", reschedule)?
        .block("Update", "update", update)?
        .blocks("Tasks", "task", task)?;
    Ok(o.done())
}

fn network(mut o: Obj) -> Result<Block> {
    o.attr("Mode", "mode");
    o.blocks("DynamicPorts", "port", port)?
        .blocks("ReservedPorts", "port", port)?;
    Ok(o.done())
}

fn port(mut o: Obj) -> Result<Block> {
    o.label("Label")
        .attr("To", "to")
        .attr("HostNetwork", "host_network");
    // A reserved port's Value is its static host port; a dynamic port's is 0 (unset).
    o.attr("Value", "static");
    Ok(o.done())
}

fn service(mut o: Obj) -> Result<Block> {
    o.attr("Name", "name")
        .attr("PortLabel", "port")
        .attr("Tags", "tags")
        .attr("TaskName", "task")
        .attr("Provider", "provider");
    o.blocks("Checks", "check", check)?
        .block("Connect", "connect", connect)?;
    Ok(o.done())
}

fn check(mut o: Obj) -> Result<Block> {
    o.attr("Name", "name")
        .attr("Type", "type")
        .attr("Path", "path")
        .attr("PortLabel", "port")
        .attr("Command", "command")
        .attr("Args", "args")
        .attr("Interval", "interval")
        .attr("Timeout", "timeout")
        .attr("TaskName", "task");
    Ok(o.done())
}

fn connect(mut o: Obj) -> Result<Block> {
    o.attr("Native", "native");
    o.block("SidecarService", "sidecar_service", |mut s| {
        s.attr("Port", "port").attr("Tags", "tags");
        s.block("Proxy", "proxy", |mut p| {
            p.blocks("Upstreams", "upstreams", |mut u| {
                u.attr("DestinationName", "destination_name")
                    .attr("DestinationNamespace", "destination_namespace")
                    .attr("LocalBindPort", "local_bind_port");
                Ok(u.done())
            })?;
            Ok(p.done())
        })?;
        Ok(s.done())
    })?;
    Ok(o.done())
}

fn task(mut o: Obj) -> Result<Block> {
    o.label("Name")
        .attr("Driver", "driver")
        .attr("Config", "config")
        .attr("Env", "env")
        .attr("Meta", "meta")
        .attr("KillTimeout", "kill_timeout");
    o.blocks("Services", "service", service)?
        .blocks("Constraints", "constraint", constraint)?
        .blocks("Affinities", "affinity", affinity)?
        .block("RestartPolicy", "restart", restart)?
        .block("Resources", "resources", |mut r| {
            r.attr("CPU", "cpu")
                .attr("Cores", "cores")
                .attr("MemoryMB", "memory")
                .attr("MemoryMaxMB", "memory_max");
            Ok(r.done())
        })?
        .block("Vault", "vault", |mut v| {
            v.attr("Policies", "policies").attr("Role", "role");
            Ok(v.done())
        })?
        .blocks("Templates", "template", |mut t| {
            t.attr("EmbeddedTmpl", "data")
                .attr("DestPath", "destination")
                .attr("SourcePath", "source")
                .attr("ChangeMode", "change_mode")
                .attr("Splay", "splay")
                .attr("Perms", "perms")
                .attr("LeftDelim", "left_delimiter")
                .attr("RightDelim", "right_delimiter")
                .attr("Envvars", "env");
            Ok(t.done())
        })?
        .block("DispatchPayload", "dispatch_payload", |mut d| {
            d.attr("File", "file");
            Ok(d.done())
        })?
        .block("Lifecycle", "lifecycle", |mut l| {
            l.attr("Hook", "hook").attr("Sidecar", "sidecar");
            Ok(l.done())
        })?;
    Ok(o.done())
}

/// The HCL names of the API's fields the converter knows but does not translate, so
/// both front ends give the same reasons (the path still names the JSON key).
fn hcl_name(key: &str) -> Option<&'static str> {
    Some(match key {
        "Artifacts" => "artifact",
        "LogConfig" => "logs",
        "EphemeralDisk" => "ephemeral_disk",
        "Volumes" => "volume",
        "VolumeMounts" => "volume_mount",
        "NodePool" => "node_pool",
        "Multiregion" => "multiregion",
        "Migrate" => "migrate",
        "Scaling" | "ScalingPolicies" => "scaling",
        "User" => "user",
        "Leader" => "leader",
        "KillSignal" => "kill_signal",
        "ShutdownDelay" => "shutdown_delay",
        "Identity" | "Identities" => "identity",
        "Consul" => "consul",
        "SidecarTask" => "sidecar_task",
        "Gateway" => "gateway",
        "DiskMB" => "disk",
        "Networks" => "network",
        "Devices" => "device",
        "MBits" => "mbits",
        "DNS" => "dns",
        "AllAtOnce" => "all_at_once",
        _ => return None,
    })
}
