//! Golden tests: the bundled example cluster in, `ipvsadm -Ln` text / JSON / explanation out.
//!
//! The expected files live in `tests/golden/`. After a deliberate change to the planner or the
//! examples, regenerate them with `UPDATE_GOLDEN=1 cargo test --test golden` and review the diff.

use std::fs;
use std::path::{Path, PathBuf};

use topoproxy::planner::{explain, plan, PlanConfig};
use topoproxy::render;
use topoproxy::source::file::{load_dir, Loaded};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate sits inside the workspace")
        .to_path_buf()
}

fn example_cluster() -> Loaded {
    let dir = workspace_root().join("examples/cluster");
    load_dir(&dir).unwrap_or_else(|error| panic!("loading {}: {error}", dir.display()))
}

fn check_golden(name: &str, actual: &str) {
    let path = workspace_root().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::create_dir_all(path.parent().expect("golden dir")).expect("create golden dir");
        fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!(
            "{}: {error} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the plan:\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

const NODES: [&str; 5] = ["node-a1", "node-a2", "node-b1", "node-b2", "node-c1"];

#[test]
fn example_cluster_loads_without_warnings() {
    let loaded = example_cluster();
    assert!(
        loaded.warnings.is_empty(),
        "unexpected warnings: {:#?}",
        loaded.warnings
    );
    assert_eq!(loaded.store.nodes().count(), NODES.len());
    // kubernetes, kube-dns, frontend, cart, checkout, catalog, and the three not proxied.
    assert_eq!(loaded.store.service_count(), 9);
}

#[test]
fn ipvsadm_text_for_every_example_node() {
    let loaded = example_cluster();
    for name in NODES {
        let node = loaded.store.node(name).expect("example node");
        let table = plan(&loaded.store, node, &PlanConfig::default());
        check_golden(
            &format!("{name}.ipvsadm"),
            &render::ipvsadm::render_table(&table),
        );
    }
}

#[test]
fn json_with_tiers_for_one_node() {
    let loaded = example_cluster();
    let node = loaded.store.node("node-b1").expect("example node");
    let table = plan(&loaded.store, node, &PlanConfig::default());
    let json = render::json::render_table(&table, &node.name, None).expect("json");
    check_golden("node-b1.json", &format!("{json}\n"));
}

#[test]
fn explanation_for_one_node() {
    let loaded = example_cluster();
    let node = loaded.store.node("node-b1").expect("example node");
    let config = PlanConfig::default();
    let explained = explain::explain(&loaded.store, node, &config);
    check_golden("node-b1.explain", &explain::render_text(&explained, node));
}
