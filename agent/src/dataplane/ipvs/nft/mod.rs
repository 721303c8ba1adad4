//! topoproxy's nftables table for IPVS mode: masquerade, hairpin and reject, with sets that
//! also record which virtual services topoproxy owns.
//!
//! IPVS cannot masquerade or filter by itself; kube-proxy's IPVS mode does it with iptables
//! and ipsets. topoproxy owns one table, `inet topoproxy`, instead:
//! - chains `prerouting`/`output` (nat, priority -110, before NAT and IPVS) jump to
//!   `services`, which sets mark [`MASQ_MARK`] on the first packet of connections that must
//!   be masqueraded; `postrouting` (nat, priority 90) masquerades marked packets and hairpin
//!   traffic;
//! - chain `input` (filter) rejects new connections to a bound VIP on a port that is not a
//!   service port (`vip-ports`);
//! - the sets hold the state (see [`render`] for their layout), so [`Nft::read`] rebuilds
//!   exactly the [`NftState`] that was written and an agent restart adopts what it owns.
//!
//! The table is programmed by running the `nft` binary, as kube-proxy's knftables does:
//! the text format is the stable interface of nftables, a whole script is one atomic
//! transaction, and `nft -j` gives a parseable read-back. The rendering ([`render`]) and
//! parsing ([`parse`]) are pure; only [`run`] spawns processes. Calls block until `nft`
//! exits (milliseconds); call them from a blocking context.

pub mod netlink;
pub mod parse;
pub mod render;
mod run;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitStatus;

use crate::table::{Frontend, SourceRanges, TrafficPolicy, VsKey};

pub use parse::{ListedTable, ParseError};
pub use render::MASQ_MARK;

/// Finds `nft` in PATH, else at `/usr/sbin/nft`.
pub fn find_nft() -> Result<PathBuf, NftError> {
    run::find_nft()
}

/// The table's name (family `inet`).
pub const TABLE: &str = "topoproxy";

/// What went wrong while running `nft`.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft not found in PATH nor at /usr/sbin/nft (install the nftables package)")]
    NotFound,
    #[error("starting {program:?}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to nft ({action})")]
    Wait {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("nft {action} failed ({status}): {stderr}")]
    Failed {
        action: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    #[error("reading table inet {TABLE}")]
    Parse(#[source] ParseError),
    #[error("nftables netlink: {action}")]
    Netlink {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Settings that shape the rules, from the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NftSettings {
    /// Masquerade all traffic to ClusterIPs (kube-proxy `--masquerade-all`, which also
    /// leaves `Local` external traffic alone to keep the client address).
    pub masquerade_all: bool,
    /// Pod CIDRs: ClusterIP traffic from outside them is masqueraded. Empty for a family:
    /// only node-originated traffic whose source is the VIP itself is (kube-proxy's
    /// behaviour without a local-traffic detector).
    pub cluster_cidrs: Vec<ipnetwork::IpNetwork>,
    /// kube-proxy's `detectLocalMode` `BridgeInterface` or `InterfaceNamePrefix`: pod traffic
    /// is what arrives on these interfaces, and replaces `cluster_cidrs` as the test.
    pub local_interface: Option<LocalInterface>,
}

/// Which interfaces pod traffic arrives on (kube-proxy's interface-based local detectors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalInterface {
    /// `detectLocalMode: BridgeInterface`, `detectLocal.bridgeInterface`: exactly this one.
    Bridge(String),
    /// `detectLocalMode: InterfaceNamePrefix`, `detectLocal.interfaceNamePrefix`: every
    /// interface whose name starts with it.
    NamePrefix(String),
}

impl LocalInterface {
    /// The `iifname` operand: the name quoted, with `*` after a prefix.
    pub fn nft_operand(&self) -> String {
        match self {
            Self::Bridge(name) => format!("\"{name}\""),
            Self::NamePrefix(prefix) => format!("\"{prefix}*\""),
        }
    }

    /// Whether `name` may be written into an nft script and names an interface: 1 to 15
    /// characters (IFNAMSIZ), none of them a space, quote, slash, `*`, `\\` or control.
    pub fn valid_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 15
            && name
                .chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '/' | '*' | '\\'))
    }
}

/// Everything the table's sets hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NftState {
    /// Every virtual service topoproxy owns, with how it is reached.
    pub services: BTreeMap<VsKey, (Frontend, TrafficPolicy)>,
    /// The node-local destinations (virtual service, address, port), for hairpin masquerade:
    /// only the derived `hairpin` set is written, so [`Nft::read`] returns these only from
    /// an older version's table; the IPVS dataplane rebuilds them from the IPVS dump and the
    /// hairpin set ([`ListedTable::hairpins`]). A destination whose family differs from its
    /// service's cannot be stored and is left out (logged).
    pub destinations: BTreeSet<(VsKey, IpAddr, u16)>,
    /// The load-balancer frontends with `loadBalancerSourceRanges`, and who may reach them
    /// (kube-proxy's `KUBE-LOAD-BALANCER-FW`, `-SOURCE-CIDR` and `-SOURCE-IP` sets).
    pub source_ranges: BTreeMap<VsKey, SourceRanges>,
    /// The node's own addresses on its other interfaces (kube-proxy's `nodeAddressSet`): a
    /// Service address equal to one of them is never rejected on its other ports, since the
    /// node itself listens there (SSH, the kubelet).
    pub node_addresses: BTreeSet<IpAddr>,
}

/// Runs `nft` against table `inet topoproxy`.
#[derive(Debug, Clone)]
pub struct Nft {
    invocation: run::Invocation,
    /// The network namespace the netlink question ([`Nft::exists`]) is asked in; `None`: the
    /// calling thread's.
    netns: Option<PathBuf>,
}

impl Nft {
    /// Finds `nft` in PATH, else at `/usr/sbin/nft`.
    pub fn new() -> Result<Self, NftError> {
        Ok(Self::with_command(run::find_nft()?, Vec::<OsString>::new()))
    }

    /// Runs `program leading_args... <nft arguments>` instead, in the calling thread's
    /// network namespace.
    pub fn with_command(
        program: impl Into<PathBuf>,
        leading_args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        Self {
            invocation: run::Invocation {
                program: program.into(),
                leading_args: leading_args.into_iter().map(Into::into).collect(),
            },
            netns: None,
        }
    }

    /// Works on the network namespace at `netns` (`/run/netns/X`): `nsenter --net=X nft`,
    /// and netlink from a thread that entered it.
    pub fn in_namespace(nft: &std::path::Path, netns: impl Into<PathBuf>) -> Self {
        let netns = netns.into();
        let mut this = Self::with_command(
            "nsenter",
            [
                OsString::from(format!("--net={}", netns.display())),
                nft.as_os_str().to_owned(),
            ],
        );
        this.netns = Some(netns);
        this
    }

    /// Replaces the whole table (chains, rules and sets) in one transaction.
    pub fn replace(&mut self, settings: &NftSettings, state: &NftState) -> Result<(), NftError> {
        warn_unrepresentable(state);
        let script = render::render_replace(settings, state);
        self.invocation
            .run("replace", &["-f", "-"], Some(&script))?;
        crate::kernel_writes::done("nftables table replaced");
        Ok(())
    }

    /// Adds and removes set elements to go from `from` to `to`, in one transaction; runs
    /// nothing when they hold the same elements. Fails (changing nothing) when the table
    /// does not hold `from`'s elements; the caller then falls back to [`Nft::replace`].
    pub fn update(&mut self, from: &NftState, to: &NftState) -> Result<(), NftError> {
        warn_unrepresentable(to);
        let script = render::render_update(from, to);
        if script.is_empty() {
            return Ok(());
        }
        self.invocation.run("update", &["-f", "-"], Some(&script))?;
        crate::kernel_writes::done("nftables set elements updated");
        Ok(())
    }

    /// Reads the sets back; `None` when the table does not exist.
    pub fn read(&mut self) -> Result<Option<ListedTable>, NftError> {
        let listed = self
            .invocation
            .run("list", &["-j", "list", "table", "inet", TABLE], None);
        match listed {
            Ok(output) => parse::parse_table(&output.stdout)
                .map(Some)
                .map_err(NftError::Parse),
            // nft reports a missing table as ENOENT; messages are in the C locale.
            Err(NftError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Whether the table exists, asked over netlink: `nft list tables` would load every
    /// set's elements first ([`netlink`]).
    pub fn exists(&mut self) -> Result<bool, NftError> {
        match &self.netns {
            None => netlink::table_exists(TABLE),
            Some(netns) => in_netns(netns, || netlink::table_exists(TABLE)),
        }
    }

    /// Deletes the table; a missing table is not an error.
    pub fn delete(&mut self) -> Result<(), NftError> {
        self.invocation
            .run("delete", &["-f", "-"], Some(&render::render_delete()))?;
        crate::kernel_writes::done("nftables table deleted");
        Ok(())
    }
}

/// Runs `ask` on a thread that entered the network namespace at `netns`.
fn in_netns(
    netns: &std::path::Path,
    ask: impl FnOnce() -> Result<bool, NftError> + Send,
) -> Result<bool, NftError> {
    use std::os::fd::AsRawFd as _;
    let entered = |source| NftError::Netlink {
        action: "enter the network namespace",
        source,
    };
    let file = std::fs::File::open(netns).map_err(entered)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a namespace file held open; it affects this thread only.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(entered(std::io::Error::last_os_error()));
                }
                ask()
            })
            .join()
            .unwrap_or_else(|_| Err(entered(std::io::Error::other("the thread panicked"))))
    })
}

fn warn_unrepresentable(state: &NftState) {
    for (key, address, port) in render::unrepresentable(state) {
        tracing::warn!(
            service = ?key,
            %address,
            port,
            "destination family differs from its virtual service's: no hairpin rule for it"
        );
    }
}
