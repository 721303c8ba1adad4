//! `cargo xtask image`: topoproxy's container image, built without a container engine.
//!
//! Two layers, bottom first:
//! 1. Debian 12's `nft`, `ipvsadm` and `conntrack` with exactly the shared libraries they and
//!    the agent load, glibc's loader, and the packages' copyright files (`debian.rs`);
//! 2. the release `topoproxy` binary (its eBPF object embedded) at /usr/local/bin/topoproxy.
//!
//! The agent changes with every release, the tools with Debian point releases only, so nodes
//! pulling a new release fetch the small top layer again, not the tools.
//!
//! Written as an OCI image layout (`oci/`), one tarball that is both an `oci-archive` and a
//! `docker-archive`, and an SPDX SBOM beside them (`sbom.rs`). Reproducible: every tar entry
//! has uid/gid 0 and the SOURCE_DATE_EPOCH mtime (default: the commit time of HEAD), entries
//! are sorted, the config has no timestamps, gzip writes no name or time; the same binary and
//! packages give the same digest, which `--check` verifies by building twice before running
//! the smoke test (`smoke.rs`).
//!
//! Who the container runs as: uid 0, no shell, entrypoint /usr/local/bin/topoproxy. The
//! manifests grant what each mode needs on top (IPVS: NET_ADMIN only, every other capability
//! dropped; eBPF: BPF, NET_ADMIN, PERFMON, SYS_ADMIN, SYS_RESOURCE; shadow: uid 65532 and no
//! capability at all), with a read-only root filesystem: the image needs nothing writable.

mod debian;
pub(crate) mod layer;
mod oci;
mod sbom;
pub(crate) mod smoke;
pub(crate) mod test_images;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context as _, Result};
use sha2::{Digest as _, Sha256};

use crate::workspace_root;

/// The name the manifests and the chart pull (`manifests/base/kustomization.yaml`,
/// `charts/topoproxy/values.yaml`); the tag is `v` + the agent's version.
pub const IMAGE_REPOSITORY: &str = "ghcr.io/topoproxy/topoproxy";

/// `org.opencontainers.image.source`.
pub const IMAGE_SOURCE: &str = "https://github.com/topoproxy/topoproxy";

/// PATH in the image (the tools live in /sbin and /usr/sbin).
pub const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const AGENT_PATH: &str = "/usr/local/bin/topoproxy";

/// `cargo xtask image` options.
pub struct ImageOptions {
    /// Output directory; default `<target>/image`.
    pub out: Option<PathBuf>,
    /// A topoproxy binary to use instead of building the release one.
    pub binary: Option<PathBuf>,
    /// Build twice and compare digests, then run the smoke test.
    pub check: bool,
}

/// What `cargo xtask image` produced (`cargo xtask release` packs these).
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub reference: String,
    pub manifest_digest: String,
    pub layout: PathBuf,
    pub archive: PathBuf,
    pub sbom: PathBuf,
    pub version: String,
}

pub fn image(options: &ImageOptions) -> Result<BuiltImage> {
    let workspace = workspace_root();
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| crate::target_dir().join("image"));
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let binary = match &options.binary {
        Some(binary) => binary.clone(),
        None => build_release_binary()?,
    };
    let inputs = Inputs::gather(&workspace, &binary)?;
    let built = build_into(&inputs, &out)?;
    if options.check {
        check(&inputs, &built, &out, &workspace)?;
    }
    Ok(built)
}

/// Everything the image is made of, read once: two builds from the same inputs must agree.
struct Inputs {
    binary: PathBuf,
    version: String,
    revision: String,
    source_date_epoch: u64,
    packages: Vec<debian::Package>,
    debian_files: Vec<debian::ImageFile>,
    crates: Vec<sbom::CrateEntry>,
}

impl Inputs {
    fn gather(workspace: &Path, binary: &Path) -> Result<Self> {
        let crates = sbom::crates_in(workspace, &["topoproxy", "topoproxy-ebpf"])?;
        let version = crates
            .iter()
            .find(|entry| entry.name == "topoproxy" && entry.source.is_none())
            .map(|entry| entry.version.clone())
            .context("the topoproxy crate is missing from cargo metadata")?;
        let packages = debian::fetch(&crate::target_dir().join("image-cache"))?;
        let debian_files = debian::closure(&packages, &[binary.to_path_buf()])?;
        Ok(Self {
            binary: binary.to_path_buf(),
            version,
            revision: git(workspace, &["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into()),
            source_date_epoch: source_date_epoch(workspace)?,
            packages,
            debian_files,
            crates,
        })
    }

    fn spec(&self) -> oci::ImageSpec {
        oci::ImageSpec {
            repository: IMAGE_REPOSITORY.to_owned(),
            tag: format!("v{}", self.version),
            entrypoint: vec![AGENT_PATH.to_owned()],
            user: "0:0".to_owned(),
            env: vec![format!("PATH={IMAGE_PATH}")],
            labels: vec![
                ("org.opencontainers.image.title".into(), "topoproxy".into()),
                (
                    "org.opencontainers.image.description".into(),
                    "Topology-aware kube-proxy replacement (IPVS or eBPF dataplane)".into(),
                ),
                (
                    "org.opencontainers.image.version".into(),
                    self.version.clone(),
                ),
                (
                    "org.opencontainers.image.revision".into(),
                    self.revision.clone(),
                ),
                (
                    "org.opencontainers.image.source".into(),
                    IMAGE_SOURCE.into(),
                ),
                (
                    "org.opencontainers.image.licenses".into(),
                    "Apache-2.0".into(),
                ),
                (
                    "org.opencontainers.image.base.name".into(),
                    "scratch".into(),
                ),
            ],
            mtime: self.source_date_epoch,
        }
    }

    fn layers(&self) -> Result<[layer::LayerTree; 2]> {
        let mut tools = layer::LayerTree::default();
        for file in &self.debian_files {
            tools.add_file(&file.image_path, &file.source)?;
        }
        let mut agent = layer::LayerTree::default();
        agent.add_file(Path::new(AGENT_PATH), &self.binary)?;
        Ok([tools, agent])
    }
}

fn build_into(inputs: &Inputs, out: &Path) -> Result<BuiltImage> {
    let spec = inputs.spec();
    let [tools, agent] = inputs.layers()?;
    let pinned: Vec<String> = inputs
        .packages
        .iter()
        .map(|package| format!("{}={}", package.name, package.version))
        .collect();
    let layers = [
        oci::LayerInput {
            tree: &tools,
            created_by: format!("debian 12 packages: {}", pinned.join(" ")),
        },
        oci::LayerInput {
            tree: &agent,
            created_by: format!("topoproxy {} (git {})", inputs.version, inputs.revision),
        },
    ];
    let layout = out.join("oci");
    let written = oci::write_layout(&layout, &spec, &layers)?;
    let archive = out.join(format!("topoproxy-image-{}.tar", spec.tag));
    oci::write_archive(&layout, &written, &spec, &archive)?;
    let manifest_digest = written.manifest.digest().to_string();
    let sbom_path = out.join(format!("topoproxy-image-{}.spdx.json", spec.tag));
    let document = sbom::spdx(&sbom::SbomInput {
        image_reference: &spec.reference(),
        manifest_digest: &manifest_digest,
        version: &inputs.version,
        source_date_epoch: inputs.source_date_epoch,
        crates: &inputs.crates,
        packages: &inputs.packages,
    });
    fs::write(
        &sbom_path,
        serde_json::to_vec_pretty(&document).context("serializing the SBOM")?,
    )
    .with_context(|| format!("writing {}", sbom_path.display()))?;

    let report = report(&spec, &written, &[&tools, &agent], inputs, &archive)?;
    fs::write(out.join("image-report.txt"), &report).context("writing image-report.txt")?;
    print!("{report}");
    println!("image: layout {}", layout.display());
    println!(
        "image: archive {} (podman load -i / ctr images import / docker load -i)",
        archive.display()
    );
    println!("image: SBOM {} (SPDX 2.3)", sbom_path.display());
    Ok(BuiltImage {
        reference: spec.reference(),
        manifest_digest,
        layout,
        archive,
        sbom: sbom_path,
        version: inputs.version.clone(),
    })
}

fn report(
    spec: &oci::ImageSpec,
    written: &oci::WrittenImage,
    trees: &[&layer::LayerTree],
    inputs: &Inputs,
    archive: &Path,
) -> Result<String> {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let mut text = format!(
        "image {}\n  manifest digest {}\n  config digest   {}\n  SOURCE_DATE_EPOCH {}\n",
        spec.reference(),
        written.manifest.digest(),
        written.config_digest,
        spec.mtime
    );
    let names = ["Debian tools and libraries", "topoproxy binary"];
    let (mut total_compressed, mut total_unpacked) = (0, 0);
    for ((name, tree), (digest, compressed)) in names.iter().zip(trees).zip(&written.layers) {
        let unpacked = tree.file_bytes()?;
        total_compressed += compressed;
        total_unpacked += unpacked;
        text += &format!(
            "  layer {name}: {:.2} MiB compressed, {:.2} MiB unpacked, {} entries ({digest})\n",
            mib(*compressed),
            mib(unpacked),
            tree.entries().count()
        );
    }
    text += &format!(
        "  total: {:.2} MiB compressed ({total_compressed} bytes), {:.2} MiB unpacked ({total_unpacked} bytes)\n",
        mib(total_compressed),
        mib(total_unpacked)
    );
    text += &format!(
        "  archive {} bytes, sha256 {}\n  Debian packages:\n",
        fs::metadata(archive)
            .context("reading the archive size")?
            .len(),
        file_sha256(archive)?
    );
    for (package, files) in debian::files_by_package(&inputs.debian_files) {
        let version = inputs
            .packages
            .iter()
            .find(|p| p.name == package)
            .map(|p| p.version.as_str())
            .unwrap_or("?");
        let listed: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        text += &format!("    {package}={version}: {}\n", listed.join(" "));
    }
    Ok(text)
}

/// Builds the image a second time into `out/check` and compares, then runs the smoke test.
fn check(inputs: &Inputs, first: &BuiltImage, out: &Path, workspace: &Path) -> Result<()> {
    println!("image check: building a second time from the same inputs");
    let second = build_into(inputs, &out.join("check"))?;
    ensure!(
        first.manifest_digest == second.manifest_digest,
        "not reproducible: manifest digest {} then {}",
        first.manifest_digest,
        second.manifest_digest
    );
    let (first_sum, second_sum) = (file_sha256(&first.archive)?, file_sha256(&second.archive)?);
    ensure!(
        first_sum == second_sum,
        "not reproducible: archive sha256 {first_sum} then {second_sum}"
    );
    ensure!(
        fs::read(&first.sbom)? == fs::read(&second.sbom)?,
        "not reproducible: the SBOMs differ"
    );
    println!(
        "image check: reproducible: both builds have manifest digest {} and archive sha256 {first_sum}",
        first.manifest_digest
    );
    let _ = fs::remove_dir_all(out.join("check"));

    let node = "node-b1";
    let cluster = workspace.join("examples/cluster");
    let host_plan = host_output(
        &inputs.binary,
        &[
            "plan",
            "--source",
            &cluster.display().to_string(),
            "--node",
            node,
        ],
    )?;
    let version_line = host_output(&inputs.binary, &["--version"])?;
    smoke::smoke_test(
        &first.layout,
        out,
        &cluster,
        &smoke::Expectations {
            version_line: version_line.trim_end(),
            host_plan: &host_plan,
            node,
        },
    )?;
    println!("image check: passed");
    Ok(())
}

fn host_output(binary: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(binary)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    ensure!(
        output.status.success(),
        "{} {} failed: {}",
        binary.display(),
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `cargo build --release -p topoproxy --bin topoproxy` (needs bpf-linker for the eBPF object).
pub fn build_release_binary() -> Result<PathBuf> {
    crate::cargo(
        &[
            "build",
            "--release",
            "--locked",
            "-p",
            "topoproxy",
            "--bin",
            "topoproxy",
        ],
        &[],
    )?;
    Ok(crate::target_dir().join("release/topoproxy"))
}

/// SOURCE_DATE_EPOCH if set, else the commit time of HEAD, else 0 (no git).
fn source_date_epoch(workspace: &Path) -> Result<u64> {
    if let Ok(value) = std::env::var("SOURCE_DATE_EPOCH") {
        return value
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={value:?} is not a number of seconds"));
    }
    Ok(git(workspace, &["log", "-1", "--format=%ct"])
        .and_then(|line| line.parse().ok())
        .unwrap_or(0))
}

pub fn git(workspace: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(workspace)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let line = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (!line.is_empty()).then_some(line)
}

pub fn file_sha256(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", hasher.finalize()))
}
