//! Crash points in eBPF mode, on the host (needs root): `topoproxy run --proxy-mode ebpf` killed
//! after every kernel write of a representative change set, then restarted
//! (tests/support/crash_points.rs). The programs attach to a child cgroup of the test's own,
//! with nothing in it, and pin under a directory of their own; north-south stays off.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/crash_points.rs"]
mod crash_points;
#[path = "support/host.rs"]
mod host;
#[path = "support/process.rs"]
mod process;

use std::collections::BTreeSet;
use std::path::PathBuf;

use aya::maps::{HashMap, Map, MapData};
use cluster::{Fixture, YamlAgent};
use crash_points::{every_crash_point, listed_services, Kernel};
use topoproxy_common::{maps, Backend, BackendKey, MAPS_DIR};

struct EbpfKernel {
    pin_dir: PathBuf,
    cgroup: PathBuf,
    /// The pins and backend map entries of a clean run of the `after` Services, once seen.
    clean: Option<(BTreeSet<PathBuf>, usize)>,
}

impl EbpfKernel {
    fn pin_dir_arg(&self) -> &str {
        self.pin_dir.to_str().expect("UTF-8 pin dir")
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(cluster::agent_process::agent_bin())
            .args(args)
            .args(["--proxy-mode", "ebpf", "--bpf-pin-dir", self.pin_dir_arg()])
            .output()
            .expect("starting topoproxy")
    }

    /// Every file and directory under the pin directory.
    fn pins(&self) -> BTreeSet<PathBuf> {
        host::paths_under(&self.pin_dir)
    }

    /// Entries of the pinned backends map: the planned backends, plus strays if any.
    fn backend_entries(&self) -> Result<usize, String> {
        let path = self.pin_dir.join(MAPS_DIR).join(maps::BACKENDS);
        let data = MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let map: HashMap<_, BackendKey, Backend> =
            HashMap::try_from(Map::HashMap(data)).map_err(|e| e.to_string())?;
        Ok(map.keys().count())
    }
}

impl Kernel for EbpfKernel {
    fn reset(&mut self) {
        let out = self.run(&["cleanup"]);
        assert!(
            out.status.success(),
            "cleanup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn listing(&self) -> String {
        cluster::list_owned(&["--proxy-mode", "ebpf", "--bpf-pin-dir", self.pin_dir_arg()])
    }

    fn strays_after_crash(&self, before: &str, after: &str) -> Vec<String> {
        let planned: BTreeSet<_> = listed_services(before)
            .into_iter()
            .chain(listed_services(after))
            .collect();
        let listing = self.listing();
        if listing.starts_with(cluster::LIST_FAILED) {
            // Maps not pinned yet: nothing of ours in the kernel beyond the programs.
            return Vec::new();
        }
        listed_services(&listing)
            .into_iter()
            .filter(|service| !planned.contains(service))
            .map(|(protocol, address)| format!("service {protocol} {address} in the maps"))
            .collect()
    }

    fn differences_from(&self, planned: &str) -> Vec<String> {
        let mut differences = Vec::new();
        let listing = self.listing();
        if listing != planned {
            differences.push(format!("list:\n{listing}\nplan:\n{planned}"));
        }
        let Some((clean_pins, clean_backends)) = &self.clean else {
            return differences;
        };
        // Every tier is in the maps (the fallback tiers too), so a clean run says how many.
        match self.backend_entries() {
            Ok(entries) if entries == *clean_backends => {}
            Ok(entries) => differences.push(format!(
                "{entries} backend map entries, a clean run has {clean_backends}"
            )),
            Err(error) => differences.push(format!("reading the backends map: {error}")),
        }
        let pins = self.pins();
        if &pins != clean_pins {
            differences.push(format!("pins {pins:#?}, a clean run has {clean_pins:#?}"));
        }
        differences
    }
}

impl Drop for EbpfKernel {
    fn drop(&mut self) {
        let _ = self.run(&["cleanup"]);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

#[test]
fn every_crash_point_of_a_change_set_recovers_in_ebpf_mode() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root (bpffs, cgroups)");
    let id = std::process::id();
    let cgroup = topoproxy::dataplane::ebpf::cgroup2_mount()
        .expect("a cgroup2 mount")
        .join(format!("topoproxy-crash-{id}"));
    std::fs::create_dir_all(&cgroup).expect("creating the test cgroup");
    let mut kernel = EbpfKernel {
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/topoproxy-crash-{id}")),
        cgroup,
        clean: None,
    };
    let mut fixture = Fixture::new("crash-ebpf");
    fixture.nodes = crash_points::nodes();
    let pin_dir = kernel.pin_dir_arg().to_owned();
    let cgroup_arg = kernel.cgroup.to_str().expect("UTF-8 cgroup").to_owned();
    let mode = [
        "--proxy-mode",
        "ebpf",
        "--bpf-pin-dir",
        &pin_dir,
        "--cgroup-path",
        &cgroup_arg,
        "--north-south-interfaces",
        "none",
    ];
    let cleanup = ["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-dir", &pin_dir];
    let mut agent = YamlAgent::new_in_mode(&fixture, crash_points::NODE, &mode, &cleanup);
    let (before, after) = crash_points::change_set();

    // The pins of a clean run: what every recovery must end with.
    fixture.services = after.clone();
    fixture.write();
    let planned_after = fixture.plan(crash_points::NODE);
    agent.start_process();
    process::eventually(
        "a clean run programs the plan",
        std::time::Duration::from_secs(60),
        || {
            assert!(agent.running(), "the agent exited:\n{}", agent.log());
            let listing = kernel.listing();
            if listing == planned_after {
                Ok(())
            } else {
                Err(listing)
            }
        },
    );
    agent.kill9();
    let backends = kernel.backend_entries().expect("reading the backends map");
    kernel.clean = Some((kernel.pins(), backends));

    let report = every_crash_point(
        &mut kernel,
        &mut agent,
        &mut fixture,
        crash_points::NODE,
        (&before, &after),
        1,
    );
    eprintln!("{}", report.summary("eBPF"));
    assert_eq!(
        report.crashes.len() as u64,
        report.change_set_writes,
        "every write was a crash point"
    );
    agent.stop_and_cleanup();
}
