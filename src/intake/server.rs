//! The intake's connections: HTTP/1.1 over TCP (or TLS), each bounded.
//!
//! - At most `max_connections` at once. At the maximum the listener stops
//!   accepting (the kernel's backlog waits); when a connection waits there, it
//!   closes first a connection that has not sent a complete request head (the
//!   oldest), then the longest idle one; it never accepts a connection only
//!   to close it, and never closes one for a connection that is not there.
//! - A fresh connection has `header_read_timeout` to send its first request
//!   head (a TLS handshake included), a kept-alive one `idle_timeout` between
//!   requests and `header_read_timeout` for a head once it began.
//! - A peer that does not read its answers is dropped `write_timeout` after a
//!   write first blocked.
//! - After `max_requests_per_connection` requests, or `connection_lifetime`,
//!   the answer carries `Connection: close` (an idle connection is closed at
//!   once).
//! - Request heads are bounded (`max_headers`, `max_header_bytes`: 431), and
//!   one request is served at a time per connection, so pipelined requests
//!   wait in a bounded buffer.
//!
//! One task watches every connection's clocks ([`WATCH_EVERY`]), so a
//! connection costs no timer of its own.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::tls::Tls;
use super::{mono_ms, Intake};
use crate::config::{ConfigError, WebhookSettings};

/// How often connections' clocks are looked at.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);

/// A connection without a request head is closed to make room only once it
/// had this long to send one.
pub const EVICT_AFTER: Duration = WATCH_EVERY;

/// The default connection bound.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Open files kept for everything but the intake's connections: Kafka's
/// sockets, the listeners, the metrics scrapes, logs.
pub const RESERVED_FILES: u64 = 256;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Accepted; no complete request head yet.
    Fresh = 0,
    /// Kept alive, a next head begun.
    Head = 1,
    /// A request being served.
    Busy = 2,
    /// Kept alive between requests.
    Idle = 3,
    /// Answered; the answer not yet flushed to the socket.
    Answering = 4,
    /// A request head in; its body being read.
    Body = 5,
}

impl Phase {
    fn from(v: u8) -> Phase {
        match v {
            0 => Phase::Fresh,
            1 => Phase::Head,
            2 => Phase::Busy,
            3 => Phase::Idle,
            4 => Phase::Answering,
            _ => Phase::Body,
        }
    }
}

/// Why the intake closed a connection
/// (`paysync_webhook_connections_closed_total{reason}`).
pub const CLOSE_REASONS: &[&str] = &[
    "header_timeout",
    "idle_timeout",
    "write_timeout",
    "lifetime",
    "evicted",
    "overloaded",
];

/// One connection's clocks, shared by its task and the watcher.
struct Conn {
    opened_ms: u64,
    phase: AtomicU8,
    since_ms: AtomicU64,
    /// When a write first blocked (0: not blocked).
    write_blocked_ms: AtomicU64,
    requests: AtomicU32,
    /// Answer with `Connection: close`.
    closing: AtomicBool,
    kill: CancellationToken,
}

impl Conn {
    fn phase(&self) -> Phase {
        Phase::from(self.phase.load(Ordering::Acquire))
    }

    fn enter(&self, phase: Phase, now: u64) {
        self.since_ms.store(now, Ordering::Release);
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// A request head arrived: returns true when this is the last request
    /// the connection serves.
    fn begin(&self, max_requests: u32) -> bool {
        self.enter(Phase::Body, mono_ms());
        let n = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= max_requests {
            self.closing.store(true, Ordering::Release);
        }
        self.closing.load(Ordering::Acquire)
    }

    /// The request's body is read (or given up on).
    fn body_read(&self) {
        if self.phase() == Phase::Body {
            self.enter(Phase::Busy, mono_ms());
        }
    }

    /// The answer is handed to the connection: it is not idle until the
    /// answer is flushed (a connection closed for room must not lose it).
    fn end(&self) {
        self.enter(Phase::Answering, mono_ms());
    }

    fn flushed(&self) {
        if self.phase() == Phase::Answering {
            self.enter(Phase::Idle, mono_ms());
        }
    }

    fn read_some(&self) {
        if self.phase() == Phase::Idle {
            self.enter(Phase::Head, mono_ms());
        }
    }

    fn write_blocked(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) == 0 {
            self.write_blocked_ms
                .store(mono_ms().max(1), Ordering::Relaxed);
        }
    }

    fn write_went(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) != 0 {
            self.write_blocked_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// The connection limits (from `[webhooks]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections at most.
    pub max_connections: usize,
    /// To send a request head.
    pub header_read_timeout: Duration,
    /// Between requests.
    pub idle_timeout: Duration,
    /// A connection's whole life.
    pub lifetime: Duration,
    /// Requests per connection.
    pub max_requests: u32,
    /// A blocked write, at most.
    pub write_timeout: Duration,
    /// Header lines.
    pub max_headers: usize,
    /// Head bytes.
    pub max_header_bytes: usize,
}

impl Limits {
    /// The limits of `settings`, with the connection bound decided at start.
    pub fn new(settings: &WebhookSettings, max_connections: usize) -> Self {
        Limits {
            max_connections,
            header_read_timeout: settings.header_read_timeout,
            idle_timeout: settings.idle_timeout,
            lifetime: settings.connection_lifetime,
            max_requests: settings.max_requests_per_connection,
            write_timeout: settings.write_timeout,
            max_headers: settings.max_headers,
            max_header_bytes: settings.max_header_bytes,
        }
    }

    /// What the watcher does to a connection at `now` (ms).
    fn verdict(&self, c: &Conn, now: u64) -> Verdict {
        let ms = |d: Duration| d.as_millis() as u64;
        let blocked = c.write_blocked_ms.load(Ordering::Relaxed);
        if blocked != 0 && now.saturating_sub(blocked) >= ms(self.write_timeout) {
            return Verdict::Close("write_timeout");
        }
        let phase = c.phase();
        let since = c.since_ms.load(Ordering::Acquire);
        let waited = now.saturating_sub(since);
        match phase {
            Phase::Fresh | Phase::Head if waited >= ms(self.header_read_timeout) => {
                return Verdict::Close("header_timeout")
            }
            Phase::Idle if waited >= ms(self.idle_timeout) => {
                return Verdict::Close("idle_timeout")
            }
            _ => {}
        }
        let lived = now.saturating_sub(c.opened_ms);
        if lived >= ms(self.lifetime) {
            // A request in hand may finish (within the write timeout past the
            // lifetime); then the connection closes, whatever its peer does.
            let serving = matches!(phase, Phase::Body | Phase::Busy | Phase::Answering);
            return if serving && lived < ms(self.lifetime) + ms(self.write_timeout) {
                Verdict::CloseAfterAnswer
            } else {
                Verdict::Close("lifetime")
            };
        }
        Verdict::Keep
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Keep,
    CloseAfterAnswer,
    Close(&'static str),
}

/// The open connections.
struct Registry {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
    freed: Notify,
}

impl Registry {
    fn len(&self) -> usize {
        lock(&self.conns).len()
    }

    fn open(self: &Arc<Self>) -> (Arc<Conn>, Registered) {
        let now = mono_ms();
        let conn = Arc::new(Conn {
            opened_ms: now,
            phase: AtomicU8::new(Phase::Fresh as u8),
            since_ms: AtomicU64::new(now),
            write_blocked_ms: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            closing: AtomicBool::new(false),
            kill: CancellationToken::new(),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.conns).insert(id, conn.clone());
        (
            conn,
            Registered {
                registry: self.clone(),
                id,
            },
        )
    }

    /// The connection to close to make room at `now`, in this order: the
    /// oldest without a complete request head, then the one whose body has
    /// been arriving longest, each once it had `grace` (a connection just
    /// accepted may hold its head unread, a genuine body arrives at once);
    /// then the longest idle; then one whose answer has waited `grace` for
    /// its peer to read. None while every connection is working.
    fn victim(&self, now: u64, grace: Duration) -> Option<Arc<Conn>> {
        let grace = grace.as_millis() as u64;
        let conns = lock(&self.conns);
        let alive = || conns.values().filter(|c| !c.kill.is_cancelled());
        let oldest = |phases: &[Phase], grace: u64| {
            alive()
                .filter(|c| phases.contains(&c.phase()))
                .filter(|c| now.saturating_sub(c.since_ms.load(Ordering::Acquire)) >= grace)
                .min_by_key(|c| c.since_ms.load(Ordering::Acquire))
                .cloned()
        };
        let blocked_answer = || {
            alive()
                .filter(|c| c.phase() == Phase::Answering)
                .filter(|c| {
                    let since = c.write_blocked_ms.load(Ordering::Relaxed);
                    since != 0 && now.saturating_sub(since) >= grace
                })
                .min_by_key(|c| c.write_blocked_ms.load(Ordering::Relaxed))
                .cloned()
        };
        oldest(&[Phase::Fresh, Phase::Head], grace)
            .or_else(|| oldest(&[Phase::Body], grace))
            .or_else(|| oldest(&[Phase::Idle], 0))
            .or_else(blocked_answer)
    }
}

/// Removes its connection from the registry when the connection's task ends.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.registry.conns).remove(&self.id);
        self.registry.freed.notify_waiters();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A socket that tells its connection's clocks what it does.
struct Watched<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.read_some();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> Watched<S> {
    fn note<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match &r {
            Poll::Pending => self.conn.write_blocked(),
            Poll::Ready(_) => self.conn.write_went(),
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.conn.flushed();
        }
        self.note(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Decides the connection bound: `explicit` when set (a configuration error
/// when the open-file limit cannot hold it), else the default, lowered when
/// the limit leaves less room (with the warning to log). `open_files` is the
/// process's limit (`None`: unlimited); `reserved` the files kept for the rest.
pub fn connection_bound(
    explicit: Option<usize>,
    open_files: Option<u64>,
    reserved: u64,
) -> Result<(usize, Option<String>), ConfigError> {
    let room = open_files.map(|n| n.saturating_sub(reserved));
    match (explicit, room) {
        (Some(n), Some(room)) if n as u64 > room => Err(ConfigError::new(
            "webhooks.max_connections",
            format!(
                "{n} connections need {} open files with the {reserved} kept for Kafka, the connectors and the rest, and this process may open {} (ulimit -n): raise the limit or lower the setting",
                n as u64 + reserved,
                open_files.unwrap_or_default()
            ),
        )),
        (Some(n), _) => Ok((n, None)),
        (None, Some(room)) if room < DEFAULT_MAX_CONNECTIONS as u64 => {
            let n = room.max(1) as usize;
            Ok((
                n,
                Some(format!(
                    "the open-file limit ({}) leaves room for {n} webhook connections, fewer than the default {DEFAULT_MAX_CONNECTIONS}: raise it (ulimit -n {} or LimitNOFILE) or set webhooks.max_connections",
                    open_files.unwrap_or_default(),
                    DEFAULT_MAX_CONNECTIONS as u64 + reserved
                )),
            ))
        }
        (None, _) => Ok((DEFAULT_MAX_CONNECTIONS, None)),
    }
}

/// Raises the process's soft open-file limit to its hard limit (as Go's
/// runtime does), and returns the limit in force (`None`: unlimited).
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return limit.maximum;
        }
    }
    limit.current
}

/// Serves the intake on `listener` until `shutdown`; on shutdown, connections
/// get a few seconds to finish.
pub async fn serve(
    listener: TcpListener,
    intake: Arc<Intake>,
    limits: Limits,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let registry = Arc::new(Registry {
        conns: Mutex::new(HashMap::new()),
        next: AtomicU64::new(0),
        freed: Notify::new(),
    });
    let watcher = tokio::spawn(watch(
        registry.clone(),
        limits.clone(),
        intake.clone(),
        shutdown.clone(),
    ));
    let mut connections = tokio::task::JoinSet::new();
    let limits = Arc::new(limits);
    // Readiness of the listening socket says a connection waits in the
    // backlog without accepting it: room is made only for a connection that
    // is there, and taken only once there is room.
    let listener = listener
        .into_std()
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| format!("the webhook listener: {e}"))?;
    // SAFETY: the AsyncFd owns the std listener, so its descriptor stays open
    // and the same for the AsyncFd's whole life.
    #[allow(unsafe_code)]
    let listener =
        unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE) }
            .map_err(|e| format!("the webhook listener: {e}"))?;
    loop {
        let mut pending = tokio::select! {
            () = shutdown.cancelled() => break,
            ready = listener.readable() => ready.map_err(|e| format!("the webhook listener: {e}"))?,
        };
        if registry.len() >= limits.max_connections {
            // Full. Readiness may be stale (it clears only when accept would
            // block): ask the socket whether a connection waits.
            if !waiting(listener.get_ref()) {
                pending.clear_ready();
                continue;
            }
            // One waits: close the oldest connection without a request head
            // (else the longest idle), then take the waiting one once its
            // place is free; when every connection is serving, it waits in
            // the backlog.
            let freed = registry.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(victim) = registry.victim(mono_ms(), EVICT_AFTER) {
                tracing::debug!(
                    phase = ?victim.phase(),
                    for_ms = mono_ms().saturating_sub(victim.since_ms.load(Ordering::Acquire)),
                    "webhook intake: at max_connections, closing a connection to make room"
                );
                intake.metrics().connection_closed("evicted");
                victim.kill.cancel();
            }
            drop(pending);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = &mut freed => {}
                () = tokio::time::sleep(WATCH_EVERY) => {}
            }
            continue;
        }
        let accepted = match pending.try_io(|l| l.get_ref().accept()) {
            Err(_would_block) => continue,
            Ok(a) => a.and_then(|(s, peer)| {
                s.set_nonblocking(true)?;
                Ok((TcpStream::from_std(s)?, peer))
            }),
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: pause, then go on.
                tracing::warn!(error = %e, "webhook intake: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (conn, registered) = registry.open();
        intake.metrics().set_connections(registry.len());
        connections.spawn(connection(
            stream,
            peer,
            conn,
            registered,
            intake.clone(),
            limits.clone(),
            tls.clone(),
            shutdown.clone(),
        ));
        while connections.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(6), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    watcher.abort();
    Ok(())
}

/// True when a connection waits in the listener's backlog (level-triggered:
/// the socket is asked, not the reactor's cached readiness).
fn waiting(listener: &std::net::TcpListener) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    poll(&mut fds, Some(&rustix::time::Timespec::default())).is_ok_and(|n| n > 0)
}

/// Closes connections whose clocks ran out.
async fn watch(
    registry: Arc<Registry>,
    limits: Limits,
    intake: Arc<Intake>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(WATCH_EVERY) => {}
        }
        let now = mono_ms();
        let conns: Vec<Arc<Conn>> = lock(&registry.conns).values().cloned().collect();
        for c in conns.iter().filter(|c| !c.kill.is_cancelled()) {
            match limits.verdict(c, now) {
                Verdict::Keep => {}
                Verdict::CloseAfterAnswer => c.closing.store(true, Ordering::Release),
                Verdict::Close(reason) => {
                    intake.metrics().connection_closed(reason);
                    c.kill.cancel();
                }
            }
        }
        intake.metrics().set_connections(conns.len());
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    conn: Arc<Conn>,
    registered: Registered,
    intake: Arc<Intake>,
    limits: Arc<Limits>,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) {
    let _registered = registered;
    let io = Watched {
        inner: stream,
        conn: conn.clone(),
    };
    let kill = conn.kill.clone();
    match tls {
        None => serve_http(io, peer, conn, intake, &limits, kill, shutdown).await,
        Some(tls) => {
            // A handshake costs a signature: it spends the verification
            // budget too, so a flood of handshakes is bounded like one of
            // forged bodies.
            if !intake.afford(mono_ms()) {
                intake.metrics().connection_closed("overloaded");
                return;
            }
            let handshake = tokio::select! {
                () = kill.cancelled() => return,
                () = shutdown.cancelled() => return,
                h = tls.acceptor.accept(io) => h,
            };
            match handshake {
                Ok(stream) => serve_http(stream, peer, conn, intake, &limits, kill, shutdown).await,
                Err(e) => tracing::debug!(error = %e, "webhook intake: TLS handshake failed"),
            }
        }
    }
}

async fn serve_http<S>(
    io: S,
    peer: SocketAddr,
    conn: Arc<Conn>,
    intake: Arc<Intake>,
    limits: &Limits,
    kill: CancellationToken,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max_requests = limits.max_requests;
    let service = hyper::service::service_fn(move |request| {
        let intake = intake.clone();
        let conn = conn.clone();
        async move {
            let last = conn.begin(max_requests);
            let body_conn = conn.clone();
            let body_read = move || body_conn.body_read();
            let mut response = intake.handle(request, peer, &body_read).await;
            if last || conn.closing.load(Ordering::Acquire) {
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            conn.end();
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        // The watcher keeps the clocks (fresh, idle and head timeouts).
        .header_read_timeout(None)
        .keep_alive(true)
        .max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size((limits.max_header_bytes * 2).max(8192));
    let served = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(served);
    tokio::select! {
        _ = served.as_mut() => {}
        () = kill.cancelled() => {}
        () = shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_secs(5), served) => {}
                () = kill.cancelled() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(opened: u64, phase: Phase, since: u64) -> Conn {
        Conn {
            opened_ms: opened,
            phase: AtomicU8::new(phase as u8),
            since_ms: AtomicU64::new(since),
            write_blocked_ms: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            closing: AtomicBool::new(false),
            kill: CancellationToken::new(),
        }
    }

    fn limits() -> Limits {
        Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            lifetime: Duration::from_secs(600),
            max_requests: 3,
            write_timeout: Duration::from_secs(30),
            max_headers: 64,
            max_header_bytes: 16384,
        }
    }

    #[test]
    fn each_clock_closes_what_it_bounds() {
        let l = limits();
        let s = 1_000_000;
        // A fresh connection: 5 s for its head.
        assert_eq!(
            l.verdict(&conn(s, Phase::Fresh, s), s + 4_999),
            Verdict::Keep
        );
        assert_eq!(
            l.verdict(&conn(s, Phase::Fresh, s), s + 5_000),
            Verdict::Close("header_timeout")
        );
        // Kept alive: 60 s idle, then 5 s once a head began.
        assert_eq!(
            l.verdict(&conn(s, Phase::Idle, s), s + 59_000),
            Verdict::Keep
        );
        assert_eq!(
            l.verdict(&conn(s, Phase::Idle, s), s + 60_000),
            Verdict::Close("idle_timeout")
        );
        assert_eq!(
            l.verdict(&conn(s, Phase::Head, s + 50_000), s + 55_000),
            Verdict::Close("header_timeout")
        );
        // Serving a request: no head or idle clock (the handler bounds it).
        assert_eq!(
            l.verdict(&conn(s, Phase::Busy, s), s + 100_000),
            Verdict::Keep
        );
        // A write blocked for 30 s, whatever the phase.
        let c = conn(s, Phase::Busy, s);
        c.write_blocked_ms.store(s + 1, Ordering::Relaxed);
        assert_eq!(l.verdict(&c, s + 30_000), Verdict::Keep);
        assert_eq!(l.verdict(&c, s + 30_001), Verdict::Close("write_timeout"));
        c.write_went();
        assert_eq!(l.verdict(&c, s + 30_001), Verdict::Keep);
        // The lifetime: closed at once when idle, after its answer when busy.
        let old = s + 600_000;
        assert_eq!(
            l.verdict(&conn(s, Phase::Idle, old - 1), old),
            Verdict::Close("lifetime")
        );
        assert_eq!(
            l.verdict(&conn(s, Phase::Busy, old - 1), old),
            Verdict::CloseAfterAnswer
        );
        // ... and closed at the lifetime plus the write timeout, whatever it
        // is doing (a peer reading a little now and then holds nothing longer).
        assert_eq!(
            l.verdict(&conn(s, Phase::Answering, old - 1), old + 30_000),
            Verdict::Close("lifetime")
        );
    }

    #[test]
    fn the_last_request_is_answered_with_close() {
        let c = conn(0, Phase::Fresh, 0);
        assert!(!c.begin(3));
        c.end();
        assert!(!c.begin(3));
        c.end();
        assert!(c.begin(3), "the third of three");
        assert_eq!(c.phase(), Phase::Body);
        c.body_read();
        assert_eq!(c.phase(), Phase::Busy);
        c.end();
        assert_eq!(c.phase(), Phase::Answering, "idle only once flushed");
        c.flushed();
        assert_eq!(c.phase(), Phase::Idle);
        c.read_some();
        assert_eq!(c.phase(), Phase::Head, "a next head began");
    }

    #[test]
    fn room_is_made_from_headless_connections_first_then_idle_ones() {
        let registry = Arc::new(Registry {
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            freed: Notify::new(),
        });
        let (busy, _b) = registry.open();
        busy.enter(Phase::Busy, 10);
        let (answering, _a) = registry.open();
        answering.enter(Phase::Answering, 1);
        let (idle, _i) = registry.open();
        idle.enter(Phase::Idle, 5);
        assert!(Arc::ptr_eq(
            &registry.victim(1_000, Duration::ZERO).unwrap(),
            &idle
        ));
        let (fresh, _f) = registry.open();
        fresh.enter(Phase::Fresh, 50);
        assert!(
            Arc::ptr_eq(&registry.victim(1_000, Duration::ZERO).unwrap(), &fresh),
            "a connection without a head goes before an idle one"
        );
        fresh.kill.cancel();
        assert!(Arc::ptr_eq(
            &registry.victim(1_000, Duration::ZERO).unwrap(),
            &idle
        ));
        idle.kill.cancel();
        assert!(
            registry.victim(1_000, Duration::ZERO).is_none(),
            "a serving connection stays, and one whose answer is not flushed"
        );
        // A body arriving for longer than the grace goes before an idle one;
        // an answer its peer has not read for the grace goes last.
        let (body, _bo) = registry.open();
        body.enter(Phase::Body, 600);
        assert!(registry.victim(700, Duration::from_millis(250)).is_none());
        assert!(Arc::ptr_eq(
            &registry.victim(900, Duration::from_millis(250)).unwrap(),
            &body
        ));
        body.kill.cancel();
        answering.write_blocked_ms.store(500, Ordering::Relaxed);
        assert!(Arc::ptr_eq(
            &registry.victim(900, Duration::from_millis(250)).unwrap(),
            &answering
        ));
        answering.write_blocked_ms.store(0, Ordering::Relaxed);
        drop(_bo);
        drop(_f);
        assert_eq!(registry.len(), 3);
        // A connection accepted a moment ago may hold its head unread.
        let (young, _y) = registry.open();
        young.enter(Phase::Fresh, 900);
        assert!(registry.victim(1_000, Duration::from_millis(250)).is_none());
        assert!(Arc::ptr_eq(
            &registry.victim(1_250, Duration::from_millis(250)).unwrap(),
            &young
        ));
    }

    #[test]
    fn the_bound_follows_the_open_file_limit() {
        // Plenty of room: the default.
        assert_eq!(
            connection_bound(None, Some(1 << 20), 256).unwrap(),
            (1024, None)
        );
        assert_eq!(connection_bound(None, None, 256).unwrap(), (1024, None));
        // Less room: lowered, with a warning that says how to raise it.
        let (n, warning) = connection_bound(None, Some(1024), 256).unwrap();
        assert_eq!(n, 768);
        let warning = warning.unwrap();
        assert!(warning.contains("ulimit -n 1280"), "{warning}");
        // An explicit setting is kept when it fits, refused when it cannot.
        assert_eq!(
            connection_bound(Some(4096), Some(20_000), 256).unwrap(),
            (4096, None)
        );
        let e = connection_bound(Some(4096), Some(1024), 256).unwrap_err();
        assert_eq!(e.key, "webhooks.max_connections");
        assert!(e.to_string().contains("ulimit -n"), "{e}");
    }
}
