//! The inbound side's HTTP/1.1 connections to the application, shared by every inbound
//! connection: a request takes the connection idled last (or dials one), and gets it
//! back into the idle stack when the response's body has ended. So the connections to
//! the application follow the requests in flight, not the inbound connections: each held
//! about 34 KiB of hyper's buffers and dispatch channel (measured with heaptrack), which
//! 64 mostly idle keep-alive clients at 1,000 rps multiplied into 2 MiB. Connections idle
//! for longer than IDLE_TIMEOUT are closed.
//!
//! HTTP/2 clients' streams come here too, downgraded to HTTP/1.1 (each stream takes a
//! connection of its own). Unlike hyper-util's pool (still used for CONNECT), this is a stack
//! of ready senders behind one short lock: no per-request key, checkout or waiter.

use bytes::Bytes;
use hyper::{
    Response,
    body::{Body as _, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
    header::HeaderValue,
    http::uri::Authority,
};
use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{net::TcpStream, time::Instant};

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// How long an unused connection to the application stays open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept at most; one returning to a full stack is closed.
const MAX_IDLE: usize = 256;

pub struct AppConnections {
    port: u16,
    /// `127.0.0.1:<port>` as a URI authority, and as the Host header a request without
    /// one is given (without the port when it is 80, as hyper-util's pool sends it).
    authority: Authority,
    host: HeaderValue,
    /// Idle senders, the most recently used last.
    idle: parking_lot::Mutex<Vec<(SendRequest<Body>, Instant)>>,
}

impl AppConnections {
    pub fn new(port: u16) -> Arc<Self> {
        let address = format!("127.0.0.1:{port}");
        let host = if port == 80 { "127.0.0.1" } else { &address };
        Arc::new(Self {
            port,
            authority: address
                .parse()
                .expect("an IPv4 address and a port are an authority"),
            host: HeaderValue::from_str(host).expect("an address is a valid header value"),
            idle: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// Sends an HTTP/1 request to the application on an idle connection, or a new one
    /// (see `http1::send_retrying_once` for a kept connection found closed).
    pub async fn send(self: &Arc<Self>, request: hyper::Request<Body>) -> anyhow::Result<Response<Body>> {
        let (sender, fresh) = match self.take() {
            Some(sender) => (sender, false),
            None => (self.dial().await?, true),
        };
        let (sender, response) =
            super::http1::send_retrying_once(sender, fresh, request, || self.dial()).await?;
        let pool = self.clone();
        Ok(response.map(|body| {
            http_body_util::BodyExt::boxed(Returning {
                body,
                sender: Some(sender),
                pool,
            })
        }))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    fn take(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock();
        while let Some((sender, _)) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE && !sender.is_closed() {
            idle.push((sender, Instant::now()));
        }
    }

    /// Closes the connections idle for longer than IDLE_TIMEOUT (the oldest are first).
    pub fn reap(&self) {
        let mut idle = self.idle.lock();
        let expired = idle
            .iter()
            .take_while(|(sender, since)| since.elapsed() >= IDLE_TIMEOUT || sender.is_closed())
            .count();
        idle.drain(..expired);
    }

    /// Closes idle connections every half IDLE_TIMEOUT, for as long as `self` is shared.
    pub async fn reap_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(IDLE_TIMEOUT / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reap();
        }
    }

    /// A new TCP connection to the application (no delay: the proxy writes whole
    /// messages): what the pool dials, and what a plain-TCP tunnel is given.
    pub async fn connect(&self) -> std::io::Result<TcpStream> {
        let tcp = TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, self.port)).await?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn dial(&self) -> anyhow::Result<SendRequest<Body>> {
        let tcp = self.connect().await?;
        Ok(super::http1::handshake(tcp, "the application").await?)
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().len()
    }
}

/// A response body from the application that gives its connection back once it has
/// been read to the end. One dropped earlier (the client went away mid-body) takes the
/// connection with it: hyper closes a connection whose response was not read.
struct Returning {
    body: Incoming,
    sender: Option<SendRequest<Body>>,
    pool: Arc<AppConnections>,
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take()
            && self.body.is_end_stream()
        {
            self.pool.put(sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An HTTP/1 server on loopback that answers every request with its path, counting
    /// the connections it accepted; without keep-alive it closes each after one answer.
    async fn app(keep_alive: bool) -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(tcp),
                            hyper::service::service_fn(|request: hyper::Request<Incoming>| async move {
                                let path = request.uri().path().to_owned();
                                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                                    Bytes::from(path),
                                )))
                            }),
                        ),
                );
            }
        });
        (port, accepted)
    }

    fn get(path: &str) -> hyper::Request<Body> {
        hyper::Request::get(path)
            .header("host", "app")
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap()
    }

    async fn read(response: Response<Body>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Sends each path in turn, reading each answer (the path) before the next request.
    async fn send_one_after_another(pool: &Arc<AppConnections>, paths: &[&str]) {
        for path in paths {
            assert_eq!(read(pool.send(get(path)).await.unwrap()).await, *path);
        }
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection_and_it_returns_only_when_read() {
        let (port, accepted) = app(true).await;
        let pool = AppConnections::new(port);
        send_one_after_another(&pool, &["/a", "/b", "/c"]).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);

        // A response not yet read holds its connection: a second request dials.
        let held = pool.send(get("/held")).await.unwrap();
        assert_eq!(pool.idle(), 0);
        assert_eq!(read(pool.send(get("/d")).await.unwrap()).await, "/d");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(read(held).await, "/held");
        assert_eq!(pool.idle(), 2);

        // A response dropped unread does not give its connection back.
        drop(pool.send(get("/dropped")).await.unwrap());
        assert_eq!(pool.idle(), 1);
    }

    /// HTTP/2 streams arrive concurrently: each in-flight request gets a connection of
    /// its own, and all come back for reuse.
    #[tokio::test]
    async fn concurrent_requests_each_take_a_connection_and_all_return() {
        let (port, accepted) = app(true).await;
        let pool = AppConnections::new(port);
        let paths = ["/1", "/2", "/3", "/4"];
        let responses = futures::future::join_all(paths.iter().map(|p| pool.send(get(p)))).await;
        for (response, path) in responses.into_iter().zip(paths) {
            assert_eq!(read(response.unwrap()).await, path);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        assert_eq!(pool.idle(), 4);
    }

    #[tokio::test]
    async fn connections_the_application_closes_are_replaced_without_failing_a_request() {
        let (port, accepted) = app(false).await;
        let pool = AppConnections::new(port);
        send_one_after_another(&pool, &["/a", "/b", "/c"]).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_after_the_timeout() {
        let (port, _) = app(true).await;
        let pool = AppConnections::new(port);
        let first = pool.send(get("/a")).await.unwrap();
        let second = pool.send(get("/b")).await.unwrap();
        read(first).await;
        read(second).await;
        assert_eq!(pool.idle(), 2);
        tokio::time::advance(IDLE_TIMEOUT / 2).await;
        pool.reap();
        assert_eq!(pool.idle(), 2);
        tokio::time::advance(IDLE_TIMEOUT).await;
        pool.reap();
        assert_eq!(pool.idle(), 0);
    }
}
