//! `capstan-sidecar init`: the transparent redirect, set up once in the pod's network
//! namespace before any other container starts (so nothing the application sends can
//! leave unproxied). Inbound TCP to any port but the proxy's own goes to the mTLS
//! listener (plain text meets a TLS handshake and is refused); outbound TCP from
//! anything but the proxy's dedicated GID goes to the transparent listener. Re-running it (an init
//! container restart) rebuilds the same rules.
//!
//! Both address families: iptables for IPv4, ip6tables for IPv6, the same rules. Where
//! IPv6 has no nat table (an old kernel, say), IPv6 TCP is dropped instead, in and out;
//! where neither can be set up and the pod has IPv6 at all, the step fails, since an
//! IPv6 peer would otherwise reach the application in plain text.

use anyhow::{Context as _, bail};
use std::process::Command;

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The GID the proxy runs as, dedicated to it: traffic of processes with this GID
    /// is not redirected (the proxy's own, no loop). A GID, not the proxy's UID: an
    /// application whose image's USER happens to be the proxy's UID (and whose group
    /// the pod does not set) would otherwise leave the pod unproxied.
    #[arg(long, env = "CAPSTAN_PROXY_GID", default_value_t = 1338)]
    pub proxy_gid: u32,
    #[arg(long, env = capstan_contract::env::proxy::INBOUND_PORT, default_value_t = 20000)]
    pub inbound_port: u16,
    #[arg(long, env = capstan_contract::env::proxy::OUTBOUND_PORT, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Inbound ports left alone (the admin port, so kubelet probes reach it).
    #[arg(
        long,
        env = "CAPSTAN_EXCLUDE_INBOUND_PORTS",
        value_delimiter = ',',
        default_value = "15020"
    )]
    pub exclude_inbound_ports: Vec<u16>,
    /// Destinations never redirected (the API server's address, say), IPv4 or IPv6.
    #[arg(long, env = "CAPSTAN_EXCLUDE_OUTBOUND_CIDRS", value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
    /// The iptables binary.
    #[arg(long, env = "CAPSTAN_IPTABLES", default_value = "iptables")]
    pub iptables: String,
    /// The ip6tables binary.
    #[arg(long, env = "CAPSTAN_IP6TABLES", default_value = "ip6tables")]
    pub ip6tables: String,
    /// Redirect inbound traffic only: a pod with explicit upstreams dials the proxy
    /// itself, so its outbound traffic is left alone, but its ports are still reachable
    /// only through the mTLS listener.
    #[arg(long, env = "CAPSTAN_INBOUND_ONLY")]
    pub inbound_only: bool,
}

const INBOUND_CHAIN: &str = "CAPSTAN_INBOUND";
const OUTBOUND_CHAIN: &str = "CAPSTAN_OUTBOUND";

/// An address family, with the tool and the loopback range it is programmed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }

    fn of(ip: std::net::IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    fn max_prefix(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }
}

/// The excluded CIDRs, checked, with their family.
fn excluded(args: &InitArgs) -> anyhow::Result<Vec<(Family, &str)>> {
    let mut out = Vec::new();
    for cidr in &args.exclude_outbound_cidrs {
        let (ip, prefix) = match cidr.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (cidr.as_str(), None),
        };
        let ip: std::net::IpAddr = ip
            .parse()
            .with_context(|| format!("--exclude-outbound-cidrs: {cidr:?} is not an IP CIDR"))?;
        let family = Family::of(ip);
        if let Some(prefix) = prefix {
            let prefix: u8 = prefix
                .parse()
                .with_context(|| format!("--exclude-outbound-cidrs: bad prefix in {cidr:?}"))?;
            if prefix > family.max_prefix() {
                bail!("--exclude-outbound-cidrs: bad prefix in {cidr:?}");
            }
        }
        out.push((family, cidr.as_str()));
    }
    Ok(out)
}

/// The nat rules of one family, as iptables argument lists (after the `-t nat` every
/// one starts with).
pub fn rules(args: &InitArgs, family: Family) -> anyhow::Result<Vec<Vec<String>>> {
    if args.inbound_port == args.outbound_port {
        bail!("the inbound and outbound ports must differ");
    }
    let excluded = excluded(args)?;
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let mut out = Vec::new();
    let mut keep = vec![args.inbound_port];
    keep.extend(&args.exclude_inbound_ports);
    for port in keep {
        out.push(s(&[
            "-A",
            INBOUND_CHAIN,
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    out.push(s(&[
        "-A",
        INBOUND_CHAIN,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &args.inbound_port.to_string(),
    ]));
    if args.inbound_only {
        return Ok(out);
    }
    out.push(s(&[
        "-A",
        OUTBOUND_CHAIN,
        "-m",
        "owner",
        "--gid-owner",
        &args.proxy_gid.to_string(),
        "-j",
        "RETURN",
    ]));
    out.push(s(&["-A", OUTBOUND_CHAIN, "-o", "lo", "-j", "RETURN"]));
    out.push(s(&[
        "-A",
        OUTBOUND_CHAIN,
        "-d",
        family.loopback(),
        "-j",
        "RETURN",
    ]));
    for (_, cidr) in excluded.iter().filter(|(f, _)| *f == family) {
        out.push(s(&["-A", OUTBOUND_CHAIN, "-d", cidr, "-j", "RETURN"]));
    }
    out.push(s(&[
        "-A",
        OUTBOUND_CHAIN,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &args.outbound_port.to_string(),
    ]));
    Ok(out)
}

/// The IPv6 fallback (filter table): TCP into the pod dropped (and out of it, unless
/// only inbound is redirected), loopback kept.
fn drop_rules(args: &InitArgs) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let mut out = vec![
        s(&["-A", INBOUND_CHAIN, "-i", "lo", "-j", "RETURN"]),
        s(&["-A", INBOUND_CHAIN, "-p", "tcp", "-j", "DROP"]),
    ];
    if !args.inbound_only {
        out.push(s(&["-A", OUTBOUND_CHAIN, "-o", "lo", "-j", "RETURN"]));
        out.push(s(&["-A", OUTBOUND_CHAIN, "-p", "tcp", "-j", "DROP"]));
    }
    out
}

/// Runs one iptables command: whether it succeeded (Err: the binary could not run).
type Exec<'a> = dyn FnMut(&str, &[&str]) -> anyhow::Result<bool> + 'a;

/// Puts `rules` into `table`: the chains created (or flushed), filled, and jumped to
/// from `hooks` (inbound's, then outbound's; outbound's not with `inbound_only`).
fn program(
    exec: &mut Exec<'_>,
    tool: &str,
    table: &str,
    hooks: [&str; 2],
    rules: &[Vec<String>],
    inbound_only: bool,
) -> anyhow::Result<()> {
    let chains: &[&str] = if inbound_only {
        &[INBOUND_CHAIN]
    } else {
        &[INBOUND_CHAIN, OUTBOUND_CHAIN]
    };
    let mut run = |a: &[&str]| -> anyhow::Result<bool> {
        let full: Vec<&str> = ["-w", "-t", table]
            .iter()
            .copied()
            .chain(a.iter().copied())
            .collect();
        exec(tool, &full)
    };
    for &chain in chains {
        // Exists already on a re-run: then it is flushed and rebuilt.
        let _ = run(&["-N", chain])?;
        if !run(&["-F", chain])? {
            bail!("{tool} could not create or flush chain {chain} in table {table} (NET_ADMIN missing?)");
        }
    }
    for rule in rules {
        let refs: Vec<&str> = rule.iter().map(String::as_str).collect();
        if !run(&refs)? {
            bail!("{tool} -t {table} refused: {}", rule.join(" "));
        }
    }
    for (hook, &chain) in hooks.into_iter().zip(chains) {
        let jump = ["-p", "tcp", "-j", chain];
        let check: Vec<&str> = ["-C", hook].iter().chain(jump.iter()).copied().collect();
        if !run(&check)? {
            let add: Vec<&str> = ["-A", hook].iter().chain(jump.iter()).copied().collect();
            if !run(&add)? {
                bail!("{tool} -t {table} refused the jump from {hook} to {chain}");
            }
        }
    }
    Ok(())
}

/// How IPv6 was dealt with.
#[derive(Debug, PartialEq, Eq)]
pub enum Ipv6Outcome {
    Redirected,
    /// No IPv6 nat here: IPv6 TCP is dropped (the reason the redirect failed).
    Dropped(String),
    /// The pod has no IPv6 at all: nothing can arrive or leave over it.
    Off(String),
}

/// Both families' rules through `exec`; `ipv6_on`: whether the pod's kernel has IPv6.
pub fn apply(args: &InitArgs, exec: &mut Exec<'_>, ipv6_on: bool) -> anyhow::Result<Ipv6Outcome> {
    let v4 = rules(args, Family::V4)?;
    let v6 = rules(args, Family::V6)?;
    let only = args.inbound_only;
    program(exec, &args.iptables, "nat", ["PREROUTING", "OUTPUT"], &v4, only)?;
    let redirect = match program(exec, &args.ip6tables, "nat", ["PREROUTING", "OUTPUT"], &v6, only) {
        Ok(()) => return Ok(Ipv6Outcome::Redirected),
        Err(error) => format!("{error:#}"),
    };
    let dropped = program(
        exec,
        &args.ip6tables,
        "filter",
        ["INPUT", "OUTPUT"],
        &drop_rules(args),
        only,
    );
    match dropped {
        Ok(()) => Ok(Ipv6Outcome::Dropped(redirect)),
        Err(_) if !ipv6_on => Ok(Ipv6Outcome::Off(redirect)),
        Err(error) => bail!(
            "the pod has IPv6, but neither the IPv6 redirect nor an IPv6 TCP drop could be set up, \
             so IPv6 peers would reach the application in plain text: redirect: {redirect}; drop: {error:#}"
        ),
    }
}

/// Whether this network namespace has IPv6 (any interface with an IPv6 address,
/// loopback included: the kernel lists none when IPv6 is off).
fn ipv6_on() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|text| !text.trim().is_empty())
}

pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let mut exec = |tool: &str, a: &[&str]| -> anyhow::Result<bool> {
        // image-programs: iptables ip6tables (the defaults of --iptables, --ip6tables)
        let out = Command::new(tool)
            .args(a)
            .output()
            .with_context(|| format!("running {tool}"))?;
        Ok(out.status.success())
    };
    let ipv6 = apply(args, &mut exec, ipv6_on())?;
    match &ipv6 {
        Ipv6Outcome::Redirected => {}
        Ipv6Outcome::Dropped(why) => {
            tracing::warn!(redirect_error = %why, "No IPv6 redirect possible here: IPv6 TCP is dropped instead")
        }
        Ipv6Outcome::Off(why) => {
            tracing::info!(redirect_error = %why, "IPv6 is off in this pod: nothing to redirect")
        }
    }
    tracing::info!(
        inbound = args.inbound_port,
        outbound = args.outbound_port,
        proxy_gid = args.proxy_gid,
        inbound_only = args.inbound_only,
        ipv6 = ?ipv6,
        "Transparent redirect in place"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        init: InitArgs,
    }

    fn parse(extra: &[&str]) -> InitArgs {
        Wrapper::parse_from(std::iter::once("init").chain(extra.iter().copied())).init
    }

    #[test]
    fn the_proxy_and_admin_ports_are_never_redirected() {
        let rules = rules(&parse(&[]), Family::V4).unwrap();
        let text: Vec<String> = rules.iter().map(|r| r.join(" ")).collect();
        let returns_before_redirect = |port: &str| {
            let r = text
                .iter()
                .position(|t| t.contains(&format!("--dport {port} -j RETURN")))
                .unwrap();
            let redirect = text
                .iter()
                .position(|t| t.contains("CAPSTAN_INBOUND -p tcp -j REDIRECT"))
                .unwrap();
            r < redirect
        };
        assert!(returns_before_redirect("20000"));
        assert!(returns_before_redirect("15020"));
        let owner = text
            .iter()
            .position(|t| t.contains("-m owner --gid-owner 1338 -j RETURN"))
            .unwrap();
        // The proxy is told apart by its dedicated GID only: a UID match would exempt an
        // application whose image runs it as the proxy's UID.
        assert!(!text.iter().any(|t| t.contains("--uid-owner")), "{text:#?}");
        let out = text
            .iter()
            .position(|t| t.contains("CAPSTAN_OUTBOUND -p tcp -j REDIRECT --to-ports 15001"))
            .unwrap();
        assert!(
            owner < out,
            "the proxy's own traffic must return before the redirect: {text:#?}"
        );
    }

    #[test]
    fn bad_cidrs_and_equal_ports_are_refused() {
        let v4 = |extra: &[&str]| rules(&parse(extra), Family::V4);
        assert!(v4(&["--exclude-outbound-cidrs", "10.0.0.0/33"]).is_err());
        assert!(v4(&["--exclude-outbound-cidrs", "fd00::/129"]).is_err());
        assert!(v4(&["--exclude-outbound-cidrs", "nope"]).is_err());
        assert!(v4(&["--inbound-port", "1", "--outbound-port", "1"]).is_err());
        assert!(v4(&["--exclude-outbound-cidrs", "10.96.0.1/32,10.0.0.0/8"]).is_ok());
    }

    /// IPv6 gets the same redirect as IPv4, with its own loopback and only its own
    /// excluded CIDRs.
    #[test]
    fn ipv6_gets_the_same_rules_with_its_own_addresses() {
        let args = parse(&["--exclude-outbound-cidrs", "10.96.0.1/32,fd00:96::1/128"]);
        let text = |family| -> Vec<String> {
            rules(&args, family)
                .unwrap()
                .iter()
                .map(|r| r.join(" "))
                .collect()
        };
        let (v4, v6) = (text(Family::V4), text(Family::V6));
        assert_eq!(v4.len(), v6.len());
        assert!(v6.contains(&"-A CAPSTAN_OUTBOUND -d ::1/128 -j RETURN".to_owned()));
        assert!(v6.contains(&"-A CAPSTAN_OUTBOUND -d fd00:96::1/128 -j RETURN".to_owned()));
        assert!(
            !v6.iter()
                .any(|r| r.contains("10.96.0.1") || r.contains("127.0.0.0"))
        );
        assert!(!v4.iter().any(|r| r.contains("fd00") || r.contains("::1")));
        for redirect in [
            "-A CAPSTAN_INBOUND -p tcp -j REDIRECT --to-ports 20000",
            "-A CAPSTAN_OUTBOUND -p tcp -j REDIRECT --to-ports 15001",
        ] {
            assert!(v6.contains(&redirect.to_owned()), "{v6:#?}");
        }
    }

    /// With explicit upstreams, inbound is redirected as always and outbound left alone:
    /// no outbound chain, no jump from OUTPUT, in either family.
    #[test]
    fn inbound_only_redirects_inbound_and_leaves_outbound_alone() {
        let args = parse(&["--inbound-only"]);
        for family in [Family::V4, Family::V6] {
            let text: Vec<String> = rules(&args, family)
                .unwrap()
                .iter()
                .map(|r| r.join(" "))
                .collect();
            assert!(text.contains(&"-A CAPSTAN_INBOUND -p tcp -j REDIRECT --to-ports 20000".to_owned()));
            assert!(!text.iter().any(|r| r.contains(OUTBOUND_CHAIN)), "{text:#?}");
        }
        let mut ran = Vec::new();
        let mut exec = |tool: &str, a: &[&str]| -> anyhow::Result<bool> {
            ran.push(format!("{tool} {}", a.join(" ")));
            Ok(!a.contains(&"-C"))
        };
        apply(&args, &mut exec, true).unwrap();
        assert!(ran.contains(&"iptables -w -t nat -A PREROUTING -p tcp -j CAPSTAN_INBOUND".to_owned()));
        assert!(ran.contains(&"ip6tables -w -t nat -A PREROUTING -p tcp -j CAPSTAN_INBOUND".to_owned()));
        assert!(
            !ran.iter()
                .any(|r| r.contains("OUTPUT") || r.contains(OUTBOUND_CHAIN)),
            "{ran:#?}"
        );
    }

    /// A fake iptables: which (tool, table) pairs work; records what ran.
    fn fake(
        works: &'static [(&'static str, &'static str)],
    ) -> impl FnMut(&str, &[&str]) -> anyhow::Result<bool> {
        move |tool: &str, args: &[&str]| {
            let table = args[2];
            Ok(works.contains(&(tool, table)))
        }
    }

    #[test]
    fn ipv6_is_redirected_else_dropped_else_the_step_fails() {
        let args = parse(&[]);
        let all: &[(&str, &str)] = &[("iptables", "nat"), ("ip6tables", "nat"), ("ip6tables", "filter")];
        assert_eq!(
            apply(&args, &mut fake(all), true).unwrap(),
            Ipv6Outcome::Redirected
        );
        let no_nat6: &[(&str, &str)] = &[("iptables", "nat"), ("ip6tables", "filter")];
        assert!(matches!(
            apply(&args, &mut fake(no_nat6), true).unwrap(),
            Ipv6Outcome::Dropped(_)
        ));
        let v4_only: &[(&str, &str)] = &[("iptables", "nat")];
        let error = apply(&args, &mut fake(v4_only), true).unwrap_err().to_string();
        assert!(
            error.contains("neither the IPv6 redirect nor an IPv6 TCP drop"),
            "{error}"
        );
        // A pod without IPv6 cannot be reached over it: nothing to do.
        assert!(matches!(
            apply(&args, &mut fake(v4_only), false).unwrap(),
            Ipv6Outcome::Off(_)
        ));
        // IPv4 failing is always fatal.
        assert!(apply(&args, &mut fake(&[]), false).is_err());
    }
}
