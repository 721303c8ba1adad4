//! Crash points in IPVS mode, inside the VM (`cargo xtask vm-test`): `topoproxy run` killed
//! after every kernel write (IPVS command, nftables transaction, VIP bind) of a
//! representative change set, then restarted (tests/support/crash_points.rs), with a foreign
//! IPVS service beside ours that nothing may touch.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/crash_points.rs"]
mod crash_points;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/pods.rs"]
mod pods;
#[path = "support/process.rs"]
mod process;

use std::collections::BTreeSet;

use cluster::{ipvsadm, Fixture, YamlAgent};
use crash_points::{every_crash_point, listed_services, Kernel};
use pods::PodNetwork;
use process::sh_quiet;
use topoproxy::dataplane::ipvs::nft::Nft;

/// A service another tool made with ipvsadm, and its one real server.
const FOREIGN: &str = "10.97.0.1:80";
const FOREIGN_SERVER: &str = "10.244.2.12:8080";

struct IpvsKernel;

type Listed = BTreeSet<(String, String)>;

impl IpvsKernel {
    fn foreign_intact() -> bool {
        let shown = ipvsadm(&["-Ln"]);
        let mut lines = shown
            .lines()
            .skip_while(|l| !l.contains(&format!("TCP  {FOREIGN} rr")));
        lines.next().is_some()
            && lines
                .next()
                .is_some_and(|l| l.contains(FOREIGN_SERVER) && l.contains("Masq"))
    }

    /// The kernel's virtual services, the foreign one left out.
    fn ipvs_services() -> Listed {
        listed_services(&ipvsadm(&["-Ln"]))
            .into_iter()
            .filter(|(_, address)| address != FOREIGN)
            .collect()
    }

    /// The services recorded as ours in `inet topoproxy`.
    fn recorded() -> Result<Listed, String> {
        let state = Nft::new()
            .and_then(|mut nft| nft.read())
            .map_err(|e| e.to_string())?;
        Ok(state
            .unwrap_or_default()
            .state
            .services
            .keys()
            .map(|key| {
                (
                    key.protocol.to_string(),
                    std::net::SocketAddr::new(key.address, key.port).to_string(),
                )
            })
            .collect())
    }

    /// Addresses bound on kube-ipvs0 (none when the link is not there yet).
    fn bound() -> BTreeSet<String> {
        let out = std::process::Command::new(netns::IP)
            .args(["-o", "addr", "show", "dev", "kube-ipvs0"])
            .output()
            .expect("starting ip addr");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let mut fields = line
                    .split_whitespace()
                    .skip_while(|f| *f != "inet" && *f != "inet6");
                fields.next()?;
                Some(fields.next()?.split('/').next()?.to_owned())
            })
            .collect()
    }

    fn vips(services: &Listed) -> BTreeSet<String> {
        services
            .iter()
            .filter_map(|(_, address)| address.parse::<std::net::SocketAddr>().ok())
            .map(|address| address.ip().to_string())
            .collect()
    }
}

impl Kernel for IpvsKernel {
    fn reset(&mut self) {
        cluster::topoproxy(&["cleanup"]);
        sh_quiet(cluster::IPVSADM, &["-D", "-t", FOREIGN]);
        ipvsadm(&["-A", "-t", FOREIGN, "-s", "rr"]);
        ipvsadm(&["-a", "-t", FOREIGN, "-r", FOREIGN_SERVER, "-m"]);
    }

    fn listing(&self) -> String {
        cluster::list_owned(&[])
    }

    fn strays_after_crash(&self, before: &str, after: &str) -> Vec<String> {
        let planned: Listed = listed_services(before)
            .into_iter()
            .chain(listed_services(after))
            .collect();
        let mut strays = Vec::new();
        if !Self::foreign_intact() {
            strays.push(format!(
                "the foreign service changed:\n{}",
                ipvsadm(&["-Ln"])
            ));
        }
        let recorded = match Self::recorded() {
            Ok(recorded) => recorded,
            Err(error) => return vec![format!("reading the nft record: {error}")],
        };
        for service in Self::ipvs_services() {
            if !recorded.contains(&service) {
                strays.push(format!("IPVS service {service:?} is not recorded as ours"));
            }
        }
        for service in recorded.difference(&planned) {
            strays.push(format!(
                "recorded service {service:?} is planned by neither state"
            ));
        }
        for address in Self::bound().difference(&Self::vips(&planned)) {
            strays.push(format!(
                "{address} on kube-ipvs0 is planned by neither state"
            ));
        }
        strays
    }

    fn differences_from(&self, planned: &str) -> Vec<String> {
        let want: Listed = listed_services(planned).into_iter().collect();
        let mut differences = Vec::new();
        let listing = self.listing();
        if listing != planned {
            differences.push(format!("list:\n{listing}\nplan:\n{planned}"));
        }
        let have = Self::ipvs_services();
        if have != want {
            differences.push(format!("IPVS holds {have:?}, planned {want:?}"));
        }
        match Self::recorded() {
            Ok(recorded) if recorded == want => {}
            Ok(recorded) => differences.push(format!("recorded {recorded:?}, planned {want:?}")),
            Err(error) => differences.push(format!("reading the nft record: {error}")),
        }
        let bound = Self::bound();
        if bound != Self::vips(&want) {
            differences.push(format!(
                "kube-ipvs0 holds {bound:?}, planned {:?}",
                Self::vips(&want)
            ));
        }
        if !Self::foreign_intact() {
            differences.push(format!(
                "the foreign service changed:\n{}",
                ipvsadm(&["-Ln"])
            ));
        }
        differences
    }
}

impl Drop for IpvsKernel {
    fn drop(&mut self) {
        sh_quiet(
            cluster::agent_process::agent_bin()
                .to_str()
                .unwrap_or("topoproxy"),
            &["cleanup"],
        );
        sh_quiet(cluster::IPVSADM, &["-D", "-t", FOREIGN]);
    }
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn every_crash_point_of_a_change_set_recovers_in_ipvs_mode() {
    let _network = PodNetwork::new();
    let mut kernel = IpvsKernel;
    let mut fixture = Fixture::new("crash-ipvs");
    fixture.nodes = crash_points::nodes();
    let mut agent = YamlAgent::new_in_mode(
        &fixture,
        crash_points::NODE,
        &["--proxy-mode", "ipvs"],
        &["cleanup"],
    );
    let (before, after) = crash_points::change_set();
    let report = every_crash_point(
        &mut kernel,
        &mut agent,
        &mut fixture,
        crash_points::NODE,
        (&before, &after),
        stride(),
    );
    eprintln!("{}", report.summary("IPVS"));
    assert!(!report.crashes.is_empty());
}

/// Every crash point takes ~50 s on TCG (three agent starts of a debug build, a dozen tools), so
/// CI tries every third on 6.12 and every tenth on the other kernels;
/// `TOPOPROXY_CRASH_POINT_STRIDE=1` tries them all (docs/reliability.md has that run), and so
/// does the extended run (`cargo xtask test --extended`) unless that variable says otherwise.
fn stride() -> u64 {
    if let Some(stride) = std::env::var("TOPOPROXY_CRASH_POINT_STRIDE")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return stride;
    }
    if harness::extended() {
        return 1;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if release.starts_with("6.12.") {
        3
    } else {
        10
    }
}
