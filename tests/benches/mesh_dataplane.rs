//! The mesh data path's benchmark (issue 4, part 7), one run on this machine: the same
//! HTTP workload (1 KiB answers, 64 keep-alive connections) straight to the application,
//! through a Capstan sidecar pair (mTLS, an L7 intention), and through an HAProxy mTLS
//! pair with an equivalent path rule (the well-known peer, from Debian), and through a
//! plain-TCP HAProxy pair (no TLS, no HTTP: the floor of any proxy pair on these two
//! hops, which says how much of the throughput ratio the path itself takes). Figures
//! and ratios are printed, and written to target/bench-mesh.json.
//!
//! Run with `hack/bench-mesh.sh` (release builds, a cluster, HAProxy installed).

use anyhow::{Context as _, Result, ensure};
use capstan_tests::{mesh::*, netns::*, *};
use serde_json::{Value, json};
use std::{path::Path, time::Duration};

const CONNECTIONS: &str = "64";
const SECONDS: &str = "10";
/// Open-loop runs of each path; the throughput ratio is the median of the rounds' ratios.
const OPEN_LOOP_ROUNDS: usize = 3;
const RATE: &str = "1000";
const BULK_BYTES: u64 = 2 << 30;
const HAPROXY_CLIENT_PORT: u16 = 9191;
const HAPROXY_SERVER_PORT: u16 = 20443;
/// The plain-TCP pair: the floor any proxy pair has on this path (below).
const FLOOR_CLIENT_PORT: u16 = 9292;
const FLOOR_SERVER_PORT: u16 = 20444;
/// The paths measured, in the report's order.
const PATHS: [&str; 4] = ["direct", "capstan", "haproxy", "tcp-pair"];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let mut mesh = Mesh::start("1h", &[]).await?;
    let api = mesh.workload("api", App::HttpOpen, "").await?;
    mesh.publish_service("api", true, &[api.address.into()]).await?;
    let mut web = mesh.workload("web", App::None, "api:9090").await?;
    mesh.apply_intention(
        "api",
        json!({"destination": {"name": "api"}, "sources": [{"name": "web", "permissions": [
            {"action": "allow", "http": {"pathPrefix": "/kib", "methods": ["GET"]}},
            {"action": "allow", "http": {"pathPrefix": "/bulk", "methods": ["GET"]}},
        ]}]}),
    )
    .await?;
    let app = bin("capstan-e2e-app");
    let capstan_url = "http://127.0.0.1:9090";
    eventually(Duration::from_secs(10), "the intention", || {
        let (web, app) = (&web, &app);
        async move {
            let out = web
                .exec(app, &["request", "GET", &format!("{capstan_url}/kib")])
                .await
                .ok()?;
            out.contains("\"status\":200").then_some(())
        }
    })
    .await?;
    let sidecars = [
        ("server sidecar", api.pid("proxy").context("api proxy")?),
        ("client sidecar", web.pid("proxy").context("web proxy")?),
    ];
    if let Ok(kind) = std::env::var("CAPSTAN_BENCH_PROFILE") {
        let admin = |pod: &Pod| std::net::SocketAddr::new(pod.address.into(), ADMIN_PORT);
        let sidecars = [
            (sidecars[0].0, sidecars[0].1, admin(&api)),
            (sidecars[1].0, sidecars[1].1, admin(&web)),
        ];
        let namespaces = [("web", web.netns.as_str()), ("api", api.netns.as_str())];
        return profile(&kind, &web, &app, &sidecars, &namespaces, capstan_url).await;
    }
    let haproxy = Haproxy::start(&mut web, &api, mesh.namespace())?;
    let direct_url = format!("http://{}:{APP_PORT}", api.address);
    let haproxy_url = format!("http://127.0.0.1:{HAPROXY_CLIENT_PORT}");
    let floor_url = format!("http://127.0.0.1:{FLOOR_CLIENT_PORT}");
    for (pair, url) in [("HAProxy", &haproxy_url), ("plain-TCP", &floor_url)] {
        let probe = web.exec(&app, &["request", "GET", &format!("{url}/kib")]).await?;
        ensure!(
            probe.contains("\"status\":200"),
            "the {pair} pair does not answer: {probe}\nlogs: {}",
            haproxy.logs()
        );
    }

    // The peer's two processes are measured as ours are, at the same rate, so the CPU
    // and memory figures say where the sidecars stand against a C proxy on this machine.
    let haproxies = [
        ("server HAProxy", haproxy.server_pids[0]),
        ("client HAProxy", web.pid("haproxy").context("web's HAProxy")?),
    ];
    // And the floor's: what moving the bytes alone costs per request here.
    let floor = [
        ("server plain-TCP HAProxy", haproxy.server_pids[1]),
        (
            "client plain-TCP HAProxy",
            web.pid("haproxy-tcp").context("web's plain-TCP HAProxy")?,
        ),
    ];

    let paths = [
        ("direct", direct_url.as_str()),
        ("capstan", capstan_url),
        ("haproxy", haproxy_url.as_str()),
        ("tcp-pair", floor_url.as_str()),
    ];
    let mut results = serde_json::Map::new();
    for (name, url) in paths {
        eprintln!("measuring {name}");
        let proxies: &[(&str, u32)] = match name {
            "capstan" => &sidecars,
            "haproxy" => &haproxies,
            "tcp-pair" => &floor,
            _ => &[],
        };
        let idle_rss: Vec<u64> = proxies
            .iter()
            .map(|(_, pid)| rss_kib(*pid))
            .collect::<Result<_>>()?;
        // The fixed rate first: the targets for CPU and memory are set at 1,000 rps, and
        // glibc keeps an earlier burst's heap resident, which would make the RSS at the
        // rate that of the burst. The open loop's own peak is reported beside it.
        let pids: Vec<u32> = proxies.iter().map(|(_, p)| *p).collect();
        let cpu_before = cpu_ticks(&pids)?;
        let sampler = RssSampler::start(pids.clone());
        let fixed = load(&web, &app, &format!("{url}/kib"), RATE).await?;
        let at_rate = sampler.stop().await;
        let cpu_after = cpu_ticks(&pids)?;
        let sampler = RssSampler::start(pids);
        let open = load(&web, &app, &format!("{url}/kib"), "0").await?;
        let open_peak = sampler.stop().await;
        let bulk = bulk(&web, &app, url).await?;
        let mut entry = json!({"open_loop": open, "fixed_rate": fixed, "bulk_rounds": [bulk]});
        if !proxies.is_empty() {
            let requests = requests(&fixed);
            let seconds = fixed["seconds"].as_f64().unwrap_or(1.0);
            let tick = ticks_per_second();
            let per_sidecar: Vec<Value> = proxies
                .iter()
                .enumerate()
                .map(|(i, (label, _))| {
                    let cpu_seconds = (cpu_after[i] - cpu_before[i]) as f64 / tick;
                    json!({
                        "sidecar": label,
                        "cpu_ms_per_1000_requests": cpu_seconds * 1000.0 / (requests / 1000.0),
                        "vcpu_at_rate": cpu_seconds / seconds,
                        "rss_idle_mib": idle_rss[i] as f64 / 1024.0,
                        "rss_at_rate_mib": at_rate.get(i).copied().unwrap_or_default() as f64 / 1024.0,
                        "rss_peak_open_loop_mib": open_peak.get(i).copied().unwrap_or_default() as f64 / 1024.0,
                    })
                })
                .collect();
            entry["sidecars"] = json!(per_sidecar);
        }
        results.insert(name.to_owned(), entry);
    }
    // The direct path's open loop moves by ±10 % from run to run, as much as any change
    // to a proxy: more rounds, each path in turn, and the ratio taken within each round.
    for (name, _) in paths {
        let first = results[name]["open_loop"]["rps"].clone();
        results[name]["open_loop_rounds"] = json!([first]);
    }
    // So does a single bulk transfer (±8 %, measured): the same, in rounds of its own.
    for round in 2..=OPEN_LOOP_ROUNDS {
        eprintln!("open loop and bulk, round {round} of {OPEN_LOOP_ROUNDS}");
        for (name, url) in paths {
            let open = load(&web, &app, &format!("{url}/kib"), "0").await?;
            if let Some(rounds) = results[name]["open_loop_rounds"].as_array_mut() {
                rounds.push(open["rps"].clone());
            }
        }
        for (name, url) in paths {
            let transfer = bulk(&web, &app, url).await?;
            if let Some(rounds) = results[name]["bulk_rounds"].as_array_mut() {
                rounds.push(transfer);
            }
        }
    }
    drop(haproxy);
    report(&Value::Object(results))
}

/// The noise-free figures behind the benchmark's (`hack/bench-mesh.sh --profile KIND`),
/// for the sidecar pair only. `callgrind`: the sidecars run under valgrind (the script's
/// wrapper); instructions are counted over a short and a long fixed-rate run, and their
/// difference divided by the difference in requests is the cost of one request, without
/// the connections' handshakes or start-up. `strace`: system calls of each sidecar,
/// counted over one fixed-rate run of the benchmark's rate. `perf`: the pair's CPU per
/// request and RSS at that rate, then a perf profile of each sidecar, kernel included.
/// `segments`: the TCP counters of each pod's network namespace, per request. `bulk`:
/// bulk transfers through the pair, each with the sidecars' CPU per GB, then a perf
/// profile of one.
async fn profile(
    kind: &str,
    web: &Pod,
    app: &Path,
    sidecars: &[(&str, u32, std::net::SocketAddr)],
    namespaces: &[(&str, &str)],
    base_url: &str,
) -> Result<()> {
    let url = &format!("{base_url}/kib");
    let rate = std::env::var("CAPSTAN_BENCH_PROFILE_RATE").unwrap_or_else(|_| "100".to_owned());
    match kind {
        "callgrind" => {
            // The wrapper dumps the counters whenever a histogram is encoded, that is at
            // each /metrics scrape: a scrape before and after each run brackets it.
            let dir = std::env::var("CAPSTAN_CALLGRIND_DIR").context("CAPSTAN_CALLGRIND_DIR")?;
            let dir = Path::new(&dir);
            let mut runs = Vec::new();
            for seconds in ["2", "12"] {
                for (_, _, admin) in sidecars {
                    http_get(*admin, "/metrics").await?;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut seen: Vec<std::collections::HashSet<std::path::PathBuf>> = Vec::new();
                for (_, pid, _) in sidecars {
                    let mut set = std::collections::HashSet::new();
                    new_dumps_total(dir, *pid, &mut set)?;
                    seen.push(set);
                }
                let out = web.exec(app, &["load", url, CONNECTIONS, &rate, seconds]).await?;
                let v: Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
                ensure!(v["errors"] == json!(0), "errors under load: {v}");
                let mut counts = Vec::new();
                for (i, (_, pid, admin)) in sidecars.iter().enumerate() {
                    http_get(*admin, "/metrics").await?;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let total = new_dumps_total(dir, *pid, &mut seen[i])?;
                    // No dump at all: the wrapper's --dump-before pattern names no
                    // function of this build (inlined away, say), and every figure would
                    // read 0.
                    ensure!(
                        total > 0,
                        "no callgrind dump from {pid} after a /metrics scrape: check the --dump-before pattern in hack/bench-mesh.sh against `nm -C` of the sidecar"
                    );
                    counts.push(total);
                }
                eprintln!("{seconds} s at {rate} rps: {v}; instructions {counts:?}");
                runs.push((v["requests"].as_f64().unwrap_or(0.0), counts));
            }
            let (short, long) = (&runs[0], &runs[1]);
            for (i, (label, ..)) in sidecars.iter().enumerate() {
                let per_request = (long.1[i] as f64 - short.1[i] as f64) / (long.0 - short.0);
                println!(
                    "{label}: {per_request:.0} instructions per request (callgrind, {rate} rps, {CONNECTIONS} connections)"
                );
            }
        }
        "strace" => {
            let mut tracers = Vec::new();
            for (label, pid, _) in sidecars {
                let file = std::env::temp_dir().join(format!("capstan-strace-{pid}.txt"));
                let child = std::process::Command::new("strace")
                    .args(["-c", "-f", "-p", &pid.to_string(), "-o"])
                    .arg(&file)
                    .stderr(std::process::Stdio::null())
                    .spawn()?;
                tracers.push((*label, child, file));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let v = load(web, app, url, &rate).await?;
            for (_, child, _) in &tracers {
                run("kill", &["-INT", &child.id().to_string()])?;
            }
            println!("{SECONDS} s at {rate} rps: {v}");
            for (label, mut child, file) in tracers {
                child.wait()?;
                println!("{label}:\n{}", std::fs::read_to_string(&file)?);
            }
        }
        "perf" => {
            // First the benchmark's own figures for the pair alone (CPU per request, RSS
            // under load: a quick loop while changing the sidecar), then where that CPU
            // goes, kernel included, sampled by perf during a second run.
            let pids: Vec<u32> = sidecars.iter().map(|(_, pid, _)| *pid).collect();
            let before = cpu_ticks(&pids)?;
            let sampler = RssSampler::start(pids.clone());
            let v = load(web, app, url, &rate).await?;
            let peak = sampler.stop().await;
            let after = cpu_ticks(&pids)?;
            let requests = requests(&v);
            println!("{SECONDS} s at {rate} rps: {v}");
            for (i, (label, ..)) in sidecars.iter().enumerate() {
                let cpu_ms = (after[i] - before[i]) as f64 / ticks_per_second() * 1000.0;
                println!(
                    "{label}: {:.1} ms CPU per 1,000 requests, RSS under load {:.1} MiB",
                    cpu_ms / (requests / 1000.0),
                    peak[i] as f64 / 1024.0
                );
            }
            perf_profile(sidecars, load(web, app, url, &rate)).await?;
        }
        "bulk" => {
            let pids: Vec<u32> = sidecars.iter().map(|(_, pid, _)| *pid).collect();
            for _ in 0..3 {
                let before = cpu_ticks(&pids)?;
                let v = bulk(web, app, base_url).await?;
                let after = cpu_ticks(&pids)?;
                let gb = BULK_BYTES as f64 / 1e9;
                let cpu: Vec<String> = sidecars
                    .iter()
                    .enumerate()
                    .map(|(i, (label, ..))| {
                        let seconds = (after[i] - before[i]) as f64 / ticks_per_second();
                        format!("{label} {:.2} CPU s per GB", seconds / gb)
                    })
                    .collect();
                println!(
                    "bulk: {:.3} GB/s; {}; machine busy {:.0} % (softirq {:.0} %)",
                    v["bytes_per_second"].as_f64().unwrap_or(0.0) / 1e9,
                    cpu.join(", "),
                    v["machine_busy_percent"].as_f64().unwrap_or(f64::NAN),
                    v["machine_softirq_percent"].as_f64().unwrap_or(f64::NAN),
                );
            }
            perf_profile(sidecars, bulk(web, app, base_url)).await?;
        }
        "segments" => {
            // TCP segments per request in each pod's network namespace (both ends of a
            // loopback connection count there): what a request costs the kernel beyond
            // its messages, pure ACKs above all.
            let counters = |ns: &str| -> Result<std::collections::HashMap<String, f64>> {
                let out = run("ip", &["netns", "exec", ns, "nstat", "-asz"])?;
                Ok(out
                    .lines()
                    .filter_map(|l| {
                        let mut f = l.split_whitespace();
                        Some((f.next()?.to_owned(), f.next()?.parse().ok()?))
                    })
                    .collect())
            };
            let before: Vec<_> = namespaces
                .iter()
                .map(|(_, ns)| counters(ns))
                .collect::<Result<_>>()?;
            let v = load(web, app, url, &rate).await?;
            let after: Vec<_> = namespaces
                .iter()
                .map(|(_, ns)| counters(ns))
                .collect::<Result<_>>()?;
            let requests = requests(&v);
            println!("{SECONDS} s at {rate} rps: {v}");
            for (i, (label, _)) in namespaces.iter().enumerate() {
                let mut lines: Vec<String> = after[i]
                    .iter()
                    .filter_map(|(k, a)| {
                        let per_request = (a - before[i].get(k).copied().unwrap_or(0.0)) / requests;
                        (k.starts_with("Tcp") && per_request >= 0.01)
                            .then(|| format!("  {k:<28} {per_request:>8.2}"))
                    })
                    .collect();
                lines.sort();
                println!("{label} (per request):\n{}", lines.join("\n"));
            }
        }
        other => anyhow::bail!("unknown profile {other:?} (callgrind, strace, perf, segments or bulk)"),
    }
    Ok(())
}

/// The instruction totals of `pid`'s callgrind dumps not in `seen`, added up (and then
/// added to `seen`).
fn new_dumps_total(
    dir: &Path,
    pid: u32,
    seen: &mut std::collections::HashSet<std::path::PathBuf>,
) -> Result<u64> {
    let prefix = format!("callgrind.out.{pid}.");
    let mut total = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) || seen.contains(&path) {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .context("no instruction total in a dump")?;
        seen.insert(path);
    }
    Ok(total)
}

/// The requests a load run answered (at least 1, to divide by).
fn requests(run: &Value) -> f64 {
    run["requests"].as_f64().unwrap_or(1.0).max(1.0)
}

/// Samples each sidecar with perf (kernel included) while `during` runs, and prints where
/// their CPU went.
async fn perf_profile<T>(
    sidecars: &[(&str, u32, std::net::SocketAddr)],
    during: impl std::future::Future<Output = Result<T>>,
) -> Result<()> {
    let mut recorders = Vec::new();
    for (label, pid, _) in sidecars {
        let file = repo_root().join(format!("target/perf-{}.data", label.replace(' ', "-")));
        let child = std::process::Command::new("perf")
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "4999",
                "-g",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        recorders.push((*label, child, file));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    during.await?;
    for (_, child, _) in &recorders {
        run("kill", &["-INT", &child.id().to_string()])?;
    }
    for (label, mut child, file) in recorders {
        child.wait()?;
        let report = run(
            "perf",
            &[
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "dso,sym",
                "-g",
                "none",
                "--percent-limit",
                "0.7",
                "-i",
                &file.to_string_lossy(),
            ],
        )?;
        println!("{label} ({}):\n{report}", file.display());
    }
    Ok(())
}

async fn load(pod: &Pod, app: &Path, url: &str, rate: &str) -> Result<Value> {
    let out = pod.exec(app, &["load", url, CONNECTIONS, rate, SECONDS]).await?;
    let v: Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    ensure!(v["errors"] == json!(0), "errors under load at {url}: {v}");
    Ok(v)
}

/// One bulk GET of BULK_BYTES from `base_url`, with how busy the whole machine was
/// meanwhile: idle time while a pair moves bulk means its stages wait on each other (all
/// of them, the kernel's too, share the two cores), not on work.
async fn bulk(pod: &Pod, app: &Path, base_url: &str) -> Result<Value> {
    let before = machine_ticks()?;
    let out = pod
        .exec(app, &["bulk", &format!("{base_url}/bulk?bytes={BULK_BYTES}")])
        .await?;
    let after = machine_ticks()?;
    let mut v: Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    let spent: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total = spent.iter().sum::<u64>().max(1) as f64;
    let share = |ticks: u64| ticks as f64 * 100.0 / total;
    // /proc/stat's order: user, nice, system, idle, iowait, irq, softirq, ...
    v["machine_busy_percent"] = json!(100.0 - share(spent[3] + spent[4]));
    v["machine_softirq_percent"] = json!(share(spent[6]));
    Ok(v)
}

fn report(r: &Value) -> Result<()> {
    let f = |path: &[&str]| -> f64 {
        let mut v = r;
        for p in path {
            v = &v[*p];
        }
        v.as_f64().unwrap_or(f64::NAN)
    };
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    // Path `n`'s rounds under `key`: each round's number, or its `field`.
    let per_round = |n: &str, key: &str, field: Option<&str>| -> Vec<f64> {
        r[n][key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| field.map_or(v, |f| &v[f]).as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    let bulk = |n: &str, field: &str| per_round(n, "bulk_rounds", Some(field));
    let gbps = |n: &str| -> Vec<f64> { bulk(n, "bytes_per_second").iter().map(|b| b / 1e9).collect() };
    println!(
        "\nMesh data path, 1 KiB answers, {CONNECTIONS} connections, {SECONDS} s per run (2 cores, everything on one machine)"
    );
    println!(
        "{:<10} {:>14} {:>12} {:>12} {:>14}",
        "path", "open-loop rps", "p50 @1k rps", "p99 @1k rps", "bulk GB/s"
    );
    for name in PATHS {
        println!(
            "{:<10} {:>14.0} {:>10.0}µs {:>10.0}µs {:>14.2}",
            name,
            f(&[name, "open_loop", "rps"]),
            f(&[name, "fixed_rate", "p50_us"]),
            f(&[name, "fixed_rate", "p99_us"]),
            median(gbps(name))
        );
    }
    // Each round's ratio, then their median.
    let rounds = |n: &str| per_round(n, "open_loop_rounds", None);
    let ratios = |n: &str| -> Vec<f64> {
        rounds(n)
            .iter()
            .zip(rounds("direct"))
            .map(|(path, direct)| path / direct)
            .collect()
    };
    let added = |n: &str, p: &str| f(&[n, "fixed_rate", p]) - f(&["direct", "fixed_rate", p]);
    for name in PATHS {
        let list: Vec<String> = rounds(name).iter().map(|v| format!("{v:.0}")).collect();
        println!("open-loop rps by round, {name}: {}", list.join(", "));
    }
    let shown = |v: Vec<f64>| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
    println!(
        "\nthroughput vs direct, median of {OPEN_LOOP_ROUNDS} rounds: capstan {:.2} ({}), haproxy {:.2} ({}) (target ≥ 0.40)",
        median(ratios("capstan")),
        shown(ratios("capstan")),
        median(ratios("haproxy")),
        shown(ratios("haproxy"))
    );
    println!(
        "the floor, a plain-TCP pair (HAProxy, one thread each, no TLS, no HTTP): {:.2} ({}); capstan's ratio is {:.0} % of it",
        median(ratios("tcp-pair")),
        shown(ratios("tcp-pair")),
        100.0 * median(ratios("capstan")) / median(ratios("tcp-pair"))
    );
    println!(
        "added latency at 1,000 rps: capstan p50 +{:.0} µs, p99 +{:.0} µs; haproxy p50 +{:.0} µs, p99 +{:.0} µs (target p99 ≤ +300 µs)",
        added("capstan", "p50_us"),
        added("capstan", "p99_us"),
        added("haproxy", "p50_us"),
        added("haproxy", "p99_us")
    );
    for name in PATHS {
        let list: Vec<String> = gbps(name)
            .iter()
            .zip(bulk(name, "machine_busy_percent"))
            .map(|(g, busy)| format!("{g:.2} (machine busy {busy:.0} %)"))
            .collect();
        println!("bulk GB/s by round, {name}: {}", list.join(", "));
    }
    println!(
        "bulk through the capstan pair, median of {OPEN_LOOP_ROUNDS} rounds: {:.2} GB/s ({}) (target ≥ 1); the plain-TCP floor's {:.2}, direct's {:.2}",
        median(gbps("capstan")),
        shown(gbps("capstan")),
        median(gbps("tcp-pair")),
        median(gbps("direct")),
    );
    for (path, targets) in [("capstan", "; target ≤ 0.05"), ("haproxy", ""), ("tcp-pair", "")] {
        for s in r[path]["sidecars"].as_array().into_iter().flatten() {
            println!(
                "{}: {:.1} ms CPU per 1,000 requests ({:.3} vCPU at 1,000 rps{targets}), RSS idle {:.1} MiB, at 1,000 rps {:.1} MiB{}, peak in the open loop {:.1} MiB",
                s["sidecar"].as_str().unwrap_or_default(),
                s["cpu_ms_per_1000_requests"].as_f64().unwrap_or(f64::NAN),
                s["vcpu_at_rate"].as_f64().unwrap_or(f64::NAN),
                s["rss_idle_mib"].as_f64().unwrap_or(f64::NAN),
                s["rss_at_rate_mib"].as_f64().unwrap_or(f64::NAN),
                if targets.is_empty() { "" } else { " (target < 15)" },
                s["rss_peak_open_loop_mib"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    let path = repo_root().join("target/bench-mesh.json");
    std::fs::write(&path, serde_json::to_vec_pretty(r)?)?;
    println!("\nraw figures: {}", path.display());
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// utime + stime of each process, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> Result<Vec<u64>> {
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = stat.rsplit_once(')').context("stat")?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
        })
        .collect()
}

/// The machine's CPU time by kind (/proc/stat's first line: user, nice, system, idle,
/// iowait, irq, softirq, steal...), in clock ticks.
fn machine_ticks() -> Result<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("/proc/stat")?;
    cpu.split_whitespace()
        .skip(1)
        .map(|t| Ok(t.parse::<u64>()?))
        .collect()
}

/// The kernel's clock ticks per second (asked of getconf once: callers sit in loops).
fn ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        run("getconf", &["CLK_TCK"])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The highest RSS of each process while it runs.
struct RssSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let (stop, mut rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut peak = vec![0u64; pids.len()];
            loop {
                for (i, pid) in pids.iter().enumerate() {
                    peak[i] = peak[i].max(rss_kib(*pid).unwrap_or(0));
                }
                tokio::select! {
                    _ = &mut rx => return peak,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        Self { stop, task }
    }

    async fn stop(self) -> Vec<u64> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// An HAProxy mTLS pair beside ours: the client side in web's pod, the server side in
/// api's, with certificates from a CA of its own and a path rule like the intention's.
struct Haproxy {
    dir: std::path::PathBuf,
    /// The server sides' processes (in api's pod; the client sides are web's "haproxy"
    /// and "haproxy-tcp"): the mTLS pair's, then the plain-TCP pair's.
    server_pids: [u32; 2],
}

impl Haproxy {
    fn start(web: &mut Pod, api: &Pod, tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("capstan-bench-haproxy-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        // Distinct names: rcgen's default subject on both would make the leaf look
        // self-signed to OpenSSL.
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "capstan-bench-haproxy-ca");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        // HAProxy checks the server's name against the SNI it sends ("api").
        for (name, sans) in [
            ("server", vec!["api".to_owned(), api.address.to_string()]),
            ("client", vec!["web".to_owned()]),
        ] {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = rcgen::CertificateParams::new(sans)?;
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            let cert = params.signed_by(&key, &issuer)?;
            std::fs::write(
                dir.join(format!("{name}.pem")),
                format!("{}{}", cert.pem(), key.serialize_pem()),
            )?;
        }
        let d = dir.display();
        let server = format!(
            "global\n  maxconn 4096\n  nbthread 2\n  log stderr format raw local0 warning\ndefaults\n  mode http\n  log global\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend mtls\n  bind {api}:{HAPROXY_SERVER_PORT} ssl crt {d}/server.pem ca-file {d}/ca.pem verify required ssl-min-ver TLSv1.3\n  \
             http-request deny unless METH_GET {{ path_beg /kib }} || METH_GET {{ path_beg /bulk }}\n  default_backend app\n\
             backend app\n  server app 127.0.0.1:{APP_PORT}\n",
            api = api.address
        );
        let client = format!(
            "global\n  maxconn 4096\n  nbthread 2\n  log stderr format raw local0 warning\ndefaults\n  mode http\n  log global\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend local\n  bind 127.0.0.1:{HAPROXY_CLIENT_PORT}\n  default_backend mesh\n\
             backend mesh\n  server api {api}:{HAPROXY_SERVER_PORT} ssl crt {d}/client.pem ca-file {d}/ca.pem verify required ssl-min-ver TLSv1.3 sni str(api)\n",
            api = api.address
        );
        // The floor: the same two hops with nothing on them but the bytes (one thread
        // each, as each sidecar has). What a pair costs here before TLS and HTTP.
        let plain = |bind: String, to: String| {
            format!(
                "global\n  maxconn 4096\n  nbthread 1\n  log stderr format raw local0 warning\ndefaults\n  mode tcp\n  log global\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                 frontend plain\n  bind {bind}\n  default_backend next\nbackend next\n  server next {to}\n"
            )
        };
        let configs = [
            ("server", server),
            ("client", client),
            (
                "server-tcp",
                plain(
                    format!("{}:{FLOOR_SERVER_PORT}", api.address),
                    format!("127.0.0.1:{APP_PORT}"),
                ),
            ),
            (
                "client-tcp",
                plain(
                    format!("127.0.0.1:{FLOOR_CLIENT_PORT}"),
                    format!("{}:{FLOOR_SERVER_PORT}", api.address),
                ),
            ),
        ];
        for (name, config) in configs {
            std::fs::write(dir.join(format!("{name}.cfg")), config)?;
        }
        let haproxy = Path::new("/usr/sbin/haproxy");
        ensure!(
            haproxy.exists(),
            "haproxy is missing: run hack/bench-mesh.sh, which installs it"
        );
        // The server sides run in api's pod: a Pod handle owns its processes, so borrow
        // web's spawner for the clients and start the servers with `ip netns exec` here.
        let mut server_pids = [0; 2];
        // (server config, client config, the client's process name in web's pod)
        let pairs = [
            ("server", "client", "haproxy"),
            ("server-tcp", "client-tcp", "haproxy-tcp"),
        ];
        for (i, (server, client, process)) in pairs.into_iter().enumerate() {
            let child = std::process::Command::new("ip")
                .args(["netns", "exec", &api.netns])
                .arg(haproxy)
                .args(["-f", &dir.join(format!("{server}.cfg")).to_string_lossy(), "-db"])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("{server}.log")))?)
                .spawn()?;
            server_pids[i] = child.id();
            web.spawn(
                process,
                haproxy,
                &["-f", &dir.join(format!("{client}.cfg")).to_string_lossy(), "-db"],
                &[],
                None,
            )?;
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self { dir, server_pids })
    }
}

impl Haproxy {
    fn logs(&self) -> String {
        let latest = |suffix: &str| {
            std::fs::read_dir(std::env::temp_dir())
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
                .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
                .and_then(|e| std::fs::read_to_string(e.path()).ok())
                .unwrap_or_default()
        };
        let client = ["-web-haproxy.log", "-web-haproxy-tcp.log"]
            .map(latest)
            .join("\n");
        let server = ["server", "server-tcp"]
            .map(|s| std::fs::read_to_string(self.dir.join(format!("{s}.log"))).unwrap_or_default())
            .join("\n");
        format!("server:\n{server}\nclient:\n{client}")
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        for pid in self.server_pids {
            let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
        }
    }
}
