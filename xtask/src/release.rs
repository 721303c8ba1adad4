//! `cargo xtask release`: what a release publishes, in `<target>/release-artifacts/vX.Y.Z/`:
//!
//! - `topoproxy-vX.Y.Z-x86_64-linux-gnu.tar.gz`: the release binary and README.md;
//! - the image archive and its SBOM (`cargo xtask image`), and `image-digest.txt`;
//! - `topoproxy-X.Y.Z.tgz`: the chart (`helm package`) with `image.digest` set to the image
//!   just built, so a release installs exactly that image;
//! - `SHA256SUMS` over all of them (`sha256sum -c SHA256SUMS` checks them).
//!
//! The tarballs are reproducible like the image (sorted entries, uid/gid 0,
//! SOURCE_DATE_EPOCH mtimes, gzip without name or time).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context as _, Result};

use crate::image::{self, layer};
use crate::tools;

pub struct ReleaseOptions {
    pub binary: Option<PathBuf>,
    /// Also run `cargo xtask image --check` on the image.
    pub check: bool,
}

pub fn release(options: &ReleaseOptions) -> Result<()> {
    let helm = tools::tool("helm")?;
    let workspace = crate::workspace_root();
    let binary = match &options.binary {
        Some(binary) => binary.clone(),
        None => image::build_release_binary()?,
    };
    let staging = crate::target_dir().join("release-staging");
    let built = image::image(&image::ImageOptions {
        out: Some(staging.join("image")),
        binary: Some(binary.clone()),
        check: options.check,
    })?;
    let version = built.version.clone();
    check_chart_version(&workspace.join("charts/topoproxy/Chart.yaml"), &version)?;
    let out = crate::target_dir()
        .join("release-artifacts")
        .join(format!("v{version}"));
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let mtime = mtime_of(&built)?;
    let binary_tarball = out.join(format!("topoproxy-v{version}-x86_64-linux-gnu.tar.gz"));
    write_binary_tarball(
        &binary_tarball,
        &binary,
        &workspace.join("README.md"),
        &version,
        mtime,
    )?;

    let mut artifacts = vec![binary_tarball];
    for source in [&built.archive, &built.sbom] {
        let name = source
            .file_name()
            .context("image artifact without a name")?;
        let target = out.join(name);
        fs::copy(source, &target).with_context(|| format!("copying {}", source.display()))?;
        artifacts.push(target);
    }
    let digest_file = out.join("image-digest.txt");
    fs::write(
        &digest_file,
        format!("{}@{}\n", built.reference, built.manifest_digest),
    )
    .context("writing image-digest.txt")?;
    artifacts.push(digest_file);
    artifacts.push(package_chart(
        &helm,
        &workspace,
        &staging,
        &out,
        &built.manifest_digest,
    )?);

    let mut sums = String::new();
    for artifact in &artifacts {
        let name = artifact
            .file_name()
            .and_then(|n| n.to_str())
            .context("artifact name")?;
        sums += &format!("{}  {name}\n", image::file_sha256(artifact)?);
    }
    fs::write(out.join("SHA256SUMS"), &sums).context("writing SHA256SUMS")?;
    let _ = fs::remove_dir_all(&staging);
    println!("release v{version} in {}:", out.display());
    print!("{sums}");
    Ok(())
}

/// The chart's version and appVersion must be the agent's: the chart's default tag is
/// `v` + appVersion, the image's tag `v` + the agent's version.
fn check_chart_version(chart_yaml: &Path, version: &str) -> Result<()> {
    let text = fs::read_to_string(chart_yaml).context("reading Chart.yaml")?;
    let chart: serde_yaml::Value = serde_yaml::from_str(&text).context("parsing Chart.yaml")?;
    for key in ["version", "appVersion"] {
        ensure!(
            chart[key].as_str() == Some(version),
            "charts/topoproxy/Chart.yaml {key} is {:?}, the agent is {version}: bump them together",
            chart[key]
        );
    }
    Ok(())
}

fn mtime_of(built: &image::BuiltImage) -> Result<u64> {
    // The image's SOURCE_DATE_EPOCH, read back from its own report (one source of truth).
    let report = fs::read_to_string(
        built
            .layout
            .parent()
            .context("image layout without a parent")?
            .join("image-report.txt"),
    )
    .context("reading image-report.txt")?;
    report
        .lines()
        .find_map(|line| line.trim().strip_prefix("SOURCE_DATE_EPOCH "))
        .and_then(|value| value.trim().parse().ok())
        .context("image-report.txt has no SOURCE_DATE_EPOCH")
}

fn write_binary_tarball(
    tarball: &Path,
    binary: &Path,
    readme: &Path,
    version: &str,
    mtime: u64,
) -> Result<()> {
    let top = format!("/topoproxy-v{version}");
    let mut tree = layer::LayerTree::default();
    tree.add_file(Path::new(&format!("{top}/topoproxy")), binary)?;
    tree.add_file(Path::new(&format!("{top}/README.md")), readme)?;
    let file =
        fs::File::create(tarball).with_context(|| format!("creating {}", tarball.display()))?;
    let gzip = flate2::GzBuilder::new()
        .mtime(0)
        .write(file, flate2::Compression::best());
    let mut builder = tar::Builder::new(gzip);
    tree.write_tar(&mut builder, mtime)?;
    builder
        .into_inner()
        .context("finishing the binary tarball")?
        .finish()
        .context("compressing the binary tarball")?
        .flush()
        .context("writing the binary tarball")?;
    Ok(())
}

/// `helm package` of a copy of the chart whose `image.digest` is the built image's.
fn package_chart(
    helm: &Path,
    workspace: &Path,
    staging: &Path,
    out: &Path,
    digest: &str,
) -> Result<PathBuf> {
    let copy = staging.join("chart/topoproxy");
    let _ = fs::remove_dir_all(&copy);
    crate::image::smoke::copy_dir(&workspace.join("charts/topoproxy"), &copy)?;
    let values_path = copy.join("values.yaml");
    let values = fs::read_to_string(&values_path).context("reading values.yaml")?;
    let placeholder = "  digest: \"\"\n";
    ensure!(
        values.matches(placeholder).count() == 1,
        "charts/topoproxy/values.yaml must have exactly one `  digest: \"\"` line (image.digest)"
    );
    fs::write(
        &values_path,
        values.replace(placeholder, &format!("  digest: \"{digest}\"\n")),
    )
    .context("writing the release values.yaml")?;
    let output = Command::new(helm)
        .arg("package")
        .arg(&copy)
        .arg("--destination")
        .arg(out)
        .output()
        .context("running helm package")?;
    ensure!(
        output.status.success(),
        "helm package failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let chart: serde_yaml::Value = serde_yaml::from_str(
        &fs::read_to_string(copy.join("Chart.yaml")).context("reading Chart.yaml")?,
    )
    .context("parsing Chart.yaml")?;
    let version = chart["version"]
        .as_str()
        .context("Chart.yaml has no version")?;
    let package = out.join(format!("topoproxy-{version}.tgz"));
    ensure!(
        package.is_file(),
        "helm package wrote no {}",
        package.display()
    );
    Ok(package)
}
