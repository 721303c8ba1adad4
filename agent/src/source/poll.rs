//! The file source for `topoproxy run --source DIR`: the directory is loaded, then polled, and
//! every change to it is sent to the sync loop as the object-level events it amounts to.
//!
//! A reload that fails (a half-written file, a YAML error) keeps the last good state and says
//! so; the next change is tried again.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::{Resource, SourceEvent};
use crate::state::AgentState;
use crate::store::{SliceKey, Store};

use super::file::{load_dir, yaml_files, FileSourceError};

/// What identifies the directory's content cheaply: every file's path, size and mtime.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn fingerprint(path: &Path) -> Result<Fingerprint, FileSourceError> {
    let files = yaml_files(path)?;
    Ok(files
        .into_iter()
        .map(|file| {
            let metadata = fs::metadata(&file).ok();
            let size = metadata.as_ref().map_or(0, fs::Metadata::len);
            let modified = metadata.and_then(|m| m.modified().ok());
            (file, size, modified)
        })
        .collect())
}

/// The `resource` label of `topoproxy_watch_errors_total` for a directory that cannot be
/// read or loaded.
pub const DIRECTORY_RESOURCE: &str = "directory";

/// Loads `dir`, sends it, and keeps sending its changes every `interval` until the sync loop
/// goes away.
pub async fn run(
    dir: PathBuf,
    node_name: String,
    interval: Duration,
    events: mpsc::Sender<SourceEvent>,
    state: Arc<AgentState>,
) {
    let mut current = Store::new();
    let mut seen: Option<Fingerprint> = None;
    let mut listed = false;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let print = match fingerprint(&dir) {
            Ok(print) => print,
            Err(error) => {
                tracing::warn!(%error, "cannot read the source directory; keeping the last state");
                state.metrics.watch_error(DIRECTORY_RESOURCE);
                continue;
            }
        };
        if seen.as_ref() == Some(&print) {
            continue;
        }
        let loaded = match load_dir(&dir) {
            Ok(loaded) => loaded,
            Err(error) => {
                tracing::warn!(%error, "cannot load the source directory; keeping the last state");
                state.metrics.watch_error(DIRECTORY_RESOURCE);
                seen = Some(print);
                continue;
            }
        };
        seen = Some(print);
        for warning in &loaded.warnings {
            tracing::warn!("{warning}");
            state.metrics.skipped_objects(warning.object.kind, 1);
        }
        for event in changes(&current, &loaded.store, &node_name) {
            if events.send(event).await.is_err() {
                return;
            }
        }
        current = loaded.store;
        if !listed {
            listed = true;
            // One load covers every kind a directory can hold.
            for resource in [
                Resource::Services,
                Resource::EndpointSlices,
                Resource::ServiceImports,
                Resource::ImportedSlices,
            ] {
                if events.send(SourceEvent::Listed(resource)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The events that turn `before` into `after` for the node `node_name`.
pub fn changes(before: &Store, after: &Store, node_name: &str) -> Vec<SourceEvent> {
    let mut events = Vec::new();
    for service in before.services() {
        if after.service(&service.key).is_none() {
            events.push(SourceEvent::Service(service.key.clone(), None));
        }
    }
    for service in after.services() {
        if before.service(&service.key) != Some(service) {
            events.push(SourceEvent::Service(
                service.key.clone(),
                Some(service.clone()),
            ));
        }
    }
    let slices = |store: &Store| -> BTreeMap<SliceKey, crate::model::EndpointSlice> {
        store
            .slices()
            .map(|slice| (SliceKey::of(slice), slice.clone()))
            .collect()
    };
    let (old_slices, new_slices) = (slices(before), slices(after));
    for key in old_slices.keys() {
        if !new_slices.contains_key(key) {
            events.push(SourceEvent::Slice(key.clone(), None));
        }
    }
    for (key, slice) in new_slices {
        if old_slices.get(&key) != Some(&slice) {
            events.push(SourceEvent::Slice(key, Some(slice)));
        }
    }
    // Every Node's locality (the API source gets these from a metadata-only watch).
    for node in before.nodes() {
        if after.node(&node.name).is_none() {
            events.push(SourceEvent::NodeLocality(node.name.clone(), None));
        }
    }
    for node in after.nodes() {
        let locality = after.node_locality(&node.name);
        if before.node_locality(&node.name) != locality {
            events.push(SourceEvent::NodeLocality(
                node.name.clone(),
                Some(locality.cloned().unwrap_or_default()),
            ));
        }
    }
    match (before.node(node_name), after.node(node_name)) {
        (old, Some(new)) if old != Some(new) => events.push(SourceEvent::Node(Some(new.clone()))),
        (Some(_), None) => events.push(SourceEvent::Node(None)),
        _ => {}
    }
    events
}
