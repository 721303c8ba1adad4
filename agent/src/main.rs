//! The `topoproxy` command line.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use topoproxy::agent::{kube_client, Agent, ClusterSource};
use topoproxy::config::{self, LogFormat, NodeNameFallbacks, ProxyMode, RunOptions};
use topoproxy::dataplane::memory::MemoryDataplane;
use topoproxy::planner::{self, explain, PlanConfig};
use topoproxy::render;
use topoproxy::source::file;

/// Exit status for a request that cannot be served as asked (bad usage, unknown node),
/// as distinct from a failure while serving it.
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "topoproxy",
    version,
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
        options: RunOptions,
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
        /// IPVS scheduler for every virtual server.
        #[arg(long, default_value = "rr")]
        ipvs_scheduler: String,
        /// Services labelled `service.kubernetes.io/service-proxy-name` with another value are
        /// left to that proxy.
        #[arg(long, default_value = "topoproxy")]
        service_proxy_name: String,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
}

/// How the command ended when it did not succeed.
enum Failure {
    Usage(String),
    Error(anyhow::Error),
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
        Command::Run { config, options } => run_agent(config.as_deref(), options),
        Command::Plan {
            source,
            node,
            format,
            explain,
            ipvs_scheduler,
            service_proxy_name,
            log_format,
        } => {
            init_logging(log_format);
            let config = PlanConfig {
                scheduler: ipvs_scheduler,
                proxy_name: service_proxy_name,
            };
            plan(&source, &node, format, explain, &config)
        }
    }
}

fn run_agent(config_file: Option<&std::path::Path>, flags: RunOptions) -> Result<(), Failure> {
    let file = match config_file {
        Some(path) => config::read_config_file(path)
            .map_err(|e| Failure::Usage(format!("{:#}", anyhow::Error::from(e))))?,
        None => RunOptions::default(),
    };
    let fallbacks = NodeNameFallbacks {
        env: std::env::var("NODE_NAME").ok(),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname").ok(),
    };
    let settings = config::resolve(flags, file, fallbacks)
        .map_err(|e| Failure::Usage(format!("{:#}", anyhow::Error::from(e))))?;
    init_logging(settings.log_format);
    if settings.proxy_mode != ProxyMode::DryRun {
        return Err(Failure::Usage(format!(
            "--proxy-mode {} is not available in this build yet: its dataplane has not landed; \
             use --proxy-mode dry-run to run in shadow",
            settings.proxy_mode.as_str()
        )));
    }
    topoproxy::heap::limit_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let (dataplane, _handle) = MemoryDataplane::new("dry-run");
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
    })
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
    source: &std::path::Path,
    node_name: &str,
    format: OutputFormat,
    with_explanation: bool,
    config: &PlanConfig,
) -> Result<(), Failure> {
    let loaded = file::load_dir(source)
        .with_context(|| format!("loading the cluster from {}", source.display()))?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    let Some(node) = loaded.store.node(node_name) else {
        let known: Vec<&str> = loaded.store.nodes().map(|n| n.name.as_str()).collect();
        return Err(Failure::Usage(format!(
            "node {node_name:?} is not in {} (nodes there: {})",
            source.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )));
    };
    let table = planner::plan(&loaded.store, node, config);
    for conflict in table.conflicts() {
        tracing::warn!(
            "{} {}:{} is claimed by both {} and {}; {} wins",
            conflict.key.protocol,
            conflict.key.address,
            conflict.key.port,
            conflict.winner,
            conflict.loser,
            conflict.winner
        );
    }
    let explanation = with_explanation.then(|| explain::explain(&loaded.store, node, config));
    let output = match format {
        OutputFormat::Ipvsadm => {
            let mut text = render::ipvsadm::render_table(&table);
            if let Some(explanation) = &explanation {
                text.push('\n');
                text.push_str(&explain::render_text(explanation, node));
            }
            text
        }
        OutputFormat::Json => {
            let mut json = render::json::render_table(&table, &node.name, explanation.as_deref())
                .context("encoding the table as JSON")?;
            json.push('\n');
            json
        }
    };
    print!("{output}");
    Ok(())
}
