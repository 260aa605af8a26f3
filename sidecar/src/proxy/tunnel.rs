//! The byte tunnel between two streams (outbound connections, plain-TCP inbound ones,
//! passthrough): tokio's `copy_bidirectional`, with buffers that start small and grow
//! only for a stream that fills them.
//!
//! Measured with the mesh benchmark: fixed 32 KiB buffers cost 4 MiB of RSS for its 64
//! request/response connections, whose reads never fill 4 KiB; bulk transfers want large
//! buffers (8 KiB gave 0.58 GB/s, 32 KiB 0.83, 64 KiB 0.90). A direction starts with
//! 4 KiB and doubles, up to 64 KiB, each time a read fills its buffer.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const FIRST_BUFFER: usize = 4 * 1024;
const MAX_BUFFER: usize = 64 * 1024;

/// Copies both ways until both sides have closed (an EOF on one side shuts down the
/// other's write half, as `copy_bidirectional` does); the first error ends both.
pub async fn tunnel<A: Side, B: Side>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)> {
    let mut a_to_b = Direction::Running(Buffer::new());
    let mut b_to_a = Direction::Running(Buffer::new());
    poll_fn(|cx| {
        let a_to_b = a_to_b.poll(cx, a, b)?;
        let b_to_a = b_to_a.poll(cx, b, a)?;
        let (Poll::Ready(sent), Poll::Ready(received)) = (a_to_b, b_to_a) else {
            return Poll::Pending;
        };
        Poll::Ready(Ok((sent, received)))
    })
    .await
}

/// A side of a tunnel, and how what it receives reaches the other side: through the
/// direction's buffer, or (a mux stream, which holds its payloads already) written
/// out from where it is.
pub trait Side: AsyncRead + AsyncWrite + Unpin {
    /// Copies what this side receives into `out` until its end, as `Buffer::poll_copy`.
    fn poll_copy_into<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        buffer: &mut Buffer,
        out: &mut W,
    ) -> Poll<io::Result<u64>> {
        buffer.poll_copy(cx, Pin::new(self), Pin::new(out))
    }
}

impl Side for tokio::net::TcpStream {}
impl<S: AsyncRead + AsyncWrite + Unpin> Side for tokio_rustls::client::TlsStream<S> {}
impl<S: AsyncRead + AsyncWrite + Unpin> Side for tokio_rustls::server::TlsStream<S> {}
#[cfg(test)]
impl Side for tokio::io::DuplexStream {}

impl Side for super::mux::Stream {
    /// The received payloads go out as they came, without a copy into the buffer, which
    /// stays unallocated.
    fn poll_copy_into<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        buffer: &mut Buffer,
        out: &mut W,
    ) -> Poll<io::Result<u64>> {
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        loop {
            let written = match self.poll_write_into(cx, Pin::new(&mut *out)) {
                Poll::Pending => {
                    // Nothing more to write: flush what was written (TLS may hold it).
                    if buffer.need_flush {
                        ready!(Pin::new(&mut *out).poll_flush(cx))?;
                        buffer.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(result) => {
                    coop.made_progress();
                    result?
                }
            };
            match written {
                Some(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Some(n) => {
                    buffer.copied += n as u64;
                    buffer.need_flush = true;
                }
                None => {
                    ready!(Pin::new(&mut *out).poll_flush(cx))?;
                    return Poll::Ready(Ok(buffer.copied));
                }
            }
        }
    }
}

enum Direction {
    Running(Buffer),
    ShuttingDown(u64),
    Done(u64),
}

impl Direction {
    fn poll<R: Side, W: Side>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<u64>> {
        loop {
            match self {
                Self::Running(buffer) => {
                    let copied = ready!(r.poll_copy_into(cx, buffer, w))?;
                    *self = Self::ShuttingDown(copied);
                }
                Self::ShuttingDown(copied) => {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    *self = Self::Done(*copied);
                }
                Self::Done(copied) => return Poll::Ready(Ok(*copied)),
            }
        }
    }
}

/// One direction's buffer: tokio's `CopyBuffer` logic, plus growth. It is allocated on
/// the first read.
pub struct Buffer {
    buf: Vec<u8>,
    /// Written out up to here.
    pos: usize,
    /// Read in up to here.
    cap: usize,
    read_done: bool,
    need_flush: bool,
    copied: u64,
}

impl Buffer {
    fn new() -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            copied: 0,
        }
    }

    fn poll_fill<R>(&mut self, cx: &mut Context<'_>, mut reader: Pin<&mut R>) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
    {
        if self.buf.is_empty() {
            self.buf = vec![0; FIRST_BUFFER];
        }
        let mut buf = ReadBuf::new(&mut self.buf);
        buf.set_filled(self.cap);
        let result = loop {
            match reader.as_mut().poll_read(cx, &mut buf) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                result => break result,
            }
        };
        if let Poll::Ready(Ok(())) = result {
            let filled = buf.filled().len();
            self.read_done = self.cap == filled;
            self.cap = filled;
            // A full buffer: this stream moves bulk, give it more room.
            if filled == self.buf.len() && self.buf.len() < MAX_BUFFER {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        result
    }

    fn poll_write<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<usize>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match writer.as_mut().poll_write(cx, &self.buf[self.pos..self.cap]) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Poll::Pending => {
                    // Top the buffer up while the writer is busy: larger writes.
                    if !self.read_done && self.cap < self.buf.len() {
                        ready!(self.poll_fill(cx, reader.as_mut()))?;
                    }
                    return Poll::Pending;
                }
                result => return result,
            }
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        // The task budget: a stream that is always ready must not starve the others on
        // the single-threaded runtime.
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        loop {
            // Room left (or none allocated yet): read more first, for larger writes.
            if (self.buf.is_empty() || self.cap < self.buf.len()) && !self.read_done {
                match self.poll_fill(cx, reader.as_mut()) {
                    Poll::Ready(Ok(())) => coop.made_progress(),
                    Poll::Ready(Err(error)) => {
                        coop.made_progress();
                        return Poll::Ready(Err(error));
                    }
                    Poll::Pending => {
                        // Nothing to write either: flush what was written (a writer
                        // that buffers, like TLS, may hold it), then wait.
                        if self.pos == self.cap {
                            if self.need_flush {
                                ready!(writer.as_mut().poll_flush(cx))?;
                                coop.made_progress();
                                self.need_flush = false;
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(self.poll_write(cx, reader.as_mut(), writer.as_mut()))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write zero bytes into writer",
                    )));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            // All written: the buffer is empty again.
            self.pos = 0;
            self.cap = 0;
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

/// A stream read through a 64 KiB buffer while it moves bulk, and directly otherwise.
/// rustls asks its transport for at most 4 KiB at a time: a peer sending bulk costs a
/// `read` per 4 KiB without this, and a buffer per connection with a plain `BufReader`.
/// A read that fills the whole request turns the buffer on; a buffered read shorter than
/// a direct one turns it off (and frees it) once it is drained.
pub struct ReadAhead<S> {
    inner: S,
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    /// The last buffered read was short: free the buffer once it is drained.
    winding_down: bool,
}

const READ_AHEAD: usize = 64 * 1024;
/// What rustls asks for at a time.
const DIRECT_READ: usize = 4096;

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
            filled: 0,
            winding_down: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.pos == this.filled && this.winding_down {
            this.buf = Vec::new();
            this.winding_down = false;
        }
        if this.pos == this.filled && this.buf.is_empty() {
            let wanted = out.remaining();
            let before = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            if out.filled().len() - before == wanted {
                this.buf = vec![0; READ_AHEAD];
                (this.pos, this.filled) = (0, 0);
            }
            return Poll::Ready(Ok(()));
        }
        if this.pos == this.filled {
            let mut read = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let got = read.filled().len();
            (this.pos, this.filled) = (0, got);
            // Less than a direct read would have asked for: the bulk is over. (Not
            // earlier: a reader that keeps up sees reads of a record or two mid-bulk,
            // and dropping the buffer then would only allocate it again.)
            this.winding_down = got < DIRECT_READ;
        }
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

    /// Bulk one way, a small message the other, each side closing: every byte arrives
    /// in order, each EOF is passed on, and the counts are the bytes copied.
    #[tokio::test]
    async fn copies_both_ways_and_passes_on_each_close() {
        let (mut client, mut a) = duplex(16 * 1024);
        let (mut b, mut server) = duplex(16 * 1024);
        let proxy = tokio::spawn(async move { tunnel(&mut a, &mut b).await });
        let bulk: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = bulk.clone();
        let sender = tokio::spawn(async move {
            client.write_all(&bulk).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, expected);
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(sender.await.unwrap(), b"done");
        assert_eq!(proxy.await.unwrap().unwrap(), (1_000_000, 4));
    }

    /// A mux stream's payloads go to the other side as they came: every byte, in order,
    /// and never through the direction's buffer, which stays unallocated.
    #[tokio::test]
    async fn a_mux_stream_is_written_out_without_the_buffer() {
        let (a, b) = duplex(1 << 20);
        let bulk: Vec<u8> = (0..3_000_000u32).map(|i| (i % 249) as u8).collect();
        let sent = bulk.clone();
        tokio::spawn(crate::proxy::mux::serve(b, move |mut stream| {
            let bulk = sent.clone();
            async move {
                stream.write_all(&bulk).await.unwrap();
                stream.shutdown().await.unwrap();
            }
        }));
        let client = crate::proxy::mux::Client::start(a, ());
        let mut stream = client.open().unwrap();
        let (mut out, mut app) = duplex(256 * 1024);
        let reading = tokio::spawn(async move {
            let mut received = Vec::new();
            app.read_to_end(&mut received).await.unwrap();
            received
        });
        let mut buffer = Buffer::new();
        let copied = poll_fn(|cx| stream.poll_copy_into(cx, &mut buffer, &mut out))
            .await
            .unwrap();
        drop(out);
        assert_eq!(copied, bulk.len() as u64);
        assert!(buffer.buf.is_empty(), "the bytes went through the buffer");
        assert_eq!(reading.await.unwrap(), bulk);
    }

    #[tokio::test]
    async fn grows_only_for_a_stream_that_fills_its_buffer() {
        let mut small = Buffer::new();
        let mut sink = tokio::io::sink();
        let mut reader: &[u8] = &[7; 100];
        poll_fn(|cx| small.poll_copy(cx, Pin::new(&mut reader), Pin::new(&mut sink)))
            .await
            .unwrap();
        assert_eq!(small.buf.len(), FIRST_BUFFER);
        let mut bulk = Buffer::new();
        let data = vec![7; 1 << 20];
        let mut reader: &[u8] = &data;
        let copied = poll_fn(|cx| bulk.poll_copy(cx, Pin::new(&mut reader), Pin::new(&mut sink)))
            .await
            .unwrap();
        assert_eq!(copied, 1 << 20);
        assert_eq!(bulk.buf.len(), MAX_BUFFER);
    }

    /// Small reads pass straight through; a read that fills the request turns the
    /// buffer on, and it is freed again when the stream slows down; no byte is lost or
    /// reordered on the way.
    #[tokio::test]
    async fn reads_ahead_only_while_bulk_flows() {
        let (mut writer, reader) = duplex(256 * 1024);
        let mut stream = ReadAhead::new(reader);
        writer.write_all(b"small").await.unwrap();
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"small");
        assert!(stream.buf.is_empty());
        let bulk: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        writer.write_all(&bulk).await.unwrap();
        let mut received = Vec::new();
        while received.len() < bulk.len() {
            let n = stream.read(&mut buf).await.unwrap();
            received.extend_from_slice(&buf[..n]);
            if received.len() == 4096 {
                assert_eq!(stream.buf.len(), READ_AHEAD, "a full read turns the buffer on");
            }
        }
        assert_eq!(received, bulk);
        writer.write_all(b"tail").await.unwrap();
        let n = stream.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"tail");
        writer.write_all(b"again").await.unwrap();
        let n = stream.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"again");
        assert!(stream.buf.is_empty(), "freed once the stream slowed down");
    }
}
