//! The daemon under test: started in a private directory, killed (and its
//! directory removed) when the guard drops, even if the test panicked.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::TIMEOUT;

/// A test's whole life with one daemon. The vhost-user frontend blocks
/// without timeout on replies (the vhost crate retries reads forever), so
/// when this passes the daemon is killed: the frontend then sees the
/// connection close and the test fails instead of hanging.
const WATCHDOG: Duration = Duration::from_secs(120);

pub struct Daemon {
    child: Child,
    pub dir: PathBuf,
    log: PathBuf,
    /// Dropping it disarms the watchdog.
    watchdog: Option<mpsc::Sender<()>>,
}

fn private_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vhost-nic-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test directory");
    dir
}

impl Daemon {
    /// Two devices, `a` and `b`, with `queues` pairs each, joined by a wire,
    /// plus the stats socket. Returns once all three sockets accept.
    pub fn start_pair(queues: u16) -> Daemon {
        Self::start_pair_with(queues, &[])
    }

    /// Like [`Daemon::start_pair`], with more daemon arguments.
    pub fn start_pair_with(queues: u16, extra: &[&str]) -> Daemon {
        let dir = private_dir();
        let log = dir.join("daemon.log");
        let log_file = std::fs::File::create(&log).expect("create daemon log");
        let device = |name: &str| {
            format!(
                "socket={},port=wire:w,queues={queues}",
                dir.join(format!("{name}.sock")).display()
            )
        };
        let child = Command::new(env!("CARGO_BIN_EXE_vhost-nic"))
            .arg("--device")
            .arg(device("a"))
            .arg("--device")
            .arg(device("b"))
            .arg("--stats-socket")
            .arg(dir.join("stats.sock"))
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,vhost_nic=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("start vhost-nic");
        let (disarm, armed) = mpsc::channel::<()>();
        let pid = child.id() as libc::pid_t;
        std::thread::spawn(move || {
            if armed.recv_timeout(WATCHDOG) == Err(mpsc::RecvTimeoutError::Timeout) {
                eprintln!("vhost-nic test still running after {WATCHDOG:?}: killing the daemon");
                // SAFETY: plain kill(2). The child is not reaped before the
                // guard drops, and the guard disarms this first, so the pid
                // still names the daemon.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        let mut d = Daemon {
            child,
            dir,
            log,
            watchdog: Some(disarm),
        };
        d.wait_for_sockets();
        d
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    fn wait_for_sockets(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        let paths = [self.socket("a"), self.socket("b"), self.socket("stats")];
        while !paths.iter().all(|p| p.exists()) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("vhost-nic exited early ({status})");
            }
            assert!(
                Instant::now() < deadline,
                "vhost-nic did not create its sockets within {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The counters, from the stats socket.
    pub fn stats(&self) -> Value {
        let mut s = UnixStream::connect(self.socket("stats")).expect("connect stats socket");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(b"stats\n").expect("send stats request");
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .expect("read stats reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("stats reply `{line}`: {e}"))
    }

    /// One control socket request line and its reply.
    pub fn control(&self, request: &str) -> Value {
        let mut s = UnixStream::connect(self.socket("stats")).expect("connect control socket");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        writeln!(s, "{request}").expect("send request");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("read reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply `{line}`: {e}"))
    }

    /// Polls the reply to `request` until the number at `pointer` is `want`.
    pub fn wait_counter_json(&self, request: &str, pointer: &str, want: u64) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let v = self.control(request);
            if v.pointer(pointer).and_then(Value::as_u64) == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{pointer} in {v}, expected {want}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// One counter, by JSON pointer (e.g. `/devices/1/queues/0/rx_packets`).
    pub fn counter(&self, pointer: &str) -> u64 {
        let stats = self.stats();
        stats
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no counter {pointer} in {stats}"))
    }

    /// Polls the counter at `pointer` until it equals `want`: workers bump
    /// counters right after publishing the used entry the test saw.
    pub fn wait_counter(&self, pointer: &str, want: u64) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let got = self.counter(pointer);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "counter {pointer} is {got}, expected {want}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        drop(self.watchdog.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(&self.log) {
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!("--- vhost-nic log (last {} lines) ---", tail.len());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
