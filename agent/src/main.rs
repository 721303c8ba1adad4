//! The `topoproxy` command line.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use topoproxy::agent::{kube_client, Agent, ClusterSource};
use topoproxy::config::{self, LogFormat, NodeNameFallbacks, ProxyMode, RunOptions};
use topoproxy::dataplane::ebpf::{self, EbpfDataplane};
use topoproxy::dataplane::ipvs::cleanup::CleanupScope;
use topoproxy::dataplane::ipvs::{self, IpvsDataplane};
use topoproxy::dataplane::memory::MemoryDataplane;
use topoproxy::dataplane::Dataplane;
use topoproxy::model::LocalityPolicy;
use topoproxy::node_addresses::NodePortAddresses;
use topoproxy::node_cleanup::{self, CleanupMode, CleanupRequest};
use topoproxy::planner::{self, PlanConfig};
use topoproxy::render::plan_output::{plan_output, PlanFormat};
use topoproxy::scheduler::Scheduler;

mod node_setup;

/// Exit status for a request that cannot be served as asked (bad usage, unknown node),
/// as distinct from a failure while serving it.
const EXIT_USAGE: u8 = 2;
/// Exit status of `migrate-check` when a blocker was found: not safe to cut over.
const EXIT_NOT_SAFE: u8 = 3;

/// `topoproxy --version`: the release and the git revision it was built from (`unknown` when
/// built outside a git checkout without `TOPOPROXY_GIT_REVISION`; see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("TOPOPROXY_GIT_REVISION"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "topoproxy",
    version = VERSION,
    about = "Topology-aware kube-proxy replacement: routes every Service to the nearest healthy backends"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    /// Exactly what `ipvsadm -Ln` prints for the programmed table.
    Ipvsadm,
    /// The table with every tier, as JSON.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: watch the cluster and keep this node's dataplane in sync.
    Run {
        /// YAML config file whose keys are these flags' names; flags win over it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        options: Box<RunOptions>,
    },
    /// Print the table a node would program, from a directory of cluster YAML.
    Plan {
        /// Directory (searched recursively) or file of YAML as `kubectl get -o yaml` prints it.
        #[arg(long)]
        source: PathBuf,
        /// The node to plan for (a Node object in the source).
        #[arg(long)]
        node: String,
        #[arg(long, value_enum, default_value_t = OutputFormat::Ipvsadm)]
        format: OutputFormat,
        /// Also say, per Service port, which topology mode applied and why each endpoint was
        /// chosen or left out.
        #[arg(long)]
        explain: bool,
        /// IPVS scheduler (and flags, e.g. `mh,mh-port`) for Services without a
        /// `topoproxy.io/ipvs-scheduler` annotation.
        #[arg(long, default_value = "rr")]
        ipvs_scheduler: String,
        /// Services labelled `service.kubernetes.io/service-proxy-name` with another value are
        /// left to that proxy.
        #[arg(long, default_value = planner::DEFAULT_PROXY_NAME)]
        service_proxy_name: String,
        /// Locality policy of Services without a `topoproxy.io/topology` annotation.
        #[arg(long, value_enum, default_value_t = LocalityPolicy::KubeProxy)]
        topology_default: LocalityPolicy,
        /// This cluster's MCS cluster id (its slices' `multicluster.kubernetes.io/source-cluster`);
        /// ServiceImports are planned only with it.
        #[arg(long)]
        cluster_id: Option<String>,
        /// Which of the Node object's addresses serve NodePorts: CIDRs and `primary`, as
        /// kube-proxy's `--nodeport-addresses` (offline there is no host to read, so the
        /// default is every address the Node object lists).
        #[arg(long, default_value = "")]
        nodeport_addresses: String,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Print the table the kernel actually has, in `ipvsadm -Ln` format (as `plan` prints it).
    List {
        /// The dataplane to read [default: ebpf when an agent's maps are pinned at
        /// --bpf-pin-dir, else ipvs], so `kubectl exec ds/topoproxy -- topoproxy list` reads
        /// the node's mode.
        #[arg(long, value_enum)]
        proxy_mode: Option<KernelMode>,
        /// eBPF mode: the bpffs directory the agent pins its maps in.
        #[arg(long, default_value = ebpf::DEFAULT_PIN_DIR)]
        bpf_pin_dir: PathBuf,
        /// Also list IPVS services topoproxy does not own.
        #[arg(long)]
        all: bool,
        /// Print what `plan` cannot know as `plan` does (connection counters as 0, the version
        /// line's IPVS version and table size), so the two compare with `diff`.
        #[arg(long)]
        no_counters: bool,
    },
    /// Switch the eBPF programs' diagnostics while they run (off by default); the running
    /// agent logs each record with its Service.
    DatapathLog {
        /// `all`, `none`, or a comma-separated list of no-backend, tier-fallback, slot-miss,
        /// reply-ambiguous, etp-local-drop, snat-exhausted.
        #[arg(long, default_value = "all")]
        events: String,
        /// Records each CPU may emit per second; 0 switches logging off.
        #[arg(long, default_value_t = 10)]
        per_second: u32,
        /// The bpffs directory the agent pins its maps in.
        #[arg(long, default_value = "/sys/fs/bpf/topoproxy")]
        bpf_pin_dir: PathBuf,
    },
    /// Read-only pre-flight before replacing kube-proxy: reads the kube-system/kube-proxy
    /// ConfigMap and DaemonSet, every Service and Node, and prints what topoproxy will do
    /// differently or cannot do. Exit status 0: safe to cut over; 3: a blocker was found.
    MigrateCheck {
        /// Kubeconfig file (needs get on ConfigMaps and DaemonSets in kube-system, list on
        /// Services and Nodes); else in-cluster, else the usual inference.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Remove everything topoproxy programmed on this node.
    Cleanup {
        /// The dataplane to clean up.
        #[arg(long, value_enum, default_value_t = KernelMode::Ipvs)]
        proxy_mode: KernelMode,
        /// Also remove kube-proxy's IPVS-mode leftovers: IPVS services on kube-ipvs0 addresses
        /// and on node addresses in the NodePort range, the kube-ipvs0 link, kube-proxy's
        /// iptables chains and ipsets.
        #[arg(long)]
        kube_proxy: bool,
        /// Remove only kube-proxy's IPVS-mode leftovers and keep everything topoproxy owns:
        /// safe on a node topoproxy already serves.
        #[arg(long, conflicts_with = "kube_proxy")]
        only_kube_proxy: bool,
        /// IPVS services inside these comma-separated CIDRs are left alone.
        #[arg(long)]
        ipvs_exclude_cidrs: Option<String>,
        /// eBPF mode: the bpffs directory the agent pins its maps, programs and links in.
        #[arg(long, default_value = ebpf::DEFAULT_PIN_DIR)]
        bpf_pin_dir: PathBuf,
        /// kube-proxy's `--service-node-port-range`, for `--kube-proxy`.
        #[arg(long, default_value = "30000-32767")]
        node_port_range: String,
    },
}

/// A dataplane that lives in the kernel.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KernelMode {
    Ipvs,
    Ebpf,
}

/// How the command ended when it did not succeed.
enum Failure {
    Usage(String),
    Error(anyhow::Error),
    /// `migrate-check` found a blocker (the report is already printed).
    NotSafe,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::Error(error)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Error(error)) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
        Err(Failure::NotSafe) => ExitCode::from(EXIT_NOT_SAFE),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run { config, options } => run_agent(config.as_deref(), *options),
        Command::MigrateCheck { kubeconfig } => migrate_check(kubeconfig.as_deref()),
        Command::List {
            proxy_mode,
            bpf_pin_dir,
            all,
            no_counters,
        } => {
            let mode = proxy_mode.unwrap_or_else(|| pinned_mode(&bpf_pin_dir));
            list(mode, bpf_pin_dir, all, no_counters)
        }
        Command::DatapathLog {
            events,
            per_second,
            bpf_pin_dir,
        } => datapath_log(&events, per_second, &bpf_pin_dir),
        Command::Cleanup {
            proxy_mode,
            kube_proxy,
            only_kube_proxy,
            ipvs_exclude_cidrs,
            bpf_pin_dir,
            node_port_range,
        } => {
            let node_port_range =
                node_cleanup::parse_port_range(&node_port_range).ok_or_else(|| {
                    Failure::Usage(format!(
                        "--node-port-range {node_port_range:?} is not a range like 30000-32767"
                    ))
                })?;
            cleanup(CleanupRequest {
                mode: match proxy_mode {
                    KernelMode::Ipvs => CleanupMode::Ipvs,
                    KernelMode::Ebpf => CleanupMode::Ebpf,
                },
                scope: match (kube_proxy, only_kube_proxy) {
                    (_, true) => CleanupScope::KubeProxyOnly,
                    (true, false) => CleanupScope::OursAndKubeProxy,
                    (false, false) => CleanupScope::Ours,
                },
                exclude_cidrs: ipvs_exclude_cidrs,
                pin_dir: bpf_pin_dir,
                node_port_range,
            })
        }
        Command::Plan {
            source,
            node,
            format,
            explain,
            ipvs_scheduler,
            service_proxy_name,
            topology_default,
            cluster_id,
            nodeport_addresses,
            log_format,
        } => {
            init_logging(log_format);
            let node_port_addresses = NodePortAddresses::parse(&nodeport_addresses)
                .map_err(|error| Failure::Usage(error.to_string()))?;
            let scheduler = Scheduler::parse(&ipvs_scheduler)
                .map_err(|why| Failure::Usage(format!("ipvs-scheduler {why}")))?;
            let config = PlanConfig {
                scheduler,
                proxy_name: service_proxy_name,
                default_locality: topology_default,
                cluster_id: cluster_id
                    .map(|id| id.trim().to_owned())
                    .filter(|id| !id.is_empty()),
                node_port_addresses,
            };
            plan(&source, &node, format, explain, &config)
        }
    }
}

/// The mode whose state is on the node when none is named: eBPF when the agent's pins are
/// there, else IPVS.
fn pinned_mode(pin_dir: &Path) -> KernelMode {
    if ebpf::inspect::agent_pinned(pin_dir) {
        KernelMode::Ebpf
    } else {
        KernelMode::Ipvs
    }
}

fn run_agent(config_file: Option<&Path>, flags: RunOptions) -> Result<(), Failure> {
    let (settings, not_applied) = load_settings(config_file, flags)?;
    let crash_after = topoproxy::kernel_writes::crash_point_from_env().map_err(Failure::Usage)?;
    init_logging(settings.log_format);
    if !not_applied.is_empty() {
        tracing::info!(
            fields = %not_applied
                .iter()
                .map(|n| format!("{} ({})", n.field, n.reason))
                .collect::<Vec<_>>()
                .join("; "),
            "kube-proxy configuration: fields accepted that do not apply to topoproxy"
        );
    }
    topoproxy::heap::limit_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(start_and_serve(settings, crash_after))
}

/// The settings from the flags over the configuration file (topoproxy's own or kube-proxy's),
/// and the kube-proxy fields accepted that do not apply here.
fn load_settings(
    config_file: Option<&Path>,
    flags: RunOptions,
) -> Result<(config::RunSettings, Vec<config::kube_proxy::NotApplied>), Failure> {
    let usage = |e: config::ConfigError| Failure::Usage(format!("{:#}", anyhow::Error::from(e)));
    let loaded = match config_file {
        Some(path) => Some(config::read_config_file(path).map_err(usage)?),
        None => None,
    };
    let not_applied = match &loaded {
        Some(config::ConfigFile::KubeProxy(translation)) => translation.not_applied.clone(),
        _ => Vec::new(),
    };
    let file = match loaded {
        Some(loaded) => loaded.into_options(&flags).map_err(usage)?,
        None => RunOptions::default(),
    };
    let fallbacks = NodeNameFallbacks {
        env: std::env::var("NODE_NAME").ok(),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname").ok(),
    };
    let settings = config::resolve(flags, file, fallbacks).map_err(usage)?;
    Ok((settings, not_applied))
}

/// Armed once the dataplane is set up: the writes counted are those of syncs.
fn arm_crash_point(crash_after: Option<u64>) {
    if let Some(writes) = crash_after {
        tracing::warn!(
            writes,
            "crash point armed: SIGKILL after this many kernel writes"
        );
        topoproxy::kernel_writes::arm_crash(writes);
    }
}

async fn start_and_serve(
    mut settings: config::RunSettings,
    crash_after: Option<u64>,
) -> Result<(), Failure> {
    if settings.pod_cidrs_from_node {
        settings.ipvs.nft.cluster_cidrs = node_pod_cidrs(&settings).await?;
    }
    match settings.proxy_mode {
        ProxyMode::Ipvs => {
            if settings.ipvs.nft.cluster_cidrs.is_empty() && !settings.ipvs.nft.masquerade_all {
                // kube-proxy warns the same way when detectLocalMode ClusterCIDR has no CIDR.
                tracing::warn!(
                    "no cluster-cidr: ClusterIP traffic from outside the pod network is not \
                     masqueraded, only node traffic whose source is the VIP; set cluster-cidr \
                     (kube-proxy's clusterCIDR) to the pod CIDRs"
                );
            }
            let dataplane = IpvsDataplane::new(settings.ipvs.clone())
                .await
                .context("starting the IPVS dataplane")?;
            // After the dataplane: its nftables table has loaded nf_conntrack.
            node_setup::apply(&settings)?;
            arm_crash_point(crash_after);
            serve(settings, dataplane).await
        }
        ProxyMode::Ebpf => {
            let dataplane = start_ebpf(&settings)?;
            node_setup::apply(&settings)?;
            arm_crash_point(crash_after);
            serve(settings, dataplane).await
        }
        ProxyMode::DryRun => {
            let (dataplane, _handle) = MemoryDataplane::new("dry-run");
            serve(settings, dataplane).await
        }
    }
}

/// Loads (or adopts) the eBPF programs and attaches the north-south ones if configured.
fn start_ebpf(settings: &config::RunSettings) -> Result<EbpfDataplane, Failure> {
    let mut dataplane =
        EbpfDataplane::open(settings.ebpf.clone()).context("starting the eBPF dataplane")?;
    let report = dataplane.load_report();
    tracing::info!(
        pin_dir = %settings.ebpf.pin_dir.display(),
        adopted = report.adopted.len(),
        attached = report.attached.len(),
        upgraded = report.upgraded.len(),
        btf = match report.btf {
            Some(true) => "loaded",
            // aya's warning above says what the kernel refused.
            Some(false) => "refused",
            None => "adopted programs",
        },
        version = %ebpf::loader::programs_version(),
        "eBPF programs in place"
    );
    match dataplane
        .attach_north_south(settings.north_south.clone())
        .context("attaching the north-south tc programs")?
    {
        Some(report) => ebpf::north_south::log_report(&report),
        None => tracing::info!("north-south tc programs wait for the first sync"),
    }
    Ok(dataplane)
}

/// `detect-local-mode NodeCIDR`: this Node's `spec.podCIDRs`, waited for.
async fn node_pod_cidrs(
    settings: &config::RunSettings,
) -> Result<Vec<ipnetwork::IpNetwork>, Failure> {
    if settings.source.is_some() {
        return Err(Failure::Usage(
            "detect-local-mode NodeCIDR reads the Node's spec.podCIDRs from the API, which --source does not give"
                .to_owned(),
        ));
    }
    let client = kube_client(settings.kubeconfig.as_deref())
        .await
        .context("connecting to the Kubernetes API")?;
    tracing::info!(
        node = %settings.node_name,
        "detect-local-mode NodeCIDR: waiting for the Node's spec.podCIDRs"
    );
    let cidrs = topoproxy::node_cidr::pod_cidrs(client, &settings.node_name)
        .await
        .context("reading the pod CIDRs for detect-local-mode NodeCIDR")?;
    tracing::info!(
        cidrs = %cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "detect-local-mode NodeCIDR: traffic from outside these pod CIDRs is masqueraded"
    );
    Ok(cidrs)
}

/// Runs the agent over `dataplane` until SIGINT or SIGTERM.
async fn serve<D: Dataplane + 'static>(
    settings: config::RunSettings,
    dataplane: D,
) -> Result<(), Failure> {
    let agent = Agent::start(settings.clone(), dataplane)
        .await
        .context("starting the agent")?;
    let source = match &settings.source {
        Some(dir) => ClusterSource::Directory(dir.clone()),
        None => ClusterSource::Kube(
            kube_client(settings.kubeconfig.as_deref())
                .await
                .context("connecting to the Kubernetes API")?,
        ),
    };
    agent
        .run(source, shutdown_signal())
        .await
        .context("running the agent")?;
    Ok(())
}

fn migrate_check(kubeconfig: Option<&Path>) -> Result<(), Failure> {
    use topoproxy::migrate_check;
    init_logging(LogFormat::Text);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let inputs = runtime.block_on(async {
        let client = kube_client(kubeconfig)
            .await
            .context("connecting to the Kubernetes API")?;
        migrate_check::fetch(&client)
            .await
            .map_err(anyhow::Error::from)
    })?;
    let findings = migrate_check::check(&inputs);
    print!("{}", migrate_check::render(&findings));
    if migrate_check::safe(&findings) {
        Ok(())
    } else {
        Err(Failure::NotSafe)
    }
}

fn datapath_log(events: &str, per_second: u32, pin_dir: &Path) -> Result<(), Failure> {
    let events = ebpf::datapath_log::parse_events(events).map_err(Failure::Usage)?;
    ebpf::set_datapath_log(pin_dir, ebpf::DatapathLog { events, per_second })
        .with_context(|| format!("switching the datapath log in {}", pin_dir.display()))?;
    Ok(())
}

fn list(mode: KernelMode, pin_dir: PathBuf, all: bool, no_counters: bool) -> Result<(), Failure> {
    match mode {
        KernelMode::Ipvs => {
            let text = ipvs::inspect::list(ipvs::inspect::ListOptions {
                all,
                zero_counters: no_counters,
            })
            .context("listing the IPVS table")?;
            print!("{text}");
            Ok(())
        }
        KernelMode::Ebpf => {
            let listing = ebpf::inspect::list(&pin_dir).map_err(anyhow::Error::from)?;
            print!("{}", ebpf::render_ipvsadm(&listing, no_counters));
            Ok(())
        }
    }
}

fn cleanup(request: CleanupRequest) -> Result<(), Failure> {
    init_logging(LogFormat::Text);
    let summary = node_cleanup::run(request).map_err(|error| match error {
        node_cleanup::NodeCleanupError::Config(e) => {
            Failure::Usage(format!("{:#}", anyhow::Error::from(e)))
        }
        other => Failure::Error(other.into()),
    })?;
    for line in summary.lines {
        println!("{line}");
    }
    Ok(())
}

/// Completes on SIGINT or SIGTERM (what the kubelet sends to stop the pod).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
}

fn plan(
    source: &Path,
    node_name: &str,
    format: OutputFormat,
    with_explanation: bool,
    config: &PlanConfig,
) -> Result<(), Failure> {
    let format = match format {
        OutputFormat::Ipvsadm => PlanFormat::Ipvsadm,
        OutputFormat::Json => PlanFormat::Json,
    };
    let output =
        plan_output(source, node_name, format, with_explanation, config).map_err(|error| {
            if error.is_usage() {
                Failure::Usage(error.to_string())
            } else {
                Failure::Error(error.into())
            }
        })?;
    print!("{output}");
    Ok(())
}
