//! Where things live: the repository, the build cache, a run's scratch dir.

use std::path::{Path, PathBuf};

pub const CACHE_NAME: &str = "vhost-nic-lab";

pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `$XDG_CACHE_HOME/vhost-nic-lab`, default `~/.cache/vhost-nic-lab`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join(CACHE_NAME)
}

pub fn logs_dir() -> PathBuf {
    cache_dir().join("logs")
}
