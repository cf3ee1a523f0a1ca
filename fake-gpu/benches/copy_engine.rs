//! Copy-engine bandwidth against host memcpy (the same as `fake-gpu
//! bench`). Run with `cargo bench -p fake-gpu --bench copy_engine`;
//! FAKE_GPU_BENCH_SIZE (e.g. 256M) and FAKE_GPU_BENCH_ITERATIONS override
//! the defaults (64M, 32).

use fake_gpu::bench::{run, BenchOptions};
use fake_gpu::cli::parse_size;

fn main() {
    let mut opts = BenchOptions::default();
    if let Ok(s) = std::env::var("FAKE_GPU_BENCH_SIZE") {
        match parse_size(&s) {
            Ok(n) => opts.size = n,
            Err(e) => {
                eprintln!("FAKE_GPU_BENCH_SIZE: {e}");
                std::process::exit(2);
            }
        }
    }
    if let Some(n) = std::env::var("FAKE_GPU_BENCH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        opts.iterations = n;
    }
    match run(&opts) {
        Ok(report) => print!("{}", report.to_text()),
        Err(e) => {
            eprintln!("copy_engine bench: {e}");
            std::process::exit(1);
        }
    }
}
