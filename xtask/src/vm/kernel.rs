//! Debian's kernels fetched with apt without installing them, unpacked and cached.

use super::*;

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
    pub(super) fn modules(&self) -> PathBuf {
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

pub(super) fn kernels_dir() -> PathBuf {
    vm_dir().join("kernels")
}

/// The file recording which kernel release a label resolved to, so later runs need no apt.
pub(super) fn label_file(label: &str) -> PathBuf {
    kernels_dir().join(format!("{label}.release"))
}

/// The apt package holding the kernel image for a label.
pub(super) fn kernel_package(label: &str) -> Result<String> {
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
pub(super) fn metapackage_image(meta: &str, prefix: &str) -> Result<String> {
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
pub(super) fn newest_612_image() -> Result<String> {
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
pub(super) fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    pub(super) fn parts(s: &str) -> Vec<u64> {
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

pub(super) fn fetch_kernel(label: &str) -> Result<Kernel> {
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

pub(super) fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub(super) const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
pub(super) const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// The uncompressed ELF kernel inside a bzImage. The setup header names the payload
/// (`payload_offset`/`payload_length`, boot protocol 2.08+); without it we scan for the xz or
/// zstd magic. x86 appends the uncompressed size (4 bytes) after the compressed stream.
pub(super) fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
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

pub(super) fn decompress(tool: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
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
