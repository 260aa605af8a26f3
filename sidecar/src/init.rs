//! `capstan-sidecar init`: the transparent redirect, set up once in the pod's network
//! namespace before any other container starts (so nothing the application sends can
//! leave unproxied). Inbound TCP to any port but the proxy's own goes to the mTLS
//! listener (plain text meets a TLS handshake and is refused); outbound TCP from
//! anything but the proxy's UID goes to the transparent listener. Re-running it (an init
//! container restart) rebuilds the same rules.

use anyhow::{Context as _, bail};
use std::process::Command;

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The UID the proxy runs as; its own traffic is not redirected (no loop).
    #[arg(long, env = "CAPSTAN_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    #[arg(long, env = "CAPSTAN_INBOUND_PORT", default_value_t = 20000)]
    pub inbound_port: u16,
    #[arg(long, env = "CAPSTAN_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Inbound ports left alone (the admin port, so kubelet probes reach it).
    #[arg(
        long,
        env = "CAPSTAN_EXCLUDE_INBOUND_PORTS",
        value_delimiter = ',',
        default_value = "15020"
    )]
    pub exclude_inbound_ports: Vec<u16>,
    /// Destinations never redirected (the API server's address, say).
    #[arg(long, env = "CAPSTAN_EXCLUDE_OUTBOUND_CIDRS", value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
    /// The iptables binary.
    #[arg(long, env = "CAPSTAN_IPTABLES", default_value = "iptables")]
    pub iptables: String,
}

const INBOUND_CHAIN: &str = "CAPSTAN_INBOUND";
const OUTBOUND_CHAIN: &str = "CAPSTAN_OUTBOUND";

/// The rules, as iptables argument lists (after the `-t nat` every one starts with).
pub fn rules(args: &InitArgs) -> anyhow::Result<Vec<Vec<String>>> {
    if args.inbound_port == args.outbound_port {
        bail!("the inbound and outbound ports must differ");
    }
    for cidr in &args.exclude_outbound_cidrs {
        let (ip, prefix) = cidr.split_once('/').unwrap_or((cidr.as_str(), "32"));
        ip.parse::<std::net::Ipv4Addr>()
            .with_context(|| format!("--exclude-outbound-cidrs: {cidr:?} is not an IPv4 CIDR"))?;
        let prefix: u8 = prefix
            .parse()
            .with_context(|| format!("--exclude-outbound-cidrs: bad prefix in {cidr:?}"))?;
        if prefix > 32 {
            bail!("--exclude-outbound-cidrs: bad prefix in {cidr:?}");
        }
    }
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
    out.push(s(&[
        "-A",
        OUTBOUND_CHAIN,
        "-m",
        "owner",
        "--uid-owner",
        &args.proxy_uid.to_string(),
        "-j",
        "RETURN",
    ]));
    out.push(s(&["-A", OUTBOUND_CHAIN, "-o", "lo", "-j", "RETURN"]));
    out.push(s(&["-A", OUTBOUND_CHAIN, "-d", "127.0.0.0/8", "-j", "RETURN"]));
    for cidr in &args.exclude_outbound_cidrs {
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

pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let rules = rules(args)?;
    let iptables = |a: &[&str]| -> anyhow::Result<bool> {
        let out = Command::new(&args.iptables)
            .args(["-w", "-t", "nat"])
            .args(a)
            .output()
            .with_context(|| format!("running {}", args.iptables))?;
        Ok(out.status.success())
    };
    for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
        // Exists already on a re-run: then it is flushed and rebuilt.
        let _ = iptables(&["-N", chain])?;
        if !iptables(&["-F", chain])? {
            bail!("iptables could not create or flush chain {chain} (NET_ADMIN missing?)");
        }
    }
    for rule in &rules {
        let refs: Vec<&str> = rule.iter().map(String::as_str).collect();
        if !iptables(&refs)? {
            bail!("iptables refused: {}", rule.join(" "));
        }
    }
    for (hook, chain) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)] {
        let jump = ["-p", "tcp", "-j", chain];
        let check: Vec<&str> = ["-C", hook].iter().chain(jump.iter()).copied().collect();
        if !iptables(&check)? {
            let add: Vec<&str> = ["-A", hook].iter().chain(jump.iter()).copied().collect();
            if !iptables(&add)? {
                bail!("iptables refused the jump from {hook} to {chain}");
            }
        }
    }
    tracing::info!(
        inbound = args.inbound_port,
        outbound = args.outbound_port,
        proxy_uid = args.proxy_uid,
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
        let rules = rules(&parse(&[])).unwrap();
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
            .position(|t| t.contains("--uid-owner 1337 -j RETURN"))
            .unwrap();
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
        assert!(rules(&parse(&["--exclude-outbound-cidrs", "10.0.0.0/33"])).is_err());
        assert!(rules(&parse(&["--exclude-outbound-cidrs", "nope"])).is_err());
        assert!(rules(&parse(&["--inbound-port", "1", "--outbound-port", "1"])).is_err());
        assert!(rules(&parse(&["--exclude-outbound-cidrs", "10.96.0.1/32,10.0.0.0/8"])).is_ok());
    }
}
