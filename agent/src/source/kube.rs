//! The Kubernetes API source: kube-runtime watchers for Services, EndpointSlices and this
//! node's Node, converted to the model and sent to the sync loop; and a metadata-only watch
//! of every Node for its zone and region labels (the locality tiers' input), which keeps
//! memory small at 5,000 Nodes: no status, no spec, only names and labels reach the agent.
//!
//! Each watcher lists, then watches; kube-runtime resumes from the last resourceVersion after a
//! broken watch and re-lists after a 410 Gone. Listed objects are forwarded as they arrive (each
//! is the current truth, so applying it early is safe, and nothing the size of the cluster is
//! held twice); only the keys are remembered, so when the list completes, objects that vanished
//! meanwhile become deletions. Unchanged objects are dropped by the sync loop's equality check.
//! Errors are retried with kube-runtime's default backoff; nothing is ever withdrawn because
//! the API is unreachable.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Arc;

use futures::Stream;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::convert::{self, Warning};
use super::{Resource, SourceEvent};
use crate::model::ServiceKey;
use crate::model::{LABEL_HEADLESS, LABEL_SERVICE_NAME};
use crate::state::AgentState;
use crate::store::SliceKey;

/// How one Kubernetes resource maps onto source events.
trait Watched: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static {
    type Key: Clone + Eq + Hash + Send;
    type Model: Send;
    const RESOURCE: Resource;
    const KIND: &'static str;

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
        namespaced_key(&self.metadata).map(|(namespace, name)| ServiceKey { namespace, name })
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
        namespaced_key(&self.metadata).map(|(namespace, name)| SliceKey { namespace, name })
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
impl Watched for PartialObjectMeta<core::Node> {
    type Key = String;
    type Model = crate::model::NodeLocality;
    const RESOURCE: Resource = Resource::NodeLocalities;
    const KIND: &'static str = convert::KIND_NODE;

    fn key(&self) -> Option<String> {
        self.metadata.name.clone()
    }

    fn convert(&self, _warnings: &mut Vec<Warning>) -> Option<Self::Model> {
        Some(convert::node_locality_from_meta(&self.metadata))
    }

    fn event(key: String, model: Option<Self::Model>) -> SourceEvent {
        SourceEvent::NodeLocality(key, model)
    }
}

/// Starts the four watchers; they run until `events` is closed.
pub fn spawn_watchers(
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
        tokio::spawn(watch::<core::Service>(
            watcher(Api::all(client.clone()), services),
            events.clone(),
            Arc::clone(&state),
        )),
        tokio::spawn(watch::<discovery::EndpointSlice>(
            watcher(Api::all(client.clone()), slices),
            events.clone(),
            Arc::clone(&state),
        )),
        tokio::spawn(watch::<PartialObjectMeta<core::Node>>(
            // `Api<PartialObjectMeta<_>>` makes metadata-only list and watch requests.
            watcher(
                Api::<PartialObjectMeta<core::Node>>::all(client.clone()),
                watcher::Config::default(),
            ),
            events.clone(),
            Arc::clone(&state),
        )),
        tokio::spawn(watch::<core::Node>(
            watcher(Api::all(client), node),
            events,
            state,
        )),
    ]
}

async fn watch<K: Watched>(
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    events: mpsc::Sender<SourceEvent>,
    state: Arc<AgentState>,
) {
    let resource = K::RESOURCE.as_str();
    let mut stream = stream.default_backoff().boxed();
    let mut known: HashSet<K::Key> = HashSet::new();
    // Keys seen by the list in progress, if one is.
    let mut listing: Option<HashSet<K::Key>> = None;
    let mut lists = 0u64;
    while let Some(item) = stream.next().await {
        let sent = match item {
            Ok(Event::Init) => {
                lists += 1;
                if lists > 1 {
                    tracing::info!(resource, "re-listing");
                    state.metrics.watch_restart(resource);
                }
                listing = Some(HashSet::new());
                true
            }
            Ok(Event::InitApply(object)) => match object.key() {
                Some(key) => {
                    let model = convert_reporting(&object, &state);
                    if let Some(seen) = listing.as_mut() {
                        seen.insert(key.clone());
                    }
                    known.insert(key.clone());
                    send(&events, K::event(key, model)).await
                }
                None => true,
            },
            Ok(Event::InitDone) => {
                let seen = listing.take().unwrap_or_default();
                let vanished: Vec<K::Key> = known
                    .iter()
                    .filter(|key| !seen.contains(*key))
                    .cloned()
                    .collect();
                known = seen;
                state.metrics.set_api_synced(resource, true);
                state.health.clear_watch_error(resource);
                let mut ok = true;
                for key in vanished {
                    ok &= send(&events, K::event(key, None)).await;
                }
                ok && send(&events, SourceEvent::Listed(K::RESOURCE)).await
            }
            Ok(Event::Apply(object)) => match object.key() {
                Some(key) => {
                    let model = convert_reporting(&object, &state);
                    known.insert(key.clone());
                    send(&events, K::event(key, model)).await
                }
                None => true,
            },
            Ok(Event::Delete(object)) => match object.key() {
                Some(key) => {
                    known.remove(&key);
                    send(&events, K::event(key, None)).await
                }
                None => true,
            },
            Err(error) => {
                if is_forbidden(&error) {
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
                true
            }
        };
        if !sent {
            return;
        }
    }
}

/// Whether the API server refused the request as unauthorized (403 Forbidden).
fn is_forbidden(error: &watcher::Error) -> bool {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status,
        watcher::Error::WatchError(status) => status,
        _ => return false,
    };
    status.code == 403
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
