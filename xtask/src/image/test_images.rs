//! The real node's test images (`tests/k8s-harness/src/node.rs`), built without a registry:
//! each is one static Go program from `tests/k8s/images/<name>/` in one layer, written by the
//! same OCI writer as topoproxy's image, as an archive `ctr images import` reads.
//!
//! - `pause`: the pod sandbox's process, under the name the harness configures containerd's
//!   `sandbox_image` with;
//! - `echo`: answers every TCP connection and UDP datagram with its pod name and the peer
//!   address it saw (the backends and clients of the real-node tests), and asks DNS servers
//!   as a client;
//! - `coredns`: CoreDNS from its `github.com/coredns/coredns` module with the few plugins the
//!   tests use (a module of its own, `tests/k8s/images/coredns/go.mod`).
//!
//! An image is rebuilt when its folder's Go sources, `go.mod` or `go.sum` change.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::layer::LayerTree;
use super::oci::{self, ImageSpec, LayerInput};

/// (program folder under `tests/k8s/images`, image reference's repository).
pub const TEST_IMAGES: [(&str, &str); 3] = [
    ("pause", "topoproxy.test/pause"),
    ("echo", "topoproxy.test/echo"),
    ("coredns", "topoproxy.test/coredns"),
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
        let digest = source_digest(&sources.join(name))?;
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

/// One SHA-256 over the program's sources in `dir`: each `*.go`, `go.mod` and `go.sum` file's
/// name and SHA-256, in name order (`go.sum` pins every module a build compiles from).
fn source_digest(dir: &Path) -> Result<String> {
    use sha2::{Digest as _, Sha256};
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".go") || n == "go.mod" || n == "go.sum")
        })
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for file in &files {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        hasher.update(format!("{name} {}\n", super::file_sha256(file)?));
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn write_image(binary: &Path, name: &str, repository: &str, archive: &Path) -> Result<()> {
    let program = format!("/tp-{name}");
    let mut tree = LayerTree::default();
    tree.add_file(Path::new(&program), binary)?;
    let spec = ImageSpec {
        repository: repository.to_owned(),
        tag: TEST_IMAGE_TAG.to_owned(),
        entrypoint: vec![program],
        // nobody: no program needs a privilege (CoreDNS listens above 1024).
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

#[cfg(test)]
mod tests {
    use super::source_digest;

    #[test]
    fn the_source_digest_follows_go_files_go_mod_and_go_sum_only() {
        let dir = std::env::temp_dir().join(format!("xtask-test-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("a file");
        write("main.go", "package main\n");
        write("go.mod", "module m\n");
        let first = source_digest(&dir).expect("a digest");
        write("README", "not a source\n");
        let with_other_file = source_digest(&dir).expect("a digest");
        write("go.sum", "example.com/m v1.0.0 h1:a=\n");
        let with_go_sum = source_digest(&dir).expect("a digest");
        write("dns.go", "package main\n");
        let with_second_program_file = source_digest(&dir).expect("a digest");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(first, with_other_file);
        assert_ne!(first, with_go_sum);
        assert_ne!(with_go_sum, with_second_program_file);
    }
}
