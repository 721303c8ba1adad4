//! Reading the example cluster and the agent's plan and `list` output.

use super::*;

pub(super) fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry.with_context(|| format!("reading {}", from.display()))?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

pub(super) fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.is_dir() {
            files.extend(yaml_files(&path)?);
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

pub(super) fn plan_json(topoproxy: &Path, source: &Path, node: &str) -> Result<Value> {
    let out = Command::new(topoproxy)
        .arg("plan")
        .arg("--source")
        .arg(source)
        .args(["--node", node, "--format", "json"])
        .output()
        .context("running topoproxy plan")?;
    ensure!(
        out.status.success(),
        "topoproxy plan --node {node} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("parsing topoproxy plan --format json")
}

pub(super) fn find_vs<'a>(plan: &'a Value, probe: &Probe) -> Result<&'a Value> {
    plan["virtualServers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .find(|vs| {
            vs["frontend"] == probe.frontend
                && vs["key"]["protocol"] == probe.protocol.upper()
                && vs["key"]["address"] == probe.vip.to_string().as_str()
                && vs["key"]["port"] == probe.port
        })
        .with_context(|| format!("the plan has no virtual server {}", probe.label()))
}

/// The demo Services' pods, from every tier of the plan (so fallbacks included), named
/// `<service>-<node suffix>`; and per probe, its pods.
pub(super) fn pods_from_plan(plan: &Value) -> Result<(Vec<Pod>, Vec<Vec<usize>>)> {
    let mut by_address: BTreeMap<Ipv4Addr, Pod> = BTreeMap::new();
    let mut probe_addresses: Vec<BTreeSet<Ipv4Addr>> = Vec::new();
    for probe in &PROBES {
        let vs = find_vs(plan, probe)?;
        let service = probe.service.rsplit('/').next().unwrap_or(probe.service);
        let mut addresses = BTreeSet::new();
        for tier in vs["tiers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let terminating = tier["kind"] == "ServingTerminating";
            for backend in tier["backends"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let address: Ipv4Addr = backend["address"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .context("a backend without an IPv4 address in the plan")?;
                let port = backend["port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .context("a backend without a port in the plan")?;
                let node = backend["nodeName"].as_str().unwrap_or("?").to_owned();
                let zone = backend["zone"].as_str().unwrap_or("?").to_owned();
                let pod = by_address.entry(address).or_insert_with(|| Pod {
                    name: format!("{service}-{}", node.strip_prefix("node-").unwrap_or(&node)),
                    address,
                    node,
                    zone,
                    terminating,
                    ports: BTreeSet::new(),
                });
                pod.ports.insert((probe.protocol, port));
                addresses.insert(address);
            }
        }
        probe_addresses.push(addresses);
    }
    let mut pods: Vec<Pod> = by_address.into_values().collect();
    // Several pods of one Service on one node: number them all.
    let mut totals: BTreeMap<String, usize> = BTreeMap::new();
    for pod in &pods {
        *totals.entry(pod.name.clone()).or_default() += 1;
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for pod in &mut pods {
        if totals[&pod.name] > 1 {
            let count = seen.entry(pod.name.clone()).or_default();
            *count += 1;
            pod.name = format!("{}-{count}", pod.name);
        }
    }
    let backends = probe_addresses
        .iter()
        .map(|addresses| {
            addresses
                .iter()
                .filter_map(|a| pods.iter().position(|pod| pod.address == *a))
                .collect()
        })
        .collect();
    Ok((pods, backends))
}

/// The node's zone and first IPv4 InternalIP, from the Node objects of the source.
pub(super) fn node_info(files: &BTreeMap<PathBuf, String>, node: &str) -> Result<NodeInfo> {
    let wanted = format!("name: {node}");
    for text in files.values() {
        let mut lines = text.lines().skip_while(|line| line.trim() != wanted);
        if lines.next().is_none() {
            continue;
        }
        let (mut zone, mut address) = (None, None);
        for line in lines {
            let line = line.trim();
            if line.starts_with("- apiVersion:") || line == "---" {
                break;
            }
            if let Some(value) = line.strip_prefix("topology.kubernetes.io/zone:") {
                zone = Some(value.trim().to_owned());
            }
            if line.contains("type: InternalIP") && address.is_none() {
                address = line
                    .split("address:")
                    .nth(1)
                    .map(|rest| {
                        rest.trim_matches(|c: char| c == '}' || c == '"' || c.is_whitespace())
                    })
                    .and_then(|a| a.parse::<Ipv4Addr>().ok());
            }
        }
        if let (Some(zone), Some(address)) = (zone, address) {
            return Ok(NodeInfo {
                name: node.to_owned(),
                zone,
                address,
            });
        }
    }
    bail!("found no Node {node} with a zone label and an IPv4 InternalIP in the source")
}

/// `text` with the `conditions:` of every endpoint whose address is in `addresses` set to
/// `{conditions}`; and which addresses were found.
pub(super) fn set_conditions(
    text: &str,
    addresses: &BTreeSet<Ipv4Addr>,
    conditions: &str,
) -> (String, BTreeSet<Ipv4Addr>) {
    let mut out = String::with_capacity(text.len());
    let mut found = BTreeSet::new();
    // The indentation of the current matching endpoint item's `- ` while inside it.
    let mut inside: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if let Some(item_indent) = inside {
            if !trimmed.is_empty() && indent <= item_indent {
                inside = None;
            }
        }
        if let Some(list) = trimmed
            .strip_prefix("- addresses:")
            .map(|rest| rest.trim().trim_start_matches('[').trim_end_matches(']'))
        {
            let here: Option<Ipv4Addr> = list.split(',').find_map(|a| {
                let a: Ipv4Addr = a.trim().trim_matches('"').parse().ok()?;
                addresses.contains(&a).then_some(a)
            });
            if let Some(address) = here {
                found.insert(address);
                inside = Some(indent);
            }
        } else if inside.is_some() && trimmed.starts_with("conditions:") {
            let _ = writeln!(out, "{}conditions: {{{conditions}}}", &line[..indent]);
            continue;
        }
        let _ = writeln!(out, "{line}");
    }
    (out, found)
}

/// One virtual server of `topoproxy list`.
pub(super) struct Listed {
    pub(super) backends: BTreeSet<SocketAddrV4>,
    /// ActiveConn per backend: the eBPF maps' connect counter.
    pub(super) counters: BTreeMap<SocketAddrV4, u64>,
    pub(super) lines: Vec<String>,
}

/// `topoproxy list` (ipvsadm -Ln format) by virtual server.
pub(super) fn parse_list(text: &str) -> BTreeMap<VsKey, Listed> {
    let mut listed: BTreeMap<VsKey, Listed> = BTreeMap::new();
    let mut current: Option<VsKey> = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(proto), Some(address)) if Proto::parse(proto).is_some() => {
                current = Proto::parse(proto).zip(address.parse().ok());
                if let Some(key) = current {
                    listed.insert(
                        key,
                        Listed {
                            backends: BTreeSet::new(),
                            counters: BTreeMap::new(),
                            lines: vec![line.to_owned()],
                        },
                    );
                }
            }
            (Some("->"), Some(address)) => {
                if let Some(entry) = current.and_then(|key| listed.get_mut(&key)) {
                    if let Ok(address) = address.parse() {
                        // Forward, Weight, then ActiveConn.
                        let active = words.nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
                        entry.backends.insert(address);
                        entry.counters.insert(address, active);
                        entry.lines.push(line.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    listed
}
