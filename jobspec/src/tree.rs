//! The jobspec as both front ends read it: blocks of attributes and blocks, named as
//! Nomad's HCL names them, each knowing where it came from. The mapper takes out what it
//! translates; what is left is reported.

use serde_json::Value;

/// A block (`group "web" { ... }`) or, from JSON, an object in the block's place.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Block {
    /// Nomad's HCL name of the block (`group`).
    pub kind: String,
    /// Its label (`web`), when it has one.
    pub label: Option<String>,
    /// Where it is, for messages: `job.group[web]` or `Job.TaskGroups[0]`.
    pub path: String,
    /// 1-based, 0 for JSON.
    pub line: usize,
    pub attrs: Vec<Attr>,
    pub blocks: Vec<Block>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Attr {
    pub name: String,
    pub value: Value,
    pub path: String,
    pub line: usize,
}

/// Something the mapper left, or refused, with where it was.
#[derive(Clone, Debug, PartialEq)]
pub struct Place {
    pub path: String,
    pub line: usize,
}

impl Attr {
    pub fn place(&self) -> Place {
        Place {
            path: self.path.clone(),
            line: self.line,
        }
    }
}

impl Block {
    pub fn place(&self) -> Place {
        Place {
            path: self.path.clone(),
            line: self.line,
        }
    }

    /// A place inside this block (`<path>.<name>`, on the block's line).
    pub fn at(&self, name: &str) -> Place {
        Place {
            path: format!("{}.{name}", self.path),
            line: self.line,
        }
    }

    /// Takes the attribute `name` out (the last one, if it is given twice).
    pub fn take(&mut self, name: &str) -> Option<Attr> {
        let index = self.attrs.iter().rposition(|a| a.name == name)?;
        Some(self.attrs.remove(index))
    }

    /// Takes every block `kind` out, in order.
    pub fn take_blocks(&mut self, kind: &str) -> Vec<Block> {
        let (taken, kept) = std::mem::take(&mut self.blocks)
            .into_iter()
            .partition(|b| b.kind == kind);
        self.blocks = kept;
        taken
    }

    /// Takes the (last) block `kind` out.
    pub fn take_block(&mut self, kind: &str) -> Option<Block> {
        self.take_blocks(kind).pop()
    }

    /// Everything left in it that says something, attributes then blocks.
    pub fn leftovers(self) -> Vec<(String, Place)> {
        let mut left: Vec<(String, Place)> = self
            .attrs
            .iter()
            .filter(|a| !is_unset(&a.value))
            .map(|a| (a.name.clone(), a.place()))
            .collect();
        left.extend(self.blocks.iter().map(|b| (b.kind.clone(), b.place())));
        left
    }
}

/// Whether a value says nothing (JSON's API output writes every unset field as null, zero
/// or empty): such fields are neither translated nor reported.
pub fn is_unset(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}
