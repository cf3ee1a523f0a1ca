//! `vhost-nic ctl`: the control socket's client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::{CaptureCmd, CtlArgs, CtlRequest, FaultAction, TraceCmd};

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "cannot connect to {path}: {err} (is the daemon running with --control-socket {path}?)"
    )]
    Connect { path: String, err: std::io::Error },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon closed the connection without a reply")]
    NoReply,
    #[error("bad reply `{0}`")]
    BadReply(String),
    #[error("{0}")]
    Refused(String),
    #[error("--device `{0}` is neither a name nor an index")]
    Device(String),
}

/// The request line for `args`, and whether the reply's `ok` is text.
pub fn request(args: &CtlArgs) -> Result<(Value, bool), CtlError> {
    let text = !args.json;
    let format = if text { "text" } else { "json" };
    let mut req = match &args.request {
        CtlRequest::Stats => json!({ "cmd": "stats" }),
        CtlRequest::Queues => json!({ "cmd": "queues", "format": format }),
        CtlRequest::Ring { queue } => {
            let q = queue
                .parse::<u64>()
                .map_or_else(|_| json!(queue), |n| json!(n));
            json!({ "cmd": "ring", "queue": q, "format": format })
        }
        CtlRequest::Fault { action } => match action {
            FaultAction::Set { spec } => json!({ "cmd": "fault", "set": spec }),
            FaultAction::Clear { kind, queue } => {
                let mut v = json!({ "cmd": "fault", "clear": kind });
                if let Some(q) = queue {
                    v["queue"] = json!(q);
                }
                v
            }
            FaultAction::List => json!({ "cmd": "fault" }),
        },
        CtlRequest::Trace { action } => match action {
            TraceCmd::On { depth } => {
                let mut v = json!({ "cmd": "trace", "action": "on" });
                if let Some(d) = depth {
                    v["depth"] = json!(d);
                }
                v
            }
            TraceCmd::Off => json!({ "cmd": "trace", "action": "off" }),
            TraceCmd::Clear => json!({ "cmd": "trace", "action": "clear" }),
            TraceCmd::Dump { queue, flow, last } => {
                let mut v = json!({ "cmd": "trace", "action": "dump", "format": format });
                if let Some(q) = queue {
                    v["queue"] = q.parse::<u64>().map_or_else(|_| json!(q), |n| json!(n));
                }
                if let Some(f) = flow {
                    v["flow"] = json!(f);
                }
                if let Some(n) = last {
                    v["last"] = json!(n);
                }
                v
            }
        },
        CtlRequest::Capture { action } => match action {
            CaptureCmd::Start {
                file,
                queue,
                dir,
                snaplen,
                limit,
            } => {
                // The daemon opens the file: make a relative path ours.
                let file = std::path::absolute(file).unwrap_or_else(|_| file.clone());
                let mut v =
                    json!({ "cmd": "capture", "action": "start", "file": file, "dir": dir });
                if let Some(q) = queue {
                    v["queue"] = json!(q);
                }
                if let Some(n) = snaplen {
                    v["snaplen"] = json!(n);
                }
                if let Some(n) = limit {
                    v["limit"] = json!(n);
                }
                v
            }
            CaptureCmd::Stop => json!({ "cmd": "capture", "action": "stop" }),
            CaptureCmd::Status => json!({ "cmd": "capture", "action": "status" }),
        },
        CtlRequest::Raw { line } => {
            let v: Value = serde_json::from_str(line).unwrap_or(Value::String(line.clone()));
            return Ok((v, false));
        }
    };
    if let Some(d) = &args.device {
        if d.is_empty() {
            return Err(CtlError::Device(d.clone()));
        }
        req["device"] = d.parse::<u64>().map_or_else(|_| json!(d), |n| json!(n));
    }
    let is_text = text
        && matches!(
            args.request,
            CtlRequest::Queues
                | CtlRequest::Ring { .. }
                | CtlRequest::Trace {
                    action: TraceCmd::Dump { .. }
                }
        );
    Ok((req, is_text))
}

/// Sends one request line and returns the reply line.
pub fn exchange(socket: &std::path::Path, line: &str) -> Result<String, CtlError> {
    let s = UnixStream::connect(socket).map_err(|err| CtlError::Connect {
        path: socket.display().to_string(),
        err,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    (&s).write_all(line.as_bytes())?;
    (&s).write_all(b"\n")?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(CtlError::NoReply);
    }
    Ok(reply)
}

/// Runs `vhost-nic ctl`: prints the answer on stdout; a refused request
/// is an error.
pub fn run(args: &CtlArgs) -> Result<(), CtlError> {
    let (req, text) = request(args)?;
    let line = match &req {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let reply = exchange(&args.socket, &line)?;
    if args.json || matches!(args.request, CtlRequest::Raw { .. }) {
        print!("{reply}");
        return Ok(());
    }
    let v: Value =
        serde_json::from_str(&reply).map_err(|_| CtlError::BadReply(reply.trim().into()))?;
    if let Some(e) = v.get("error") {
        return Err(CtlError::Refused(
            e.as_str().unwrap_or_default().to_string(),
        ));
    }
    let ok = v.get("ok").cloned().unwrap_or(Value::Null);
    match (text, &ok) {
        (true, Value::String(s)) => print!("{s}"),
        _ => println!(
            "{}",
            serde_json::to_string_pretty(&ok).unwrap_or_else(|_| ok.to_string())
        ),
    }
    Ok(())
}
