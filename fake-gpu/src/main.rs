use std::process::ExitCode;

use clap::Parser;
use fake_gpu::cli::Cli;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match fake_gpu::cli::run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fake-gpu: {e}");
            ExitCode::from(2)
        }
    }
}
