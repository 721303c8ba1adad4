//! The file source: a directory of the YAML that `kubectl get -o yaml` prints, for demos,
//! tests and clusterless use.
//!
//! Every `*.yaml` / `*.yml` file under the directory is read, in sorted path order so that a
//! later file deterministically replaces an earlier definition of the same object. A file may
//! hold one document, several `---`-separated documents, or a `kind: List` (or a typed list
//! such as `ServiceList`) whose items are objects; lists may nest. Services and Nodes
//! (`v1`), EndpointSlices (`discovery.k8s.io/v1`) and MCS ServiceImports
//! (`multicluster.x-k8s.io/v1alpha1`) are used; every other kind is ignored.
//!
//! Two kinds of trouble, two treatments, as with the API watcher: a file that is not YAML at
//! all fails the load ([`FileSourceError::Parse`], with the line), while a well-formed
//! document that is not a valid object of its kind is skipped with a [`Warning`] and the rest
//! of the file still loads.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use super::convert::{
    self, ObjectRef, Warning, DEFAULT_NAMESPACE, KIND_ENDPOINT_SLICE, KIND_NODE, KIND_SERVICE,
    KIND_SERVICE_IMPORT, UNNAMED,
};
use super::mcs;
use crate::store::Store;

/// What a directory held.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The Services, EndpointSlices and Nodes that converted.
    pub store: Store,
    /// Everything skipped along the way, each with the file it came from as its origin.
    pub warnings: Vec<Warning>,
    /// How many YAML files were read.
    pub files: usize,
}

/// Why a directory could not be loaded at all.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    /// The path given does not exist.
    #[error("{}: no such file or directory", path.display())]
    NotFound { path: PathBuf },
    /// A file or directory exists but could not be read.
    #[error("{}: could not read", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file is not valid YAML. `line` and `column` are 1-based and count from the start of
    /// the file (not of the document); both are 0 in the rare case the parser gives no
    /// position (recursion or repetition limits).
    #[error("{}:{line}:{column}: could not parse YAML: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl FileSourceError {
    /// A copy of an error remembered with the file that caused it (`io::Error` is not
    /// `Clone`; the copy keeps its kind and message).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::NotFound { path } => Self::NotFound { path: path.clone() },
            Self::Io { path, source } => Self::Io {
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Self::Parse {
                path,
                line,
                column,
                message,
            } => Self::Parse {
                path: path.clone(),
                line: *line,
                column: *column,
                message: message.clone(),
            },
        }
    }
}

/// Loads every Service, EndpointSlice and Node from the YAML files under `path`, which may
/// also name a single file (read whatever its extension).
pub fn load_dir(path: &Path) -> Result<Loaded, FileSourceError> {
    let files = yaml_files(path)?;
    let mut loaded = Loaded::default();
    for file in &files {
        load_file(file, &mut loaded)?;
        loaded.files += 1;
    }
    Ok(loaded)
}

/// The files [`load_dir`] reads for `path`, in the order it reads them.
pub fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, FileSourceError> {
    let metadata = fs::metadata(path).map_err(|source| io_error(path, source))?;
    let mut files = Vec::new();
    if metadata.is_dir() {
        collect_yaml_files(path, &mut files, &mut HashSet::new())?;
    } else {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

pub(crate) fn io_error(path: &Path, source: io::Error) -> FileSourceError {
    if source.kind() == io::ErrorKind::NotFound {
        FileSourceError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        FileSourceError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|name| name.as_encoded_bytes().starts_with(b"."))
}

fn is_yaml(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

/// Appends the YAML files under `dir` in sorted path order. Hidden entries are skipped: they
/// are editor and VCS leftovers, and in a ConfigMap volume the `..data` links that would
/// otherwise list every file twice.
fn collect_yaml_files(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    visited: &mut HashSet<PathBuf>,
) -> Result<(), FileSourceError> {
    // Symlinked directories can form a loop; each real directory is read once.
    let real = fs::canonicalize(dir).map_err(|source| io_error(dir, source))?;
    if !visited.insert(real) {
        return Ok(());
    }
    let mut entries = fs::read_dir(dir)
        .and_then(|entries| {
            entries
                .map(|entry| entry.map(|e| e.path()))
                .collect::<io::Result<Vec<_>>>()
        })
        .map_err(|source| io_error(dir, source))?;
    entries.sort();
    for entry in entries {
        if is_hidden(&entry) {
            continue;
        }
        // Follows symlinks, so a linked file or directory counts as what it points to.
        let metadata = match fs::metadata(&entry) {
            Ok(metadata) => metadata,
            // A dangling link is only worth failing for if it was meant to be read.
            Err(_) if !is_yaml(&entry) => continue,
            Err(source) => return Err(io_error(&entry, source)),
        };
        if metadata.is_dir() {
            collect_yaml_files(&entry, files, visited)?;
        } else if metadata.is_file() && is_yaml(&entry) {
            files.push(entry);
        }
    }
    Ok(())
}

fn load_file(path: &Path, loaded: &mut Loaded) -> Result<(), FileSourceError> {
    let bytes = fs::read(path).map_err(|source| io_error(path, source))?;
    load_bytes(path, &bytes, loaded)
}

/// Loads the objects of one file's contents into `loaded`; `path` names the file in errors
/// and warnings. Contents that are not UTF-8 (a binary file, a file in another encoding) are
/// a [`FileSourceError::Parse`] naming the first bad byte's line and column, as YAML itself
/// must be UTF-8.
pub fn load_bytes(path: &Path, bytes: &[u8], loaded: &mut Loaded) -> Result<(), FileSourceError> {
    let text = std::str::from_utf8(bytes).map_err(|error| not_utf8(path, bytes, &error))?;
    let origin = path.display().to_string();
    let mut file = FileLoader {
        text,
        origin: &origin,
        loaded,
    };
    for (document, deserializer) in serde_yaml::Deserializer::from_str(text).enumerate() {
        // After a syntax error the document iterator yields the same error forever, so the
        // first one has to end the file.
        let value = Value::deserialize(deserializer).map_err(|error| parse_error(path, &error))?;
        file.object(value, &Position::document(document), None);
    }
    Ok(())
}

fn not_utf8(path: &Path, bytes: &[u8], error: &std::str::Utf8Error) -> FileSourceError {
    let valid = &bytes[..error.valid_up_to()];
    let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = valid
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |newline| newline + 1);
    // The column counts characters, as serde_yaml's do; the valid prefix is UTF-8.
    let column = String::from_utf8_lossy(&valid[line_start..])
        .chars()
        .count()
        + 1;
    FileSourceError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        message: format!(
            "not UTF-8 (byte 0x{:02x} at offset {}); YAML files must be UTF-8",
            bytes[error.valid_up_to()],
            error.valid_up_to()
        ),
    }
}

fn parse_error(path: &Path, error: &serde_yaml::Error) -> FileSourceError {
    let (line, column) = error
        .location()
        .map_or((0, 0), |at| (at.line(), at.column()));
    // The position is carried separately, so serde_yaml's copy of it leaves the message.
    // (It writes none for the very first character of the file, hence the search.)
    let mut message = error.to_string();
    let at = format!(" at line {line} column {column}");
    if let Some(start) = message.find(&at) {
        message.replace_range(start..start + at.len(), "");
    }
    FileSourceError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

/// Where an object sits in its file: the document, then the `items` index at each list level.
#[derive(Debug, Clone)]
struct Position {
    document: usize,
    items: Vec<usize>,
}

impl Position {
    fn document(document: usize) -> Self {
        Self {
            document,
            items: Vec::new(),
        }
    }

    fn item(&self, index: usize) -> Self {
        let mut items = self.items.clone();
        items.push(index);
        Self {
            document: self.document,
            items,
        }
    }
}

/// `kind` and `apiVersion` a typed list (`ServiceList`) implies for items that omit them.
#[derive(Clone, Copy)]
struct ItemDefaults<'a> {
    kind: &'a str,
    api_version: &'a str,
}

struct FileLoader<'a> {
    text: &'a str,
    origin: &'a str,
    loaded: &'a mut Loaded,
}

impl FileLoader<'_> {
    fn object(&mut self, value: Value, position: &Position, defaults: Option<ItemDefaults<'_>>) {
        let Value::Mapping(mut map) = value else {
            if !value.is_null() {
                tracing::debug!(
                    file = self.origin,
                    ?position,
                    "ignoring a document that is not a mapping"
                );
            }
            return;
        };
        let kind = string_at(&map, "kind")
            .or(defaults.map(|d| d.kind))
            .unwrap_or_default()
            .to_owned();
        let api_version = string_at(&map, "apiVersion")
            .or(defaults.map(|d| d.api_version))
            .unwrap_or_default()
            .to_owned();
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => {
                if let Some(svc) = self.decode::<core::Service>(KIND_SERVICE, true, map, position) {
                    if let Some(service) = convert::service_from_api(
                        &svc,
                        Some(self.origin),
                        &mut self.loaded.warnings,
                    ) {
                        self.loaded.store.upsert_service(service);
                    }
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => self.endpoint_slice(map, position),
            (mcs::API_VERSION, mcs::KIND) => {
                if let Some(api_import) =
                    self.decode::<mcs::ServiceImport>(KIND_SERVICE_IMPORT, true, map, position)
                {
                    if let Some(import) = convert::service_import_from_api(
                        &api_import,
                        Some(self.origin),
                        &mut self.loaded.warnings,
                    ) {
                        self.loaded.store.upsert_service(import);
                    }
                }
            }
            ("v1", "Node") => {
                if let Some(api_node) = self.decode::<core::Node>(KIND_NODE, false, map, position) {
                    if let Some(node) = convert::node_from_api(
                        &api_node,
                        Some(self.origin),
                        &mut self.loaded.warnings,
                    ) {
                        self.loaded.store.upsert_node(node);
                    }
                }
            }
            (_, list) if list.ends_with("List") => {
                // `kind: List` items name their own kind; a `ServiceList`'s may leave it out,
                // as the API server's list responses do.
                let item_kind = list.strip_suffix("List").filter(|k| !k.is_empty());
                let item_defaults = item_kind.map(|kind| ItemDefaults {
                    kind,
                    api_version: &api_version,
                });
                self.list_items(list, map.remove("items"), position, item_defaults);
            }
            _ => {
                tracing::debug!(
                    file = self.origin,
                    ?position,
                    api_version,
                    kind,
                    "ignoring an object of a kind the proxy does not use"
                );
            }
        }
    }

    /// An EndpointSlice, which may feed a Service, a ServiceImport, or (both labels) both.
    fn endpoint_slice(&mut self, map: Mapping, position: &Position) {
        let Some(api_slice) =
            self.decode::<discovery::EndpointSlice>(KIND_ENDPOINT_SLICE, true, map, position)
        else {
            return;
        };
        let import = convert::is_import_slice(&api_slice);
        if import {
            if let Some(slice) = convert::import_slice_from_api(
                &api_slice,
                Some(self.origin),
                &mut self.loaded.warnings,
            ) {
                self.loaded.store.upsert_slice(slice);
            }
        }
        if !import || convert::is_service_slice(&api_slice) {
            if let Some(slice) =
                convert::slice_from_api(&api_slice, Some(self.origin), &mut self.loaded.warnings)
            {
                self.loaded.store.upsert_slice(slice);
            }
        }
    }

    /// The items of a `kind: List` (or `ServiceList`, ...), each loaded as an object.
    fn list_items(
        &mut self,
        list: &str,
        items: Option<Value>,
        position: &Position,
        item_defaults: Option<ItemDefaults<'_>>,
    ) {
        match items {
            Some(Value::Sequence(items)) => {
                for (index, item) in items.into_iter().enumerate() {
                    self.object(item, &position.item(index), item_defaults);
                }
            }
            None | Some(Value::Null) => {}
            Some(_) => {
                tracing::debug!(
                    file = self.origin,
                    ?position,
                    kind = list,
                    "ignoring a list whose items are not a sequence"
                );
            }
        }
    }

    /// Decodes one object into its API type, or warns (naming the field and line when
    /// serde_yaml can tell them) and returns `None`.
    fn decode<T: DeserializeOwned>(
        &mut self,
        kind: &'static str,
        namespaced: bool,
        map: Mapping,
        position: &Position,
    ) -> Option<T> {
        let object = object_ref(kind, namespaced, &map);
        let mut value = Value::Mapping(map);
        // kubectl honours YAML merge keys (`<<: *defaults`); serde_yaml only on request.
        let decoded = value
            .apply_merge()
            .and_then(|()| serde_yaml::from_value::<T>(value));
        match decoded {
            Ok(decoded) => Some(decoded),
            Err(error) => {
                let detail = self.explain_error::<T>(position, &error);
                self.loaded.warnings.push(Warning {
                    object,
                    origin: Some(self.origin.to_owned()),
                    message: format!("not a valid {kind}: {detail}; object skipped"),
                });
                None
            }
        }
    }

    /// Says where a decoding error is. Decoding a Value loses the field path and line, so
    /// the same object is decoded again straight from the text, which keeps both; only
    /// failures pay for that second parse. Decoding from text is laxer about scalars (it
    /// reads `clusterIP: 5` as the string "5", which the API server would reject), so when
    /// it succeeds the Value's message is kept and the object's own line is added.
    fn explain_error<T: DeserializeOwned>(
        &self,
        position: &Position,
        error: &serde_yaml::Error,
    ) -> String {
        if let Some(Err(located)) = self.decode_in_text::<T>(position) {
            return located.to_string();
        }
        let mut message = position
            .items
            .iter()
            .map(|index| format!("items[{index}]"))
            .collect::<Vec<_>>()
            .join(".");
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&error.to_string());
        let start = self
            .decode_in_text::<ObjectStart>(position)
            .and_then(Result::err)
            .and_then(|error| error.location());
        if let Some(at) = start {
            message.push_str(&format!(
                " (object at line {} column {})",
                at.line(),
                at.column()
            ));
        }
        message
    }

    /// Decodes the object at `position` straight from the file's text.
    fn decode_in_text<T: DeserializeOwned>(
        &self,
        position: &Position,
    ) -> Option<Result<T, serde_yaml::Error>> {
        let deserializer = serde_yaml::Deserializer::from_str(self.text).nth(position.document)?;
        let seed = AtItem::<T> {
            items: &position.items,
            target: PhantomData,
        };
        Some(seed.deserialize(deserializer))
    }
}

/// Never decodes: it fails at the first event of the object, so that serde_yaml stamps the
/// error with the object's line.
struct ObjectStart;

impl<'de> Deserialize<'de> for ObjectStart {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectStart)
    }
}

impl<'de> de::Visitor<'de> for ObjectStart {
    type Value = ObjectStart;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("nothing")
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<Self, A::Error> {
        Err(de::Error::custom("object starts here"))
    }
}

fn string_at<'m>(map: &'m Mapping, key: &str) -> Option<&'m str> {
    map.get(key).and_then(Value::as_str)
}

/// The reference for a warning about an object that did not decode, read from its raw
/// metadata as far as that is readable.
fn object_ref(kind: &'static str, namespaced: bool, map: &Mapping) -> ObjectRef {
    let metadata = map.get("metadata").and_then(Value::as_mapping);
    let field = |key: &str| {
        metadata
            .and_then(|m| string_at(m, key))
            .filter(|v| !v.is_empty())
    };
    ObjectRef {
        kind,
        namespace: namespaced.then(|| field("namespace").unwrap_or(DEFAULT_NAMESPACE).to_owned()),
        name: field("name").unwrap_or(UNNAMED).to_owned(),
    }
}

/// Deserializes the object at `items` (indices into nested lists' `items`) of a document
/// into `T`, skipping everything around it, so that an error carries the path and line of
/// the offending field.
struct AtItem<'p, T> {
    items: &'p [usize],
    target: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for AtItem<'_, T> {
    type Value = T;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        match self.items.split_first() {
            None => T::deserialize(deserializer),
            Some((&index, rest)) => deserializer.deserialize_map(ListVisitor {
                index,
                rest,
                target: PhantomData,
            }),
        }
    }
}

/// Finds `items` in a list object.
struct ListVisitor<'p, T> {
    index: usize,
    rest: &'p [usize],
    target: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> de::Visitor<'de> for ListVisitor<'_, T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Value>()? {
            if found.is_none() && key.as_str() == Some("items") {
                found = Some(map.next_value_seed(ItemsSeed {
                    index: self.index,
                    rest: self.rest,
                    target: PhantomData,
                })?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        found.ok_or_else(|| de::Error::missing_field("items"))
    }
}

/// Picks element `index` of a list's `items`.
struct ItemsSeed<'p, T> {
    index: usize,
    rest: &'p [usize],
    target: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for ItemsSeed<'_, T> {
    type Value = T;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> de::Visitor<'de> for ItemsSeed<'_, T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a sequence of at least {} items", self.index + 1)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        for skipped in 0..self.index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::invalid_length(skipped, &self));
            }
        }
        let item = seq
            .next_element_seed(AtItem {
                items: self.rest,
                target: PhantomData,
            })?
            .ok_or_else(|| de::Error::invalid_length(self.index, &self))?;
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::model::{ServiceKey, SliceOrigin};

    /// A scratch directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "topoproxy-file-source-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn write(&self, relative: &str, text: &str) -> PathBuf {
            let path = self.0.join(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, text).unwrap();
            path
        }

        fn load(&self) -> Loaded {
            load_dir(&self.0).unwrap_or_else(|e| panic!("{e}"))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn service(name: &str, cluster_ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: prod\n\
             spec:\n  clusterIP: {cluster_ip}\n  ports:\n  - name: http\n    port: 80\n"
        )
    }

    const SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: prod
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses: [10.1.0.1]
  nodeName: node-a
";

    const NODE: &str = "\
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels:
    topology.kubernetes.io/zone: zone-1
status:
  addresses:
  - type: InternalIP
    address: 192.168.0.1
";

    fn service_names(loaded: &Loaded) -> Vec<String> {
        loaded.store.services().map(|s| s.key.to_string()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn multi_document_file_with_empty_documents() {
        let dir = Scratch::new();
        let text = format!(
            "---\n# a comment-only document\n---\n{}---\n{SLICE}---\n{NODE}---\n",
            service("web", "10.0.0.1")
        );
        dir.write("cluster.yaml", &text);
        let loaded = dir.load();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.files, 1);
        assert_eq!(service_names(&loaded), vec!["prod/web"]);
        let web = ServiceKey::new("prod", "web");
        assert_eq!(
            loaded.store.service(&web).unwrap().cluster_ips,
            vec![ip("10.0.0.1")]
        );
        let slices: Vec<_> = loaded.store.slices_of(&web).collect();
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].endpoints[0].address, ip("10.1.0.1"));
        assert_eq!(slices[0].endpoints[0].node_name.as_deref(), Some("node-a"));
        let node = loaded.store.node("node-a").unwrap();
        assert_eq!(node.zone.as_deref(), Some("zone-1"));
        assert_eq!(node.addresses, vec![ip("192.168.0.1")]);
    }

    #[test]
    fn nested_lists_and_typed_lists() {
        let dir = Scratch::new();
        dir.write(
            "list.yaml",
            "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a, namespace: prod}
  spec: {clusterIP: 10.0.0.1}
- apiVersion: v1
  kind: List
  items:
  - apiVersion: v1
    kind: List
    items:
    - apiVersion: v1
      kind: Service
      metadata: {name: b, namespace: prod}
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: a-1
      namespace: prod
      labels: {kubernetes.io/service-name: a}
    addressType: IPv4
    endpoints: [{addresses: [10.1.0.1]}]
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: ignored}
- apiVersion: v1
  kind: List
  items: []
metadata:
  resourceVersion: \"\"
---
# What the API server returns for a list: items without kind or apiVersion.
apiVersion: v1
kind: ServiceList
items:
- metadata: {name: c, namespace: prod}
---
apiVersion: v1
kind: NodeList
items:
- metadata: {name: node-x}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSliceList
items:
- metadata:
    name: c-1
    namespace: prod
    labels: {kubernetes.io/service-name: c}
  addressType: IPv6
  endpoints: [{addresses: [\"fd00::1\"]}]
",
        );
        let loaded = dir.load();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(service_names(&loaded), vec!["prod/a", "prod/b", "prod/c"]);
        assert_eq!(loaded.store.slice_count(), 2);
        let c_slices: Vec<_> = loaded
            .store
            .slices_of(&ServiceKey::new("prod", "c"))
            .collect();
        assert_eq!(c_slices[0].endpoints[0].address, ip("fd00::1"));
        assert!(loaded.store.node("node-x").is_some());
    }

    #[test]
    fn other_kinds_and_api_groups_are_ignored() {
        let dir = Scratch::new();
        dir.write(
            "other.yaml",
            "\
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: b}
---
# A Knative Service is not a core Service.
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: knative}
spec: {template: {}}
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: old}
---
just a string
---
- a
- sequence
---
apiVersion: v1
kind: Service
metadata: {name: real}
",
        );
        let loaded = dir.load();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(service_names(&loaded), vec!["default/real"]);
        assert_eq!(loaded.store.slice_count(), 0);
    }

    #[test]
    fn directory_walk_is_recursive_sorted_and_skips_hidden() {
        let dir = Scratch::new();
        // Same Service in two files: the later path in sorted order wins.
        dir.write("b/second.yml", &service("web", "10.0.0.2"));
        dir.write("a.yaml", &service("web", "10.0.0.1"));
        dir.write("c/d/deep.YAML", &service("deep", "10.0.0.3"));
        dir.write(".hidden.yaml", &service("hidden", "10.0.0.4"));
        dir.write(".git/x.yaml", &service("git", "10.0.0.5"));
        dir.write("sub/.cache/y.yaml", &service("cache", "10.0.0.6"));
        // Not YAML by name, and not YAML by content either: never read.
        dir.write("README.md", "a: [\n");
        dir.write("notes.txt", "{{{");
        let loaded = dir.load();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.files, 3);
        assert_eq!(service_names(&loaded), vec!["prod/deep", "prod/web"]);
        let web = loaded
            .store
            .service(&ServiceKey::new("prod", "web"))
            .unwrap();
        assert_eq!(web.cluster_ips, vec![ip("10.0.0.2")]);
    }

    #[test]
    fn a_single_file_path_is_accepted() {
        let dir = Scratch::new();
        let path = dir.write("cluster.txt", &service("web", "10.0.0.1"));
        dir.write("other.yaml", &service("other", "10.0.0.2"));
        let loaded = load_dir(&path).unwrap();
        assert_eq!(loaded.files, 1);
        assert_eq!(service_names(&loaded), vec!["prod/web"]);
    }

    #[test]
    fn empty_directory_and_empty_file() {
        let dir = Scratch::new();
        let loaded = dir.load();
        assert_eq!((loaded.files, loaded.store.service_count()), (0, 0));
        dir.write("empty.yaml", "");
        dir.write("blank.yaml", "\n# nothing\n");
        let loaded = dir.load();
        assert_eq!((loaded.files, loaded.store.service_count()), (2, 0));
        assert!(loaded.warnings.is_empty());
    }

    #[test]
    fn missing_path_is_not_found() {
        let dir = Scratch::new();
        let missing = dir.0.join("nope");
        let error = load_dir(&missing).unwrap_err();
        assert!(
            matches!(&error, FileSourceError::NotFound { path } if *path == missing),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!("{}: no such file or directory", missing.display())
        );
    }

    #[test]
    fn bad_yaml_reports_the_line_in_the_file() {
        // (file text, line, column, message)
        let cases = [
            // The error is in the second document: lines count from the top of the file.
            (
                format!("{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: [x}}\n", service("web", "10.0.0.1")),
                14,
                20,
                "did not find expected ',' or ']', while parsing a flow sequence at line 14 column 18",
            ),
            (
                "a: 1\n---\nb: 2\nc: [1,\n  d: }\n".to_owned(),
                5,
                6,
                "did not find expected node content, while parsing a flow node",
            ),
            // The context's own position (line 1 column 1 here) is not repeated.
            (
                "\"unterminated\n".to_owned(),
                2,
                1,
                "found unexpected end of stream, while scanning a quoted scalar",
            ),
            (
                "@invalid\n".to_owned(),
                1,
                1,
                "found character that cannot start any token, while scanning for the next token",
            ),
            // serde_yaml puts a duplicate key at the start of its mapping, not at the key.
            (
                "a: 1\n---\nkind: x\nb: 1\nb: 2\n".to_owned(),
                3,
                1,
                "duplicate entry with key \"b\"",
            ),
        ];
        for (text, line, column, message) in cases {
            let dir = Scratch::new();
            dir.write("a-good.yaml", &service("ok", "10.0.0.9"));
            let path = dir.write("bad.yaml", &text);
            let error = dir_load_error(&dir);
            match &error {
                FileSourceError::Parse {
                    path: error_path,
                    line: l,
                    column: c,
                    message: m,
                } => {
                    assert_eq!(error_path, &path);
                    assert_eq!((*l, *c, m.as_str()), (line, column, message), "{text}");
                }
                other => panic!("expected a parse error, got {other:?}"),
            }
            assert_eq!(
                error.to_string(),
                format!(
                    "{}:{line}:{column}: could not parse YAML: {message}",
                    path.display()
                )
            );
        }
    }

    fn dir_load_error(dir: &Scratch) -> FileSourceError {
        match load_dir(&dir.0) {
            Ok(loaded) => panic!("expected an error, loaded {:?}", service_names(&loaded)),
            Err(error) => error,
        }
    }

    #[test]
    fn a_bad_object_does_not_disturb_the_rest_of_its_file() {
        let dir = Scratch::new();
        let path = dir.write(
            "mixed.yaml",
            &format!(
                "{}---
apiVersion: v1
kind: Service
metadata:
  name: bad-port
  namespace: prod
spec:
  ports:
  - port: \"abc\"
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {{name: bad-ip}}
  spec:
    clusterIP: 5
- apiVersion: v1
  kind: Node
  metadata: {{name: node-a}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: {{}}
---
{SLICE}",
                service("web", "10.0.0.1")
            ),
        );
        let loaded = dir.load();
        assert_eq!(service_names(&loaded), vec!["prod/web"]);
        assert!(loaded.store.node("node-a").is_some());
        assert_eq!(loaded.store.slice_count(), 1);

        let origin = path.display().to_string();
        let rendered: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            vec![
                format!(
                    "{origin}: Service prod/bad-port: not a valid Service: spec.ports[0].port: \
                     invalid type: string \"abc\", expected i32 at line 19 column 11; object skipped"
                ),
                format!(
                    "{origin}: Service default/bad-ip: not a valid Service: items[0]: invalid type: \
                     integer `5`, expected a string (object at line 24 column 3); object skipped"
                ),
                format!(
                    "{origin}: EndpointSlice default/<unnamed>: not a valid EndpointSlice: endpoints: \
                     invalid type: map, expected a sequence at line 38 column 12; object skipped"
                ),
            ]
        );
        assert!(loaded
            .warnings
            .iter()
            .all(|w| w.origin.as_deref() == Some(origin.as_str())));
    }

    #[test]
    fn decode_warnings_locate_the_object() {
        // (file text, warning message)
        let cases = [
            // Deep in nested lists, the path runs from the top of the document.
            (
                "\
kind: List
apiVersion: v1
items:
- kind: ConfigMap
  apiVersion: v1
- kind: List
  apiVersion: v1
  items:
  - kind: Node
    apiVersion: v1
    metadata: {name: node-a}
    status:
      addresses: [{type: InternalIP, address: 10.0.0.1}, 7]
",
                "not a valid Node: items[1].items[0].status.addresses[1]: invalid type: integer \
                 `7`, expected NodeAddress at line 13 column 58; object skipped",
            ),
            // Reading the text would take `5` for a string, so the object's line is given.
            (
                "# leading comment\napiVersion: v1\nkind: Service\nmetadata: {name: x}\n\
                 spec: {clusterIP: 5}\n",
                "not a valid Service: invalid type: integer `5`, expected a string \
                 (object at line 2 column 1); object skipped",
            ),
            (
                "kind: NodeList\napiVersion: v1\nitems:\n- metadata: {name: a}\n\
                 - metadata: {name: b, labels: {topology.kubernetes.io/zone: true}}\n",
                "not a valid Node: items[1]: invalid type: boolean `true`, expected a string \
                 (object at line 5 column 3); object skipped",
            ),
        ];
        for (text, message) in cases {
            let dir = Scratch::new();
            dir.write("objects.yaml", text);
            let loaded = dir.load();
            assert_eq!(messages_of(&loaded), vec![message], "{text}");
        }
    }

    fn messages_of(loaded: &Loaded) -> Vec<&str> {
        loaded.warnings.iter().map(|w| w.message.as_str()).collect()
    }

    #[test]
    fn conversion_warnings_carry_the_file_as_origin() {
        let dir = Scratch::new();
        let path = dir.write(
            "slices.yaml",
            "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote-1
  namespace: prod
  labels:
    kubernetes.io/service-name: web
    multicluster.kubernetes.io/source-cluster: east
addressType: IPv4
endpoints:
- addresses: [\"fd00::1\"]
- addresses: [10.2.0.1]
",
        );
        let loaded = dir.load();
        let slice = loaded
            .store
            .slices_of(&ServiceKey::new("prod", "web"))
            .next()
            .unwrap();
        assert_eq!(slice.origin, SliceOrigin::Remote("east".into()));
        assert_eq!(slice.endpoints.len(), 1);
        assert_eq!(loaded.warnings.len(), 1);
        assert_eq!(
            loaded.warnings[0].to_string(),
            format!(
                "{}: EndpointSlice prod/remote-1: endpoints[0].addresses[0]: \"fd00::1\" is an IPv6 \
                 address but the slice's addressType is IPv4; endpoint skipped",
                path.display()
            )
        );
    }

    #[test]
    fn service_imports_and_their_slices_load_beside_services() {
        let dir = Scratch::new();
        dir.write(
            "mcs.yaml",
            "\
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {name: web, namespace: prod}
spec:
  type: ClusterSetIP
  ips: [10.42.0.10]
  ports: [{name: http, protocol: TCP, port: 80}]
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {name: db, namespace: prod}
spec: {type: Headless, ports: [{port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-east
  namespace: prod
  labels:
    multicluster.kubernetes.io/service-name: web
    multicluster.kubernetes.io/source-cluster: east
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.8.0.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-both
  namespace: prod
  labels:
    kubernetes.io/service-name: web
    multicluster.kubernetes.io/service-name: web
    multicluster.kubernetes.io/source-cluster: west
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.1]}]
",
        );
        let loaded = dir.load();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let web = loaded
            .store
            .service(&ServiceKey::import("prod", "web"))
            .expect("import");
        assert_eq!(web.cluster_ips, vec![ip("10.42.0.10")]);
        assert!(!web.headless);
        let db = loaded
            .store
            .service(&ServiceKey::import("prod", "db"))
            .expect("headless import");
        assert!(db.headless && db.cluster_ips.is_empty());
        // No Service prod/web exists; its slice role is kept all the same.
        assert!(loaded
            .store
            .service(&ServiceKey::new("prod", "web"))
            .is_none());
        let import_slices: Vec<&str> = loaded
            .store
            .slices_of(&ServiceKey::import("prod", "web"))
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(import_slices, ["web-both", "web-east"]);
        let service_slices: Vec<&str> = loaded
            .store
            .slices_of(&ServiceKey::new("prod", "web"))
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(service_slices, ["web-both"]);
        assert_eq!(loaded.store.slice_count(), 3);
    }

    #[test]
    fn yaml_merge_keys_are_applied() {
        let dir = Scratch::new();
        dir.write(
            "merge.yaml",
            "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a}
  spec: &spec
    clusterIP: 10.0.0.1
    ports: [{port: 80}]
- apiVersion: v1
  kind: Service
  metadata: {name: b}
  spec:
    <<: *spec
    clusterIP: 10.0.0.2
",
        );
        let loaded = dir.load();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let b = loaded
            .store
            .service(&ServiceKey::new("default", "b"))
            .unwrap();
        assert_eq!(b.cluster_ips, vec![ip("10.0.0.2")]);
        assert_eq!(b.ports.len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_directory_loops_are_read_once() {
        let dir = Scratch::new();
        dir.write("sub/web.yaml", &service("web", "10.0.0.1"));
        std::os::unix::fs::symlink(&dir.0, dir.0.join("sub/loop")).unwrap();
        let loaded = dir.load();
        assert_eq!(loaded.files, 1);
        assert_eq!(service_names(&loaded), vec!["prod/web"]);
    }
}
