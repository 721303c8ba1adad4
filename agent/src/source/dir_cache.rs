//! The YAML directory as last read, file by file, so that a re-scan parses only the files
//! that changed, and the directory merged from them, kept up to date object by object so
//! that a re-scan merges again only the objects those files defined before or define now.
//!
//! A file is re-read when its stamp (size, mtime, device and inode) differs from the one taken
//! *before* it was last read, or when that read was racy: a file whose mtime was within
//! [`RACY_WINDOW`] of the read could have been rewritten afterwards with the same size inside
//! the file system's timestamp granularity, leaving the stamp unchanged (the "racy git"
//! problem). Such a file is read again on every scan until its mtime is older than the window,
//! and re-parsed only if its content's digest changed.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::hash::{Hash as _, Hasher as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::convert::Warning;
use super::file::{io_error, load_bytes, yaml_files, FileSourceError, Loaded};
use crate::model::ServiceKey;
use crate::store::{SliceKey, Store};

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

/// An object a file can define, by key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum ObjectKey {
    Service(ServiceKey),
    Slice(SliceKey),
    Node(String),
}

/// Every YAML file under a directory, with what each held when last read, and the directory
/// merged from them.
///
/// The merged view is kept up to date object by object: a scan that re-parses one file
/// looks again only at the objects that file defined before and defines now, so its cost
/// follows the file's size, not the directory's.
#[derive(Debug, Default)]
pub struct DirectoryCache {
    files: BTreeMap<Arc<Path>, CachedFile>,
    /// For every object defined by some file that parsed, those files in path order: the
    /// last one's definition is the merged view's.
    definitions: HashMap<ObjectKey, Vec<Arc<Path>>>,
    /// The directory as last merged (while every file parsed).
    merged: Store,
    /// The objects whose definitions changed since the merged view was last brought up to
    /// date (several scans' worth while a file fails to parse).
    dirty: BTreeSet<ObjectKey>,
}

/// What a scan found.
#[derive(Debug)]
pub enum Scan {
    /// No file was added, removed or changed in content.
    Unchanged,
    /// Something changed, and every file parsed: these objects of the merged view
    /// ([`DirectoryCache::store`]) changed.
    Changed(Changed),
}

/// The objects of the merged view that a scan changed, each in key order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changed {
    /// Services (and ServiceImports) added, changed or removed.
    pub services: Vec<ServiceKey>,
    /// Slices added, changed or removed.
    pub slices: Vec<SliceKey>,
    /// Nodes added, changed or removed.
    pub nodes: Vec<String>,
    /// Nodes whose zone or region changed (or which were added or removed).
    pub localities: Vec<String>,
}

/// How many files a scan read and parsed (for the tests and the debug log).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanCounts {
    pub read: usize,
    pub parsed: usize,
}

/// What [`refresh`] found of a file.
enum Refresh {
    /// Not read again.
    Unchanged,
    /// Read again, the same content: only the stamp is new.
    Restamped { stamp: Stamp, racy: bool },
    /// New content (or a new file), parsed.
    Parsed(Box<CachedFile>),
}

impl DirectoryCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The directory merged: every object as the last file in path order that defines it
    /// defines it, as [`super::file::load_dir`] loads them, as of the last scan that found
    /// every file parsed.
    pub fn store(&self) -> &Store {
        &self.merged
    }

    /// What the files skipped, in path order.
    pub fn warnings(&self) -> impl Iterator<Item = &Warning> {
        self.files
            .values()
            .filter_map(|cached| cached.parsed.as_ref().ok())
            .flat_map(|loaded| &loaded.warnings)
    }

    /// How many YAML files the directory holds.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Stats every YAML file under `path`, reads those whose stamp changed or whose last read
    /// was racy, re-parses those whose content changed, and, if anything did, brings the
    /// merged view up to date for the objects they defined before and define now. A file
    /// that cannot be parsed fails the scan that found the change (the merged view stays as
    /// it was), and every later scan that finds another change, until it is fixed; a file
    /// that cannot be read fails every scan.
    pub fn scan(&mut self, path: &Path) -> Result<(Scan, ScanCounts), FileSourceError> {
        let listed = yaml_files(path)?;
        let mut counts = ScanCounts::default();
        let mut changed = false;
        let mut files = BTreeMap::new();
        for file in listed {
            let (file, mut cached) = match self.files.remove_entry(file.as_path()) {
                Some((file, cached)) => (file, Some(cached)),
                None => (Arc::from(file), None),
            };
            match refresh(&file, cached.as_ref(), &mut counts) {
                Ok(Refresh::Unchanged) => {}
                Ok(Refresh::Restamped { stamp, racy }) => {
                    if let Some(cached) = cached.as_mut() {
                        (cached.stamp, cached.racy) = (stamp, racy);
                    }
                }
                Ok(Refresh::Parsed(entry)) => {
                    changed = true;
                    let before = cached.as_ref().map(|cached| &cached.parsed);
                    self.redefine(&file, before, Some(&entry.parsed));
                    cached = Some(*entry);
                }
                Err(error) => {
                    // Forgotten as if removed, so the next scan reads it as new and merges
                    // what this one found.
                    if let Some(cached) = cached {
                        self.redefine(&file, Some(&cached.parsed), None);
                    }
                    self.files.append(&mut files);
                    return Err(error);
                }
            }
            if let Some(cached) = cached {
                files.insert(file, cached);
            }
        }
        // What is left was removed.
        for (file, removed) in std::mem::replace(&mut self.files, files) {
            changed = true;
            self.redefine(&file, Some(&removed.parsed), None);
        }
        if !changed {
            return Ok((Scan::Unchanged, counts));
        }
        Ok((Scan::Changed(self.merge()?), counts))
    }

    /// Records that `file` defines what `after` holds instead of what `before` held.
    fn redefine(
        &mut self,
        file: &Arc<Path>,
        before: Option<&Result<Loaded, FileSourceError>>,
        after: Option<&Result<Loaded, FileSourceError>>,
    ) {
        if let Some(Ok(before)) = before {
            for key in keys(&before.store) {
                if let Some(files) = self.definitions.get_mut(&key) {
                    files.retain(|defining| defining != file);
                    if files.is_empty() {
                        self.definitions.remove(&key);
                    }
                }
                self.dirty.insert(key);
            }
        }
        if let Some(Ok(after)) = after {
            for key in keys(&after.store) {
                let files = self.definitions.entry(key.clone()).or_default();
                if let Err(at) = files.binary_search(file) {
                    files.insert(at, Arc::clone(file));
                }
                self.dirty.insert(key);
            }
        }
    }

    /// Brings the merged view up to date for the dirty objects, if every file parsed.
    fn merge(&mut self) -> Result<Changed, FileSourceError> {
        if let Some(error) = self
            .files
            .values()
            .find_map(|cached| cached.parsed.as_ref().err())
        {
            return Err(error.duplicate());
        }
        let mut changed = Changed::default();
        for key in std::mem::take(&mut self.dirty) {
            let defined = self.defining(&key);
            match key {
                ObjectKey::Service(key) => {
                    let service = defined.and_then(|store| store.service(&key));
                    if self.merged.service(&key) == service {
                        continue;
                    }
                    match service.cloned() {
                        Some(service) => _ = self.merged.upsert_service(service),
                        None => _ = self.merged.remove_service(&key),
                    }
                    changed.services.push(key);
                }
                ObjectKey::Slice(key) => {
                    let slice = defined.and_then(|store| store.slice(&key));
                    if self.merged.slice(&key) == slice {
                        continue;
                    }
                    match slice.cloned() {
                        Some(slice) => _ = self.merged.upsert_slice(slice),
                        None => _ = self.merged.remove_slice(&key),
                    }
                    changed.slices.push(key);
                }
                ObjectKey::Node(name) => self.merge_node(name, &mut changed),
            }
        }
        Ok(changed)
    }

    fn merge_node(&mut self, name: String, changed: &mut Changed) {
        let defined = self.defining(&ObjectKey::Node(name.clone()));
        let node = defined.and_then(|store| store.node(&name));
        if self.merged.node(&name) == node {
            return;
        }
        let locality_before = self.merged.node_locality(&name).cloned();
        match node.cloned() {
            Some(node) => self.merged.upsert_node(node),
            None => _ = self.merged.remove_node(&name),
        }
        if self.merged.node_locality(&name) != locality_before.as_ref() {
            changed.localities.push(name.clone());
        }
        changed.nodes.push(name);
    }

    /// The objects of the file whose definition of `key` the merged view takes.
    fn defining(&self, key: &ObjectKey) -> Option<&Store> {
        let file = self.definitions.get(key)?.last()?;
        let parsed = self.files.get(file)?.parsed.as_ref().ok()?;
        Some(&parsed.store)
    }
}

#[cfg(test)]
impl DirectoryCache {
    /// A copy of the merged view, as the whole-directory load returns one.
    pub(crate) fn snapshot(&self) -> Loaded {
        Loaded {
            store: self.merged.clone(),
            warnings: self.warnings().cloned().collect(),
            files: self.file_count(),
        }
    }
}

/// Every object a file's store holds, by key.
fn keys(store: &Store) -> impl Iterator<Item = ObjectKey> + '_ {
    let services = store
        .services()
        .map(|service| ObjectKey::Service(service.key.clone()));
    let slices = store
        .slices()
        .map(|slice| ObjectKey::Slice(SliceKey::of(slice)));
    let nodes = store.nodes().map(|node| ObjectKey::Node(node.name.clone()));
    services.chain(slices).chain(nodes)
}

/// Reads `file` again if its stamp says it may have changed, and parses it again if its
/// content did.
fn refresh(
    file: &Path,
    cached: Option<&CachedFile>,
    counts: &mut ScanCounts,
) -> Result<Refresh, FileSourceError> {
    // The time and stamp come before the read: a write after them shows as a new stamp or
    // as a racy read, never as nothing.
    let read_at = SystemTime::now();
    let stamp = Stamp::of(&fs::metadata(file).map_err(|source| io_error(file, source))?);
    if cached.is_some_and(|cached| cached.stamp == stamp && !cached.racy) {
        return Ok(Refresh::Unchanged);
    }
    let bytes = fs::read(file).map_err(|source| io_error(file, source))?;
    counts.read += 1;
    let digest = digest(&bytes);
    let racy = stamp.is_racy(read_at);
    if cached.is_some_and(|cached| cached.digest == digest) {
        return Ok(Refresh::Restamped { stamp, racy });
    }
    counts.parsed += 1;
    let mut loaded = Loaded::default();
    let parsed = load_bytes(file, &bytes, &mut loaded).map(|()| {
        loaded.files = 1;
        loaded
    });
    Ok(Refresh::Parsed(Box::new(CachedFile {
        stamp,
        racy,
        digest,
        parsed,
    })))
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
            (Scan::Changed(_), counts) => (cache.snapshot(), counts),
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

#[cfg(test)]
#[path = "dir_cache_tests.rs"]
mod property_tests;
