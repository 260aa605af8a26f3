//! Simulated pods for the mesh's data-path tests: each "pod" is a Linux network
//! namespace on a bridge of its own, holding real processes (the application and the
//! real sidecar). Processes in a pod reach the host's loopback-only services (the API
//! server, the mesh CA) through TCP forwarders the test runs on the bridge address; a
//! forwarder can also record what crossed it, which is how a test shows the bytes on
//! the wire were TLS.

use anyhow::{Context as _, Result, bail};
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Mutex,
    task::JoinHandle,
};

fn ip(args: &[&str]) -> Result<()> {
    crate::run("ip", args).map(|_| ())
}

/// A bridge and the pods on it; everything is removed on drop.
pub struct Network {
    tag: String,
    bridge: String,
    subnet: u8,
    next_host: u8,
    pods: Vec<String>,
    /// Pods started from now on get an IPv6 address too (dual stack).
    ipv6: bool,
}

impl Network {
    /// A new /24 (10.213.<n>.0) with the host side at .1.
    pub fn create() -> Result<Self> {
        let n: u8 = rand::random_range(1..=250);
        let tag = format!("{:04x}", rand::random::<u16>());
        let bridge = format!("cbr{tag}");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let network = Self {
            tag,
            bridge,
            subnet: n,
            next_host: 2,
            pods: Vec::new(),
            ipv6: false,
        };
        ip(&[
            "addr",
            "add",
            &format!("{}/24", network.gateway()),
            "dev",
            &network.bridge,
        ])?;
        ip(&["link", "set", &network.bridge, "up"])?;
        Ok(network)
    }

    /// The host's address on the bridge: where pods reach the test's forwarders.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 1)
    }

    /// The host's IPv6 address on the bridge, once [`Network::enable_ipv6`] ran.
    pub fn gateway6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x213, u16::from(self.subnet), 0, 0, 0, 0, 1)
    }

    /// Makes the network dual-stack: the bridge gets fd00:213:<n>::1/64, and every pod
    /// started after this an IPv6 address beside its IPv4 one.
    pub fn enable_ipv6(&mut self) -> Result<()> {
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.gateway6()),
            "dev",
            &self.bridge,
            "nodad",
        ])?;
        self.ipv6 = true;
        Ok(())
    }

    /// A new pod: a network namespace with `eth0` on the bridge and loopback up.
    pub fn pod(&mut self, name: &str) -> Result<Pod> {
        let index = self.next_host;
        self.next_host += 1;
        let netns = format!("capstan-{}-{name}", self.tag);
        let host_side = format!("cv{}{index}", self.tag);
        let address = Ipv4Addr::new(10, 213, self.subnet, index);
        ip(&["netns", "add", &netns])?;
        self.pods.push(netns.clone());
        ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        ip(&["link", "set", &host_side, "master", &self.bridge, "up"])?;
        for args in [
            vec!["addr", "add", &format!("{address}/24"), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
            vec!["route", "add", "default", "via", &self.gateway().to_string()],
        ] {
            let mut full = vec!["netns", "exec", &netns, "ip"];
            full.extend(args.iter().copied());
            ip(&full)?;
        }
        let address6 = if self.ipv6 {
            let address6 = Ipv6Addr::new(
                0xfd00,
                0x213,
                u16::from(self.subnet),
                0,
                0,
                0,
                0,
                u16::from(index),
            );
            for args in [
                vec![
                    "-6",
                    "addr",
                    "add",
                    &format!("{address6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
                vec![
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &self.gateway6().to_string(),
                ],
            ] {
                let mut full = vec!["netns", "exec", &netns, "ip"];
                full.extend(args.iter().copied());
                ip(&full)?;
            }
            Some(address6)
        } else {
            None
        };
        Ok(Pod {
            netns,
            address,
            address6,
            children: Vec::new(),
        })
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for netns in &self.pods {
            let _ = ip(&["netns", "delete", netns]);
        }
        let _ = ip(&["link", "delete", &self.bridge]);
    }
}

/// One simulated pod. Its processes are killed on drop.
pub struct Pod {
    pub netns: String,
    pub address: Ipv4Addr,
    /// On a dual-stack network ([`Network::enable_ipv6`]).
    pub address6: Option<Ipv6Addr>,
    children: Vec<(String, Child)>,
}

impl Pod {
    /// Starts `program` in the pod, as `uid` when given (and the group of the same
    /// number), with output to `log`.
    pub fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
        uid: Option<u32>,
    ) -> Result<PathBuf> {
        self.spawn_as(name, program, args, env, uid.map(|uid| (uid, uid)))
    }

    /// [`Pod::spawn`] as `(uid, gid)` when given (the proxy runs as its own UID and
    /// dedicated GID, as in a real pod).
    pub fn spawn_as(
        &mut self,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
        ids: Option<(u32, u32)>,
    ) -> Result<PathBuf> {
        let log = std::env::temp_dir().join(format!("{}-{name}.log", self.netns));
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns]);
        if let Some((uid, gid)) = ids {
            command.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
            ]);
        }
        command
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?.try_clone()?);
        // Own-line output of two handles to one file would interleave badly: share one.
        let file = std::fs::OpenOptions::new().append(true).open(&log)?;
        command.stdout(file.try_clone()?).stderr(file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} in {}", self.netns))?;
        self.children.push((name.to_owned(), child));
        Ok(log)
    }

    /// The pid of the process `name` (`ip netns exec` and `setpriv` exec, so it is the
    /// program's own).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children.iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }

    /// Sends SIGTERM to the process `name` and waits for it; returns its exit status.
    pub fn stop(&mut self, name: &str) -> Result<std::process::ExitStatus> {
        let index = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("no process {name}"))?;
        let (_, mut child) = self.children.remove(index);
        // `ip netns exec` execs the program, so the child pid is the program's.
        crate::run("kill", &["-TERM", &child.id().to_string()])?;
        Ok(child.wait()?)
    }

    /// `program` as a command run in the pod (add its arguments, then run or spawn it).
    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command.args(["netns", "exec", &self.netns]).arg(program);
        command
    }

    /// `program` as a command run in the pod as `uid` and `gid` (an application
    /// container whose image sets USER).
    pub fn command_as(&self, program: &Path, uid: u32, gid: u32) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.netns, "setpriv"])
            .args([format!("--reuid={uid}"), format!("--regid={gid}")])
            .arg("--clear-groups")
            .arg(program);
        command
    }

    /// Runs a command in the pod to completion (asynchronously: the test's forwarders
    /// keep running meanwhile) and returns its stdout.
    pub async fn exec(&self, program: &Path, args: &[&str]) -> Result<String> {
        let out = self.command(program).args(args).output().await?;
        if !out.status.success() {
            bail!(
                "{} {} in {} failed: {}",
                program.display(),
                args.join(" "),
                self.netns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP forwarder run by the test: `listen` → `to`. It can be cut (every connection
/// closed, new ones refused) and restored, and it can keep what crossed it.
pub struct Forwarder {
    pub listen: SocketAddr,
    task: JoinHandle<()>,
    open: Arc<AtomicBool>,
    recorded: Arc<Mutex<Vec<u8>>>,
}

impl Forwarder {
    pub async fn start(listen: SocketAddr, to: SocketAddr, record: bool) -> Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let listen = listener.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let open = open.clone();
            let recorded = recorded.clone();
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if !open.load(Ordering::SeqCst) {
                        continue;
                    }
                    let open = open.clone();
                    let recorded = record.then(|| recorded.clone());
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(to).await else {
                            return;
                        };
                        pipe(inbound, outbound, open, recorded).await;
                    });
                }
            }
        });
        Ok(Self {
            listen,
            task,
            open,
            recorded,
        })
    }

    /// Closes every connection and refuses new ones until [`Forwarder::restore`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Everything that crossed, in both directions, in arrival order.
    pub async fn recorded(&self) -> Vec<u8> {
        self.recorded.lock().await.clone()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut a: TcpStream,
    mut b: TcpStream,
    open: Arc<AtomicBool>,
    recorded: Option<Arc<Mutex<Vec<u8>>>>,
) {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let mut abuf = vec![0u8; 16 * 1024];
    let mut bbuf = vec![0u8; 16 * 1024];
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            n = ar.read(&mut abuf) => {
                let Ok(n @ 1..) = n else { return };
                if let Some(r) = &recorded { r.lock().await.extend_from_slice(&abuf[..n]); }
                if bw.write_all(&abuf[..n]).await.is_err() { return }
            }
            n = br.read(&mut bbuf) => {
                let Ok(n @ 1..) = n else { return };
                if let Some(r) = &recorded { r.lock().await.extend_from_slice(&bbuf[..n]); }
                if aw.write_all(&bbuf[..n]).await.is_err() { return }
            }
            _ = tick.tick() => {
                if !open.load(Ordering::SeqCst) { return }
            }
        }
    }
}
