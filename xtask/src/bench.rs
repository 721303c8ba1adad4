//! `cargo xtask bench-sync`: the end-to-end sync benchmarks.
//!
//! - the in-process bench (`benches/sync.rs`): initial sync and event-to-dataplane latency;
//! - the agent as its own process against the `fake-apiserver` binary: its resident memory
//!   once the whole table is programmed;
//! - with `--real-apiserver`, `benches/real_apiserver.rs` against a real kube-apiserver (and
//!   kube-proxy v1.36 against the same server), run in a network and mount namespace of its
//!   own: kube-proxy's nftables rules and sysctls stay in it, and the host's `nft` tables are
//!   compared before and after to prove it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{cargo, k8s, util, workspace_root};

/// The fake-apiserver measurement (and the in-process bench unless `rss_only`).
pub fn bench_sync(services: usize, events: usize, rss_only: bool) -> Result<()> {
    if !rss_only {
        in_process(services, events)?;
    }
    println!("== separate process: the agent's memory at {services} services");
    cargo(
        &[
            "build",
            "--release",
            "-p",
            "topoproxy",
            "-p",
            "fake-apiserver",
            "--bins",
        ],
        &[],
    )?;
    agent_rss(services)
}

/// `benches/real_apiserver.rs` (release build) under `unshare -mn`, with `nodes` Nodes in the
/// cluster; fails if an nftables table of kube-proxy's shows up on the host.
pub fn bench_real_apiserver(services: usize, events: usize, nodes: usize) -> Result<()> {
    println!(
        "== real kube-apiserver: initial sync, RSS, endpoint-change latency at {services} \
         services; kube-proxy against the same server"
    );
    k8s::k8s_setup()?;
    let version = k8s::kubernetes_version()?;
    let bench = util::build_release_bench("real_apiserver")?;
    let host_tables = kube_proxy_tables_on_host()?;
    let mut run = Command::new("unshare");
    // Its own network namespace (loopback up) and mount namespace, with a private /dev/shm,
    // where the harness keeps etcd's data.
    run.args([
        "--mount",
        "--net",
        "sh",
        "-c",
        "ip link set lo up && mount -t tmpfs none /dev/shm && exec \"$0\" --bench",
    ])
    .arg(&bench)
    .envs([
        ("TOPOPROXY_BENCH_SERVICES", services.to_string()),
        ("TOPOPROXY_BENCH_EVENTS", events.min(1000).to_string()),
        (
            "TOPOPROXY_BENCH_EXTRA_NODES",
            nodes.saturating_sub(30).to_string(),
        ),
        (
            "TOPOPROXY_K8S_BIN",
            k8s::kubernetes_bin_dir(&version).display().to_string(),
        ),
        (
            "TOPOPROXY_TOOLS_BIN",
            k8s::tools_bin_dir().display().to_string(),
        ),
    ])
    .current_dir(workspace_root());
    let result = util::run(&mut run);
    let leaked: Vec<String> = kube_proxy_tables_on_host()?
        .into_iter()
        .filter(|table| !host_tables.contains(table))
        .collect();
    ensure!(
        leaked.is_empty(),
        "kube-proxy's nftables tables reached the host: {leaked:?} (`nft delete table ...` them)"
    );
    println!("  the host's nftables: no kube-proxy table added by the run");
    result
}

/// The host's nftables tables named `kube-proxy` (`table ip kube-proxy`, `table ip6 ...`).
fn kube_proxy_tables_on_host() -> Result<Vec<String>> {
    let tables = util::output(Command::new("nft").args(["list", "tables"]))
        .context("listing the host's nftables tables (nft)")?;
    Ok(tables
        .lines()
        .filter(|line| line.split_whitespace().last() == Some("kube-proxy"))
        .map(str::to_owned)
        .collect())
}

fn in_process(services: usize, events: usize) -> Result<()> {
    println!("== in-process: initial sync and event-to-dataplane latency");
    cargo(
        &["bench", "-p", "topoproxy", "--bench", "sync"],
        &[
            ("TOPOPROXY_BENCH_SERVICES", services.to_string()),
            ("TOPOPROXY_BENCH_EVENTS", events.to_string()),
        ],
    )
}

/// Kills the child on drop, so a failed measurement leaves no process behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent_rss(services: usize) -> Result<()> {
    let release = workspace_root().join("target/release");
    let scratch = std::env::temp_dir().join(format!("topoproxy-bench-sync-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).context("creating the scratch directory")?;
    let kubeconfig = scratch.join("kubeconfig");
    let _ = std::fs::remove_file(&kubeconfig);
    let _server = Reaped(
        Command::new(release.join("fake-apiserver"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--services",
                &services.to_string(),
            ])
            .args([
                "--endpoints",
                "10",
                "--zones",
                "3",
                "--nodes-per-zone",
                "10",
                "--hints",
            ])
            .arg("--kubeconfig-out")
            .arg(&kubeconfig)
            .stdout(Stdio::null())
            .spawn()
            .context("starting fake-apiserver")?,
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !kubeconfig.exists() {
        if Instant::now() > deadline {
            bail!("fake-apiserver did not write its kubeconfig");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = util::free_loopback_port()?;
    let healthz = util::free_loopback_port()?;
    let started = Instant::now();
    let agent = Reaped(
        Command::new(release.join("topoproxy"))
            .arg("run")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--hostname-override", "node-a-0", "--proxy-mode", "dry-run"])
            .args(["--metrics-bind-address", &metrics.to_string()])
            .args(["--healthz-bind-address", &healthz.to_string()])
            .args(["--min-sync-period", "0"])
            .stderr(Stdio::null())
            .spawn()
            .context("starting topoproxy")?,
    );
    let expected = services + services.div_ceil(10);
    loop {
        let synced = util::http_get(metrics, "/metrics")
            .ok()
            .and_then(|(_, body)| util::metric(&body, "topoproxy_virtual_servers"))
            .is_some_and(|value| value as usize >= expected);
        if synced {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the agent did not sync {expected} virtual servers");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let synced_after = started.elapsed();
    // Let allocator and runtime settle before reading memory.
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.0.id()))
        .context("reading the agent's /proc status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|rest| rest.trim().to_owned())
            .unwrap_or_else(|| "?".to_owned())
    };
    println!(
        "agent_process services={services} virtual_servers={expected} \
         start_to_synced_ms={:.0} VmRSS={} VmHWM={} (target RSS <= 128 MiB)",
        synced_after.as_secs_f64() * 1e3,
        field("VmRSS:"),
        field("VmHWM:")
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
