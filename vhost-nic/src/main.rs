use std::process::ExitCode;

use clap::Parser;
use vhost_nic::cli::{Cli, Command};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Some(Command::Ctl(args)) = &cli.command {
        return match vhost_nic::ctl::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vhost-nic ctl: {e}");
                ExitCode::from(1)
            }
        };
    }
    let result = cli.devices().map_err(|e| e.to_string()).and_then(|devs| {
        vhost_nic::daemon::run(
            devs,
            cli.control_socket.as_deref(),
            &cli.faults,
            cli.trace,
            cli.capture.as_deref(),
        )
        .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-nic: {e}");
            ExitCode::from(2)
        }
    }
}
