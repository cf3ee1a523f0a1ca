//! Everything the lab needs before it boots: host packages, the patched
//! QEMU, the guest kernel, the guest's ethtool and vhost-nic itself. QEMU,
//! the kernel and ethtool come from the recipes in qemu-configs/,
//! guest-kernel-patches/ and guest-tools/, cached under a key derived from
//! their inputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::paths::{cache_dir, logs_dir, repo_root};
use crate::step::{banner, fail, run_logged, Result};

/// Debian packages the guest uses from the host's root filesystem (the
/// guest sees the host's / read-only) and the lab uses on the host.
pub const HOST_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "ethtool",
    "socat",
    "procps",
    "python3",
    "python3-yaml",
    "python3-jsonschema",
    "kmod",
    "bc",
    "tshark",
];

fn missing_packages(pkgs: &[&str]) -> Vec<String> {
    pkgs.iter()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Status}", p])
                .output()
                .map(|o| o.stdout == b"installed")
                .unwrap_or(false)
        })
        .map(|p| p.to_string())
        .collect()
}

pub fn host_packages() -> Result<()> {
    let missing = missing_packages(HOST_PACKAGES);
    if missing.is_empty() {
        return Ok(());
    }
    banner(
        "host-packages",
        &format!("installing {}", missing.join(" ")),
    );
    let log = logs_dir().join("apt.log");
    let mut update = Command::new("apt-get");
    update.arg("update");
    run_logged("host-packages", update, &log)?;
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing);
    run_logged("host-packages", c, &logs_dir().join("apt-install.log"))
}

/// Asks a build recipe for its cache key.
fn recipe_key(step: &str, script: &Path, extra: &[&std::ffi::OsStr]) -> Result<String> {
    let out = Command::new("bash")
        .arg(script)
        .arg("--print-key")
        .args(extra)
        .output()
        .map_err(|e| crate::step::LabError::Other {
            step: step.into(),
            why: format!("cannot run {}: {e}", script.display()),
        })?;
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || key.is_empty() {
        return fail(
            step,
            format!("{} --print-key gave no key", script.display()),
        );
    }
    Ok(key.chars().take(16).collect())
}

/// Builds (or finds in the cache) the patched QEMU; returns the binary.
pub fn qemu() -> Result<PathBuf> {
    let script = repo_root().join("qemu-configs/build-qemu.sh");
    let key = recipe_key("qemu", &script, &[])?;
    let out = cache_dir().join(format!("qemu-{key}"));
    let bin = out.join("bin/qemu-system-x86_64");
    let hint = if bin.exists() {
        "cached"
    } else {
        "building (about 5 minutes on 2 cores)"
    };
    banner(
        "qemu",
        &format!("patched QEMU 10.0 in {}: {hint}", out.display()),
    );
    let mut c = Command::new("bash");
    c.arg(&script).arg(&out);
    run_logged("qemu", c, &logs_dir().join("qemu-build.log"))?;
    if !bin.exists() {
        return fail(
            "qemu",
            format!("build finished but {} is missing", bin.display()),
        );
    }
    Ok(bin)
}

/// ethtool for the guest, which otherwise runs the host's (Debian 12 has
/// 6.1, too old for the 7.3 kselftests): guest-tools/install-ethtool.sh
/// installs Debian 13's into a cached directory. Returns that directory;
/// the guest mounts it on /run/lab-tools with its bin/ first on PATH.
pub fn guest_ethtool() -> Result<PathBuf> {
    let script = repo_root().join("guest-tools/install-ethtool.sh");
    let key = recipe_key("ethtool", &script, &[])?;
    let out = cache_dir().join(format!("ethtool-{key}"));
    let bin = out.join("bin/ethtool");
    let hint = if bin.exists() {
        "cached"
    } else {
        "fetching Debian 13's package"
    };
    banner(
        "ethtool",
        &format!("guest ethtool in {}: {hint}", out.display()),
    );
    let mut c = Command::new("bash");
    c.arg(&script).arg(&out);
    run_logged("ethtool", c, &logs_dir().join("ethtool-install.log"))?;
    if !bin.exists() {
        return fail(
            "ethtool",
            format!("install finished but {} is missing", bin.display()),
        );
    }
    Ok(out)
}

/// The guest kernel: a prebuilt bzImage, a user's tree, or Debian's
/// linux-source-7.3 with the series and the lab config.
pub struct KernelChoice {
    pub bzimage: Option<PathBuf>,
    pub tree: Option<PathBuf>,
}

pub struct Kernel {
    pub bzimage: PathBuf,
}

pub fn kernel(choice: &KernelChoice) -> Result<Kernel> {
    if let Some(b) = &choice.bzimage {
        if !b.is_file() {
            return fail("kernel", format!("--kernel {}: no such file", b.display()));
        }
        banner("kernel", &format!("using {}", b.display()));
        return Ok(Kernel { bzimage: b.clone() });
    }
    let script = repo_root().join("guest-kernel-patches/build-kernel.sh");
    let tree_args: Vec<&std::ffi::OsStr> = match &choice.tree {
        Some(t) => vec!["--tree".as_ref(), t.as_os_str()],
        None => Vec::new(),
    };
    let key = recipe_key("kernel", &script, &tree_args)?;
    let tag = if choice.tree.is_some() {
        "tree"
    } else {
        "debian"
    };
    let out = cache_dir().join(format!("kernel-{tag}-{key}"));
    let bz = out.join("bzImage");
    let hint = if bz.exists() {
        "cached"
    } else {
        "building (10-20 minutes on 2 cores)"
    };
    banner(
        "kernel",
        &format!("guest kernel in {}: {hint}", out.display()),
    );
    let mut c = Command::new("bash");
    c.arg(&script).arg(&out);
    if let Some(t) = &choice.tree {
        c.arg("--tree").arg(t);
    }
    run_logged("kernel", c, &logs_dir().join("kernel-build.log"))?;
    if !bz.exists() {
        return fail(
            "kernel",
            format!("build finished but {} is missing", bz.display()),
        );
    }
    Ok(Kernel { bzimage: bz })
}

/// Builds and installs the kselftests (targets in build-selftests.sh) from
/// the same kernel source as the guest kernel: `tree`, or Debian's
/// linux-source-7.3 pinned for the kernel. Returns the install directory
/// (its `drivers/net/ping.py` etc. run from their own directory).
pub fn selftests(tree: Option<&Path>) -> Result<PathBuf> {
    let script = repo_root().join("guest-kernel-patches/build-selftests.sh");
    let tree_args: Vec<&std::ffi::OsStr> = match tree {
        Some(t) => vec!["--tree".as_ref(), t.as_os_str()],
        None => Vec::new(),
    };
    let key = recipe_key("kselftest", &script, &tree_args)?;
    let tag = if tree.is_some() { "tree" } else { "debian" };
    let out = cache_dir().join(format!("kselftest-{tag}-{key}"));
    let install = out.join("kselftest");
    let hint = if install.join("run_kselftest.sh").exists() {
        "cached"
    } else {
        "building (a few minutes on 2 cores)"
    };
    banner(
        "kselftest",
        &format!("kselftests installed in {}: {hint}", install.display()),
    );
    let mut c = Command::new("bash");
    c.arg(&script).arg(&out).args(&tree_args);
    run_logged("kselftest", c, &logs_dir().join("kselftest-build.log"))?;
    if !install.join("run_kselftest.sh").exists() {
        return fail(
            "kselftest",
            format!("build finished but {} is missing", install.display()),
        );
    }
    Ok(install)
}

/// Builds vhost-nic in release mode; returns the binary.
pub fn vhost_nic() -> Result<PathBuf> {
    banner("vhost-nic", "cargo build --release -p vhost-nic");
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(repo_root())
        .args(["build", "--release", "--quiet", "-p", "vhost-nic"]);
    run_logged("vhost-nic", c, &logs_dir().join("vhost-nic-build.log"))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    Ok(target.join("release/vhost-nic"))
}
