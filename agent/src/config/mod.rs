//! `topoproxy run`'s settings: flags, a YAML config file with the same names, and defaults.
//!
//! Precedence is flag, then config file, then default. Resolution is a pure function of the
//! three (plus the node-name inputs from the environment), so it is tested without a process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::node_addresses::NodePortAddresses;

use ipnetwork::IpNetwork;

pub mod kube_proxy;

use crate::dataplane::conntrack_sysctls::ConntrackSettings;
use crate::dataplane::ebpf::north_south::{self, NorthSouthSettings};
use crate::dataplane::ebpf::EbpfSettings;
use crate::dataplane::ipvs::netlink::IpvsTimeouts;
use crate::dataplane::ipvs::nft::{LocalInterface, NftSettings};
use crate::dataplane::ipvs::IpvsSettings;
use crate::model::LocalityPolicy;
use crate::planner::PlanConfig;

/// Least time between two syncs unless configured (kube-proxy's `--min-sync-period` default).
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);
/// How often the dataplane is read back unless configured (kube-proxy's `--sync-period`).
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
/// How often `--source` is checked for changes unless configured.
pub const DEFAULT_SOURCE_POLL_PERIOD: Duration = Duration::from_secs(1);
/// The longest duration any setting takes. The agent adds periods to `Instant`s (and doubles
/// the sync period for health), which panics on overflow; a year is far beyond any sensible
/// period and far below any overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// kube-proxy's health port, on every address.
pub const DEFAULT_HEALTHZ_BIND_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 10256);
/// kube-proxy's metrics port, on loopback.
pub const DEFAULT_METRICS_BIND_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 10249);

/// Which dataplane programs the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyMode {
    /// IPVS virtual servers over netlink, VIPs on `kube-ipvs0`.
    Ipvs,
    /// cgroup socket-address programs and BPF maps.
    Ebpf,
    /// Programs nothing: plan, serve `/plan` and metrics, in shadow beside kube-proxy.
    DryRun,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ipvs => "ipvs",
            Self::Ebpf => "ebpf",
            Self::DryRun => "dry-run",
        }
    }
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Every setting, each optional; used both for the flags and for the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunOptions {
    /// Kubeconfig file; without it, the in-cluster configuration, else the usual inference
    /// (`KUBECONFIG`, `~/.kube/config`).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The Node to plan for; else `NODE_NAME`, else the hostname.
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// Read the cluster from a directory of YAML (re-read on change) instead of the API.
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Dataplane: ipvs, ebpf or dry-run [default: dry-run].
    #[arg(long, value_enum)]
    pub proxy_mode: Option<ProxyMode>,
    /// Least time between two syncs, e.g. `1s`, `250ms`, `0` [default: 1s].
    #[arg(long)]
    pub min_sync_period: Option<String>,
    /// How often the dataplane is read back and drift repaired [default: 30s].
    #[arg(long)]
    pub sync_period: Option<String>,
    /// Where `/healthz` and `/livez` are served [default: 0.0.0.0:10256].
    #[arg(long)]
    pub healthz_bind_address: Option<SocketAddr>,
    /// Where `/metrics` and `/plan` are served [default: 127.0.0.1:10249].
    #[arg(long)]
    pub metrics_bind_address: Option<SocketAddr>,
    /// IPVS scheduler, with its flags (`mh,mh-port`), for Services without a
    /// `topoproxy.io/ipvs-scheduler` annotation [default: rr].
    #[arg(long)]
    pub ipvs_scheduler: Option<String>,
    /// This proxy's name for the `service.kubernetes.io/service-proxy-name` label
    /// [default: topoproxy].
    #[arg(long)]
    pub service_proxy_name: Option<String>,
    /// Locality policy of Services without a `topoproxy.io/topology` annotation: kube-proxy
    /// (exactly kube-proxy's table), zone or node (locality tiers with gradual spill)
    /// [default: kube-proxy].
    #[arg(long, value_enum)]
    pub topology_default: Option<LocalityPolicy>,
    /// This cluster's id in its MCS clusterset: the `multicluster.kubernetes.io/source-cluster`
    /// value on the slices of its own exported endpoints. Needed to program ServiceImports'
    /// clusterset IPs (this cluster first, then the others); unset, ServiceImports are not
    /// watched.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// How often `--source` is re-scanned for changes inotify did not report (a network file
    /// system, a lost event) [default: 1s]; inotify reports the rest at once.
    #[arg(long)]
    pub source_poll_period: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// IPVS mode: masquerade every packet to a service [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,
    /// IPVS mode: the pod CIDRs, comma-separated; ClusterIP traffic from outside them is
    /// masqueraded.
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// IPVS mode: how pod traffic is told from the rest for ClusterIP masquerade: ClusterCIDR
    /// (by --cluster-cidr), NodeCIDR (by this Node's spec.podCIDRs, waited for at start),
    /// BridgeInterface (arrives on --pod-bridge-interface) or InterfaceNamePrefix (on
    /// interfaces named --pod-interface-name-prefix*) [default: ClusterCIDR].
    #[arg(long)]
    pub detect_local_mode: Option<String>,
    /// The pods' bridge, with --detect-local-mode BridgeInterface.
    #[arg(long)]
    pub pod_bridge_interface: Option<String>,
    /// The prefix of the pods' interfaces, with --detect-local-mode InterfaceNamePrefix.
    #[arg(long)]
    pub pod_interface_name_prefix: Option<String>,
    /// IPVS mode: comma-separated CIDRs whose IPVS services topoproxy never touches.
    #[arg(long)]
    pub ipvs_exclude_cidrs: Option<String>,
    /// Where NodePorts are served, kube-proxy's syntax: comma-separated CIDRs and `primary`
    /// (the node's primary address of each family); a family with no CIDR given keeps every
    /// address [default: every local address but kube-ipvs0's, loopback and IPv6 link-local].
    #[arg(long)]
    pub nodeport_addresses: Option<String>,
    /// IPVS mode: set arp_ignore=1 and arp_announce=2 so VIPs are not answered over ARP
    /// [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ipvs_strict_arp: Option<bool>,
    /// IPVS mode: how long a removed TCP backend keeps its open connections (at weight 0)
    /// before it is deleted anyway [default: 15m].
    #[arg(long)]
    pub ipvs_drain_timeout: Option<String>,
    /// IPVS mode: idle timeout of established TCP connections, set at start as `ipvsadm --set`
    /// does (kube-proxy's `--ipvs-tcp-timeout`) [default: 0, the kernel's as it is].
    #[arg(long)]
    pub ipvs_tcp_timeout: Option<String>,
    /// IPVS mode: timeout of TCP connections after a FIN (`--ipvs-tcpfin-timeout`)
    /// [default: 0, the kernel's as it is].
    #[arg(long)]
    pub ipvs_tcpfin_timeout: Option<String>,
    /// IPVS mode: timeout of UDP flows (`--ipvs-udp-timeout`) [default: 0, the kernel's].
    #[arg(long)]
    pub ipvs_udp_timeout: Option<String>,
    /// nf_conntrack_max per CPU, with kube-proxy's rules (at least --conntrack-min, at most
    /// 1048576); 0 leaves the table size alone [default: 0; a kube-proxy file: 32768].
    #[arg(long)]
    pub conntrack_max_per_core: Option<u32>,
    /// The least nf_conntrack_max written with --conntrack-max-per-core [default: 0; a
    /// kube-proxy file: 131072].
    #[arg(long)]
    pub conntrack_min: Option<u32>,
    /// nf_conntrack_tcp_timeout_established; 0 leaves it alone [default: 0; a kube-proxy
    /// file: 24h].
    #[arg(long)]
    pub conntrack_tcp_timeout_established: Option<String>,
    /// nf_conntrack_tcp_timeout_close_wait; 0 leaves it alone [default: 0; a kube-proxy file:
    /// 1h].
    #[arg(long)]
    pub conntrack_tcp_timeout_close_wait: Option<String>,
    /// Set nf_conntrack_tcp_be_liberal=1 [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub conntrack_tcp_be_liberal: Option<bool>,
    /// nf_conntrack_udp_timeout; 0 leaves it alone [default: 0].
    #[arg(long)]
    pub conntrack_udp_timeout: Option<String>,
    /// nf_conntrack_udp_timeout_stream; 0 leaves it alone [default: 0].
    #[arg(long)]
    pub conntrack_udp_timeout_stream: Option<String>,
    /// The agent's own oom_score_adj, -1000..1000 [default: unchanged; a kube-proxy file:
    /// -999].
    #[arg(long, allow_hyphen_values = true)]
    pub oom_score_adj: Option<i32>,
    /// eBPF mode: the bpffs directory for topoproxy's pinned maps, programs and links
    /// [default: /sys/fs/bpf/topoproxy].
    #[arg(long)]
    pub bpf_pin_dir: Option<PathBuf>,
    /// eBPF mode: the cgroup v2 directory whose processes get Service translation
    /// [default: the cgroup v2 root, from /proc/self/mountinfo].
    #[arg(long)]
    pub cgroup_path: Option<PathBuf>,
    /// eBPF mode: the devices whose traffic from outside the node is balanced by the tc
    /// programs (NodePorts, externalIPs, LB IPs): `auto` (the devices holding the node's
    /// addresses), `none`, or a comma-separated list [default: auto].
    #[arg(long)]
    pub north_south_interfaces: Option<String>,
    /// eBPF mode: source ports for SNAT of outside traffic to a backend on another node
    /// [default: 61000-65535, above Linux's default ephemeral ports].
    #[arg(long)]
    pub snat_port_range: Option<String>,
}

/// The resolved settings of `topoproxy run`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub source: Option<PathBuf>,
    pub proxy_mode: ProxyMode,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    pub plan: PlanConfig,
    pub source_poll_period: Duration,
    pub log_format: LogFormat,
    pub ipvs: IpvsSettings,
    pub ebpf: EbpfSettings,
    pub north_south: NorthSouthSettings,
    /// The conntrack sysctls written at start (IPVS and eBPF modes).
    pub conntrack: ConntrackSettings,
    /// Written to `/proc/self/oom_score_adj` at start when set.
    pub oom_score_adj: Option<i32>,
    /// `detect-local-mode NodeCIDR`: the pod CIDRs (`ipvs.nft.cluster_cidrs`) are this Node's
    /// `spec.podCIDRs`, read from the API at start (immutable once set, so read once, as
    /// kube-proxy does).
    pub pod_cidrs_from_node: bool,
}

/// What went wrong with the settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{setting}: {value:?} is not a duration (use e.g. 1s, 250ms, 2m, 0)")]
    Duration {
        setting: &'static str,
        value: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("{setting}: {value:?} is longer than the most allowed, 365d")]
    DurationTooLong {
        setting: &'static str,
        value: String,
    },
    #[error("{setting} must be more than 0")]
    ZeroPeriod { setting: &'static str },
    #[error("no node name: pass --hostname-override or set NODE_NAME (the hostname is unknown)")]
    NoNodeName,
    #[error("ipvs-scheduler {0}")]
    Scheduler(crate::scheduler::SchedulerError),
    #[error("north-south-interfaces: {0:?} is not auto, none or a list of interface names")]
    NorthSouthInterfaces(String),
    #[error("snat-port-range: {0:?} is not a port range like 61000-65535")]
    SnatPortRange(String),
    #[error(transparent)]
    NodePortAddresses(#[from] crate::node_addresses::NodePortAddressesError),
    #[error("invalid kube-proxy configuration file {}", path.display())]
    KubeProxy {
        path: PathBuf,
        #[source]
        source: kube_proxy::KubeProxyConfigError,
    },
    #[error(transparent)]
    KubeProxyRefused(#[from] kube_proxy::Refused),
    #[error("{setting}: {value:?}: {reason}")]
    DetectLocal {
        setting: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{setting}: {value} is not within -1000..1000")]
    OomScoreAdj { setting: &'static str, value: i32 },
    #[error("{setting}: {value:?} is not a CIDR (use e.g. 10.244.0.0/16)")]
    Cidr {
        setting: &'static str,
        value: String,
        #[source]
        source: ipnetwork::IpNetworkError,
    },
}

/// A config file as read: topoproxy's own format, or kube-proxy's translated.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigFile {
    Topoproxy(RunOptions),
    KubeProxy(kube_proxy::Translation),
}

impl ConfigFile {
    /// The settings the file gives.
    pub fn options(&self) -> &RunOptions {
        match self {
            Self::Topoproxy(options) => options,
            Self::KubeProxy(translation) => &translation.options,
        }
    }

    /// Checks what the file needs of the flags (a kube-proxy file without `mode: ipvs` needs
    /// `--proxy-mode`) and returns its settings.
    pub fn into_options(self, flags: &RunOptions) -> Result<RunOptions, ConfigError> {
        match self {
            Self::Topoproxy(options) => Ok(options),
            Self::KubeProxy(translation) => {
                kube_proxy::require_proxy_mode(&translation, flags)?;
                Ok(translation.options)
            }
        }
    }
}

/// Reads a config file: a `KubeProxyConfiguration` (by its kind or apiVersion) or
/// topoproxy's own format.
pub fn read_config_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if kube_proxy::is_kube_proxy_configuration(&text) {
        return kube_proxy::parse(&text)
            .map(ConfigFile::KubeProxy)
            .map_err(|source| ConfigError::KubeProxy {
                path: path.to_path_buf(),
                source,
            });
    }
    parse_config(&text)
        .map(ConfigFile::Topoproxy)
        .map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

/// Parses a config file's text; an empty (or all-blank) file sets nothing.
pub fn parse_config(text: &str) -> Result<RunOptions, serde_yaml::Error> {
    if text.trim().is_empty() {
        return Ok(RunOptions::default());
    }
    serde_yaml::from_str(text)
}

/// Where the node name comes from when neither flag nor file sets it.
#[derive(Debug, Clone, Default)]
pub struct NodeNameFallbacks {
    /// `NODE_NAME` from the environment (the DaemonSet's downward API).
    pub env: Option<String>,
    pub hostname: Option<String>,
}

fn duration(
    setting: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    let trimmed = value.trim();
    if trimmed == "0" {
        return Ok(Duration::ZERO);
    }
    match humantime::parse_duration(trimmed) {
        Ok(parsed) if parsed <= MAX_DURATION => Ok(parsed),
        Ok(_) => Err(ConfigError::DurationTooLong { setting, value }),
        Err(source) => Err(ConfigError::Duration {
            setting,
            value,
            source,
        }),
    }
}

/// A period the agent waits on with a ticker, which must not be zero.
fn period(
    setting: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let period = duration(setting, value, default)?;
    if period.is_zero() {
        return Err(ConfigError::ZeroPeriod { setting });
    }
    Ok(period)
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

impl RunOptions {
    /// Each setting from `self` (the flags) where set, else from `file`.
    fn over(self, file: RunOptions) -> RunOptions {
        RunOptions {
            kubeconfig: self.kubeconfig.or(file.kubeconfig),
            hostname_override: self.hostname_override.or(file.hostname_override),
            source: self.source.or(file.source),
            proxy_mode: self.proxy_mode.or(file.proxy_mode),
            min_sync_period: self.min_sync_period.or(file.min_sync_period),
            sync_period: self.sync_period.or(file.sync_period),
            healthz_bind_address: self.healthz_bind_address.or(file.healthz_bind_address),
            metrics_bind_address: self.metrics_bind_address.or(file.metrics_bind_address),
            ipvs_scheduler: self.ipvs_scheduler.or(file.ipvs_scheduler),
            service_proxy_name: self.service_proxy_name.or(file.service_proxy_name),
            topology_default: self.topology_default.or(file.topology_default),
            cluster_id: self.cluster_id.or(file.cluster_id),
            source_poll_period: self.source_poll_period.or(file.source_poll_period),
            log_format: self.log_format.or(file.log_format),
            masquerade_all: self.masquerade_all.or(file.masquerade_all),
            cluster_cidr: self.cluster_cidr.or(file.cluster_cidr),
            detect_local_mode: self.detect_local_mode.or(file.detect_local_mode),
            pod_bridge_interface: self.pod_bridge_interface.or(file.pod_bridge_interface),
            pod_interface_name_prefix: self
                .pod_interface_name_prefix
                .or(file.pod_interface_name_prefix),
            ipvs_exclude_cidrs: self.ipvs_exclude_cidrs.or(file.ipvs_exclude_cidrs),
            nodeport_addresses: self.nodeport_addresses.or(file.nodeport_addresses),
            ipvs_strict_arp: self.ipvs_strict_arp.or(file.ipvs_strict_arp),
            ipvs_drain_timeout: self.ipvs_drain_timeout.or(file.ipvs_drain_timeout),
            ipvs_tcp_timeout: self.ipvs_tcp_timeout.or(file.ipvs_tcp_timeout),
            ipvs_tcpfin_timeout: self.ipvs_tcpfin_timeout.or(file.ipvs_tcpfin_timeout),
            ipvs_udp_timeout: self.ipvs_udp_timeout.or(file.ipvs_udp_timeout),
            conntrack_max_per_core: self.conntrack_max_per_core.or(file.conntrack_max_per_core),
            conntrack_min: self.conntrack_min.or(file.conntrack_min),
            conntrack_tcp_timeout_established: self
                .conntrack_tcp_timeout_established
                .or(file.conntrack_tcp_timeout_established),
            conntrack_tcp_timeout_close_wait: self
                .conntrack_tcp_timeout_close_wait
                .or(file.conntrack_tcp_timeout_close_wait),
            conntrack_tcp_be_liberal: self
                .conntrack_tcp_be_liberal
                .or(file.conntrack_tcp_be_liberal),
            conntrack_udp_timeout: self.conntrack_udp_timeout.or(file.conntrack_udp_timeout),
            conntrack_udp_timeout_stream: self
                .conntrack_udp_timeout_stream
                .or(file.conntrack_udp_timeout_stream),
            oom_score_adj: self.oom_score_adj.or(file.oom_score_adj),
            bpf_pin_dir: self.bpf_pin_dir.or(file.bpf_pin_dir),
            cgroup_path: self.cgroup_path.or(file.cgroup_path),
            north_south_interfaces: self.north_south_interfaces.or(file.north_south_interfaces),
            snat_port_range: self.snat_port_range.or(file.snat_port_range),
        }
    }
}

/// Flags over file over defaults.
pub fn resolve(
    flags: RunOptions,
    file: RunOptions,
    node: NodeNameFallbacks,
) -> Result<RunSettings, ConfigError> {
    let mut o = flags.over(file);
    let node_name = non_empty(o.hostname_override.take())
        .or_else(|| non_empty(node.env))
        // kube-proxy lower-cases the hostname: Node names are lower-case DNS names.
        .or_else(|| non_empty(node.hostname).map(|h| h.to_lowercase()))
        .ok_or(ConfigError::NoNodeName)?;
    // IPVS mode's nft rule and eBPF mode's tc path masquerade by the same settings.
    let masquerade_all = o.masquerade_all.unwrap_or(false);
    let cluster_cidrs = cidrs("cluster-cidr", o.cluster_cidr.take())?;
    let plan = plan_config(&mut o)?;
    let ipvs = ipvs_settings(&mut o, masquerade_all, cluster_cidrs.clone())?;
    let conntrack = conntrack_settings(&mut o)?;
    Ok(RunSettings {
        pod_cidrs_from_node: o.detect_local_mode.as_deref() == Some("NodeCIDR"),
        kubeconfig: o.kubeconfig,
        node_name,
        source: o.source,
        proxy_mode: o.proxy_mode.unwrap_or(ProxyMode::DryRun),
        min_sync_period: duration(
            "min-sync-period",
            o.min_sync_period,
            DEFAULT_MIN_SYNC_PERIOD,
        )?,
        sync_period: period("sync-period", o.sync_period, DEFAULT_SYNC_PERIOD)?,
        healthz_bind_address: o
            .healthz_bind_address
            .unwrap_or(DEFAULT_HEALTHZ_BIND_ADDRESS),
        metrics_bind_address: o
            .metrics_bind_address
            .unwrap_or(DEFAULT_METRICS_BIND_ADDRESS),
        plan,
        source_poll_period: period(
            "source-poll-period",
            o.source_poll_period,
            DEFAULT_SOURCE_POLL_PERIOD,
        )?,
        log_format: o.log_format.unwrap_or(LogFormat::Text),
        ipvs,
        conntrack,
        oom_score_adj: match o.oom_score_adj {
            Some(value) if !(-1000..=1000).contains(&value) => {
                return Err(ConfigError::OomScoreAdj {
                    setting: "oom-score-adj",
                    value,
                })
            }
            other => other,
        },
        ebpf: EbpfSettings {
            pin_dir: o
                .bpf_pin_dir
                .unwrap_or_else(|| EbpfSettings::default().pin_dir),
            cgroup_path: o.cgroup_path,
        },
        north_south: NorthSouthSettings {
            // The same rule as IPVS mode's nft masquerade, for ClusterIPs reached from
            // outside the node through the tc path.
            masquerade_all,
            cluster_cidrs,
            ..north_south_settings(o.north_south_interfaces, o.snat_port_range)?
        },
    })
}

/// What the planner is told: the scheduler, the proxy name, the locality default, the
/// cluster id and the NodePort addresses.
fn plan_config(o: &mut RunOptions) -> Result<PlanConfig, ConfigError> {
    let scheduler = match o.ipvs_scheduler.take() {
        None => PlanConfig::default().scheduler,
        Some(value) => {
            crate::scheduler::Scheduler::parse(&value).map_err(ConfigError::Scheduler)?
        }
    };
    Ok(PlanConfig {
        scheduler,
        proxy_name: o
            .service_proxy_name
            .take()
            .unwrap_or_else(|| PlanConfig::default().proxy_name),
        default_locality: o.topology_default.take().unwrap_or_default(),
        cluster_id: non_empty(o.cluster_id.take()),
        node_port_addresses: NodePortAddresses::parse(
            &o.nodeport_addresses.take().unwrap_or_default(),
        )?,
    })
}

fn ipvs_settings(
    o: &mut RunOptions,
    masquerade_all: bool,
    cluster_cidrs: Vec<IpNetwork>,
) -> Result<IpvsSettings, ConfigError> {
    Ok(IpvsSettings {
        exclude_cidrs: cidrs("ipvs-exclude-cidrs", o.ipvs_exclude_cidrs.take())?,
        nft: NftSettings {
            masquerade_all,
            cluster_cidrs,
            local_interface: local_interface(
                o.detect_local_mode.clone(),
                o.pod_bridge_interface.take(),
                o.pod_interface_name_prefix.take(),
            )?,
        },
        strict_arp: o.ipvs_strict_arp.unwrap_or(false),
        drain_timeout: duration(
            "ipvs-drain-timeout",
            o.ipvs_drain_timeout.take(),
            IpvsSettings::default().drain_timeout,
        )?,
        timeouts: IpvsTimeouts {
            tcp: timeout_seconds("ipvs-tcp-timeout", o.ipvs_tcp_timeout.take())?,
            tcp_fin: timeout_seconds("ipvs-tcpfin-timeout", o.ipvs_tcpfin_timeout.take())?,
            udp: timeout_seconds("ipvs-udp-timeout", o.ipvs_udp_timeout.take())?,
        },
        ..IpvsSettings::default()
    })
}

/// The conntrack sysctls; unset leaves the kernel's value (see docs/parity.md).
fn conntrack_settings(o: &mut RunOptions) -> Result<ConntrackSettings, ConfigError> {
    let zero_default =
        |setting: &'static str, value: Option<String>| duration(setting, value, Duration::ZERO);
    Ok(ConntrackSettings {
        max_per_core: o.conntrack_max_per_core.unwrap_or(0),
        min: o.conntrack_min.unwrap_or(0),
        tcp_established_timeout: zero_default(
            "conntrack-tcp-timeout-established",
            o.conntrack_tcp_timeout_established.take(),
        )?,
        tcp_close_wait_timeout: zero_default(
            "conntrack-tcp-timeout-close-wait",
            o.conntrack_tcp_timeout_close_wait.take(),
        )?,
        tcp_be_liberal: o.conntrack_tcp_be_liberal.unwrap_or(false),
        udp_timeout: zero_default("conntrack-udp-timeout", o.conntrack_udp_timeout.take())?,
        udp_stream_timeout: zero_default(
            "conntrack-udp-timeout-stream",
            o.conntrack_udp_timeout_stream.take(),
        )?,
    })
}

/// kube-proxy's `--detect-local-mode` and the interface it names.
fn local_interface(
    mode: Option<String>,
    bridge: Option<String>,
    prefix: Option<String>,
) -> Result<Option<LocalInterface>, ConfigError> {
    let named = |setting: &'static str, value: Option<String>| {
        let value = value.unwrap_or_default();
        if LocalInterface::valid_name(&value) {
            Ok(value)
        } else {
            Err(ConfigError::DetectLocal {
                setting,
                value,
                reason: "not an interface name (1 to 15 characters, no space, quote, slash or *)",
            })
        }
    };
    match mode.as_deref().unwrap_or("ClusterCIDR") {
        "ClusterCIDR" | "" => Ok(None),
        "BridgeInterface" => Ok(Some(LocalInterface::Bridge(named(
            "pod-bridge-interface",
            bridge,
        )?))),
        "InterfaceNamePrefix" => Ok(Some(LocalInterface::NamePrefix(named(
            "pod-interface-name-prefix",
            prefix,
        )?))),
        // The CIDRs come from the Node at start (`RunSettings::pod_cidrs_from_node`).
        "NodeCIDR" => Ok(None),
        other => Err(ConfigError::DetectLocal {
            setting: "detect-local-mode",
            value: other.to_owned(),
            reason: "not one of ClusterCIDR, BridgeInterface, InterfaceNamePrefix, NodeCIDR",
        }),
    }
}

/// An IPVS timeout in whole seconds (kube-proxy truncates to seconds too); unset is 0.
fn timeout_seconds(setting: &'static str, value: Option<String>) -> Result<u32, ConfigError> {
    let timeout = duration(setting, value, Duration::ZERO)?;
    // MAX_DURATION (a year) is far below u32::MAX seconds.
    Ok(u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX))
}

fn north_south_settings(
    interfaces: Option<String>,
    snat_port_range: Option<String>,
) -> Result<NorthSouthSettings, ConfigError> {
    let defaults = NorthSouthSettings::default();
    Ok(NorthSouthSettings {
        interfaces: match interfaces {
            None => defaults.interfaces,
            Some(text) => north_south::parse_interfaces(&text)
                .ok_or(ConfigError::NorthSouthInterfaces(text))?,
        },
        snat_ports: match snat_port_range {
            None => defaults.snat_ports,
            Some(text) => {
                north_south::parse_port_range(&text).ok_or(ConfigError::SnatPortRange(text))?
            }
        },
        ..defaults
    })
}

/// A comma-separated list of CIDRs (empty entries ignored).
fn cidrs(setting: &'static str, value: Option<String>) -> Result<Vec<IpNetwork>, ConfigError> {
    value
        .iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse::<IpNetwork>()
                .map_err(|source| ConfigError::Cidr {
                    setting,
                    value: item.to_owned(),
                    source,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fallbacks(env: Option<&str>, hostname: Option<&str>) -> NodeNameFallbacks {
        NodeNameFallbacks {
            env: env.map(str::to_owned),
            hostname: hostname.map(str::to_owned),
        }
    }

    #[test]
    fn defaults_match_kube_proxy() {
        let settings = resolve(
            RunOptions::default(),
            RunOptions::default(),
            fallbacks(None, Some("Worker-1")),
        )
        .expect("defaults resolve");
        assert_eq!(settings.node_name, "worker-1");
        assert_eq!(settings.min_sync_period, Duration::from_secs(1));
        assert_eq!(settings.sync_period, Duration::from_secs(30));
        assert_eq!(settings.healthz_bind_address.to_string(), "0.0.0.0:10256");
        assert_eq!(settings.metrics_bind_address.to_string(), "127.0.0.1:10249");
        assert_eq!(settings.plan, PlanConfig::default());
        assert_eq!(settings.proxy_mode, ProxyMode::DryRun);
    }

    #[test]
    fn north_south_settings_default_to_auto_and_refuse_bad_values() {
        let resolved = |options: RunOptions| {
            resolve(options, RunOptions::default(), fallbacks(None, Some("n")))
        };
        let defaults = resolved(RunOptions::default()).expect("defaults resolve");
        assert_eq!(defaults.north_south, NorthSouthSettings::default());
        let set = resolved(RunOptions {
            north_south_interfaces: Some("eth0,eth1".to_owned()),
            snat_port_range: Some("40000-40999".to_owned()),
            ..RunOptions::default()
        })
        .expect("valid settings resolve");
        assert_eq!(
            set.north_south.interfaces,
            north_south::Interfaces::Named(vec!["eth0".to_owned(), "eth1".to_owned()])
        );
        assert_eq!(set.north_south.snat_ports, (40000, 40999));
        let file: RunOptions =
            serde_yaml::from_str("north-south-interfaces: none\nsnat-port-range: 100-200\n")
                .expect("config keys parse");
        assert_eq!(file.north_south_interfaces.as_deref(), Some("none"));
        assert!(matches!(
            resolved(RunOptions {
                snat_port_range: Some("9-1".to_owned()),
                ..RunOptions::default()
            }),
            Err(ConfigError::SnatPortRange(_))
        ));
        assert!(matches!(
            resolved(RunOptions {
                north_south_interfaces: Some(",".to_owned()),
                ..RunOptions::default()
            }),
            Err(ConfigError::NorthSouthInterfaces(_))
        ));
    }

    #[test]
    fn ipvs_scheduler_is_parsed_or_refused_naming_the_setting() {
        let resolved = |options: RunOptions| {
            resolve(options, RunOptions::default(), fallbacks(None, Some("n")))
        };
        for (scheduler, message) in [
            (" ", "ipvs-scheduler is empty"),
            (
                "maglev",
                r#"ipvs-scheduler "maglev" is not an IPVS scheduler"#,
            ),
            (
                "rr,rr-port",
                r#"ipvs-scheduler flag "rr-port" is not one of rr's"#,
            ),
        ] {
            let error = resolved(RunOptions {
                ipvs_scheduler: Some(scheduler.to_owned()),
                ..RunOptions::default()
            })
            .map(|_| ())
            .expect_err(scheduler);
            assert!(error.to_string().starts_with(message), "{error}");
        }
        let settings = resolved(RunOptions {
            ipvs_scheduler: Some("mh,mh-port".to_owned()),
            ..RunOptions::default()
        })
        .expect("mh,mh-port resolves");
        assert_eq!(settings.plan.scheduler, "mh,mh-port");
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: RunOptions = serde_yaml::from_str(
            "hostname-override: from-file\nmin-sync-period: 250ms\nsync-period: 2m\n\
             proxy-mode: ipvs\nipvs-scheduler: wrr\nlog-format: json\n\
             metrics-bind-address: 127.0.0.1:20249\n",
        )
        .expect("config parses");
        let flags = RunOptions {
            min_sync_period: Some("0".to_owned()),
            proxy_mode: Some(ProxyMode::DryRun),
            ..RunOptions::default()
        };
        let settings =
            resolve(flags, file, fallbacks(Some("from-env"), Some("host"))).expect("resolves");
        assert_eq!(settings.node_name, "from-file");
        assert_eq!(settings.min_sync_period, Duration::ZERO);
        assert_eq!(settings.sync_period, Duration::from_secs(120));
        assert_eq!(settings.proxy_mode, ProxyMode::DryRun);
        assert_eq!(settings.plan.scheduler, "wrr");
        assert_eq!(settings.log_format, LogFormat::Json);
        assert_eq!(settings.metrics_bind_address.to_string(), "127.0.0.1:20249");
    }

    #[test]
    fn node_name_from_env_before_hostname() {
        let settings = resolve(
            RunOptions::default(),
            RunOptions::default(),
            fallbacks(Some("node-7"), Some("host")),
        )
        .expect("resolves");
        assert_eq!(settings.node_name, "node-7");
    }

    #[test]
    fn bad_settings_are_clear_errors() {
        let cases: Vec<(RunOptions, NodeNameFallbacks, &str)> = vec![
            (
                RunOptions {
                    min_sync_period: Some("soon".to_owned()),
                    ..RunOptions::default()
                },
                fallbacks(None, Some("h")),
                "min-sync-period: \"soon\" is not a duration",
            ),
            (
                RunOptions {
                    sync_period: Some("0".to_owned()),
                    ..RunOptions::default()
                },
                fallbacks(None, Some("h")),
                "sync-period must be more than 0",
            ),
            (RunOptions::default(), fallbacks(None, None), "no node name"),
        ];
        for (flags, node, expected) in cases {
            let error = resolve(flags, RunOptions::default(), node).expect_err("must fail");
            assert!(error.to_string().contains(expected), "{error}");
        }
    }

    /// Every duration setting, set to absurd values: a clear error naming it, never a panic
    /// later in `Instant` arithmetic.
    #[test]
    fn absurd_durations_are_refused_for_every_setting() {
        type Setter = fn(&mut RunOptions, String);
        let settings: [(&str, Setter); 4] = [
            ("min-sync-period", |o, v| o.min_sync_period = Some(v)),
            ("sync-period", |o, v| o.sync_period = Some(v)),
            ("source-poll-period", |o, v| o.source_poll_period = Some(v)),
            ("ipvs-drain-timeout", |o, v| o.ipvs_drain_timeout = Some(v)),
        ];
        for (name, set) in settings {
            for (value, expected) in [
                ("300000000000y", "is longer than the most allowed, 365d"),
                ("366d", "is longer than the most allowed, 365d"),
                ("99999999999999999999999s", "is not a duration"),
                ("-1s", "is not a duration"),
                ("1.5.3s", "is not a duration"),
            ] {
                let mut flags = RunOptions::default();
                set(&mut flags, value.to_owned());
                let error = resolve(flags, RunOptions::default(), fallbacks(None, Some("h")))
                    .expect_err(value);
                let text = format!("{:#}", anyhow::Error::from(error));
                assert!(text.starts_with(&format!("{name}: ")), "{text}");
                assert!(text.contains(expected), "{name} {value}: {text}");
            }
            let mut flags = RunOptions::default();
            set(&mut flags, "365d".to_owned());
            let resolved = resolve(flags, RunOptions::default(), fallbacks(None, Some("h")))
                .expect("the maximum itself is allowed");
            let now = std::time::Instant::now();
            let _ = now + resolved.sync_period * 2 + resolved.ipvs.drain_timeout;
        }
    }

    #[test]
    fn zero_is_refused_only_where_it_would_spin() {
        for (flags, expected) in [
            (
                RunOptions {
                    source_poll_period: Some("0".to_owned()),
                    ..RunOptions::default()
                },
                Some("source-poll-period must be more than 0"),
            ),
            (
                RunOptions {
                    sync_period: Some("0s".to_owned()),
                    ..RunOptions::default()
                },
                Some("sync-period must be more than 0"),
            ),
            (
                RunOptions {
                    min_sync_period: Some("0".to_owned()),
                    ipvs_drain_timeout: Some("0".to_owned()),
                    ..RunOptions::default()
                },
                None,
            ),
        ] {
            let result = resolve(flags, RunOptions::default(), fallbacks(None, Some("h")));
            match expected {
                Some(expected) => {
                    let error = result.expect_err(expected).to_string();
                    assert_eq!(error, expected);
                }
                None => {
                    let settings = result.expect("zero is allowed here");
                    assert_eq!(settings.min_sync_period, Duration::ZERO);
                    assert_eq!(settings.ipvs.drain_timeout, Duration::ZERO);
                }
            }
        }
    }

    #[test]
    fn config_file_values_of_the_wrong_type_name_the_key() {
        let error = parse_config("sync-period: [1, 2]\n").expect_err("a list is no duration");
        assert!(error.to_string().contains("sync-period"), "{error}");
        let error = parse_config("masquerade-all: maybe\n").expect_err("not a bool");
        assert!(error.to_string().contains("masquerade-all"), "{error}");
        assert_eq!(
            parse_config(" \n\t\n").expect("blank"),
            RunOptions::default()
        );
    }

    #[test]
    fn ipvs_settings_come_from_flags_and_file() {
        let file: RunOptions = serde_yaml::from_str(
            "cluster-cidr: 10.244.0.0/16, fd00:10:244::/56\nmasquerade-all: true\n\
             ipvs-exclude-cidrs: 10.200.0.0/16\nipvs-drain-timeout: 2m\n",
        )
        .expect("config parses");
        let flags = RunOptions {
            ipvs_strict_arp: Some(true),
            ..RunOptions::default()
        };
        let settings = resolve(flags, file, fallbacks(None, Some("h"))).expect("resolves");
        assert_eq!(settings.ipvs.nft.cluster_cidrs.len(), 2);
        assert!(settings.ipvs.nft.masquerade_all);
        assert!(settings.ipvs.strict_arp);
        assert_eq!(
            settings.ipvs.exclude_cidrs,
            vec!["10.200.0.0/16".parse::<IpNetwork>().expect("cidr")]
        );
        assert_eq!(settings.ipvs.drain_timeout, Duration::from_secs(120));
        assert_eq!(settings.ipvs.link_name, "kube-ipvs0");

        let error = resolve(
            RunOptions {
                cluster_cidr: Some("10.244.0.0/33".to_owned()),
                ..RunOptions::default()
            },
            RunOptions::default(),
            fallbacks(None, Some("h")),
        )
        .expect_err("a bad CIDR must fail");
        assert!(error.to_string().contains("cluster-cidr"), "{error}");
    }

    #[test]
    fn cluster_id_from_flag_or_file_and_blank_is_unset() {
        let file: RunOptions = serde_yaml::from_str("cluster-id: west\n").expect("parses");
        let settings = resolve(
            RunOptions::default(),
            file.clone(),
            fallbacks(None, Some("h")),
        )
        .expect("resolves");
        assert_eq!(settings.plan.cluster_id.as_deref(), Some("west"));
        let flags = RunOptions {
            cluster_id: Some(" east ".to_owned()),
            ..RunOptions::default()
        };
        let settings = resolve(flags, file, fallbacks(None, Some("h"))).expect("resolves");
        assert_eq!(settings.plan.cluster_id.as_deref(), Some("east"));
        let blank = RunOptions {
            cluster_id: Some("  ".to_owned()),
            ..RunOptions::default()
        };
        let settings =
            resolve(blank, RunOptions::default(), fallbacks(None, Some("h"))).expect("resolves");
        assert_eq!(settings.plan.cluster_id, None);
    }

    #[test]
    fn detect_local_mode_flags_choose_the_interface_or_say_why_not() {
        use crate::dataplane::ipvs::nft::LocalInterface;
        let resolved = |mode: &str, bridge: Option<&str>, prefix: Option<&str>| {
            resolve(
                RunOptions {
                    detect_local_mode: Some(mode.to_owned()),
                    pod_bridge_interface: bridge.map(str::to_owned),
                    pod_interface_name_prefix: prefix.map(str::to_owned),
                    ..RunOptions::default()
                },
                RunOptions::default(),
                fallbacks(None, Some("h")),
            )
        };
        let settings = resolved("BridgeInterface", Some("cbr0"), None).expect("resolves");
        assert_eq!(
            settings.ipvs.nft.local_interface,
            Some(LocalInterface::Bridge("cbr0".to_owned()))
        );
        let settings = resolved("NodeCIDR", None, None).expect("resolves");
        assert!(settings.pod_cidrs_from_node);
        assert_eq!(settings.ipvs.nft.local_interface, None);
        let settings = resolved("InterfaceNamePrefix", None, Some("cali")).expect("resolves");
        assert!(!settings.pod_cidrs_from_node);
        assert_eq!(
            settings.ipvs.nft.local_interface,
            Some(LocalInterface::NamePrefix("cali".to_owned()))
        );
        assert_eq!(
            resolved("ClusterCIDR", Some("cbr0"), None)
                .expect("resolves")
                .ipvs
                .nft
                .local_interface,
            None
        );
        for (mode, bridge, expected) in [
            (
                "BridgeInterface",
                None,
                "pod-bridge-interface: \"\": not an interface name",
            ),
            (
                "BridgeInterface",
                Some("x\" ; flush"),
                "pod-bridge-interface",
            ),
            ("Sideways", None, "detect-local-mode: \"Sideways\""),
        ] {
            let error = resolved(mode, bridge, None).expect_err(mode).to_string();
            assert!(error.starts_with(expected), "{error}");
        }
    }

    #[test]
    fn unknown_config_keys_are_rejected() {
        let error = serde_yaml::from_str::<RunOptions>("min-sync-perod: 1s\n")
            .expect_err("typo must not pass silently");
        assert!(error.to_string().contains("unknown field"), "{error}");
    }
}
