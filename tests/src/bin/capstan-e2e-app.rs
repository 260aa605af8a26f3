//! The "application" of the end-to-end mesh tests, run inside a test pod's network
//! namespace: a small real HTTP server, a TCP echo server, and the clients that talk to
//! them through the sidecars. Output is one JSON line per result, for the tests to read.
#![forbid(unsafe_code)]

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["serve-http", listen] => serve_http(listen.parse()?).await,
        ["serve-tcp-echo", listen] => serve_echo(listen.parse()?).await,
        ["request", method, url, rest @ ..] => request_many(method, url, rest).await,
        ["tcp-hold", addr, seconds] => tcp_hold(addr.parse()?, seconds.parse()?).await,
        ["load", url, connections, rate, seconds] => {
            load::run(url, connections.parse()?, rate.parse()?, seconds.parse()?).await
        }
        ["bulk", url] => load::bulk(url).await,
        _ => bail!(
            "usage: serve-http ADDR | serve-tcp-echo ADDR | request METHOD URL [COUNT [INTERVAL_MS]] [-H name:value]... | tcp-hold ADDR SECONDS | load URL CONNECTIONS RATE(0=open loop) SECONDS | bulk URL"
        ),
    }
}

/// Answers every request with 200 and what it saw, so tests can check the path the
/// application received and the identity the sidecar vouched for, and prints it as a
/// JSON line (the benchmark's /kib and /bulk excepted).
async fn serve_http(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("{{\"listening\":\"{listen}\"}}");
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                // The benchmark's workloads: 1 KiB answers, and bulk bodies of ?bytes=N.
                if request.uri().path() == "/kib" {
                    return Ok::<_, Infallible>(Response::new(load::Body::Kib(Some(KIB.clone()))));
                }
                if request.uri().path() == "/bulk" {
                    let bytes = request
                        .uri()
                        .query()
                        .and_then(|q| q.strip_prefix("bytes="))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0u64);
                    return Ok(Response::new(load::Body::Bulk(bytes)));
                }
                let source = request
                    .headers()
                    .get("x-capstan-source")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let line = format!("{} {} from {}\n", request.method(), request.uri(), source);
                // Logged too (the pod's app log), so a test can tell what reached the
                // application at all, answered or not (M20).
                println!("{{\"received\":{:?}}}", line.trim_end());
                // Drain the body so keep-alive works.
                let _ = request.into_body().collect().await;
                Ok(Response::new(load::Body::Kib(Some(Bytes::from(line)))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

static KIB: std::sync::LazyLock<Bytes> = std::sync::LazyLock::new(|| Bytes::from(vec![b'x'; 1024]));

async fn serve_echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("{{\"listening\":\"{listen}\"}}");
    loop {
        let (mut tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// COUNT requests (default 1), INTERVAL_MS apart, each on a new connection (so every
/// one makes its own TLS handshakes through the sidecars). One JSON line per request.
async fn request_many(method: &str, url: &str, rest: &[&str]) -> anyhow::Result<()> {
    let mut numbers = Vec::new();
    let mut headers = Vec::new();
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        if *arg == "-H" {
            let h = it.next().context("-H needs name:value")?;
            let (n, v) = h.split_once(':').context("-H needs name:value")?;
            headers.push((n.trim().to_owned(), v.trim().to_owned()));
        } else {
            numbers.push(arg.parse::<u64>().context("COUNT and INTERVAL_MS are numbers")?);
        }
    }
    let count = numbers.first().copied().unwrap_or(1);
    let interval = Duration::from_millis(numbers.get(1).copied().unwrap_or(0));
    let uri: hyper::Uri = url.parse()?;
    let addr = format!("{}:{}", uri.host().context("host")?, uri.port_u16().unwrap_or(80));
    let target = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    for _ in 0..count {
        let started = Instant::now();
        let result = one_request(&addr, method, &target, &headers).await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let line = match result {
            Ok((status, decided_by, body)) => serde_json::json!({
                "status": status, "decided_by": decided_by, "body": body, "ms": ms
            }),
            Err(error) => serde_json::json!({ "error": format!("{error:#}"), "ms": ms }),
        };
        println!("{line}");
        tokio::time::sleep(interval).await;
    }
    Ok(())
}

async fn one_request(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(String, String)],
) -> anyhow::Result<(u16, Option<String>, String)> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(target)
        .header("host", "app.test");
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        sender.send_request(request.body(Full::new(Bytes::new()))?),
    )
    .await
    .context("no response within 5s")??;
    let status = response.status().as_u16();
    let decided_by = response
        .headers()
        .get("x-capstan-decided-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, decided_by, String::from_utf8_lossy(&body).into_owned()))
}

/// Holds one TCP connection open, echoing a line every 100 ms, and reports how long it
/// stayed usable: `{"open_for_ms": ..., "closed": true|false}`.
async fn tcp_hold(addr: SocketAddr, seconds: u64) -> anyhow::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut buf = [0u8; 5];
    let mut closed = false;
    let mut first = true;
    while Instant::now() < deadline {
        let ok = async {
            tcp.write_all(b"ping\n").await?;
            tokio::time::timeout(Duration::from_secs(2), tcp.read_exact(&mut buf)).await??;
            anyhow::Ok(())
        }
        .await;
        if ok.is_err() {
            closed = true;
            break;
        }
        if first {
            println!("{{\"established\":true}}");
            first = false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{}",
        serde_json::json!({ "open_for_ms": started.elapsed().as_millis() as u64, "closed": closed })
    );
    Ok(())
}

/// The benchmark's load generator and bodies.
mod load {
    use super::*;
    use hyper::body::{Frame, SizeHint};
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    /// A response body: a small one, or `n` bytes of bulk sent in 64 KiB frames.
    pub enum Body {
        Kib(Option<Bytes>),
        Bulk(u64),
    }

    static CHUNK: std::sync::LazyLock<Bytes> =
        std::sync::LazyLock::new(|| Bytes::from(vec![b'b'; 64 * 1024]));

    impl hyper::body::Body for Body {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            let this = self.get_mut();
            Poll::Ready(match this {
                Body::Kib(bytes) => bytes.take().map(|b| Ok(Frame::data(b))),
                Body::Bulk(0) => None,
                Body::Bulk(left) => {
                    let n = (*left).min(CHUNK.len() as u64);
                    *left -= n;
                    Some(Ok(Frame::data(CHUNK.slice(..n as usize))))
                }
            })
        }

        fn size_hint(&self) -> SizeHint {
            match self {
                Body::Kib(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
                Body::Bulk(n) => SizeHint::with_exact(*n),
            }
        }
    }

    /// CONNECTIONS keep-alive connections for SECONDS. RATE 0: each sends its next request
    /// as soon as the last is answered (open loop: the most the path can carry). RATE > 0:
    /// request i is due at start + i/RATE and its latency counts from then, so a stall is
    /// not hidden by the requests it delayed (no coordinated omission).
    pub async fn run(url: &str, connections: usize, rate: f64, seconds: f64) -> anyhow::Result<()> {
        let uri: hyper::Uri = url.parse()?;
        let addr = format!("{}:{}", uri.host().context("host")?, uri.port_u16().unwrap_or(80));
        let target = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let start = Instant::now() + Duration::from_millis(100);
        let end = start + Duration::from_secs_f64(seconds);
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (addr, target, next) = (addr.clone(), target.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let tcp = TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                tokio::time::sleep_until(start.into()).await;
                loop {
                    let due = if rate > 0.0 {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let due = start + Duration::from_secs_f64(i as f64 / rate);
                        if due >= end {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        due
                    } else {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        now
                    };
                    let request = Request::get(target.as_str())
                        .header("host", "app.test")
                        .body(Full::new(Bytes::new()))?;
                    match sender.send_request(request).await {
                        Ok(response) if response.status().is_success() => {
                            let _ = response.into_body().collect().await?;
                            latencies.push(due.elapsed().as_micros() as u64);
                        }
                        _ => {
                            errors += 1;
                            break;
                        }
                    }
                }
                anyhow::Ok((latencies, errors))
            }));
        }
        let mut all = Vec::new();
        let mut errors = 0;
        for task in tasks {
            match task.await? {
                Ok((l, e)) => {
                    all.extend(l);
                    errors += e;
                }
                Err(_) => errors += 1,
            }
        }
        let elapsed = (Instant::now().min(end + Duration::from_secs(5)) - start)
            .as_secs_f64()
            .max(seconds);
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        println!(
            "{}",
            serde_json::json!({
                "requests": all.len(), "errors": errors, "seconds": elapsed,
                "rps": all.len() as f64 / elapsed,
                "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99), "max_us": all.last().copied().unwrap_or(0),
            })
        );
        Ok(())
    }

    /// One GET of a bulk body; reports bytes per second.
    pub async fn bulk(url: &str) -> anyhow::Result<()> {
        let uri: hyper::Uri = url.parse()?;
        let addr = format!("{}:{}", uri.host().context("host")?, uri.port_u16().unwrap_or(80));
        let tcp = TcpStream::connect(&addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let started = Instant::now();
        let target = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let response = sender
            .send_request(
                Request::get(target)
                    .header("host", "app.test")
                    .body(Full::new(Bytes::new()))?,
            )
            .await?;
        let mut body = response.into_body();
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                bytes += data.len() as u64;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({ "bytes": bytes, "seconds": seconds, "bytes_per_second": bytes as f64 / seconds })
        );
        Ok(())
    }
}
