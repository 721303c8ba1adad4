//! The image's SBOM, SPDX 2.3 JSON: the image itself, every crate compiled into the agent (its
//! normal dependency closure from `cargo metadata`, the eBPF crate's included, as the object is
//! embedded) and every Debian package the image takes files from, with the `.deb`'s SHA-256.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use cargo_metadata::{DependencyKind, MetadataCommand, Package, PackageId};
use serde_json::{json, Value};

use super::debian;

/// A crate in the binary.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CrateEntry {
    pub name: String,
    pub version: String,
    pub license: Option<String>,
    /// `registry+https://…` for crates.io, None for the workspace's own crates.
    pub source: Option<String>,
}

/// The crates linked into `roots` (workspace packages): their normal, non-dev, non-build
/// dependencies for the Linux x86-64 target, transitively, roots included.
pub fn crates_in(workspace: &Path, roots: &[&str]) -> Result<Vec<CrateEntry>> {
    let metadata = MetadataCommand::new()
        .current_dir(workspace)
        .other_options(vec![
            "--filter-platform".to_owned(),
            "x86_64-unknown-linux-gnu".to_owned(),
            "--locked".to_owned(),
        ])
        .exec()
        .context("running cargo metadata")?;
    let resolve = metadata
        .resolve
        .as_ref()
        .context("cargo metadata has no resolve graph")?;
    let packages: BTreeMap<&PackageId, &Package> = metadata
        .packages
        .iter()
        .map(|package| (&package.id, package))
        .collect();
    let nodes: BTreeMap<&PackageId, _> =
        resolve.nodes.iter().map(|node| (&node.id, node)).collect();
    let mut pending: Vec<&PackageId> = metadata
        .workspace_packages()
        .into_iter()
        .filter(|package| roots.contains(&package.name.as_str()))
        .map(|package| &package.id)
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(id) = pending.pop() {
        if !seen.insert(id) {
            continue;
        }
        let Some(node) = nodes.get(id) else { continue };
        for dep in &node.deps {
            let normal = dep
                .dep_kinds
                .iter()
                .any(|kind| kind.kind == DependencyKind::Normal);
            if normal {
                pending.push(&dep.pkg);
            }
        }
    }
    let mut crates: Vec<CrateEntry> = seen
        .into_iter()
        .filter_map(|id| packages.get(id))
        .map(|package| CrateEntry {
            name: package.name.to_string(),
            version: package.version.to_string(),
            license: package.license.clone(),
            source: package.source.as_ref().map(|source| source.repr.clone()),
        })
        .collect();
    crates.sort();
    Ok(crates)
}

/// What the SBOM describes.
pub struct SbomInput<'a> {
    pub image_reference: &'a str,
    pub manifest_digest: &'a str,
    pub version: &'a str,
    pub source_date_epoch: u64,
    pub crates: &'a [CrateEntry],
    pub packages: &'a [debian::Package],
}

/// The SPDX 2.3 document. Deterministic: its only time is SOURCE_DATE_EPOCH, its namespace
/// is derived from the manifest digest.
pub fn spdx(input: &SbomInput<'_>) -> Value {
    let created = humantime::format_rfc3339_seconds(
        UNIX_EPOCH + Duration::from_secs(input.source_date_epoch),
    )
    .to_string();
    let image_id = "SPDXRef-Image";
    let mut packages = vec![json!({
        "SPDXID": image_id,
        "name": input.image_reference,
        "versionInfo": input.version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "CONTAINER",
        "checksums": [{
            "algorithm": "SHA256",
            "checksumValue": input.manifest_digest.trim_start_matches("sha256:"),
        }],
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image_id,
    })];
    for entry in input.crates {
        let id = spdx_id("Crate", &entry.name, &entry.version);
        let license = entry
            .license
            .clone()
            .unwrap_or_else(|| "NOASSERTION".to_owned());
        let from_registry = entry
            .source
            .as_deref()
            .is_some_and(|source| source.starts_with("registry+"));
        packages.push(json!({
            "SPDXID": id,
            "name": entry.name,
            "versionInfo": entry.version,
            "downloadLocation": if from_registry {
                format!("https://crates.io/api/v1/crates/{}/{}/download", entry.name, entry.version)
            } else {
                "NOASSERTION".to_owned()
            },
            "filesAnalyzed": false,
            "licenseDeclared": license,
            "licenseConcluded": "NOASSERTION",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": format!("pkg:cargo/{}@{}", entry.name, entry.version),
            }],
        }));
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }
    for package in input.packages {
        let id = spdx_id("Deb", &package.name, &package.version);
        packages.push(json!({
            "SPDXID": id,
            "name": package.name,
            "versionInfo": package.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "comment": format!("Debian 12 package; copyright file at /usr/share/doc/{}/copyright in the image", package.name),
            "checksums": [{ "algorithm": "SHA256", "checksumValue": package.deb_sha256 }],
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": format!(
                    "pkg:deb/debian/{}@{}?arch=amd64&distro=debian-12",
                    package.name,
                    package.version.replace(':', "%3A")
                ),
            }],
        }));
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": input.image_reference,
        "documentNamespace": format!(
            "https://spdx.org/spdxdocs/topoproxy-image-{}",
            input.manifest_digest.trim_start_matches("sha256:")
        ),
        "creationInfo": {
            "created": created,
            "creators": ["Tool: topoproxy-xtask-image"],
        },
        "packages": packages,
        "relationships": relationships,
    })
}

/// SPDX ids allow letters, digits, `.` and `-` only.
fn spdx_id(kind: &str, name: &str, version: &str) -> String {
    let clean = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    format!("SPDXRef-{kind}-{}-{}", clean(name), clean(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_spdx_and_distinct_per_version() {
        assert_eq!(
            spdx_id("Deb", "libgmp10", "2:6.2.1+dfsg1-1.1"),
            "SPDXRef-Deb-libgmp10-2-6.2.1-dfsg1-1.1"
        );
        assert_ne!(
            spdx_id("Crate", "syn", "1.0.0"),
            spdx_id("Crate", "syn", "2.0.0")
        );
    }

    #[test]
    fn the_agent_crate_and_its_runtime_dependencies_are_listed_but_not_dev_ones() {
        let crates = crates_in(&crate::workspace_root(), &["topoproxy"]).unwrap();
        let names: BTreeSet<&str> = crates.iter().map(|c| c.name.as_str()).collect();
        for expected in [
            "topoproxy",
            "topoproxy-common",
            "tokio",
            "kube-client",
            "aya",
        ] {
            assert!(
                names.contains(expected),
                "{expected} missing from {names:?}"
            );
        }
        // dev-dependencies and build-dependencies are not in the binary.
        for absent in ["proptest", "criterion", "fake-apiserver", "aya-build"] {
            assert!(!names.contains(absent), "{absent} should not be listed");
        }
    }
}
