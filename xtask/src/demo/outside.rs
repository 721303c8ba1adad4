//! The demo's outside client: a network namespace `tpdemo-outside` beyond a veth "uplink" of
//! the node, as a machine on the node's network would be. It reaches shop/frontend's NodePort
//! on the node's InternalIP and its externalIP through the agent's north-south tc programs
//! (`--north-south-interfaces tpd-uplink`), never through the socket programs: it is in no
//! cgroup of the demo.
//!
//! ```text
//!  outside 10.255.0.2 ── eth0 ═ tpd-uplink 10.255.0.1 [node: InternalIP on lo] ── tpd<i> ── pods
//!  (routes: the InternalIP and the externalIPs via 10.255.0.1)
//! ```
//!
//! Every pod sits behind a veth of the node here, so every backend is a local one for the tc
//! path: DNAT at ingress, the node forwards to the pod, and the reply gets the frontend back
//! as its source at egress of the uplink (no SNAT: that is for backends behind the uplink).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use super::{
    check_interrupted, find_vs, in_netns, ip, section, Client, NodeInfo, Probe, Proto, World,
    CONVERGE_TIMEOUT, FRONTEND, NETNS_PREFIX, PROBES,
};

/// The node's end of the uplink: the one device the agent attaches its tc programs to.
pub(super) const UPLINK: &str = "tpd-uplink";
/// A range the example cluster does not use (its nodes are 192.168.x, pods 10.244.x,
/// Services 10.96.x).
const NODE_SIDE: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 2);
const PREFIX_LEN: u8 = 24;
/// SSH's port: nothing listens on it in the node namespace, and it is no frontend.
const UNTOUCHED_PORT: u16 = 22;
/// What the agent logs once its tc programs are attached (`log_report` in
/// agent/src/dataplane/ebpf/north_south.rs).
const ATTACHED_LOG: &str = "north-south tc programs in place";

pub(super) fn netns() -> String {
    format!("{NETNS_PREFIX}outside")
}

/// shop/frontend's frontends an outside client can reach, from the plan: the TCP NodePort on
/// the node's IPv4 address and every IPv4 externalIP. The demo expects them to share the
/// ClusterIP's tiers (externalTrafficPolicy: Cluster), so their answers are checked alike.
pub(super) fn frontends(plan: &Value, node: &NodeInfo) -> Result<Vec<Probe>> {
    let cluster_ip = &PROBES[FRONTEND];
    let tiers = &find_vs(plan, cluster_ip)?["tiers"];
    let (namespace, name) = cluster_ip
        .service
        .split_once('/')
        .context("a demo Service without a namespace")?;
    let mut probes = Vec::new();
    for vs in plan["virtualServers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let frontend = match vs["frontend"].as_str() {
            Some("NodePort") => "NodePort",
            Some("ExternalIP") => "ExternalIP",
            _ => continue,
        };
        let key = &vs["key"];
        let ours = vs["service"]["namespace"] == namespace
            && vs["service"]["name"] == name
            && key["protocol"] == cluster_ip.protocol.upper();
        if !ours {
            continue;
        }
        // The outside client speaks IPv4 only.
        let Some(address) = key["address"]
            .as_str()
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        if frontend == "NodePort" && address != node.address {
            continue;
        }
        let port = key["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .context("a virtual server without a port in the plan")?;
        ensure!(
            vs["tiers"] == *tiers,
            "{} {frontend} {address}:{port} has other tiers than its ClusterIP: the demo \
             expects externalTrafficPolicy: Cluster",
            cluster_ip.service
        );
        probes.push(Probe {
            service: cluster_ip.service,
            frontend,
            protocol: cluster_ip.protocol,
            vip: address,
            port,
        });
    }
    for kind in ["NodePort", "ExternalIP"] {
        ensure!(
            probes.iter().any(|probe| probe.frontend == kind),
            "the plan has no IPv4 {kind} of {} on {} for the outside client",
            cluster_ip.service,
            node.name
        );
    }
    Ok(probes)
}

/// The outside namespace, the uplink veth, the routes both ways and forwarding on the node.
pub(super) fn build_network(world: &World) -> Result<()> {
    let (node_ns, ns) = (world.node.netns(), netns());
    ip(&format!("netns add {ns}"))?;
    ip(&format!("-n {ns} link set lo up"))?;
    ip(&format!(
        "-n {node_ns} link add {UPLINK} type veth peer name eth0 netns {ns}"
    ))?;
    ip(&format!(
        "-n {node_ns} addr add {NODE_SIDE}/{PREFIX_LEN} dev {UPLINK}"
    ))?;
    ip(&format!("-n {node_ns} link set {UPLINK} up"))?;
    ip(&format!("-n {ns} addr add {CLIENT}/{PREFIX_LEN} dev eth0"))?;
    ip(&format!("-n {ns} link set eth0 up"))?;
    // Only the frontends lead to the node: pods and ClusterIPs stay unreachable from outside.
    let frontends: BTreeSet<Ipv4Addr> = world.outside.iter().map(|probe| probe.vip).collect();
    for address in frontends {
        ip(&format!("-n {ns} route add {address}/32 via {NODE_SIDE}"))?;
    }
    // A pod knows only the node's address; its replies to the client go back through it.
    let client_net = format!("{}/{PREFIX_LEN}", Ipv4Addr::from(u32::from(CLIENT) & !0xff));
    for pod in &world.pods {
        ip(&format!(
            "-n {} route add {client_net} via {} dev eth0",
            pod.netns(),
            world.node.address
        ))?;
    }
    enable_forwarding(&node_ns)
}

/// The tc programs DNAT before routing, so the node forwards a client's packet to the pod
/// rather than delivering it: IPv4 forwarding must be on (a new namespace inherits the
/// host's setting).
fn enable_forwarding(netns: &str) -> Result<()> {
    // /proc/sys/net shows the namespace of the thread that opens it.
    in_netns(netns, || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .context("writing /proc/sys/net/ipv4/ip_forward")
    })
    .with_context(|| format!("enabling forwarding in {netns}"))
}

/// The world line of the outside client.
pub(super) fn describe(world: &World) {
    let frontends: Vec<String> = world
        .outside
        .iter()
        .map(|probe| format!("{}:{}", probe.vip, probe.port))
        .collect();
    println!(
        "   outside {:<15} {:<15} beyond the node's {UPLINK} ({NODE_SIDE}), in no cgroup; reaches {}",
        "client",
        CLIENT,
        frontends.join(" ")
    );
}

/// The `--keep` hint for trying the outside client by hand.
pub(super) fn keep_hint(world: &World) {
    if let Some(probe) = world.outside.first() {
        println!(
            "   outside client: nsenter --net=/run/netns/{} bash -c 'cat < /dev/tcp/{}/{}'",
            netns(),
            probe.vip,
            probe.port
        );
    }
}

impl World {
    /// Step 4: the outside client reaches the NodePort and the externalIP, answered by the
    /// same tier as the socket path.
    pub(super) fn outside_step(&self) -> Result<()> {
        let zone = &self.node.zone;
        let expected = self.local(FRONTEND);
        section(&format!(
            "4. A client outside the node reaches {}'s NodePort and externalIP, through tc",
            PROBES[FRONTEND].service
        ));
        self.explain_outside(&expected);
        println!("   The agent logged: {}", self.wait_for_tc()?);
        self.show_plan(&self.outside, true)?;
        println!("   The outside client (in {}):", netns());
        let mut client = Client::spawn(self, &netns(), None)?;
        let expected_all = vec![expected; self.outside.len()];
        let asked = self
            .ask_all(&mut client, &self.outside, &expected_all)
            .and_then(|answered| Ok((answered, self.untouched(&mut client)?)));
        client.quit();
        let (answered, refused) = asked?;
        println!(
            "   ✓ only {zone} answered; every handshake completed, so every reply came from the address"
        );
        println!(
            "     dialled: the tc egress program put the frontend back as the replies' source"
        );
        println!(
            "   ✓ a connect to a port of the node that is no frontend passes untouched: {refused}"
        );
        self.show_list(&self.outside, &answered)
    }

    /// A connect to the node address on a port that is no frontend (as SSH would be) must
    /// reach the node's own stack, which refuses it: neither dropped nor translated.
    fn untouched(&self, client: &mut Client) -> Result<String> {
        let probe = Probe {
            service: "the node",
            frontend: "no frontend",
            protocol: Proto::Tcp,
            vip: self.node.address,
            port: UNTOUCHED_PORT,
        };
        let tally = client.probe(&probe, 1)?;
        let refused = tally
            .errors
            .first()
            .filter(|error| error.contains("refused") && tally.answers.is_empty());
        match refused {
            Some(error) => Ok(format!("{} → {error}", probe.label())),
            None => bail!(
                "{} should be refused by the node itself, but got answers {:?}, errors {:?}",
                probe.label(),
                tally.answers,
                tally.errors
            ),
        }
    }

    /// What the outside client goes through, and which pods the operator should see answer.
    fn explain_outside(&self, expected: &BTreeSet<usize>) {
        let (node, zone, service) = (&self.node, &self.node.zone, PROBES[FRONTEND].service);
        println!(
            "   The client in {} ({CLIENT}) is in no cgroup of the demo: no socket program",
            netns()
        );
        println!(
            "   sees its connects. Its packets cross the uplink to {UPLINK} in {}, where",
            node.netns()
        );
        println!("   the agent's tc programs (--north-south-interfaces {UPLINK}) DNAT them to a");
        println!("   backend and give the replies the frontend back as their source.");
        println!(
            "   {service} asks trafficDistribution PreferClose and has ready {zone} pods: from"
        );
        println!(
            "   {} the tc path draws from the same tier as the socket path. Expect",
            node.name
        );
        println!("   {} only, while they are ready.", self.names(expected));
    }

    /// Waits until the agent logs its tc programs attached to the uplink; returns that message.
    fn wait_for_tc(&self) -> Result<String> {
        let path = self.root.join("agent.log");
        let started = Instant::now();
        loop {
            check_interrupted()?;
            let log = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            // From the message on: the timestamp and level say nothing here.
            let found = log
                .lines()
                .filter(|line| line.contains(UPLINK))
                .find_map(|line| line.find(ATTACHED_LOG).map(|at| &line[at..]));
            if let Some(message) = found {
                return Ok(message.trim().to_owned());
            }
            if started.elapsed() > CONVERGE_TIMEOUT {
                bail!(
                    "the agent did not log {ATTACHED_LOG:?} for {UPLINK} within {} s (see {})",
                    CONVERGE_TIMEOUT.as_secs(),
                    path.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(service: &str, frontend: &str, address: &str, port: u16, tiers: &Value) -> Value {
        let (namespace, name) = service.split_once('/').expect("namespace/name");
        serde_json::json!({
            "key": {"family": "IPv4", "protocol": "TCP", "address": address, "port": port},
            "service": {"namespace": namespace, "name": name},
            "frontend": frontend,
            "tiers": tiers,
        })
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-b1".to_owned(),
            zone: "zone-b".to_owned(),
            address: Ipv4Addr::new(192, 168, 20, 11),
        }
    }

    #[test]
    fn frontends_are_the_node_port_on_the_node_address_and_the_external_ips() {
        let tiers = serde_json::json!([{"kind": "SameZone", "backends": []}]);
        let plan = serde_json::json!({"virtualServers": [
            vs("shop/frontend", "ClusterIP", "10.96.20.10", 80, &tiers),
            vs("shop/frontend", "NodePort", "192.168.20.11", 30080, &tiers),
            vs("shop/frontend", "NodePort", "fd00:192:168:20::11", 30080, &tiers),
            vs("shop/frontend", "ExternalIP", "203.0.113.10", 80, &tiers),
            vs("shop/cart", "NodePort", "192.168.20.11", 30090, &tiers),
        ]});
        let found: Vec<(&str, Ipv4Addr, u16)> = frontends(&plan, &node())
            .expect("frontends")
            .iter()
            .map(|probe| (probe.frontend, probe.vip, probe.port))
            .collect();
        assert_eq!(
            found,
            [
                ("NodePort", Ipv4Addr::new(192, 168, 20, 11), 30080),
                ("ExternalIP", Ipv4Addr::new(203, 0, 113, 10), 80),
            ]
        );
    }

    #[test]
    fn frontends_refuse_other_tiers_than_the_cluster_ip() {
        let tiers = serde_json::json!([{"kind": "SameZone", "backends": []}]);
        let local = serde_json::json!([{"kind": "NodeLocal", "backends": []}]);
        let plan = serde_json::json!({"virtualServers": [
            vs("shop/frontend", "ClusterIP", "10.96.20.10", 80, &tiers),
            vs("shop/frontend", "NodePort", "192.168.20.11", 30080, &local),
            vs("shop/frontend", "ExternalIP", "203.0.113.10", 80, &tiers),
        ]});
        assert!(frontends(&plan, &node()).is_err());
    }
}
