//! Writes the image with `ocidir` (an OCI image layout directory: blobs, manifest, config,
//! `index.json`) and packs that directory into one tarball that is at the same time an
//! `oci-archive` and a `docker-archive` (a `manifest.json` next to the OCI files, as
//! `docker save` writes since Docker 25), so `podman load`, `docker load`, `skopeo` and
//! `ctr import` all read it.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use anyhow::{Context as _, Result};
use ocidir::cap_std::{ambient_authority, fs::Dir};
use ocidir::oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndex, ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder, Sha256Digest,
    SCHEMA_VERSION,
};
use ocidir::OciDir;

use super::layer::{self, LayerTree};

/// containerd's annotation for the full image name (`ctr import` names the image from it).
const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";

/// Everything about the image that is not a layer.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// `registry/repository` without tag.
    pub repository: String,
    pub tag: String,
    pub entrypoint: Vec<String>,
    pub user: String,
    pub env: Vec<String>,
    pub labels: Vec<(String, String)>,
    /// Fixed time for every tar entry (SOURCE_DATE_EPOCH).
    pub mtime: u64,
}

impl ImageSpec {
    pub fn reference(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }
}

/// One layer to write: what it holds and how its history entry names it.
pub struct LayerInput<'a> {
    pub tree: &'a LayerTree,
    pub created_by: String,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct WrittenImage {
    pub manifest: Descriptor,
    /// Per layer: (compressed blob digest, compressed size).
    pub layers: Vec<(String, u64)>,
    pub config_digest: String,
}

/// Writes a fresh OCI layout at `dir` (removed first).
pub fn write_layout(
    dir: &Path,
    spec: &ImageSpec,
    layers: &[LayerInput<'_>],
) -> Result<WrittenImage> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let handle = Dir::open_ambient_dir(dir, ambient_authority())
        .with_context(|| format!("opening {}", dir.display()))?;
    let oci = OciDir::ensure(handle).context("creating the OCI layout")?;

    let mut config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .entrypoint(spec.entrypoint.clone())
                .user(spec.user.clone())
                .env(spec.env.clone())
                .labels(spec.labels.iter().cloned().collect::<HashMap<_, _>>())
                .build()
                .context("building the image's run config")?,
        )
        .rootfs(
            RootFsBuilder::default()
                .build()
                .context("building rootfs")?,
        )
        .history(Vec::new())
        .build()
        .context("building the image configuration")?;
    // Replaced by the real config descriptor in insert_manifest_and_config.
    let placeholder = DescriptorBuilder::default()
        .media_type(MediaType::ImageConfig)
        .digest(
            Sha256Digest::from_str(
                "0000000000000000000000000000000000000000000000000000000000000000",
            )
            .context("placeholder digest")?,
        )
        .size(0_u64)
        .build()
        .context("building a placeholder descriptor")?;
    let mut manifest = ImageManifestBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageManifest)
        .config(placeholder)
        .layers(Vec::new())
        .build()
        .context("building the manifest")?;

    let mut written_layers = Vec::new();
    for input in layers {
        let mut builder = oci
            .create_layer(Some(flate2::Compression::best()))
            .context("creating a layer")?;
        input.tree.write_tar(&mut builder, spec.mtime)?;
        let layer = builder
            .into_inner()
            .context("finishing the layer tar")?
            .complete()
            .context("finishing the layer blob")?;
        let descriptor = layer.descriptor().build().context("layer descriptor")?;
        written_layers.push((descriptor.digest().to_string(), descriptor.size()));
        // No `created`: a timestamp in the config would change the digest on every build.
        let history = HistoryBuilder::default()
            .created_by(input.created_by.clone())
            .build()
            .context("building a history entry")?;
        oci.push_layer_with_history(&mut manifest, &mut config, layer, Some(history));
    }
    let platform = PlatformBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .build()
        .context("building the platform")?;
    let manifest_descriptor = oci
        .insert_manifest_and_config(manifest, config, Some(&spec.tag), platform)
        .context("writing the manifest and config")?;
    add_index_name(dir, &spec.reference())?;
    let config_digest = read_manifest_config_digest(dir, &manifest_descriptor)?;
    Ok(WrittenImage {
        manifest: manifest_descriptor,
        layers: written_layers,
        config_digest,
    })
}

/// Adds containerd's full-name annotation next to the tag ocidir wrote in `index.json`.
fn add_index_name(dir: &Path, reference: &str) -> Result<()> {
    let path = dir.join("index.json");
    let mut index = ImageIndex::from_file(&path).context("reading index.json")?;
    let mut manifests = index.manifests().clone();
    for descriptor in &mut manifests {
        let mut annotations = descriptor.annotations().clone().unwrap_or_default();
        annotations.insert(CONTAINERD_NAME_ANNOTATION.to_owned(), reference.to_owned());
        descriptor.set_annotations(Some(annotations));
    }
    index.set_manifests(manifests);
    write_canonical_json(&path, &index)
}

/// JSON with sorted keys and no whitespace, so that maps (annotations, labels) do not reorder.
fn write_canonical_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = Vec::new();
    let mut serializer =
        serde_json::Serializer::with_formatter(&mut bytes, canon_json::CanonicalFormatter::new());
    value
        .serialize(&mut serializer)
        .with_context(|| format!("serializing {}", path.display()))?;
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    dir.join("blobs/sha256").join(hex)
}

fn read_manifest_config_digest(dir: &Path, manifest: &Descriptor) -> Result<String> {
    let parsed = ocidir::oci_spec::image::ImageManifest::from_file(blob_path(
        dir,
        manifest.digest().as_ref(),
    ))
    .context("reading back the manifest")?;
    Ok(parsed.config().digest().to_string())
}

/// Packs the layout at `dir` into `archive`: the OCI files plus docker's `manifest.json`,
/// sorted, with fixed metadata.
pub fn write_archive(
    dir: &Path,
    image: &WrittenImage,
    spec: &ImageSpec,
    archive: &Path,
) -> Result<()> {
    let docker_manifest = serde_json::json!([{
        "Config": format!("blobs/sha256/{}", hex_of(&image.config_digest)),
        "RepoTags": [spec.reference()],
        "Layers": image
            .layers
            .iter()
            .map(|(digest, _)| format!("blobs/sha256/{}", hex_of(digest)))
            .collect::<Vec<_>>(),
    }]);
    let docker_manifest = serde_json::to_vec(&docker_manifest).context("docker manifest.json")?;

    // Every file, sorted by name: blobs/…, index.json, manifest.json, oci-layout.
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in fs::read_dir(dir.join("blobs/sha256")).context("listing the blobs")? {
        let name = entry.context("listing the blobs")?.file_name();
        let name = format!("blobs/sha256/{}", name.to_string_lossy());
        let bytes = fs::read(dir.join(&name)).with_context(|| format!("reading {name}"))?;
        files.push((name, bytes));
    }
    for name in ["index.json", "oci-layout"] {
        let bytes = fs::read(dir.join(name)).with_context(|| format!("reading {name}"))?;
        files.push((name.to_owned(), bytes));
    }
    files.push(("manifest.json".to_owned(), docker_manifest));
    files.sort();

    let file =
        fs::File::create(archive).with_context(|| format!("creating {}", archive.display()))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    for directory in ["blobs", "blobs/sha256"] {
        let mut header = layer::header(tar::EntryType::Directory, 0o755, 0, spec.mtime);
        builder.append_data(&mut header, directory, std::io::empty())?;
    }
    for (name, bytes) in files {
        let mut header = layer::header(
            tar::EntryType::Regular,
            0o644,
            bytes.len() as u64,
            spec.mtime,
        );
        builder
            .append_data(&mut header, &name, bytes.as_slice())
            .with_context(|| format!("archiving {name}"))?;
    }
    builder
        .into_inner()
        .context("finishing the archive")?
        .flush()
        .context("writing the archive")?;
    Ok(())
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}
