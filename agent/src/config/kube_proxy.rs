//! kube-proxy's own configuration file (`KubeProxyConfiguration`,
//! `kubeproxy.config.k8s.io/v1alpha1`, the `config.conf` of the `kube-proxy` ConfigMap), read
//! as `topoproxy run --config` reads its own format, so the ConfigMap mounts unchanged.
//!
//! Every field either becomes the topoproxy setting with kube-proxy's meaning (defaults
//! included: an omitted field means what it means to kube-proxy v1.36,
//! `pkg/proxy/apis/config/v1alpha1/defaults.go`), is refused with an error naming the field
//! and why, or — for fields that do not apply to a proxy without iptables — is accepted and
//! named in [`Translation::not_applied`], which the agent logs once. Unknown fields are refused,
//! as kube-proxy's strict decoding refuses them. Translation is a pure function.

mod types;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::{ProxyMode, RunOptions, MAX_DURATION};

pub use types::{
    ClientConnection, ConntrackConfiguration, DetectLocalConfiguration, IptablesConfiguration,
    IpvsConfiguration, KubeProxyConfiguration, NftablesConfiguration,
};

/// The only API version kube-proxy v1.36 reads.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The kind.
pub const KIND: &str = "KubeProxyConfiguration";
/// kube-proxy's `--oom-score-adj` default (`qos.KubeProxyOOMScoreAdj`).
pub const DEFAULT_OOM_SCORE_ADJ: i32 = -999;
/// kube-proxy's health and metrics ports (`ports.ProxyHealthzPort`, `ports.ProxyStatusPort`).
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;

/// A field refused: which, with what value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kube-proxy configuration: {field}: {value:?}: {reason}")]
pub struct Refused {
    pub field: String,
    pub value: String,
    pub reason: String,
}

fn refuse(field: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Refused {
    Refused {
        field: field.to_owned(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A field accepted that changes nothing in topoproxy, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotApplied {
    pub field: &'static str,
    pub reason: &'static str,
}

/// What a `KubeProxyConfiguration` means for `topoproxy run`.
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    /// The settings, as if given in topoproxy's own file.
    pub options: RunOptions,
    /// Fields set that do not apply here (logged once at start).
    pub not_applied: Vec<NotApplied>,
    /// The file's `mode` as written (`""` when unset).
    pub mode: String,
}

/// Whether `text` is a `KubeProxyConfiguration` (by its `kind` or `apiVersion`) rather than
/// topoproxy's own format.
pub fn is_kube_proxy_configuration(text: &str) -> bool {
    let Ok(serde_yaml::Value::Mapping(map)) = serde_yaml::from_str::<serde_yaml::Value>(text)
    else {
        return false;
    };
    let field = |name: &str| {
        map.get(name)
            .and_then(serde_yaml::Value::as_str)
            .map(str::to_owned)
    };
    field("kind").as_deref() == Some(KIND)
        || field("apiVersion").is_some_and(|v| v.starts_with("kubeproxy.config.k8s.io/"))
}

/// Why a kube-proxy configuration file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum KubeProxyConfigError {
    #[error("not a valid KubeProxyConfiguration")]
    Parse(#[source] serde_yaml::Error),
    #[error(transparent)]
    Refused(#[from] Refused),
}

/// Parses and translates a `KubeProxyConfiguration`.
pub fn parse(text: &str) -> Result<Translation, KubeProxyConfigError> {
    let config: KubeProxyConfiguration =
        serde_yaml::from_str(text).map_err(KubeProxyConfigError::Parse)?;
    Ok(translate(&config)?)
}

/// A Go `time.Duration` string (`1h0m0s`, `300ms`, `1.5h`, `0s`, `0`), as `metav1.Duration`
/// reads it. Negative durations are refused.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let text = text.strip_prefix('+').unwrap_or(text);
    if text == "0" {
        return Some(Duration::ZERO);
    }
    if text.is_empty() || text.starts_with('-') {
        return None;
    }
    let mut rest = text;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let nanos_per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut part = whole.checked_mul(nanos_per_unit)?;
        let mut scale = nanos_per_unit;
        for digit in fraction.chars() {
            scale /= 10;
            part = part.checked_add(u128::from(digit.to_digit(10)?) * scale)?;
        }
        total = total.checked_add(part)?;
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// A duration field: `None` when unset, else checked against [`MAX_DURATION`] and written in
/// a form topoproxy's settings parse.
fn duration_field(field: &str, value: &Option<String>) -> Result<Option<Duration>, Refused> {
    let Some(text) = value else {
        return Ok(None);
    };
    let duration = parse_go_duration(text).ok_or_else(|| {
        refuse(
            field,
            text,
            "not a duration (Go syntax, e.g. 30s, 1h0m0s, 250ms)",
        )
    })?;
    if duration > MAX_DURATION {
        return Err(refuse(
            field,
            text,
            "longer than topoproxy's longest allowed duration, 365 days",
        ));
    }
    Ok(Some(duration))
}

fn as_setting(duration: Duration) -> String {
    format!("{}ns", duration.as_nanos())
}

/// kube-proxy's `AppendPortIfNeeded`: an address without a port gets `port`.
fn bind_address(field: &str, text: &str, port: u16) -> Result<SocketAddr, Refused> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, port))
        .map_err(|_| refuse(field, text, "not an IP address or IP:port"))
}

/// A duration field set to something other than Go's zero value (what `--write-config-to`
/// prints for unset ones).
fn is_set(value: &Option<String>) -> bool {
    value
        .as_deref()
        .is_some_and(|text| parse_go_duration(text) != Some(Duration::ZERO))
}

/// Whether a YAML value is Go's zero value all through (`null`, `false`, `0`, `""`, `"0"`,
/// `0s`, or collections of those), as kube-proxy prints unset fields.
fn is_zero(value: &serde_yaml::Value) -> bool {
    use serde_yaml::Value;
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => {
            s.is_empty() || s == "0" || parse_go_duration(s) == Some(Duration::ZERO)
        }
        Value::Sequence(items) => items.iter().all(is_zero),
        Value::Mapping(map) => map.values().all(is_zero),
        Value::Tagged(tagged) => is_zero(&tagged.value),
    }
}

fn set_string(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

/// The feature gates kube-proxy v1.36 consults, and the value topoproxy behaves as.
const FEATURE_GATES: &[(&str, bool, &str)] = &[
    (
        "PreferSameTrafficDistribution",
        true,
        "topoproxy always honours PreferSameZone and PreferSameNode (the gate is GA and locked on in v1.36)",
    ),
    (
        "AllowServiceExternalIPs",
        true,
        "topoproxy always programs spec.externalIPs",
    ),
    (
        "MultiCIDRServiceAllocator",
        true,
        "GA and locked on in v1.36; topoproxy's IPVS mode does not read ServiceCIDRs, as kube-proxy's IPVS mode does not",
    ),
];

/// A translation in progress: the options so far and the fields accepted without effect.
#[derive(Default)]
struct Translating {
    options: RunOptions,
    not_applied: Vec<NotApplied>,
}

impl Translating {
    fn skip(&mut self, field: &'static str, reason: &'static str) {
        self.not_applied.push(NotApplied { field, reason });
    }
}

/// Translates a parsed configuration; the first field refused ends it.
pub fn translate(config: &KubeProxyConfiguration) -> Result<Translation, Refused> {
    check_kind(config)?;
    let mut t = Translating::default();
    let mode = proxy_mode(config, &mut t)?;
    sync_periods(config, mode, &mut t)?;
    masquerade(config, mode, &mut t);
    other_modes_blocks(config, mode, &mut t);
    ipvs_block(config, mode, &mut t)?;
    conntrack(config, &mut t)?;
    detect_local(config, &mut t)?;
    node_addresses(config, &mut t)?;
    process_settings(config, &mut t)?;
    client_connection(config, &mut t);
    logging(config, &mut t)?;
    windows_and_gates(config, &mut t)?;
    Ok(Translation {
        options: t.options,
        not_applied: t.not_applied,
        mode: mode.to_owned(),
    })
}

/// `apiVersion` and `kind`.
fn check_kind(config: &KubeProxyConfiguration) -> Result<(), Refused> {
    match config.api_version.as_deref() {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(refuse(
                "apiVersion",
                other,
                format!("topoproxy reads {API_VERSION} only"),
            ))
        }
        None => return Err(refuse("apiVersion", "", format!("must be {API_VERSION}"))),
    }
    if let Some(kind) = config.kind.as_deref().filter(|k| *k != KIND) {
        return Err(refuse("kind", kind, format!("must be {KIND}")));
    }
    Ok(())
}

/// mode: which of the mode-specific blocks kube-proxy reads its periods and masquerade
/// setting from (conversion.go), and topoproxy's dataplane.
fn proxy_mode<'c>(
    config: &'c KubeProxyConfiguration,
    t: &mut Translating,
) -> Result<&'c str, Refused> {
    let mode = config.mode.as_deref().unwrap_or("");
    match mode {
        "ipvs" => t.options.proxy_mode = Some(ProxyMode::Ipvs),
        // Left to --proxy-mode: topoproxy has no iptables or nftables dataplane;
        // `require_proxy_mode` refuses the file when no flag chooses.
        "" | "iptables" | "nftables" => {}
        other => {
            return Err(refuse(
                "mode",
                other,
                "not a Linux proxy mode (ipvs, iptables, nftables)",
            ))
        }
    }
    Ok(mode)
}

/// The mode's `syncPeriod` and `minSyncPeriod`.
fn sync_periods(
    config: &KubeProxyConfiguration,
    mode: &str,
    t: &mut Translating,
) -> Result<(), Refused> {
    let (sync_period, min_sync_period) = match mode {
        "ipvs" => {
            let ipvs = config.ipvs.clone().unwrap_or_default();
            (ipvs.sync_period, ipvs.min_sync_period)
        }
        "nftables" => {
            let nft = config.nftables.clone().unwrap_or_default();
            (nft.sync_period, nft.min_sync_period)
        }
        _ => {
            let iptables = config.iptables.clone().unwrap_or_default();
            (iptables.sync_period, iptables.min_sync_period)
        }
    };
    let (sync_field, min_field) = match mode {
        "ipvs" => ("ipvs.syncPeriod", "ipvs.minSyncPeriod"),
        "nftables" => ("nftables.syncPeriod", "nftables.minSyncPeriod"),
        _ => ("iptables.syncPeriod", "iptables.minSyncPeriod"),
    };
    // 0 is Go's "unset": the default, 30s.
    if let Some(period) = duration_field(sync_field, &sync_period)?.filter(|d| !d.is_zero()) {
        t.options.sync_period = Some(as_setting(period));
    }
    // Defaulted to 1s for iptables and nftables, not for ipvs, where unset means 0.
    let min_default = if mode == "ipvs" {
        Duration::ZERO
    } else {
        Duration::from_secs(1)
    };
    let min = duration_field(min_field, &min_sync_period)?
        .filter(|d| !d.is_zero())
        .unwrap_or(min_default);
    t.options.min_sync_period = Some(as_setting(min));
    Ok(())
}

/// The masquerade-all of the mode's block: nftables' in nftables mode, else iptables'
/// (IPVS mode reads iptables.masqueradeAll).
fn masquerade(config: &KubeProxyConfiguration, mode: &str, t: &mut Translating) {
    t.options.masquerade_all = Some(if mode == "nftables" {
        config
            .nftables
            .as_ref()
            .and_then(|n| n.masquerade_all)
            .unwrap_or(false)
    } else {
        config
            .iptables
            .as_ref()
            .and_then(|i| i.masquerade_all)
            .unwrap_or(false)
    });
}

/// The iptables and nftables blocks: accepted, and listed where they do not apply.
fn other_modes_blocks(config: &KubeProxyConfiguration, mode: &str, t: &mut Translating) {
    if let Some(iptables) = &config.iptables {
        if iptables.masquerade_bit.is_some() {
            t.skip(
                "iptables.masqueradeBit",
                "topoproxy marks packets for masquerade in its own nftables table, with its own bit",
            );
        }
        if iptables.localhost_node_ports.is_some() {
            t.skip(
                "iptables.localhostNodePorts",
                "iptables mode only: kube-proxy's IPVS mode does not serve NodePorts on localhost either",
            );
        }
        // In iptables mode (and "", which is iptables) the periods above came from here.
        if matches!(mode, "ipvs" | "nftables")
            && (is_set(&iptables.sync_period) || is_set(&iptables.min_sync_period))
        {
            t.skip(
                "iptables.syncPeriod/minSyncPeriod",
                "read in iptables mode only",
            );
        }
    }
    if let Some(nftables) = &config.nftables {
        if nftables.masquerade_bit.is_some() {
            t.skip(
                "nftables.masqueradeBit",
                "topoproxy marks packets for masquerade in its own nftables table, with its own bit",
            );
        }
        if mode != "nftables"
            && (is_set(&nftables.sync_period)
                || is_set(&nftables.min_sync_period)
                || nftables.masquerade_all == Some(true))
        {
            t.skip(
                "nftables.syncPeriod/minSyncPeriod/masqueradeAll",
                "read in nftables mode only",
            );
        }
    }
}

/// The ipvs block: scheduler, excluded CIDRs, strict ARP and IPVS's connection timeouts.
fn ipvs_block(
    config: &KubeProxyConfiguration,
    mode: &str,
    t: &mut Translating,
) -> Result<(), Refused> {
    if let Some(ipvs) = &config.ipvs {
        if mode != "ipvs" && (is_set(&ipvs.sync_period) || is_set(&ipvs.min_sync_period)) {
            t.skip("ipvs.syncPeriod/minSyncPeriod", "read in ipvs mode only");
        }
        if let Some(scheduler) = set_string(&ipvs.scheduler) {
            t.options.ipvs_scheduler = Some(scheduler.to_owned());
        }
        if let Some(cidrs) = ipvs.exclude_cidrs.as_ref().filter(|c| !c.is_empty()) {
            t.options.ipvs_exclude_cidrs = Some(cidrs.join(","));
        }
        t.options.ipvs_strict_arp = ipvs.strict_arp;
        for (field, value, slot) in [
            (
                "ipvs.tcpTimeout",
                &ipvs.tcp_timeout,
                &mut t.options.ipvs_tcp_timeout,
            ),
            (
                "ipvs.tcpFinTimeout",
                &ipvs.tcp_fin_timeout,
                &mut t.options.ipvs_tcpfin_timeout,
            ),
            (
                "ipvs.udpTimeout",
                &ipvs.udp_timeout,
                &mut t.options.ipvs_udp_timeout,
            ),
        ] {
            if let Some(timeout) = duration_field(field, value)? {
                *slot = Some(as_setting(timeout));
            }
        }
    }
    Ok(())
}

/// Conntrack, with kube-proxy's defaults for the pointers left null.
fn conntrack(config: &KubeProxyConfiguration, t: &mut Translating) -> Result<(), Refused> {
    let conntrack = config.conntrack.clone().unwrap_or_default();
    let count = |field: &str, value: Option<i32>, default: u32| -> Result<u32, Refused> {
        match value {
            None => Ok(default),
            Some(n) => u32::try_from(n).map_err(|_| refuse(field, n, "must not be negative")),
        }
    };
    t.options.conntrack_max_per_core = Some(count(
        "conntrack.maxPerCore",
        conntrack.max_per_core,
        32 * 1024,
    )?);
    t.options.conntrack_min = Some(count("conntrack.min", conntrack.min, 128 * 1024)?);
    let with_default = |field: &str, value: &Option<String>, default: Duration| {
        duration_field(field, value).map(|d| as_setting(d.unwrap_or(default)))
    };
    t.options.conntrack_tcp_timeout_established = Some(with_default(
        "conntrack.tcpEstablishedTimeout",
        &conntrack.tcp_established_timeout,
        Duration::from_secs(24 * 60 * 60),
    )?);
    t.options.conntrack_tcp_timeout_close_wait = Some(with_default(
        "conntrack.tcpCloseWaitTimeout",
        &conntrack.tcp_close_wait_timeout,
        Duration::from_secs(60 * 60),
    )?);
    t.options.conntrack_tcp_be_liberal = Some(conntrack.tcp_be_liberal.unwrap_or(false));
    t.options.conntrack_udp_timeout = Some(with_default(
        "conntrack.udpTimeout",
        &conntrack.udp_timeout,
        Duration::ZERO,
    )?);
    t.options.conntrack_udp_timeout_stream = Some(with_default(
        "conntrack.udpStreamTimeout",
        &conntrack.udp_stream_timeout,
        Duration::ZERO,
    )?);
    Ok(())
}

/// Local-traffic detection: the pod CIDRs, as clusterCIDR gives them, or by Node or interface.
fn detect_local(config: &KubeProxyConfiguration, t: &mut Translating) -> Result<(), Refused> {
    let cluster_cidr = set_string(&config.cluster_cidr);
    match config.detect_local_mode.as_deref().unwrap_or("") {
        "" | "ClusterCIDR" => {
            if let Some(cidrs) = cluster_cidr {
                t.options.cluster_cidr = Some(cidrs.to_owned());
            }
        }
        // The pod CIDRs are the Node's spec.podCIDRs, read at start; clusterCIDR is unused.
        "NodeCIDR" => t.options.detect_local_mode = Some("NodeCIDR".to_owned()),
        mode @ ("BridgeInterface" | "InterfaceNamePrefix") => {
            let detect_local = config.detect_local.clone().unwrap_or_default();
            let (field, value) = if mode == "BridgeInterface" {
                ("detectLocal.bridgeInterface", detect_local.bridge_interface)
            } else {
                (
                    "detectLocal.interfaceNamePrefix",
                    detect_local.interface_name_prefix,
                )
            };
            let name = value.unwrap_or_default();
            if !crate::dataplane::ipvs::nft::LocalInterface::valid_name(&name) {
                return Err(refuse(
                    field,
                    &name,
                    format!("detectLocalMode {mode} needs an interface name (1 to 15 characters, no space, quote, slash or *)"),
                ));
            }
            t.options.detect_local_mode = Some(mode.to_owned());
            if mode == "BridgeInterface" {
                t.options.pod_bridge_interface = Some(name);
            } else {
                t.options.pod_interface_name_prefix = Some(name);
            }
        }
        other => {
            return Err(refuse(
                "detectLocalMode",
                other,
                "not one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix",
            ))
        }
    }
    if let Some(detect_local) = &config.detect_local {
        let mode = config.detect_local_mode.as_deref().unwrap_or("");
        if (mode != "BridgeInterface" && set_string(&detect_local.bridge_interface).is_some())
            || (mode != "InterfaceNamePrefix"
                && set_string(&detect_local.interface_name_prefix).is_some())
        {
            t.skip(
                "detectLocal.bridgeInterface/interfaceNamePrefix",
                "read only with detectLocalMode BridgeInterface or InterfaceNamePrefix",
            );
        }
    }
    Ok(())
}

/// NodePort addresses, the node name, and the health and metrics listeners.
fn node_addresses(config: &KubeProxyConfiguration, t: &mut Translating) -> Result<(), Refused> {
    if let Some(addresses) = &config.node_port_addresses {
        t.options.nodeport_addresses = Some(addresses.join(","));
    }
    if let Some(name) = set_string(&config.hostname_override) {
        t.options.hostname_override = Some(name.to_owned());
    }

    // bindAddress: the address family of the health and metrics defaults; a specific
    // address is also kube-proxy's node-IP override, which topoproxy does not have.
    let bind = set_string(&config.bind_address).unwrap_or("0.0.0.0");
    let bind_ip: IpAddr = bind
        .parse()
        .map_err(|_| refuse("bindAddress", bind, "not an IP address"))?;
    if !bind_ip.is_unspecified() {
        return Err(refuse(
            "bindAddress",
            bind,
            "a specific address overrides kube-proxy's node IP, which topoproxy takes from the Node object and the host; use 0.0.0.0 or ::",
        ));
    }
    let (healthz_default, metrics_default): (IpAddr, IpAddr) = if bind_ip.is_ipv4() {
        (
            std::net::Ipv4Addr::UNSPECIFIED.into(),
            std::net::Ipv4Addr::LOCALHOST.into(),
        )
    } else {
        (
            std::net::Ipv6Addr::UNSPECIFIED.into(),
            std::net::Ipv6Addr::LOCALHOST.into(),
        )
    };
    t.options.healthz_bind_address = Some(match set_string(&config.healthz_bind_address) {
        Some(text) => bind_address("healthzBindAddress", text, HEALTHZ_PORT)?,
        None => SocketAddr::new(healthz_default, HEALTHZ_PORT),
    });
    t.options.metrics_bind_address = Some(match set_string(&config.metrics_bind_address) {
        Some(text) => bind_address("metricsBindAddress", text, METRICS_PORT)?,
        None => SocketAddr::new(metrics_default, METRICS_PORT),
    });
    Ok(())
}

/// What kube-proxy's process itself takes: bind failures, profiling, OOM score, periods, port range.
fn process_settings(config: &KubeProxyConfiguration, t: &mut Translating) -> Result<(), Refused> {
    if config.bind_address_hard_fail == Some(false) {
        t.skip(
            "bindAddressHardFail",
            "topoproxy always refuses to start when it cannot bind its health or metrics address (kube-proxy's true)",
        );
    }
    if config.enable_profiling == Some(true) {
        return Err(refuse(
            "enableProfiling",
            true,
            "topoproxy serves no profiling endpoint",
        ));
    }
    if let Some(version) = set_string(&config.show_hidden_metrics_for_version) {
        return Err(refuse(
            "showHiddenMetricsForVersion",
            version,
            "topoproxy's metrics are its own and have no hidden ones",
        ));
    }

    t.options.oom_score_adj = Some(config.oom_score_adj.unwrap_or(DEFAULT_OOM_SCORE_ADJ));
    if let Some(adj) = config.oom_score_adj {
        if !(-1000..=1000).contains(&adj) {
            return Err(refuse("oomScoreAdj", adj, "must be within -1000..1000"));
        }
    }

    if let Some(period) = duration_field("configSyncPeriod", &config.config_sync_period)? {
        if !period.is_zero() {
            t.skip(
                "configSyncPeriod",
                "an informer resync replays the cache and changes no table; topoproxy's watches do not resync on a timer",
            );
        }
    }
    if let Some(range) = set_string(&config.port_range) {
        return Err(refuse(
            "portRange",
            range,
            "the userspace proxy's port range; topoproxy (like kube-proxy since the userspace mode's removal) has no use for it",
        ));
    }
    Ok(())
}

/// The API client: the kubeconfig is taken; rate limits and content types are listed.
fn client_connection(config: &KubeProxyConfiguration, t: &mut Translating) {
    if let Some(client) = &config.client_connection {
        if let Some(path) = set_string(&client.kubeconfig) {
            t.options.kubeconfig = Some(path.into());
        }
        if client.qps.is_some_and(|q| q != 0.0) || client.burst.is_some_and(|b| b != 0) {
            t.skip(
                "clientConnection.qps/burst",
                "topoproxy's API client does not rate-limit its requests (it lists once, then watches)",
            );
        }
        if set_string(&client.content_type).is_some()
            || set_string(&client.accept_content_types).is_some()
        {
            t.skip(
                "clientConnection.contentType/acceptContentTypes",
                "topoproxy's API client speaks JSON",
            );
        }
    }
}

/// klog's settings: only the format has a topoproxy equivalent.
fn logging(config: &KubeProxyConfiguration, t: &mut Translating) -> Result<(), Refused> {
    if let Some(logging) = &config.logging {
        match logging.get("format").and_then(serde_yaml::Value::as_str) {
            None | Some("" | "text") => {}
            Some("json") => t.options.log_format = Some(super::LogFormat::Json),
            Some(other) => {
                return Err(refuse(
                    "logging.format",
                    other,
                    "topoproxy logs text or json",
                ))
            }
        }
        if logging
            .iter()
            .any(|(k, v)| k.as_str() != Some("format") && !is_zero(v))
        {
            t.skip(
                "logging (but format)",
                "klog's settings; topoproxy's log level is RUST_LOG",
            );
        }
    }
    Ok(())
}

/// Windows-only fields, and feature gates (accepted only where topoproxy behaves as the gate says).
fn windows_and_gates(config: &KubeProxyConfiguration, t: &mut Translating) -> Result<(), Refused> {
    if config
        .winkernel
        .as_ref()
        .is_some_and(|w| w.values().any(|v| !is_zero(v)))
    {
        t.skip("winkernel", "Windows only");
    }
    if config.windows_run_as_service == Some(true) {
        t.skip("windowsRunAsService", "Windows only");
    }

    for (gate, enabled) in config.feature_gates.iter().flatten() {
        match FEATURE_GATES.iter().find(|(name, _, _)| name == gate) {
            Some((_, behaves_as, _)) if behaves_as == enabled => {}
            Some((_, _, why)) => {
                return Err(refuse(&format!("featureGates.{gate}"), enabled, *why))
            }
            None => {
                return Err(refuse(
                    &format!("featureGates.{gate}"),
                    enabled,
                    "not a gate kube-proxy's Linux modes consult; topoproxy takes only PreferSameTrafficDistribution, AllowServiceExternalIPs and MultiCIDRServiceAllocator",
                ))
            }
        }
    }
    Ok(())
}

/// A `KubeProxyConfiguration` whose `mode` topoproxy cannot take (iptables, nftables, or
/// unset, which is iptables) needs `--proxy-mode` on the command line.
pub fn require_proxy_mode(translation: &Translation, flags: &RunOptions) -> Result<(), Refused> {
    if translation.options.proxy_mode.is_none() && flags.proxy_mode.is_none() {
        return Err(refuse(
            "mode",
            &translation.mode,
            "kube-proxy's iptables or nftables mode has no topoproxy equivalent: pass --proxy-mode ipvs, ebpf or dry-run",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
