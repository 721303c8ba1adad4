//! The agent's two HTTP servers.
//!
//! - Health, on kube-proxy's `--healthz-bind-address` (default `0.0.0.0:10256`): `GET /healthz`
//!   and `GET /livez` answer `200` when the agent is healthy and `503` when not, with the
//!   [`HealthStatus`](crate::health::HealthStatus) as JSON either way.
//! - Metrics and introspection: `GET /metrics` (OpenMetrics text) and `GET /plan`, this node's
//!   current table as `ipvsadm -Ln` prints it, or as JSON with `?format=json`.
//!
//! Handlers only read the shared [`AgentState`]; a lock poisoned by a panicking writer is
//! recovered rather than turned into a panic here.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::SystemTime;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::health::HealthStatus;
use serde::Deserialize;
use thiserror::Error;
use tokio::net::TcpListener;

use crate::metrics::OPENMETRICS_CONTENT_TYPE;
use crate::render;
use crate::state::AgentState;

/// Content type of `/plan` in `ipvsadm` text form.
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";
/// Content type of `/plan?format=json`.
const JSON_CONTENT_TYPE: &str = "application/json";

/// Errors of the HTTP servers.
#[derive(Debug, Error)]
pub enum HttpError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The bound socket's address could not be read.
    #[error("cannot read the address of the http listener")]
    LocalAddr {
        #[source]
        source: std::io::Error,
    },
    /// The server stopped with an error.
    #[error("http server on {addr} failed")]
    Serve {
        /// The address the server listened on.
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds a TCP listener on `addr` (port 0 picks a free port; see `local_addr`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Routes of the health server: `GET /healthz` and `GET /livez`.
pub fn healthz_router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(state)
}

/// Routes of the metrics server: `GET /metrics` and `GET /plan[?format=text|json]`.
pub fn metrics_router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/plan", get(plan))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting and waits
/// for in-flight requests to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    let addr = listener
        .local_addr()
        .map_err(|source| HttpError::LocalAddr { source })?;
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| HttpError::Serve { addr, source })
}

async fn healthz(State(state): State<Arc<AgentState>>) -> Response {
    health_reply(state.health.healthz_status(SystemTime::now()))
}

async fn livez(State(state): State<Arc<AgentState>>) -> Response {
    health_reply(state.health.status(SystemTime::now()))
}

fn health_reply(status: HealthStatus) -> Response {
    let code = if status.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status)).into_response()
}

async fn metrics(State(state): State<Arc<AgentState>>) -> Response {
    match state.metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(error) => {
            tracing::warn!(%error, "cannot encode metrics");
            internal_error("cannot encode metrics")
        }
    }
}

/// Query string of `/plan`.
#[derive(Debug, Deserialize)]
struct PlanQuery {
    format: Option<String>,
}

/// Output formats of `/plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlanFormat {
    Text,
    Json,
}

async fn plan(State(state): State<Arc<AgentState>>, Query(query): Query<PlanQuery>) -> Response {
    let format = match query.format.as_deref() {
        None | Some("text") | Some("ipvsadm") => PlanFormat::Text,
        Some("json") => PlanFormat::Json,
        Some(other) => {
            return (
                StatusCode::BAD_REQUEST,
                [(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)],
                format!("unknown format {other:?}; use \"text\" (ipvsadm -Ln) or \"json\"\n"),
            )
                .into_response();
        }
    };
    // Rendering a large table takes a while and the read lock may wait for the sync loop's
    // write: keep both off the async workers.
    let rendered = tokio::task::spawn_blocking(move || render_plan(&state, format)).await;
    match rendered {
        Ok(Ok((content_type, body))) => {
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot render the plan as json");
            internal_error("cannot render the plan")
        }
        Err(error) => {
            tracing::warn!(%error, "plan rendering task failed");
            internal_error("cannot render the plan")
        }
    }
}

fn render_plan(
    state: &AgentState,
    format: PlanFormat,
) -> Result<(&'static str, String), serde_json::Error> {
    // A writer that panicked left a table that is at worst partly updated: still worth showing.
    let table = state.table.read().unwrap_or_else(PoisonError::into_inner);
    match format {
        PlanFormat::Text => Ok((TEXT_CONTENT_TYPE, render::ipvsadm::render_table(&table))),
        PlanFormat::Json => {
            let body = render::json::render_table(&table, &state.node_name, None)?;
            Ok((JSON_CONTENT_TYPE, body))
        }
    }
}

fn internal_error(message: &'static str) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)],
        format!("{message}\n"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::RwLock;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::health::HealthTracker;
    use crate::metrics::Metrics;
    use crate::planner::{plan, PlanConfig};
    use crate::synthetic::{synthetic_cluster, synthetic_node_name, SyntheticSpec};
    use crate::table::NodeTable;

    const TIMEOUT: Duration = Duration::from_secs(10);

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    /// A running server and the means to stop it.
    struct Server {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<Result<(), HttpError>>,
    }

    impl Server {
        async fn start(router: Router) -> Self {
            let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(serve(listener, router, async {
                let _ = stopped.await;
            }));
            Self { addr, stop, task }
        }

        async fn shutdown(self) {
            let _ = self.stop.send(());
            let result = tokio::time::timeout(TIMEOUT, self.task)
                .await
                .expect("server stops in time")
                .expect("server task");
            assert!(result.is_ok(), "serve: {result:?}");
        }
    }

    /// A bare HTTP/1.1 GET, read until the server closes the connection.
    async fn get(addr: SocketAddr, path: &str) -> Reply {
        tokio::time::timeout(TIMEOUT, async {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            stream
                .write_all(request.as_bytes())
                .await
                .expect("write request");
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.expect("read response");
            parse_reply(&raw)
        })
        .await
        .expect("response in time")
    }

    fn parse_reply(raw: &[u8]) -> Reply {
        let text = String::from_utf8(raw.to_vec()).expect("utf-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("end of headers");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .expect("status code")
            .parse()
            .expect("numeric status");
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (key, value) = line.split_once(':').expect("header line");
                (key.trim().to_owned(), value.trim().to_owned())
            })
            .collect();
        let mut reply = Reply {
            status,
            headers,
            body: String::new(),
        };
        reply.body = if reply
            .header("transfer-encoding")
            .is_some_and(|value| value.eq_ignore_ascii_case("chunked"))
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        if let Some(length) = reply.header("content-length") {
            assert_eq!(
                length.parse::<usize>().expect("content-length"),
                reply.body.len()
            );
        }
        reply
    }

    fn dechunk(mut rest: &str) -> String {
        let mut body = String::new();
        loop {
            let (size, after) = rest.split_once("\r\n").expect("chunk size");
            let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            if size == 0 {
                return body;
            }
            body.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
    }

    fn state(healthy: bool) -> Arc<AgentState> {
        let spec = SyntheticSpec {
            services: 6,
            endpoints_per_service: 4,
            zones: 2,
            nodes_per_zone: 2,
            with_hints: true,
        };
        let store = synthetic_cluster(&spec);
        let node_name = synthetic_node_name(0, 0);
        let node = store.node(&node_name).expect("synthetic node").clone();
        let table = plan(&store, &node, &PlanConfig::default());
        assert!(!table.is_empty());
        let health = HealthTracker::new(Duration::from_secs(60));
        if healthy {
            health.set_waiting_for(Vec::new());
            health.record_sync_success(SystemTime::now());
        } else {
            health.set_waiting_for(vec!["services".to_owned(), "endpointslices".to_owned()]);
        }
        Arc::new(AgentState {
            node_name,
            metrics: Metrics::new(),
            health,
            table: RwLock::new(table),
        })
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind");
        let taken = listener.local_addr().expect("local addr");
        let error = bind(taken).await.expect_err("address in use");
        assert_eq!(error.to_string(), format!("cannot listen on {taken}"));
        assert!(std::error::Error::source(&error).is_some());
    }

    #[tokio::test]
    async fn healthz_and_livez_are_200_when_healthy() {
        let server = Server::start(healthz_router(state(true))).await;
        for path in ["/healthz", "/livez"] {
            let reply = get(server.addr, path).await;
            assert_eq!(reply.status, 200, "{path}");
            assert_eq!(reply.header("content-type"), Some("application/json"));
            let json: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
            assert_eq!(json["healthy"], true);
            assert_eq!(json["reason"], serde_json::Value::Null);
            assert!(json["lastSuccessfulSync"].is_string());
            assert!(json["currentTime"].is_string());
        }
        assert_eq!(get(server.addr, "/metrics").await.status, 404);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn only_healthz_fails_while_the_node_is_leaving() {
        let state = state(true);
        state.health.set_node_leaving(Some(
            "the Node is tainted ToBeDeletedByClusterAutoscaler".to_owned(),
        ));
        let server = Server::start(healthz_router(state)).await;
        let healthz = get(server.addr, "/healthz").await;
        assert_eq!(healthz.status, 503);
        let json: serde_json::Value = serde_json::from_str(&healthz.body).expect("json");
        assert_eq!(json["nodeEligible"], false);
        assert_eq!(
            json["reason"],
            "the Node is tainted ToBeDeletedByClusterAutoscaler"
        );
        let livez = get(server.addr, "/livez").await;
        assert_eq!(livez.status, 200);
        let json: serde_json::Value = serde_json::from_str(&livez.body).expect("json");
        assert_eq!(json["healthy"], true);
        assert!(json.get("nodeEligible").is_none());
        server.shutdown().await;
    }

    #[tokio::test]
    async fn healthz_and_livez_are_503_when_unhealthy() {
        let server = Server::start(healthz_router(state(false))).await;
        for path in ["/healthz", "/livez"] {
            let reply = get(server.addr, path).await;
            assert_eq!(reply.status, 503, "{path}");
            let json: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
            assert_eq!(json["healthy"], false);
            assert_eq!(
                json["reason"],
                "waiting for the initial list of services, endpointslices"
            );
            assert_eq!(json["lastSuccessfulSync"], serde_json::Value::Null);
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_text() {
        let state = state(true);
        state.metrics.set_table_stats(6, 24, 3);
        let server = Server::start(metrics_router(state)).await;
        let reply = get(server.addr, "/metrics").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(reply
            .body
            .lines()
            .any(|line| line == "topoproxy_services_falling_back 3"));
        assert!(reply.body.ends_with("# EOF\n"));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn plan_text_is_the_ipvsadm_rendering() {
        let state = state(true);
        let expected = render::ipvsadm::render_table(&state.table.read().expect("table"));
        let server = Server::start(metrics_router(state)).await;
        for path in ["/plan", "/plan?format=text"] {
            let reply = get(server.addr, path).await;
            assert_eq!(reply.status, 200, "{path}");
            assert_eq!(reply.header("content-type"), Some(TEXT_CONTENT_TYPE));
            assert_eq!(reply.body, expected, "{path}");
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn plan_json_parses() {
        let state = state(true);
        let (expected, servers) = {
            let table = state.table.read().expect("table");
            (
                render::json::render_table(&table, &state.node_name, None).expect("json"),
                table.len(),
            )
        };
        let server = Server::start(metrics_router(state)).await;
        let reply = get(server.addr, "/plan?format=json").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(JSON_CONTENT_TYPE));
        assert_eq!(reply.body, expected);
        let json: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
        assert_eq!(json["node"], "node-a-0");
        assert_eq!(
            json["virtualServers"].as_array().map(Vec::len),
            Some(servers)
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn plan_unknown_format_is_400() {
        let server = Server::start(metrics_router(state(true))).await;
        let reply = get(server.addr, "/plan?format=xml").await;
        assert_eq!(reply.status, 400);
        assert!(
            reply.body.contains("unknown format \"xml\""),
            "{}",
            reply.body
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn plan_survives_a_poisoned_lock() {
        let state = state(true);
        let poisoner = Arc::clone(&state);
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.table.write().expect("table");
            panic!("poison the table lock");
        })
        .join();
        assert!(state.table.is_poisoned());
        let expected = render::ipvsadm::render_table(
            &state.table.read().unwrap_or_else(PoisonError::into_inner),
        );
        let server = Server::start(metrics_router(state)).await;
        let reply = get(server.addr, "/plan").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, expected);
        server.shutdown().await;
    }

    #[test]
    fn empty_table_renders() {
        let state = AgentState {
            node_name: "n".to_owned(),
            metrics: Metrics::new(),
            health: HealthTracker::new(Duration::from_secs(1)),
            table: RwLock::new(NodeTable::new()),
        };
        let (content_type, body) = render_plan(&state, PlanFormat::Json).expect("render");
        assert_eq!(content_type, JSON_CONTENT_TYPE);
        assert!(body.contains("\"virtualServers\": []"));
    }
}
