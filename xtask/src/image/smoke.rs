//! The in-image smoke test, without a registry or a container engine: the image's layers are
//! unpacked in manifest order into a fresh root (each layer's digest and diff ID checked on the
//! way), the example cluster is copied beside them (test data, not part of the image), and the
//! image's own programs run inside that root with `unshare --net --mount --root`, in a network
//! namespace of their own so nothing on the host is touched.

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};
use ocidir::oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};

/// The image's programs.
const PROGRAMS: &[&str] = &[
    "/usr/local/bin/topoproxy",
    "/usr/sbin/nft",
    "/sbin/ipvsadm",
    "/usr/sbin/conntrack",
];

/// glibc's loader in the image (every program's PT_INTERP).
const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";

/// A root directory removed on drop, also when a check fails.
struct Root(PathBuf);

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What the smoke test expects the programs to say.
pub struct Expectations<'a> {
    /// The exact `topoproxy --version` line.
    pub version_line: &'a str,
    /// `topoproxy plan` of the same cluster and node run outside the image.
    pub host_plan: &'a str,
    pub node: &'a str,
}

/// Unpacks the image at `layout` under `scratch`, runs the checks, removes the root.
pub fn smoke_test(
    layout: &Path,
    scratch: &Path,
    cluster: &Path,
    expect: &Expectations<'_>,
) -> Result<()> {
    let root = Root(scratch.join("rootfs"));
    let _ = fs::remove_dir_all(&root.0);
    fs::create_dir_all(&root.0).with_context(|| format!("creating {}", root.0.display()))?;
    unpack(layout, &root.0)?;
    copy_dir(cluster, &root.0.join("examples/cluster"))?;

    let version = run_in(&root.0, &["/usr/local/bin/topoproxy", "--version"])?;
    ensure!(
        version.trim_end() == expect.version_line,
        "topoproxy --version in the image said {version:?}, expected {:?}",
        expect.version_line
    );
    println!("image check: topoproxy --version: {}", version.trim_end());

    let plan = run_in(
        &root.0,
        &[
            "/usr/local/bin/topoproxy",
            "plan",
            "--source",
            "/examples/cluster",
            "--node",
            expect.node,
        ],
    )?;
    ensure!(
        plan == expect.host_plan,
        "topoproxy plan in the image differs from the same plan on the host:\n{plan}\n--- host:\n{}",
        expect.host_plan
    );
    ensure!(
        plan.starts_with("IP Virtual Server version"),
        "unexpected plan output:\n{plan}"
    );
    println!(
        "image check: topoproxy plan --node {}: {} lines, same as on the host",
        expect.node,
        plan.lines().count()
    );

    // Every program's libraries resolve inside the image: glibc's loader of the image lists
    // them and fails on any it cannot find.
    for program in PROGRAMS {
        let listing = run_in(&root.0, &[LOADER, "--list", program])?;
        ensure!(
            !listing.contains("not found"),
            "{program} in the image misses libraries:\n{listing}"
        );
    }
    println!(
        "image check: the image's loader resolves every library of {}",
        PROGRAMS.join(", ")
    );

    for (command, expected) in [
        (&["/usr/sbin/nft", "--version"][..], "nftables v1.0.6"),
        (
            &["/usr/sbin/conntrack", "--version"][..],
            "conntrack v1.4.7",
        ),
    ] {
        let output = run_in(&root.0, command)?;
        ensure!(
            output.contains(expected),
            "{} in the image said {output:?}, expected {expected:?}",
            command.join(" ")
        );
        println!("image check: {}: {}", command.join(" "), output.trim_end());
    }
    ipvsadm_version(&root.0)?;
    // nft talking to the kernel (nf_tables netlink) in the check's own network namespace:
    // libnftables and every library behind it load and work, not only the version banner.
    let ruleset = run_in(&root.0, &["/usr/sbin/nft", "list", "ruleset"])?;
    ensure!(
        ruleset.trim().is_empty(),
        "a fresh network namespace has rules? {ruleset}"
    );
    println!("image check: nft list ruleset in a fresh network namespace: empty, exit 0");
    Ok(())
}

/// `ipvsadm --version` asks the kernel for the IPVS version, so it succeeds only where ip_vs
/// exists. On a kernel without IPVS (this project's CI host) the one accepted failure is
/// ipvsadm's own "Can't initialize ipvs": the binary and its libraries loaded and ran.
fn ipvsadm_version(root: &Path) -> Result<()> {
    let output = run_in_unchecked(root, &["/sbin/ipvsadm", "--version"])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        ensure!(
            stdout.contains("ipvsadm v1.31"),
            "ipvsadm --version said {stdout:?}"
        );
        println!("image check: ipvsadm --version: {}", stdout.trim_end());
        return Ok(());
    }
    ensure!(
        stderr.contains("Can't initialize ipvs"),
        "ipvsadm --version in the image failed ({}): {stderr}",
        output.status
    );
    println!(
        "image check: ipvsadm --version: ran, and says this kernel has no IPVS ({}); the version \
         line needs a kernel with ip_vs",
        stderr.lines().next().unwrap_or_default()
    );
    Ok(())
}

/// Each layer of the image's one manifest, in order, into `root`.
fn unpack(layout: &Path, root: &Path) -> Result<()> {
    let index = ImageIndex::from_file(layout.join("index.json")).context("reading index.json")?;
    let [descriptor] = index.manifests().as_slice() else {
        bail!("index.json should name exactly one manifest");
    };
    let manifest = ImageManifest::from_file(blob(layout, descriptor.digest().as_ref()))
        .context("reading the manifest")?;
    let config = ImageConfiguration::from_file(blob(layout, manifest.config().digest().as_ref()))
        .context("reading the config")?;
    let diff_ids = config.rootfs().diff_ids();
    ensure!(
        diff_ids.len() == manifest.layers().len(),
        "config lists {} diff IDs for {} layers",
        diff_ids.len(),
        manifest.layers().len()
    );
    for (layer, diff_id) in manifest.layers().iter().zip(diff_ids) {
        let digest = layer.digest().to_string();
        let compressed =
            fs::read(blob(layout, &digest)).with_context(|| format!("reading {digest}"))?;
        ensure!(
            format!("sha256:{:x}", Sha256::digest(&compressed)) == digest,
            "layer blob {digest} does not match its digest"
        );
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(compressed.as_slice())
            .read_to_end(&mut tar_bytes)
            .with_context(|| format!("decompressing {digest}"))?;
        ensure!(
            &format!("sha256:{:x}", Sha256::digest(&tar_bytes)) == diff_id,
            "layer {digest} does not match its diff ID {diff_id}"
        );
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        archive.set_preserve_permissions(true);
        archive
            .unpack(root)
            .with_context(|| format!("unpacking {digest} into {}", root.display()))?;
    }
    Ok(())
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap_or(digest))
}

/// Runs `command` inside `root` in new network and mount namespaces, with only the image's
/// PATH; returns stdout, fails with stderr on a non-zero exit.
fn run_in(root: &Path, command: &[&str]) -> Result<String> {
    let output = run_in_unchecked(root, command)?;
    ensure!(
        output.status.success(),
        "{} in the image failed ({}): {}",
        command.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn run_in_unchecked(root: &Path, command: &[&str]) -> Result<std::process::Output> {
    Command::new("unshare")
        .args(["--net", "--mount", "--root"])
        .arg(root)
        .args(["--wd", "/"])
        .args(command)
        .env_clear()
        .env("PATH", super::IMAGE_PATH)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("running unshare for {}", command.join(" ")))
}

/// Copies the tree `from` to `to` (files and directories; what the image and release tasks copy
/// holds no links).
pub(crate) fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry.with_context(|| format!("listing {}", from.display()))?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
