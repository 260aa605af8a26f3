//! The properties the fuzz target (jobspec/fuzz) checks, shared with the stable test that
//! replays its seed corpus (jobspec/tests/fuzz_seeds.rs). Takes the raw fuzz input, must
//! never panic on its own, and panics when a property breaks.

use capstan_jobspec::{Format, Options, convert};

/// The first byte picks the front end (0 HCL, 1 JSON, anything else: detect); the rest is
/// the jobspec. Never panics; a conversion yields a Job that serializes and reads back the
/// same, with a DNS-label name and at least one group of at least one task, and every
/// line it names is inside the input; a refusal names a line inside the input.
pub fn check_convert(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let format = match selector {
        0 => Format::Hcl,
        1 => Format::Json,
        _ => Format::Detect,
    };
    let source = String::from_utf8_lossy(rest);
    let lines = source.lines().count() + 1;
    let options = Options {
        vars: [("fuzz".to_owned(), "1".to_owned())].into(),
        ..Options::default()
    };
    match convert(&source, format, &options) {
        Ok(conversion) => {
            let job = &conversion.job;
            let name = job.metadata.name.as_deref().unwrap_or_default();
            assert!(
                !name.is_empty()
                    && name.len() <= 40
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !name.starts_with('-')
                    && !name.ends_with('-'),
                "job name {name:?}"
            );
            assert!(!job.spec.groups.is_empty(), "a Job without groups");
            assert!(
                job.spec.groups.iter().all(|g| !g.tasks.is_empty()),
                "a group without tasks"
            );
            let json = serde_json::to_value(job).expect("a Job serializes");
            let back: capstan_jobspec::Job = serde_json::from_value(json.clone()).expect("and reads back");
            assert_eq!(
                serde_json::to_value(&back).expect("again"),
                json,
                "the Job reads back the same"
            );
            for line in conversion
                .untranslated
                .iter()
                .map(|u| u.line)
                .chain(conversion.notes.iter().map(|n| n.line))
            {
                assert!(line <= lines, "line {line} of {lines}");
            }
        }
        Err(error) => assert!(error.line() <= lines, "{error} (of {lines} lines)"),
    }
}
