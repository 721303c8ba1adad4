//! An in-process fake Kubernetes API server for topoproxy's end-to-end tests and sync
//! benchmarks.
//!
//! It serves Services, EndpointSlices and Nodes over plain HTTP on loopback with the list and
//! watch semantics that `kube::runtime::watcher` relies on:
//!
//! - one global resourceVersion counter (as etcd's revision); every write gets the next one and
//!   the object's `metadata.resourceVersion` is set to it; creation assigns `metadata.uid`;
//! - lists with `limit`/`continue` paging over a consistent snapshot (the continue token holds
//!   the list's resourceVersion and the last key), `resourceVersion` + `resourceVersionMatch`,
//!   `labelSelector` and `fieldSelector` (`metadata.name`, `metadata.namespace`);
//! - watches as newline-delimited JSON events from any retained resourceVersion, with the API
//!   server's selector rule (an object that stops matching is DELETED for that watch, one that
//!   starts matching is ADDED), `timeoutSeconds`, bookmarks on request, `sendInitialEvents`,
//!   and `410 Expired` ERROR events for resourceVersions older than the retained history.
//!
//! Test controls on [`FakeApiServer`] write objects, inject faults (unavailability, dropped
//! watch connections, compaction) and count requests.
//!
//! # What it is still for
//!
//! The agent's behaviour against Kubernetes is tested against the real control plane
//! (`k8s-harness`, `tests/k8s_agent.rs`): TLS and token auth, RBAC, the real EndpointSlice
//! controller's hints, apiserver kills and HA failover, etcd compaction and 410 re-lists, paged
//! lists. This fake stays only for what the real server cannot be made to do on demand:
//!
//! - serve objects it would refuse to store (invalid IPs and ports, wrong types: what an older
//!   server, a webhook-less CRD conversion or another writer can leave behind), verbatim;
//! - faults at an exact point without restarting a process: a watch connection dropped
//!   mid-stream, a window of 503s, history compacted under one open watch;
//! - the in-process sync benchmark (`benches/sync.rs`) and the separate-process memory
//!   measurement, where a synthetic cluster of 50,000 Services appears in milliseconds.
//!
//! ```no_run
//! # async fn demo() {
//! use fake_apiserver::{FakeApiServer, Kind};
//! let server = FakeApiServer::start().await;
//! let client = server.client().await;
//! server.apply_many(fake_apiserver::synthetic::synthetic_objects(100, 3, 3, 2, true));
//! assert_eq!(server.object_count(Kind::Service), 100);
//! # drop(client);
//! # }
//! ```

mod http;
mod selector;
mod store;
pub mod synthetic;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub use selector::{FieldSelector, LabelSelector, SelectorError};
pub use store::{ApplyError, Kind};

use http::Shared;

/// An object of one of the served kinds, for [`FakeApiServer::apply_many`].
// Objects are built once and moved into the store; boxing would only add noise for callers.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Object {
    /// A core/v1 Service.
    Service(Service),
    /// A discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// A core/v1 Node.
    Node(Node),
}

impl Object {
    /// The kind of this object.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
        }
    }

    pub(crate) fn metadata_mut(
        &mut self,
    ) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
            Object::Node(o) => &mut o.metadata,
        }
    }

    /// Serializes the object (k8s-openapi writes `apiVersion` and `kind` too).
    pub(crate) fn to_json(&self) -> Bytes {
        let json = match self {
            Object::Service(o) => serde_json::to_vec(o),
            Object::EndpointSlice(o) => serde_json::to_vec(o),
            Object::Node(o) => serde_json::to_vec(o),
        };
        match json {
            Ok(json) => Bytes::from(json),
            // k8s-openapi types always serialize; keep the server alive regardless.
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize object");
                Bytes::from_static(b"{}")
            }
        }
    }
}

impl From<Service> for Object {
    fn from(o: Service) -> Self {
        Object::Service(o)
    }
}

impl From<EndpointSlice> for Object {
    fn from(o: EndpointSlice) -> Self {
        Object::EndpointSlice(o)
    }
}

impl From<Node> for Object {
    fn from(o: Node) -> Self {
        Object::Node(o)
    }
}

/// A handle on a running fake API server. Cheap to clone; every clone controls the same
/// server. The server runs on the tokio runtime that started it, until that runtime stops.
#[derive(Clone)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeApiServer {
    /// Starts a server on `127.0.0.1:0` (an ephemeral loopback port).
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub async fn start() -> FakeApiServer {
        match Self::start_at(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await {
            Ok(s) => s,
            Err(e) => panic!("cannot bind the fake API server on 127.0.0.1:0: {e}"),
        }
    }

    /// Starts a server on `addr`, which must be a loopback address (port 0 picks one).
    pub async fn start_at(addr: SocketAddr) -> io::Result<FakeApiServer> {
        if !addr.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the fake API server only binds loopback addresses, not {addr}"),
            ));
        }
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new());
        tokio::spawn(http::serve(listener, http::router(Arc::clone(&shared))));
        tracing::debug!(%addr, "fake API server listening");
        Ok(FakeApiServer { shared, addr })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client configuration for this server: cluster URL, default namespace `default`, no
    /// auth, no TLS, everything else as `kube::Config::new` (and a kubeconfig) sets it.
    ///
    /// NB: kube 5 enables `default_retry`, which transparently retries 429/503/504 up to 15
    /// times with exponential backoff from 5 ms, so a short `set_available(false)` outage is
    /// hidden from a watcher built on this config. See [`FakeApiServer::client_without_retry`].
    pub fn client_config(&self) -> kube::Config {
        let uri = match self.url().parse() {
            Ok(uri) => uri,
            Err(e) => panic!("invalid fake API server URL {}: {e}", self.url()),
        };
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".to_string();
        config
    }

    /// A `kube::Client` for this server (built from [`FakeApiServer::client_config`]).
    ///
    /// # Panics
    ///
    /// If kube cannot build a client from the configuration.
    pub async fn client(&self) -> kube::Client {
        Self::build_client(self.client_config())
    }

    /// A `kube::Client` with kube's built-in 503 retry disabled, so every failed request
    /// surfaces at once (as watcher errors).
    pub async fn client_without_retry(&self) -> kube::Client {
        let mut config = self.client_config();
        config.default_retry = false;
        Self::build_client(config)
    }

    fn build_client(config: kube::Config) -> kube::Client {
        match kube::Client::try_from(config) {
            Ok(c) => c,
            Err(e) => panic!("cannot build a kube client for the fake API server: {e}"),
        }
    }

    /// A kubeconfig (cluster, user without credentials, context, all named `fake-apiserver`)
    /// pointing at this server.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake-apiserver
  cluster:
    server: {url}
users:
- name: fake-apiserver
  user: {{}}
contexts:
- name: fake-apiserver
  context:
    cluster: fake-apiserver
    user: fake-apiserver
    namespace: default
current-context: fake-apiserver
preferences: {{}}
",
            url = self.url()
        )
    }

    /// Writes [`FakeApiServer::kubeconfig_yaml`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    // ---- writes ----

    /// Creates or replaces a Service (ADDED or MODIFIED). Returns the new resourceVersion.
    ///
    /// # Panics
    ///
    /// If the Service has no `metadata.name` (also for the other typed writes).
    pub fn apply_service(&self, svc: Service) -> u64 {
        self.apply(Object::Service(svc))
    }

    /// Creates or replaces an EndpointSlice. Returns the new resourceVersion.
    pub fn apply_endpoint_slice(&self, slice: EndpointSlice) -> u64 {
        self.apply(Object::EndpointSlice(slice))
    }

    /// Creates or replaces a Node. Returns the new resourceVersion.
    pub fn apply_node(&self, node: Node) -> u64 {
        self.apply(Object::Node(node))
    }

    /// Creates or replaces one object. Returns the new resourceVersion.
    pub fn apply(&self, obj: Object) -> u64 {
        self.apply_many(vec![obj])
    }

    /// Creates or replaces many objects under one lock: each gets its own resourceVersion (in
    /// order) and its own event, and live watches get one message per kind. Returns the last
    /// resourceVersion (the current one if `objects` is empty).
    pub fn apply_many(&self, objects: Vec<Object>) -> u64 {
        let prepared: Vec<store::Prepared> = objects
            .into_iter()
            .map(|o| {
                let kind = o.kind();
                store::prepare_typed(o)
                    .unwrap_or_else(|e| panic!("cannot apply {}: {e}", kind.kind()))
            })
            .collect();
        self.commit(prepared)
    }

    /// Creates or replaces an object given as raw JSON, with no schema validation: only
    /// `metadata.name` (and string labels) are required. Missing `apiVersion`/`kind` are filled
    /// in; a namespaced object without a namespace goes to `default`. Lets tests inject what
    /// k8s-openapi or a real API server would reject.
    pub fn apply_raw(&self, kind: Kind, value: serde_json::Value) -> Result<u64, ApplyError> {
        let p = store::prepare(kind, value)?;
        Ok(self.commit(vec![p]))
    }

    fn commit(&self, prepared: Vec<store::Prepared>) -> u64 {
        let mut store = self.shared.store();
        let mut batches: [Vec<Arc<store::Event>>; 3] = Default::default();
        for p in prepared {
            let kind = p.kind;
            let ev = store.commit(p);
            batches[kind.index()].push(ev);
        }
        for (kind, batch) in Kind::ALL.into_iter().zip(batches) {
            store.publish(kind, batch);
        }
        store.rv()
    }

    /// Deletes an object (DELETED). Returns the new resourceVersion, or the current one
    /// unchanged if there was no such object. `namespace` is ignored for Nodes.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> u64 {
        let namespace = if kind.namespaced() { namespace } else { "" };
        let mut store = self.shared.store();
        if let Some(ev) = store.delete(kind, namespace, name) {
            store.publish(kind, vec![ev]);
        }
        store.rv()
    }

    /// Deletes a Service. See [`FakeApiServer::delete`].
    pub fn delete_service(&self, namespace: &str, name: &str) -> u64 {
        self.delete(Kind::Service, namespace, name)
    }

    /// Deletes an EndpointSlice. See [`FakeApiServer::delete`].
    pub fn delete_endpoint_slice(&self, namespace: &str, name: &str) -> u64 {
        self.delete(Kind::EndpointSlice, namespace, name)
    }

    /// Deletes a Node. See [`FakeApiServer::delete`].
    pub fn delete_node(&self, name: &str) -> u64 {
        self.delete(Kind::Node, "", name)
    }

    // ---- faults ----

    /// `false`: every request fails with HTTP 503 (a `Status` body) and every open watch
    /// stream is cut at once. `true`: serve again.
    pub fn set_available(&self, available: bool) {
        self.shared.available.store(available, Ordering::SeqCst);
        if !available {
            self.shared.abort_watches();
        }
    }

    /// Whether the server currently serves requests.
    pub fn is_available(&self) -> bool {
        self.shared.available.load(Ordering::SeqCst)
    }

    /// Abruptly ends every open watch stream: the connection is closed mid-response (no final
    /// chunk), as when an API server dies or a load balancer resets the connection.
    pub fn drop_watches(&self) {
        self.shared.abort_watches();
    }

    /// Forgets the event history up to the current resourceVersion (as an etcd compaction).
    /// A watch from an older resourceVersion then gets a `410 Expired` ERROR event, and a list
    /// continuing an older snapshot a `410 Expired` response. Returns the compaction RV.
    pub fn compact(&self) -> u64 {
        self.shared.store().compact()
    }

    /// Keeps at most `limit` history events per kind (older ones are compacted away), or all
    /// of them with `None` (the default).
    pub fn set_history_limit(&self, limit: Option<usize>) {
        self.shared.store().set_history_limit(limit);
    }

    /// Sends a BOOKMARK at the current resourceVersion to every open watch that asked for
    /// bookmarks (`allowWatchBookmarks=true`).
    pub fn send_bookmarks(&self) {
        self.shared.store().send_bookmarks();
    }

    // ---- observability ----

    /// Number of list requests received for `kind` (every page counts, failed ones too).
    pub fn list_count(&self, kind: Kind) -> u64 {
        self.shared.list_count(kind)
    }

    /// Number of watch requests received for `kind` (failed ones too).
    pub fn watch_count(&self, kind: Kind) -> u64 {
        self.shared.watch_count(kind)
    }

    /// Number of watch streams currently open (all kinds).
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` watch streams are open. Returns false on timeout.
    pub async fn wait_for_open_watches(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.open_watches_changed.notified();
            if self.open_watches() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.open_watches() >= n;
            }
        }
    }

    /// Number of BOOKMARK lines handed to watch responses so far (all kinds).
    pub fn bookmarks_sent(&self) -> u64 {
        self.shared.bookmarks_sent.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` BOOKMARK lines were handed to watch responses. Returns false
    /// on timeout.
    pub async fn wait_for_bookmarks_sent(&self, n: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.bookmarks_sent() < n {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Waits until no watch stream is open. Returns false on timeout.
    pub async fn wait_for_no_open_watches(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.open_watches_changed.notified();
            if self.open_watches() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.open_watches() == 0;
            }
        }
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv()
    }

    /// Number of stored objects of `kind`.
    pub fn object_count(&self, kind: Kind) -> usize {
        self.shared.store().len(kind)
    }

    /// Number of retained history events of `kind`.
    pub fn history_len(&self, kind: Kind) -> usize {
        self.shared.store().history_len(kind)
    }
}
