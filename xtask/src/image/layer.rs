//! A layer's file tree and its reproducible tar form: entries sorted by path, every parent
//! directory present, uid/gid 0 with no names, one fixed mtime (SOURCE_DATE_EPOCH), modes
//! taken from the source file's executable bit only (0755 or 0644), no extended headers.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, ensure, Context as _, Result};

/// What one path in the layer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Directory,
    /// A regular file whose contents are read from `source` when the tar is written.
    File {
        source: PathBuf,
        executable: bool,
    },
}

/// The files of one layer, keyed by their absolute path in the image (without the leading /).
#[derive(Debug, Default, Clone)]
pub struct LayerTree {
    entries: BTreeMap<PathBuf, Entry>,
}

impl LayerTree {
    /// Adds the file `source` at `image_path` (absolute, e.g. `/usr/sbin/nft`), and its parent
    /// directories. The same path twice with different sources is an error.
    pub fn add_file(&mut self, image_path: &Path, source: &Path) -> Result<()> {
        let relative = relative_path(image_path)?;
        let metadata =
            fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
        ensure!(
            metadata.is_file(),
            "{} is not a regular file",
            source.display()
        );
        let executable = metadata.permissions().mode() & 0o111 != 0;
        let entry = Entry::File {
            source: source.to_path_buf(),
            executable,
        };
        if let Some(existing) = self.entries.get(&relative) {
            ensure!(
                existing == &entry,
                "{} would be added twice, from different files",
                image_path.display()
            );
            return Ok(());
        }
        for parent in relative.ancestors().skip(1) {
            if !parent.as_os_str().is_empty() {
                self.entries.insert(parent.to_path_buf(), Entry::Directory);
            }
        }
        self.entries.insert(relative, entry);
        Ok(())
    }

    /// Paths and entries in tar order.
    pub fn entries(&self) -> impl Iterator<Item = (&PathBuf, &Entry)> {
        self.entries.iter()
    }

    /// Bytes of all regular files (what the layer holds unpacked, without tar headers).
    pub fn file_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for entry in self.entries.values() {
            if let Entry::File { source, .. } = entry {
                total += fs::metadata(source)
                    .with_context(|| format!("reading {}", source.display()))?
                    .len();
            }
        }
        Ok(total)
    }

    /// Writes the tree as a tar stream into `builder`.
    pub fn write_tar<W: Write>(&self, builder: &mut tar::Builder<W>, mtime: u64) -> Result<()> {
        for (path, entry) in &self.entries {
            match entry {
                Entry::Directory => {
                    let mut header = header(tar::EntryType::Directory, 0o755, 0, mtime);
                    builder
                        .append_data(&mut header, path, std::io::empty())
                        .with_context(|| format!("writing directory {}", path.display()))?;
                }
                Entry::File { source, executable } => {
                    let mode = if *executable { 0o755 } else { 0o644 };
                    let file = fs::File::open(source)
                        .with_context(|| format!("opening {}", source.display()))?;
                    let size = file
                        .metadata()
                        .with_context(|| format!("reading {}", source.display()))?
                        .len();
                    let mut header = header(tar::EntryType::Regular, mode, size, mtime);
                    builder
                        .append_data(&mut header, path, file)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
            }
        }
        Ok(())
    }
}

/// A ustar header with everything that could vary between builds fixed.
pub fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// `/usr/sbin/nft` → `usr/sbin/nft`; refuses relative paths and `..`.
fn relative_path(image_path: &Path) -> Result<PathBuf> {
    let mut relative = PathBuf::new();
    let mut components = image_path.components();
    if components.next() != Some(Component::RootDir) {
        bail!("image path {} must be absolute", image_path.display());
    }
    for component in components {
        match component {
            Component::Normal(part) => relative.push(part),
            _ => bail!(
                "image path {} must not contain . or ..",
                image_path.display()
            ),
        }
    }
    ensure!(
        !relative.as_os_str().is_empty(),
        "image path {} names the root",
        image_path.display()
    );
    Ok(relative)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-layer-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn tar_listing(tree: &LayerTree, mtime: u64) -> Vec<(String, u32, u64, u64)> {
        let mut builder = tar::Builder::new(Vec::new());
        tree.write_tar(&mut builder, mtime).unwrap();
        let bytes = builder.into_inner().unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                let header = entry.header();
                (
                    entry.path().unwrap().display().to_string(),
                    header.mode().unwrap(),
                    header.mtime().unwrap(),
                    header.uid().unwrap() + header.gid().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn entries_are_sorted_with_parents_first_and_fixed_metadata() {
        let dir = scratch("sorted");
        let binary = dir.join("b");
        fs::write(&binary, b"x").unwrap();
        fs::set_permissions(&binary, fs::Permissions::from_mode(0o700)).unwrap();
        let library = dir.join("l");
        fs::write(&library, b"y").unwrap();
        fs::set_permissions(&library, fs::Permissions::from_mode(0o600)).unwrap();
        let mut tree = LayerTree::default();
        tree.add_file(Path::new("/usr/sbin/nft"), &binary).unwrap();
        tree.add_file(Path::new("/lib/x86_64-linux-gnu/libc.so.6"), &library)
            .unwrap();
        tree.add_file(Path::new("/usr/lib/libz.so"), &library)
            .unwrap();
        let listing = tar_listing(&tree, 1_700_000_000);
        let paths: Vec<_> = listing.iter().map(|(path, ..)| path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "lib",
                "lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu/libc.so.6",
                "usr",
                "usr/lib",
                "usr/lib/libz.so",
                "usr/sbin",
                "usr/sbin/nft"
            ]
        );
        assert!(listing
            .iter()
            .all(|(_, _, mtime, ids)| *mtime == 1_700_000_000 && *ids == 0));
        let mode = |name: &str| listing.iter().find(|(p, ..)| p == name).unwrap().1;
        assert_eq!(mode("usr/sbin/nft"), 0o755);
        assert_eq!(mode("usr/lib/libz.so"), 0o644);
        assert_eq!(mode("usr"), 0o755);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn same_path_from_two_sources_is_refused() {
        let dir = scratch("twice");
        fs::write(dir.join("a"), b"a").unwrap();
        fs::write(dir.join("b"), b"b").unwrap();
        let mut tree = LayerTree::default();
        tree.add_file(Path::new("/x"), &dir.join("a")).unwrap();
        tree.add_file(Path::new("/x"), &dir.join("a")).unwrap();
        assert!(tree.add_file(Path::new("/x"), &dir.join("b")).is_err());
        assert!(tree
            .add_file(Path::new("relative"), &dir.join("a"))
            .is_err());
        assert!(tree.add_file(Path::new("/a/../b"), &dir.join("a")).is_err());
        fs::remove_dir_all(dir).unwrap();
    }
}
