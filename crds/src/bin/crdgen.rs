//! Writes every Capstan CRD as Helm templates into the chart. The test
//! `chart_crds_are_fresh` fails when the committed files differ from what this writes.
//!
//!   crdgen                 write charts/capstan/templates/crds/*.yaml
//!   crdgen --stdout        print every CRD as one YAML stream (for kubectl apply -f -)

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let mode = std::env::args().nth(1);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/capstan/templates/crds");
    match mode.as_deref() {
        Some("--stdout") => {
            for crd in capstan_crds::all_crds() {
                print!(
                    "---\n{}",
                    serde_yaml_ng::to_string(&crd).expect("a CRD serializes")
                );
            }
            ExitCode::SUCCESS
        }
        None => {
            std::fs::create_dir_all(&dir).expect("creating the chart's crds folder");
            for (file, text) in capstan_crds::chart_templates() {
                std::fs::write(dir.join(&file), text).expect("writing a CRD template");
                println!("wrote {}", dir.join(file).display());
            }
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("usage: crdgen [--check|--stdout] (got {other})");
            ExitCode::from(2)
        }
    }
}
