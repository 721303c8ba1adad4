//! `cargo xtask vm-setup`: QEMU, busybox and the guest tools from apt.

use super::*;

pub(crate) fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

pub(crate) fn dpkg_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(super) fn backports_configured() -> Result<bool> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            let path = entry.path();
            if matches!(
                path.extension().and_then(OsStr::to_str),
                Some("list" | "sources")
            ) {
                files.push(path);
            }
        }
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let active = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.starts_with('#'))
            .any(|line| line.split_whitespace().any(|w| w == "bookworm-backports"));
        if active {
            return Ok(true);
        }
    }
    Ok(false)
}

pub(super) fn backports_lists_present() -> bool {
    std::fs::read_dir("/var/lib/apt/lists").is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.contains("bookworm-backports") && name.contains("Packages")
        })
    })
}

/// The `URIs:` of the Debian archive as this machine's deb822 sources spell it (so a mirror or
/// snapshot set up by the image is reused), else deb.debian.org.
pub(super) fn debian_archive_uri() -> String {
    let text =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .find(|uri| uri.trim_end_matches('/').ends_with("/debian"))
        .unwrap_or("http://deb.debian.org/debian")
        .to_owned()
}

pub(crate) fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

pub fn vm_setup() -> Result<()> {
    let started = Instant::now();
    let uid = output(Command::new("id").arg("-u"))?;
    ensure!(
        uid.trim() == "0",
        "vm-setup installs apt packages and must run as root (try `sudo -E cargo xtask vm-setup`)"
    );
    ensure!(
        Path::new(ARCHIVE_KEYRING).exists(),
        "{ARCHIVE_KEYRING} is missing: install debian-archive-keyring"
    );
    let mut need_update = false;
    if !backports_configured()? {
        let uri = debian_archive_uri();
        let text = format!(
            "Types: deb\nURIs: {uri}\nSuites: bookworm-backports\nComponents: main\n\
             Signed-By: {ARCHIVE_KEYRING}\n"
        );
        std::fs::write(BACKPORTS_SOURCES, text)
            .with_context(|| format!("writing {BACKPORTS_SOURCES}"))?;
        println!("vm-setup: added {BACKPORTS_SOURCES} ({uri})");
        need_update = true;
    }
    if !backports_lists_present() {
        need_update = true;
    }
    let base = [
        "busybox-static",
        "ipvsadm",
        "iproute2",
        "cpio",
        "zstd",
        "xz-utils",
        "nftables",
        "conntrack",
        // kube-proxy's IPVS mode in the guest (tests/vm_k8s_parity.rs).
        "iptables",
        "ipset",
    ];
    let missing_base: Vec<&str> = base
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    let need_qemu = !dpkg_installed("qemu-system-x86");
    if (need_qemu || !missing_base.is_empty()) && !need_update {
        // Installing needs current lists; a fresh image may carry stale ones.
        need_update = true;
    }
    if need_update {
        println!("vm-setup: apt-get update");
        run(apt_get().args(["update", "-q"])).context(
            "apt-get update failed: check /etc/apt/sources.list.d/*.sources (conflicting \
             Signed-By lines for the same archive break apt)",
        )?;
    }
    if need_qemu {
        println!("vm-setup: installing qemu-system-x86 from bookworm-backports");
        run(apt_get().args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
        ]))
        .context(
            "installing qemu-system-x86 from bookworm-backports failed (bookworm's own \
             qemu-system-x86 would remove the preinstalled qemu-utils)",
        )?;
    }
    if !missing_base.is_empty() {
        println!("vm-setup: installing {}", missing_base.join(" "));
        run(apt_get()
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing_base))?;
    }
    for package in [
        "qemu-system-x86",
        "busybox-static",
        "ipvsadm",
        "iproute2",
        "nftables",
        "conntrack",
        "iptables",
        "ipset",
    ] {
        println!(
            "vm-setup: {package} {}",
            dpkg_version(package).unwrap_or_else(|| "?".into())
        );
    }
    for label in KERNELS {
        let kernel = ensure_kernel(label)?;
        build_initramfs(&kernel)?;
    }
    println!("vm-setup: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
