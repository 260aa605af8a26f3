//! Nomad jobspecs → Capstan Jobs: `capstan job convert` reads a jobspec (HCL2 with
//! variables, locals and functions, or the JSON of `nomad job run -output`) and writes
//! the equivalent [`Job`].
//!
//! Both front ends read their input into one tree of blocks and attributes ([`tree`])
//! with Nomad's HCL names; one mapper ([`map`]) turns that tree into the Job. The mapper
//! takes each attribute and block it translates out of the tree, so whatever is left is
//! exactly what it did not translate: each leftover becomes an [`Untranslated`] entry
//! with its line (HCL) or JSON path, never a silent drop.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod duration;
mod functions;
mod hcl;
mod json;
mod map;
mod tree;

/// The converted object, re-exported so a caller needs no second dependency to name it.
pub use capstan_crds::jobs::Job;
use std::collections::BTreeMap;
use thiserror::Error;

/// Which syntax the input is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    Hcl,
    Json,
    /// JSON when the first non-blank character is `{` (an HCL file cannot begin so), HCL
    /// otherwise.
    #[default]
    Detect,
}

/// What the command line adds to the jobspec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `--var name=value`: overrides a `variable` block's default. A variable declared
    /// with a type other than string reads its value as an HCL expression (`3`, `true`,
    /// `["a", "b"]`), as Nomad does.
    pub vars: BTreeMap<String, String>,
    /// The Job's name instead of the jobspec's.
    pub name: Option<String>,
    /// The Job's namespace instead of the jobspec's `namespace`.
    pub namespace: Option<String>,
    /// Run the tasks of Nomad's `exec`, `raw_exec` and `exec2` drivers (a command on the
    /// node) as that command in this image. Without it they are untranslated.
    pub exec_image: Option<String>,
}

/// The converted Job and what of the jobspec did not make it in.
#[derive(Clone, Debug)]
pub struct Conversion {
    pub job: Job,
    /// Blocks and attributes with no Capstan equivalent, each with why: the Job runs
    /// without them.
    pub untranslated: Vec<Untranslated>,
    /// Things translated with a change a reader should know of (a name made a DNS label,
    /// MHz read as millicores, a dynamic port given a number).
    pub notes: Vec<Note>,
}

impl Conversion {
    /// Whether every block and attribute was translated.
    pub fn is_complete(&self) -> bool {
        self.untranslated.is_empty()
    }
}

/// A block or attribute left out of the Job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Untranslated {
    /// Where it is: `job.group[web].task[redis].artifact` in HCL, the JSON path
    /// (`Job.TaskGroups[0].Tasks[1].Artifacts`) in JSON.
    pub block: String,
    /// Its line (1-based) in HCL; 0 in JSON, which has [`block`](Self::block) instead.
    pub line: usize,
    pub reason: String,
}

/// A translation that changed something on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub block: String,
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The input does not parse.
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// The input parses but is not a jobspec Capstan can read: an undefined variable, a
    /// value of the wrong type, no job block, no task that can run.
    #[error("{}: {message}", location(*.line, .block))]
    Invalid {
        block: String,
        line: usize,
        message: String,
    },
}

fn location(line: usize, block: &str) -> String {
    if line == 0 {
        block.to_owned()
    } else {
        format!("line {line} ({block})")
    }
}

impl Error {
    /// The line the problem is on (1-based), 0 for JSON input.
    pub fn line(&self) -> usize {
        match self {
            Self::Syntax { line, .. } | Self::Invalid { line, .. } => *line,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Converts the jobspec `source` into a Job.
pub fn convert(source: &str, format: Format, options: &Options) -> Result<Conversion> {
    let format = match format {
        Format::Detect if source.trim_start().starts_with('{') => Format::Json,
        Format::Detect => Format::Hcl,
        format => format,
    };
    let job = match format {
        Format::Json => json::read(source)?,
        _ => hcl::read(source, &options.vars)?,
    };
    map::job(job, options)
}

#[cfg(test)]
mod tests;
