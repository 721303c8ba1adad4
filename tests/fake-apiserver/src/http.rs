//! The HTTP side: axum routes for list, watch and get of the served kinds, with Kubernetes
//! query-parameter semantics and `Status` error bodies.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, Sleep};

use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Event, EventType, Expired, Filter, Key, Kind, Live, Store, Stored, WatchStart};

/// Watch timeout when the client sends no (or a zero) `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// Events per chunk when replaying a backlog or an initial state.
const CHUNK_EVENTS: usize = 256;

/// State shared by the server and every [`crate::FakeApiServer`] handle.
pub(crate) struct Shared {
    store: Mutex<Store>,
    pub available: AtomicBool,
    /// Bumped to abort every open watch stream.
    abort: watch::Sender<u64>,
    list_counts: [AtomicU64; 3],
    watch_counts: [AtomicU64; 3],
    pub open_watches: AtomicUsize,
    pub open_watches_changed: tokio::sync::Notify,
    /// BOOKMARK lines handed to watch responses so far.
    pub bookmarks_sent: AtomicU64,
}

impl Shared {
    pub fn new() -> Self {
        Self {
            store: Mutex::new(Store::new()),
            available: AtomicBool::new(true),
            abort: watch::channel(0).0,
            list_counts: Default::default(),
            watch_counts: Default::default(),
            open_watches: AtomicUsize::new(0),
            open_watches_changed: tokio::sync::Notify::new(),
            bookmarks_sent: AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        // No code panics while holding the lock; recover anyway rather than cascade.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn abort_watches(&self) {
        self.abort.send_modify(|g| *g += 1);
    }

    pub fn list_count(&self, kind: Kind) -> u64 {
        self.list_counts[kind.index()].load(Ordering::Relaxed)
    }

    pub fn watch_count(&self, kind: Kind) -> u64 {
        self.watch_counts[kind.index()].load(Ordering::Relaxed)
    }
}

/// The router serving every route of the fake.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/api/v1/services",
            get(|s: State<Arc<Shared>>, q: Q| collection(s, Kind::Service, None, q)),
        )
        .route(
            "/api/v1/namespaces/{ns}/services",
            get(|s: State<Arc<Shared>>, Path(ns): Path<String>, q: Q| {
                collection(s, Kind::Service, Some(ns), q)
            }),
        )
        .route(
            "/api/v1/namespaces/{ns}/services/{name}",
            get(
                |s: State<Arc<Shared>>, Path((ns, name)): Path<(String, String)>| {
                    object(s, Kind::Service, ns, name)
                },
            ),
        )
        .route(
            "/apis/discovery.k8s.io/v1/endpointslices",
            get(|s: State<Arc<Shared>>, q: Q| collection(s, Kind::EndpointSlice, None, q)),
        )
        .route(
            "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
            get(|s: State<Arc<Shared>>, Path(ns): Path<String>, q: Q| {
                collection(s, Kind::EndpointSlice, Some(ns), q)
            }),
        )
        .route(
            "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{name}",
            get(
                |s: State<Arc<Shared>>, Path((ns, name)): Path<(String, String)>| {
                    object(s, Kind::EndpointSlice, ns, name)
                },
            ),
        )
        .route(
            "/api/v1/nodes",
            get(|s: State<Arc<Shared>>, q: Q| collection(s, Kind::Node, None, q)),
        )
        .route(
            "/api/v1/nodes/{name}",
            get(|s: State<Arc<Shared>>, Path(name): Path<String>| {
                object(s, Kind::Node, String::new(), name)
            }),
        )
        .route("/version", get(version))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

type Q = Result<Query<HashMap<String, String>>, QueryRejection>;

/// A `metav1.Status` failure response.
fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn unavailable() -> Response {
    status(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        "the fake API server is unavailable (set_available(false))",
    )
}

fn json_response(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn fallback(State(shared): State<Arc<Shared>>, uri: axum::http::Uri) -> Response {
    if !shared.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "the server could not find the requested resource ({})",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: axum::http::Method) -> Response {
    status(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("the fake API server is read-only over HTTP: {method} is not supported"),
    )
}

async fn version(State(shared): State<Arc<Shared>>) -> Response {
    if !shared.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    axum::Json(serde_json::json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    }))
    .into_response()
}

async fn object(
    State(shared): State<Arc<Shared>>,
    kind: Kind,
    namespace: String,
    name: String,
) -> Response {
    if !shared.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    let found = shared.store().get(kind, &namespace, &name);
    match found {
        Some(o) => json_response(o.json.to_vec()),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{}s \"{name}\" not found", kind.kind().to_lowercase()),
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RvMatch {
    NotOlderThan,
    Exact,
}

/// The query parameters of a collection GET.
#[derive(Debug, Default)]
struct Params {
    watch: bool,
    limit: Option<usize>,
    continue_token: Option<String>,
    resource_version: Option<String>,
    rv_match: Option<RvMatch>,
    timeout: Option<u64>,
    bookmarks: bool,
    send_initial_events: bool,
    labels: LabelSelector,
    fields: FieldSelector,
}

fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "True" | "TRUE" => Ok(true),
        "false" | "0" | "False" | "FALSE" | "" => Ok(false),
        _ => Err(format!("invalid value for {name}: {v:?} is not a boolean")),
    }
}

fn parse_params(q: &HashMap<String, String>) -> Result<Params, String> {
    let mut p = Params::default();
    if let Some(v) = q.get("watch") {
        p.watch = parse_bool("watch", v)?;
    }
    if let Some(v) = q.get("limit") {
        let n: i64 = v
            .parse()
            .map_err(|_| format!("invalid value for limit: {v:?}"))?;
        if n < 0 {
            return Err(format!("limit must not be negative: {n}"));
        }
        // limit=0 means "no limit", as in Kubernetes.
        p.limit = usize::try_from(n).ok().filter(|n| *n > 0);
    }
    p.continue_token = q.get("continue").filter(|s| !s.is_empty()).cloned();
    p.resource_version = q.get("resourceVersion").filter(|s| !s.is_empty()).cloned();
    p.rv_match = match q.get("resourceVersionMatch").map(String::as_str) {
        None | Some("") => None,
        Some("NotOlderThan") => Some(RvMatch::NotOlderThan),
        Some("Exact") => Some(RvMatch::Exact),
        Some(other) => {
            return Err(format!(
                "resourceVersionMatch: Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\""
            ))
        }
    };
    if let Some(v) = q.get("timeoutSeconds") {
        p.timeout = Some(
            v.parse()
                .map_err(|_| format!("invalid value for timeoutSeconds: {v:?}"))?,
        );
    }
    if let Some(v) = q.get("allowWatchBookmarks") {
        p.bookmarks = parse_bool("allowWatchBookmarks", v)?;
    }
    if let Some(v) = q.get("sendInitialEvents") {
        p.send_initial_events = parse_bool("sendInitialEvents", v)?;
    }
    if let Some(v) = q.get("labelSelector") {
        p.labels = LabelSelector::parse(v).map_err(|e| e.to_string())?;
    }
    if let Some(v) = q.get("fieldSelector") {
        p.fields = FieldSelector::parse(v).map_err(|e| e.to_string())?;
    }
    Ok(p)
}

fn parse_rv(v: &str) -> Result<u64, String> {
    v.parse()
        .map_err(|_| format!("resourceVersion: Invalid value: {v:?}: must be an integer"))
}

async fn collection(
    State(shared): State<Arc<Shared>>,
    kind: Kind,
    namespace: Option<String>,
    query: Q,
) -> Response {
    let params = match query {
        Ok(Query(q)) => parse_params(&q),
        Err(e) => Err(e.body_text()),
    };
    let is_watch = matches!(&params, Ok(p) if p.watch);
    let counts = if is_watch {
        &shared.watch_counts
    } else {
        &shared.list_counts
    };
    counts[kind.index()].fetch_add(1, Ordering::Relaxed);
    if !shared.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    let params = match params {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    let filter = Filter {
        namespace,
        labels: params.labels.clone(),
        fields: params.fields.clone(),
    };
    if params.watch {
        watch_response(shared, kind, filter, &params)
    } else {
        list_response(&shared, kind, &filter, &params)
    }
}

// ---- lists ----

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// `v1.<list rv>.<hex namespace>.<hex name>`: the list's snapshot and the last key returned.
fn encode_continue(rv: u64, key: &Key) -> String {
    format!("v1.{rv}.{}.{}", hex(&key.0), hex(&key.1))
}

fn decode_continue(token: &str) -> Option<(u64, Key)> {
    let mut parts = token.split('.');
    if parts.next()? != "v1" {
        return None;
    }
    let rv = parts.next()?.parse().ok()?;
    let ns = unhex(parts.next()?)?;
    let name = unhex(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some((rv, (ns, name)))
}

fn too_large(rv: u64, current: u64) -> Response {
    status(
        StatusCode::GATEWAY_TIMEOUT,
        "Timeout",
        format!("Too large resource version: {rv}, current: {current}"),
    )
}

fn list_response(shared: &Shared, kind: Kind, filter: &Filter, p: &Params) -> Response {
    // Decide the snapshot before taking the lock; validate what needs no state.
    enum At {
        Current,
        Exact(u64),
        NotOlderThan(u64),
    }
    let mut after = None;
    let at = if let Some(token) = &p.continue_token {
        if p.resource_version.is_some() {
            return bad_request("specifying resource version is not allowed when using continue");
        }
        let Some((rv, key)) = decode_continue(token) else {
            return bad_request(format!("continue key is not valid: {token:?}"));
        };
        after = Some(key);
        At::Exact(rv)
    } else {
        match (&p.resource_version, p.rv_match) {
            (None, Some(_)) => {
                return bad_request(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                )
            }
            (None, None) => At::Current,
            (Some(v), m) => {
                let rv = match parse_rv(v) {
                    Ok(rv) => rv,
                    Err(e) => return bad_request(e),
                };
                match m {
                    Some(RvMatch::Exact) if rv == 0 => {
                        return bad_request(
                            "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
                        )
                    }
                    Some(RvMatch::Exact) => At::Exact(rv),
                    _ if rv == 0 => At::Current,
                    Some(RvMatch::NotOlderThan) => At::NotOlderThan(rv),
                    // Legacy semantics: with a limit, an exact snapshot; without, not older than.
                    None if p.limit.is_some() => At::Exact(rv),
                    None => At::NotOlderThan(rv),
                }
            }
        }
    };
    let is_continue = p.continue_token.is_some();
    let (rv, page) = {
        let store = shared.store();
        let current = store.rv();
        let rv = match at {
            At::Current => current,
            At::Exact(rv) | At::NotOlderThan(rv) if rv > current => {
                return too_large(rv, current);
            }
            At::Exact(rv) => rv,
            At::NotOlderThan(_) => current,
        };
        (rv, store.list(kind, rv, after.as_ref(), p.limit, filter))
    };
    let page = match page {
        Ok(page) => page,
        Err(Expired { requested, oldest }) => {
            let message = if is_continue {
                format!("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter. (requested {requested}, oldest {oldest})")
            } else {
                format!("The resourceVersion for the provided list is too old: {requested} (oldest {oldest})")
            };
            return status(StatusCode::GONE, "Expired", message);
        }
    };
    let token = page.more_after.as_ref().map(|k| encode_continue(rv, k));
    json_response(list_body(kind, rv, token.as_deref(), &page.items))
}

fn list_body(kind: Kind, rv: u64, token: Option<&str>, items: &[Arc<Stored>]) -> Vec<u8> {
    let size: usize = items.iter().map(|o| o.json.len() + 1).sum();
    let mut buf = Vec::with_capacity(size + 256);
    buf.extend_from_slice(b"{\"kind\":\"");
    buf.extend_from_slice(kind.list_kind().as_bytes());
    buf.extend_from_slice(b"\",\"apiVersion\":\"");
    buf.extend_from_slice(kind.api_version().as_bytes());
    buf.extend_from_slice(b"\",\"metadata\":{\"resourceVersion\":\"");
    buf.extend_from_slice(rv.to_string().as_bytes());
    buf.push(b'"');
    if let Some(token) = token {
        // Tokens are `v1.<digits>.<hex>.<hex>`: nothing to escape.
        buf.extend_from_slice(b",\"continue\":\"");
        buf.extend_from_slice(token.as_bytes());
        buf.push(b'"');
    }
    buf.extend_from_slice(b"},\"items\":[");
    for (i, o) in items.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(&o.json);
    }
    buf.extend_from_slice(b"]}");
    buf
}

// ---- watches ----

fn push_event(buf: &mut Vec<u8>, ty: &str, json: &[u8]) {
    buf.extend_from_slice(b"{\"type\":\"");
    buf.extend_from_slice(ty.as_bytes());
    buf.extend_from_slice(b"\",\"object\":");
    buf.extend_from_slice(json);
    buf.extend_from_slice(b"}\n");
}

/// Renders `ev` as this watch sees it, following the API server's cacher: an object that
/// stops matching the selectors is DELETED (previous content, event's resourceVersion), one
/// that starts matching is ADDED.
fn render(buf: &mut Vec<u8>, ev: &Event, filter: &Filter) {
    match ev.ty {
        EventType::Added => {
            if filter.matches(&ev.obj) {
                push_event(buf, "ADDED", &ev.obj.json);
            }
        }
        EventType::Deleted => {
            if filter.matches(&ev.obj) {
                push_event(buf, "DELETED", &ev.obj.json);
            }
        }
        EventType::Modified => {
            let now = filter.matches(&ev.obj);
            let before = ev.prev.as_ref().is_some_and(|p| filter.matches(p));
            match (before, now) {
                (true, true) => push_event(buf, "MODIFIED", &ev.obj.json),
                (false, true) => push_event(buf, "ADDED", &ev.obj.json),
                (true, false) => {
                    if let Some(json) = ev.prev_json_at_rv() {
                        push_event(buf, "DELETED", &json);
                    }
                }
                (false, false) => {}
            }
        }
    }
}

fn bookmark_line(kind: Kind, rv: u64, initial_events_end: bool) -> Vec<u8> {
    let annotations = if initial_events_end {
        ",\"annotations\":{\"k8s.io/initial-events-end\":\"true\"}"
    } else {
        ""
    };
    format!(
        "{{\"type\":\"BOOKMARK\",\"object\":{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{rv}\"{annotations}}}}}}}\n",
        kind.kind(),
        kind.api_version()
    )
    .into_bytes()
}

fn expired_line(e: Expired) -> Vec<u8> {
    let status = serde_json::json!({
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: {} ({})", e.requested, e.oldest),
            "reason": "Expired",
            "code": 410,
        }
    });
    let mut line = status.to_string().into_bytes();
    line.push(b'\n');
    line
}

fn stream_response<S>(stream: S) -> Response
where
    S: Stream<Item = Result<Bytes, WatchAborted>> + Send + 'static,
{
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn watch_response(shared: Arc<Shared>, kind: Kind, filter: Filter, p: &Params) -> Response {
    let from = if p.send_initial_events {
        if p.rv_match != Some(RvMatch::NotOlderThan) {
            return bad_request(
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            );
        }
        None
    } else {
        match p.resource_version.as_deref() {
            None | Some("0") => None,
            Some(v) => match parse_rv(v) {
                Ok(rv) => Some(rv),
                Err(e) => return bad_request(e),
            },
        }
    };
    if let Some(rv_match) = p.rv_match {
        if !p.send_initial_events || rv_match != RvMatch::NotOlderThan {
            return bad_request(
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            );
        }
    }
    let timeout = p
        .timeout
        .filter(|t| *t > 0)
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    // Subscribe to aborts, then re-check availability: a `set_available(false)` racing with
    // this start either is seen here or aborts the stream.
    let abort = shared.abort.subscribe();
    if !shared.available.load(Ordering::SeqCst) {
        return unavailable();
    }
    let (opened, current_rv) = {
        let store = shared.store();
        (store.open_watch(kind, from), store.rv())
    };
    let (start, rx) = match opened {
        Ok(x) => x,
        Err(e) => {
            // What the API server does: accept the watch, send one ERROR event, end it.
            let line = Bytes::from(expired_line(e));
            return stream_response(futures::stream::iter([Ok(line)]));
        }
    };
    let pending = match start {
        WatchStart::Backlog(evs) => Pending::Events(evs.into()),
        WatchStart::Initial(objs) => Pending::Objects(objs.into()),
    };
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    shared.open_watches_changed.notify_waiters();
    let state = WatchState {
        open: OpenGuard(Arc::clone(&shared)),
        kind,
        filter,
        bookmarks: p.bookmarks,
        min_rv: from.unwrap_or(current_rv),
        pending,
        initial_end_bookmark: p.send_initial_events.then_some(current_rv),
        rx,
        abort,
        deadline: Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
        done: false,
    };
    stream_response(futures::stream::unfold(state, WatchState::next))
}

/// The error a watch body yields to make hyper drop the connection mid-stream.
#[derive(Debug, thiserror::Error)]
#[error("watch stream aborted by the fake API server")]
pub(crate) struct WatchAborted;

struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
        self.0.open_watches_changed.notify_waiters();
    }
}

enum Pending {
    Events(VecDeque<Arc<Event>>),
    Objects(VecDeque<Arc<Stored>>),
}

struct WatchState {
    /// Counts this stream as open while it lives; also the way back to the shared state.
    open: OpenGuard,
    kind: Kind,
    filter: Filter,
    bookmarks: bool,
    /// Live events at or below this resourceVersion were already covered by the start.
    min_rv: u64,
    pending: Pending,
    initial_end_bookmark: Option<u64>,
    rx: broadcast::Receiver<Live>,
    abort: watch::Receiver<u64>,
    deadline: Pin<Box<Sleep>>,
    done: bool,
}

impl WatchState {
    fn aborted(&self) -> bool {
        // An error means the server is gone: abort too.
        self.abort.has_changed().unwrap_or(true)
    }

    /// The next chunk of the initial backlog / state, if any is left.
    fn next_pending(&mut self) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        loop {
            let mut taken = 0;
            match &mut self.pending {
                Pending::Events(q) => {
                    while let Some(ev) = q.pop_front() {
                        render(&mut buf, &ev, &self.filter);
                        taken += 1;
                        if taken == CHUNK_EVENTS {
                            break;
                        }
                    }
                }
                Pending::Objects(q) => {
                    while let Some(o) = q.pop_front() {
                        if self.filter.matches(&o) {
                            push_event(&mut buf, "ADDED", &o.json);
                            taken += 1;
                            if taken == CHUNK_EVENTS {
                                break;
                            }
                        }
                    }
                }
            }
            if !buf.is_empty() {
                return Some(buf);
            }
            if taken == 0 {
                break;
            }
        }
        self.initial_end_bookmark
            .take()
            .map(|rv| bookmark_line(self.kind, rv, true))
    }

    async fn next(mut self) -> Option<(Result<Bytes, WatchAborted>, Self)> {
        if self.done {
            return None;
        }
        if self.aborted() {
            self.done = true;
            return Some((Err(WatchAborted), self));
        }
        if let Some(chunk) = self.next_pending() {
            return Some((Ok(Bytes::from(chunk)), self));
        }
        loop {
            let msg = tokio::select! {
                biased;
                _ = self.abort.changed() => {
                    self.done = true;
                    return Some((Err(WatchAborted), self));
                }
                () = &mut self.deadline => return None,
                msg = self.rx.recv() => msg,
            };
            match msg {
                Ok(Live::Events(batch)) => {
                    let mut buf = Vec::new();
                    for ev in batch.iter().filter(|ev| ev.rv > self.min_rv) {
                        render(&mut buf, ev, &self.filter);
                    }
                    if !buf.is_empty() {
                        return Some((Ok(Bytes::from(buf)), self));
                    }
                }
                Ok(Live::Bookmark(rv)) => {
                    if self.bookmarks && rv >= self.min_rv {
                        let line = bookmark_line(self.kind, rv, false);
                        self.open.0.bookmarks_sent.fetch_add(1, Ordering::SeqCst);
                        return Some((Ok(Bytes::from(line)), self));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Too slow: end the watch cleanly; the client re-watches from its last
                    // resourceVersion, served from the history.
                    tracing::debug!(kind = ?self.kind, skipped = n, "watch lagged, closing");
                    return None;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Serves `router` on `listener` until the runtime shuts down.
///
/// `TCP_NODELAY` as the real API server (Go's net/http) sets it: watch events are small writes,
/// and with Nagle's algorithm each waits for the client's delayed ACK (40 ms on Linux).
pub(crate) async fn serve(listener: tokio::net::TcpListener, router: Router) {
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "cannot set TCP_NODELAY on a fake API server connection");
        }
    });
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(error = %e, "fake API server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_roundtrip() {
        let key = ("ns-1".to_string(), "svc-1".to_string());
        let t = encode_continue(42, &key);
        assert_eq!(decode_continue(&t), Some((42, key)));
        assert_eq!(decode_continue("garbage"), None);
        assert_eq!(decode_continue("v1.1.zz.00"), None);
        assert_eq!(decode_continue("v1.1.6.00"), None);
        assert_eq!(decode_continue("v1.x.00.00"), None);
    }

    #[test]
    fn params() {
        let q = |pairs: &[(&str, &str)]| {
            parse_params(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let p = q(&[("limit", "500"), ("labelSelector", "a,!b")]).expect("ok");
        assert_eq!(p.limit, Some(500));
        assert!(!p.watch);
        let p = q(&[
            ("watch", "true"),
            ("timeoutSeconds", "290"),
            ("allowWatchBookmarks", "true"),
        ])
        .expect("ok");
        assert!(p.watch && p.bookmarks);
        assert_eq!(p.timeout, Some(290));
        assert!(q(&[("limit", "x")]).is_err());
        assert!(q(&[("limit", "-1")]).is_err());
        assert!(q(&[("watch", "maybe")]).is_err());
        assert!(q(&[("resourceVersionMatch", "Newest")]).is_err());
        assert!(q(&[("labelSelector", "a in (b")]).is_err());
        assert!(q(&[("fieldSelector", "spec.foo=bar")]).is_err());
    }
}
