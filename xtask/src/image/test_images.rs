//! The real node's test images (`tests/k8s-harness/src/node.rs`), built without a registry:
//! each is one static Go program from `tests/k8s/images/<name>/` in one layer, written by the
//! same OCI writer as topoproxy's image, as an archive `ctr images import` reads.
//!
//! - `pause`: the pod sandbox's process, under the name the harness configures containerd's
//!   `sandbox_image` with;
//! - `echo`: answers every TCP connection and UDP datagram with its pod name and the peer
//!   address it saw (the backends and clients of the real-node tests).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::layer::LayerTree;
use super::oci::{self, ImageSpec, LayerInput};

/// (program folder under `tests/k8s/images`, image reference's repository).
pub const TEST_IMAGES: [(&str, &str); 2] = [
    ("pause", "topoproxy.test/pause"),
    ("echo", "topoproxy.test/echo"),
];

/// Every test image's tag.
pub const TEST_IMAGE_TAG: &str = "1";

/// Builds each test image into `out` (`<name>.tar`) unless one built from the same program
/// source is there. `go_build` builds the program of a folder into a path.
pub fn build_test_images(
    out: &Path,
    sources: &Path,
    go_build: &dyn Fn(&Path, &Path) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut archives = Vec::new();
    for (name, repository) in TEST_IMAGES {
        let source = sources.join(name).join("main.go");
        let digest = super::file_sha256(&source)?;
        let archive = out.join(format!("{name}.tar"));
        let stamp = out.join(format!("{name}.source-sha256"));
        let built = fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == digest);
        if !built || !archive.is_file() {
            let binary = out.join(format!("tp-{name}"));
            go_build(&sources.join(name), &binary)?;
            write_image(&binary, name, repository, &archive)?;
            fs::write(&stamp, &digest).with_context(|| format!("writing {}", stamp.display()))?;
            let _ = fs::remove_file(&binary);
            println!(
                "k8s-setup: test image {repository}:{TEST_IMAGE_TAG} → {}",
                archive.display()
            );
        }
        archives.push(archive);
    }
    Ok(archives)
}

fn write_image(binary: &Path, name: &str, repository: &str, archive: &Path) -> Result<()> {
    let program = format!("/tp-{name}");
    let mut tree = LayerTree::default();
    tree.add_file(Path::new(&program), binary)?;
    let spec = ImageSpec {
        repository: repository.to_owned(),
        tag: TEST_IMAGE_TAG.to_owned(),
        entrypoint: vec![program],
        // nobody: neither program needs a privilege.
        user: "65534:65534".to_owned(),
        env: Vec::new(),
        labels: vec![(
            "org.opencontainers.image.title".into(),
            format!("topoproxy test image: {name}"),
        )],
        mtime: 0,
    };
    let layout = archive.with_extension("oci");
    let written = oci::write_layout(
        &layout,
        &spec,
        &[LayerInput {
            tree: &tree,
            created_by: format!("tests/k8s/images/{name}"),
        }],
    )?;
    oci::write_archive(&layout, &written, &spec, archive)?;
    let _ = fs::remove_dir_all(&layout);
    Ok(())
}
