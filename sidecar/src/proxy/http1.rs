//! hyper's HTTP/1 client connections as the proxy keeps them to the application (the mesh
//! CA is reached through capstan-engine-client's pool): opened with their driver running in a task of its own, and sent on as
//! hyper-util's pool does: a connection kept from an earlier request may have been closed
//! by the other side meanwhile, so a request that was never written goes once more on a
//! new connection. A request that failed after it was written is not repeated.

use hyper::{
    Request, Response,
    body::{Body, Incoming},
    client::conn::http1::SendRequest,
};
use hyper_util::rt::TokioIo;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite};

/// An HTTP/1 client connection over `io`, its driver spawned; `peer` names the other side
/// in the log line of a connection that ends with an error.
pub async fn handshake<T, B>(io: T, peer: &'static str) -> hyper::Result<SendRequest<B>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, peer, "A connection ended with an error");
        }
    });
    Ok(sender)
}

/// Sends `request` on `sender` (`fresh`: dialled for this request, so not worth a
/// second try), with one new connection from `dial` if a kept one turned out closed.
/// Returns the connection used, for the next request, and the response.
pub async fn send_retrying_once<B, F, Fut>(
    mut sender: SendRequest<B>,
    mut fresh: bool,
    mut request: Request<B>,
    mut dial: F,
) -> anyhow::Result<(SendRequest<B>, Response<Incoming>)>
where
    B: Body + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<SendRequest<B>>>,
{
    loop {
        let sent = match sender.ready().await {
            Ok(()) => sender.try_send_request(request).await,
            Err(error) if !fresh => {
                tracing::debug!(%error, "A kept-alive connection had closed; dialling again");
                fresh = true;
                sender = dial().await?;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        match sent {
            Ok(response) => return Ok((sender, response)),
            Err(mut error) => match error.take_message() {
                Some(unsent) if !fresh => {
                    fresh = true;
                    request = unsent;
                    sender = dial().await?;
                }
                _ => return Err(error.into_error().into()),
            },
        }
    }
}
