//! `topoproxy cleanup`: what a node keeps of a proxy after it stops, removed on request —
//! topoproxy's own IPVS or eBPF state, kube-proxy's leftovers, or both. The binary parses the
//! command line and prints [`CleanupSummary::lines`]; everything else is here.

use std::ops::RangeInclusive;
use std::path::PathBuf;

use crate::config::{self, ConfigError, NodeNameFallbacks, RunOptions};
use crate::dataplane::ebpf::{self, EbpfError, EbpfSettings};
use crate::dataplane::ipvs::cleanup::{self as ipvs_cleanup, CleanupScope};

/// Which dataplane's state to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanupMode {
    Ipvs,
    Ebpf,
}

/// One `topoproxy cleanup` invocation.
#[derive(Debug, Clone)]
pub struct CleanupRequest {
    pub mode: CleanupMode,
    pub scope: CleanupScope,
    /// `--ipvs-exclude-cidrs`, as the agent takes it.
    pub exclude_cidrs: Option<String>,
    pub pin_dir: PathBuf,
    /// kube-proxy's NodePort range, whose iptables leftovers are recognised by port.
    pub node_port_range: RangeInclusive<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeCleanupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cleaning up eBPF mode")]
    Ebpf(#[source] EbpfError),
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cleaning up IPVS mode")]
    Ipvs(#[source] ipvs_cleanup::CleanupError),
}

/// What was removed, as the lines the command prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupSummary {
    pub lines: Vec<String>,
}

/// `30000-32767`.
pub fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let (low, high) = text.split_once('-')?;
    let (low, high) = (low.trim().parse().ok()?, high.trim().parse().ok()?);
    (low <= high).then_some(low..=high)
}

/// In eBPF mode, kube-proxy's leftovers are still IPVS state: only those are removed there.
fn ipvs_scope(mode: CleanupMode, scope: CleanupScope) -> Option<CleanupScope> {
    match mode {
        CleanupMode::Ipvs => Some(scope),
        CleanupMode::Ebpf => (scope != CleanupScope::Ours).then_some(CleanupScope::KubeProxyOnly),
    }
}

pub fn run(request: CleanupRequest) -> Result<CleanupSummary, NodeCleanupError> {
    let options = RunOptions {
        ipvs_exclude_cidrs: request.exclude_cidrs.clone(),
        hostname_override: Some("cleanup".to_owned()),
        ..RunOptions::default()
    };
    let no_fallbacks = NodeNameFallbacks {
        env: None,
        hostname: None,
    };
    let settings = config::resolve(options, RunOptions::default(), no_fallbacks)?;
    let mut summary = CleanupSummary::default();
    if request.mode == CleanupMode::Ebpf && request.scope != CleanupScope::KubeProxyOnly {
        remove_ebpf(&request, &mut summary)?;
    }
    if let Some(scope) = ipvs_scope(request.mode, request.scope) {
        remove_ipvs(&settings, scope, request.node_port_range, &mut summary)?;
    }
    Ok(summary)
}

fn remove_ebpf(
    request: &CleanupRequest,
    summary: &mut CleanupSummary,
) -> Result<(), NodeCleanupError> {
    let report = ebpf::cleanup(&EbpfSettings {
        pin_dir: request.pin_dir.clone(),
        ..EbpfSettings::default()
    })
    .map_err(NodeCleanupError::Ebpf)?;
    summary.lines.push(format!(
        "detached {} program(s), unpinned {} object(s)",
        report.detached, report.unpinned
    ));
    if let Some((min, max)) = report.released_snat_ports {
        summary.lines.push(format!(
            "took the SNAT ports {min}-{max} out of net.ipv4.ip_local_reserved_ports"
        ));
    }
    let filters = ebpf::north_south::detach_netlink_filters();
    if filters > 0 {
        summary
            .lines
            .push(format!("removed {filters} north-south tc filter(s)"));
    }
    Ok(())
}

fn remove_ipvs(
    settings: &config::RunSettings,
    scope: CleanupScope,
    node_port_range: RangeInclusive<u16>,
    summary: &mut CleanupSummary,
) -> Result<(), NodeCleanupError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NodeCleanupError::Runtime)?;
    let report = runtime
        .block_on(ipvs_cleanup::cleanup(
            &settings.ipvs,
            scope,
            node_port_range,
        ))
        .map_err(NodeCleanupError::Ipvs)?;
    let link = if report.link_deleted {
        format!(", the {} link", settings.ipvs.link_name)
    } else {
        String::new()
    };
    let table = if report.nft_table_deleted {
        ", the nftables table inet topoproxy"
    } else {
        ""
    };
    let kube_proxy = if scope != CleanupScope::Ours {
        format!(
            ", {} kube-proxy iptables chain(s), {} ipset(s)",
            report.iptables_chains_deleted, report.ipsets_destroyed
        )
    } else {
        String::new()
    };
    summary.lines.push(format!(
        "removed {} IPVS service(s), {} address(es){link}{table}{kube_proxy}",
        report.services_deleted, report.addresses_removed
    ));
    summary
        .lines
        .extend(report.notes.into_iter().map(|note| format!("note: {note}")));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_low_to_high() {
        assert_eq!(parse_port_range("30000-32767"), Some(30000..=32767));
        assert_eq!(parse_port_range(" 80 - 80 "), Some(80..=80));
        assert_eq!(parse_port_range("32767-30000"), None);
        assert_eq!(parse_port_range("30000"), None);
        assert_eq!(parse_port_range("a-b"), None);
    }

    #[test]
    fn ebpf_mode_removes_only_kube_proxys_ipvs_leftovers() {
        use CleanupScope::*;
        assert_eq!(ipvs_scope(CleanupMode::Ebpf, Ours), None);
        assert_eq!(
            ipvs_scope(CleanupMode::Ebpf, OursAndKubeProxy),
            Some(KubeProxyOnly)
        );
        assert_eq!(
            ipvs_scope(CleanupMode::Ebpf, KubeProxyOnly),
            Some(KubeProxyOnly)
        );
        assert_eq!(
            ipvs_scope(CleanupMode::Ipvs, OursAndKubeProxy),
            Some(OursAndKubeProxy)
        );
    }
}
