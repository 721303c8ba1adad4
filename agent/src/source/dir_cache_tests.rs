//! The merged view kept object by object equals a fresh load of the whole directory after
//! every change, and the events sent for a scan are the whole-directory diff's.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::*;
use crate::model::{EndpointSlice, Node, NodeLocality, Service};
use crate::source::file::load_dir;
use crate::source::poll::{changes, events_for};
use crate::source::test_dir::Scratch;
use crate::source::SourceEvent;

/// The node the events are for.
const NODE: &str = "node-a";
const FILES: [&str; 4] = ["a.yaml", "b.yml", "sub/c.yaml", "sub/d/e.yaml"];

/// One document of a file.
#[derive(Debug, Clone)]
enum Document {
    Service {
        name: &'static str,
        ip: u8,
    },
    /// A Service whose port is not a number: skipped with a warning.
    InvalidService {
        name: &'static str,
    },
    Slice {
        name: &'static str,
        service: &'static str,
        address: u8,
    },
    Node {
        name: &'static str,
        zone: Option<&'static str>,
    },
    /// Not YAML: the file fails to parse.
    Broken,
}

impl Document {
    fn yaml(&self) -> String {
        match self {
            Self::Service { name, ip } => format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: prod}}\n\
                 spec:\n  clusterIP: 10.0.0.{ip}\n  ports: [{{name: http, port: 80}}]\n"
            ),
            Self::InvalidService { name } => format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: prod}}\n\
                 spec:\n  ports: [{{port: abc}}]\n"
            ),
            Self::Slice {
                name,
                service,
                address,
            } => format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata:\n  name: {name}\n  namespace: prod\n  labels: {{kubernetes.io/service-name: {service}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
                 endpoints:\n- addresses: [10.1.0.{address}]\n  nodeName: node-a\n"
            ),
            Self::Node { name, zone } => {
                let labels = zone.map_or(String::new(), |zone| {
                    format!("\n  labels: {{topology.kubernetes.io/zone: {zone}}}")
                });
                format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}{labels}\n")
            }
            Self::Broken => "key: [unclosed\n".to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Write(usize, Vec<Document>),
    Remove(usize),
    /// `mv` of one file over another path (which may exist).
    Rename(usize, usize),
}

fn document() -> impl Strategy<Value = Document> {
    let name = || prop::sample::select(vec!["web", "db"]);
    prop_oneof![
        4 => (name(), 1..=2u8).prop_map(|(name, ip)| Document::Service { name, ip }),
        1 => name().prop_map(|name| Document::InvalidService { name }),
        4 => (prop::sample::select(vec!["s1", "s2"]), name(), 1..=2u8)
            .prop_map(|(name, service, address)| Document::Slice { name, service, address }),
        2 => (
            prop::sample::select(vec!["node-a", "node-b"]),
            prop::option::of(prop::sample::select(vec!["zone-1", "zone-2"])),
        )
            .prop_map(|(name, zone)| Document::Node { name, zone }),
        1 => Just(Document::Broken),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let file = || 0..FILES.len();
    prop_oneof![
        5 => (file(), prop::collection::vec(document(), 0..=3))
            .prop_map(|(file, documents)| Step::Write(file, documents)),
        1 => file().prop_map(Step::Remove),
        1 => (file(), file()).prop_map(|(from, to)| Step::Rename(from, to)),
    ]
}

fn apply(dir: &Path, step: &Step) {
    match step {
        Step::Write(file, documents) => {
            let path = dir.join(FILES[*file]);
            fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            let text: Vec<String> = documents.iter().map(Document::yaml).collect();
            fs::write(path, text.join("---\n")).expect("write");
        }
        Step::Remove(file) => _ = fs::remove_file(dir.join(FILES[*file])),
        Step::Rename(from, to) => {
            let to = dir.join(FILES[*to]);
            fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir");
            _ = fs::rename(dir.join(FILES[*from]), to);
        }
    }
}

/// Everything of a store the sync loop reads, comparable.
type Snapshot = (
    Vec<Service>,
    BTreeMap<SliceKey, EndpointSlice>,
    Vec<Node>,
    BTreeMap<String, Option<NodeLocality>>,
);

fn snapshot(store: &Store) -> Snapshot {
    let nodes: Vec<Node> = store.nodes().cloned().collect();
    let localities = nodes
        .iter()
        .map(|node| (node.name.clone(), store.node_locality(&node.name).cloned()))
        .collect();
    (
        store.services().cloned().collect(),
        store
            .slices()
            .map(|slice| (SliceKey::of(slice), slice.clone()))
            .collect(),
        nodes,
        localities,
    )
}

fn sorted(events: Vec<SourceEvent>) -> Vec<String> {
    let mut events: Vec<String> = events.iter().map(|event| format!("{event:?}")).collect();
    events.sort();
    events
}

/// One step checked: the scan against a fresh load of the directory, and its events against
/// the whole-directory diff from what was last published.
fn check(
    cache: &mut DirectoryCache,
    dir: &Path,
    published: &mut Loaded,
) -> Result<(), TestCaseError> {
    let scanned = cache.scan(dir);
    let Ok(fresh) = load_dir(dir) else {
        // Some file fails to parse: the scan says so or saw nothing new, and what was
        // published stays.
        prop_assert!(!matches!(scanned, Ok((Scan::Changed(_), _))), "{scanned:?}");
        prop_assert_eq!(snapshot(cache.store()), snapshot(&published.store));
        return Ok(());
    };
    let changed = match scanned {
        Ok((Scan::Changed(changed), _)) => changed,
        Ok((Scan::Unchanged, _)) => Changed::default(),
        Err(error) => return Err(TestCaseError::fail(format!("the scan failed: {error}"))),
    };
    prop_assert_eq!(snapshot(cache.store()), snapshot(&fresh.store));
    let warnings: Vec<String> = cache.warnings().map(ToString::to_string).collect();
    let fresh_warnings: Vec<String> = fresh.warnings.iter().map(ToString::to_string).collect();
    prop_assert_eq!(warnings, fresh_warnings);
    prop_assert_eq!(cache.file_count(), fresh.files);
    prop_assert_eq!(
        sorted(events_for(&changed, cache.store(), NODE)),
        sorted(changes(&published.store, &fresh.store, NODE))
    );
    *published = fresh;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_merged_view_kept_file_by_file_equals_a_fresh_load(
        steps in prop::collection::vec(step(), 1..=16),
    ) {
        let dir = Scratch::new("dir-cache-property");
        let mut cache = DirectoryCache::new();
        let mut published = Loaded::default();
        for (at, step) in steps.iter().enumerate() {
            apply(dir.path(), step);
            check(&mut cache, dir.path(), &mut published).map_err(|error| {
                TestCaseError::fail(format!("after step {at} ({step:?}): {error}"))
            })?;
        }
    }
}

/// The generator reaches what the property is about: an object defined in two files, a file
/// that fails and is fixed, a removal that uncovers an earlier file's definition.
#[test]
fn the_steps_reach_the_interesting_states() {
    let dir = Scratch::new("dir-cache-property");
    let mut cache = DirectoryCache::new();
    let mut published = Loaded::default();
    let web = |ip| Document::Service { name: "web", ip };
    let steps = [
        Step::Write(0, vec![web(1)]),
        Step::Write(
            2,
            vec![
                web(2),
                Document::Node {
                    name: NODE,
                    zone: Some("zone-1"),
                },
            ],
        ),
        Step::Write(1, vec![Document::Broken]),
        Step::Write(
            2,
            vec![
                web(2),
                Document::Node {
                    name: NODE,
                    zone: Some("zone-2"),
                },
            ],
        ),
        Step::Remove(1),
        Step::Rename(2, 3),
        Step::Remove(3),
    ];
    let ip = |cache: &DirectoryCache| {
        cache
            .store()
            .service(&ServiceKey::new("prod", "web"))
            .map(|service| service.cluster_ips[0].to_string())
    };
    let mut seen = Vec::new();
    for step in &steps {
        apply(dir.path(), step);
        check(&mut cache, dir.path(), &mut published).unwrap();
        let zone = cache
            .store()
            .node_locality(NODE)
            .and_then(|locality| locality.zone.as_deref().map(str::to_owned));
        seen.push((ip(&cache), zone));
    }
    let some = |text: &str| Some(text.to_owned());
    assert_eq!(
        seen,
        [
            (some("10.0.0.1"), None),
            (some("10.0.0.2"), some("zone-1")),
            // b.yml fails: the last good state stays.
            (some("10.0.0.2"), some("zone-1")),
            (some("10.0.0.2"), some("zone-1")),
            // Fixed (removed): the change made meanwhile comes.
            (some("10.0.0.2"), some("zone-2")),
            (some("10.0.0.2"), some("zone-2")),
            // The later file gone, the earlier one's definition is back.
            (some("10.0.0.1"), None),
        ]
    );
}
