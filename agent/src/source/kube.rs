//! The Kubernetes API source: kube-runtime watchers for Services, EndpointSlices and this
//! node's Node, converted to the model and sent to the sync loop; and a metadata-only watch
//! of every Node for its zone and region labels (the locality tiers' input), which keeps
//! memory small at 5,000 Nodes: no status, no spec, and of the metadata only the name, the
//! resourceVersion and those two labels are decoded ([`NodePlace`]).
//!
//! Each watcher lists, then watches; kube-runtime resumes from the last resourceVersion after a
//! broken watch and re-lists after a 410 Gone. Listed objects are forwarded as they arrive (each
//! is the current truth, so applying it early is safe, and nothing the size of the cluster is
//! held twice); only the keys are remembered, so when the list completes, objects that vanished
//! meanwhile become deletions. Unchanged objects are dropped by the sync loop's equality check.
//! Errors are retried with kube-runtime's default backoff; nothing is ever withdrawn because
//! the API is unreachable.
//!
//! With a cluster id (`--cluster-id`), MCS ServiceImports and the EndpointSlices labelled
//! `multicluster.kubernetes.io/service-name` are watched too. The ServiceImport CRD belongs to
//! the MCS implementation and may not be installed: discovery is asked first, and while the
//! API group does not serve `serviceimports` the agent says so once and asks again with
//! backoff (1 s doubling to 5 min), so a missing CRD costs no watch errors and keeps
//! `/healthz` healthy; once it appears the watch starts, and if it disappears, the last
//! ServiceImports are kept and discovery resumes.

use std::borrow::Cow;
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::convert::{self, Warning};
use super::mcs::{self, ServiceImport};
use super::{Resource, SourceEvent};
use crate::model::ServiceKey;
use crate::model::{LABEL_HEADLESS, LABEL_MCS_SERVICE_NAME, LABEL_SERVICE_NAME};
use crate::state::AgentState;
use crate::store::SliceKey;

mod node_place;

pub use node_place::NodePlace;

/// How one Kubernetes resource maps onto source events.
trait Watched: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static {
    type Key: Clone + Eq + Hash + Send;
    type Model: Send;
    const RESOURCE: Resource;
    const KIND: &'static str;
    /// Served by a CRD that may go away: a 404 ends the watch instead of retrying it.
    const OPTIONAL: bool = false;

    fn key(&self) -> Option<Self::Key>;
    fn convert(&self, warnings: &mut Vec<Warning>) -> Option<Self::Model>;
    fn event(key: Self::Key, model: Option<Self::Model>) -> SourceEvent;
}

fn namespaced_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<(String, String)> {
    let name = meta.name.clone()?;
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| convert::DEFAULT_NAMESPACE.to_owned());
    Some((namespace, name))
}

impl Watched for core::Service {
    type Key = ServiceKey;
    type Model = crate::model::Service;
    const RESOURCE: Resource = Resource::Services;
    const KIND: &'static str = convert::KIND_SERVICE;

    fn key(&self) -> Option<ServiceKey> {
        namespaced_key(&self.metadata).map(|(namespace, name)| ServiceKey::new(namespace, name))
    }

    fn convert(&self, warnings: &mut Vec<Warning>) -> Option<Self::Model> {
        convert::service_from_api(self, None, warnings)
    }

    fn event(key: ServiceKey, model: Option<Self::Model>) -> SourceEvent {
        SourceEvent::Service(key, model)
    }
}

impl Watched for discovery::EndpointSlice {
    type Key = SliceKey;
    type Model = crate::model::EndpointSlice;
    const RESOURCE: Resource = Resource::EndpointSlices;
    const KIND: &'static str = convert::KIND_ENDPOINT_SLICE;

    fn key(&self) -> Option<SliceKey> {
        namespaced_key(&self.metadata).map(|(namespace, name)| SliceKey::new(namespace, name))
    }

    fn convert(&self, warnings: &mut Vec<Warning>) -> Option<Self::Model> {
        convert::slice_from_api(self, None, warnings)
    }

    fn event(key: SliceKey, model: Option<Self::Model>) -> SourceEvent {
        SourceEvent::Slice(key, model)
    }
}

impl Watched for core::Node {
    type Key = String;
    type Model = crate::model::Node;
    const RESOURCE: Resource = Resource::Node;
    const KIND: &'static str = convert::KIND_NODE;

    fn key(&self) -> Option<String> {
        self.metadata.name.clone()
    }

    fn convert(&self, warnings: &mut Vec<Warning>) -> Option<Self::Model> {
        convert::node_from_api(self, None, warnings)
    }

    fn event(_key: String, model: Option<Self::Model>) -> SourceEvent {
        SourceEvent::Node(model)
    }
}

/// Every Node, metadata only: just where it sits.
impl Watched for NodePlace {
    type Key = String;
    type Model = crate::model::NodeLocality;
    const RESOURCE: Resource = Resource::NodeLocalities;
    const KIND: &'static str = convert::KIND_NODE;

    fn key(&self) -> Option<String> {
        self.metadata.name.clone()
    }

    fn convert(&self, _warnings: &mut Vec<Warning>) -> Option<Self::Model> {
        Some(convert::node_locality(
            self.zone.as_deref(),
            self.region.as_deref(),
        ))
    }

    fn event(key: String, model: Option<Self::Model>) -> SourceEvent {
        SourceEvent::NodeLocality(key, model)
    }
}

/// An EndpointSlice in its role as one of a ServiceImport's: the same API object, watched
/// separately (selected by `multicluster.kubernetes.io/service-name`) and converted for the
/// ServiceImport.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(transparent)]
struct ImportedSlice(discovery::EndpointSlice);

impl kube::Resource for ImportedSlice {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<discovery::EndpointSlice as k8s_openapi::Resource>::KIND)
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<discovery::EndpointSlice as k8s_openapi::Resource>::GROUP)
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<discovery::EndpointSlice as k8s_openapi::Resource>::VERSION)
    }

    fn api_version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<discovery::EndpointSlice as k8s_openapi::Resource>::API_VERSION)
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<discovery::EndpointSlice as k8s_openapi::Resource>::URL_PATH_SEGMENT)
    }

    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &self.0.metadata
    }

    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.0.metadata
    }
}

impl Watched for ImportedSlice {
    type Key = SliceKey;
    type Model = crate::model::EndpointSlice;
    const RESOURCE: Resource = Resource::ImportedSlices;
    const KIND: &'static str = convert::KIND_ENDPOINT_SLICE;

    fn key(&self) -> Option<SliceKey> {
        namespaced_key(&self.0.metadata).map(|(namespace, name)| SliceKey {
            owner: crate::model::ServiceKind::ServiceImport,
            namespace,
            name,
        })
    }

    fn convert(&self, warnings: &mut Vec<Warning>) -> Option<Self::Model> {
        convert::import_slice_from_api(&self.0, None, warnings)
    }

    fn event(key: SliceKey, model: Option<Self::Model>) -> SourceEvent {
        SourceEvent::Slice(key, model)
    }
}

impl Watched for ServiceImport {
    type Key = ServiceKey;
    type Model = crate::model::Service;
    const RESOURCE: Resource = Resource::ServiceImports;
    const KIND: &'static str = convert::KIND_SERVICE_IMPORT;
    const OPTIONAL: bool = true;

    fn key(&self) -> Option<ServiceKey> {
        namespaced_key(&self.metadata).map(|(namespace, name)| ServiceKey::import(namespace, name))
    }

    fn convert(&self, warnings: &mut Vec<Warning>) -> Option<Self::Model> {
        convert::service_import_from_api(self, None, warnings)
    }

    fn event(key: ServiceKey, model: Option<Self::Model>) -> SourceEvent {
        SourceEvent::Service(key, model)
    }
}

/// Starts the watchers (four, plus the two MCS ones with a `cluster_id`); they run until
/// `events` is closed.
pub fn spawn_watchers(
    client: Client,
    node_name: &str,
    cluster_id: Option<&str>,
    events: mpsc::Sender<SourceEvent>,
    state: Arc<AgentState>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    match cluster_id {
        Some(cluster_id) => {
            tracing::info!(
                cluster_id,
                "watching MCS ServiceImports and imported EndpointSlices"
            );
            tasks.push(tokio::spawn(watch_and_forget::<ImportedSlice>(
                watcher(
                    Api::all(client.clone()),
                    watcher::Config::default().labels(LABEL_MCS_SERVICE_NAME),
                ),
                events.clone(),
                Arc::clone(&state),
            )));
            tasks.push(tokio::spawn(watch_service_imports(
                client.clone(),
                events.clone(),
                Arc::clone(&state),
            )));
        }
        None => tracing::info!(
            "no --cluster-id: MCS ServiceImports are not watched (clusterset IPs not programmed)"
        ),
    }
    tasks.extend(spawn_core_watchers(client, node_name, events, state));
    tasks
}

fn spawn_core_watchers(
    client: Client,
    node_name: &str,
    events: mpsc::Sender<SourceEvent>,
    state: Arc<AgentState>,
) -> Vec<JoinHandle<()>> {
    // kube-proxy's selectors: slices of headless Services are never proxied, and a slice
    // without its service label cannot be attributed.
    let slices =
        watcher::Config::default().labels(&format!("{LABEL_SERVICE_NAME},!{LABEL_HEADLESS}"));
    let services = watcher::Config::default();
    let node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    vec![
        tokio::spawn(watch_and_forget::<core::Service>(
            watcher(Api::all(client.clone()), services),
            events.clone(),
            Arc::clone(&state),
        )),
        tokio::spawn(watch_and_forget::<discovery::EndpointSlice>(
            watcher(Api::all(client.clone()), slices),
            events.clone(),
            Arc::clone(&state),
        )),
        tokio::spawn(watch_and_forget::<NodePlace>(
            // `NodePlace` makes metadata-only list and watch requests.
            watcher(
                Api::<NodePlace>::all(client.clone()),
                watcher::Config::default(),
            ),
            events.clone(),
            Arc::clone(&state),
        )),
        tokio::spawn(watch_and_forget::<core::Node>(
            watcher(Api::all(client), node),
            events,
            state,
        )),
    ]
}

/// First wait between two discovery checks for the ServiceImport CRD.
const DISCOVERY_FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between two discovery checks: one cheap GET per agent every 5 minutes.
const DISCOVERY_MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Why a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchEnd {
    /// The sync loop is gone.
    EventsClosed,
    /// The API server no longer serves the resource (an optional CRD was removed).
    ResourceGone,
}

async fn watch_and_forget<K: Watched>(
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    events: mpsc::Sender<SourceEvent>,
    state: Arc<AgentState>,
) {
    watch(stream, events, state).await;
}

/// Watches ServiceImports while their CRD is served; see the module docs.
async fn watch_service_imports(
    client: Client,
    events: mpsc::Sender<SourceEvent>,
    state: Arc<AgentState>,
) {
    let resource = Resource::ServiceImports.as_str();
    let mut backoff = DISCOVERY_FIRST_BACKOFF;
    let mut said_missing = false;
    let mut last_error: Option<String> = None;
    let mut listed = false;
    loop {
        match serves_service_imports(&client).await {
            Ok(true) => {
                tracing::info!(
                    resource,
                    api_version = mcs::API_VERSION,
                    "the ServiceImport CRD is installed; watching serviceimports"
                );
                (said_missing, last_error, listed) = (false, None, true);
                backoff = DISCOVERY_FIRST_BACKOFF;
                let stream = watcher(
                    Api::<ServiceImport>::all(client.clone()),
                    watcher::Config::default(),
                );
                match watch(stream, events.clone(), Arc::clone(&state)).await {
                    WatchEnd::EventsClosed => return,
                    WatchEnd::ResourceGone => {
                        tracing::warn!(
                            resource,
                            "the ServiceImport CRD is no longer served; keeping the last                              ServiceImports and checking for it again with backoff"
                        );
                        continue;
                    }
                }
            }
            Ok(false) => {
                if !said_missing {
                    tracing::info!(
                        resource,
                        api_version = mcs::API_VERSION,
                        "the ServiceImport CRD is not installed (the MCS implementation                          installs it); checking again with backoff up to {}s",
                        DISCOVERY_MAX_BACKOFF.as_secs()
                    );
                    said_missing = true;
                }
            }
            Err(error) => {
                let error = error.to_string();
                if last_error.as_ref() != Some(&error) {
                    tracing::warn!(resource, %error, "cannot ask discovery for the ServiceImport CRD; retrying with backoff");
                    last_error = Some(error);
                }
            }
        }
        // Nothing to list is a complete list: it must not hold up the first sync.
        if !listed {
            listed = true;
            state.metrics.set_api_synced(resource, true);
            if !send(&events, SourceEvent::Listed(Resource::ServiceImports)).await {
                return;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(DISCOVERY_MAX_BACKOFF);
    }
}

/// Whether the API server serves `serviceimports` in `multicluster.x-k8s.io/v1alpha1`.
async fn serves_service_imports(client: &Client) -> Result<bool, kube::Error> {
    match client.list_api_group_resources(mcs::API_VERSION).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == mcs::PLURAL)),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(error) => Err(error),
    }
}

/// The keys one watch has reported, to tell the sync loop which objects a re-list no longer
/// shows.
struct Known<K: Watched> {
    known: HashSet<K::Key>,
    /// Keys seen by the list in progress, if one is.
    listing: Option<HashSet<K::Key>>,
    lists: u64,
}

impl<K: Watched> Known<K> {
    fn new() -> Self {
        Self {
            known: HashSet::new(),
            listing: None,
            lists: 0,
        }
    }

    /// A list starts; true when it is a re-list.
    fn list_started(&mut self) -> bool {
        self.lists += 1;
        self.listing = Some(HashSet::new());
        self.lists > 1
    }

    fn listed(&mut self, key: &K::Key) {
        if let Some(seen) = self.listing.as_mut() {
            seen.insert(key.clone());
        }
        self.known.insert(key.clone());
    }

    /// The list is complete: the keys known before that it did not show.
    fn list_done(&mut self) -> Vec<K::Key> {
        let seen = self.listing.take().unwrap_or_default();
        let vanished = self
            .known
            .iter()
            .filter(|key| !seen.contains(*key))
            .cloned()
            .collect();
        self.known = seen;
        vanished
    }
}

async fn watch<K: Watched>(
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    events: mpsc::Sender<SourceEvent>,
    state: Arc<AgentState>,
) -> WatchEnd {
    let resource = K::RESOURCE.as_str();
    let mut stream = stream.default_backoff().boxed();
    let mut known = Known::<K>::new();
    while let Some(item) = stream.next().await {
        let sent = match item {
            Ok(Event::Init) => {
                if known.list_started() {
                    tracing::info!(resource, "re-listing");
                    state.metrics.watch_restart(resource);
                }
                true
            }
            Ok(Event::InitApply(object)) => match object.key() {
                Some(key) => {
                    let model = convert_reporting(&object, &state);
                    known.listed(&key);
                    send(&events, K::event(key, model)).await
                }
                None => true,
            },
            Ok(Event::InitDone) => {
                state.metrics.set_api_synced(resource, true);
                state.health.clear_watch_error(resource);
                let mut ok = true;
                for key in known.list_done() {
                    ok &= send(&events, K::event(key, None)).await;
                }
                ok && send(&events, SourceEvent::Listed(K::RESOURCE)).await
            }
            Ok(Event::Apply(object)) => match object.key() {
                Some(key) => {
                    let model = convert_reporting(&object, &state);
                    known.known.insert(key.clone());
                    send(&events, K::event(key, model)).await
                }
                None => true,
            },
            Ok(Event::Delete(object)) => match object.key() {
                Some(key) => {
                    known.known.remove(&key);
                    send(&events, K::event(key, None)).await
                }
                None => true,
            },
            Err(error) if K::OPTIONAL && status_code(&error) == Some(404) => {
                state.metrics.set_api_synced(resource, false);
                return WatchEnd::ResourceGone;
            }
            Err(error) => {
                report_watch_error(resource, &error, &state);
                true
            }
        };
        if !sent {
            return WatchEnd::EventsClosed;
        }
    }
    WatchEnd::EventsClosed
}

/// A failed list or watch: logged (a 403 names the RBAC it needs), counted, and shown in the
/// health endpoint until the next complete list; the watcher retries with backoff.
fn report_watch_error(resource: &'static str, error: &watcher::Error, state: &AgentState) {
    if is_forbidden(error) {
        tracing::error!(
            resource,
            %error,
            "the API server forbids listing/watching {resource} (403): the ClusterRole \
             bound to topoproxy's ServiceAccount must grant get, list and watch on it; \
             keeping the last state and retrying with backoff"
        );
    } else {
        tracing::warn!(resource, %error, "watch failed; keeping the last state and retrying with backoff");
    }
    state.health.record_watch_error(resource, error.to_string());
    state.metrics.watch_error(resource);
    state.metrics.set_api_synced(resource, false);
}

/// Whether the API server refused the request as unauthorized (403 Forbidden).
fn is_forbidden(error: &watcher::Error) -> bool {
    status_code(error) == Some(403)
}

/// The HTTP status the API server answered a failed list or watch with.
fn status_code(error: &watcher::Error) -> Option<u16> {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status,
        watcher::Error::WatchError(status) => status,
        _ => return None,
    };
    Some(status.code)
}

fn convert_reporting<K: Watched>(object: &K, state: &AgentState) -> Option<K::Model> {
    let mut warnings = Vec::new();
    let model = object.convert(&mut warnings);
    if !warnings.is_empty() {
        state
            .metrics
            .skipped_objects(K::KIND, warnings.len() as u64);
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
    }
    model
}

/// False once the sync loop is gone.
async fn send(events: &mpsc::Sender<SourceEvent>, event: SourceEvent) -> bool {
    events.send(event).await.is_ok()
}
