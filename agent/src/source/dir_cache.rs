//! The YAML directory as last read, file by file, so that a re-scan parses only the files
//! that changed.
//!
//! A file is re-read when its stamp (size, mtime, device and inode) differs from the one taken
//! *before* it was last read, or when that read was racy: a file whose mtime was within
//! [`RACY_WINDOW`] of the read could have been rewritten afterwards with the same size inside
//! the file system's timestamp granularity, leaving the stamp unchanged (the "racy git"
//! problem). Such a file is read again on every scan until its mtime is older than the window,
//! and re-parsed only if its content's digest changed.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fs;
use std::hash::{Hash as _, Hasher as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::file::{io_error, load_bytes, yaml_files, FileSourceError, Loaded};
use crate::store::Store;

/// Longer than the coarsest timestamp granularity in use (FAT: 2 s; ext3, HFS+: 1 s).
pub const RACY_WINDOW: Duration = Duration::from_secs(5);

/// What identifies a file's content cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    modified: Option<SystemTime>,
    device: u64,
    inode: u64,
}

impl Stamp {
    fn of(metadata: &fs::Metadata) -> Self {
        Self {
            size: metadata.len(),
            modified: metadata.modified().ok(),
            device: metadata.dev(),
            inode: metadata.ino(),
        }
    }

    /// Whether a same-size rewrite after `read_at` could keep this stamp.
    fn is_racy(&self, read_at: SystemTime) -> bool {
        self.modified
            .is_none_or(|modified| modified + RACY_WINDOW > read_at)
    }
}

#[derive(Debug)]
struct CachedFile {
    stamp: Stamp,
    racy: bool,
    digest: u64,
    /// The file's objects, or why it did not parse.
    parsed: Result<Loaded, FileSourceError>,
}

/// Every YAML file under a directory, with what each held when last read.
#[derive(Debug, Default)]
pub struct DirectoryCache {
    files: BTreeMap<PathBuf, CachedFile>,
}

/// What a scan found: the directory merged in file order, or the first file that failed.
#[derive(Debug)]
pub enum Scan {
    /// No file was added, removed or changed in content.
    Unchanged,
    /// Something changed, and every file parsed.
    Changed(Box<Loaded>),
}

/// How many files a scan read and parsed (for the tests and the debug log).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanCounts {
    pub read: usize,
    pub parsed: usize,
}

impl DirectoryCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stats every YAML file under `path`, reads those whose stamp changed or whose last read
    /// was racy, re-parses those whose content changed, and merges the whole directory again
    /// if anything did. A file that cannot be parsed fails the scan that found the change (the
    /// caller keeps its last good state), and every later scan that finds another change,
    /// until it is fixed; a file that cannot be read fails every scan.
    pub fn scan(&mut self, path: &Path) -> Result<(Scan, ScanCounts), FileSourceError> {
        let listed = yaml_files(path)?;
        let mut counts = ScanCounts::default();
        let mut changed = false;
        let mut files = BTreeMap::new();
        for file in listed {
            let cached = self.files.remove(&file);
            match refresh(&file, cached, &mut counts, &mut changed) {
                Ok(entry) => {
                    files.insert(file, entry);
                }
                Err(error) => {
                    self.files.append(&mut files);
                    return Err(error);
                }
            }
        }
        // What is left was removed.
        changed |= !self.files.is_empty();
        self.files = files;
        if !changed {
            return Ok((Scan::Unchanged, counts));
        }
        Ok((Scan::Changed(Box::new(self.merged()?)), counts))
    }

    /// Every file's objects in path order, a later file replacing an earlier definition of
    /// the same object, as [`super::file::load_dir`] loads them.
    fn merged(&self) -> Result<Loaded, FileSourceError> {
        let mut merged = Loaded::default();
        for cached in self.files.values() {
            let loaded = match &cached.parsed {
                Ok(loaded) => loaded,
                Err(error) => return Err(error.duplicate()),
            };
            merge_into(&mut merged.store, &loaded.store);
            merged.warnings.extend(loaded.warnings.iter().cloned());
            merged.files += 1;
        }
        Ok(merged)
    }
}

fn merge_into(into: &mut Store, from: &Store) {
    for service in from.services() {
        into.upsert_service(service.clone());
    }
    for slice in from.slices() {
        into.upsert_slice(slice.clone());
    }
    for node in from.nodes() {
        into.upsert_node(node.clone());
    }
}

fn refresh(
    file: &Path,
    cached: Option<CachedFile>,
    counts: &mut ScanCounts,
    changed: &mut bool,
) -> Result<CachedFile, FileSourceError> {
    // The time and stamp come before the read: a write after them shows as a new stamp or
    // as a racy read, never as nothing.
    let read_at = SystemTime::now();
    let stamp = Stamp::of(&fs::metadata(file).map_err(|source| io_error(file, source))?);
    let cached = match cached {
        Some(cached) if cached.stamp == stamp && !cached.racy => return Ok(cached),
        cached => cached,
    };
    let bytes = fs::read(file).map_err(|source| io_error(file, source))?;
    counts.read += 1;
    let digest = digest(&bytes);
    let racy = stamp.is_racy(read_at);
    if let Some(cached) = cached {
        if cached.digest == digest {
            return Ok(CachedFile {
                stamp,
                racy,
                ..cached
            });
        }
    }
    *changed = true;
    counts.parsed += 1;
    let mut loaded = Loaded::default();
    let parsed = load_bytes(file, &bytes, &mut loaded).map(|()| {
        loaded.files = 1;
        loaded
    });
    Ok(CachedFile {
        stamp,
        racy,
        digest,
        parsed,
    })
}

fn digest(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::model::ServiceKey;
    use crate::source::test_dir::{service, Scratch};

    fn cluster_ip(loaded: &Loaded, name: &str) -> IpAddr {
        loaded
            .store
            .service(&ServiceKey::new("prod", name))
            .unwrap()
            .cluster_ips[0]
    }

    fn changed(cache: &mut DirectoryCache, dir: &Scratch) -> (Loaded, ScanCounts) {
        match cache.scan(dir.path()).unwrap() {
            (Scan::Changed(loaded), counts) => (*loaded, counts),
            (Scan::Unchanged, counts) => panic!("no change seen ({counts:?})"),
        }
    }

    #[test]
    fn a_same_size_rewrite_keeping_the_mtime_is_read_again() {
        let dir = Scratch::new("dir-cache");
        dir.write("web.yaml", &service("web", "10.0.0.1"));
        let mut cache = DirectoryCache::new();
        let (loaded, _) = changed(&mut cache, &dir);
        assert_eq!(
            cluster_ip(&loaded, "web"),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );

        dir.rewrite_keeping_mtime("web.yaml", &service("web", "10.0.0.2"));
        let (loaded, counts) = changed(&mut cache, &dir);
        assert_eq!(
            cluster_ip(&loaded, "web"),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(counts, ScanCounts { read: 1, parsed: 1 });
    }

    #[test]
    fn only_changed_files_are_parsed_and_later_files_win() {
        let dir = Scratch::new("dir-cache");
        dir.write("a.yaml", &service("web", "10.0.0.1"));
        dir.write("b.yaml", &service("web", "10.0.0.2"));
        dir.write("c.yaml", &service("db", "10.0.0.3"));
        let mut cache = DirectoryCache::new();
        let (loaded, counts) = changed(&mut cache, &dir);
        assert_eq!(counts, ScanCounts { read: 3, parsed: 3 });
        assert_eq!((loaded.files, loaded.store.service_count()), (3, 2));
        assert_eq!(
            cluster_ip(&loaded, "web"),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );

        // Racy reads are read again, but nothing unchanged is parsed again.
        let (scan, counts) = cache.scan(dir.path()).unwrap();
        assert!(matches!(scan, Scan::Unchanged), "{scan:?}");
        assert_eq!(counts.parsed, 0);

        dir.write("c.yaml", &service("db", "10.0.0.33"));
        let (loaded, counts) = changed(&mut cache, &dir);
        assert_eq!(counts.parsed, 1);
        assert_eq!(
            cluster_ip(&loaded, "db"),
            "10.0.0.33".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            cluster_ip(&loaded, "web"),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );

        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        let (loaded, counts) = changed(&mut cache, &dir);
        assert_eq!(counts.parsed, 0);
        assert_eq!(
            cluster_ip(&loaded, "web"),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_file_that_fails_fails_the_scan_until_it_is_fixed() {
        let dir = Scratch::new("dir-cache");
        dir.write("a.yaml", &service("web", "10.0.0.1"));
        dir.write("b.yaml", "key: [unclosed\n");
        let mut cache = DirectoryCache::new();
        let error = cache.scan(dir.path()).unwrap_err();
        assert!(matches!(error, FileSourceError::Parse { .. }), "{error}");
        // Reported once, as the whole-directory load did: unchanged, it is not news.
        let (scan, counts) = cache.scan(dir.path()).unwrap();
        assert!(matches!(scan, Scan::Unchanged), "{scan:?}");
        assert_eq!(counts.parsed, 0);

        dir.write("b.yaml", &service("db", "10.0.0.3"));
        let (loaded, _) = changed(&mut cache, &dir);
        assert_eq!(loaded.store.service_count(), 2);
    }
}
