//! What a connection must do before it holds anything: say something within [`HEADER_READ_TIMEOUT`]
//! (a connection that sends nothing is closed, so idle sockets cannot pile up), and fit under the
//! server's cap on open connections (past it a new connection is answered 503 and closed at once, so
//! the process never runs out of descriptors for its own files or its database). Once open, a
//! connection on which nothing moves either way for [`IDLE_TIMEOUT`] is closed, whatever its protocol
//! (an HTTP/2 connection with no stream open would otherwise stay forever; an event stream is never
//! idle, its keep-alive comments move every 15 s).
//!
//! [`HEADER_READ_TIMEOUT`]: crate::HEADER_READ_TIMEOUT

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;

/// How long an open connection may stay with nothing read or written before it is closed, by default
/// ([`crate::Config::idle_timeout`]).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The most connections past the cap answered 503 at once (each is held up to a second to deliver its
/// answer); past that they are closed without one, so a flood of them holds few descriptors.
const MAX_ANSWERING: usize = 64;

/// The open connections, shared by every acceptor of one server.
#[derive(Clone, Debug, Default)]
pub struct Connections {
    open: Arc<AtomicUsize>,
    /// Connections past the cap being answered 503 now.
    answering: Arc<AtomicUsize>,
}

impl Connections {
    /// How many connections are open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// A connection counted in [`Connections`] for as long as it lives, and closed after [`IDLE_TIMEOUT`]
/// with nothing read or written.
pub struct Counted<S> {
    inner: S,
    open: Arc<AtomicUsize>,
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_for: std::time::Duration,
}

impl<S> Counted<S> {
    /// Something moved: the idle deadline starts again.
    fn moved(&mut self) {
        let at = tokio::time::Instant::now() + self.idle_for;
        self.idle.as_mut().reset(at);
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(r)
            }
            // Waiting for the peer: past the idle deadline the connection ends (the timer wakes
            // this task then).
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection was idle too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        written
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        written
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The answer to a connection past the cap, on plain HTTP (on HTTPS it is closed without one): the
/// problem details every 503 `unavailable` carries.
fn busy() -> &'static [u8] {
    static BUSY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BUSY.get_or_init(|| {
        let problem = cmr_wire::problem::ProblemJson::new(
            cmr_core::problem::Code::Unavailable.as_str(),
            503,
            "too many open connections; retry later",
        );
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut out = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    })
}

/// An acceptor that applies the rules above, then hands the connection to `inner` (plain, or TLS).
#[derive(Clone, Debug)]
pub struct Guarded<A> {
    inner: A,
    connections: Connections,
    max: usize,
    plain: bool,
    idle: std::time::Duration,
}

impl<A> Guarded<A> {
    /// At most `max` open connections; `plain` if the server speaks plain HTTP on them (the 503 is
    /// then written before closing).
    pub fn new(inner: A, connections: Connections, max: usize, plain: bool) -> Self {
        Self {
            inner,
            connections,
            max: max.max(1),
            plain,
            idle: IDLE_TIMEOUT,
        }
    }

    /// Closes a connection idle for `idle` (nothing read or written) instead of [`IDLE_TIMEOUT`].
    pub fn idle_after(mut self, idle: std::time::Duration) -> Self {
        self.idle = idle;
        self
    }
}

impl<A, S> Accept<TcpStream, S> for Guarded<A>
where
    A: Accept<Counted<TcpStream>, S> + Clone + Send + Sync + 'static,
    A::Future: Send,
    S: Send + 'static,
{
    type Stream = A::Stream;
    type Service = A::Service;
    type Future =
        Pin<Box<dyn std::future::Future<Output = io::Result<(A::Stream, A::Service)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let open = this.connections.open.fetch_add(1, Ordering::SeqCst) + 1;
            let mut stream = Counted {
                inner: stream,
                open: this.connections.open.clone(),
                idle: Box::pin(tokio::time::sleep(this.idle)),
                idle_for: this.idle,
            };
            if open > this.max {
                let answering = &this.connections.answering;
                let answer = answering.fetch_add(1, Ordering::SeqCst) < MAX_ANSWERING;
                if this.plain && answer {
                    // Answer, end the sending side, and read what the client sent (a close with
                    // unread bytes would reset the connection and lose the answer): one second.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                        stream.inner.write_all(busy()).await?;
                        stream.inner.shutdown().await?;
                        let mut sink = [0u8; 4096];
                        let mut left: usize = 64 * 1024;
                        while left > 0 {
                            let n =
                                tokio::io::AsyncReadExt::read(&mut stream.inner, &mut sink).await?;
                            if n == 0 {
                                break;
                            }
                            left = left.saturating_sub(n);
                        }
                        io::Result::Ok(())
                    })
                    .await;
                }
                answering.fetch_sub(1, Ordering::SeqCst);
                return Err(io::Error::other("too many open connections"));
            }
            let mut first = [0u8; 1];
            match tokio::time::timeout(crate::HEADER_READ_TIMEOUT, stream.inner.peek(&mut first))
                .await
            {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Err(io::Error::other("the connection sent nothing")),
            }
            this.inner.accept(stream, service).await
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_busy_answer_is_whole() {
        let text = std::str::from_utf8(super::busy()).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert_eq!(v["title"], "unavailable");
    }
}
