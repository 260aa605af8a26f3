//! `capstan job convert FILE`: a Nomad jobspec (HCL2, or the JSON of `nomad job run
//! -output`) as a Job's YAML, through capstan_jobspec. Whatever it could not translate is
//! listed on standard error with its line; unless `--allow-partial`, the YAML is then not
//! written and the exit code is 1, so a pipe into `kubectl apply` never applies a job
//! that silently lost part of itself.

use super::key_value;
use anyhow::Context as _;
use capstan_jobspec::{Conversion, Format, Options};
use std::{collections::BTreeMap, path::PathBuf};

#[derive(clap::Args, Debug)]
pub struct Convert {
    /// The jobspec (`-`: standard input).
    file: PathBuf,
    /// Write the Job's YAML here instead of to standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Write the Job even when some blocks could not be translated (they are still listed).
    #[arg(long)]
    allow_partial: bool,
    /// The Job's name instead of the jobspec's.
    #[arg(long)]
    name: Option<String>,
    /// A variable's value, NAME=VALUE, over its default; repeat for more.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// Run the tasks of the exec and raw_exec drivers as their command in this image
    /// (without it they are not translated).
    #[arg(long, value_name = "IMAGE")]
    exec_image: Option<String>,
    /// The input's syntax (default: JSON when it starts with `{`, HCL otherwise).
    #[arg(long, value_parser = ["hcl", "json"])]
    format: Option<String>,
}

impl Convert {
    /// True when every block was translated, or `--allow-partial` accepts less. `namespace` is `--namespace`, over the
    /// jobspec's own.
    pub fn run(self, namespace: Option<String>) -> anyhow::Result<bool> {
        let shown = self.file.display().to_string();
        let source = super::read_input(&self.file)?;
        let vars = self
            .vars
            .iter()
            .map(|given| key_value(given).context("--var"))
            .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
        let format = match self.format.as_deref() {
            Some("hcl") => Format::Hcl,
            Some("json") => Format::Json,
            _ => Format::Detect,
        };
        let options = Options {
            vars,
            name: self.name,
            namespace,
            exec_image: self.exec_image,
        };
        let conversion =
            capstan_jobspec::convert(&source, format, &options).with_context(|| shown.clone())?;
        eprint!("{}", report(&shown, &conversion));
        if !conversion.is_complete() && !self.allow_partial {
            eprintln!(
                "{shown}: not written: the Job would run without the blocks above (--allow-partial writes it)"
            );
            return Ok(false);
        }
        // Not serde_yaml_ng's writer: kubectl reads YAML 1.1 (see yaml.rs).
        let job = serde_json::to_value(&conversion.job).context("writing the Job as YAML")?;
        let yaml = super::yaml::to_string(&job);
        match &self.output {
            Some(path) => {
                std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))?
            }
            None => print!("{yaml}"),
        }
        Ok(true)
    }
}

/// The notes and the untranslated blocks, one a line, each with where it is.
fn report(file: &str, conversion: &Conversion) -> String {
    let at = |line: usize, block: &str| {
        if line == 0 {
            format!("{file}: {block}")
        } else {
            format!("{file}:{line}: {block}")
        }
    };
    let mut out = String::new();
    for note in &conversion.notes {
        out.push_str(&format!(
            "note: {}: {}\n",
            at(note.line, &note.block),
            note.message
        ));
    }
    for block in &conversion.untranslated {
        out.push_str(&format!(
            "untranslated: {}: {}\n",
            at(block.line, &block.block),
            block.reason
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_jobspec::{Job, Note, Untranslated};

    #[test]
    fn each_untranslated_block_is_named_with_its_line() {
        let job: Job = serde_json::from_value(serde_json::json!({
                "apiVersion": "jobs.capstan.dev/v1alpha1", "kind": "Job", "metadata": {"name": "web"},
                "spec": {"groups": [{"name": "g", "tasks": [{"name": "t", "image": "i"}]}]}
        }))
        .unwrap();
        let conversion = Conversion {
            job,
            untranslated: vec![
                Untranslated {
                    block: "job.group[g].task[t].artifact".into(),
                    line: 12,
                    reason: "no artifacts".into(),
                },
                Untranslated {
                    block: "Job.TaskGroups[0].Volumes".into(),
                    line: 0,
                    reason: "no host volumes".into(),
                },
            ],
            notes: vec![Note {
                block: "job.group[g].task[t].resources.cpu".into(),
                line: 9,
                message: "500 MHz as 500m".into(),
            }],
        };
        assert_eq!(
            report("web.nomad.hcl", &conversion),
            "note: web.nomad.hcl:9: job.group[g].task[t].resources.cpu: 500 MHz as 500m\n\
             untranslated: web.nomad.hcl:12: job.group[g].task[t].artifact: no artifacts\n\
             untranslated: web.nomad.hcl: Job.TaskGroups[0].Volumes: no host volumes\n"
        );
    }
}
