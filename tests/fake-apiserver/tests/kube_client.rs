//! The fake API server driven by the real `kube::Client` and `kube::runtime::watcher`.
//!
//! Every wait is bounded: a test fails instead of hanging.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::time::{Duration, Instant};

use fake_apiserver::{synthetic, FakeApiServer, Kind};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DynamicObject, ListParams, WatchEvent, WatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use serde_json::json;
use tokio::sync::mpsc;

/// How long a wait for an event may take before the test fails. Waits end as soon as the
/// event comes, so this only bounds a failing test; it is long because a watcher that met an
/// outage retries after its backoff (0.8 s doubling, with jitter), which a loaded 2-core
/// machine stretches further (3 s once failed in CI).
const STEP: Duration = Duration::from_secs(30);

fn service(ns: &str, name: &str, labels: &[(&str, &str)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

/// The next item of `stream`, or a panic after [`STEP`].
async fn next<S: Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    match tokio::time::timeout(STEP, stream.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("stream ended while waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

fn rv_of<K: ResourceExt>(o: &K) -> u64 {
    o.resource_version()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("object {} has no numeric resourceVersion", o.name_any()))
}

/// Shows a watcher event compactly in assertions.
fn describe<K: ResourceExt>(ev: &Result<Event<K>, watcher::Error>) -> String {
    match ev {
        Ok(Event::Init) => "Init".into(),
        Ok(Event::InitApply(o)) => format!("InitApply({})", o.name_any()),
        Ok(Event::InitDone) => "InitDone".into(),
        Ok(Event::Apply(o)) => format!("Apply({})", o.name_any()),
        Ok(Event::Delete(o)) => format!("Delete({})", o.name_any()),
        Err(e) => format!("Err({e})"),
    }
}

/// Drives a watcher in a task (a watcher only makes requests while polled) and forwards its
/// events, described, to a channel.
fn spawn_watcher<K, S>(stream: S) -> mpsc::UnboundedReceiver<String>
where
    K: ResourceExt + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if tx.send(describe(&ev)).is_err() {
                break;
            }
        }
    });
    rx
}

/// Takes watcher events until `pred` holds for one, returning everything seen.
async fn until(
    rx: &mut mpsc::UnboundedReceiver<String>,
    what: &str,
    mut pred: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + STEP;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(d)) => d,
            Ok(None) => panic!("watcher ended waiting for {what}; seen {seen:?}"),
            Err(_) => panic!("timed out waiting for {what}; seen {seen:?}"),
        };
        seen.push(d.clone());
        if pred(&d) {
            return seen;
        }
    }
}

fn watch_kinds<K: Debug>(events: &[WatchEvent<K>]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(_) => "ADDED",
            WatchEvent::Modified(_) => "MODIFIED",
            WatchEvent::Deleted(_) => "DELETED",
            WatchEvent::Bookmark(_) => "BOOKMARK",
            WatchEvent::Error(_) => "ERROR",
        })
        .collect()
}

#[tokio::test]
async fn list_pages_over_a_consistent_snapshot() {
    let server = FakeApiServer::start().await;
    let objects = (0..1200)
        .map(|i| service(&format!("ns-{}", i % 7), &format!("svc-{i}"), &[]).into())
        .collect();
    server.apply_many(objects);
    let api: Api<Service> = Api::all(server.client().await);

    let mut names = Vec::new();
    let mut rvs = BTreeSet::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let mut lp = ListParams::default().limit(500);
        lp.continue_token = token;
        let page = api.list(&lp).await.expect("list page");
        pages += 1;
        rvs.insert(page.metadata.resource_version.clone());
        names.extend(page.items.iter().map(|s| s.name_any()));
        if pages == 1 {
            // Churn between pages must not show up in the paged snapshot.
            server.delete_service("ns-0", "svc-0");
            server.apply_service(service("ns-0", "svc-new", &[]));
            server.apply_service(service("ns-6", "svc-6", &[("changed", "yes")]));
        }
        token = page.metadata.continue_;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names.len(), 1200);
    let unique: BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), 1200, "every service exactly once");
    assert!(!unique.contains(&"svc-new".to_string()));
    assert_eq!(
        rvs.len(),
        1,
        "every page reports the snapshot's resourceVersion"
    );
    assert_eq!(server.list_count(Kind::Service), 3);

    // A fresh list sees the churn.
    let now = api.list(&ListParams::default()).await.expect("list");
    assert_eq!(now.items.len(), 1200);
    assert!(now.items.iter().any(|s| s.name_any() == "svc-new"));
    assert!(!now.items.iter().any(|s| s.name_any() == "svc-0"));

    // Namespaced list.
    let ns: Api<Service> = Api::namespaced(server.client().await, "ns-3");
    let list = ns.list(&ListParams::default()).await.expect("ns list");
    assert!(list
        .items
        .iter()
        .all(|s| s.namespace().as_deref() == Some("ns-3")));
    assert_eq!(list.items.len(), (0..1200).filter(|i| i % 7 == 3).count());
}

#[tokio::test]
async fn expired_continue_token_and_exact_rv_are_410() {
    let server = FakeApiServer::start().await;
    let objects = (0..30)
        .map(|i| service("default", &format!("svc-{i}"), &[]).into())
        .collect();
    server.apply_many(objects);
    let api: Api<Service> = Api::all(server.client_without_retry().await);
    let first = api
        .list(&ListParams::default().limit(10))
        .await
        .expect("first page");
    server.apply_node(node("n")); // move the RV past the snapshot...
    server.compact(); // ...and forget it
    let mut lp = ListParams::default().limit(10);
    lp.continue_token = first.metadata.continue_.clone();
    match api.list(&lp).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 410);
            assert_eq!(s.reason, "Expired");
        }
        other => panic!("expected 410, got {other:?}"),
    }
    // An explicit exact read of the compacted RV is expired too.
    let old_rv = first.metadata.resource_version.clone().expect("rv");
    let lp = ListParams::default()
        .at(&old_rv)
        .matching(kube::api::VersionMatch::Exact);
    assert!(matches!(api.list(&lp).await, Err(kube::Error::Api(s)) if s.code == 410));
}

#[tokio::test]
async fn watch_delivers_added_modified_deleted_in_order() {
    let server = FakeApiServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client().await, "default");
    let start = server.resource_version();
    let mut stream = api
        .watch(&WatchParams::default().timeout(10), &start.to_string())
        .await
        .expect("watch")
        .boxed();
    let rv1 = server.apply_service(service("default", "a", &[]));
    let rv2 = server.apply_service(service("default", "a", &[("v", "2")]));
    server.apply_service(service("other", "not-in-namespace", &[]));
    let rv3 = server.delete_service("default", "a");
    let mut events = Vec::new();
    for what in ["ADDED", "MODIFIED", "DELETED"] {
        events.push(next(&mut stream, what).await.expect("event"));
    }
    assert_eq!(watch_kinds(&events), ["ADDED", "MODIFIED", "DELETED"]);
    let rvs: Vec<u64> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => rv_of(o),
            _ => 0,
        })
        .collect();
    assert_eq!(rvs, [rv1, rv2, rv3]);
    let uids: BTreeSet<_> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => o.uid(),
            _ => None,
        })
        .collect();
    assert_eq!(uids.len(), 1, "uid is kept across updates");

    // A watch from an older RV replays the same history.
    let mut replay = api
        .watch(&WatchParams::default().timeout(10), &start.to_string())
        .await
        .expect("watch")
        .boxed();
    let mut events = Vec::new();
    for what in ["ADDED", "MODIFIED", "DELETED"] {
        events.push(next(&mut replay, what).await.expect("event"));
    }
    assert_eq!(watch_kinds(&events), ["ADDED", "MODIFIED", "DELETED"]);
    assert_eq!(server.watch_count(Kind::Service), 2);
}

#[tokio::test]
async fn label_selectors_filter_lists_and_watches_with_delete_on_unmatch() {
    let server = FakeApiServer::start().await;
    let client = server.client().await;
    let headless = ("service.kubernetes.io/headless", "");
    server.apply_service(service("default", "plain", &[]));
    server.apply_service(service("default", "headless", &[headless]));
    server
        .apply_raw(
            Kind::EndpointSlice,
            json!({"metadata": {"name": "owned", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "plain"}},
            "addressType": "IPv4", "endpoints": []}),
        )
        .expect("raw");
    server
        .apply_raw(
            Kind::EndpointSlice,
            json!({"metadata": {"name": "orphan", "namespace": "default"},
            "addressType": "IPv4", "endpoints": []}),
        )
        .expect("raw");

    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name"))
        .await
        .expect("list");
    let names: Vec<_> = list.items.iter().map(|o| o.name_any()).collect();
    assert_eq!(names, ["owned"]);

    let svcs: Api<Service> = Api::all(client);
    let sel = "!service.kubernetes.io/headless";
    let list = svcs
        .list(&ListParams::default().labels(sel))
        .await
        .expect("list");
    let names: Vec<_> = list.items.iter().map(|o| o.name_any()).collect();
    assert_eq!(names, ["plain"]);
    let rv = list.metadata.resource_version.expect("rv");

    let mut stream = svcs
        .watch(&WatchParams::default().labels(sel).timeout(10), &rv)
        .await
        .expect("watch")
        .boxed();
    // plain becomes headless: DELETED for this watch; then back: ADDED; the headless one
    // changing while still headless: nothing.
    let rv_unmatch = server.apply_service(service("default", "plain", &[headless]));
    server.apply_service(service("default", "headless", &[headless, ("x", "y")]));
    server.apply_service(service("default", "plain", &[]));
    server.apply_service(service("default", "plain", &[("still", "matching")]));
    let mut events = Vec::new();
    for what in ["DELETED", "ADDED", "MODIFIED"] {
        events.push(next(&mut stream, what).await.expect("event"));
    }
    assert_eq!(watch_kinds(&events), ["DELETED", "ADDED", "MODIFIED"]);
    let WatchEvent::Deleted(gone) = &events[0] else {
        unreachable!()
    };
    assert_eq!(gone.name_any(), "plain");
    assert_eq!(rv_of(gone), rv_unmatch, "DELETED carries the event's RV");
    assert!(
        gone.labels().is_empty(),
        "DELETED carries the last matching content"
    );

    // Set-based terms and a bad selector.
    let list = svcs
        .list(&ListParams::default().labels("x in (y,z),!nothing"))
        .await
        .expect("list");
    let names: Vec<_> = list.items.iter().map(|o| o.name_any()).collect();
    assert_eq!(names, ["headless"]);
    match svcs.list(&ListParams::default().labels("a in (b")).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 400),
        other => panic!("expected 400, got {other:?}"),
    }
}

#[tokio::test]
async fn field_selector_watches_a_single_node() {
    let server = FakeApiServer::start().await;
    for name in ["node-a-0", "node-a-1", "node-b-0"] {
        server.apply_node(node(name));
    }
    let nodes: Api<Node> = Api::all(server.client().await);
    let cfg = watcher::Config::default().fields("metadata.name=node-a-1");
    let mut w = spawn_watcher(watcher::watcher(nodes.clone(), cfg));
    let seen = until(&mut w, "InitDone", |d| d == "InitDone").await;
    assert_eq!(seen, ["Init", "InitApply(node-a-1)", "InitDone"]);
    assert!(server.wait_for_open_watches(1, STEP).await);
    server.apply_node(node("node-a-0"));
    server.apply_node(node("node-c-0"));
    server.delete_node("node-a-1");
    let seen = until(&mut w, "Delete", |d| d.starts_with("Delete")).await;
    assert_eq!(seen, ["Delete(node-a-1)"]);

    let got = nodes.get("node-b-0").await.expect("get");
    assert_eq!(got.name_any(), "node-b-0");
    assert!(matches!(nodes.get("nope").await, Err(kube::Error::Api(s)) if s.code == 404));
    let bad = nodes
        .list(&ListParams::default().fields("spec.unschedulable=true"))
        .await;
    assert!(matches!(bad, Err(kube::Error::Api(s)) if s.code == 400));
}

#[tokio::test]
async fn watcher_sees_init_then_apply_and_delete() {
    let server = FakeApiServer::start().await;
    server.apply_service(service("default", "one", &[]));
    server.apply_service(service("kube-system", "two", &[]));
    let api: Api<Service> = Api::all(server.client().await);
    let mut w = spawn_watcher(watcher::watcher(api, watcher::Config::default()));
    let seen = until(&mut w, "InitDone", |d| d == "InitDone").await;
    assert_eq!(
        seen,
        ["Init", "InitApply(one)", "InitApply(two)", "InitDone"],
        "lists are ordered by namespace, then name"
    );
    assert!(server.wait_for_open_watches(1, STEP).await);
    server.apply_service(service("default", "three", &[]));
    server.apply_service(service("default", "one", &[("v", "2")]));
    server.delete_service("kube-system", "two");
    let seen = until(&mut w, "Delete", |d| d.starts_with("Delete")).await;
    assert_eq!(seen, ["Apply(three)", "Apply(one)", "Delete(two)"]);
    assert_eq!(server.list_count(Kind::Service), 1);
    assert_eq!(server.watch_count(Kind::Service), 1);
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_and_end_bookmark() {
    let server = FakeApiServer::start().await;
    server.apply_service(service("default", "one", &[]));
    let api: Api<Service> = Api::all(server.client().await);
    let mut w = spawn_watcher(watcher::watcher(
        api,
        watcher::Config::default().streaming_lists(),
    ));
    let seen = until(&mut w, "InitDone", |d| d == "InitDone").await;
    assert_eq!(seen, ["Init", "InitApply(one)", "InitDone"]);
    server.apply_service(service("default", "two", &[]));
    let seen = until(&mut w, "Apply", |d| d.starts_with("Apply")).await;
    assert_eq!(seen, ["Apply(two)"]);
    assert_eq!(server.list_count(Kind::Service), 0);
}

#[tokio::test]
async fn dropped_watch_resumes_from_last_rv_without_relist() {
    let server = FakeApiServer::start().await;
    server.apply_service(service("default", "one", &[]));
    let api: Api<Service> = Api::all(server.client().await);
    let mut w = spawn_watcher(watcher::watcher(api, watcher::Config::default()));
    until(&mut w, "InitDone", |d| d == "InitDone").await;
    assert!(server.wait_for_open_watches(1, STEP).await);
    server.drop_watches();
    server.apply_service(service("default", "two", &[]));
    let seen = until(&mut w, "Apply", |d| d.starts_with("Apply")).await;
    assert_eq!(seen, ["Apply(two)"], "no error, no relist: resumed from RV");
    assert_eq!(server.list_count(Kind::Service), 1);
    assert_eq!(server.watch_count(Kind::Service), 2);
}

#[tokio::test]
async fn compaction_then_dropped_watch_forces_relist() {
    let server = FakeApiServer::start().await;
    server.apply_service(service("default", "one", &[]));
    let api: Api<Service> = Api::all(server.client().await);
    let mut w = spawn_watcher(watcher::watcher(api.clone(), watcher::Config::default()));
    until(&mut w, "InitDone", |d| d == "InitDone").await;
    assert!(server.wait_for_open_watches(1, STEP).await);
    server.apply_service(service("default", "two", &[]));
    until(&mut w, "Apply", |d| d.starts_with("Apply")).await;

    // The watcher's RV is two's; other writes move the global RV on, then history goes.
    server.apply_node(node("n"));
    server.compact();
    // A raw watch from an older RV gets the API server's 410 ERROR event.
    let mut raw = api
        .watch(&WatchParams::default().timeout(10), "2")
        .await
        .expect("watch accepted")
        .boxed();
    match next(&mut raw, "ERROR").await {
        Ok(WatchEvent::Error(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert!(s.message.starts_with("too old resource version"));
        }
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    drop(raw);

    server.drop_watches();
    server.delete_service("default", "one");
    server.apply_service(service("default", "three", &[]));
    let seen = until(&mut w, "InitDone", |d| d == "InitDone").await;
    assert!(
        seen[0].starts_with("Err(") && seen[0].contains("too old resource version: 3 (4)"),
        "{seen:?}"
    );
    assert_eq!(
        seen[1..],
        ["Init", "InitApply(three)", "InitApply(two)", "InitDone"],
        "{seen:?}"
    );
    assert_eq!(server.list_count(Kind::Service), 2);
    // And it keeps watching after the relist.
    assert!(server.wait_for_open_watches(1, STEP).await);
    server.apply_service(service("default", "four", &[]));
    let seen = until(&mut w, "Apply", |d| d.starts_with("Apply")).await;
    assert_eq!(seen, ["Apply(four)"]);
}

/// Polls `condition` until it holds; panics after 30 s naming `what`.
async fn wait_for(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn unavailable_server_yields_errors_and_watcher_recovers_with_backoff() {
    let server = FakeApiServer::start().await;
    server.apply_service(service("default", "one", &[]));
    let api: Api<Service> = Api::all(server.client_without_retry().await);
    let mut w =
        spawn_watcher(watcher::watcher(api.clone(), watcher::Config::default()).default_backoff());
    until(&mut w, "InitDone", |d| d == "InitDone").await;
    assert!(server.wait_for_open_watches(1, STEP).await);

    server.set_available(false);
    assert!(matches!(
        api.list(&ListParams::default()).await,
        Err(kube::Error::Api(s)) if s.code == 503
    ));
    let seen = until(&mut w, "an error", |d| d.starts_with("Err")).await;
    assert!(
        seen.last()
            .is_some_and(|e| e.contains("503") || e.contains("unavailable")),
        "{seen:?}"
    );
    // The watcher retries into the outage (and fails) before the server comes back.
    let watches = server.watch_count(Kind::Service);
    server.apply_service(service("default", "two", &[]));
    wait_for("a re-watch during the outage", || {
        server.watch_count(Kind::Service) > watches
    })
    .await;
    server.set_available(true);
    let seen = until(&mut w, "Apply", |d| d.starts_with("Apply")).await;
    assert_eq!(
        seen.last().map(String::as_str),
        Some("Apply(two)"),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|d| d == "Init"),
        "resumed, not relisted: {seen:?}"
    );
}

#[tokio::test]
async fn short_outage_is_hidden_by_kube_client_retry() {
    let server = FakeApiServer::start().await;
    server.apply_service(service("default", "one", &[]));
    let api: Api<Service> = Api::all(server.client().await);
    let mut w = spawn_watcher(watcher::watcher(api, watcher::Config::default()));
    until(&mut w, "InitDone", |d| d == "InitDone").await;
    assert!(server.wait_for_open_watches(1, STEP).await);
    let watches = server.watch_count(Kind::Service);
    server.set_available(false);
    // kube's retry layer meets the outage at least once before the server comes back.
    wait_for("a re-watch during the outage", || {
        server.watch_count(Kind::Service) > watches
    })
    .await;
    server.apply_service(service("default", "two", &[]));
    server.set_available(true);
    let seen = until(&mut w, "Apply", |d| d.starts_with("Apply")).await;
    assert_eq!(seen, ["Apply(two)"], "no error reached the watcher");
    assert!(
        server.watch_count(Kind::Service) > watches + 1,
        "the re-watch was retried by the client"
    );
}

#[tokio::test]
async fn bookmarks_arrive_and_do_not_break_the_watcher() {
    let server = FakeApiServer::start().await;
    let api: Api<Service> = Api::all(server.client().await);
    let mut raw = api
        .watch(
            &WatchParams::default().timeout(10),
            &server.resource_version().to_string(),
        )
        .await
        .expect("watch")
        .boxed();
    let mut w = spawn_watcher(watcher::watcher(api.clone(), watcher::Config::default()));
    until(&mut w, "InitDone", |d| d == "InitDone").await;
    assert!(server.wait_for_open_watches(2, STEP).await);
    server.apply_node(node("n")); // RV moves on without Service events
    let bookmarks = server.bookmarks_sent();
    server.send_bookmarks();
    match next(&mut raw, "BOOKMARK").await {
        Ok(WatchEvent::Bookmark(b)) => {
            assert_eq!(
                b.metadata.resource_version,
                server.resource_version().to_string()
            );
            assert_eq!(b.types.kind, "Service");
        }
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
    // Both watches got the bookmark (the watcher's comes before the stream ends, so it has
    // its RV when it re-watches): compacting now does not force a relist.
    assert!(server.wait_for_bookmarks_sent(bookmarks + 2, STEP).await);
    server.compact();
    server.drop_watches();
    server.apply_service(service("default", "after", &[]));
    let seen = until(&mut w, "Apply", |d| d.starts_with("Apply")).await;
    assert_eq!(seen, ["Apply(after)"]);
    assert_eq!(server.list_count(Kind::Service), 1);

    // Without allowWatchBookmarks, no bookmark.
    let mut plain = api
        .watch(
            &WatchParams::default().disable_bookmarks().timeout(10),
            &server.resource_version().to_string(),
        )
        .await
        .expect("watch")
        .boxed();
    server.send_bookmarks();
    let rv = server.apply_service(service("default", "x", &[]));
    match next(&mut plain, "ADDED").await {
        Ok(WatchEvent::Added(o)) => assert_eq!(rv_of(&o), rv),
        other => panic!("expected ADDED, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_timeout_ends_the_stream_cleanly() {
    let server = FakeApiServer::start().await;
    let api: Api<Node> = Api::all(server.client().await);
    let started = Instant::now();
    let mut stream = api
        .watch(&WatchParams::default().timeout(1), "1")
        .await
        .expect("watch")
        .boxed();
    let end = tokio::time::timeout(STEP, stream.next()).await;
    assert!(matches!(end, Ok(None)), "clean end, got {end:?}");
    // A lower bound only: the server may end the watch late on a busy machine, never early.
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(
        server.wait_for_no_open_watches(STEP).await,
        "the ended watch still counts as open"
    );
}

#[tokio::test]
async fn kubeconfig_is_accepted_by_kube() {
    let server = FakeApiServer::start().await;
    server.apply_node(node("n1"));
    let path = std::env::temp_dir().join(format!(
        "fake-apiserver-kubeconfig-{}-{}.yaml",
        std::process::id(),
        server.addr().port()
    ));
    server.write_kubeconfig(&path).expect("write");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("read");
    let _ = std::fs::remove_file(&path);
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).expect("client");
    let nodes: Api<Node> = Api::all(client);
    let list = nodes.list(&ListParams::default()).await.expect("list");
    assert_eq!(list.items.len(), 1);
}

#[tokio::test]
async fn raw_objects_are_served_verbatim() {
    let server = FakeApiServer::start().await;
    let endpoints: Vec<_> = (0..5000)
        .map(
            |i| json!({"addresses": [format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)]}),
        )
        .collect();
    server
        .apply_raw(
            Kind::EndpointSlice,
            json!({"metadata": {"name": "huge", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "weird"}},
                "addressType": "IPv4", "endpoints": endpoints,
                "ports": [{"name": "http", "port": 70000, "protocol": "TCP"}]}),
        )
        .expect("raw slice");
    server
        .apply_raw(
            Kind::Service,
            json!({"metadata": {"name": "weird"},
                "spec": {"clusterIP": "not-an-ip", "ports": [{"port": 70000}]}}),
        )
        .expect("raw service");
    assert!(server
        .apply_raw(Kind::Node, json!({"metadata": {}}))
        .is_err());
    assert!(server
        .apply_raw(
            Kind::Node,
            json!({"metadata": {"name": "n", "labels": {"a": 1}}})
        )
        .is_err());

    let client = server.client().await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let huge = slices.get("huge").await.expect("get");
    assert_eq!(huge.endpoints.len(), 5000);
    assert_eq!(huge.ports.as_ref().and_then(|p| p[0].port), Some(70000));
    let svcs: Api<Service> = Api::default_namespaced(client.clone());
    let weird = svcs
        .get("weird")
        .await
        .expect("defaulted into namespace default");
    let spec = weird.spec.expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("not-an-ip"));
    assert_eq!(spec.ports.map(|p| p[0].port), Some(70000));

    // Something k8s-openapi cannot even decode, seen through a dynamic API.
    server
        .apply_raw(
            Kind::Service,
            json!({"metadata": {"name": "broken", "namespace": "default"},
                "spec": {"ports": "not-a-list"}}),
        )
        .expect("raw");
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Service"));
    let dynamic: Api<DynamicObject> = Api::namespaced_with(client, "default", &ar);
    let broken = dynamic.get("broken").await.expect("dynamic get");
    assert_eq!(broken.data["spec"]["ports"], json!("not-a-list"));
    assert!(svcs.get("broken").await.is_err(), "typed decode fails");
}

/// The 10,000-Service cluster lists completely through raw requests and the watcher's paging.
/// How fast is `cargo xtask bench-sync`'s business (benches/sync.rs), not a test's.
#[tokio::test]
async fn synthetic_cluster_lists_completely() {
    let server = FakeApiServer::start().await;
    let objects = synthetic::synthetic_objects(10_000, 10, 3, 10, true);
    let rv = server.apply_many(objects);
    assert_eq!(rv, 1 + 30 + 20_000);
    assert_eq!(server.object_count(Kind::Service), 10_000);
    assert_eq!(server.object_count(Kind::EndpointSlice), 10_000);
    assert_eq!(server.object_count(Kind::Node), 30);

    let client = server.client().await;
    let uri = |p: &str| p.parse::<axum::http::Uri>().expect("uri");
    // The whole list in one response, body read as text.
    for (path, kind) in [
        ("/api/v1/services", "ServiceList"),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            "EndpointSliceList",
        ),
    ] {
        let text = client
            .request_text(
                axum::http::Request::get(uri(path))
                    .body(Vec::new())
                    .expect("req"),
            )
            .await
            .expect("list");
        let list: serde_json::Value = serde_json::from_str(&text).expect("list JSON");
        assert_eq!(list["kind"], kind);
        assert_eq!(
            list["items"].as_array().map(Vec::len),
            Some(10_000),
            "{path}"
        );
    }

    // Through the typed API with the watcher's paging (500 per page), decoding included.
    let mut counts = BTreeMap::new();
    for (kind, n) in [
        ("Service", {
            let api: Api<Service> = Api::all(client.clone());
            let mut w = watcher::watcher(api, watcher::Config::default()).boxed();
            count_init(&mut w).await
        }),
        ("EndpointSlice", {
            let api: Api<EndpointSlice> = Api::all(client.clone());
            let mut w = watcher::watcher(api, watcher::Config::default()).boxed();
            count_init(&mut w).await
        }),
    ] {
        counts.insert(kind, n);
    }
    assert_eq!(counts["Service"], 10_000);
    assert_eq!(counts["EndpointSlice"], 10_000);
}

async fn count_init<K, S>(w: &mut S) -> usize
where
    K: ResourceExt,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
{
    let mut n = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
            Ok(Some(Ok(Event::InitApply(_)))) => n += 1,
            Ok(Some(Ok(Event::InitDone))) => return n,
            Ok(Some(Ok(_))) => {}
            other => panic!("unexpected {:?}", other.map(|o| o.map(|e| describe(&e)))),
        }
    }
}

/// Reads a raw HTTP/1.1 watch response until the server closes or ends it.
async fn raw_watch(server: &FakeApiServer, query: &str, during: impl FnOnce()) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    let req = format!(
        "GET /api/v1/nodes?{query} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr()
    );
    tcp.write_all(req.as_bytes()).await.expect("write");
    assert!(server.wait_for_open_watches(1, STEP).await);
    during();
    let mut out = Vec::new();
    tokio::time::timeout(STEP, tcp.read_to_end(&mut out))
        .await
        .expect("response ends")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn drop_watches_cuts_the_connection_mid_stream_and_timeout_ends_cleanly() {
    let server = FakeApiServer::start().await;
    let cut = raw_watch(&server, "watch=true&resourceVersion=1", || {
        server.drop_watches()
    })
    .await;
    assert!(cut.starts_with("HTTP/1.1 200"), "{cut}");
    assert!(cut.contains("transfer-encoding: chunked"), "{cut}");
    assert!(!cut.ends_with("0\r\n\r\n"), "no final chunk: {cut:?}");

    let clean = raw_watch(&server, "watch=1&resourceVersion=1&timeoutSeconds=1", || {}).await;
    assert!(clean.ends_with("0\r\n\r\n"), "final chunk: {clean:?}");

    // Unavailable: 503 with a Status body, for watches and lists alike.
    server.set_available(false);
    let api: Api<Node> = Api::all(server.client_without_retry().await);
    match api.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (503, "ServiceUnavailable"))
        }
        other => panic!("expected 503, got {other:?}"),
    }
    assert!(matches!(
        api.watch(&WatchParams::default(), "1").await,
        Err(kube::Error::Api(s)) if s.code == 503
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watch_is_ended_cleanly_and_writers_never_block() {
    let server = FakeApiServer::start().await;
    let padding = "x".repeat(8 * 1024);
    let writer = server.clone();
    // The client does not read while 6,000 single writes (one live message each, more than
    // the live channel holds) go by: the socket fills, the server-side stream stalls, lags.
    // Blocked writers would never finish: a generous bound turns that hang into a failure
    // without making the test depend on the machine's speed.
    let body = tokio::time::timeout(
        Duration::from_secs(300),
        raw_watch(&server, "watch=true&resourceVersion=1", move || {
            for i in 0..6000 {
                writer
                    .apply_raw(
                        Kind::Node,
                        json!({"metadata": {"name": format!("n{i}"),
                        "annotations": {"padding": padding}}}),
                    )
                    .expect("raw");
            }
        }),
    )
    .await
    .expect("the writers never block on a lagging watch");
    assert!(body.ends_with("0\r\n\r\n"), "clean end");
    let added = body.matches("\"type\":\"ADDED\"").count();
    eprintln!("lagging watch delivered {added} of 6000 events before being closed");
    assert!(added < 6000, "only a prefix was delivered: {added}");
    // The client resumes from its last RV and gets the rest from the history.
    let api: Api<Node> = Api::all(server.client().await);
    let mut rest = api
        .watch(&WatchParams::default().timeout(1), &(1 + added).to_string())
        .await
        .expect("watch")
        .boxed();
    let mut n = 0;
    while let Some(ev) = tokio::time::timeout(STEP, rest.next())
        .await
        .expect("bounded")
    {
        if matches!(ev, Ok(WatchEvent::Added(_))) {
            n += 1;
        }
    }
    assert_eq!(added + n, 6000);
}
