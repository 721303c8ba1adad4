//! `plan --explain`: per Service port, which topology mode applied on this node and why each
//! endpoint was programmed, kept as a fallback, or left out.
//!
//! Built from the same [`PortPlan`]s the planner programs from, so the explanation cannot
//! drift from the table.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::model::{
    Hints, IpFamily, LocalityPolicy, Node, Protocol, ServiceKey, SliceOrigin, TopologyIntent,
};
use crate::store::Store;
use crate::table::{Conflict, Frontend, TierKind, TopologyMode, TrafficPolicy, SHARE_WHOLE};

use super::endpoints::Candidate;
use super::spill::OVERPROVISIONING;
use super::topology::IndexTiers;
use super::{port_plans, skip_reason, PlanConfig, PortPlan, SkipReason, SpillPlan};
use crate::scheduler::Scheduler;

/// Why one Service does what it does on this node.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceExplanation {
    pub service: ServiceKey,
    pub skipped: Option<SkipReason>,
    /// For a programmed ServiceImport: how its clusters are ordered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clusterset: Option<String>,
    pub intent: TopologyIntent,
    /// The Service's own IPVS scheduler (`topoproxy.io/ipvs-scheduler`), if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipvs_scheduler: Option<Scheduler>,
    pub ports: Vec<PortExplanation>,
}

/// One Service port in one IP family.
#[derive(Debug, Clone, Serialize)]
pub struct PortExplanation {
    pub port_name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub family: IpFamily,
    pub topology: TopologyMode,
    pub topology_reason: String,
    /// The Service asked for topology-aware routing, has Ready endpoints, and this node
    /// serves it from all of them anyway.
    pub falling_back: bool,
    /// The locality policy of the Cluster-policy frontends.
    #[serde(skip_serializing_if = "LocalityPolicy::is_kube_proxy")]
    pub locality: LocalityPolicy,
    /// Under a locality policy: each Cluster-policy tier, its health and its share.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<TierExplanation>,
    pub frontends: Vec<FrontendExplanation>,
    pub endpoints: Vec<EndpointExplanation>,
}

/// One locality tier and the share the spill rule gave it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TierExplanation {
    pub tier: TierKind,
    pub ready: usize,
    pub total: usize,
    /// Envoy's health, in parts per million.
    pub health_ppm: u32,
    /// The capacity guard's cap on the share served up to this tier, in parts per million.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_ppm: Option<u32>,
    pub share_ppm: u32,
    /// Weight of each of the tier's backends.
    pub weight: u32,
    pub why: String,
}

/// An address:port the port is served on.
#[derive(Debug, Clone, Serialize)]
pub struct FrontendExplanation {
    pub address: IpAddr,
    pub port: u16,
    pub kind: Frontend,
    pub policy: TrafficPolicy,
    /// Why this node does not serve it: another Service holds the same address:port
    /// ([`mark_conflicts`]).
    #[serde(rename = "leftOut", skip_serializing_if = "Option::is_none")]
    pub left_out: Option<String>,
}

/// One merged endpoint and what each policy made of it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointExplanation {
    pub address: IpAddr,
    pub port: u16,
    pub slice: String,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// Verdict under Cluster policy, when a frontend uses it.
    pub cluster: Option<Verdict>,
    /// Verdict under Local policy, when a frontend uses it.
    pub local: Option<Verdict>,
    /// Other copies of this `IP:port` (in other slices or on other nodes) left out for this one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub duplicates: Vec<DuplicateExplanation>,
}

/// A copy of an endpoint left out, and why the programmed copy won.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DuplicateExplanation {
    pub slice: String,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub why: String,
}

/// Where an endpoint landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The tier it sits in, if any.
    pub tier: Option<TierKind>,
    /// In the first non-empty tier, i.e. programmed now (under a locality policy: in a tier
    /// with a share above 0).
    pub programmed: bool,
    /// Under a locality policy, the backend's weight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    pub why: String,
}

/// Notes on each frontend that lost its address:port to another Service who holds it and why
/// (the table decides conflicts; the explanation is planned per Service and cannot see them).
pub fn mark_conflicts(explanations: &mut [ServiceExplanation], conflicts: &[Conflict]) {
    for conflict in conflicts {
        let Some(service) = explanations
            .iter_mut()
            .find(|e| e.service == conflict.loser)
        else {
            continue;
        };
        let frontends = service
            .ports
            .iter_mut()
            .filter(|p| p.protocol == conflict.key.protocol)
            .flat_map(|p| p.frontends.iter_mut());
        for frontend in frontends {
            if frontend.address == conflict.key.address && frontend.port == conflict.key.port {
                frontend.left_out = Some(format!(
                    "{} claims it as {:?} and keeps it: {}",
                    conflict.winner,
                    conflict.winner_frontend,
                    conflict.reason()
                ));
            }
        }
    }
}

/// Explains every Service in the store for `node`, in Service key order.
pub fn explain(store: &Store, node: &Node, config: &PlanConfig) -> Vec<ServiceExplanation> {
    store
        .services()
        .map(|service| {
            let skipped = skip_reason(service, config);
            let ports = if skipped.is_some() {
                Vec::new()
            } else {
                port_plans(store, service, node, config)
                    .iter()
                    .map(|plan| explain_port(plan, service.topology_intent, node))
                    .collect()
            };
            let clusterset = match (&config.cluster_id, service.key.is_import(), &skipped) {
                (Some(id), true, None) => Some(format!(
                    "clusterset VIP: endpoints from this cluster ({id}) first, then the other \
                     clusters', spilling by Envoy's priority rule as this cluster thins"
                )),
                _ => None,
            };
            ServiceExplanation {
                service: service.key.clone(),
                skipped,
                clusterset,
                intent: service.topology_intent,
                ipvs_scheduler: service.scheduler,
                ports,
            }
        })
        .collect()
}

fn explain_port(plan: &PortPlan<'_>, intent: TopologyIntent, node: &Node) -> PortExplanation {
    let endpoints = plan
        .candidates
        .iter()
        .enumerate()
        .map(|(index, candidate)| EndpointExplanation {
            address: candidate.address(),
            port: candidate.port,
            slice: candidate.slice.to_owned(),
            node_name: candidate.endpoint.node_name.as_deref().map(str::to_owned),
            zone: candidate.endpoint.zone.as_deref().map(str::to_owned),
            cluster: plan.cluster.as_ref().map(|tiers| match &plan.spill {
                None => cluster_verdict(tiers, index, candidate, plan.mode, node),
                Some(spill) => locality_verdict(tiers, spill, index, candidate, plan.mode, node),
            }),
            local: plan
                .local
                .as_ref()
                .map(|tiers| local_verdict(tiers, index, candidate, node)),
            duplicates: plan
                .duplicates
                .iter()
                .filter(|d| {
                    (d.dropped.address(), d.dropped.port) == (candidate.address(), candidate.port)
                })
                .map(|d| DuplicateExplanation {
                    slice: d.dropped.slice.to_owned(),
                    node_name: d.dropped.endpoint.node_name.as_deref().map(str::to_owned),
                    zone: d.dropped.endpoint.zone.as_deref().map(str::to_owned),
                    why: d.why.to_owned(),
                })
                .collect(),
        })
        .collect();
    PortExplanation {
        port_name: plan.port.name.clone(),
        protocol: plan.port.protocol,
        port: plan.port.port,
        family: plan.family,
        topology: plan.mode,
        topology_reason: match plan.cluster {
            Some(_) => plan.reason.to_string(),
            None => "not applied: every frontend uses Local traffic policy".to_owned(),
        },
        falling_back: plan.cluster.as_ref().is_some_and(|tiers| {
            intent.wants_topology()
                && plan.mode == TopologyMode::None
                && tiers
                    .first()
                    .is_some_and(|(kind, _)| *kind == TierKind::Cluster)
        }),
        locality: plan.locality,
        tiers: match (&plan.cluster, &plan.spill) {
            (Some(tiers), Some(spill)) => explain_tiers(tiers, spill),
            _ => Vec::new(),
        },
        frontends: plan
            .frontends
            .iter()
            .map(|f| FrontendExplanation {
                address: f.key.address,
                port: f.key.port,
                kind: f.kind,
                policy: f.policy,
                left_out: None,
            })
            .collect(),
        endpoints,
    }
}

fn ppm(fraction: f64) -> u32 {
    (fraction.clamp(0.0, 1.0) * f64::from(SHARE_WHOLE)).round() as u32
}

fn explain_tiers(tiers: &IndexTiers, spill: &SpillPlan) -> Vec<TierExplanation> {
    let last_usable = spill.health.iter().rposition(|h| h.ready > 0);
    tiers
        .iter()
        .enumerate()
        .map(|(position, (kind, _))| {
            let health = spill.health[position];
            let load = spill.loads[position];
            let why = if health.ready == 0 {
                "nothing ready here counts yet (kube-proxy's last resort)".to_owned()
            } else if load.share_ppm == 0 {
                "nearer tiers are healthy enough to take every connection".to_owned()
            } else if Some(position) == last_usable && load.share_ppm == SHARE_WHOLE {
                "the only tier with ready endpoints in use".to_owned()
            } else if Some(position) == last_usable {
                "the outermost tier with ready endpoints takes what the nearer ones hand over"
                    .to_owned()
            } else if let Some(cap) = load.capped_at {
                format!(
                    "capacity guard: this locality has {:.1}% of its fair share of ready endpoints \
                     for its nodes, so at most {:.1}% is served up to here",
                    health.capacity.unwrap_or(cap) * 100.0,
                    cap * 100.0
                )
            } else if health.health() < 1.0 {
                format!(
                    "{} of {} ready × {OVERPROVISIONING} = {:.1}% healthy: hands the rest outward",
                    health.ready,
                    health.total,
                    health.health() * 100.0
                )
            } else {
                format!(
                    "{} of {} ready: healthy (× {OVERPROVISIONING} overprovisioning)",
                    health.ready, health.total
                )
            };
            TierExplanation {
                tier: *kind,
                ready: health.ready,
                total: health.total,
                health_ppm: ppm(health.health()),
                capacity_ppm: health.capacity.map(ppm),
                share_ppm: load.share_ppm,
                weight: spill.weights[position],
                why,
            }
        })
        .collect()
}

fn locality_verdict(
    tiers: &IndexTiers,
    spill: &SpillPlan,
    index: usize,
    candidate: &Candidate<'_>,
    mode: TopologyMode,
    node: &Node,
) -> Verdict {
    let Some((position, tier)) = placement(tiers, index) else {
        return Verdict {
            tier: None,
            programmed: false,
            weight: None,
            why: unusable_why(candidate),
        };
    };
    let zone = node.zone.as_deref().unwrap_or("");
    let region = node.region.as_deref().unwrap_or("");
    let endpoint = candidate.endpoint;
    let place = match tier {
        TierKind::SameNode if mode == TopologyMode::SameNode => {
            format!("node hint names this node {}", node.name)
        }
        TierKind::SameNode => format!("on this node {}", node.name),
        TierKind::SameZone if mode == TopologyMode::SameZone => {
            format!("zone hint names this node's zone {zone}")
        }
        TierKind::SameZone => format!("in this node's zone {zone}"),
        TierKind::SameRegion => format!("in this node's region {region}"),
        TierKind::Cluster => match candidate.origin {
            // An imported slice this cluster exported itself (its id as source cluster).
            SliceOrigin::Remote(name) => format!(
                "in this cluster {name} (zone {})",
                endpoint.zone.as_deref().unwrap_or("unknown")
            ),
            SliceOrigin::Local => format!(
                "elsewhere in this cluster (zone {}, {})",
                endpoint.zone.as_deref().unwrap_or("unknown"),
                hints(candidate)
            ),
        },
        TierKind::RemoteClusters => match candidate.origin {
            SliceOrigin::Remote(name) => format!("ready in cluster {name}"),
            SliceOrigin::Local => "ready in another cluster".to_owned(),
        },
        TierKind::ServingTerminating => {
            "terminating but still serving; used only while no endpoint is ready".to_owned()
        }
        TierKind::NodeLocal | TierKind::NodeLocalServingTerminating => {
            "local tier in a cluster set".to_owned()
        }
    };
    let share = spill.loads[position].share_ppm;
    Verdict {
        tier: Some(tier),
        programmed: share > 0,
        weight: Some(spill.weights[position]),
        why: format!("{place}; tier share {}", percent_text(share)),
    }
}

fn percent_text(share_ppm: u32) -> String {
    format!(
        "{:.1}%",
        f64::from(share_ppm) / f64::from(SHARE_WHOLE) * 100.0
    )
}

fn placement(tiers: &IndexTiers, index: usize) -> Option<(usize, TierKind)> {
    tiers
        .iter()
        .enumerate()
        .find(|(_, (_, members))| members.contains(&index))
        .map(|(position, (kind, _))| (position, *kind))
}

fn unusable_why(candidate: &Candidate<'_>) -> String {
    let endpoint = candidate.endpoint;
    if endpoint.terminating && !endpoint.serving {
        "terminating and no longer serving".to_owned()
    } else {
        "not ready and not terminating (a starting or failing pod)".to_owned()
    }
}

fn joined(hints: &Hints) -> String {
    hints.iter().collect::<Vec<_>>().join(",")
}

fn hints(candidate: &Candidate<'_>) -> String {
    let zones = joined(&candidate.endpoint.zone_hints);
    let nodes = joined(&candidate.endpoint.node_hints);
    match (zones.is_empty(), nodes.is_empty()) {
        (true, true) => "no hints".to_owned(),
        (false, true) => format!("hinted for zone {zones}"),
        (true, false) => format!("hinted for node {nodes}"),
        (false, false) => format!("hinted for zone {zones} and node {nodes}"),
    }
}

fn cluster_verdict(
    tiers: &IndexTiers,
    index: usize,
    candidate: &Candidate<'_>,
    mode: TopologyMode,
    node: &Node,
) -> Verdict {
    let Some((position, tier)) = placement(tiers, index) else {
        return Verdict {
            tier: None,
            programmed: false,
            weight: None,
            why: unusable_why(candidate),
        };
    };
    let zone = node.zone.as_deref().unwrap_or("");
    let why = match (tier, mode) {
        (TierKind::SameNode, _) => format!("node hint names this node {}", node.name),
        (TierKind::SameZone, TopologyMode::SameZone) => {
            format!("zone hint names this node's zone {zone}")
        }
        (TierKind::SameZone, _) => {
            format!("in this node's zone {zone}, but not hinted for this node")
        }
        (TierKind::Cluster, TopologyMode::None) => {
            "ready; no topology filter applies on this node".to_owned()
        }
        (TierKind::SameRegion, _) => "in this node's region".to_owned(),
        (TierKind::Cluster, _) => format!(
            "ready, {}; outside this node's topology preference",
            hints(candidate)
        ),
        (TierKind::RemoteClusters, _) => {
            let cluster = match candidate.origin {
                SliceOrigin::Remote(name) => name.as_str(),
                SliceOrigin::Local => "",
            };
            format!("ready in cluster {cluster}; used only when this cluster has no ready endpoint")
        }
        (TierKind::ServingTerminating, _) => {
            "terminating but still serving; used only while no endpoint is ready".to_owned()
        }
        (TierKind::NodeLocal | TierKind::NodeLocalServingTerminating, _) => {
            "local tier in a cluster set".to_owned()
        }
    };
    Verdict {
        tier: Some(tier),
        programmed: position == 0,
        weight: None,
        why,
    }
}

fn local_verdict(
    tiers: &IndexTiers,
    index: usize,
    candidate: &Candidate<'_>,
    node: &Node,
) -> Verdict {
    if let Some((position, tier)) = placement(tiers, index) {
        let why = match tier {
            TierKind::NodeLocal => "ready on this node".to_owned(),
            _ => "terminating but still serving on this node; used only while none here is ready"
                .to_owned(),
        };
        return Verdict {
            tier: Some(tier),
            programmed: position == 0,
            weight: None,
            why,
        };
    }
    let why = if candidate.is_remote() {
        "in another cluster; Local policy never leaves this node".to_owned()
    } else if candidate.endpoint.node_name.as_deref() != Some(node.name.as_str()) {
        match &candidate.endpoint.node_name {
            Some(other) => format!("on node {other}; Local policy never leaves this node"),
            None => "has no nodeName; Local policy never leaves this node".to_owned(),
        }
    } else {
        unusable_why(candidate)
    };
    Verdict {
        tier: None,
        programmed: false,
        weight: None,
        why,
    }
}

/// `Service ns/name` or `ServiceImport ns/name`.
fn heading(key: &ServiceKey) -> String {
    format!("{} {}/{}", key.kind.as_str(), key.namespace, key.name)
}

fn intent_text(intent: TopologyIntent) -> &'static str {
    match intent {
        TopologyIntent::None => "none",
        TopologyIntent::Auto => "Auto, by annotation",
        TopologyIntent::PreferClose => "trafficDistribution PreferClose",
        TopologyIntent::PreferSameZone => "trafficDistribution PreferSameZone",
        TopologyIntent::PreferSameNode => "trafficDistribution PreferSameNode",
    }
}

fn mode_text(mode: TopologyMode) -> &'static str {
    match mode {
        TopologyMode::None => "none (all ready endpoints)",
        TopologyMode::SameZone => "same-zone",
        TopologyMode::SameNode => "same-node",
    }
}

fn tier_text(tier: TierKind) -> &'static str {
    tier.as_str()
}

fn verdict_text(verdict: &Verdict) -> String {
    let status = match (verdict.programmed, verdict.tier, verdict.weight) {
        (true, Some(tier), Some(weight)) => {
            format!("programmed ({}, weight {weight})", tier_text(tier))
        }
        (true, Some(tier), None) => format!("programmed ({})", tier_text(tier)),
        (false, Some(tier), _) => format!("fallback ({})", tier_text(tier)),
        (_, None, _) => "left out".to_owned(),
    };
    format!("{status}: {}", verdict.why)
}

fn socket(address: IpAddr, port: u16) -> String {
    SocketAddr::new(address, port).to_string()
}

/// Renders explanations as text for a terminal.
pub fn render_text(explanations: &[ServiceExplanation], node: &Node) -> String {
    let mut out = String::new();
    let zone = node.zone.as_deref().unwrap_or("<none>");
    // Writing into a String cannot fail.
    let _ = writeln!(
        out,
        "Explaining the plan for node {} (zone {zone})",
        node.name
    );
    for service in explanations {
        let _ = writeln!(out);
        if let Some(skipped) = &service.skipped {
            let _ = writeln!(out, "{}: skipped: {skipped}", heading(&service.service));
            continue;
        }
        let _ = writeln!(
            out,
            "{} (topology intent: {})",
            heading(&service.service),
            intent_text(service.intent)
        );
        if let Some(clusterset) = &service.clusterset {
            let _ = writeln!(out, "  {clusterset}");
        }
        if let Some(scheduler) = service.ipvs_scheduler {
            let weighted = scheduler.weighted(true);
            let spilling = service.ports.iter().any(|p| !p.locality.is_kube_proxy());
            let _ = writeln!(
                out,
                "  IPVS scheduler: {scheduler} (annotation topoproxy.io/ipvs-scheduler){}",
                if spilling && weighted != scheduler {
                    format!("; {weighted} where the locality policy weights the tiers")
                } else {
                    String::new()
                }
            );
        }
        if service.ports.is_empty() {
            let _ = writeln!(out, "  no ports");
        }
        for port in &service.ports {
            render_port(&mut out, port);
        }
    }
    out
}

fn render_port(out: &mut String, port: &PortExplanation) {
    let name = if port.port_name.is_empty() {
        "<unnamed>"
    } else {
        &port.port_name
    };
    let _ = writeln!(
        out,
        "  port {name} {}/{} {}",
        port.port, port.protocol, port.family
    );
    let local_only = port
        .frontends
        .iter()
        .all(|f| f.policy == TrafficPolicy::Local);
    if local_only {
        let _ = writeln!(out, "    topology: {}", port.topology_reason);
    } else {
        let _ = writeln!(
            out,
            "    topology: {}: {}",
            mode_text(port.topology),
            port.topology_reason
        );
    }
    if !port.locality.is_kube_proxy() {
        let _ = writeln!(
            out,
            "    locality policy: {} (spill by Envoy's priority rule, capacity-guarded)",
            port.locality
        );
    }
    for tier in &port.tiers {
        let _ = writeln!(
            out,
            "    tier {}: {} of {} ready, share {}, weight {}: {}",
            tier_text(tier.tier),
            tier.ready,
            tier.total,
            percent_text(tier.share_ppm),
            tier.weight,
            tier.why
        );
    }
    if port.falling_back {
        let _ = writeln!(
            out,
            "    falling back: the Service asks for topology-aware routing, but this node \
             uses every ready endpoint"
        );
    }
    for frontend in &port.frontends {
        let _ = writeln!(
            out,
            "    frontend {} {:?} ({:?} policy)",
            socket(frontend.address, frontend.port),
            frontend.kind,
            frontend.policy
        );
        if let Some(why) = &frontend.left_out {
            let _ = writeln!(out, "      left out: {why}");
        }
    }
    if port.endpoints.is_empty() {
        let _ = writeln!(out, "    no endpoints match this port");
    }
    for endpoint in &port.endpoints {
        render_endpoint(out, endpoint);
    }
}

fn render_endpoint(out: &mut String, endpoint: &EndpointExplanation) {
    let _ = writeln!(
        out,
        "    endpoint {} (slice {}, node {}, zone {})",
        socket(endpoint.address, endpoint.port),
        endpoint.slice,
        endpoint.node_name.as_deref().unwrap_or("-"),
        endpoint.zone.as_deref().unwrap_or("-"),
    );
    if let Some(verdict) = &endpoint.cluster {
        let _ = writeln!(out, "      cluster policy: {}", verdict_text(verdict));
    }
    if let Some(verdict) = &endpoint.local {
        let _ = writeln!(out, "      local policy: {}", verdict_text(verdict));
    }
    for duplicate in &endpoint.duplicates {
        let _ = writeln!(
            out,
            "      kept over its copy in slice {} (node {}, zone {}): {}",
            duplicate.slice,
            duplicate.node_name.as_deref().unwrap_or("-"),
            duplicate.zone.as_deref().unwrap_or("-"),
            duplicate.why
        );
    }
}
