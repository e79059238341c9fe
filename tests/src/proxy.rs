//! A small TCP proxy for fault injection: put it between an app and Redis, then switch what the
//! network does while the test runs.
//!
//! [`Proxy::start`] listens on `127.0.0.1:0` and forwards every accepted connection to one
//! upstream address. [`Proxy::set_mode`] changes, at any moment, what happens to the bytes and to
//! new connections ([`Mode`]); [`Proxy::reset_connections`] breaks every current connection with a
//! TCP reset.
//!
//! ```no_run
//! # async fn demo(redis: &idem_tests::redis::RedisServer) {
//! use std::time::Duration;
//! use idem_tests::proxy::{Mode, Proxy};
//!
//! let proxy = Proxy::start(([127, 0, 0, 1], redis.port()).into()).await;
//! // Connect the app to `proxy.url()` instead of `redis.url()`, then:
//! proxy.set_mode(Mode::latency(Duration::from_millis(500))); // Redis answers slowly
//! proxy.set_mode(Mode::BlackHole); // a partition: nothing arrives, nothing is refused
//! proxy.cut(); // Redis unreachable: connections reset, new ones refused
//! proxy.set_mode(Mode::PassThrough); // healed
//! # }
//! ```
//!
//! Each direction of a connection is forwarded chunk by chunk (one `read` is one chunk, up to 16
//! KiB). The mode in force when a chunk has been read decides its fate, so a chunk already delayed
//! keeps its delay when the mode changes, and chunks stay in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What the proxy does with traffic. Switch with [`Proxy::set_mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forwards everything at once (the initial mode).
    PassThrough,
    /// Forwards every chunk after a delay: `to_server` for bytes from the client to the upstream
    /// server, `to_client` for the answers. Chunks of one direction are delayed one after the
    /// other, so a burst of `n` chunks takes `n` delays.
    Latency {
        /// Delay of each chunk sent to the upstream server.
        to_server: Duration,
        /// Delay of each chunk sent back to the client.
        to_client: Duration,
    },
    /// Closes every new connection at once with a TCP reset, as if nothing listened. Connections
    /// already open keep passing traffic: combine with [`Proxy::reset_connections`] (or use
    /// [`Proxy::cut`]) for a server that is gone.
    Refuse,
    /// Accepts connections and keeps them open, but forwards nothing, like a network partition
    /// that drops packets: the client sees no error, only silence. Bytes read meanwhile are held
    /// (not lost) and delivered when the mode changes again, as TCP retransmission would once the
    /// partition heals.
    BlackHole,
}

impl Mode {
    /// [`Mode::Latency`] with the same delay in both directions.
    pub const fn latency(delay: Duration) -> Self {
        Self::Latency {
            to_server: delay,
            to_client: delay,
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    ToServer,
    ToClient,
}

struct Shared {
    mode: watch::Sender<Mode>,
    /// Bumped by [`Proxy::reset_connections`]; each connection watches it.
    resets: watch::Sender<u64>,
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

/// A running proxy. Stops (closing every connection) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on an ephemeral port of `127.0.0.1` forwarding to `upstream`, in
    /// [`Mode::PassThrough`]. Must be called inside a tokio runtime, which runs the proxy.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(Mode::PassThrough),
            resets: watch::Sender::new(0),
            accepted: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, upstream, Arc::clone(&shared)));
        Self {
            addr,
            upstream,
            shared,
            task,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://<addr>/`: the proxy as a Redis URL.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Where it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Switches the mode, effective for every chunk read from now on and every new connection.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    /// Breaks every connection open now with a TCP reset (both the client's and the upstream
    /// side); bytes held or delayed on them are dropped, and no byte is forwarded on them after
    /// this call. Connections accepted afterwards are not affected.
    pub fn reset_connections(&self) {
        self.shared.resets.send_modify(|resets| *resets += 1);
    }

    /// The upstream server as good as dead: [`Mode::Refuse`] for new connections, then
    /// [`Proxy::reset_connections`] for the current ones. [`Mode::PassThrough`] heals it.
    pub fn cut(&self) {
        self.set_mode(Mode::Refuse);
        self.reset_connections();
    }

    /// Connections accepted so far, refused ones included.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed at once because the mode was [`Mode::Refuse`].
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("mode", &self.mode())
            .field("accepted", &self.accepted())
            .finish_non_exhaustive()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The accept task owns the connection tasks: aborting it drops them all.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if *shared.mode.borrow() == Mode::Refuse {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            // SO_LINGER 0: the close is a reset, like a refused connection, not an orderly end.
            abort_on_close(&client);
            drop(client);
            continue;
        }
        // Subscribed before the task starts, so a reset right after the accept still applies.
        let resets = shared.resets.subscribe();
        connections.spawn(forward(client, upstream, Arc::clone(&shared), resets));
    }
}

/// Makes closing `stream` a TCP reset (`SO_LINGER` 0) rather than an orderly end. A zero linger
/// never blocks; `set_linger` is used instead of `set_zero_linger` (tokio 1.50) so the workspace's
/// minimum tokio (1.47) still builds.
fn abort_on_close(stream: &TcpStream) {
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

/// Forwards one connection in both directions until both ends close, or resets it.
async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut resets: watch::Receiver<u64>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        abort_on_close(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let reset = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let to_server = pump(
            client_read,
            server_write,
            shared.mode.subscribe(),
            Direction::ToServer,
        );
        let to_client = pump(
            server_read,
            client_write,
            shared.mode.subscribe(),
            Direction::ToClient,
        );
        // Reset first: once `reset_connections` returns, no further byte of this connection is
        // forwarded, even one that arrives in the same wake-up.
        tokio::select! {
            biased;
            _ = resets.changed() => true,
            _ = async { tokio::join!(to_server, to_client) } => false,
        }
    };
    if reset {
        abort_on_close(&client);
        abort_on_close(&server);
    }
}

/// Copies `from` to `to` chunk by chunk, applying the mode to each chunk; at the end of `from`,
/// shuts `to` down for writing so the close propagates.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut mode: watch::Receiver<Mode>,
    direction: Direction,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::BlackHole => {
                    // Hold the chunk until the mode changes, then decide again.
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                Mode::Latency {
                    to_server,
                    to_client,
                } => {
                    let delay = match direction {
                        Direction::ToServer => to_server,
                        Direction::ToClient => to_client,
                    };
                    tokio::time::sleep(delay).await;
                    break;
                }
                Mode::PassThrough | Mode::Refuse => break,
            }
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::{Mode, Proxy};

    /// An upstream that echoes every byte.
    async fn echo_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn echo(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut answer = vec![0; text.len()];
        stream.read_exact(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn every_mode_does_what_it_says() {
        let proxy = Proxy::start(echo_server().await).await;
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut stream, b"ping").await.unwrap(), b"ping");

        proxy.set_mode(Mode::latency(Duration::from_millis(100)));
        let started = Instant::now();
        assert_eq!(echo(&mut stream, b"slow").await.unwrap(), b"slow");
        assert!(started.elapsed() >= Duration::from_millis(200), "both ways");

        proxy.set_mode(Mode::BlackHole);
        stream.write_all(b"held").await.unwrap();
        let mut answer = [0; 4];
        let silent =
            tokio::time::timeout(Duration::from_millis(200), stream.read_exact(&mut answer)).await;
        assert!(silent.is_err(), "nothing comes back from a black hole");
        proxy.set_mode(Mode::PassThrough);
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"held", "held bytes arrive once healed");

        proxy.set_mode(Mode::Refuse);
        assert_eq!(echo(&mut stream, b"open").await.unwrap(), b"open");
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(echo(&mut refused, b"x").await.is_err());
        assert_eq!(proxy.refused(), 1);

        proxy.reset_connections();
        let broken = tokio::time::timeout(Duration::from_secs(2), echo(&mut stream, b"gone"))
            .await
            .expect("a reset connection fails at once");
        assert!(broken.is_err());

        proxy.set_mode(Mode::PassThrough);
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut fresh, b"back").await.unwrap(), b"back");
        assert_eq!(proxy.accepted(), 3);
    }
}
