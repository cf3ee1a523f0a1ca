//! Command line: `serve`, `inspect`, `bench`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::bench::{BenchError, BenchOptions};
use crate::daemon::{DaemonError, ServeOptions};
use crate::device::DeviceConfig;
use crate::inspect::{hexdump, InspectError, Inspector};
use crate::layout::Region;

#[derive(Debug, Parser)]
#[command(
    name = "fake-gpu",
    version,
    about = "A fake PCI GPU: VRAM behind QEMU's ivshmem-doorbell BAR2, a command ring and a copy engine",
    after_help = "Examples:\n  fake-gpu serve --socket /tmp/gpu.sock --vram 1018M\n  \
                  qemu-system-x86_64 ... -chardev socket,path=/tmp/gpu.sock,id=gpu \
                  -device ivshmem-doorbell,chardev=gpu,vectors=2\n  \
                  fake-gpu inspect --socket /tmp/gpu.sock read 0 256\n  \
                  fake-gpu inspect --socket /tmp/gpu.sock compare 0x100000 4M payload.bin"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Serve the device: the ivshmem server QEMU's ivshmem-doorbell connects to.
    Serve(ServeArgs),
    /// Read the VRAM of a running device (through SOCKET.ctl).
    Inspect(InspectArgs),
    /// Copy-engine bandwidth against host memcpy.
    Bench(BenchArgs),
}

/// Parses a size or offset: decimal or 0x-hex, with an optional binary
/// suffix K, M, G or T (KiB, MiB, ... and KB, MB, ... mean the same).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!("invalid size `{s}`: expected a number (decimal or 0x hex) with an optional K, M, G or T suffix, e.g. 64M")
    };
    let t = s.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size `{s}` does not fit in 64 bits"))
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// ivshmem server socket (QEMU: -chardev socket,path=SOCKET,id=ID).
    #[arg(long)]
    pub socket: PathBuf,
    /// VRAM size, e.g. 64M, 1G (a multiple of 4K). BAR2 is the next power
    /// of two above round_up(64K + staging, 2M) + VRAM: with the default
    /// staging, 1018M fills a 1 GiB BAR exactly and 1G needs a 2 GiB one.
    #[arg(long, value_parser = parse_size)]
    pub vram: u64,
    /// Staging window size (a multiple of 4K; 0 disables it).
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    pub staging: u64,
    /// Interrupt vectors per peer; match QEMU's ivshmem-doorbell vectors=N.
    #[arg(long, default_value_t = 2)]
    pub vectors: u16,
    /// Back BAR2 with huge pages (memfd MFD_HUGETLB; needs free pages in
    /// /proc/sys/vm/nr_hugepages for the whole BAR).
    #[arg(long)]
    pub hugetlb: bool,
    /// Control socket (default: SOCKET.ctl).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// The engine also scans the command ring this often without a doorbell.
    #[arg(long, default_value_t = 100)]
    pub poll_interval_ms: u64,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// ivshmem socket of the running device (its control socket is SOCKET.ctl),
    /// or the control socket itself.
    #[arg(long)]
    pub socket: PathBuf,
    /// Region the offsets are in: vram, staging or bar.
    #[arg(long, default_value = "vram")]
    pub region: Region,
    #[command(subcommand)]
    pub op: InspectOp,
}

#[derive(Debug, Subcommand)]
pub enum InspectOp {
    /// Layout, peer IDs and vectors (JSON).
    Info,
    /// Commands by opcode, errors by status, bytes, ring state, allocation
    /// counts (JSON).
    Stats,
    /// The guest driver's live VRAM allocations (offset, size, id) and
    /// their counts (JSON).
    Allocs,
    /// Hex dump of a range.
    Read {
        #[arg(value_parser = parse_size)]
        offset: u64,
        #[arg(value_parser = parse_size)]
        len: u64,
    },
    /// Raw bytes of a range, to a file or stdout.
    Dump {
        #[arg(value_parser = parse_size)]
        offset: u64,
        #[arg(value_parser = parse_size)]
        len: u64,
        /// Output file (default: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// CRC32C of a range.
    Checksum {
        #[arg(value_parser = parse_size)]
        offset: u64,
        #[arg(value_parser = parse_size)]
        len: u64,
    },
    /// Compare a range with a file; exit status 1 when they differ.
    Compare {
        #[arg(value_parser = parse_size)]
        offset: u64,
        #[arg(value_parser = parse_size)]
        len: u64,
        file: PathBuf,
        /// Where in FILE the comparison starts.
        #[arg(long, value_parser = parse_size, default_value = "0")]
        file_offset: u64,
    },
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Bytes per command.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    pub size: u64,
    /// Commands timed per figure.
    #[arg(long, default_value_t = 32)]
    pub iterations: u32,
    /// Back the benchmark device with huge pages.
    #[arg(long)]
    pub hugetlb: bool,
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ServeArgs {
    pub fn options(&self) -> ServeOptions {
        ServeOptions {
            socket: self.socket.clone(),
            control: self.control.clone(),
            device: DeviceConfig {
                vram: self.vram,
                staging: self.staging,
                vectors: self.vectors,
                hugetlb: self.hugetlb,
                poll_interval: Duration::from_millis(self.poll_interval_ms.max(1)),
            },
        }
    }
}

fn inspect(args: &InspectArgs) -> Result<ExitCode, CliError> {
    let mut ins = Inspector::connect(&args.socket)?;
    let region = args.region;
    let mut out = io::stdout().lock();
    match &args.op {
        InspectOp::Info => {
            let v = ins.request(&serde_json::json!({"cmd": "info"}))?;
            writeln!(out, "{v:#}")?;
        }
        InspectOp::Stats => writeln!(out, "{:#}", ins.stats()?)?,
        InspectOp::Allocs => {
            let v = ins.request(&serde_json::json!({"cmd": "allocs"}))?;
            writeln!(out, "{v:#}")?;
        }
        InspectOp::Read { offset, len } => {
            let data = ins.read(region, *offset, *len)?;
            out.write_all(hexdump(*offset, &data).as_bytes())?;
        }
        InspectOp::Dump {
            offset,
            len,
            output,
        } => match output {
            Some(path) => {
                let mut w = BufWriter::new(File::create(path)?);
                ins.dump(region, *offset, *len, &mut w)?;
                w.flush()?;
            }
            None => ins.dump(region, *offset, *len, &mut out)?,
        },
        InspectOp::Checksum { offset, len } => {
            let crc = ins.checksum(region, *offset, *len)?;
            writeln!(out, "crc32c {crc:08x}  {region:?} {offset:#x}+{len:#x}")?;
        }
        InspectOp::Compare {
            offset,
            len,
            file,
            file_offset,
        } => {
            let c = ins.compare(region, *offset, Some(*len), file, *file_offset)?;
            if c.equal {
                writeln!(out, "equal: {} bytes", c.compared)?;
            } else {
                writeln!(
                    out,
                    "differ: {} of {} bytes, first at {region:?} offset {:#x}",
                    c.differing_bytes,
                    c.compared,
                    c.first_difference.unwrap_or(0)
                )?;
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Cmd::Serve(args) => {
            crate::daemon::run(args.options())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect(args) => inspect(&args),
        Cmd::Bench(args) => {
            let report = crate::bench::run(&BenchOptions {
                size: args.size,
                iterations: args.iterations,
                hugetlb: args.hugetlb,
            })?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(io::Error::other)?
                );
            } else {
                print!("{}", report.to_text());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999999T").unwrap_err().contains("64 bits"));
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "fake-gpu",
            "serve",
            "--socket",
            "/tmp/x",
            "--vram",
            "64M",
            "--hugetlb",
        ])
        .unwrap();
        match c.command {
            Cmd::Serve(a) => {
                assert_eq!(a.vram, 64 << 20);
                assert_eq!(a.staging, 4 << 20);
                assert!(a.hugetlb);
            }
            _ => panic!("not serve"),
        }
        assert!(
            Cli::try_parse_from(["fake-gpu", "serve", "--socket", "/x", "--vram", "lots"]).is_err()
        );
        let c = Cli::try_parse_from([
            "fake-gpu", "inspect", "--socket", "/x", "--region", "staging", "compare", "0", "4k",
            "f.bin",
        ])
        .unwrap();
        assert!(matches!(
            c.command,
            Cmd::Inspect(InspectArgs {
                region: Region::Staging,
                ..
            })
        ));
    }
}
