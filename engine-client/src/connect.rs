//! The connector hyper-util's pooled client dials with: TCP (no Nagle), then TLS 1.3
//! with the roots current at that moment, within the connect timeout. The pool keeps
//! the connection alive for the next request; a request that was never written on a kept
//! connection the engine had closed meanwhile goes once more on a new one (hyper-util's
//! `retry_canceled_requests`), so a poll every 250 ms costs one request, not a handshake.

use crate::Roots;
use hyper::Uri;
use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use rustls::pki_types::ServerName;
use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

#[derive(Clone)]
pub(crate) struct Connector {
    pub roots: Roots,
    pub timeout: Duration,
}

/// Why a connection could not be made (as hyper-util's connect error's source).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ConnectError(pub String);

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TlsIo>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (roots, timeout) = (self.roots.clone(), self.timeout);
        Box::pin(async move {
            tokio::time::timeout(timeout, connect(roots, uri))
                .await
                .map_err(|_| ConnectError(format!("no connection within {timeout:?}")))?
        })
    }
}

async fn connect(roots: Roots, uri: Uri) -> Result<TokioIo<TlsIo>, ConnectError> {
    let config = roots.config().map_err(|e| ConnectError(e.to_string()))?;
    let host = uri
        .host()
        .ok_or_else(|| ConnectError("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| ConnectError(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(host).map_err(|e| ConnectError(e.to_string()))?;
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| ConnectError(format!("TLS: {e}")))?;
    Ok(TokioIo::new(TlsIo(tls)))
}

/// A TLS stream as hyper-util's pool wants it (it asks every connection for its
/// [`Connected`] metadata; the trait and the stream type are both foreign).
pub(crate) struct TlsIo(TlsStream<TcpStream>);

impl Connection for TlsIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
