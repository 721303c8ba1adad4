//! The `topoproxy` binary as an operator runs it: exit codes, stdout, stderr.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate sits inside the workspace")
        .to_path_buf()
}

fn topoproxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_topoproxy"))
        .args(args)
        .current_dir(workspace_root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run topoproxy")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("topoproxy-cli-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) {
        fs::write(self.0.join(name), text).expect("write fixture");
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn plan_prints_the_golden_table() {
    let output = topoproxy(&["plan", "--source", "examples/cluster", "--node", "node-b1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let golden = fs::read_to_string(workspace_root().join("tests/golden/node-b1.ipvsadm"))
        .expect("golden file");
    assert_eq!(stdout(&output), golden);
}

#[test]
fn unknown_node_is_a_clear_error_with_exit_code_2() {
    let output = topoproxy(&["plan", "--source", "examples/cluster", "--node", "node-z9"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("node \"node-z9\" is not in"), "{err}");
    assert!(err.contains("node-a1"), "lists the known nodes: {err}");
    assert!(stdout(&output).is_empty());
}

#[test]
fn json_output_carries_tiers_and_the_fallback_flag() {
    let output = topoproxy(&[
        "plan",
        "--source",
        "examples/cluster",
        "--node",
        "node-c1",
        "--format",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("valid JSON");
    assert_eq!(doc["node"], "node-c1");
    let servers = doc["virtualServers"].as_array().expect("virtualServers");
    let catalog = servers
        .iter()
        .find(|vs| vs["service"]["name"] == "catalog" && vs["key"]["family"] == "IPv4")
        .expect("catalog IPv4 virtual server");
    assert_eq!(catalog["fallingBack"], true);
    assert_eq!(catalog["programmed"].as_array().map(Vec::len), Some(2));
    let dns = servers
        .iter()
        .find(|vs| vs["service"]["name"] == "kube-dns" && vs["key"]["protocol"] == "UDP")
        .expect("kube-dns UDP virtual server");
    assert_eq!(dns["activeTier"], "SameZone");
    assert_eq!(dns["tiers"][1]["kind"], "Cluster");
}

#[test]
fn explain_adds_reasons_after_the_table() {
    let output = topoproxy(&[
        "plan",
        "--source",
        "examples/cluster",
        "--node",
        "node-a1",
        "--explain",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.starts_with("IP Virtual Server version"), "{text}");
    assert!(
        text.contains("Service shop/payments-db: skipped: type ExternalName"),
        "{text}"
    );
    assert!(
        text.contains("zone hint names this node's zone zone-a"),
        "{text}"
    );
}

#[test]
fn unparsable_yaml_names_file_and_line_and_fails() {
    let scratch = Scratch::new("bad-yaml");
    scratch.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n    bad: indentation\n",
    );
    let output = topoproxy(&["plan", "--source", scratch.path(), "--node", "n1"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("broken.yaml:5"), "{err}");
}

#[test]
fn bad_objects_are_skipped_with_warnings_and_the_rest_plans() {
    let scratch = Scratch::new("bad-objects");
    scratch.write(
        "cluster.yaml",
        r#"apiVersion: v1
kind: Node
metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec:
  clusterIP: 10.96.0.5
  ports:
  - {name: http, port: 80, protocol: TCP}
  - {name: huge, port: 70000, protocol: TCP}
  - {name: weird, port: 81, protocol: QUIC}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: good-1, namespace: default, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
endpoints:
- addresses: [10.244.0.5]
- addresses: [10.244.0.999]
- addresses: ["fd00::5"]
ports:
- {name: http, port: 8080, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan, namespace: default}
addressType: IPv4
endpoints:
- addresses: [10.244.0.6]
ports:
- {name: http, port: 8080, protocol: TCP}
"#,
    );
    let output = topoproxy(&["plan", "--source", scratch.path(), "--node", "n1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let err = stderr(&output);
    for expected in ["70000", "QUIC", "10.244.0.999", "fd00::5", "orphan"] {
        assert!(err.contains(expected), "warning about {expected}: {err}");
    }
    assert_eq!(
        stdout(&output),
        "IP Virtual Server version 1.2.1 (size=4096)\n\
         Prot LocalAddress:Port Scheduler Flags\n  \
         -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n\
         TCP  10.96.0.5:80 rr\n  \
         -> 10.244.0.5:8080              Masq    1      0          0         \n"
    );
}

/// `topoproxy.io/ipvs-scheduler` picks a Service's scheduler and flags; an invalid value
/// warns, naming the Service and why, and `--ipvs-scheduler` applies; an invalid
/// `--ipvs-scheduler` is a usage error.
#[test]
fn the_ipvs_scheduler_annotation_overrides_the_flag() {
    let scratch = Scratch::new("ipvs-scheduler");
    let service = |name: &str, ip: &str, annotation: Option<&str>| {
        let annotations = annotation
            .map(|value| format!(", annotations: {{topoproxy.io/ipvs-scheduler: {value:?}}}"))
            .unwrap_or_default();
        format!(
            "---\napiVersion: v1\nkind: Service\n\
             metadata: {{name: {name}, namespace: default{annotations}}}\n\
             spec: {{clusterIP: {ip}, ports: [{{port: 80, protocol: TCP}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: default, \
             labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n\
             endpoints: [{{addresses: [10.244.0.5]}}]\nports: [{{port: 8080, protocol: TCP}}]\n"
        )
    };
    scratch.write(
        "cluster.yaml",
        &format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n{}{}{}",
            service("maglev", "10.96.0.5", Some("mh,mh-fallback,mh-port")),
            service("typo", "10.96.0.6", Some("mh,sh-port")),
            service("plain", "10.96.0.7", None),
        ),
    );
    let plan = |scheduler: &str| {
        topoproxy(&[
            "plan",
            "--source",
            scratch.path(),
            "--node",
            "n1",
            "--ipvs-scheduler",
            scheduler,
        ])
    };
    let output = plan("wlc");
    assert!(output.status.success(), "{}", stderr(&output));
    let services: Vec<String> = stdout(&output)
        .lines()
        .filter(|line| line.starts_with("TCP"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        services,
        [
            "TCP  10.96.0.5:80 mh (mh-fallback,mh-port)",
            "TCP  10.96.0.6:80 wlc",
            "TCP  10.96.0.7:80 wlc",
        ]
    );
    let err = stderr(&output);
    assert!(
        err.contains("default/typo")
            && err.contains(
                r#"annotation topoproxy.io/ipvs-scheduler "mh,sh-port": flag "sh-port" is not one of mh's (mh-fallback, mh-port); the agent's --ipvs-scheduler applies"#
            ),
        "{err}"
    );
    // The flag takes the same syntax; a scheduler the kernel does not ship is refused.
    let output = plan("sh,sh-port");
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("TCP  10.96.0.7:80 sh (sh-port)"));
    let output = plan("maglev");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains(r#"ipvs-scheduler "maglev" is not an IPVS scheduler"#),
        "{}",
        stderr(&output)
    );
}

#[test]
fn list_in_ebpf_mode_without_pins_says_what_is_missing() {
    let output = topoproxy(&[
        "list",
        "--proxy-mode",
        "ebpf",
        "--bpf-pin-dir",
        "/nonexistent/topoproxy-pins",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output)
            .contains("no maps of this version are pinned in /nonexistent/topoproxy-pins"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn cleanup_rejects_a_bad_node_port_range_with_exit_code_2() {
    let output = topoproxy(&["cleanup", "--node-port-range", "32767-30000"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--node-port-range"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn run_rejects_a_config_file_with_an_unknown_key() {
    let scratch = Scratch::new("config");
    scratch.write("config.yaml", "proxy-mode: dry-run\nmin-sync-perod: 1s\n");
    let config = format!("{}/config.yaml", scratch.path());
    let output = topoproxy(&["run", "--config", &config, "--hostname-override", "n1"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("invalid config file"), "{err}");
    assert!(err.contains("min-sync-perod"), "{err}");
}

#[test]
fn json_logs_are_one_json_object_per_line() {
    let scratch = Scratch::new("json-logs");
    scratch.write(
        "c.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n---\napiVersion: v1\nkind: Service\n\
         metadata: {name: s, namespace: default}\nspec:\n  clusterIP: 10.96.0.9\n  ports:\n  \
         - {name: p, port: 70000}\n",
    );
    let output = topoproxy(&[
        "plan",
        "--source",
        scratch.path(),
        "--node",
        "n1",
        "--log-format",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let err = stderr(&output);
    let lines: Vec<&str> = err.lines().collect();
    assert!(!lines.is_empty(), "a warning is logged");
    for line in lines {
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        assert_eq!(value["level"], "WARN", "{line}");
        assert!(
            value["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("70000"),
            "{line}"
        );
    }
}

#[test]
fn version_names_the_release_and_the_git_revision() {
    let output = topoproxy(&["--version"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let expected_revision = std::env::var("TOPOPROXY_GIT_REVISION")
        .ok()
        .filter(|value| !value.is_empty())
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .current_dir(workspace_root())
                .output()
                .ok()
                .filter(|out| out.status.success())
                .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    assert_eq!(
        stdout(&output),
        format!(
            "topoproxy {} (git {expected_revision})\n",
            env!("CARGO_PKG_VERSION")
        )
    );
}

/// Four nodes in two zones of one region; `dns` opts in, `odd` has a bad value, both have
/// zone-a half down (a2's endpoint not ready).
const LOCALITY_CLUSTER: &str = r#"apiVersion: v1
kind: NodeList
items:
- metadata: {name: a1, labels: {topology.kubernetes.io/zone: zone-a, topology.kubernetes.io/region: r1}}
  status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
- metadata: {name: a2, labels: {topology.kubernetes.io/zone: zone-a, topology.kubernetes.io/region: r1}}
  status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
- metadata: {name: b1, labels: {topology.kubernetes.io/zone: zone-b, topology.kubernetes.io/region: r1}}
  status: {addresses: [{type: InternalIP, address: 192.168.0.3}]}
- metadata: {name: b2, labels: {topology.kubernetes.io/zone: zone-b, topology.kubernetes.io/region: r1}}
  status: {addresses: [{type: InternalIP, address: 192.168.0.4}]}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default, annotations: {topoproxy.io/topology: zone}}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: odd, namespace: default, annotations: {topoproxy.io/topology: everywhere}}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: dns, port: 53, protocol: UDP}]
"#;

fn locality_slice(service: &str) -> String {
    format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}
addressType: IPv4
ports: [{{name: dns, port: 53, protocol: UDP}}]
endpoints:
- {{addresses: [10.0.0.1], nodeName: a1, zone: zone-a}}
- {{addresses: [10.0.0.2], nodeName: a2, zone: zone-a, conditions: {{ready: false}}}}
- {{addresses: [10.0.0.3], nodeName: b1, zone: zone-b}}
- {{addresses: [10.0.0.4], nodeName: b2, zone: zone-b}}
"#
    )
}

#[test]
fn locality_opt_in_shows_shares_weights_and_why() {
    let scratch = Scratch::new("locality");
    scratch.write("cluster.yaml", LOCALITY_CLUSTER);
    scratch.write("dns.yaml", &locality_slice("dns"));
    scratch.write("odd.yaml", &locality_slice("odd"));
    let output = topoproxy(&[
        "plan",
        "--source",
        scratch.path(),
        "--node",
        "a1",
        "--format",
        "json",
        "--explain",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("default/odd")
            && stderr(&output).contains("topoproxy.io/topology \"everywhere\""),
        "{}",
        stderr(&output)
    );
    let doc: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("valid JSON");
    let servers = doc["virtualServers"].as_array().expect("virtualServers");
    let by_name = |name: &str| {
        servers
            .iter()
            .find(|vs| vs["service"]["name"] == name)
            .unwrap_or_else(|| panic!("no virtual server for {name}"))
    };
    let dns = by_name("dns");
    assert_eq!(dns["locality"], "zone");
    assert_eq!(dns["scheduler"], "wrr");
    // 1 of 3 ready endpoints for 2 of 4 nodes: the zone keeps 2/3, the region gets 1/3.
    assert_eq!(dns["tiers"][0]["kind"], "SameZone");
    assert_eq!(dns["tiers"][0]["sharePpm"], 666_667);
    assert_eq!(dns["tiers"][1]["kind"], "SameRegion");
    assert_eq!(dns["tiers"][1]["sharePpm"], 333_333);
    let weights: Vec<u64> = dns["programmed"]
        .as_array()
        .expect("programmed")
        .iter()
        .map(|b| b["weight"].as_u64().expect("weight"))
        .collect();
    assert_eq!(weights, [4, 1, 1]);
    let odd = by_name("odd");
    assert!(odd.get("locality").is_none(), "{odd}");
    assert_eq!(odd["scheduler"], "rr");
    assert_eq!(odd["tiers"][0].get("sharePpm"), None);
    let explained = doc["explain"]
        .as_array()
        .expect("explain")
        .iter()
        .find(|s| s["service"]["name"] == "dns")
        .expect("dns explained");
    let tiers = &explained["ports"][0]["tiers"];
    assert_eq!(tiers[0]["tier"], "SameZone");
    assert!(
        tiers[0]["why"]
            .as_str()
            .is_some_and(|why| why.starts_with("capacity guard")),
        "{tiers}"
    );
}

/// A clusterset VIP planned from a YAML directory: weights across this cluster and the other
/// (west has one of two pods ready: Envoy's 70/30), `--explain` says why, and without
/// `--cluster-id` the ServiceImport is left out with the reason.
#[test]
fn plan_programs_a_service_import_with_a_cluster_id() {
    let args = [
        "plan",
        "--source",
        "examples/clusterset",
        "--node",
        "west-a1",
        "--cluster-id",
        "west",
    ];
    let output = topoproxy(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let table = stdout(&output);
    let lines: Vec<&str> = table.lines().skip(3).map(str::trim_end).collect();
    assert_eq!(
        lines,
        [
            "TCP  10.42.0.10:80 wrr",
            "  -> 10.8.0.1:8080                Masq    3      0          0",
            "  -> 10.8.0.2:8080                Masq    3      0          0",
            "  -> 10.244.1.10:8080             Masq    14     0          0",
        ]
    );
    let explained = stdout(&topoproxy(&[&args[..], &["--explain"]].concat()));
    for expected in [
        "ServiceImport shop/web",
        "clusterset VIP: endpoints from this cluster (west) first",
        "tier cluster: 1 of 2 ready, share 70.0%, weight 14",
        "tier remote-clusters: 2 of 2 ready, share 30.0%, weight 3",
        "ready in cluster east",
    ] {
        assert!(explained.contains(expected), "{expected}:\n{explained}");
    }
    let without = topoproxy(&[&args[..5], &["--explain"]].concat());
    assert!(without.status.success(), "{}", stderr(&without));
    let text = stdout(&without);
    assert!(!text.contains("TCP  10.42.0.10:80"), "{text}");
    assert!(
        text.contains(
            "ServiceImport shop/web: skipped: a ServiceImport, but this cluster's id is unknown"
        ),
        "{text}"
    );
}

/// `topoproxy run` with `args` (a node name given, so only the flags under test can fail);
/// none of these gets as far as starting anything.
fn run_refused(args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["run", "--hostname-override", "n1"];
    all.extend_from_slice(args);
    let output = topoproxy(&all);
    (output.status.code(), stderr(&output))
}

/// Every duration flag, absurd values: a usage error (exit 2) naming the flag, never a panic
/// in `Instant` arithmetic (`--sync-period 300000000000y` used to overflow and abort).
#[test]
fn absurd_durations_are_usage_errors_naming_the_flag() {
    for flag in [
        "--min-sync-period",
        "--sync-period",
        "--source-poll-period",
        "--ipvs-drain-timeout",
    ] {
        let setting = flag.trim_start_matches("--");
        for (value, expected) in [
            ("300000000000y", "is longer than the most allowed, 365d"),
            ("18446744073709551616s", "is not a duration"),
            ("1e3s", "is not a duration"),
            ("-5s", "is not a duration"),
        ] {
            // `--flag=value`: clap would read a separate "-5s" as a flag.
            let (code, err) = run_refused(&[&format!("{flag}={value}")]);
            assert_eq!(code, Some(2), "{flag} {value}: {err}");
            assert!(
                err.starts_with(&format!("error: {setting}: \"{value}\""))
                    && err.contains(expected),
                "{flag} {value}: {err}"
            );
            assert!(!err.contains("panicked"), "{flag} {value}: {err}");
        }
    }
}

#[test]
fn zero_periods_that_would_spin_are_usage_errors() {
    for (flag, expected) in [
        ("--sync-period", "error: sync-period must be more than 0"),
        (
            "--source-poll-period",
            "error: source-poll-period must be more than 0",
        ),
    ] {
        let (code, err) = run_refused(&[flag, "0"]);
        assert_eq!(code, Some(2), "{flag}: {err}");
        assert_eq!(err.trim(), expected);
    }
}

/// Out-of-range numbers for the other numeric flags: clap refuses them before anything runs.
#[test]
fn out_of_range_numbers_are_refused_by_the_parser() {
    for args in [
        &["run", "--metrics-bind-address", "127.0.0.1:70000"][..],
        &["run", "--healthz-bind-address", "[::1]:-1"],
        &["datapath-log", "--per-second", "4294967296"],
        &["datapath-log", "--per-second=-1"],
    ] {
        let output = topoproxy(args);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("invalid value"), "{args:?}: {err}");
    }
    for range in ["0-70000", "32767-30000", "-", "30000"] {
        let output = topoproxy(&["cleanup", "--node-port-range", range]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{range}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains("is not a range"),
            "{}",
            stderr(&output)
        );
    }
}

/// The same values from a config file: the same errors, naming the key and the file's
/// values, and a key of the wrong type names the key.
#[test]
fn absurd_values_in_the_config_file_are_usage_errors_naming_the_key() {
    let scratch = Scratch::new("config-absurd");
    for (text, expected) in [
        (
            "sync-period: 300000000000y\n",
            "sync-period: \"300000000000y\" is longer than the most allowed, 365d",
        ),
        (
            "ipvs-drain-timeout: 9999999d\n",
            "ipvs-drain-timeout: \"9999999d\" is longer than the most allowed, 365d",
        ),
        (
            "source-poll-period: 0\n",
            "source-poll-period must be more than 0",
        ),
        ("sync-period: [1]\n", "sync-period: invalid type: sequence"),
        (
            "metrics-bind-address: 127.0.0.1:99999\n",
            "metrics-bind-address",
        ),
    ] {
        scratch.write("config.yaml", text);
        let config = format!("{}/config.yaml", scratch.path());
        let (code, err) = run_refused(&["--config", &config]);
        assert_eq!(code, Some(2), "{text}: {err}");
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
fn plan_narrows_node_ports_with_nodeport_addresses_and_refuses_a_bad_value() {
    let all = topoproxy(&["plan", "--source", "examples/cluster", "--node", "node-b1"]);
    assert!(
        stdout(&all).contains("192.168.20.11:30080"),
        "{}",
        stdout(&all)
    );
    // A CIDR that holds no node address: no NodePort on the IPv4 address.
    let narrowed = topoproxy(&[
        "plan",
        "--source",
        "examples/cluster",
        "--node",
        "node-b1",
        "--nodeport-addresses",
        "10.255.0.0/16",
    ]);
    assert!(narrowed.status.success(), "{}", stderr(&narrowed));
    assert!(!stdout(&narrowed).contains("192.168.20.11:30080"));
    assert!(stdout(&narrowed).contains("10.96."), "ClusterIPs stay");
    let bad = topoproxy(&[
        "plan",
        "--source",
        "examples/cluster",
        "--node",
        "node-b1",
        "--nodeport-addresses",
        "eth0",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("\"eth0\" is neither a CIDR nor `primary`"),
        "{}",
        stderr(&bad)
    );
}

/// kube-proxy's `KubeProxyConfiguration`, as the `kube-proxy` ConfigMap holds it.
const KUBE_PROXY_HEADER: &str =
    "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

/// A field topoproxy cannot honour stops `run` before anything starts: exit 2, the field and
/// the reason named.
#[test]
fn run_refuses_kube_proxy_fields_it_cannot_honour_naming_them() {
    let scratch = Scratch::new("kube-proxy-refused");
    for (body, expected) in [
        ("mode: ipvs\nportRange: 30000-32767\n", "portRange: \"30000-32767\": the userspace proxy's port range"),
        ("mode: ipvs\ndetectLocalMode: BridgeInterface\n", "detectLocal.bridgeInterface: \"\": detectLocalMode BridgeInterface needs an interface name"),
        ("mode: ipvs\nfeatureGates:\n  Foo: true\n", "featureGates.Foo"),
        ("mode: ipvs\nipvs:\n  tcpTimeout: 5 minutes\n", "ipvs.tcpTimeout: \"5 minutes\": not a duration"),
        ("mode: ipvs\nipvs:\n  schedular: rr\n", "unknown field `schedular`"),
        ("mode: iptables\n", "mode: \"iptables\": kube-proxy's iptables or nftables mode has no topoproxy equivalent: pass --proxy-mode"),
    ] {
        scratch.write("config.conf", &format!("{KUBE_PROXY_HEADER}{body}"));
        let config = format!("{}/config.conf", scratch.path());
        let (code, err) = run_refused(&["--config", &config]);
        assert_eq!(code, Some(2), "{body}: {err}");
        assert!(err.contains(expected), "{body}: {err}");
        assert!(err.contains("config.conf") || !body.contains("schedular"), "{err}");
    }
}

/// A file topoproxy takes starts the agent, and the fields that do not apply are logged once.
/// The agent then stops at its first step that needs a cluster: the kubeconfig named does
/// not exist.
#[test]
fn run_takes_a_kube_proxy_file_and_lists_what_does_not_apply_once() {
    let scratch = Scratch::new("kube-proxy-taken");
    scratch.write(
        "config.conf",
        &format!(
            "{KUBE_PROXY_HEADER}mode: ipvs\nclusterCIDR: 10.244.0.0/16\nconfigSyncPeriod: 15m0s\n\
             iptables:\n  masqueradeBit: 14\nclientConnection:\n  kubeconfig: {}/missing.conf\n",
            scratch.path()
        ),
    );
    let config = format!("{}/config.conf", scratch.path());
    let output = Command::new(env!("CARGO_BIN_EXE_topoproxy"))
        .args([
            "run",
            "--config",
            &config,
            "--proxy-mode",
            "dry-run",
            "--hostname-override",
            "n1",
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .output()
        .expect("run topoproxy");
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("missing.conf"),
        "the file's kubeconfig is used: {err}"
    );
    let listed: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("fields accepted that do not apply"))
        .collect();
    assert_eq!(listed.len(), 1, "{err}");
    assert!(listed[0].contains("iptables.masqueradeBit"), "{err}");
    assert!(listed[0].contains("configSyncPeriod"), "{err}");
}

/// kube-proxy's own flags for what its file sets: bad values are usage errors naming them.
#[test]
fn kube_proxys_timeout_and_conntrack_flags_refuse_bad_values() {
    for (args, expected) in [
        (&["--ipvs-tcp-timeout", "soon"][..], "ipvs-tcp-timeout"),
        (
            &["--conntrack-udp-timeout=-1s"][..],
            "conntrack-udp-timeout",
        ),
        (
            &["--oom-score-adj", "-1001"][..],
            "oom-score-adj: -1001 is not within -1000..1000",
        ),
        (&["--conntrack-min=-1"][..], "--conntrack-min"),
    ] {
        let (code, err) = run_refused(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}
