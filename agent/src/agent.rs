//! `topoproxy run`: the long-running agent, wired together.
//!
//! [`Agent::start`] binds the HTTP endpoints (so a port clash fails at once, not later), then
//! [`Agent::run`] starts the source, the sync loop and the servers, and returns when shutdown
//! is asked for. Tests use the same entry points with an in-memory dataplane and a fake API.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config::RunSettings;
use crate::dataplane::Dataplane;
use crate::health::HealthTracker;
use crate::http::{self, HttpError};
use crate::metrics::Metrics;
use crate::source;
use crate::state::AgentState;
use crate::sync::{SyncError, SyncLoop, SyncSettings};
use crate::table::NodeTable;

/// Capacity of the channel from sources to the sync loop; a full channel slows the watchers
/// down instead of growing memory without bound.
const EVENT_BUFFER: usize = 4096;

/// Where the cluster comes from.
pub enum ClusterSource {
    /// The Kubernetes API.
    Kube(kube::Client),
    /// A directory of YAML, re-read on change.
    Directory(PathBuf),
}

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("cannot build a Kubernetes client configuration")]
    KubeConfig(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot create the Kubernetes client")]
    KubeClient(#[source] kube::Error),
    #[error(transparent)]
    Sync(#[from] SyncError),
}

/// An agent whose HTTP endpoints are bound, ready to run.
pub struct Agent<D> {
    settings: RunSettings,
    dataplane: D,
    state: Arc<AgentState>,
    healthz: TcpListener,
    metrics: TcpListener,
}

impl<D: Dataplane + 'static> Agent<D> {
    /// Builds the shared state and binds `/healthz` and `/metrics`.
    pub async fn start(settings: RunSettings, mut dataplane: D) -> Result<Self, AgentError> {
        let state = Arc::new(AgentState {
            node_name: settings.node_name.clone(),
            metrics: Metrics::new(),
            // kube-proxy's rule: unhealthy once nothing has synced for two sync periods.
            health: HealthTracker::new(settings.sync_period * 2),
            table: RwLock::new(NodeTable::new()),
        });
        let table_state = Arc::clone(&state);
        dataplane.attach_service_names(Arc::new(move |key| {
            let table = table_state.table.read().ok()?;
            let server = table.get(key)?;
            Some(format!(
                "{}/{}",
                server.service.namespace, server.service.name
            ))
        }));
        let healthz = http::bind(settings.healthz_bind_address).await?;
        let metrics = http::bind(settings.metrics_bind_address).await?;
        Ok(Self {
            settings,
            dataplane,
            state,
            healthz,
            metrics,
        })
    }

    /// The state the agent serves from; tests read the table and metrics through it.
    pub fn state(&self) -> Arc<AgentState> {
        Arc::clone(&self.state)
    }

    /// Where `/healthz` and `/livez` are actually served (useful with port 0).
    pub fn healthz_address(&self) -> Option<SocketAddr> {
        self.healthz.local_addr().ok()
    }

    /// Where `/metrics` and `/plan` are actually served.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics.local_addr().ok()
    }

    /// Runs until `shutdown` completes.
    pub async fn run(
        self,
        source: ClusterSource,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AgentError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = move || {
            let mut stop_rx = stop_rx.clone();
            async move {
                // A closed channel means the agent is gone: stop as well.
                let _ = stop_rx.wait_for(|stop| *stop).await;
            }
        };
        let servers = [
            tokio::spawn(http::serve(
                self.healthz,
                http::healthz_router(Arc::clone(&self.state)),
                stopped(),
            )),
            tokio::spawn(http::serve(
                self.metrics,
                http::metrics_router(Arc::clone(&self.state)),
                stopped(),
            )),
        ];
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        let sources = match source {
            ClusterSource::Kube(client) => source::kube::spawn_watchers(
                client,
                &self.settings.node_name,
                self.settings.plan.cluster_id.as_deref(),
                events_tx,
                Arc::clone(&self.state),
            ),
            ClusterSource::Directory(dir) => vec![tokio::spawn(source::poll::run(
                dir,
                self.settings.node_name.clone(),
                self.settings.source_poll_period,
                events_tx,
                Arc::clone(&self.state),
            ))],
        };
        tracing::info!(
            node = %self.settings.node_name,
            dataplane = self.dataplane.name(),
            min_sync_period = ?self.settings.min_sync_period,
            sync_period = ?self.settings.sync_period,
            "topoproxy running"
        );
        let sync = SyncLoop::new(
            SyncSettings {
                min_sync_period: self.settings.min_sync_period,
                sync_period: self.settings.sync_period,
                plan: self.settings.plan.clone(),
            },
            self.dataplane,
            Arc::clone(&self.state),
        );
        let result = sync.run(events_rx, shutdown).await;
        let _ = stop_tx.send(true);
        for task in sources {
            task.abort();
        }
        for server in servers {
            match server.await {
                Ok(Err(error)) => tracing::warn!(%error, "HTTP server stopped with an error"),
                Err(error) if error.is_panic() => tracing::error!(%error, "HTTP server panicked"),
                _ => {}
            }
        }
        tracing::info!("topoproxy stopped; the dataplane keeps its state");
        result.map_err(AgentError::from)
    }
}

/// A Kubernetes client: `kubeconfig` if given, else in-cluster, else the usual inference.
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, AgentError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| AgentError::KubeConfig(Box::new(e)))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| AgentError::KubeConfig(Box::new(e)))?
        }
        None => match kube::Config::incluster() {
            Ok(config) => config,
            Err(_) => kube::Config::infer()
                .await
                .map_err(|e| AgentError::KubeConfig(Box::new(e)))?,
        },
    };
    client_from_config(config)
}

/// The agent's client for `config`. kube's built-in retry of 429/503/504 is turned off: the
/// watchers already retry with backoff, and a transparent retry would hide an API outage from
/// the logs and metrics for minutes.
pub fn client_from_config(mut config: kube::Config) -> Result<kube::Client, AgentError> {
    config.default_retry = false;
    kube::Client::try_from(config).map_err(AgentError::KubeClient)
}
