//! Bad and extreme objects in a YAML source, each beside the example cluster: what the agent
//! does with it (docs/bad-input.md has the table). Each must end in a clear error or a warning
//! naming the object, and nothing else may change.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use topoproxy::planner::{self, PlanConfig};
use topoproxy::source::file::{self, FileSourceError, Loaded};
use topoproxy::table::{NodeTable, VirtualServer};

const NODE: &str = "node-b1";

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster")
}

/// The example cluster copied into a scratch directory, plus files of the test's own.
struct Source(PathBuf);

impl Source {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("topoproxy-bad-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        copy_dir(&example_dir(), &dir);
        Self(dir)
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> &Self {
        fs::write(self.0.join(name), contents).expect("write fixture");
        self
    }

    fn load(&self) -> Result<Loaded, FileSourceError> {
        file::load_dir(&self.0)
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create dir");
    for entry in fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

fn plan(loaded: &Loaded, node: &str) -> NodeTable {
    let node = loaded.store.node(node).expect("the node is in the source");
    planner::plan(&loaded.store, node, &PlanConfig::default())
}

fn example_table() -> NodeTable {
    plan(
        &file::load_dir(&example_dir()).expect("example loads"),
        NODE,
    )
}

/// Every virtual server of `before` is in `after` unchanged, except those of `namespace`.
fn others_unchanged(before: &NodeTable, after: &NodeTable, namespace: &str) {
    let others = |table: &NodeTable| -> Vec<VirtualServer> {
        table
            .servers()
            .filter(|vs| vs.service.namespace != namespace)
            .cloned()
            .collect()
    };
    assert_eq!(
        others(before),
        others(after),
        "another Service's table changed"
    );
}

fn warnings(loaded: &Loaded) -> String {
    loaded.warnings.iter().fold(String::new(), |mut text, w| {
        let _ = writeln!(text, "{w}");
        text
    })
}

#[test]
fn a_slice_with_5000_endpoints_programs_all_of_them() {
    let mut slice = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: big-1, namespace: big, labels: {kubernetes.io/service-name: big}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n",
    );
    for i in 0..5_000u32 {
        let _ = writeln!(slice, "- addresses: [10.120.{}.{}]", i / 250, i % 250 + 1);
    }
    let source = Source::new("5000");
    source
        .write(
            "big.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: big}\n\
             spec: {clusterIP: 10.96.200.1, ports: [{name: http, port: 80, protocol: TCP}]}\n",
        )
        .write("big-slice.yaml", slice);
    let loaded = source.load().expect("loads");
    assert!(loaded.warnings.is_empty(), "{}", warnings(&loaded));
    let table = plan(&loaded, NODE);
    let big: Vec<&VirtualServer> = table
        .servers()
        .filter(|vs| vs.service.namespace == "big")
        .collect();
    assert_eq!(big.len(), 1);
    assert_eq!(big[0].programmed_len(), 5_000);
    others_unchanged(&example_table(), &table, "big");
}

#[test]
fn a_service_with_10000_ports_programs_every_port() {
    let mut service = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: wide, namespace: wide}\n\
         spec:\n  clusterIP: 10.96.201.1\n  ports:\n",
    );
    let mut slice = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: wide-1, namespace: wide, labels: {kubernetes.io/service-name: wide}}\n\
         addressType: IPv4\nendpoints: [{addresses: [10.121.0.1]}]\nports:\n",
    );
    for port in 1..=10_000u32 {
        let _ = writeln!(
            service,
            "  - {{name: p{port}, port: {port}, protocol: TCP}}"
        );
        let _ = writeln!(
            slice,
            "- {{name: p{port}, port: {}, protocol: TCP}}",
            port + 20_000
        );
    }
    let source = Source::new("10000");
    source
        .write("wide.yaml", service)
        .write("wide-slice.yaml", slice);
    let loaded = source.load().expect("loads");
    assert!(loaded.warnings.is_empty(), "{}", warnings(&loaded));
    let table = plan(&loaded, NODE);
    let wide: Vec<&VirtualServer> = table
        .servers()
        .filter(|vs| vs.service.namespace == "wide")
        .collect();
    assert_eq!(wide.len(), 10_000);
    assert!(wide.iter().all(|vs| vs.programmed_len() == 1));
    others_unchanged(&example_table(), &table, "wide");
}

/// A file that is not UTF-8 (or not YAML at all) fails the load naming the file, line and
/// column: `plan` exits 1, and `run --source` keeps its last table (source/poll.rs) until the
/// file is fixed. Files without a .yaml/.yml name are never read.
#[test]
fn invalid_utf8_and_binary_files_are_errors_naming_the_file() {
    let source = Source::new("utf8");
    source.write("binary.bin", [0u8, 159, 146, 150, 0xff, 0]);
    assert!(source.load().is_ok(), "a non-YAML name is not read");

    source.write(
        "latin1.yaml",
        b"apiVersion: v1\nkind: Service\nmetadata: {name: caf\xe9}\n",
    );
    let error = source.load().expect_err("not UTF-8");
    let text = error.to_string();
    assert!(text.contains("latin1.yaml:3:21"), "{text}");
    assert!(
        text.contains("not UTF-8 (byte 0xe9 at offset 49)"),
        "{text}"
    );
    fs::remove_file(source.0.join("latin1.yaml")).expect("remove");

    source.write(
        "image.yaml",
        [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n', 0, 0],
    );
    let text = source.load().expect_err("binary").to_string();
    assert!(
        text.contains("image.yaml:1:1: could not parse YAML: not UTF-8"),
        "{text}"
    );
    fs::remove_file(source.0.join("image.yaml")).expect("remove");

    source.write("nul.yaml", [b'a', b':', b' ', 0, 0, b'\n']);
    let text = source.load().expect_err("control characters").to_string();
    assert!(text.contains("nul.yaml:1:"), "{text}");
}

#[test]
fn objects_of_wrong_types_are_skipped_with_a_warning_naming_them() {
    let source = Source::new("types");
    source.write(
        "wrong.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: wrong, namespace: bad}\n\
         spec: {clusterIP: 10.96.202.1, ports: not-a-list}\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: wrong-1, namespace: bad, labels: {kubernetes.io/service-name: wrong}}\n\
         addressType: IPv4\nendpoints: {addresses: 10.122.0.1}\n\
         ---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: [node-q]}\n",
    );
    let loaded = source.load().expect("loads");
    let text = warnings(&loaded);
    assert!(
        text.contains("Service bad/wrong: not a valid Service"),
        "{text}"
    );
    assert!(
        text.contains("EndpointSlice bad/wrong-1: not a valid EndpointSlice"),
        "{text}"
    );
    assert!(text.contains("not a valid Node"), "{text}");
    assert_eq!(loaded.warnings.len(), 3, "{text}");
    let table = plan(&loaded, NODE);
    assert!(table.servers().all(|vs| vs.service.namespace != "bad"));
    others_unchanged(&example_table(), &table, "bad");
}

/// Fields the API does not know are dropped, as the API server prunes them.
#[test]
fn unknown_fields_are_ignored() {
    let source = Source::new("unknown");
    source.write(
        "extra.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: extra, colour: red}\n\
         spec: {clusterIP: 10.96.203.1, frobnicate: true, ports: [{port: 80, protocol: TCP, weight: 9}]}\n",
    );
    let loaded = source.load().expect("loads");
    assert!(loaded.warnings.is_empty(), "{}", warnings(&loaded));
    let table = plan(&loaded, NODE);
    assert_eq!(
        table
            .servers()
            .filter(|vs| vs.service.namespace == "extra")
            .count(),
        1
    );
    others_unchanged(&example_table(), &table, "extra");
}

/// A Node without addresses still gets its ClusterIPs; it has no address to put a NodePort on.
#[test]
fn a_node_without_addresses_plans_cluster_ips_and_no_node_ports() {
    let source = Source::new("bare-node");
    source.write(
        "bare.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: bare, labels: {topology.kubernetes.io/zone: zone-b}}\n",
    );
    let loaded = source.load().expect("loads");
    assert!(loaded.warnings.is_empty(), "{}", warnings(&loaded));
    let bare = plan(&loaded, "bare");
    let example = example_table();
    let cluster_ips = |table: &NodeTable| -> Vec<_> {
        table
            .servers()
            .filter(|vs| vs.frontend == topoproxy::table::Frontend::ClusterIP)
            .map(|vs| vs.key)
            .collect()
    };
    assert_eq!(cluster_ips(&bare), cluster_ips(&example));
    assert!(bare
        .servers()
        .all(|vs| vs.frontend != topoproxy::table::Frontend::NodePort));
}

/// IPv6 zone ids (`fe80::1%eth0`) are no Service or endpoint address: that address is
/// skipped with a warning naming the object; the rest of it is used.
#[test]
fn ipv6_zone_ids_lose_just_that_address_with_a_warning() {
    let source = Source::new("zones");
    source.write(
        "zoned.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: zoned, namespace: zoned}\n\
         spec: {clusterIP: 'fd00:96::1', clusterIPs: ['fd00:96::1'], ipFamilies: [IPv6], \
         externalIPs: ['fe80::1%eth0'], ports: [{name: http, port: 80, protocol: TCP}]}\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: zoned-1, namespace: zoned, labels: {kubernetes.io/service-name: zoned}}\n\
         addressType: IPv6\nports: [{name: http, port: 8080, protocol: TCP}]\n\
         endpoints: [{addresses: ['fe80::2%eth0']}, {addresses: ['fd00:244::2']}]\n",
    );
    let loaded = source.load().expect("loads");
    let text = warnings(&loaded);
    assert!(
        text.contains("Service zoned/zoned") && text.contains("fe80::1%eth0"),
        "{text}"
    );
    assert!(
        text.contains("EndpointSlice zoned/zoned-1") && text.contains("fe80::2%eth0"),
        "{text}"
    );
    let table = plan(&loaded, NODE);
    let zoned: Vec<&VirtualServer> = table
        .servers()
        .filter(|vs| vs.service.namespace == "zoned")
        .collect();
    assert_eq!(zoned.len(), 1, "{zoned:?}");
    assert_eq!(zoned[0].key.address.to_string(), "fd00:96::1");
    assert_eq!(zoned[0].programmed_len(), 1);
    others_unchanged(&example_table(), &table, "zoned");
}

/// Two Services with one ClusterIP: the smaller key (namespace, then name) keeps each
/// address:port both claim, whatever the order they came in; the loser's other ports stay.
/// `plan` and the agent's sync loop warn naming both.
#[test]
fn duplicate_cluster_ips_go_to_the_smaller_key_and_touch_nothing_else() {
    let example = example_table();
    let dns = example
        .servers()
        .find(|vs| vs.service.name == "kube-dns")
        .expect("kube-dns")
        .clone();
    let source = Source::new("dup");
    source.write(
        "dup.yaml",
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dup, namespace: zzz}}\n\
             spec: {{clusterIP: {}, ports: [{{name: a, port: {}, protocol: {}}}, {{name: b, port: 4444, protocol: TCP}}]}}\n",
            dns.key.address, dns.key.port, dns.key.protocol
        ),
    );
    let loaded = source.load().expect("loads");
    let table = plan(&loaded, NODE);
    let conflicts = table.conflicts();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].winner, dns.service);
    assert_eq!(conflicts[0].loser.to_string(), "zzz/dup");
    assert_eq!(
        table.get(&dns.key),
        Some(&dns),
        "kube-dns keeps its address"
    );
    assert_eq!(
        table
            .servers()
            .filter(|vs| vs.service.namespace == "zzz")
            .count(),
        1
    );
    others_unchanged(&example, &table, "zzz");
}
