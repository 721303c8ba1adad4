//! Crash points: the agent killed with SIGKILL after the k-th kernel write of one change set,
//! for every k, and what a restart makes of the half-applied state (docs/reliability.md).
//!
//! Include beside `cluster.rs` and `process.rs`:
//! `#[path = "support/crash_points.rs"] mod crash_points;`. A dataplane's test implements
//! [`Kernel`] (how to reset it and what counts as a stray) and calls [`every_crash_point`].
//!
//! Each round programs the `before` Services with an unarmed agent, kills it, writes the
//! `after` Services, starts the agent armed with `TOPOPROXY_CRASH_AFTER_KERNEL_WRITES=k`, and
//! waits for it to kill itself. Right then nothing may be in the kernel that is neither
//! planned (before or after) nor recorded; an unarmed restart must converge to the `after`
//! plan exactly, writing no more than the whole change set did. The first k the armed agent
//! survives (it converges and reports a successful sync) is past the change set's last write,
//! which that run's metrics count; with a stride of 1 every point has been tried.

#![allow(dead_code)]

use std::os::unix::process::ExitStatusExt as _;
use std::time::Duration;

use std::net::Ipv4Addr;

use crate::cluster::http::metric_sum;
use crate::cluster::{Condition, Endpoint, Fixture, Port, Service, YamlAgent};
use crate::process::eventually;

/// The variable that arms the crash point (`topoproxy::kernel_writes::ENV`).
const CRASH_ENV: &str = "TOPOPROXY_CRASH_AFTER_KERNEL_WRITES";

/// What the agent prints right before it kills itself.
const CRASH_LINE: &str = "crash point: SIGKILL after this kernel write: ";

/// Generous: the VM runs on TCG on a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(120);

/// No change set here is near this many writes; more means the loop would never end.
const MAX_WRITES: u64 = 500;

/// A dataplane as the crash-point loop sees it.
pub trait Kernel {
    /// Removes everything topoproxy programmed and puts back the test's foreign state.
    fn reset(&mut self);
    /// `topoproxy list --no-counters` (or the error text).
    fn listing(&self) -> String;
    /// Right after a crash: what the kernel holds that is neither planned (`before` or
    /// `after`, as `plan` prints them) nor recorded as ours, and foreign state touched.
    fn strays_after_crash(&self, before: &str, after: &str) -> Vec<String>;
    /// After the restart converged: whatever differs from exactly `planned`.
    fn differences_from(&self, planned: &str) -> Vec<String>;
}

/// One crash point tried.
#[derive(Debug)]
pub struct Crash {
    /// The agent died right after this write (1-based).
    pub after_write: u64,
    /// What that write was, from the agent's last log line.
    pub write: String,
    /// Kernel writes of the restart that recovered.
    pub recovery_writes: u64,
}

/// What [`every_crash_point`] found.
#[derive(Debug)]
pub struct Report {
    /// Kernel writes of the whole change set (what the run that survived its crash point made).
    pub change_set_writes: u64,
    pub crashes: Vec<Crash>,
}

impl Report {
    /// One line for the test's output.
    pub fn summary(&self, dataplane: &str) -> String {
        let writes = self.crashes.iter().map(|c| c.recovery_writes);
        format!(
            "{dataplane} crash points: {} writes in the change set, {} crash points recovered, \
             recoveries wrote {}–{}",
            self.change_set_writes,
            self.crashes.len(),
            writes.clone().min().unwrap_or(0),
            writes.max().unwrap_or(0)
        )
    }
}

/// Tries every `stride`-th crash point (1, 1 + stride, ...) of the change `before` → `after`
/// for `node`; a stride of 1 tries them all.
pub fn every_crash_point(
    kernel: &mut impl Kernel,
    agent: &mut YamlAgent,
    fixture: &mut Fixture,
    node: &str,
    (before, after): (&[Service], &[Service]),
    stride: u64,
) -> Report {
    fixture.services = before.to_vec();
    fixture.write();
    let plan_before = fixture.plan(node);
    fixture.services = after.to_vec();
    fixture.write();
    let plan_after = fixture.plan(node);
    assert_ne!(plan_before, plan_after, "the change set changes nothing");

    let mut crashes = Vec::new();
    for k in (1..=MAX_WRITES).step_by(stride.max(1) as usize) {
        program(kernel, agent, fixture, before, &plan_before);
        fixture.services = after.to_vec();
        fixture.write();
        agent.set_env(CRASH_ENV, Some(&k.to_string()));
        agent.start_process();
        let crashed = eventually(
            &format!("the agent armed at write {k} crashes or converges"),
            CONVERGE,
            || {
                if let Some(status) = agent.exit_status() {
                    return Ok(Err(status));
                }
                match synced_to(agent, kernel, &plan_after) {
                    Some(writes) => Ok(Ok(writes)),
                    None => Err(kernel.listing()),
                }
            },
        );
        let status = match crashed {
            Err(status) => status,
            Ok(change_set_writes) => {
                // A run that survived made every write of the change set, all counted.
                agent.kill9();
                return survived(k, change_set_writes, crashes);
            }
        };
        let log = agent.log();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "armed at write {k}, the agent ended otherwise ({status}):\n{log}"
        );
        let write = log
            .lines()
            .rev()
            .find_map(|line| line.split_once(CRASH_LINE).map(|(_, what)| what.to_owned()))
            .unwrap_or_else(|| panic!("killed without the crash point's line:\n{log}"));
        let strays = kernel.strays_after_crash(&plan_before, &plan_after);
        assert!(
            strays.is_empty(),
            "after a crash after write {k} ({write}), the kernel holds what is neither \
             planned nor recorded: {strays:#?}"
        );

        agent.set_env(CRASH_ENV, None);
        agent.start_process();
        let recovery_writes = eventually(
            &format!("the restart after a crash after write {k} converges"),
            CONVERGE,
            || {
                assert!(
                    agent.running(),
                    "the restarted agent exited:\n{}",
                    agent.log()
                );
                synced_to(agent, kernel, &plan_after).ok_or_else(|| kernel.listing())
            },
        );
        let differences = kernel.differences_from(&plan_after);
        assert!(
            differences.is_empty(),
            "after recovering from a crash after write {k} ({write}): {differences:#?}"
        );
        agent.kill9();
        let log = agent.log();
        let first_sync = log
            .lines()
            .rev()
            .find(|line| line.contains("initial sync done"))
            .unwrap_or("(no initial sync logged)");
        eprintln!(
            "crash point {k} ({write}): recovered with {recovery_writes} writes; {}",
            first_sync.trim()
        );
        crashes.push(Crash {
            after_write: k,
            write,
            recovery_writes,
        });
    }
    panic!("the change set took more than {MAX_WRITES} kernel writes");
}

/// Resets the kernel and programs `services` with an unarmed agent, which is then killed.
fn program(
    kernel: &mut impl Kernel,
    agent: &mut YamlAgent,
    fixture: &mut Fixture,
    services: &[Service],
    planned: &str,
) {
    agent.kill9();
    kernel.reset();
    fixture.services = services.to_vec();
    fixture.write();
    agent.set_env(CRASH_ENV, None);
    agent.start_process();
    eventually("the agent programs the first state", CONVERGE, || {
        assert!(agent.running(), "the agent exited:\n{}", agent.log());
        synced_to(agent, kernel, planned)
            .map(drop)
            .ok_or_else(|| kernel.listing())
    });
    agent.kill9();
}

/// The kernel writes the agent made up to its first successful sync, once it lists `planned`
/// and has finished that sync (counted in `/metrics` after the sync's log line); `None` while
/// `/metrics` does not answer or the listing differs.
///
/// The count is the one the agent logs with "initial sync done", not the writes metric: a
/// later sync (a repair, another event) must not be counted as the recovery's.
fn synced_to(agent: &YamlAgent, kernel: &impl Kernel, planned: &str) -> Option<u64> {
    let metrics = agent.metrics_text()?;
    let syncs = metric_sum(&metrics, "topoproxy_syncs_total{result=\"success\"}").unwrap_or(0.0);
    if syncs < 1.0 || kernel.listing() != planned {
        return None;
    }
    if syncs > 1.0 {
        eprintln!("note: {syncs} syncs before the test looked; the first one's writes count");
    }
    initial_sync_writes(&agent.log())
}

/// `kernel_writes` of the log's last "initial sync done" line: the latest start's, since the
/// log is appended to across restarts and the caller saw that start's sync counted.
fn initial_sync_writes(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find(|line| line.contains("initial sync done"))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("kernel_writes="))?
        .parse()
        .ok()
}

/// The report of a loop whose agent, armed at write `k`, survived a change set of
/// `change_set_writes` writes; asserts that every write before it was a crash point and that no
/// recovery wrote more than the whole change set plus one undo per write the crash left.
fn survived(k: u64, change_set_writes: u64, crashes: Vec<Crash>) -> Report {
    let last_crash = crashes.last().map_or(0, |c| c.after_write);
    assert!(
        last_crash <= change_set_writes && change_set_writes < k,
        "armed at write {k}, the agent survived a change set of {change_set_writes} writes; \
         the last crash was after write {last_crash}"
    );
    for crash in &crashes {
        let Crash {
            after_write,
            recovery_writes,
            ..
        } = crash;
        // Each write the killed agent made may take one write to undo (an eBPF backend slot
        // put but not yet counted, say). Before `topoproxy list` became read-only, the test's
        // polling `list` did that undoing behind the agent's back, and the bound was the
        // change set alone.
        assert!(
            *recovery_writes <= change_set_writes + after_write,
            "recovering from a crash after write {after_write} took {recovery_writes} writes, \
             more than the whole change set ({change_set_writes}) and one undo per write made"
        );
    }
    Report {
        change_set_writes,
        crashes,
    }
}

/// The `(protocol, address:port)` of every virtual service in `ipvsadm -Ln` text.
pub fn listed_services(listing: &str) -> Vec<(String, String)> {
    listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [protocol @ ("TCP" | "UDP" | "SCTP"), address, ..] => {
                    Some(((*protocol).to_owned(), (*address).to_owned()))
                }
                _ => None,
            }
        })
        .collect()
}

/// The node the change set is planned for.
pub const NODE: &str = "node-a1";

/// `(node, zone)` of the change set's cluster.
pub fn nodes() -> Vec<(String, String)> {
    [
        ("node-a1", "zone-a"),
        ("node-a2", "zone-a"),
        ("node-b1", "zone-b"),
    ]
    .into_iter()
    .map(|(node, zone)| (node.to_owned(), zone.to_owned()))
    .collect()
}

/// A representative change set, `(before, after)`: one Service keeps its VIP and changes its
/// endpoints (one added, one removed, one turning terminating), one goes away with its VIP, one
/// stays as it is, one new Service brings a new VIP with a TCP and a UDP port, and one under
/// the zone policy loses an endpoint so its tier weights change.
pub fn change_set() -> (Vec<Service>, Vec<Service>) {
    let web = |endpoints: Vec<Endpoint>| {
        service(
            "web",
            [10, 96, 7, 1],
            &[("http", "TCP", 80, 8080)],
            endpoints,
            None,
        )
    };
    let dns = service(
        "dns",
        [10, 96, 7, 2],
        &[("dns", "UDP", 53, 5353)],
        vec![endpoint(11, "node-a1", Condition::Ready)],
        None,
    );
    let steady = service(
        "steady",
        [10, 96, 7, 3],
        &[("https", "TCP", 443, 8443)],
        vec![endpoint(12, "node-a2", Condition::Ready)],
        None,
    );
    let api = service(
        "api",
        [10, 96, 7, 4],
        &[("grpc", "TCP", 9000, 9000), ("stats", "UDP", 9001, 9001)],
        vec![
            endpoint(11, "node-a1", Condition::Ready),
            endpoint(13, "node-b1", Condition::Ready),
        ],
        None,
    );
    let zoned = |endpoints: Vec<Endpoint>| {
        service(
            "zoned",
            [10, 96, 7, 5],
            &[("http", "TCP", 80, 8080)],
            endpoints,
            Some("zone"),
        )
    };
    let before = vec![
        web(vec![
            endpoint(11, "node-a1", Condition::Ready),
            endpoint(12, "node-a2", Condition::Ready),
            endpoint(13, "node-b1", Condition::Ready),
        ]),
        dns,
        steady.clone(),
        zoned(vec![
            endpoint(11, "node-a1", Condition::Ready),
            endpoint(12, "node-a2", Condition::Ready),
            endpoint(13, "node-b1", Condition::Ready),
            endpoint(14, "node-b1", Condition::Ready),
        ]),
    ];
    let after = vec![
        web(vec![
            endpoint(12, "node-a2", Condition::Terminating),
            endpoint(13, "node-b1", Condition::Ready),
            endpoint(14, "node-b1", Condition::Ready),
        ]),
        steady,
        api,
        zoned(vec![
            endpoint(11, "node-a1", Condition::Ready),
            endpoint(13, "node-b1", Condition::Ready),
            endpoint(14, "node-b1", Condition::Ready),
        ]),
    ];
    (before, after)
}

fn zone_of(node: &str) -> &'static str {
    if node.starts_with("node-a") {
        "zone-a"
    } else {
        "zone-b"
    }
}

/// An endpoint at 10.244.7.`host` on `node`, hinted for its own zone.
fn endpoint(host: u8, node: &str, condition: Condition) -> Endpoint {
    Endpoint {
        address: Ipv4Addr::new(10, 244, 7, host),
        node: node.to_owned(),
        zone: zone_of(node).to_owned(),
        condition,
        hint: Some(zone_of(node).to_owned()),
    }
}

fn service(
    name: &str,
    vip: [u8; 4],
    ports: &[(&str, &'static str, u16, u16)],
    endpoints: Vec<Endpoint>,
    topology: Option<&'static str>,
) -> Service {
    Service {
        name: name.to_owned(),
        cluster_ip: Ipv4Addr::from(vip),
        ports: ports
            .iter()
            .map(|&(name, protocol, port, target_port)| Port {
                name: name.to_owned(),
                protocol,
                port,
                target_port,
            })
            .collect(),
        prefer_same_zone: false,
        topology,
        ipvs_scheduler: None,
        endpoints,
    }
}
