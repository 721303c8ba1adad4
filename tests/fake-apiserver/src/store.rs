//! The object store behind the fake API server: one global resourceVersion counter (as etcd's
//! revision), the current objects of each kind, and a per-kind event history that serves
//! watches from an older resourceVersion and consistent paged lists.
//!
//! Every write serializes the object to JSON exactly once; lists and watches only copy those
//! bytes. Each history event keeps the object state before the write (`prev`, like etcd's
//! `prev_kv`), so the state of a kind at any retained resourceVersion `R` is "current objects,
//! with every key written after `R` replaced by the `prev` of its first write after `R`".

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::selector::{FieldSelector, LabelSelector};
use crate::Object;

/// Capacity (in messages; a bulk write is one message per kind) of each kind's live channel.
/// A watch that falls further behind than this is ended and the client re-watches from its
/// last resourceVersion.
const LIVE_CHANNEL_CAPACITY: usize = 4096;

/// The kinds of object the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// core/v1 Service (namespaced).
    Service,
    /// discovery.k8s.io/v1 EndpointSlice (namespaced).
    EndpointSlice,
    /// core/v1 Node (cluster-scoped).
    Node,
}

impl Kind {
    /// Every kind, in index order.
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    /// The `apiVersion` of objects of this kind.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The `kind` of objects of this kind.
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    /// The `kind` of a list of objects of this kind.
    pub fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => "ServiceList",
            Kind::EndpointSlice => "EndpointSliceList",
            Kind::Node => "NodeList",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Kind::Service => 0,
            Kind::EndpointSlice => 1,
            Kind::Node => 2,
        }
    }
}

/// Why an object could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The value is not a JSON object.
    #[error("object is not a JSON object")]
    NotAnObject,
    /// `metadata.name` is missing or empty.
    #[error("metadata.name is missing or empty")]
    MissingName,
    /// `metadata` has a field of the wrong JSON type.
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
}

/// (namespace, name); namespace is empty for cluster-scoped kinds.
pub(crate) type Key = (String, String);

/// One stored object version, with its JSON serialized once.
#[derive(Debug)]
pub(crate) struct Stored {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub json: Bytes,
}

impl Stored {
    fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One write, as kept in the history and sent to live watches.
#[derive(Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub ty: EventType,
    /// The object after the write; for a deletion, the last state stamped with the deletion's RV.
    pub obj: Arc<Stored>,
    /// The object before the write (None for a creation).
    pub prev: Option<Arc<Stored>>,
    prev_at_rv: OnceLock<Bytes>,
}

impl Event {
    /// The previous state stamped with this event's resourceVersion, which is what the API
    /// server sends as DELETED to a watch whose selector the object no longer matches.
    /// Computed at most once per event, whatever the number of watches.
    pub fn prev_json_at_rv(&self) -> Option<Bytes> {
        let prev = self.prev.as_ref()?;
        Some(
            self.prev_at_rv
                .get_or_init(|| restamp(&prev.json, self.rv))
                .clone(),
        )
    }
}

/// A message on a kind's live channel.
#[derive(Debug, Clone)]
pub(crate) enum Live {
    Events(Arc<Vec<Arc<Event>>>),
    Bookmark(u64),
}

/// What a list or watch is restricted to.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, o: &Stored) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == o.namespace)
            && self.fields.matches(&o.namespace, &o.name)
            && self.labels.matches(&o.labels)
    }
}

/// The requested resourceVersion is older than the retained history.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expired {
    pub requested: u64,
    /// The oldest resourceVersion that can still be served.
    pub oldest: u64,
}

/// A page of a consistent list.
pub(crate) struct Page {
    pub items: Vec<Arc<Stored>>,
    /// Set when more matching items follow: the key of the last item returned.
    pub more_after: Option<Key>,
}

/// Where a new watch starts.
pub(crate) enum WatchStart {
    /// Every event after the requested resourceVersion.
    Backlog(Vec<Arc<Event>>),
    /// Synthetic ADDED events for the current state (resourceVersion unset or "0").
    Initial(Vec<Arc<Stored>>),
}

/// The content of a write, before the store stamps it.
enum Body {
    /// A k8s-openapi object, serialized directly (no intermediate `Value`).
    Typed(Box<Object>),
    /// Raw JSON from `apply_raw`.
    Raw(Value),
}

/// An object validated and indexed, ready to be committed.
pub(crate) struct Prepared {
    pub kind: Kind,
    namespace: String,
    name: String,
    uid: Option<String>,
    labels: BTreeMap<String, String>,
    body: Body,
}

/// Validates a typed object and extracts what the store indexes. Runs outside the store lock.
pub(crate) fn prepare_typed(mut obj: Object) -> Result<Prepared, ApplyError> {
    let kind = obj.kind();
    let meta = obj.metadata_mut();
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(ApplyError::MissingName)?;
    let namespace = if kind.namespaced() {
        let ns = meta
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_string());
        meta.namespace = Some(ns.clone());
        ns
    } else {
        meta.namespace = None;
        String::new()
    };
    Ok(Prepared {
        kind,
        namespace,
        name,
        uid: meta.uid.clone().filter(|u| !u.is_empty()),
        labels: meta.labels.clone().unwrap_or_default(),
        body: Body::Typed(Box::new(obj)),
    })
}

/// Validates raw JSON and extracts what the store indexes. Runs outside the store lock.
pub(crate) fn prepare(kind: Kind, mut value: Value) -> Result<Prepared, ApplyError> {
    let obj = value.as_object_mut().ok_or(ApplyError::NotAnObject)?;
    obj.entry("apiVersion")
        .or_insert_with(|| Value::String(kind.api_version().to_string()));
    obj.entry("kind")
        .or_insert_with(|| Value::String(kind.kind().to_string()));
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| ApplyError::InvalidMetadata("metadata is not an object".into()))?;
    let name = match meta.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(ApplyError::MissingName),
    };
    let namespace = if kind.namespaced() {
        let ns = match meta.get("namespace") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            None | Some(Value::Null) | Some(Value::String(_)) => "default".to_string(),
            Some(other) => {
                return Err(ApplyError::InvalidMetadata(format!(
                    "metadata.namespace is not a string: {other}"
                )))
            }
        };
        meta.insert("namespace".into(), Value::String(ns.clone()));
        ns
    } else {
        meta.remove("namespace");
        String::new()
    };
    let uid = match meta.get("uid") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let mut labels = BTreeMap::new();
    match meta.get("labels") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                match v {
                    Value::String(s) => {
                        labels.insert(k.clone(), s.clone());
                    }
                    other => {
                        return Err(ApplyError::InvalidMetadata(format!(
                            "label {k:?} is not a string: {other}"
                        )))
                    }
                }
            }
        }
        Some(other) => {
            return Err(ApplyError::InvalidMetadata(format!(
                "metadata.labels is not an object: {other}"
            )))
        }
    }
    Ok(Prepared {
        kind,
        namespace,
        name,
        uid,
        labels,
        body: Body::Raw(value),
    })
}

fn set_meta(value: &mut Value, rv: u64, uid: Option<&str>) {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        if let Some(uid) = uid {
            meta.insert("uid".into(), Value::String(uid.to_string()));
        }
    }
}

fn to_bytes(value: &Value) -> Bytes {
    // Serializing a `serde_json::Value` cannot fail (all map keys are strings).
    Bytes::from(serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()))
}

/// Re-serializes stored JSON with another `metadata.resourceVersion`.
fn restamp(json: &[u8], rv: u64) -> Bytes {
    match serde_json::from_slice::<Value>(json) {
        Ok(mut v) => {
            set_meta(&mut v, rv, None);
            to_bytes(&v)
        }
        Err(_) => Bytes::copy_from_slice(json),
    }
}

struct KindStore {
    objects: BTreeMap<Key, Arc<Stored>>,
    history: VecDeque<Arc<Event>>,
    /// Events with `rv <= compacted_rv` are forgotten; older resourceVersions are "too old".
    compacted_rv: u64,
    tx: broadcast::Sender<Live>,
}

impl KindStore {
    fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted_rv: 0,
            tx: broadcast::channel(LIVE_CHANNEL_CAPACITY).0,
        }
    }

    fn events_after(&self, rv: u64) -> impl Iterator<Item = &Arc<Event>> {
        let start = self.history.partition_point(|e| e.rv <= rv);
        self.history.range(start..)
    }
}

/// All objects and their history. Lives behind a mutex; no method blocks or awaits.
pub(crate) struct Store {
    rv: u64,
    next_uid: u64,
    history_limit: Option<usize>,
    kinds: [KindStore; 3],
}

impl Store {
    pub fn new() -> Self {
        Self {
            // A fresh etcd is at revision 1; an empty list then reports resourceVersion "1".
            rv: 1,
            next_uid: 1,
            history_limit: None,
            kinds: [KindStore::new(), KindStore::new(), KindStore::new()],
        }
    }

    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn len(&self, kind: Kind) -> usize {
        self.kinds[kind.index()].objects.len()
    }

    pub fn history_len(&self, kind: Kind) -> usize {
        self.kinds[kind.index()].history.len()
    }

    pub fn set_history_limit(&mut self, limit: Option<usize>) {
        self.history_limit = limit;
        for k in Kind::ALL {
            self.trim(k);
        }
    }

    fn trim(&mut self, kind: Kind) {
        let Some(limit) = self.history_limit else {
            return;
        };
        let ks = &mut self.kinds[kind.index()];
        while ks.history.len() > limit {
            if let Some(e) = ks.history.pop_front() {
                ks.compacted_rv = ks.compacted_rv.max(e.rv);
            }
        }
    }

    fn push(&mut self, kind: Kind, ev: Arc<Event>) {
        self.kinds[kind.index()].history.push_back(ev);
        self.trim(kind);
    }

    /// Creates or replaces an object: one new resourceVersion, one ADDED or MODIFIED event.
    pub fn commit(&mut self, p: Prepared) -> Arc<Event> {
        let Prepared {
            kind,
            namespace,
            name,
            uid,
            labels,
            body,
        } = p;
        self.rv += 1;
        let rv = self.rv;
        let key = (namespace, name);
        let prev = self.kinds[kind.index()].objects.get(&key).cloned();
        let uid = match (&prev, uid) {
            (Some(prev), _) => prev.uid.clone(),
            (None, Some(uid)) => uid,
            (None, None) => {
                let n = self.next_uid;
                self.next_uid += 1;
                format!("fa4e0000-0000-4000-8000-{n:012x}")
            }
        };
        let json = match body {
            Body::Raw(mut value) => {
                set_meta(&mut value, rv, Some(&uid));
                to_bytes(&value)
            }
            Body::Typed(mut obj) => {
                let meta = obj.metadata_mut();
                meta.resource_version = Some(rv.to_string());
                meta.uid = Some(uid.clone());
                obj.to_json()
            }
        };
        let stored = Arc::new(Stored {
            namespace: key.0.clone(),
            name: key.1.clone(),
            uid,
            labels,
            json,
        });
        self.kinds[kind.index()]
            .objects
            .insert(key, Arc::clone(&stored));
        let ev = Arc::new(Event {
            rv,
            ty: if prev.is_some() {
                EventType::Modified
            } else {
                EventType::Added
            },
            obj: stored,
            prev,
            prev_at_rv: OnceLock::new(),
        });
        self.push(kind, Arc::clone(&ev));
        ev
    }

    /// Deletes an object: one new resourceVersion and a DELETED event, or None if absent.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<Arc<Event>> {
        let key = (namespace.to_string(), name.to_string());
        let prev = self.kinds[kind.index()].objects.remove(&key)?;
        self.rv += 1;
        let rv = self.rv;
        let obj = Arc::new(Stored {
            namespace: prev.namespace.clone(),
            name: prev.name.clone(),
            uid: prev.uid.clone(),
            labels: prev.labels.clone(),
            json: restamp(&prev.json, rv),
        });
        let ev = Arc::new(Event {
            rv,
            ty: EventType::Deleted,
            obj,
            prev: Some(prev),
            prev_at_rv: OnceLock::new(),
        });
        self.push(kind, Arc::clone(&ev));
        Some(ev)
    }

    /// Sends a batch of events (all of `kind`) to the live watches. Call with the lock held,
    /// right after the writes, so live order equals history order.
    pub fn publish(&self, kind: Kind, batch: Vec<Arc<Event>>) {
        if !batch.is_empty() {
            // An error only means there is no live watch.
            let _ = self.kinds[kind.index()]
                .tx
                .send(Live::Events(Arc::new(batch)));
        }
    }

    pub fn send_bookmarks(&self) {
        for ks in &self.kinds {
            let _ = ks.tx.send(Live::Bookmark(self.rv));
        }
    }

    /// Forgets every event up to the current resourceVersion.
    pub fn compact(&mut self) -> u64 {
        let rv = self.rv;
        for ks in &mut self.kinds {
            ks.history.clear();
            ks.compacted_rv = rv;
        }
        rv
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Arc<Stored>> {
        self.kinds[kind.index()]
            .objects
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// One page of the list of `kind` as it was at resourceVersion `at` (which must not be
    /// newer than the current one), starting after `after`, with at most `limit` items that
    /// match `filter`.
    pub fn list(
        &self,
        kind: Kind,
        at: u64,
        after: Option<&Key>,
        limit: Option<usize>,
        filter: &Filter,
    ) -> Result<Page, Expired> {
        let ks = &self.kinds[kind.index()];
        if at < ks.compacted_rv {
            return Err(Expired {
                requested: at,
                oldest: ks.compacted_rv,
            });
        }
        // Keys written after `at`, with their state at `at` (the first write's `prev`).
        let mut overrides: BTreeMap<Key, Option<&Arc<Stored>>> = BTreeMap::new();
        if at < self.rv {
            for ev in ks.events_after(at) {
                overrides
                    .entry(ev.obj.key())
                    .or_insert_with(|| ev.prev.as_ref());
            }
        }
        let lower: Bound<Key> = match (after, &filter.namespace) {
            (Some(k), _) => Bound::Excluded(k.clone()),
            (None, Some(ns)) => Bound::Included((ns.clone(), String::new())),
            (None, None) => Bound::Unbounded,
        };
        let range = (lower, Bound::Unbounded);
        let current = ks
            .objects
            .range::<Key, _>(range.clone())
            .filter(|(k, _)| !overrides.contains_key(*k));
        let old = overrides
            .range::<Key, _>(range)
            .filter_map(|(k, v)| v.map(|v| (k, v)));
        let ns = filter.namespace.as_deref();
        let mut matching = MergeByKey {
            a: current.peekable(),
            b: old.peekable(),
        }
        .skip_while(|(k, _)| ns.is_some_and(|ns| k.0.as_str() < ns))
        .take_while(|(k, _)| ns.is_none_or(|ns| k.0 == ns))
        .filter(|(_, o)| filter.matches(o));

        let limit = limit.unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last: Option<&Key> = None;
        for (k, o) in matching.by_ref() {
            if items.len() == limit {
                // There is at least one more matching item.
                return Ok(Page {
                    items,
                    more_after: last.cloned(),
                });
            }
            items.push(Arc::clone(o));
            last = Some(k);
        }
        Ok(Page {
            items,
            more_after: None,
        })
    }

    /// Starts a watch of `kind`: what to send first and the live receiver, subscribed at the
    /// same instant so nothing is missed or sent twice. `from == None` means "current state".
    pub fn open_watch(
        &self,
        kind: Kind,
        from: Option<u64>,
    ) -> Result<(WatchStart, broadcast::Receiver<Live>), Expired> {
        let ks = &self.kinds[kind.index()];
        let start = match from {
            None => WatchStart::Initial(ks.objects.values().cloned().collect()),
            Some(rv) if rv < ks.compacted_rv => {
                return Err(Expired {
                    requested: rv,
                    oldest: ks.compacted_rv,
                })
            }
            Some(rv) => WatchStart::Backlog(ks.events_after(rv).cloned().collect()),
        };
        Ok((start, ks.tx.subscribe()))
    }
}

/// Merges two key-sorted iterators with disjoint keys.
struct MergeByKey<A: Iterator, B: Iterator> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<'a, A, B> Iterator for MergeByKey<A, B>
where
    A: Iterator<Item = (&'a Key, &'a Arc<Stored>)>,
    B: Iterator<Item = (&'a Key, &'a Arc<Stored>)>,
{
    type Item = (&'a Key, &'a Arc<Stored>);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.a.peek(), self.b.peek()) {
            (Some((ka, _)), Some((kb, _))) => {
                if ka <= kb {
                    self.a.next()
                } else {
                    self.b.next()
                }
            }
            (Some(_), None) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(ns: &str, name: &str, labels: Value) -> Prepared {
        prepare(
            Kind::Service,
            json!({"metadata": {"namespace": ns, "name": name, "labels": labels}}),
        )
        .expect("valid")
    }

    fn names(p: &Page) -> Vec<String> {
        p.items.iter().map(|o| o.name.clone()).collect()
    }

    #[test]
    fn list_at_older_rv_sees_old_state() {
        let mut s = Store::new();
        s.commit(svc("a", "x", json!({})));
        s.commit(svc("a", "y", json!({})));
        let at = s.rv();
        s.commit(svc("a", "z", json!({})));
        s.delete(Kind::Service, "a", "x");
        s.commit(svc("a", "y", json!({"new": "1"})));
        let f = Filter::default();
        let now = s.list(Kind::Service, s.rv(), None, None, &f).expect("list");
        assert_eq!(names(&now), ["y", "z"]);
        let old = s.list(Kind::Service, at, None, None, &f).expect("list");
        assert_eq!(names(&old), ["x", "y"]);
        assert!(old.items[1].labels.is_empty(), "old version of y");
        let page = s.list(Kind::Service, at, None, Some(1), &f).expect("list");
        assert_eq!(names(&page), ["x"]);
        let next = s
            .list(Kind::Service, at, page.more_after.as_ref(), Some(1), &f)
            .expect("list");
        assert_eq!(names(&next), ["y"]);
        assert!(next.more_after.is_none());
        s.compact();
        assert!(s.list(Kind::Service, at, None, None, &f).is_err());
    }

    #[test]
    fn namespace_range() {
        let mut s = Store::new();
        for ns in ["a", "b", "c"] {
            for n in ["1", "2"] {
                s.commit(svc(ns, n, json!({})));
            }
        }
        let f = Filter {
            namespace: Some("b".into()),
            ..Filter::default()
        };
        let p = s.list(Kind::Service, s.rv(), None, None, &f).expect("list");
        assert_eq!(names(&p), ["1", "2"]);
        assert!(p.items.iter().all(|o| o.namespace == "b"));
    }

    #[test]
    fn uid_kept_and_rv_stamped() {
        let mut s = Store::new();
        let a = s.commit(svc("a", "x", json!({})));
        let b = s.commit(svc("a", "x", json!({"l": "v"})));
        assert_eq!(a.obj.uid, b.obj.uid);
        assert_eq!(b.ty, EventType::Modified);
        let v: Value = serde_json::from_slice(&b.obj.json).expect("json");
        assert_eq!(v["metadata"]["resourceVersion"], json!(b.rv.to_string()));
        assert_eq!(v["kind"], json!("Service"));
        let prev: Value =
            serde_json::from_slice(&b.prev_json_at_rv().expect("prev")).expect("json");
        assert_eq!(prev["metadata"]["resourceVersion"], json!(b.rv.to_string()));
        assert!(prev["metadata"]["labels"]
            .as_object()
            .is_some_and(|m| m.is_empty()));
    }
}
