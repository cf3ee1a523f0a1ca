//! Long steps with progress on the terminal and full output in a log file;
//! a failure names the step, the command and the log.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("step `{step}` failed: `{command}` {status}\n  full log: {log}\n{tail}")]
    Step {
        step: String,
        command: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("step `{step}`: {why}")]
    Other { step: String, why: String },
    #[error("{0}")]
    Usage(String),
}

pub type Result<T> = std::result::Result<T, LabError>;

pub fn fail<T>(step: &str, why: impl Into<String>) -> Result<T> {
    Err(LabError::Other {
        step: step.to_string(),
        why: why.into(),
    })
}

pub fn banner(step: &str, what: &str) {
    eprintln!("==> {step}: {what}");
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn tail(log: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].iter().map(|l| format!("  | {l}\n")).collect()
}

/// Runs `cmd` with stdout and stderr into `log`. Lines matching the
/// command's own progress format (`name: [..]` for the build scripts) are
/// echoed; otherwise a heartbeat shows every 30 s that the step is alive.
pub fn run_logged(step: &str, mut cmd: Command, log: &Path) -> Result<()> {
    let command = describe(&cmd);
    let file = File::create(log).map_err(|e| LabError::Other {
        step: step.into(),
        why: format!("cannot create log {}: {e}", log.display()),
    })?;
    let file2 = file.try_clone().map_err(|e| LabError::Other {
        step: step.into(),
        why: e.to_string(),
    })?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Other {
            step: step.into(),
            why: format!("cannot start `{command}`: {e}"),
        })?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut pumps = Vec::new();
    for (stream, mut sink) in [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            file,
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            file2,
        ),
    ] {
        let Some(stream) = stream else { continue };
        let tx = tx.clone();
        pumps.push(thread::spawn(move || {
            use std::io::Write;
            for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                let _ = writeln!(sink, "{line}");
                let _ = tx.send(line);
            }
        }));
    }
    drop(tx);
    let start = Instant::now();
    let mut last = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                if is_progress(&line) {
                    eprintln!("    {line}");
                    last = Instant::now();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if last.elapsed() >= Duration::from_secs(30) {
            eprintln!(
                "    ... {step} still running ({}s)",
                start.elapsed().as_secs()
            );
            last = Instant::now();
        }
    }
    for p in pumps {
        let _ = p.join();
    }
    let status = child.wait().map_err(|e| LabError::Other {
        step: step.into(),
        why: e.to_string(),
    })?;
    if status.success() {
        eprintln!("    done in {}s", start.elapsed().as_secs());
        return Ok(());
    }
    Err(LabError::Step {
        step: step.into(),
        command,
        status: status.to_string(),
        log: log.to_path_buf(),
        tail: tail(log, 25),
    })
}

fn is_progress(line: &str) -> bool {
    line.starts_with("build-qemu.sh:") || line.starts_with("build-kernel.sh:")
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    cond()
}
