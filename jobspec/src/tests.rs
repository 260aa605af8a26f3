use super::*;
use capstan_crds::jobs::{JobType, Operator};

fn hcl(source: &str) -> Result<Conversion> {
    convert(source, Format::Detect, &Options::default())
}

fn with_vars(source: &str, vars: &[(&str, &str)]) -> Result<Conversion> {
    let options = Options {
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Options::default()
    };
    convert(source, Format::Hcl, &options)
}

/// A minimal job around `group` (the body of `group "g" { ... }`).
fn job(group: &str) -> String {
    format!("job \"j\" {{\n  group \"g\" {{\n{group}\n  }}\n}}\n")
}

const TASK: &str = r#"task "t" {
  driver = "docker"
  config { image = "busybox" }
}"#;

#[test]
fn malformed_hcl_is_refused_with_its_line_and_column() {
    let err =
        hcl("job \"a\" {\n  type = \"service\"\n  group \"g\" {\n    count = = 2\n  }\n}\n").unwrap_err();
    let Error::Syntax { line, column, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!((*line, *column), (4, 13), "{err}");
    assert!(err.to_string().starts_with("line 4, column 13"), "{err}");

    let err = hcl("job \"a\" {\n  group \"g\" {\n").unwrap_err();
    assert!(matches!(err, Error::Syntax { .. }), "{err}");
}

#[test]
fn malformed_json_is_refused_with_its_line_and_column() {
    let err = hcl("{\n  \"Job\": {\n    \"ID\": \"x\",\n    \"Type\": \n  }\n}").unwrap_err();
    let Error::Syntax { line, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*line, 5, "{err}");
    // Well-formed, but a group that is not an object: named by its JSON path.
    let err = hcl(r#"{"Job": {"ID": "x", "TaskGroups": [3]}}"#).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Job.TaskGroups[0]: expected an object, found a number"
    );
}

#[test]
fn deep_nesting_is_refused_not_overflowed() {
    let deep = format!(
        "job \"j\" {{ meta = {}1{} }}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(matches!(hcl(&deep), Err(Error::Syntax { .. })));
    let deep_blocks = format!("{}{}", "a {\n".repeat(5_000), "}\n".repeat(5_000));
    assert!(matches!(hcl(&deep_blocks), Err(Error::Syntax { .. })));
    let deep_json = format!("{{\"Job\": {}1{}}}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(matches!(hcl(&deep_json), Err(Error::Syntax { .. })));
}

#[test]
fn a_value_that_doubles_through_locals_is_bounded() {
    let mut source = String::from("locals {\n  l0 = \"xxxxxxxxxxxxxxxx\"\n");
    for i in 1..40 {
        source.push_str(&format!(
            "  l{i} = \"${{local.l{}}}${{local.l{}}}\"\n",
            i - 1,
            i - 1
        ));
    }
    source.push_str("}\n");
    source.push_str(&job(TASK));
    let err = hcl(&source).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
}

#[test]
fn variables_take_defaults_then_var_overrides_typed_as_declared() {
    let source = format!(
        "variable \"count\" {{\n  type = number\n  default = 2\n}}\nvariable \"tag\" {{\n  default = \"1\"\n}}\n{}",
        job(&format!(
            "count = var.count\n{}",
            TASK.replace("busybox", "busybox:${var.tag}")
        ))
    );
    let defaults = with_vars(&source, &[]).unwrap();
    assert_eq!(defaults.job.spec.groups[0].count, 2);
    assert_eq!(defaults.job.spec.groups[0].tasks[0].image, "busybox:1");
    let given = with_vars(&source, &[("count", "5"), ("tag", "007")]).unwrap();
    assert_eq!(given.job.spec.groups[0].count, 5);
    // A string variable keeps its text as given (not the number 7).
    assert_eq!(given.job.spec.groups[0].tasks[0].image, "busybox:007");

    let err = with_vars(&source, &[("nope", "1")]).unwrap_err();
    assert!(err.to_string().contains("no variable \"nope\""), "{err}");
    let err = with_vars("variable \"x\" {}\njob \"j\" {}\n", &[]).unwrap_err();
    assert_eq!(err.line(), 1, "{err}");
    assert!(err.to_string().contains("--var x=VALUE"), "{err}");
}

#[test]
fn an_undefined_reference_names_its_line() {
    let source = job(&format!("count = var.missing\n{TASK}"));
    let err = hcl(&source).unwrap_err();
    assert_eq!(err.line(), 3, "{err}");
    assert!(err.to_string().contains("job.group[g].count"), "{err}");
}

#[test]
fn locals_in_any_order_and_cycles_refused() {
    let source = format!(
        "locals {{\n  b = \"${{local.a}}-b\"\n  a = upper(\"a\")\n}}\n{}",
        job(&format!("meta {{ x = local.b }}\n{TASK}"))
    );
    assert_eq!(hcl(&source).unwrap().job.spec.groups[0].meta["x"], "A-b");
    let cycle = format!("locals {{\n  a = local.b\n  b = local.a\n}}\n{}", job(TASK));
    let err = hcl(&cycle).unwrap_err();
    assert_eq!(err.line(), 2, "{err}");
    assert!(err.to_string().contains("refers back"), "{err}");
}

#[test]
fn runtime_interpolations_are_kept_and_functions_evaluated() {
    let source = job(r#"task "t" {
  driver = "docker"
  config {
    image = "busybox"
    args  = ["${NOMAD_PORT_http}", "${node.unique.name}-${attr.kernel.name}", "${meta.rack}", format("%s/%s", "a", upper("b")), "${NOMAD_META_x}"]
  }
  env {
    ADDR = "${NOMAD_UPSTREAM_ADDR_db}"
    ESCAPED = "$${HOME}"
    JOINED = join(",", concat(["a"], ["b", "c"]))
  }
}"#);
    let c = hcl(&source).unwrap();
    let task = &c.job.spec.groups[0].tasks[0];
    assert_eq!(
        task.args,
        [
            "${NOMAD_PORT_http}",
            "${node.unique.name}-${attr.kernel.name}",
            "${meta.rack}",
            "a/B",
            "${NOMAD_META_x}"
        ]
    );
    assert_eq!(task.env["ADDR"], "${NOMAD_UPSTREAM_ADDR_db}");
    assert_eq!(task.env["ESCAPED"], "${HOME}");
    assert_eq!(task.env["JOINED"], "a,b,c");
    assert!(c.is_complete(), "{:?}", c.untranslated);
}

#[test]
fn an_unsupported_function_leaves_its_attribute_untranslated_with_its_line() {
    let source = job(&format!("meta {{\n  x = file(\"a.txt\")\n}}\n{TASK}"));
    let c = hcl(&source).unwrap();
    assert_eq!(c.untranslated.len(), 1, "{:?}", c.untranslated);
    assert_eq!(c.untranslated[0].block, "job.group[g].meta.x");
    assert_eq!(c.untranslated[0].line, 4);
    assert!(c.untranslated[0].reason.contains("file()"));
}

#[test]
fn every_unknown_key_is_reported_never_dropped() {
    let task = "task \"t\" {\n  driver = \"docker\"\n  config {\n    image = \"busybox\"\n    privileged = true\n  }\n}";
    let source = job(&format!("bogus = 1\nweird_block {{ a = 1 }}\n{task}"));
    let c = hcl(&source).unwrap();
    let blocks: Vec<&str> = c.untranslated.iter().map(|u| u.block.as_str()).collect();
    assert!(blocks.contains(&"job.group[g].bogus"), "{blocks:?}");
    assert!(blocks.contains(&"job.group[g].weird_block"), "{blocks:?}");
    assert!(
        blocks.contains(&"job.group[g].task[t].config.privileged"),
        "{blocks:?}"
    );

    let json = r#"{"Job": {"ID": "j", "Mystery": {"a": 1}, "TaskGroups": [{"Name": "g", "Unknown": 3,
        "Tasks": [{"Name": "t", "Driver": "docker", "Config": {"image": "busybox"}, "Unset": null}]}]}}"#;
    let c = hcl(json).unwrap();
    let blocks: Vec<(&str, usize)> = c
        .untranslated
        .iter()
        .map(|u| (u.block.as_str(), u.line))
        .collect();
    assert_eq!(blocks, [("Job.TaskGroups[0].Unknown", 0), ("Job.Mystery", 0)]);
}

#[test]
fn a_job_whose_tasks_cannot_run_is_refused_naming_why() {
    let source = job(r#"task "t" {
  driver = "exec"
  config { command = "/bin/true" }
}"#);
    let err = hcl(&source).unwrap_err();
    assert!(err.to_string().contains("\"exec\" driver"), "{err}");
}

#[test]
fn names_become_dns_labels_with_a_note() {
    let source = r#"job "My_Job.v2" {
  group "Web_Group_With_A_Very_Long_Name" {
    task "Main_Task" {
      driver = "docker"
      config { image = "busybox" }
    }
  }
}"#;
    let c = hcl(source).unwrap();
    assert_eq!(c.job.metadata.name.as_deref(), Some("my-job-v2"));
    assert_eq!(c.job.spec.groups[0].name, "web-group-with-a-ver");
    assert_eq!(c.job.spec.groups[0].tasks[0].name, "main-task");
    assert_eq!(c.notes.len(), 3, "{:?}", c.notes);
    let renamed = convert(
        source,
        Format::Hcl,
        &Options {
            name: Some("other".into()),
            namespace: Some("team-a".into()),
            ..Options::default()
        },
    )
    .unwrap();
    assert_eq!(renamed.job.metadata.name.as_deref(), Some("other"));
    assert_eq!(renamed.job.metadata.namespace.as_deref(), Some("team-a"));
}

#[test]
fn constraint_shorthands_and_operators() {
    let source = job(&format!(
        r#"constraint {{
  distinct_property = "${{meta.rack}}"
}}
constraint {{
  attribute = "${{attr.os.version}}"
  version   = ">= 20.04"
}}
constraint {{
  attribute = "${{node.class}}"
  operator  = "regexp"
  value     = "^gpu-"
}}
constraint {{
  attribute = "${{node.class}}"
  operator  = "almost"
  value     = "x"
}}
{TASK}"#
    ));
    let c = hcl(&source).unwrap();
    let ops: Vec<Operator> = c.job.spec.groups[0]
        .constraints
        .iter()
        .map(|c| c.operator)
        .collect();
    assert_eq!(
        ops,
        [Operator::DistinctProperty, Operator::Version, Operator::Regexp]
    );
    assert_eq!(
        c.job.spec.groups[0].constraints[0].attribute.as_deref(),
        Some("${meta.rack}")
    );
    assert_eq!(c.untranslated.len(), 1);
    assert!(
        c.untranslated[0].reason.contains("operators"),
        "{:?}",
        c.untranslated
    );
}

#[test]
fn task_level_blocks_move_to_the_group() {
    let source = job(r#"task "t" {
  driver = "docker"
  config { image = "busybox" }
  vault { policies = ["p"] }
  template {
    data = "{{ with secret \"kv/data/t\" }}{{ .Data.data.x }}{{ end }}"
    destination = "secrets/t.txt"
  }
  restart { attempts = 4 }
  constraint {
    attribute = "${attr.kernel.name}"
    value = "linux"
  }
  service {
    name = "api"
    port = "8080"
  }
}"#);
    let c = hcl(&source).unwrap();
    let group = &c.job.spec.groups[0];
    assert_eq!(group.vault.as_ref().map(|v| v.role.as_str()), Some("j"));
    assert_eq!(group.restart.as_ref().and_then(|r| r.attempts), Some(4));
    assert_eq!(group.constraints.len(), 1);
    assert_eq!(group.services[0].task.as_deref(), Some("t"));
    assert_eq!(group.services[0].port, "8080");
    assert!(
        c.notes.iter().any(|n| n.message.contains("auth role \"j\"")),
        "{:?}",
        c.notes
    );
    assert_eq!(group.tasks[0].templates[0].destination, "t.txt");

    // Without a template to render, vault is Nomad's token in the environment: named.
    let c = hcl(&source.replace("template {", "dropped {")).unwrap();
    assert!(c.job.spec.groups[0].vault.is_none());
    assert!(
        c.untranslated
            .iter()
            .any(|u| u.block == "job.group[g].task[t].vault"),
        "{:?}",
        c.untranslated
    );
}

#[test]
fn exec_tasks_run_in_an_image_when_asked() {
    let source = job(r#"task "t" {
  driver = "raw_exec"
  config {
    command = "sleep"
    args = ["5"]
  }
}"#);
    assert!(hcl(&source).is_err());
    let options = Options {
        exec_image: Some("busybox:1.36".into()),
        ..Options::default()
    };
    let c = convert(&source, Format::Hcl, &options).unwrap();
    let task = &c.job.spec.groups[0].tasks[0];
    assert_eq!(task.image, "busybox:1.36");
    assert_eq!(task.command.as_deref(), Some("sleep"));
    assert_eq!(task.args, ["5"]);
    assert!(c.is_complete(), "{:?}", c.untranslated);
}

#[test]
fn a_system_jobs_canaries_are_named_not_kept() {
    let c = hcl(&format!(
        "job \"j\" {{\n  type = \"system\"\n  group \"g\" {{\n    update {{\n      canary = 50\n    }}\n{TASK}\n  }}\n}}\n"
    ))
    .unwrap();
    assert_eq!(c.job.spec.groups[0].update.as_ref().and_then(|u| u.canary), None);
    assert_eq!(c.untranslated[0].block, "job.group[g].update.canary");
    assert_eq!(c.untranslated[0].line, 5);
}

#[test]
fn templates_without_vault_are_untranslated() {
    let source = job(r#"task "t" {
  driver = "docker"
  config { image = "busybox" }
  template {
    data = "x"
    destination = "local/x.conf"
  }
}"#);
    let c = hcl(&source).unwrap();
    assert!(c.job.spec.groups[0].tasks[0].templates.is_empty());
    assert!(c.untranslated[0].reason.contains("vault"), "{:?}", c.untranslated);
}

#[test]
fn periodic_on_a_service_job_and_unusable_crons() {
    let c = hcl("job \"j\" {\n periodic { cron = \"* * * * *\" }\n group \"g\" {\n task \"t\" {\n driver = \"docker\"\n config { image = \"x\" }\n }\n }\n}").unwrap();
    assert_eq!(c.job.spec.type_, JobType::Service);
    assert!(c.job.spec.periodic.is_none());
    assert_eq!(c.untranslated[0].block, "job.periodic");
    let err = hcl("job \"j\" {\n type = \"batch\"\n periodic { cron = \"*/5 * * * * * 2030\" }\n group \"g\" {\n task \"t\" {\n driver = \"docker\"\n config { image = \"x\" }\n }\n }\n}")
        .unwrap_err();
    assert_eq!(err.line(), 3, "{err}");
}

#[test]
fn hcl_json_syntax_is_named_not_misread() {
    let err = hcl(r#"{"job": {"j": {}}}"#).unwrap_err();
    assert!(err.to_string().contains("HCL's JSON syntax"), "{err}");
}

#[test]
fn service_names_repeated_or_not_ascii_are_made_unique_labels() {
    let service = |name: &str| format!("service {{\n  name = \"{name}\"\n  port = \"80\"\n}}\n");
    let source = job(&format!(
        "{}{}{}{TASK}",
        service("ünïcødé-sérvice-with-a-long-name"),
        service("ünïcødé-sérvice-with-a-long-name"),
        service("web")
    ));
    let c = hcl(&source).unwrap();
    let names: Vec<&str> = c.job.spec.groups[0]
        .services
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names.len(), 3);
    assert!(names.iter().all(|n| n.len() <= 22 && n.is_ascii()), "{names:?}");
    assert_ne!(names[0], names[1]);
}

#[test]
fn arithmetic_at_the_edges_does_not_panic() {
    for expr in [
        "9223372036854775807 + 1",
        "-9223372036854775807 - 2",
        "9223372036854775807 * 9223372036854775807",
        "-(-9223372036854775807 - 1)",
        "1 / 0",
        "1 % 0",
        "-9223372036854775808 / -1",
        "18446744073709551615 + 18446744073709551615",
        "substr(\"abc\", -9223372036854775807, 9223372036854775807)",
        "element([1], 9223372036854775807)",
        "format(\"%d\")",
    ] {
        // Refused naming the line, or (a value that fits nowhere) named as untranslated.
        match hcl(&job(&format!("count = {expr}\n{TASK}"))) {
            Err(err) => assert_eq!(err.line(), 3, "{expr}: {err}"),
            Ok(c) => assert!(c.untranslated.iter().all(|u| u.line == 3), "{expr}"),
        }
    }
    // Arithmetic that fits still computes, in expressions and in templates.
    let c = hcl(&job(&format!(
        "count = 2 * 3 + -1 % 4\nmeta {{ x = \"${{10 / 4}}-${{7 - 9}}\" }}\n{TASK}"
    )))
    .unwrap();
    assert_eq!(c.job.spec.groups[0].count, 5);
    assert_eq!(c.job.spec.groups[0].meta["x"], "2.5--2");
}

#[test]
fn deeply_nested_interpolations_are_refused_before_parsing() {
    let nested = |depth: usize| {
        let open = "\"${".repeat(depth);
        let close = "}\"".repeat(depth);
        job(&format!("meta {{ x = {open}1{close} }}\n{TASK}"))
    };
    assert!(hcl(&nested(3)).is_ok());
    let err = hcl(&nested(17)).unwrap_err();
    assert!(err.to_string().contains("nested more than 16"), "{err}");
    assert_eq!(err.line(), 3);
    // Found by the fuzzer: unclosed strings whose parse took seconds.
    let unclosed = format!("job \"a\" {{\n  g = {}\n}}\n", "1 * 3 + \"${".repeat(40));
    let started = std::time::Instant::now();
    assert!(matches!(hcl(&unclosed), Err(Error::Syntax { .. })));
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    // Escapes and comments do not count.
    let escaped = job(&format!(
        "# \"${{ \"${{ \"${{\nmeta {{ x = \"$${{a}} %%{{b}}\" }}\n{TASK}"
    ));
    assert_eq!(hcl(&escaped).unwrap().job.spec.groups[0].meta["x"], "${a} %{b}");
}
