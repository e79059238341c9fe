//! The payments example as a child process: started on an ephemeral port, stopped with signals.
//!
//! The program is `idem-test-payments`, this package's copy of the `payments` binary (the same
//! code, [`idem_examples::serve::main`]), which cargo builds before it runs this package's tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::AsyncBufReadExt as _;

use crate::support::within;

/// The path of `idem-test-payments`, next to the running test's own directory
/// (`target/<profile>/deps/<test>` → `target/<profile>/idem-test-payments`).
pub fn payments_binary() -> PathBuf {
    let test_exe = std::env::current_exe().expect("the test's path");
    let profile_dir = test_exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join(format!(
        "idem-test-payments{}",
        std::env::consts::EXE_SUFFIX
    ));
    assert!(
        binary.exists(),
        "{} is missing: run the tests through cargo test -p idem-tests",
        binary.display()
    );
    binary
}

/// A running payments process. Killed when dropped.
#[derive(Debug)]
pub struct PaymentsProcess {
    child: tokio::process::Child,
    /// The address it listens on.
    pub addr: SocketAddr,
}

impl PaymentsProcess {
    /// Starts the program on an ephemeral loopback port with the embedded store, no simulated
    /// latency and the default lease, then `env` on top, and waits for its
    /// `listening on http://ADDR` line.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        let mut command = tokio::process::Command::new(payments_binary());
        command
            .env("IDEM_LISTEN", "127.0.0.1:0")
            .env_remove("REDIS_URL")
            .env_remove("PAYMENTS_PROCESSING_MS")
            .env_remove("IDEM_LEASE_MS")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("start payments");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = within("the `listening on` line", lines.next_line())
            .await
            .expect("read stdout")
            .expect("payments printed nothing and exited");
        let addr: SocketAddr = line
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("a socket address");
        assert_ne!(addr.port(), 0, "the real bound port is printed");
        Self { child, addr }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the child is running")
    }

    /// Sends `signal` (a name `kill` knows: `TERM`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, signal: &str) {
        let kill = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(kill.success(), "kill -{signal} failed");
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Kills the process with SIGKILL and waits until it is gone.
    pub async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        within("payments to die", self.child.wait())
            .await
            .expect("wait for payments");
    }

    /// Waits for the process to exit and asserts it exited cleanly.
    pub async fn assert_clean_exit(mut self) {
        let status = within("payments to exit after SIGTERM", self.child.wait())
            .await
            .expect("wait for payments");
        assert!(
            status.success(),
            "payments exited with {status} after SIGTERM"
        );
    }
}
