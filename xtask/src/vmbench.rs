//! `cargo xtask vm-bench`: IPVS programming cost inside the VM, the agent against `ipvsadm -R`.
//! With `--vs-kube-proxy`, instead, the agent against kube-proxy through the real apiserver
//! ([`vs_kube_proxy`]: the `side_by_side` test of `tests/vm_k8s_parity.rs`).
//!
//! Per kernel, ONE boot runs, for each Service count N (`--services 1000,10000`):
//!
//! 1. `ipvsadm -R` of the table the agent would program (generated on the host from
//!    `topoproxy plan` output of the same cluster), timed, then `ipvsadm -C`;
//! 2. the agent (`topoproxy run --proxy-mode ipvs --source DIR`, release build): time from
//!    start to its first successful sync (`topoproxy_syncs_total{result="success"}` ≥ 1 on
//!    `/metrics`), then `topoproxy cleanup`;
//! 3. one endpoint change (one address of `svc-0` replaced): the time until IPVS shows it
//!    (`ipvsadm -Ln -t` of that one service) and the netlink requests it cost:
//!    `topoproxy_dataplane_kernel_requests_total{dataplane="ipvs",kind=...}` read before and
//!    after, each time once the counters have held still for two seconds; with where the time
//!    went: the agent's `slow source reload` lines and what each sync phase
//!    (`topoproxy_sync_phase_duration_seconds_sum`) added meanwhile;
//! 4. restarts without clean-up: the agent killed and started again over the correct table
//!    (its first sync must change nothing), then again after 10 % of the destinations were
//!    deleted behind its back (`ipvsadm -d`); start → first sync and the changes it made;
//! 5. a periodic re-read over the correct table (the agent once more, `--sync-period 20s`):
//!    its phases, from the agent's `slow IPVS read` line.
//!
//! With `--batches N,...` the per-batch netlink bench (`benches/ipvs_batches.rs`: the same
//! table sent through the IPVS client in several modes, and `ipvsadm -R`) runs first in the
//! same boot; its lines are printed as they are.
//!
//! The cluster (generated here, no hints, 3 zones × 2 nodes, N Services × 10 Ready endpoints,
//! so every endpoint is in the plan: N × 10 real servers) is written as YAML; `svc-0` lives in
//! its own file so the change rewrites one small file. Results are printed per kernel with the
//! agent/ipvsadm ratio. Guest timings use `/proc/uptime` (10 ms resolution).
//!
//! The agent runs with `--source-poll-period 5s` (each poll stats every file of the source
//! directory, which on one emulated vCPU competes with the sync being measured) and
//! `--sync-period 1h` (no periodic full re-read lands in the endpoint-change window).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};

use crate::vm;

/// Endpoints per Service.
const ENDPOINTS: usize = 10;
const ZONES: usize = 3;
const NODES_PER_ZONE: usize = 2;
/// The node the agent plans for.
const NODE: &str = "node-a-0";

/// What `vm-bench` runs.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    pub kernels: Vec<String>,
    pub services: Vec<usize>,
    pub timeout: Duration,
    pub memory_mib: u32,
    /// Service counts for the per-batch bench (none: not run).
    pub batches: Vec<usize>,
}

fn cluster_ip(index: usize) -> String {
    // 10.96.0.0/12 upward from 10.96.0.1.
    let n = (10u32 << 24 | 96 << 16) + 1 + index as u32;
    format!(
        "{}.{}.{}.{}",
        n >> 24,
        (n >> 16) & 255,
        (n >> 8) & 255,
        n & 255
    )
}

fn endpoint_ip(service: usize, endpoint: usize) -> String {
    // 10.244.0.0 upward, unique cluster-wide; 10.240.0.0/12 covers 100,000 of them.
    let n = (10u32 << 24 | 244 << 16) + 1 + (service * ENDPOINTS + endpoint) as u32;
    format!(
        "{}.{}.{}.{}",
        n >> 24,
        (n >> 16) & 255,
        (n >> 8) & 255,
        n & 255
    )
}

fn node_name(zone: usize, index: usize) -> String {
    format!("node-{}-{index}", (b'a' + zone as u8) as char)
}

fn service_yaml(index: usize, changed: bool) -> String {
    let name = format!("svc-{index}");
    let ip = cluster_ip(index);
    let mut text = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: bench\nspec:\n  \
         type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports:\n  \
         - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abcde\n  \
         namespace: bench\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nendpoints:\n"
    );
    for endpoint in 0..ENDPOINTS {
        let global = index * ENDPOINTS + endpoint;
        let zone = global % ZONES;
        let node = node_name(zone, (global / ZONES) % NODES_PER_ZONE);
        // The change: the first endpoint moves to an address no other endpoint has.
        let address = if changed && endpoint == 0 {
            "10.250.0.1".to_owned()
        } else {
            endpoint_ip(index, endpoint)
        };
        let _ = write!(
            text,
            "- addresses: [{address}]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
             nodeName: {node}\n  zone: zone-{}\n",
            (b'a' + zone as u8) as char
        );
    }
    text.push_str("ports:\n- {name: http, port: 8080, protocol: TCP}\n");
    text
}

/// Writes the cluster for `services` Services into `dir` (nodes.yaml, svc-0.yaml,
/// services.yaml) and the changed svc-0 beside it as `svc-0.changed`.
fn write_cluster(dir: &Path, services: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut nodes =
        String::from("apiVersion: v1\nkind: List\nmetadata:\n  resourceVersion: \"\"\nitems:\n");
    for zone in 0..ZONES {
        for index in 0..NODES_PER_ZONE {
            let name = node_name(zone, index);
            let _ = write!(
                nodes,
                "- apiVersion: v1\n  kind: Node\n  metadata:\n    name: {name}\n    labels:\n      \
                 kubernetes.io/hostname: {name}\n      topology.kubernetes.io/zone: zone-{}\n  \
                 status:\n    addresses:\n    - {{type: InternalIP, address: 172.16.{zone}.{}}}\n",
                (b'a' + zone as u8) as char,
                index + 1
            );
        }
    }
    std::fs::write(dir.join("nodes.yaml"), nodes)?;
    std::fs::write(dir.join("svc-0.yaml"), service_yaml(0, false))?;
    let mut rest = String::new();
    for index in 1..services {
        rest.push_str(&service_yaml(index, false));
    }
    std::fs::write(dir.join("services.yaml"), rest)?;
    std::fs::write(
        dir.parent()
            .context("cluster dir parent")?
            .join(format!("svc-0-{services}.changed")),
        service_yaml(0, true),
    )?;
    Ok(())
}

/// Turns `ipvsadm -Ln` text into `ipvsadm -R` input (TCP/UDP, Masq/Route/Tunnel, weights,
/// persistence).
pub fn listing_to_restore(listing: &str) -> String {
    let mut out = String::new();
    let mut service: Option<(&str, &str)> = None;
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["->", "RemoteAddress:Port", ..] => {}
            ["->", destination, forward, weight, ..] => {
                if let Some((flag, address)) = service {
                    let method = match *forward {
                        "Route" => "-g",
                        "Tunnel" => "-i",
                        _ => "-m",
                    };
                    let _ = writeln!(
                        out,
                        "-a {flag} {address} -r {destination} {method} -w {weight}"
                    );
                }
            }
            [protocol @ ("TCP" | "UDP"), address, scheduler, rest @ ..] => {
                let flag = if *protocol == "TCP" { "-t" } else { "-u" };
                let _ = write!(out, "-A {flag} {address} -s {scheduler}");
                if let ["persistent", timeout, ..] = rest {
                    let _ = write!(out, " -p {timeout}");
                }
                out.push('\n');
                service = Some((flag, address));
            }
            _ => {}
        }
    }
    out
}

fn build_agent() -> Result<PathBuf> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args([
            "build",
            "--release",
            "-p",
            "topoproxy",
            "--bin",
            "topoproxy",
        ])
        .current_dir(crate::workspace_root())
        .status()
        .context("running cargo build --release")?;
    ensure!(
        status.success(),
        "cargo build --release -p topoproxy failed: {status}"
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"));
    Ok(target.join("release/topoproxy"))
}

const GUEST_SCRIPT: &str = r#"
uptime_cs() { read up _ < /proc/uptime; echo $(( ${up%.*} * 100 + 1${up#*.} - 100 )); }
metrics() { printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc 127.0.0.1 10249 2>/dev/null; }
requests() { metrics | grep '^topoproxy_dataplane_kernel_requests_total{dataplane="ipvs"' ; }
# A fingerprint of the request counters; a failed scrape never matches the previous one.
snap() { r=$(requests); if [ -n "$r" ]; then echo "$r" | md5sum; else echo "none $(uptime_cs)"; fi; }
# Waits until the counters hold still for two seconds (a sync may still be recording).
settle() { last=""; cur=$(snap); while [ "$cur" != "$last" ]; do last=$cur; sleep 2; cur=$(snap); done; }
# The counters, retried: under load a scrape can come back empty.
grab() { for i in 1 2 3 4 5 6 7 8 9 10; do r=$(requests); [ -n "$r" ] && { echo "$r"; return; }; sleep 1; done; }
# The sum of each sync phase's seconds.
phases() { metrics | grep '^topoproxy_sync_phase_duration_seconds_sum' ; }
synced() { metrics | grep -q '^topoproxy_syncs_total{result="success"} [1-9]'; }
# `run.sh size N` runs the agent part for N Services and `run.sh restore N` the `ipvsadm -R`
# part; `unshare -n` starts each in a fresh network namespace (see the loop at the end). The
# dummy link gives the pod addresses a route: IPVS refuses real servers it cannot route.
ip link set lo up
ip link add tp-pods type dummy && ip addr add 10.255.255.254/8 dev tp-pods && ip link set tp-pods up
if [ "$1" = restore ]; then
    n=$2; out=/host/out/$n
    t0=$(uptime_cs); ipvsadm -R < /host/restore-$n.txt; rc=$?; t1=$(uptime_cs)
    echo "$rc $((t1 - t0))" > $out/restore
    ipvsadm -Ln | grep -c -- '-> [0-9]' > $out/restore-lines
    exit 0
fi
if [ "$1" != size ] && [ -n "$BATCH_SIZES" ]; then
    TOPOPROXY_IPVS_BATCH_SIZES=$BATCH_SIZES $BATCH_BENCH > /host/out/batches.txt 2>&1
    echo "exit $?" >> /host/out/batches.txt
fi
# Starts the agent over whatever IPVS holds and waits for its first successful sync; writes
# the seconds it took to $out/$1 (or why not to $out/$1-failed), the log to $out/$1.log.
start_agent() {
    t0=$(uptime_cs)
    $AGENT run --proxy-mode ipvs --source /tmp/cluster --hostname-override node-a-0 \
        --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256 \
        --min-sync-period 0 --source-poll-period 5s --sync-period ${2:-1h} > $out/$1.log 2>&1 &
    pid=$!
    while ! synced; do
        kill -0 $pid 2>/dev/null || { echo "agent exited" > $out/$1-failed; break; }
        [ $(( $(uptime_cs) - t0 )) -gt $((LIMIT * 100)) ] && { echo "no sync in time" > $out/$1-failed; break; }
        sleep 0.1
    done
    t1=$(uptime_cs)
    [ -f $out/$1-failed ] || echo $((t1 - t0)) > $out/$1
}
if [ "$1" = size ]; then
    n=$2; out=/host/out/$n
    rm -rf /tmp/cluster; cp -r /host/cluster-$n /tmp/cluster
    t0=$(uptime_cs)
    $AGENT run --proxy-mode ipvs --source /tmp/cluster --hostname-override node-a-0 \
        --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256 \
        --min-sync-period 0 --source-poll-period 5s --sync-period 1h > $out/agent.log 2>&1 &
    pid=$!
    while ! synced; do
        kill -0 $pid 2>/dev/null || { echo "agent exited" > $out/agent-failed; break; }
        [ $(( $(uptime_cs) - t0 )) -gt $((LIMIT * 100)) ] && { echo "no sync in time" > $out/agent-failed; break; }
        sleep 0.1
    done
    t1=$(uptime_cs)
    if [ ! -f $out/agent-failed ]; then
        echo $((t1 - t0)) > $out/agent-sync
        ipvsadm -Ln | grep -c -- '-> [0-9]' > $out/agent-lines
        settle
        grab > $out/requests-before
        phases > $out/phases-before
        date -u +%H:%M:%S > $out/change-at
        t0=$(uptime_cs)
        cp /host/svc-0-$n.changed /tmp/cluster/svc-0.tmp && mv /tmp/cluster/svc-0.tmp /tmp/cluster/svc-0.yaml
        # Applied when svc-0 (10.96.0.1:80) has the new address; listing one service is cheap.
        while ! ipvsadm -Ln -t 10.96.0.1:80 | grep -q '10.250.0.1:8080'; do
            [ $(( $(uptime_cs) - t0 )) -gt 60000 ] && { echo "not applied in 600 s" > $out/change-failed; break; }
            sleep 0.1
        done
        echo $(( $(uptime_cs) - t0 )) > $out/change
        settle
        grab > $out/requests-after
        phases > $out/phases-after
        # Restart over the correct table: the first sync must change nothing.
        kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
        start_agent restart
        kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
        # Restart over a table missing 10 % of its destinations (every tenth one).
        ipvsadm -Sn | awk '/^-a/ { if (++i % 10 == 0) { sub(/^-a/, "-d"); sub(/ -m.*$/, ""); print } }' > /tmp/missing.txt
        ipvsadm -R < /tmp/missing.txt
        echo $(wc -l < /tmp/missing.txt) > $out/missing-count
        start_agent restart-missing
        kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
        # A periodic re-read over the correct table: the agent again, re-reading 20 s after
        # each read ends; its second successful sync is the periodic one.
        start_agent periodic 20s
        t0=$(uptime_cs)
        until metrics | grep -q '^topoproxy_syncs_total{result="success"} [2-9]'; do
            kill -0 $pid 2>/dev/null || { echo "agent exited" > $out/periodic-failed; break; }
            [ $(( $(uptime_cs) - t0 )) -gt $((LIMIT * 100)) ] && { echo "no periodic sync in time" > $out/periodic-failed; break; }
            sleep 1
        done
    fi
    kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
    $AGENT cleanup > $out/cleanup.log 2>&1
    exit 0
fi
# Every measurement in a network namespace of its own: IPVS keeps deleted destinations in a
# per-namespace trash for 2-3 minutes and every destination added meanwhile walks all of it,
# so a run right after another one's clean-up would pay for that clean-up.
for n in $SIZES; do
    out=/host/out/$n; mkdir -p $out
    unshare -n sh /host/run.sh restore $n
    unshare -n sh /host/run.sh size $n
done
exit 0
"#;

/// Runs `vm-bench`.
pub fn vm_bench(plan: &BenchPlan) -> Result<()> {
    vm::require_tool(vm::QEMU)?;
    let agent = build_agent()?;
    let batch_bench = if plan.batches.is_empty() {
        None
    } else {
        Some(crate::util::build_release_bench("ipvs_batches")?)
    };
    for label in &plan.kernels {
        let share = vm::vm_dir().join(format!("share-bench-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&share);
        std::fs::create_dir_all(share.join("out"))?;
        let guest_agent = vm::stage_binary(&share, &agent)?;
        for &n in &plan.services {
            let dir = share.join(format!("cluster-{n}"));
            write_cluster(&dir, n)?;
            let listing = Command::new(&agent)
                .args(["plan", "--source"])
                .arg(&dir)
                .args(["--node", NODE])
                .stderr(Stdio::inherit())
                .output()
                .context("running topoproxy plan")?;
            ensure!(
                listing.status.success(),
                "topoproxy plan failed: {}",
                listing.status
            );
            let restore = listing_to_restore(&String::from_utf8_lossy(&listing.stdout));
            let destinations = restore.lines().filter(|l| l.starts_with("-a ")).count();
            ensure!(
                destinations == n * ENDPOINTS,
                "the plan for {n} services has {destinations} real servers, expected {}",
                n * ENDPOINTS
            );
            std::fs::write(share.join(format!("restore-{n}.txt")), restore)?;
        }
        let sizes: Vec<String> = plan.services.iter().map(usize::to_string).collect();
        let batch_sizes: Vec<String> = plan.batches.iter().map(usize::to_string).collect();
        let guest_bench = match &batch_bench {
            Some(path) => vm::stage_binary(&share, path)?,
            None => String::new(),
        };
        let script = format!(
            "#!/bin/sh\nexport LD_LIBRARY_PATH=/host/lib\nexport PATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
             SIZES='{}'\nAGENT={guest_agent}\nLIMIT={}\nBATCH_SIZES='{}'\nBATCH_BENCH={guest_bench}\n{GUEST_SCRIPT}",
            sizes.join(" "),
            plan.timeout.as_secs() / (2 * plan.services.len().max(1)) as u64,
            batch_sizes.join(",")
        );
        std::fs::write(share.join("run.sh"), script)?;
        let options = vm::VmOptions {
            memory_mib: plan.memory_mib,
            read_only_shares: Vec::new(),
            user_network: false,
            tap: None,
        };
        let outcome = vm::run_in_vm_with(label, &share, plan.timeout, &options);
        if let Err(e) = &outcome {
            println!("vm-bench {label}: the VM failed: {e:#}");
        }
        if let Ok(text) = std::fs::read_to_string(share.join("out/batches.txt")) {
            for line in text.lines() {
                println!("vm-bench {label} {line}");
            }
        }
        report(label, &share, &plan.services);
        if outcome.is_ok() {
            let _ = std::fs::remove_dir_all(&share);
        } else {
            println!("vm-bench {label}: share kept: {}", share.display());
        }
    }
    Ok(())
}

/// The `elapsed` of the agent's "initial sync done" log line, in seconds.
/// `vm-bench --vs-kube-proxy`: the `side_by_side` test of `vm_k8s_parity` in the VM (the
/// control plane on the host, kube-proxy staged), with the agent's release build and the
/// Service counts it reads; it prints the table of docs/benchmarks.md.
pub fn vs_kube_proxy(
    kernels: &[String],
    services: &[usize],
    timeout: Duration,
    memory_mib: u32,
) -> Result<()> {
    let agent = build_agent()?;
    let sizes: Vec<String> = services.iter().map(usize::to_string).collect();
    crate::vmtest::vm_test(&crate::vmtest::VmTestPlan {
        kernels: kernels.to_vec(),
        tests: vec!["vm_k8s_parity".to_owned()],
        args: vec![
            "--exact".to_owned(),
            "side_by_side".to_owned(),
            "--nocapture".to_owned(),
        ],
        timeout,
        memory_mib,
        agent: Some(agent),
        env: vec![(
            "TOPOPROXY_VS_KUBE_PROXY_SERVICES".to_owned(),
            sizes.join(","),
        )],
    })
}

fn initial_sync_seconds(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("initial sync done"))?;
    let value = line.split("elapsed=").nth(1)?.split_whitespace().next()?;
    let (number, unit) = value.split_at(value.find(|c: char| c.is_ascii_alphabetic())?);
    let number: f64 = number.parse().ok()?;
    match unit {
        "s" => Some(number),
        "ms" => Some(number / 1e3),
        "µs" | "us" => Some(number / 1e6),
        "ns" => Some(number / 1e9),
        _ => None,
    }
}

fn report(label: &str, share: &Path, sizes: &[usize]) {
    let read = |n: usize, name: &str| {
        std::fs::read_to_string(share.join(format!("out/{n}/{name}")))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    let seconds = |cs: Option<String>| cs.and_then(|s| s.parse::<f64>().ok()).map(|cs| cs / 100.0);
    for &n in sizes {
        let restore = read(n, "restore");
        let (rc, restore_s) = match restore.as_deref().and_then(|s| s.split_once(' ')) {
            Some((rc, cs)) => (rc.to_owned(), cs.parse::<f64>().ok().map(|cs| cs / 100.0)),
            None => ("?".to_owned(), None),
        };
        println!(
            "vm-bench {label} services={n} real_servers={} ipvsadm_R_s={} (exit {rc}, {} real servers listed)",
            n * ENDPOINTS,
            restore_s.map_or("?".into(), |s| format!("{s:.2}")),
            read(n, "restore-lines").unwrap_or_else(|| "?".into())
        );
        if let Some(why) = read(n, "agent-failed") {
            let log = read(n, "agent.log").unwrap_or_default();
            println!(
                "vm-bench {label} services={n} agent: FAILED ({why}); log tail:\n{}",
                crate::util::tail(&log, 10)
            );
            continue;
        }
        let sync = seconds(read(n, "agent-sync"));
        let ratio = match (sync, restore_s) {
            (Some(a), Some(r)) if r > 0.0 => format!("{:.2}", a / r),
            _ => "?".into(),
        };
        println!(
            "vm-bench {label} services={n} agent_first_sync_s={} ({} real servers listed) agent/ipvsadm_R={ratio}",
            sync.map_or("?".into(), |s| format!("{s:.2}")),
            read(n, "agent-lines").unwrap_or_else(|| "?".into())
        );
        // The agent's own account of programming the table, without process start and
        // loading the YAML (which software emulation makes slow): its first sync's duration.
        let programming = read(n, "agent.log").and_then(|log| initial_sync_seconds(&log));
        if let Some(log) = read(n, "agent.log") {
            for line in log.lines().filter(|l| l.contains("slow IPVS ")) {
                println!("vm-bench {label} services={n} agent log: {}", line.trim());
            }
        }
        if let Some(programming) = programming {
            let ratio = restore_s
                .filter(|r| *r > 0.0)
                .map_or("?".into(), |r| format!("{:.2}", programming / r));
            println!(
                "vm-bench {label} services={n} agent_programming_s={programming:.2} (plan, diff and apply of the first sync) agent_programming/ipvsadm_R={ratio}"
            );
        }
        let parse = |text: Option<String>| -> Vec<(String, f64)> {
            text.unwrap_or_default()
                .lines()
                .filter_map(|line| {
                    let kind = line.split("kind=\"").nth(1)?.split('"').next()?.to_owned();
                    let value = line.rsplit(' ').next()?.parse().ok()?;
                    Some((kind, value))
                })
                .collect()
        };
        if read(n, "requests-before").unwrap_or_default().is_empty()
            || read(n, "requests-after").unwrap_or_default().is_empty()
        {
            println!("vm-bench {label} services={n} one_endpoint_change: FAILED (no request counters scraped from /metrics)");
            continue;
        }
        for (name, what) in [
            ("restart", "restart over the correct table"),
            (
                "restart-missing",
                "restart over a table missing destinations",
            ),
        ] {
            let log = read(n, &format!("{name}.log")).unwrap_or_default();
            let changes = log
                .lines()
                .find(|l| l.contains("initial sync done"))
                .and_then(|l| l.split("changes=").nth(1))
                .and_then(|v| v.split_whitespace().next())
                .unwrap_or("?")
                .to_owned();
            let missing = if name == "restart-missing" {
                format!(
                    " ({} destinations deleted first)",
                    read(n, "missing-count").unwrap_or_else(|| "?".into())
                )
            } else {
                String::new()
            };
            match read(n, &format!("{name}-failed")) {
                Some(why) => println!("vm-bench {label} services={n} {what}: FAILED ({why})"),
                None => println!(
                    "vm-bench {label} services={n} {what}{missing}: first sync after {} s, {changes} changes, programming {} s",
                    seconds(read(n, name)).map_or("?".into(), |s| format!("{s:.2}")),
                    initial_sync_seconds(&log).map_or("?".into(), |s| format!("{s:.2}"))
                ),
            }
            for line in log.lines().filter(|l| l.contains("slow IPVS ")) {
                println!(
                    "vm-bench {label} services={n} {name} agent log: {}",
                    line.trim()
                );
            }
        }
        report_periodic_read(
            label,
            n,
            read(n, "periodic.log"),
            read(n, "periodic-failed"),
        );
        report_change_phases(label, n, &read);
        let before = parse(read(n, "requests-before"));
        let after = parse(read(n, "requests-after"));
        let mut deltas = Vec::new();
        let mut total = 0.0;
        for (kind, value) in &after {
            let old = before
                .iter()
                .find(|(k, _)| k == kind)
                .map_or(0.0, |(_, v)| *v);
            if value - old > 0.0 {
                deltas.push(format!("{kind}={}", value - old));
                total += value - old;
            }
        }
        println!(
            "vm-bench {label} services={n} one_endpoint_change: {total} netlink requests ({}), in IPVS after {} s{}",
            if deltas.is_empty() { "none".to_owned() } else { deltas.join(", ") },
            seconds(read(n, "change")).map_or("?".into(), |s| format!("{s:.1}")),
            read(n, "change-failed").map_or(String::new(), |why| format!(" (FAILED: {why})"))
        );
    }
}

/// Where the endpoint change's time went: the source's reloads (its `slow source reload`
/// lines: the initial load, then the change) with the wall time the change was made, and the
/// seconds each sync phase added meanwhile.
fn report_change_phases(label: &str, n: usize, read: &dyn Fn(usize, &str) -> Option<String>) {
    let log = read(n, "agent.log").unwrap_or_default();
    let changed_at = read(n, "change-at").unwrap_or_else(|| "?".into());
    for line in log.lines().filter(|l| l.contains("slow source reload")) {
        println!(
            "vm-bench {label} services={n} source reload (change made at {changed_at}): {}",
            line.trim()
        );
    }
    let sums = |name: &str| -> Vec<(String, f64)> {
        read(n, name)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let phase = line.split("phase=\"").nth(1)?.split('"').next()?.to_owned();
                Some((phase, line.rsplit(' ').next()?.parse().ok()?))
            })
            .collect()
    };
    let before = sums("phases-before");
    let deltas: Vec<String> = sums("phases-after")
        .iter()
        .map(|(phase, after)| {
            let old = before
                .iter()
                .find(|(p, _)| p == phase)
                .map_or(0.0, |(_, v)| *v);
            format!("{phase}={:.3}s", after - old)
        })
        .collect();
    println!(
        "vm-bench {label} services={n} one_endpoint_change sync phases: {}",
        if deltas.is_empty() {
            "?".to_owned()
        } else {
            deltas.join(" ")
        }
    );
}

/// The periodic re-read: the agent's second `slow IPVS read` line (its first is the read at
/// start). A read under a second logs no line.
fn report_periodic_read(label: &str, n: usize, log: Option<String>, failed: Option<String>) {
    if let Some(why) = failed {
        println!("vm-bench {label} services={n} periodic re-read: FAILED ({why})");
        return;
    }
    let log = log.unwrap_or_default();
    let line = periodic_read_line(&log).unwrap_or("under 1 s (no slow-read line)");
    println!("vm-bench {label} services={n} periodic re-read over the correct table: {line}");
}

fn periodic_read_line(log: &str) -> Option<&str> {
    let line = log
        .lines()
        .filter(|l| l.contains("slow IPVS read"))
        .nth(1)?;
    Some(line.split("slow IPVS read").nth(1).unwrap_or(line).trim())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_periodic_read_is_the_second_slow_read() {
        let log = "a slow IPVS read items=10 took=\"9s\"\nb slow IPVS apply\nc slow IPVS read items=10 took=\"2s\" phases=\"nft=0.01s\"\n";
        assert_eq!(
            super::periodic_read_line(log),
            Some("items=10 took=\"2s\" phases=\"nft=0.01s\"")
        );
        assert_eq!(
            super::periodic_read_line("a slow IPVS read items=1\n"),
            None
        );
    }

    #[test]
    fn reads_the_agents_initial_sync_duration() {
        let log = "2026-11-22T08:17:05Z  INFO topoproxy::sync: initial sync done virtual_servers=2 changes=6 elapsed=1.817740492s\n";
        assert_eq!(super::initial_sync_seconds(log), Some(1.817740492));
        let log = "x initial sync done virtual_servers=2 changes=6 elapsed=250.5ms\n";
        assert_eq!(super::initial_sync_seconds(log), Some(0.2505));
        assert_eq!(super::initial_sync_seconds("no such line"), None);
    }
}
