//! `topoproxy cleanup` in IPVS mode: remove exactly what topoproxy owns and, for a migration,
//! what kube-proxy's IPVS mode left behind.
//!
//! Ours: the IPVS services recorded in our nft table, their VIPs on `kube-ipvs0` (and the link
//! once nothing else is bound on it), and the nft table itself. kube-proxy's (with
//! `--kube-proxy`): the IPVS services on `kube-ipvs0` addresses and on node addresses within the
//! NodePort range, the link, its iptables chains and its ipsets. Anything inside
//! `--ipvs-exclude-cidrs`, and every other IPVS service, is left alone.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::process::{Command as Process, Stdio};

use super::kernel::{IpvsKernel, RealKernel};
use super::link::{DummyLink, LinkError};
use super::netlink::{Command, IpvsClient, IpvsError, ServiceId};
use super::nft::{Nft, NftError};
use super::IpvsSettings;
use crate::table::VsKey;
use ipnetwork::IpNetwork;

/// kube-proxy's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// Chains kube-proxy creates (IPVS mode, plus the iptables-mode per-service prefixes a node may
/// carry from before). Chains the kubelet owns (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`) are not
/// here.
const KUBE_PROXY_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-POSTROUTING",
    "KUBE-NODE-PORT",
    "KUBE-NODEPORTS",
    "KUBE-LOAD-BALANCER",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
    "KUBE-PROXY-CANARY",
    "KUBE-EXTERNAL-SERVICES",
];
const KUBE_PROXY_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-XLB-",
    "KUBE-EXT-",
    "KUBE-SVL-",
];

/// Why clean-up stopped.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("talking to IPVS")]
    Ipvs(#[from] IpvsError),
    #[error("reading or deleting topoproxy's nftables table")]
    Nft(#[from] NftError),
    #[error("changing the {name} link")]
    Link {
        name: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("deleting IPVS service {service}")]
    DeleteService {
        service: String,
        #[source]
        source: IpvsError,
    },
    #[error("running {program}")]
    Tool {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    ToolFailed { program: String, stderr: String },
}

/// What clean-up removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    pub services_deleted: usize,
    pub addresses_removed: usize,
    pub link_deleted: bool,
    pub nft_table_deleted: bool,
    pub iptables_chains_deleted: usize,
    pub ipsets_destroyed: usize,
    /// Things that could not be checked, e.g. a missing tool.
    pub notes: Vec<String>,
}

fn link_error(settings: &IpvsSettings) -> impl Fn(LinkError) -> CleanupError + '_ {
    move |source| CleanupError::Link {
        name: settings.link_name.clone(),
        source: Box::new(source),
    }
}

/// What `cleanup` removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanupScope {
    /// Exactly what topoproxy owns.
    Ours,
    /// What topoproxy owns and kube-proxy's IPVS-mode leftovers.
    OursAndKubeProxy,
    /// Only kube-proxy's leftovers, keeping everything topoproxy owns: safe on a node that
    /// topoproxy already serves.
    KubeProxyOnly,
}

impl CleanupScope {
    fn ours(self) -> bool {
        !matches!(self, Self::KubeProxyOnly)
    }

    fn kube_proxy(self) -> bool {
        !matches!(self, Self::Ours)
    }
}

/// Removes what `scope` names.
pub async fn cleanup(
    settings: &IpvsSettings,
    scope: CleanupScope,
    node_port_range: RangeInclusive<u16>,
) -> Result<CleanupReport, CleanupError> {
    let nft = Nft::new()?;
    let ipvs = IpvsClient::connect()?;
    let link = DummyLink::find(&settings.link_name)
        .await
        .map_err(link_error(settings))?;
    let mut kernel = RealKernel::existing(ipvs, link, nft);
    let mut report = clean_kernel(&mut kernel, settings, scope, &node_port_range).await?;
    if scope.kube_proxy() {
        let (chains, notes) = remove_kube_proxy_iptables()?;
        report.iptables_chains_deleted = chains;
        report.notes.extend(notes);
        let (sets, notes) = destroy_kube_proxy_ipsets()?;
        report.ipsets_destroyed = sets;
        report.notes.extend(notes);
    }
    Ok(report)
}

/// The kernel's part of clean-up: the IPVS services `scope` names, then the link's addresses
/// (or the link), then, with topoproxy's own state in scope, its nft table. kube-proxy's
/// iptables chains and ipsets are the caller's.
async fn clean_kernel<K: IpvsKernel>(
    kernel: &mut K,
    settings: &IpvsSettings,
    scope: CleanupScope,
    node_port_range: &RangeInclusive<u16>,
) -> Result<CleanupReport, CleanupError> {
    let mut report = CleanupReport::default();
    let owned = kernel.nft_read()?.unwrap_or_default().state;
    let link_addresses = if kernel.has_link() {
        kernel
            .link_addresses()
            .await
            .map_err(link_error(settings))?
    } else {
        BTreeSet::new()
    };
    let node_addresses = kernel
        .addresses_elsewhere()
        .await
        .map_err(link_error(settings))?;
    let owned_keys: BTreeSet<VsKey> = owned.services.keys().copied().collect();
    let present: Vec<ServiceId> = kernel.dump_services()?.into_iter().map(|s| s.id).collect();
    let doomed = doomed_services(
        &present,
        &Owners {
            scope,
            owned: &owned_keys,
            link_addresses: &link_addresses,
            node_addresses: &node_addresses,
            exclude_cidrs: &settings.exclude_cidrs,
            node_port_range,
        },
    );
    report.services_deleted = delete_services(kernel, &doomed)?;

    let ours: BTreeSet<IpAddr> = owned.services.keys().map(|key| key.address).collect();
    if kernel.has_link() {
        remove_addresses(kernel, settings, scope, &link_addresses, &ours, &mut report).await?;
    }
    if scope.ours() && kernel.nft_exists()? {
        kernel.nft_delete()?;
        report.nft_table_deleted = true;
    }
    Ok(report)
}

/// Deletes `doomed` in one batch; returns how many went. One already gone (another writer,
/// or the kernel's own clean-up) is not an error: the kernel answers `ESRCH` for a missing
/// service.
fn delete_services<K: IpvsKernel>(
    kernel: &mut K,
    doomed: &[ServiceId],
) -> Result<usize, CleanupError> {
    let commands: Vec<Command> = doomed.iter().map(|id| Command::DelService(*id)).collect();
    let mut deleted = 0;
    for (id, result) in doomed.iter().zip(kernel.execute(&commands)) {
        match result {
            Ok(()) => deleted += 1,
            Err(source) if matches!(source.errno(), Some(libc::ESRCH | libc::ENOENT)) => {}
            Err(source) => {
                return Err(CleanupError::DeleteService {
                    service: format!(
                        "{} {}",
                        id.protocol,
                        std::net::SocketAddr::new(id.address, id.port)
                    ),
                    source,
                })
            }
        }
    }
    Ok(deleted)
}

/// What tells the IPVS services to remove from the others.
struct Owners<'a> {
    scope: CleanupScope,
    /// The services topoproxy's nft sets record as its own.
    owned: &'a BTreeSet<VsKey>,
    /// Addresses on `kube-ipvs0`: kube-proxy's ClusterIPs, externalIPs and LB IPs.
    link_addresses: &'a BTreeSet<IpAddr>,
    /// The node's addresses on other links: where kube-proxy's NodePorts listen.
    node_addresses: &'a BTreeSet<IpAddr>,
    exclude_cidrs: &'a [IpNetwork],
    node_port_range: &'a RangeInclusive<u16>,
}

/// The services to delete: topoproxy's own (by its records) when the scope has them, and
/// kube-proxy's when it has those — a service on a `kube-ipvs0` address, or on a node address
/// with a port in the NodePort range, that topoproxy does not own. Nothing inside the
/// excluded CIDRs, ever.
fn doomed_services(present: &[ServiceId], owners: &Owners<'_>) -> Vec<ServiceId> {
    present
        .iter()
        .filter(|id| {
            let key = VsKey::new(id.protocol, id.address, id.port);
            if owners
                .exclude_cidrs
                .iter()
                .any(|cidr| cidr.contains(key.address))
            {
                return false;
            }
            let ours = owners.owned.contains(&key);
            let kube_proxys = owners.scope.kube_proxy()
                && !ours
                && (owners.link_addresses.contains(&key.address)
                    || (owners.node_addresses.contains(&key.address)
                        && owners.node_port_range.contains(&key.port)));
            (ours && owners.scope.ours()) || kube_proxys
        })
        .copied()
        .collect()
}

/// The link's addresses: with topoproxy's own state in scope, the whole link when nothing
/// else is left on it, else its own addresses (and kube-proxy's when in scope); with
/// kube-proxy's only, the addresses none of topoproxy's services use (it keeps serving).
async fn remove_addresses<K: IpvsKernel>(
    kernel: &mut K,
    settings: &IpvsSettings,
    scope: CleanupScope,
    link_addresses: &BTreeSet<IpAddr>,
    ours: &BTreeSet<IpAddr>,
    report: &mut CleanupReport,
) -> Result<(), CleanupError> {
    if !scope.ours() {
        for address in link_addresses.iter().filter(|a| !ours.contains(a)) {
            kernel
                .delete_address(*address)
                .await
                .map_err(link_error(settings))?;
            report.addresses_removed += 1;
        }
        return Ok(());
    }
    let kube_proxy = scope.kube_proxy();
    let remaining = link_addresses
        .iter()
        .filter(|address| !kube_proxy && !ours.contains(address))
        .count();
    if remaining == 0 {
        report.addresses_removed = link_addresses.len();
        kernel.delete_link().await.map_err(link_error(settings))?;
        report.link_deleted = true;
        return Ok(());
    }
    for address in link_addresses.iter().filter(|a| ours.contains(a)) {
        kernel
            .delete_address(*address)
            .await
            .map_err(link_error(settings))?;
        report.addresses_removed += 1;
    }
    report.notes.push(format!(
        "{} keeps {remaining} address(es) topoproxy does not own (use --kube-proxy to remove kube-proxy's)",
        settings.link_name,
    ));
    Ok(())
}

fn is_kube_proxy_chain(name: &str) -> bool {
    KUBE_PROXY_CHAINS.contains(&name)
        || KUBE_PROXY_CHAIN_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// The `iptables-restore --noflush` script that removes kube-proxy's chains from an
/// `iptables-save` dump: jumps to them from other chains first, then their rules, then the
/// chains. `None` when there is nothing to remove. Also returns how many chains go.
pub fn iptables_cleanup_script(save: &str) -> Option<(String, usize)> {
    let mut script = String::new();
    let mut total = 0;
    let mut table: Option<&str> = None;
    let mut chains: Vec<&str> = Vec::new();
    let mut jumps: Vec<&str> = Vec::new();
    let mut flush = |table: Option<&str>, chains: &mut Vec<&str>, jumps: &mut Vec<&str>| {
        if let Some(table) = table {
            if !chains.is_empty() {
                script.push_str(&format!("*{table}\n"));
                for rule in jumps.iter() {
                    script.push_str(&format!("-D {rule}\n"));
                }
                for chain in chains.iter() {
                    script.push_str(&format!("-F {chain}\n"));
                }
                for chain in chains.iter() {
                    script.push_str(&format!("-X {chain}\n"));
                }
                script.push_str("COMMIT\n");
                total += chains.len();
            }
        }
        chains.clear();
        jumps.clear();
    };
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            flush(table, &mut chains, &mut jumps);
            table = Some(name.trim());
        } else if let Some(declaration) = line.strip_prefix(':') {
            if let Some(name) = declaration.split_whitespace().next() {
                if is_kube_proxy_chain(name) {
                    chains.push(name);
                }
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let mut words = rule.split_whitespace();
            let mut target = None;
            while let Some(word) = words.next() {
                if word == "-j" || word == "-g" {
                    target = words.next();
                }
            }
            if !is_kube_proxy_chain(chain) && target.is_some_and(is_kube_proxy_chain) {
                jumps.push(rule);
            }
        } else if line.trim() == "COMMIT" {
            flush(table, &mut chains, &mut jumps);
            table = None;
        }
    }
    flush(table, &mut chains, &mut jumps);
    (total > 0).then_some((script, total))
}

fn tool(program: &str) -> Option<std::path::PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|path| path.is_file())
}

fn run_tool(
    program: &std::path::Path,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, CleanupError> {
    use std::io::Write as _;
    let name = program.display().to_string();
    let mut child = Process::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CleanupError::Tool {
            program: name.clone(),
            source,
        })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input.as_bytes())
            .map_err(|source| CleanupError::Tool {
                program: name.clone(),
                source,
            })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| CleanupError::Tool {
            program: name.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(CleanupError::ToolFailed {
            program: name,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn remove_kube_proxy_iptables() -> Result<(usize, Vec<String>), CleanupError> {
    let mut removed = 0;
    let mut notes = Vec::new();
    for (save, restore) in [
        ("iptables-save", "iptables-restore"),
        ("ip6tables-save", "ip6tables-restore"),
    ] {
        let (Some(save), Some(restore)) = (tool(save), tool(restore)) else {
            notes.push(format!(
                "{save} not found: kube-proxy's iptables chains were not checked"
            ));
            continue;
        };
        let dump = run_tool(&save, &[], None)?;
        if let Some((script, chains)) = iptables_cleanup_script(&dump) {
            run_tool(&restore, &["--noflush"], Some(&script))?;
            removed += chains;
        }
    }
    Ok((removed, notes))
}

fn destroy_kube_proxy_ipsets() -> Result<(usize, Vec<String>), CleanupError> {
    let Some(ipset) = tool("ipset") else {
        return Ok((
            0,
            vec!["ipset not found: kube-proxy's ipsets were not checked".to_owned()],
        ));
    };
    let names = run_tool(&ipset, &["list", "-n"], None)?;
    let mut destroyed = 0;
    for name in names
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with("KUBE-"))
    {
        run_tool(&ipset, &["destroy", name], None)?;
        destroyed += 1;
    }
    Ok((destroyed, Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn id(address: &str, port: u16) -> ServiceId {
        ServiceId {
            protocol: Protocol::Tcp,
            address: address.parse().unwrap(),
            port,
        }
    }

    fn addresses(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    /// One of each: topoproxy's ClusterIP, kube-proxy's ClusterIP on kube-ipvs0, kube-proxy's
    /// NodePort, a foreign service on a node address outside the NodePort range, one on an
    /// unrelated address, and a kube-proxy-looking one inside an excluded CIDR.
    fn doomed_in(scope: CleanupScope) -> Vec<ServiceId> {
        let present = [
            id("10.96.0.1", 443),
            id("10.96.0.2", 80),
            id("192.168.1.2", 30080),
            id("192.168.1.2", 8080),
            id("172.16.0.9", 80),
            id("10.200.0.5", 80),
        ];
        let owned: BTreeSet<VsKey> = [VsKey::new(Protocol::Tcp, "10.96.0.1".parse().unwrap(), 443)]
            .into_iter()
            .collect();
        let link = addresses(&["10.96.0.1", "10.96.0.2", "10.200.0.5"]);
        let node = addresses(&["192.168.1.2"]);
        let excluded = ["10.200.0.0/16".parse().unwrap()];
        doomed_services(
            &present,
            &Owners {
                scope,
                owned: &owned,
                link_addresses: &link,
                node_addresses: &node,
                exclude_cidrs: &excluded,
                node_port_range: &(30000..=32767),
            },
        )
    }

    #[test]
    fn cleanup_removes_what_its_scope_names_and_never_a_foreign_or_excluded_service() {
        assert_eq!(doomed_in(CleanupScope::Ours), [id("10.96.0.1", 443)]);
        assert_eq!(
            doomed_in(CleanupScope::KubeProxyOnly),
            [id("10.96.0.2", 80), id("192.168.1.2", 30080)]
        );
        assert_eq!(
            doomed_in(CleanupScope::OursAndKubeProxy),
            [
                id("10.96.0.1", 443),
                id("10.96.0.2", 80),
                id("192.168.1.2", 30080)
            ]
        );
    }

    /// Trimmed from `iptables-save` on a node running kube-proxy in IPVS mode.
    const SAVE: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A PREROUTING -j CNI-HOSTPORT-DNAT
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
COMMIT
";

    #[test]
    fn removes_kube_proxy_chains_and_the_jumps_to_them_only() {
        let (script, chains) = iptables_cleanup_script(SAVE).expect("something to remove");
        assert_eq!(chains, 7);
        let expected = "\
*filter
-D INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER
-D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-F KUBE-FORWARD
-F KUBE-IPVS-FILTER
-F KUBE-NODE-PORT
-F KUBE-PROXY-FIREWALL
-X KUBE-FORWARD
-X KUBE-IPVS-FILTER
-X KUBE-NODE-PORT
-X KUBE-PROXY-FIREWALL
COMMIT
*nat
-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-D OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-F KUBE-MARK-MASQ
-F KUBE-POSTROUTING
-F KUBE-SERVICES
-X KUBE-MARK-MASQ
-X KUBE-POSTROUTING
-X KUBE-SERVICES
COMMIT
";
        assert_eq!(script, expected);
    }

    #[test]
    fn a_clean_node_needs_no_script() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        assert_eq!(iptables_cleanup_script(save), None);
    }
}

#[cfg(test)]
#[path = "cleanup_tests.rs"]
mod kernel_tests;
