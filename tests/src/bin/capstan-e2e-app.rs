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
        _ => bail!(
            "usage: serve-http ADDR | serve-tcp-echo ADDR | request METHOD URL [COUNT [INTERVAL_MS]] [-H name:value]... | tcp-hold ADDR SECONDS"
        ),
    }
}

/// Answers every request with 200 and what it saw, so tests can check the path the
/// application received and the identity the sidecar vouched for.
async fn serve_http(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("{{\"listening\":\"{listen}\"}}");
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                let source = request
                    .headers()
                    .get("x-capstan-source")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let line = format!("{} {} from {}\n", request.method(), request.uri(), source);
                // Drain the body so keep-alive works.
                let _ = request.into_body().collect().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(line))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

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
