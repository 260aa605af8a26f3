//! The checks the sidecar's fuzz target (sidecar/fuzz) runs, shared with the stable test
//! that replays its seed corpus (sidecar/tests/fuzz_seeds.rs).

use capstan_sidecar::mux;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long (in the runtime's paused time) a connection may outlive its peer's end.
const END_WITHIN: Duration = Duration::from_secs(60);

/// The mux frame reader against arbitrary bytes from its peer. The first byte picks the
/// side: even, the accepting side (a server sidecar) with an echoing application;
/// odd, the opening side (a client sidecar) with three streams open and echoing. The
/// rest is what the peer sends. Whatever it is, nothing panics, and once the peer has
/// finished sending (and reads all it is sent) the connection ends: no input leaves a
/// task spinning or waiting for ever. Time is paused, so a wait that nothing can end
/// jumps straight to its timeout.
pub fn check_mux(data: &[u8]) {
    let Some((&side, input)) = data.split_first() else {
        return;
    };
    let input = input.to_vec();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let (peer, ours) = tokio::io::duplex(64 * 1024);
        let (mut peer_read, mut peer_write) = tokio::io::split(peer);
        tokio::spawn(async move {
            let mut sink = [0u8; 16 * 1024];
            while matches!(peer_read.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let send = async move {
            let _ = peer_write.write_all(&input).await;
            let _ = peer_write.shutdown().await;
        };
        let ended = if side % 2 == 0 {
            let server = tokio::spawn(mux::serve(ours, echo));
            send.await;
            tokio::time::timeout(END_WITHIN, server).await.is_ok()
        } else {
            let client = mux::Client::start(ours, ());
            for stream in (0..3).filter_map(|_| client.open()) {
                tokio::spawn(echo(stream));
            }
            send.await;
            tokio::time::timeout(END_WITHIN, async {
                while !client.is_closed() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .is_ok()
        };
        assert!(ended, "the connection outlived its peer's end");
    });
}

/// An application that sends back what it reads, then closes.
async fn echo(mut stream: mux::Stream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = stream.shutdown().await;
}
