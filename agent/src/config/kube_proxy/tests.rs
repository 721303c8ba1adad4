//! The translation, field by field: kube-proxy's own printed configurations and defaults,
//! each field honoured or refused by name.

use super::*;
use crate::config::{resolve, ConfigFile, LogFormat, NodeNameFallbacks, RunSettings};
use crate::dataplane::conntrack_sysctls::ConntrackSettings;
use crate::dataplane::ipvs::netlink::IpvsTimeouts;

/// What kubeadm installs as the `kube-proxy` ConfigMap's `config.conf` (the
/// `--write-config-to` output of kube-proxy with nothing set: every pointer null, every
/// duration 0s), with `mode: ipvs` and a cluster CIDR as IPVS users have it.
const KUBEADM_IPVS: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ipvs
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

fn settings_of(text: &str, flags: RunOptions) -> RunSettings {
    let translation = parse(text).expect("translates");
    let file = ConfigFile::KubeProxy(translation)
        .into_options(&flags)
        .expect("mode is settled");
    resolve(
        flags,
        file,
        NodeNameFallbacks {
            env: None,
            hostname: Some("node-1".to_owned()),
        },
    )
    .expect("resolves")
}

fn refused(text: &str) -> Refused {
    match parse(text) {
        Err(KubeProxyConfigError::Refused(refused)) => refused,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn header(body: &str) -> String {
    format!("apiVersion: {API_VERSION}\nkind: {KIND}\n{body}")
}

#[test]
fn kubeadms_config_map_means_kube_proxys_defaults() {
    assert!(is_kube_proxy_configuration(KUBEADM_IPVS));
    let settings = settings_of(KUBEADM_IPVS, RunOptions::default());
    assert_eq!(settings.proxy_mode, ProxyMode::Ipvs);
    assert_eq!(settings.sync_period, Duration::from_secs(30));
    // IPVS mode's minSyncPeriod has no default in v1alpha1: 0.
    assert_eq!(settings.min_sync_period, Duration::ZERO);
    assert_eq!(settings.healthz_bind_address.to_string(), "0.0.0.0:10256");
    assert_eq!(settings.metrics_bind_address.to_string(), "127.0.0.1:10249");
    assert_eq!(settings.plan.scheduler, "rr");
    assert_eq!(settings.node_name, "node-1");
    assert_eq!(
        settings.kubeconfig.as_deref(),
        Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert_eq!(
        settings.ipvs.nft.cluster_cidrs,
        vec!["10.244.0.0/16"
            .parse::<ipnetwork::IpNetwork>()
            .expect("cidr")]
    );
    assert!(!settings.ipvs.nft.masquerade_all);
    assert!(!settings.ipvs.strict_arp);
    assert!(settings.ipvs.exclude_cidrs.is_empty());
    assert_eq!(settings.ipvs.timeouts, IpvsTimeouts::default());
    assert_eq!(settings.conntrack, ConntrackSettings::kube_proxy_defaults());
    assert_eq!(settings.oom_score_adj, Some(DEFAULT_OOM_SCORE_ADJ));
    assert_eq!(settings.log_format, LogFormat::Text);
    assert_eq!(
        settings.plan.node_port_addresses,
        crate::node_addresses::NodePortAddresses::parse("").expect("default")
    );
    // Every other field is at its zero value but bindAddressHardFail, where topoproxy
    // behaves as kube-proxy's true.
    let skipped = parse(KUBEADM_IPVS).expect("translates").not_applied;
    let fields: Vec<&str> = skipped.iter().map(|n| n.field).collect();
    assert_eq!(fields, vec!["bindAddressHardFail"]);
    let verbose = KUBEADM_IPVS.replace("  verbosity: 0", "  verbosity: 4");
    let verbose = verbose.replace("  enableDSR: false", "  enableDSR: true");
    let skipped = parse(&verbose).expect("translates").not_applied;
    let fields: Vec<&str> = skipped.iter().map(|n| n.field).collect();
    assert_eq!(
        fields,
        vec!["bindAddressHardFail", "logging (but format)", "winkernel"]
    );
}

#[test]
fn the_smallest_file_is_kube_proxys_defaults_too() {
    let minimal = header("mode: ipvs\n");
    let kubeadm = settings_of(KUBEADM_IPVS, RunOptions::default());
    let minimal = settings_of(&minimal, RunOptions::default());
    assert_eq!(minimal.conntrack, kubeadm.conntrack);
    assert_eq!(minimal.sync_period, kubeadm.sync_period);
    assert_eq!(minimal.min_sync_period, kubeadm.min_sync_period);
    assert_eq!(minimal.ipvs.nft.cluster_cidrs, Vec::new());
    // kubeadm's smallest (cmd/kubeadm .../strict/testdata/valid_kubeproxycfg.yaml) parses.
    let valid = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nportRange: \"\"\n";
    assert!(parse(valid).is_ok());
}

#[test]
fn every_ipvs_users_field_is_honoured() {
    let text = header(
        r#"mode: ipvs
hostnameOverride: worker-7
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
nodePortAddresses: ["10.0.0.0/8", "primary"]
healthzBindAddress: 0.0.0.0
metricsBindAddress: 0.0.0.0:20249
oomScoreAdj: -500
featureGates:
  PreferSameTrafficDistribution: true
  AllowServiceExternalIPs: true
iptables:
  masqueradeAll: true
ipvs:
  syncPeriod: 1m0s
  minSyncPeriod: 500ms
  scheduler: wrr
  excludeCIDRs: ["10.200.0.0/16", "10.201.0.0/16"]
  strictARP: true
  tcpTimeout: 15m0s
  tcpFinTimeout: 2m0s
  udpTimeout: 5m0s
conntrack:
  maxPerCore: 0
  min: 1000
  tcpEstablishedTimeout: 2h0m0s
  tcpCloseWaitTimeout: 30m0s
  tcpBeLiberal: true
  udpTimeout: 30s
  udpStreamTimeout: 2m0s
logging:
  format: json
clientConnection:
  kubeconfig: /etc/kp.conf
"#,
    );
    let settings = settings_of(&text, RunOptions::default());
    assert_eq!(settings.node_name, "worker-7");
    assert_eq!(settings.ipvs.nft.cluster_cidrs.len(), 2);
    assert_eq!(
        settings.plan.node_port_addresses,
        crate::node_addresses::NodePortAddresses::parse("10.0.0.0/8,primary").expect("valid")
    );
    assert_eq!(settings.healthz_bind_address.to_string(), "0.0.0.0:10256");
    assert_eq!(settings.metrics_bind_address.to_string(), "0.0.0.0:20249");
    assert_eq!(settings.oom_score_adj, Some(-500));
    assert!(settings.ipvs.nft.masquerade_all);
    assert_eq!(settings.sync_period, Duration::from_secs(60));
    assert_eq!(settings.min_sync_period, Duration::from_millis(500));
    assert_eq!(settings.plan.scheduler, "wrr");
    assert_eq!(settings.ipvs.exclude_cidrs.len(), 2);
    assert!(settings.ipvs.strict_arp);
    assert_eq!(
        settings.ipvs.timeouts,
        IpvsTimeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300
        }
    );
    assert_eq!(
        settings.conntrack,
        ConntrackSettings {
            max_per_core: 0,
            min: 1000,
            tcp_established_timeout: Duration::from_secs(7200),
            tcp_close_wait_timeout: Duration::from_secs(1800),
            tcp_be_liberal: true,
            udp_timeout: Duration::from_secs(30),
            udp_stream_timeout: Duration::from_secs(120),
        }
    );
    assert_eq!(settings.log_format, LogFormat::Json);
    assert_eq!(
        settings.kubeconfig.as_deref(),
        Some(std::path::Path::new("/etc/kp.conf"))
    );
}

#[test]
fn flags_still_win_over_kube_proxys_file() {
    let flags = RunOptions {
        proxy_mode: Some(ProxyMode::Ebpf),
        conntrack_max_per_core: Some(0),
        ipvs_tcp_timeout: Some("10s".to_owned()),
        ..RunOptions::default()
    };
    let settings = settings_of(KUBEADM_IPVS, flags);
    assert_eq!(settings.proxy_mode, ProxyMode::Ebpf);
    assert_eq!(settings.conntrack.max_per_core, 0);
    assert_eq!(settings.ipvs.timeouts.tcp, 10);
}

#[test]
fn iptables_or_unset_mode_needs_the_proxy_mode_flag() {
    for mode in ["", "iptables", "nftables"] {
        let text = header(&format!("mode: \"{mode}\"\n"));
        let translation = parse(&text).expect("translates");
        let error = ConfigFile::KubeProxy(translation.clone())
            .into_options(&RunOptions::default())
            .expect_err("no dataplane chosen");
        let message = error.to_string();
        assert!(message.contains("mode:"), "{message}");
        assert!(message.contains("--proxy-mode"), "{message}");
        let flags = RunOptions {
            proxy_mode: Some(ProxyMode::Ipvs),
            ..RunOptions::default()
        };
        assert!(ConfigFile::KubeProxy(translation)
            .into_options(&flags)
            .is_ok());
    }
    // The periods come from the mode's own block: nftables' in nftables mode...
    let text = header(
        "mode: nftables\nnftables:\n  syncPeriod: 45s\n  masqueradeAll: true\niptables:\n  syncPeriod: 10s\n",
    );
    let flags = RunOptions {
        proxy_mode: Some(ProxyMode::Ipvs),
        ..RunOptions::default()
    };
    let settings = settings_of(&text, flags.clone());
    assert_eq!(settings.sync_period, Duration::from_secs(45));
    assert_eq!(settings.min_sync_period, Duration::from_secs(1));
    assert!(settings.ipvs.nft.masquerade_all);
    // ...iptables' when unset.
    let text = header("iptables:\n  syncPeriod: 10s\nipvs:\n  syncPeriod: 20s\n");
    assert_eq!(
        settings_of(&text, flags).sync_period,
        Duration::from_secs(10)
    );
}

#[test]
fn each_refused_field_is_named_with_its_reason() {
    for (body, field) in [
        ("mode: ipvs\nportRange: 30000-32767\n", "portRange"),
        (
            "mode: ipvs\ndetectLocalMode: BridgeInterface\n",
            "detectLocal.bridgeInterface",
        ),
        ("mode: ipvs\ndetectLocalMode: Sideways\n", "detectLocalMode"),
        (
            "mode: ipvs\ndetectLocalMode: InterfaceNamePrefix\ndetectLocal:\n  interfaceNamePrefix: \"ve th\"\n",
            "detectLocal.interfaceNamePrefix",
        ),
        ("mode: ipvs\nbindAddress: 10.0.0.5\n", "bindAddress"),
        ("mode: ipvs\nbindAddress: here\n", "bindAddress"),
        (
            "mode: ipvs\nhealthzBindAddress: nowhere:1\n",
            "healthzBindAddress",
        ),
        (
            "mode: ipvs\nmetricsBindAddress: \"::1:x\"\n",
            "metricsBindAddress",
        ),
        ("mode: ipvs\nenableProfiling: true\n", "enableProfiling"),
        (
            "mode: ipvs\nshowHiddenMetricsForVersion: \"1.35\"\n",
            "showHiddenMetricsForVersion",
        ),
        ("mode: ipvs\noomScoreAdj: -1001\n", "oomScoreAdj"),
        ("mode: kernelspace\n", "mode"),
        (
            "mode: ipvs\nipvs:\n  tcpTimeout: 5 minutes\n",
            "ipvs.tcpTimeout",
        ),
        ("mode: ipvs\nipvs:\n  udpTimeout: -1s\n", "ipvs.udpTimeout"),
        (
            "mode: ipvs\nipvs:\n  tcpFinTimeout: 9000h\n",
            "ipvs.tcpFinTimeout",
        ),
        (
            "mode: ipvs\nconntrack:\n  maxPerCore: -1\n",
            "conntrack.maxPerCore",
        ),
        (
            "mode: ipvs\nconntrack:\n  tcpEstablishedTimeout: soon\n",
            "conntrack.tcpEstablishedTimeout",
        ),
        ("mode: ipvs\nconfigSyncPeriod: often\n", "configSyncPeriod"),
        ("mode: ipvs\nlogging:\n  format: xml\n", "logging.format"),
        (
            "mode: ipvs\nfeatureGates:\n  AllowServiceExternalIPs: false\n",
            "featureGates.AllowServiceExternalIPs",
        ),
        (
            "mode: ipvs\nfeatureGates:\n  SomethingElse: true\n",
            "featureGates.SomethingElse",
        ),
    ] {
        let refusal = refused(&header(body));
        assert_eq!(refusal.field, field, "{body}");
        let message = refusal.to_string();
        assert!(message.contains(field), "{message}");
        assert!(!refusal.reason.is_empty(), "{body}");
    }
    assert_eq!(
        refused("apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n")
            .field,
        "apiVersion"
    );
}

#[test]
fn unknown_fields_are_refused_as_kube_proxy_refuses_them() {
    let error = parse(&header("mode: ipvs\nipvs:\n  schedular: rr\n")).expect_err("a typo");
    let message = format!("{:#}", anyhow::Error::from(error));
    assert!(message.contains("schedular"), "{message}");
    assert!(parse(&header("modes: ipvs\n")).is_err());
}

#[test]
fn fields_that_do_not_apply_are_listed_once() {
    let text = header(
        r#"mode: ipvs
iptables:
  masqueradeBit: 14
  localhostNodePorts: true
  syncPeriod: 30s
nftables:
  masqueradeBit: 14
  syncPeriod: 30s
detectLocal:
  bridgeInterface: cbr0
configSyncPeriod: 15m0s
clientConnection:
  qps: 5
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
windowsRunAsService: true
"#,
    );
    let fields: Vec<&str> = parse(&text)
        .expect("translates")
        .not_applied
        .iter()
        .map(|n| n.field)
        .collect();
    assert_eq!(
        fields,
        vec![
            "iptables.masqueradeBit",
            "iptables.localhostNodePorts",
            "iptables.syncPeriod/minSyncPeriod",
            "nftables.masqueradeBit",
            "nftables.syncPeriod/minSyncPeriod/masqueradeAll",
            "detectLocal.bridgeInterface/interfaceNamePrefix",
            "configSyncPeriod",
            "clientConnection.qps/burst",
            "clientConnection.contentType/acceptContentTypes",
            "windowsRunAsService",
        ]
    );
}

#[test]
fn an_ipv6_bind_address_moves_the_defaults_to_ipv6() {
    let settings = settings_of(
        &header("mode: ipvs\nbindAddress: \"::\"\nhealthzBindAddress: \"[fd00::1]\"\n"),
        RunOptions::default(),
    );
    assert_eq!(settings.healthz_bind_address.to_string(), "[fd00::1]:10256");
    assert_eq!(settings.metrics_bind_address.to_string(), "[::1]:10249");
}

#[test]
fn go_durations_parse_as_metav1_duration_reads_them() {
    for (text, expected) in [
        ("0", Some(Duration::ZERO)),
        ("0s", Some(Duration::ZERO)),
        ("1h0m0s", Some(Duration::from_secs(3600))),
        ("24h0m0s", Some(Duration::from_secs(86400))),
        ("1.5h", Some(Duration::from_secs(5400))),
        ("300ms", Some(Duration::from_millis(300))),
        ("1m30.5s", Some(Duration::from_millis(90_500))),
        ("2us", Some(Duration::from_micros(2))),
        ("2µs", Some(Duration::from_micros(2))),
        ("7ns", Some(Duration::from_nanos(7))),
        ("+5s", Some(Duration::from_secs(5))),
        (".5s", Some(Duration::from_millis(500))),
        ("-1s", None),
        ("", None),
        ("5", None),
        ("5d", None),
        ("s", None),
        (".s", None),
        ("1h 5m", None),
        ("99999999999999999999999h", None),
    ] {
        assert_eq!(parse_go_duration(text), expected, "{text:?}");
    }
}

#[test]
fn topoproxys_own_format_is_not_taken_for_kube_proxys() {
    assert!(!is_kube_proxy_configuration("proxy-mode: ipvs\n"));
    assert!(!is_kube_proxy_configuration("kind: Something\n"));
    assert!(!is_kube_proxy_configuration("- a list\n"));
    assert!(is_kube_proxy_configuration(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha2\n"
    ));
}

#[test]
fn interface_detectors_become_the_nft_test_for_pod_traffic() {
    use crate::dataplane::ipvs::nft::LocalInterface;
    let bridge = settings_of(
        &header("mode: ipvs\nclusterCIDR: 10.244.0.0/16\ndetectLocalMode: BridgeInterface\ndetectLocal:\n  bridgeInterface: cbr0\n  interfaceNamePrefix: veth\n"),
        RunOptions::default(),
    );
    assert_eq!(
        bridge.ipvs.nft.local_interface,
        Some(LocalInterface::Bridge("cbr0".to_owned()))
    );
    let prefix = settings_of(
        &header("mode: ipvs\ndetectLocalMode: InterfaceNamePrefix\ndetectLocal:\n  interfaceNamePrefix: veth\n"),
        RunOptions::default(),
    );
    assert_eq!(
        prefix.ipvs.nft.local_interface,
        Some(LocalInterface::NamePrefix("veth".to_owned()))
    );
    // The unused one of the two is listed as not applying.
    let skipped = parse(&header("mode: ipvs\ndetectLocalMode: BridgeInterface\ndetectLocal:\n  bridgeInterface: cbr0\n  interfaceNamePrefix: veth\n"))
        .expect("translates")
        .not_applied;
    assert_eq!(
        skipped.iter().map(|n| n.field).collect::<Vec<_>>(),
        vec!["detectLocal.bridgeInterface/interfaceNamePrefix"]
    );
    assert_eq!(
        settings_of(
            &header("mode: ipvs\ndetectLocalMode: ClusterCIDR\n"),
            RunOptions::default()
        )
        .ipvs
        .nft
        .local_interface,
        None
    );
}

#[test]
fn node_cidr_takes_the_pod_cidrs_from_the_node() {
    let settings = settings_of(
        &header("mode: ipvs\nclusterCIDR: 10.244.0.0/16\ndetectLocalMode: NodeCIDR\n"),
        RunOptions::default(),
    );
    assert!(settings.pod_cidrs_from_node);
    assert_eq!(settings.ipvs.nft.local_interface, None);
}
