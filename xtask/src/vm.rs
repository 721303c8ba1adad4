//! A QEMU harness for tests that need IPVS, dummy links and a kernel we control.
//!
//! The host kernel has neither IPVS nor dummy links and cannot load modules, so tests that need
//! them boot a Debian kernel in QEMU (software-emulated: `-accel tcg -cpu max`):
//!
//! - `vm-setup` installs QEMU (from bookworm-backports), busybox-static, ipvsadm and friends,
//!   then fetches and prepares the kernels.
//! - Kernels come from apt without installing them: `apt-get download`, unpack `boot/` and
//!   `lib/modules/`, and turn `vmlinuz` into the uncompressed `vmlinux` that QEMU boots via PVH.
//!   Cached under `target/vm/kernels/<kernel release>/`.
//! - One initramfs per kernel (`target/vm/initramfs-<kernel release>.cpio.gz`): busybox, ip,
//!   tc, ipvsadm with their libraries, and the modules the dataplane needs with their
//!   dependencies. Its `/init` mounts the 9p share (tag `host`) at `/host`, runs
//!   `/host/run.sh`, writes the status to `/host/exit-code`, prints
//!   `TOPOPROXY-VM-EXIT <code>` and powers QEMU off through `isa-debug-exit`.
//! - [`run_in_vm`] boots one kernel with one share under a wall-clock timeout;
//!   [`stage_binary`] copies a host binary and its libraries into a share so `run.sh` can run it.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};

use crate::util::{output, run, tail};

/// The kernels the harness knows, by the label used on the command line.
pub const KERNELS: [&str; 2] = ["6.1", "6.12"];

/// The QEMU binary the harness boots.
pub const QEMU: &str = "qemu-system-x86_64";
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";
const ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const EXIT_MARKER: &str = "TOPOPROXY-VM-EXIT";

/// Modules loaded at boot, in this order, each after its dependencies. `?` marks modules that
/// may be missing or built in (then skipped); the rest must exist as a module or be built in.
const BOOT_MODULES: &[&str] = &[
    "crc32c_generic?",
    "virtio_pci",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "nf_conntrack",
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_sh",
    "ip_vs_mh",
    "ip_vs_wlc",
    "dummy",
    "veth",
    "sch_ingress",
    "cls_bpf",
    // nftables: the agent's own table (masquerade, reject, fib) and `nft` in tests.
    "nfnetlink",
    "nf_tables",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "nf_conntrack_netlink",
    "nf_nat",
    "nft_ct",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nf_reject_ipv4",
    "nf_reject_ipv6",
    "nft_reject",
    "nft_reject_inet",
    "nft_reject_ipv4?",
    "nft_reject_ipv6?",
    "nft_fib",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
    "nft_compat?",
    // Captures netlink traffic for byte-level tests (`ip link add nlmon0 type nlmon`).
    "nlmon?",
    // The guest's uplink (QEMU user networking) to the control plane on the host.
    "virtio_net",
    // kube-proxy's IPVS mode beside the agent (tests/vm_k8s_parity.rs): iptables (nft
    // backend, through nft_compat) with the matches and targets its rules use, and ipset.
    "x_tables?",
    "xt_comment?",
    "xt_mark?",
    "xt_MASQUERADE?",
    "xt_addrtype?",
    "xt_conntrack?",
    "xt_nat?",
    "ip_set?",
    "ip_set_hash_ip?",
    "ip_set_hash_ipport?",
    "ip_set_hash_ipportip?",
    "ip_set_hash_ipportnet?",
    "ip_set_hash_net?",
    "ip_set_bitmap_port?",
    "xt_set?",
    "ipt_REJECT?",
    "ip6t_REJECT?",
    "xt_physdev?",
    "xt_ipvs?",
];

/// Shipped in the initramfs but not loaded at boot: the kernel asks `/sbin/modprobe` for them
/// on demand (a service added without `-s` wants `wlc`).
const ON_DEMAND_MODULES: &[&str] = &[
    "ip_vs_lc?",
    "ip_vs_wrr?",
    "ip_vs_lblc?",
    "ip_vs_lblcr?",
    "ip_vs_dh?",
    "ip_vs_sed?",
    "ip_vs_nq?",
    "ip_vs_fo?",
    "ip_vs_ovf?",
    "ip_vs_twos?",
];

/// Host tools copied into the initramfs, at the same path, with their libraries. `?` marks
/// tools that are skipped with a warning when the host lacks them (`vm-setup` installs them).
const GUEST_TOOLS: &[(&str, &str)] = &[
    ("ipvsadm", "/usr/sbin/ipvsadm"),
    ("ip", "/usr/sbin/ip"),
    ("tc", "/usr/sbin/tc"),
    ("nft?", "/usr/sbin/nft"),
    ("conntrack?", "/usr/sbin/conntrack"),
    // kube-proxy's IPVS mode runs these (tests/vm_k8s_parity.rs).
    ("ipset?", "/usr/sbin/ipset"),
    ("iptables?", "/usr/sbin/iptables"),
];

/// Host files copied into the initramfs as they are: ipset (kube-proxy's `tcp:443` entries)
/// resolves protocol names through /etc/protocols.
const GUEST_FILES: &[&str] = &["/etc/protocols", "/etc/services"];

/// Names under which a multi-call tool from [`GUEST_TOOLS`] is linked in the guest:
/// `(tool path, link path)`. xtables-nft-multi picks its personality from `argv[0]`.
const GUEST_TOOL_LINKS: &[(&str, &str)] = &[
    ("iptables", "/usr/sbin/iptables-save"),
    ("iptables", "/usr/sbin/iptables-restore"),
    ("iptables", "/usr/sbin/ip6tables"),
    ("iptables", "/usr/sbin/ip6tables-save"),
    ("iptables", "/usr/sbin/ip6tables-restore"),
];

/// The iptables extensions (`libxt_*.so`), which iptables opens by name at run time, so `ldd`
/// does not list them.
const XTABLES_EXTENSIONS: &str = "/usr/lib/x86_64-linux-gnu/xtables";

const BUSYBOX: &str = "/bin/busybox";

/// What a VM run produced.
#[derive(Debug)]
pub struct VmOutcome {
    /// The exit status of `/host/run.sh`.
    pub exit_code: i32,
    /// Everything the VM printed on its serial console.
    pub console_log: String,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"))
}

/// `<target dir>/vm`: kernels, initramfs images and shares.
pub fn vm_dir() -> PathBuf {
    target_dir().join("vm")
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A host tool's path, or an error pointing at `vm-setup`.
pub fn require_tool(name: &str) -> Result<PathBuf> {
    find_in_path(name).ok_or_else(|| anyhow!("{name} not found: run `cargo xtask vm-setup`"))
}

// ---------------------------------------------------------------------------------------------
// vm-setup

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

fn backports_configured() -> Result<bool> {
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

fn backports_lists_present() -> bool {
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
fn debian_archive_uri() -> String {
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

// ---------------------------------------------------------------------------------------------
// Kernels

/// A prepared kernel in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-37-amd64`.
    pub release: String,
    /// `target/vm/kernels/<release>/`.
    pub dir: PathBuf,
}

impl Kernel {
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
    fn modules(&self) -> PathBuf {
        self.dir.join("lib/modules").join(&self.release)
    }
    /// `target/vm/initramfs-<release>-<inputs hash>.cpio.gz`: the hash covers the init script,
    /// the module and tool lists and the host tools' files, so worktrees with different
    /// harness versions sharing one target directory each keep their own image.
    pub fn initramfs(&self) -> PathBuf {
        vm_dir().join(format!(
            "initramfs-{}-{:016x}.cpio.gz",
            self.release,
            initramfs_inputs_hash()
        ))
    }
}

fn kernels_dir() -> PathBuf {
    vm_dir().join("kernels")
}

/// The file recording which kernel release a label resolved to, so later runs need no apt.
fn label_file(label: &str) -> PathBuf {
    kernels_dir().join(format!("{label}.release"))
}

/// The apt package holding the kernel image for a label.
fn kernel_package(label: &str) -> Result<String> {
    match label {
        // The metapackages name the current image: linux-image-amd64 (6.1, bookworm) and
        // linux-image-6.12-amd64 (bookworm-security / backports).
        "6.1" => metapackage_image("linux-image-amd64", "linux-image-6.1."),
        "6.12" => metapackage_image("linux-image-6.12-amd64", "linux-image-6.12.")
            .or_else(|e| newest_612_image().map_err(|e2| e2.context(format!("{e:#}")))),
        other => bail!("unknown kernel {other}: expected one of {KERNELS:?}"),
    }
}

/// The `linux-image-*` package a kernel metapackage depends on.
fn metapackage_image(meta: &str, prefix: &str) -> Result<String> {
    let deps = output(Command::new("apt-cache").args(["depends", meta]))?;
    deps.lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|dep| dep.starts_with(prefix))
        .map(str::to_owned)
        .ok_or_else(|| {
            anyhow!(
                "{meta} does not depend on a {prefix}* package: check `apt-cache depends {meta}` \
                 and run `cargo xtask vm-setup`"
            )
        })
}

/// The newest signed `linux-image-6.12.*-amd64` apt knows, when the metapackage is missing.
fn newest_612_image() -> Result<String> {
    let found = output(Command::new("apt-cache").args([
        "search",
        "--names-only",
        "^linux-image-6\\.12\\.",
    ]))?;
    let mut candidates: Vec<&str> = found
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            name.starts_with("linux-image-6.12.")
                && name.ends_with("-amd64")
                && !name.contains("unsigned")
                && !name.contains("-dbg")
                && !name.contains("-rt-")
                && !name.contains("cloud")
        })
        .collect();
    candidates.sort_by(|a, b| compare_versions(a, b));
    candidates.last().map(|s| (*s).to_owned()).ok_or_else(|| {
        anyhow!(
            "no linux-image-6.12.*-amd64 package known to apt: run `cargo xtask vm-setup` \
             (it enables bookworm-backports and runs apt-get update)"
        )
    })
}

/// Orders package names by their numeric runs, so 6.12.10 sorts after 6.12.9.
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.parse().ok())
            .collect()
    }
    parts(a).cmp(&parts(b))
}

/// The prepared kernel for a label, from the cache (no apt needed) or fetched and unpacked.
pub fn ensure_kernel(label: &str) -> Result<Kernel> {
    ensure!(
        KERNELS.contains(&label),
        "unknown kernel {label}: expected one of {KERNELS:?}"
    );
    if let Ok(release) = std::fs::read_to_string(label_file(label)) {
        let kernel = Kernel {
            release: release.trim().to_owned(),
            dir: kernels_dir().join(release.trim()),
        };
        if kernel.vmlinux().is_file() && kernel.modules().is_dir() {
            return Ok(kernel);
        }
    }
    fetch_kernel(label)
}

fn fetch_kernel(label: &str) -> Result<Kernel> {
    let package = kernel_package(label)
        .with_context(|| format!("finding the apt package for kernel {label}"))?;
    let download = vm_dir().join("downloads");
    std::fs::create_dir_all(&download).context("creating target/vm/downloads")?;
    let existing = |download: &Path| -> Result<Option<PathBuf>> {
        Ok(std::fs::read_dir(download)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            }))
    };
    let deb = match existing(&download)? {
        Some(deb) => deb,
        None => {
            println!("vm: apt-get download {package}");
            run(Command::new("apt-get")
                .args(["download", "-q", &package])
                .current_dir(&download))
            .with_context(|| {
                format!("apt-get download {package} failed: run `cargo xtask vm-setup`")
            })?;
            existing(&download)?
                .ok_or_else(|| anyhow!("apt-get download {package} left no .deb"))?
        }
    };
    let size = std::fs::metadata(&deb)?.len();
    println!(
        "vm: kernel {label}: {} ({:.1} MB)",
        deb.file_name().unwrap_or_default().to_string_lossy(),
        size as f64 / 1e6
    );
    let staging = kernels_dir().join(format!(".unpack-{label}"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting dpkg-deb")?;
    let tar_status = Command::new("tar")
        .args(["-x", "-C"])
        .arg(&staging)
        .args(["./boot", "./lib/modules"])
        .stdin(dpkg.stdout.take().context("dpkg-deb stdout")?)
        .status()
        .context("starting tar")?;
    let dpkg_status = dpkg.wait()?;
    ensure!(
        tar_status.success() && dpkg_status.success(),
        "unpacking {} failed (dpkg-deb {dpkg_status}, tar {tar_status})",
        deb.display()
    );
    let vmlinuz = std::fs::read_dir(staging.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| anyhow!("{} holds no boot/vmlinuz-*", deb.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(OsStr::to_str)
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("vmlinuz name")?
        .to_owned();
    ensure!(
        staging.join("lib/modules").join(&release).is_dir(),
        "{} has vmlinuz-{release} but no lib/modules/{release}",
        deb.display()
    );
    let vmlinux = extract_vmlinux(&std::fs::read(&vmlinuz)?)
        .with_context(|| format!("extracting vmlinux from {}", vmlinuz.display()))?;
    std::fs::write(staging.join("vmlinux"), &vmlinux)?;
    std::fs::write(
        staging.join("package.txt"),
        format!(
            "{}\n",
            deb.file_name().unwrap_or_default().to_string_lossy()
        ),
    )?;
    let dir = kernels_dir().join(&release);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("moving the unpacked kernel to {}", dir.display()))?;
    std::fs::write(label_file(label), format!("{release}\n"))?;
    println!(
        "vm: kernel {label}: {release}, vmlinux {:.1} MB",
        vmlinux.len() as f64 / 1e6
    );
    Ok(Kernel { release, dir })
}

fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// The uncompressed ELF kernel inside a bzImage. The setup header names the payload
/// (`payload_offset`/`payload_length`, boot protocol 2.08+); without it we scan for the xz or
/// zstd magic. x86 appends the uncompressed size (4 bytes) after the compressed stream.
fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    let u32_at = |at: usize| {
        bzimage
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let mut candidates: Vec<(usize, Option<usize>)> = Vec::new();
    if bzimage.get(0x202..0x206) == Some(b"HdrS") {
        let setup_sects = match bzimage.get(0x1f1).copied().unwrap_or(0) {
            0 => 4,
            n => n as usize,
        };
        let pm_start = (setup_sects + 1) * 512;
        if let (Some(offset), Some(length)) = (u32_at(0x248), u32_at(0x24c)) {
            if length > 0 {
                candidates.push((pm_start + offset, Some(length)));
            }
        }
    }
    for magic in [XZ_MAGIC, ZSTD_MAGIC] {
        if let Some(at) = find_bytes(bzimage, magic) {
            candidates.push((at, None));
        }
    }
    let mut errors = Vec::new();
    for (start, length) in candidates {
        let end = length.map_or(bzimage.len(), |l| (start + l).min(bzimage.len()));
        let Some(payload) = bzimage.get(start..end) else {
            continue;
        };
        let attempt = if payload.starts_with(XZ_MAGIC) {
            // --single-stream ignores the appended size and anything after it.
            decompress("xz", &["-dc", "--single-stream"], payload)
        } else if payload.starts_with(ZSTD_MAGIC) {
            let trimmed = if length.is_some() && payload.len() > 4 {
                &payload[..payload.len() - 4]
            } else {
                payload
            };
            decompress("zstd", &["-dcq"], trimmed)
        } else {
            Err(anyhow!(
                "payload at {start:#x} is neither xz nor zstd (magic {:02x?})",
                &payload[..payload.len().min(6)]
            ))
        };
        match attempt {
            Ok(elf) if elf.starts_with(b"\x7fELF") => return Ok(elf),
            Ok(_) => errors.push(format!("payload at {start:#x} is not an ELF")),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    bail!(
        "no xz/zstd payload decompressed to an ELF vmlinux ({}); is xz-utils/zstd installed? \
         run `cargo xtask vm-setup`",
        errors.join("; ")
    )
}

fn decompress(tool: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let path = require_tool(tool)?;
    let mut child = Command::new(path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {tool}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    ensure!(
        out.status.success(),
        "{tool} {}: {} {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

// ---------------------------------------------------------------------------------------------
// Modules

/// Module name → path (relative to the modules directory) of every module of a kernel, from
/// `modules.order`-independent walking of `kernel/`.
fn module_index(modules: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![modules.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.file_name().and_then(OsStr::to_str).unwrap_or_default();
            let Some(stem) = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                .iter()
                .find_map(|ext| name.strip_suffix(ext))
            else {
                continue;
            };
            let relative = path.strip_prefix(modules)?.to_path_buf();
            index.insert(stem.replace('-', "_"), relative);
        }
    }
    Ok(index)
}

fn builtin_modules(modules: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .filter_map(|name| name.strip_suffix(".ko"))
        .map(|name| name.replace('-', "_"))
        .collect()
}

/// A module's bytes, decompressed.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        decompress("xz", &["-dc"], &bytes)
    } else if name.ends_with(".zst") {
        decompress("zstd", &["-dcq"], &bytes)
    } else if name.ends_with(".gz") {
        decompress("gzip", &["-dc"], &bytes)
    } else {
        Ok(bytes)
    }
}

/// The `depends=` entry of a module's `.modinfo`.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let needle = b"\0depends=";
    let Some(at) = find_bytes(ko, needle) else {
        return Vec::new();
    };
    let rest = &ko[at + needle.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// The modules (decompressed) to put into an initramfs, in load order, with dependencies
/// first, read from each module's `depends=`, the same data depmod writes to modules.dep.
struct ModuleSet {
    /// (name, path relative to the modules directory ending in `.ko`, bytes)
    modules: Vec<(String, PathBuf, Vec<u8>)>,
    /// Names loaded by /init, in order.
    boot_order: Vec<String>,
}

fn resolve_modules(kernel: &Kernel) -> Result<ModuleSet> {
    let dir = kernel.modules();
    let index = module_index(&dir)?;
    let builtin = builtin_modules(&dir);
    let mut loaded: BTreeMap<String, usize> = BTreeMap::new();
    let mut set = ModuleSet {
        modules: Vec::new(),
        boot_order: Vec::new(),
    };
    #[allow(clippy::too_many_arguments)]
    fn visit(
        name: &str,
        optional: bool,
        dir: &Path,
        index: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        loaded: &mut BTreeMap<String, usize>,
        set: &mut ModuleSet,
        chain: &mut Vec<String>,
    ) -> Result<bool> {
        if loaded.contains_key(name) {
            return Ok(true);
        }
        if chain.iter().any(|c| c == name) {
            bail!("module dependency cycle: {} -> {name}", chain.join(" -> "));
        }
        let Some(relative) = index.get(name) else {
            if builtin.contains(name) {
                return Ok(false);
            }
            if optional {
                return Ok(false);
            }
            bail!("module {name} is neither a module nor built into this kernel");
        };
        let bytes = read_module(&dir.join(relative))?;
        chain.push(name.to_owned());
        for dep in module_depends(&bytes) {
            visit(&dep, false, dir, index, builtin, loaded, set, chain)
                .with_context(|| format!("a dependency of {name}"))?;
        }
        chain.pop();
        let mut ko = relative.to_string_lossy().into_owned();
        for ext in [".xz", ".zst", ".gz"] {
            if let Some(stripped) = ko.strip_suffix(ext) {
                ko = stripped.to_owned();
            }
        }
        loaded.insert(name.to_owned(), set.modules.len());
        set.modules
            .push((name.to_owned(), PathBuf::from(ko), bytes));
        Ok(true)
    }
    for (list, boot) in [(BOOT_MODULES, true), (ON_DEMAND_MODULES, false)] {
        for entry in list {
            let (name, optional) = match entry.strip_suffix('?') {
                Some(name) => (name, true),
                None => (*entry, false),
            };
            let before = set.modules.len();
            visit(
                name,
                optional,
                &dir,
                &index,
                &builtin,
                &mut loaded,
                &mut set,
                &mut Vec::new(),
            )
            .with_context(|| format!("resolving module {name} for {}", kernel.release))?;
            if boot {
                let added: Vec<String> = set.modules[before..]
                    .iter()
                    .map(|(n, _, _)| n.clone())
                    .collect();
                set.boot_order.extend(added);
            }
        }
    }
    Ok(set)
}

// ---------------------------------------------------------------------------------------------
// Initramfs

/// A cpio `newc` archive in memory.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    inode: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.inode += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }
    fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_owned());
        self.entry(path, 0o040755, &[]);
    }
    fn file(&mut self, path: &str, mode: u32, body: &[u8]) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o100000 | mode, body);
    }
    fn symlink(&mut self, path: &str, target: &str) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o120777, target.as_bytes());
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

/// The shared libraries (and dynamic loader) `ldd` lists for a binary, resolved to real files.
pub fn ldd_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Static binaries: "not a dynamic executable".
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("ldd {}: {line}", binary.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /proc /sys /dev /tmp /run /host
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /sys/fs/bpf /sys/fs/cgroup /var
ln -s /run /var/run
grep -q ' /sys/fs/bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf || echo "TOPOPROXY-VM: mounting bpffs failed"
grep -q ' /sys/fs/cgroup ' /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup || echo "TOPOPROXY-VM: mounting cgroup2 failed"
KVER=$(uname -r)
while read -r m; do
    insmod "/lib/modules/$KVER/$m" || echo "TOPOPROXY-VM: insmod $m failed"
done < /etc/topoproxy-modules
ip link set lo up
code=125
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host /host; then
    if [ -f /host/run.sh ]; then
        cd /host
        sh /host/run.sh
        code=$?
        cd /
    else
        echo "TOPOPROXY-VM: /host/run.sh missing"
        code=126
    fi
    echo "$code" > /host/exit-code
    sync
    umount /host
else
    echo "TOPOPROXY-VM: mounting the 9p share failed"
    code=124
fi
echo "TOPOPROXY-VM-EXIT $code"
byte=$code
[ "$byte" -gt 127 ] && byte=127
printf "\\$(printf %03o "$byte")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
poweroff -f
"#;

/// Builds `target/vm/initramfs-<release>.cpio.gz` for a prepared kernel.
pub fn build_initramfs(kernel: &Kernel) -> Result<PathBuf> {
    let started = Instant::now();
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "host",
        "root",
    ] {
        cpio.dir(dir);
    }
    ensure!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} not found: run `cargo xtask vm-setup` (installs busybox-static)"
    );
    let busybox = std::fs::read(BUSYBOX)?;
    ensure!(
        ldd_libraries(Path::new(BUSYBOX))?.is_empty(),
        "{BUSYBOX} is dynamically linked: install busybox-static (`cargo xtask vm-setup`)"
    );
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.symlink("bin/sh", "busybox");
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    cpio.file("etc/group", 0o644, b"root:x:0:\n");
    cpio.file(
        "etc/nsswitch.conf",
        0o644,
        b"passwd: files\ngroup: files\nhosts: files\n",
    );
    cpio.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n");
    for file in GUEST_FILES {
        match std::fs::read(file) {
            Ok(body) => cpio.file(file, 0o644, &body),
            Err(e) => println!("vm: warning: {file} not copied into the guest: {e}"),
        }
    }

    let mut libs = BTreeSet::new();
    for (name, guest) in GUEST_TOOLS {
        let host = match name.strip_suffix('?') {
            Some(optional) => match find_in_path(optional) {
                Some(host) => host,
                None => {
                    println!(
                        "vm: warning: {optional} not found on the host, the guest will lack it \
                         (run `cargo xtask vm-setup`)"
                    );
                    continue;
                }
            },
            None => require_tool(name)?,
        };
        cpio.file(guest, 0o755, &std::fs::read(&host)?);
        libs.extend(ldd_libraries(&host)?);
    }
    let shipped: BTreeSet<&str> = GUEST_TOOLS
        .iter()
        .filter(|(name, _)| find_in_path(name.trim_end_matches('?')).is_some())
        .map(|(name, _)| name.trim_end_matches('?'))
        .collect();
    for (tool, link) in GUEST_TOOL_LINKS {
        if shipped.contains(tool) {
            cpio.symlink(link, tool);
        }
    }
    if shipped.contains("iptables") {
        libs.extend(xtables_extensions(&mut cpio)?);
    }
    for lib in &libs {
        let body = std::fs::read(lib).with_context(|| format!("reading {}", lib.display()))?;
        cpio.file(&lib.to_string_lossy(), 0o755, &body);
    }

    let set = resolve_modules(kernel)?;
    let modules_root = format!("lib/modules/{}", kernel.release);
    for (_, ko, bytes) in &set.modules {
        cpio.file(&format!("{modules_root}/{}", ko.display()), 0o644, bytes);
    }
    let paths: BTreeMap<&str, &Path> = set
        .modules
        .iter()
        .map(|(n, p, _)| (n.as_str(), p.as_path()))
        .collect();
    let mut order = String::new();
    for name in &set.boot_order {
        writeln!(order, "{}", paths[name.as_str()].display())?;
    }
    cpio.file("etc/topoproxy-modules", 0o644, order.as_bytes());
    // modules.dep for the on-demand modprobe the kernel runs (e.g. ip_vs_wlc), in depmod's
    // format: "path: dep-path dep-path".
    let mut dep = String::new();
    for (_, ko, bytes) in &set.modules {
        let deps: Vec<String> = module_depends(bytes)
            .iter()
            .filter_map(|d| paths.get(d.as_str()))
            .map(|p| p.display().to_string())
            .collect();
        writeln!(dep, "{}: {}", ko.display(), deps.join(" "))?;
    }
    cpio.file(
        &format!("{modules_root}/modules.dep"),
        0o644,
        dep.as_bytes(),
    );
    for extra in ["modules.builtin", "modules.order"] {
        if let Ok(body) = std::fs::read(kernel.modules().join(extra)) {
            cpio.file(&format!("{modules_root}/{extra}"), 0o644, &body);
        }
    }

    let archive = cpio.finish();
    let out = kernel.initramfs();
    std::fs::create_dir_all(vm_dir())?;
    let gz = compress_gzip(&archive)?;
    // Per-process temporary name: several worktrees may build the same image at once.
    let tmp = out.with_extension(format!("gz.tmp{}", std::process::id()));
    std::fs::write(&tmp, &gz)?;
    std::fs::rename(&tmp, &out)?;
    println!(
        "vm: initramfs {} ({} modules, {:.1} MB) in {:.1} s",
        out.display(),
        set.modules.len(),
        gz.len() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// Copies the iptables extensions into the initramfs; returns the libraries they need.
fn xtables_extensions(cpio: &mut Cpio) -> Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(XTABLES_EXTENSIONS) else {
        println!("vm: warning: {XTABLES_EXTENSIONS} missing, iptables in the guest has no matches");
        return Ok(libs);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(OsStr::to_str) != Some("so") {
            continue;
        }
        let body = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        cpio.file(&path.to_string_lossy(), 0o644, &body);
        libs.extend(ldd_libraries(&path)?);
    }
    Ok(libs)
}

fn compress_gzip(data: &[u8]) -> Result<Vec<u8>> {
    decompress("gzip", &["-c", "-6", "-n"], data).context("gzip of the initramfs")
}

/// Hash of everything an initramfs is built from besides the kernel: the init script, the
/// module and tool lists, and the size and modification time of busybox and each host tool.
fn initramfs_inputs_hash() -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    // `DefaultHasher::new` uses fixed keys: stable for one toolchain, enough for a cache name.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    INIT.hash(&mut hasher);
    BOOT_MODULES.hash(&mut hasher);
    ON_DEMAND_MODULES.hash(&mut hasher);
    GUEST_TOOLS.hash(&mut hasher);
    GUEST_TOOL_LINKS.hash(&mut hasher);
    GUEST_FILES.hash(&mut hasher);
    let files = std::iter::once(PathBuf::from(BUSYBOX)).chain(
        GUEST_TOOLS
            .iter()
            .filter_map(|(name, _)| find_in_path(name.trim_end_matches('?'))),
    );
    for file in files {
        file.hash(&mut hasher);
        if let Ok(meta) = std::fs::metadata(&file) {
            meta.len().hash(&mut hasher);
            meta.modified().ok().hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// The initramfs for a kernel, built when no image for the current inputs exists yet.
pub fn ensure_initramfs(kernel: &Kernel) -> Result<PathBuf> {
    let out = kernel.initramfs();
    if out.is_file() {
        Ok(out)
    } else {
        build_initramfs(kernel)
    }
}

// ---------------------------------------------------------------------------------------------
// Shares and runs

/// Copies a host binary and the libraries `ldd` lists for it into `share`: the binary to
/// `share/bin/<name>`, the libraries to `share/lib/`. Returns the path to run it inside the
/// VM; `run.sh` from [`write_run_script`] sets `LD_LIBRARY_PATH=/host/lib`.
pub fn stage_binary(share: &Path, path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .and_then(OsStr::to_str)
        .with_context(|| format!("{} has no file name", path.display()))?;
    let bin = share.join("bin");
    let lib = share.join("lib");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&lib)?;
    link_or_copy(path, &bin.join(name))?;
    for library in ldd_libraries(path)? {
        let file = library.file_name().context("library name")?;
        // std::fs::copy follows symlinks, so the copy holds the real library.
        std::fs::copy(&library, lib.join(file))
            .with_context(|| format!("copying {} into the share", library.display()))?;
    }
    Ok(format!("/host/bin/{name}"))
}

/// Hard-links `from` to `to` (test executables are hundreds of megabytes and the share sits in
/// the same target directory), copying when a link cannot be made (another filesystem).
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} into the share", from.display()))
}

/// Writes `share/run.sh`: exits on the first failing command; binaries staged with
/// [`stage_binary`] find their libraries.
pub fn write_run_script(share: &Path, body: &str) -> Result<()> {
    let script = format!(
        "#!/bin/sh\nset -e\nexport LD_LIBRARY_PATH=/host/lib\nexport PATH=/usr/sbin:/usr/bin:/sbin:/bin\n{body}\n"
    );
    std::fs::write(share.join("run.sh"), script).context("writing run.sh into the share")
}

/// How a VM is booted beyond kernel, share and timeout.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest memory in MiB. 1 GiB leaves room for the agent at 10,000 Services.
    pub memory_mib: u32,
    /// Extra host folders exported read-only over 9p as `(mount tag, host path)`; `run.sh`
    /// mounts them (`mount -t 9p -o trans=virtio,version=9p2000.L,ro TAG DIR`).
    pub read_only_shares: Vec<(String, PathBuf)>,
    /// A virtio NIC on QEMU's user networking: the guest is 10.0.2.15 and reaches the host's
    /// loopback at [`HOST_ADDRESS`] (QEMU opens the guest's connections there from the host).
    /// `run.sh` brings it up (see [`UPLINK_UP`]).
    pub user_network: bool,
}

/// The host's loopback as the guest sees it over QEMU's user networking.
pub const HOST_ADDRESS: &str = "10.0.2.2";

/// Shell lines that configure the guest's uplink (QEMU's user-network defaults, no DHCP).
/// No default route, v4 or v6 (slirp sends router advertisements: they are ignored): the guest
/// reaches only 10.0.2.0/24 (the host at 10.0.2.2), so a VIP or a real server the other VM tests
/// expect to be unroutable stays unroutable when they share the boot with the parity tests.
pub const UPLINK_UP: &str = "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_ra && \
echo 0 > /proc/sys/net/ipv6/conf/eth0/autoconf && \
/usr/sbin/ip link set eth0 up && \
/usr/sbin/ip addr add 10.0.2.15/24 dev eth0 || echo 'TOPOPROXY-VM: the uplink failed'
";

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            memory_mib: 1024,
            read_only_shares: Vec::new(),
            user_network: false,
        }
    }
}

/// Boots `kernel_version` (a label from [`KERNELS`]) with `share_dir` mounted at `/host`, runs
/// `/host/run.sh` and returns its exit status and the console. QEMU is killed when `timeout`
/// passes.
pub fn run_in_vm(kernel_version: &str, share_dir: &Path, timeout: Duration) -> Result<VmOutcome> {
    run_in_vm_with(kernel_version, share_dir, timeout, &VmOptions::default())
}

/// The 9p `-virtfs` argument for a host folder.
fn virtfs_arg(tag: &str, path: &Path, read_only: bool) -> Result<String> {
    let path = path
        .canonicalize()
        .with_context(|| format!("share directory {}", path.display()))?;
    let path = path.to_str().context("share path is not UTF-8")?;
    ensure!(
        !path.contains(','),
        "share path {path} contains a comma, which -virtfs cannot take"
    );
    let mut arg = format!("local,path={path},mount_tag={tag},security_model=none");
    if read_only {
        arg.push_str(",readonly=on");
    }
    Ok(arg)
}

/// [`run_in_vm`] with explicit [`VmOptions`].
pub fn run_in_vm_with(
    kernel_version: &str,
    share_dir: &Path,
    timeout: Duration,
    options: &VmOptions,
) -> Result<VmOutcome> {
    let qemu = require_tool(QEMU)?;
    let kernel = ensure_kernel(kernel_version)?;
    let initramfs = ensure_initramfs(&kernel)?;
    let share = share_dir
        .canonicalize()
        .with_context(|| format!("share directory {}", share_dir.display()))?;
    ensure!(
        share.join("run.sh").is_file(),
        "{} has no run.sh (see write_run_script)",
        share.display()
    );
    let exit_file = share.join("exit-code");
    let _ = std::fs::remove_file(&exit_file);
    let mut qemu_cmd = Command::new(&qemu);
    qemu_cmd
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .arg("-m")
        .arg(format!("{}M", options.memory_mib))
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(kernel.vmlinux())
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-virtfs")
        .arg(virtfs_arg("host", &share, false)?);
    for (tag, path) in &options.read_only_shares {
        qemu_cmd.arg("-virtfs").arg(virtfs_arg(tag, path, true)?);
    }
    let mut child = qemu_cmd
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .args(if options.user_network {
            // The tests connect only to HOST_ADDRESS (the host's loopback). `restrict=on`
            // would cut that too, and a guestfwd chardev carries one connection at a time.
            // `romfile=`: no iPXE option ROM to load at boot.
            vec![
                "-netdev",
                "user,id=uplink",
                "-device",
                "virtio-net-pci,netdev=uplink,romfile=",
            ]
        } else {
            vec!["-nic", "none"]
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let console = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let console = Arc::clone(&console);
        readers.push(std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 8192];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                console
                    .lock()
                    .map(|mut c| c.extend_from_slice(&buf[..n]))
                    .ok();
            }
        }));
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for reader in readers {
        let _ = reader.join();
    }
    let console_log = {
        let bytes = console.lock().map(|c| c.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    };
    let Some(status) = status else {
        bail!(
            "the VM ({kernel_version}, {}) did not finish within {:?}; QEMU was killed. \
             Console tail:\n{}",
            kernel.release,
            timeout,
            tail(&console_log, 30)
        );
    };
    let from_file = std::fs::read_to_string(&exit_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let from_marker = console_log.lines().rev().find_map(|line| {
        line.trim()
            .strip_prefix(EXIT_MARKER)?
            .trim()
            .parse::<i32>()
            .ok()
    });
    let exit_code = from_file.or(from_marker).ok_or_else(|| {
        anyhow!(
            "the VM ({kernel_version}, {}) stopped ({status}) without reporting an exit code \
             (no {} and no {EXIT_MARKER} line). Console tail:\n{}",
            kernel.release,
            exit_file.display(),
            tail(&console_log, 30)
        )
    })?;
    Ok(VmOutcome {
        exit_code,
        console_log,
    })
}

// ---------------------------------------------------------------------------------------------
// vm-test

const SMOKE: &str = "\
/usr/sbin/ip link add kube-ipvs0 type dummy
/usr/sbin/ip addr add 10.96.0.10/32 dev kube-ipvs0
/usr/sbin/ipvsadm -A -t 10.96.0.10:53 -s rr
/usr/sbin/ipvsadm -Ln > /host/ipvsadm-Ln.txt
cat /host/ipvsadm-Ln.txt
/usr/sbin/ipvsadm -C
$STAGED -r > /host/staged.txt
/usr/sbin/ipvsadm -A -t 10.96.0.10:80
/usr/sbin/ipvsadm -Ln | grep -q 'TCP  10.96.0.10:80 wlc'
/usr/sbin/ipvsadm -C
echo 1 > /proc/sys/net/ipv4/vs/conntrack
grep -q '^bpf /sys/fs/bpf bpf' /proc/mounts
grep -q ' /sys/fs/cgroup cgroup2' /proc/mounts
if [ -x /usr/sbin/nft ]; then
    /usr/sbin/nft add table inet topoproxy-smoke
    /usr/sbin/nft add chain inet topoproxy-smoke post '{ type nat hook postrouting priority srcnat; }'
    /usr/sbin/nft add rule inet topoproxy-smoke post ct state new masquerade
    /usr/sbin/nft delete table inet topoproxy-smoke
fi
if [ -x /usr/sbin/conntrack ]; then /usr/sbin/conntrack -L > /dev/null; fi
echo ok > /host/smoke-done.txt
";

const SMOKE_EXPECT: &str = "TCP  10.96.0.10:53 rr";

/// Boots `label` and checks the basics every VM test relies on: modules, `ipvsadm`, a dummy
/// link, the 9p share and a staged glibc binary.
pub fn smoke_test(label: &str, timeout: Duration) -> Result<()> {
    let share = vm_dir().join(format!("share-smoke-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share)?;
    // A glibc binary from the host, run from the share with its own libraries: the path
    // test binaries take.
    let staged = stage_binary(&share, Path::new("/usr/bin/uname"))?;
    write_run_script(&share, &SMOKE.replace("$STAGED", &staged))?;
    let outcome = run_in_vm(label, &share, timeout)?;
    let listing = std::fs::read_to_string(share.join("ipvsadm-Ln.txt")).unwrap_or_default();
    let staged = std::fs::read_to_string(share.join("staged.txt")).unwrap_or_default();
    let release = std::fs::read_to_string(label_file(label)).unwrap_or_default();
    if outcome.exit_code != 0 || !listing.contains(SMOKE_EXPECT) {
        bail!(
            "run.sh exited {}; ipvsadm -Ln {} `{SMOKE_EXPECT}`. Console tail:\n{}",
            outcome.exit_code,
            if listing.contains(SMOKE_EXPECT) {
                "shows"
            } else {
                "does not show"
            },
            tail(&outcome.console_log, 30)
        );
    }
    ensure!(
        staged.trim() == release.trim(),
        "the staged binary printed `{}`, expected the kernel release `{}`. Console tail:\n{}",
        staged.trim(),
        release.trim(),
        tail(&outcome.console_log, 30)
    );
    ensure!(
        share.join("smoke-done.txt").is_file(),
        "the smoke script stopped before its end (nft, conntrack, bpffs or cgroup2 check). \
         Console tail:\n{}",
        tail(&outcome.console_log, 30)
    );
    let _ = std::fs::remove_dir_all(&share);
    Ok(())
}
