//! Measurements for `cargo xtask vm-bench --vs-kube-proxy` (the `side_by_side` test of
//! `tests/vm_k8s_parity.rs`): what an agent process costs and how far its IPVS table is, read
//! from inside its node's network namespace.
//!
//! Include beside `support/netns.rs` and `support/http.rs` (`cluster::http` through
//! `use cluster::http;` where `cluster.rs` is included).

#![allow(dead_code)]

use std::net::SocketAddr;

use crate::netns::within;

/// The real servers in a namespace's IPVS table whose address starts with `prefix`
/// (`/proc/net/ip_vs` of the thread's namespace: no `ipvsadm` process per poll). Counts right
/// only while no other namespace holds IPVS services: the kernel's listing then skips some of
/// this one's (docs/testing.md).
pub fn real_servers_with(netns: &str, prefix: &'static str) -> usize {
    within(netns, move || {
        let text = std::fs::read_to_string("/proc/thread-self/net/ip_vs").unwrap_or_default();
        count_real_servers(&text, prefix)
    })
}

/// Counts `  -> ADDR:PORT` lines of a `/proc/net/ip_vs` listing whose address (hex, as the
/// kernel prints it) starts with `prefix`.
pub fn count_real_servers(listing: &str, prefix: &str) -> usize {
    listing
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("-> "))
        .filter(|rest| rest.starts_with(prefix))
        .count()
}

/// `GET path` on `address` from inside `netns`; the body, or `None` while nothing answers.
pub fn http_get_in(netns: &str, address: SocketAddr, path: &str) -> Option<String> {
    within(netns, move || crate::http::http_get(address, path))
}

/// Resident set size (`VmRSS`) and its peak (`VmHWM`) of `pid`, in MiB.
pub fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU seconds (user + system) `pid` has used.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// The `q`-quantile (0..=1) of `samples` by nearest rank; `None` when there are none.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// What one agent cost for one table size.
#[derive(Debug, Clone, Default)]
pub struct AgentCost {
    /// Start → every real server of the table in IPVS.
    pub table_seconds: f64,
    /// Start → the agent's metrics report a first successful sync.
    pub first_sync_seconds: f64,
    /// One endpoint change → the new address in IPVS, per change.
    pub change_seconds: Vec<f64>,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
}

/// The README's table rows for one size: metric, kube-proxy, topoproxy, ratio.
pub fn rows(services: usize, kube_proxy: &AgentCost, topoproxy: &AgentCost) -> Vec<String> {
    let p = |cost: &AgentCost, q: f64| quantile(&cost.change_seconds, q).unwrap_or(f64::NAN);
    let metrics: [(&str, f64, f64, &str); 7] = [
        (
            "start → whole table in IPVS",
            kube_proxy.table_seconds,
            topoproxy.table_seconds,
            "s",
        ),
        (
            "start → first sync reported",
            kube_proxy.first_sync_seconds,
            topoproxy.first_sync_seconds,
            "s",
        ),
        (
            "endpoint change → IPVS, p50",
            p(kube_proxy, 0.5),
            p(topoproxy, 0.5),
            "s",
        ),
        (
            "endpoint change → IPVS, p99",
            p(kube_proxy, 0.99),
            p(topoproxy, 0.99),
            "s",
        ),
        (
            "RSS after the changes",
            kube_proxy.rss_mib,
            topoproxy.rss_mib,
            "MiB",
        ),
        (
            "peak RSS",
            kube_proxy.peak_rss_mib,
            topoproxy.peak_rss_mib,
            "MiB",
        ),
        (
            "CPU seconds, start to end",
            kube_proxy.cpu_seconds,
            topoproxy.cpu_seconds,
            "s",
        ),
    ];
    metrics
        .iter()
        .map(|(what, kp, tp, unit)| {
            format!(
                "| {services} | {what} | {kp:.2} {unit} | {tp:.2} {unit} | {:.2} |",
                tp / kp
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_servers_are_counted_by_address_prefix() {
        let listing = "IP Virtual Server version 1.2.1 (size=4096)\n\
            Prot LocalAddress:Port Scheduler Flags\n\
              -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n\
            TCP  0A600001:0050 rr\n\
              -> 0A800001:1F90      Masq    1      0          0\n\
              -> 0A800002:1F90      Masq    1      0          0\n\
              -> 0A000202:192B      Masq    1      0          0\n";
        assert_eq!(count_real_servers(listing, "0A8"), 2);
        assert_eq!(count_real_servers(listing, "0A"), 3);
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let samples: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&samples, 0.5), Some(10.0));
        assert_eq!(quantile(&samples, 0.99), Some(20.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
