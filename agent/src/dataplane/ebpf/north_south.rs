//! North-south in eBPF mode: the tc programs (`ebpf/src/north_south.rs`) that balance traffic
//! from outside the node to NodePorts, externalIPs and load-balancer IPs, on the node's
//! devices, from the same Service and backend maps as the socket programs.
//!
//! [`attach`] loads the programs (their maps shared through the pinned maps directory), attaches
//! `tp_ns_ingress` and `tp_ns_egress` to each device and records each device's node address
//! (the SNAT source) and the SNAT port range in the maps. On kernels ≥ 6.6 the attachments are
//! tcx links pinned as `link_tp_ns_{ingress,egress}_<device>`, so they outlive the agent and
//! [`super::cleanup`] detaches them with the others; each start swaps the freshly loaded
//! programs into the pinned links in one `BPF_LINK_UPDATE`, so no packet goes unbalanced in
//! between. Older kernels get a `clsact` qdisc and a netlink filter at a fixed priority and
//! handle, replaced in place on each start; [`detach_netlink_filters`] removes them.
//!
//! Devices and their addresses change under a running agent (DHCP, a bond brought up later):
//! [`refresh`] reads them again after every sync, rewrites the SNAT sources in place when only
//! addresses moved, and attaches to new devices and detaches from gone ones otherwise.

use std::ffi::{CStr, CString};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use std::borrow::BorrowMut;

use aya::maps::{Array, HashMap, Map, MapData};
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType, TcHandle};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use ipnetwork::IpNetwork;
use topoproxy_common::north_south::{
    self as abi, Cidr, Config, Device, Masquerade, DEFAULT_SNAT_PORTS,
};
use topoproxy_common::MAPS_DIR;

use super::{convert, loader, reserved_ports, EbpfError};
use crate::dataplane::error_chain;
use crate::dataplane::ipvs::sysctl::Sysctls;

/// The tc programs and where each attaches.
pub const PROGRAMS: [(&str, TcAttachType); 2] = [
    ("tp_ns_ingress", TcAttachType::Ingress),
    ("tp_ns_egress", TcAttachType::Egress),
];

/// Netlink filter priority and handle on kernels without tcx (fixed, so a restart replaces
/// the filter in place instead of adding a second one).
const NETLINK_PRIORITY: u16 = 1;
const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 0x7470);

/// Which devices get the tc programs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Interfaces {
    /// The devices holding the node's addresses: every device that is up, is not loopback and
    /// holds a global unicast address.
    #[default]
    Auto,
    /// These devices.
    Named(Vec<String>),
    /// None: only the socket path (processes on the node) is balanced.
    Off,
}

/// The settings of the north-south programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NorthSouthSettings {
    pub interfaces: Interfaces,
    /// SNAT source ports (inclusive) for flows to remote backends.
    pub snat_ports: (u16, u16),
    /// `--masquerade-all`: SNAT every ClusterIP flow from outside to a remote backend.
    pub masquerade_all: bool,
    /// `--cluster-cidr`: ClusterIP flows from outside these are SNATed (kube-proxy's rule).
    pub cluster_cidrs: Vec<IpNetwork>,
}

impl Default for NorthSouthSettings {
    fn default() -> Self {
        Self {
            interfaces: Interfaces::Auto,
            snat_ports: DEFAULT_SNAT_PORTS,
            masquerade_all: false,
            cluster_cidrs: Vec::new(),
        }
    }
}

/// The tc programs' masquerade entry for `settings` (kube-proxy takes at most one CIDR per
/// family; more than [`abi::MAX_CLUSTER_CIDRS`] are refused).
pub fn masquerade_value(settings: &NorthSouthSettings) -> Result<Masquerade, EbpfError> {
    if settings.cluster_cidrs.len() > abi::MAX_CLUSTER_CIDRS {
        return Err(EbpfError::TooManyClusterCidrs(settings.cluster_cidrs.len()));
    }
    let mut value = Masquerade {
        masquerade_all: u32::from(settings.masquerade_all),
        cidr_count: settings.cluster_cidrs.len() as u32,
        ..Masquerade::default()
    };
    for (slot, cidr) in value.cluster_cidrs.iter_mut().zip(&settings.cluster_cidrs) {
        let endpoint = convert::endpoint(cidr.network(), 0);
        *slot = Cidr {
            addr: endpoint.addr,
            prefix_len: cidr.prefix(),
            family: endpoint.family,
            _pad: [0; 2],
        };
    }
    Ok(value)
}

fn write_masquerade(ebpf: &mut Ebpf, settings: &NorthSouthSettings) -> Result<(), EbpfError> {
    let value = masquerade_value(settings)?;
    let map = ebpf
        .map_mut(abi::maps::MASQUERADE)
        .ok_or(EbpfError::MissingMap(abi::maps::MASQUERADE))?;
    let mut map: Array<&mut MapData, Masquerade> =
        Array::try_from(map).map_err(map_error("open"))?;
    map.set(0, value, 0).map_err(map_error("set"))
}

/// What [`attach`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NorthSouthReport {
    /// The devices the programs run on.
    pub interfaces: Vec<String>,
    /// Attachments made by this call.
    pub attached: usize,
    /// Attachments of a previous agent that now run this agent's programs.
    pub replaced: usize,
    /// Netlink tc (kernel < 6.6) rather than tcx links.
    pub netlink: bool,
    /// The devices as attached, with the addresses written for them.
    pub devices: Vec<NodeDevice>,
    /// `tp_ns_ingress`'s program id: the tc programs' log ring buffer is among its maps.
    pub program_id: Option<u32>,
}

/// What [`refresh`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refreshed {
    /// The same devices with the same addresses.
    Unchanged,
    /// The same devices; their addresses changed and the SNAT sources were rewritten.
    Addresses(Vec<NodeDevice>),
    /// Devices came or went: the programs were attached again (to the new set) and detached
    /// from the devices no longer wanted.
    Reattached(NorthSouthReport),
}

/// A device and the addresses the programs SNAT to when a packet leaves through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDevice {
    pub name: String,
    pub ifindex: u32,
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// Attaches the tc programs to the devices `settings` names and writes the device and SNAT
/// maps. The socket programs' maps must already be pinned and filled in `pin_dir`
/// ([`super::EbpfDataplane::attach_north_south`] waits for that). Does nothing for
/// [`Interfaces::Off`].
pub fn attach(
    pin_dir: &Path,
    settings: &NorthSouthSettings,
) -> Result<NorthSouthReport, EbpfError> {
    let Some(devices) = wanted_devices(settings)? else {
        return Ok(NorthSouthReport::default());
    };
    let maps_dir = pin_dir.join(MAPS_DIR);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&maps_dir)
        .load(loader::object())
        .map_err(|source| EbpfError::Load {
            pin_dir: maps_dir.clone(),
            source: Box::new(source),
        })?;
    // Devices and SNAT settings first: the programs must know their devices before a packet.
    {
        let map = ebpf
            .map_mut(abi::maps::DEVICES)
            .ok_or(EbpfError::MissingMap(abi::maps::DEVICES))?;
        let mut map = HashMap::try_from(map).map_err(map_error("open"))?;
        write_devices(&mut map, &devices)?;
    }
    let previous = snat_ports_of(&mut ebpf);
    write_config(&mut ebpf, settings.snat_ports)?;
    write_masquerade(&mut ebpf, settings)?;
    reserve_snat_ports(previous, settings.snat_ports);
    let netlink = uses_netlink();
    let mut report = NorthSouthReport {
        interfaces: devices.iter().map(|d| d.name.clone()).collect(),
        netlink,
        ..NorthSouthReport::default()
    };
    for (name, attach_type) in PROGRAMS {
        let program = classifier(&mut ebpf, name)?;
        program.load().map_err(program_error(name))?;
        if report.program_id.is_none() {
            report.program_id = program.info().ok().map(|info| info.id());
        }
        for device in &devices {
            let replaced = if netlink {
                attach_netlink(program, name, attach_type, &device.name)?
            } else {
                attach_tcx(program, name, attach_type, &device.name, pin_dir)?
            };
            if replaced {
                report.replaced += 1;
            } else {
                report.attached += 1;
            }
        }
    }
    report.devices = devices;
    Ok(report)
}

/// Reads the devices and their node addresses again and brings the tc programs up to date
/// with them, against `known` (what the last [`attach`] or refresh found).
pub fn refresh(
    pin_dir: &Path,
    settings: &NorthSouthSettings,
    known: &[NodeDevice],
) -> Result<Refreshed, EbpfError> {
    let Some(devices) = wanted_devices(settings)? else {
        return Ok(Refreshed::Unchanged);
    };
    if devices == known {
        return Ok(Refreshed::Unchanged);
    }
    if same_devices(&devices, known) {
        let path = pin_dir.join(MAPS_DIR).join(abi::maps::DEVICES);
        let pinned = MapData::from_pin(&path).map_err(map_error("open pinned"))?;
        let mut map = HashMap::try_from(Map::HashMap(pinned)).map_err(map_error("open"))?;
        write_devices(&mut map, &devices)?;
        return Ok(Refreshed::Addresses(devices));
    }
    let report = attach(pin_dir, settings)?;
    for gone in known
        .iter()
        .filter(|old| report.devices.iter().all(|new| new.name != old.name))
    {
        detach_device(pin_dir, &gone.name, report.netlink)?;
    }
    Ok(Refreshed::Reattached(report))
}

/// The same devices (names and indexes), whatever their addresses.
fn same_devices(a: &[NodeDevice], b: &[NodeDevice]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| a.name == b.name && a.ifindex == b.ifindex)
}

/// Takes our programs off `device`: its pinned tcx links (unpinning the last reference
/// detaches them), or its netlink filters. A device that is gone took them with it.
fn detach_device(pin_dir: &Path, device: &str, netlink: bool) -> Result<(), EbpfError> {
    for (name, attach_type) in PROGRAMS {
        if netlink {
            // Fails only when the device or the filter is gone already.
            let _ = tc::qdisc_detach_program(device, attach_type, name);
        } else {
            loader::remove_if_present(&link_pin(pin_dir, name, device))?;
        }
    }
    Ok(())
}

/// Kernels before 6.6 have no tcx: netlink `clsact` filters there.
fn uses_netlink() -> bool {
    !KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// The devices `settings` names, with their addresses, sorted by name; `None` when
/// north-south is off.
fn wanted_devices(settings: &NorthSouthSettings) -> Result<Option<Vec<NodeDevice>>, EbpfError> {
    let mut devices = match &settings.interfaces {
        Interfaces::Off => return Ok(None),
        Interfaces::Auto => node_devices(None)?,
        Interfaces::Named(names) => node_devices(Some(names))?,
    };
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Some(devices))
}

/// Logs what [`attach`] did.
pub fn log_report(report: &NorthSouthReport) {
    tracing::info!(
        interfaces = ?report.interfaces,
        attached = report.attached,
        replaced = report.replaced,
        netlink = report.netlink,
        "north-south tc programs in place"
    );
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))
}

fn program_error(program: &'static str) -> impl Fn(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program {
        program,
        source: Box::new(source),
    }
}

/// Where the tcx link of `program` on `device` is pinned (bpffs refuses dots in names).
pub fn link_pin(pin_dir: &Path, program: &str, device: &str) -> PathBuf {
    pin_dir.join(format!("link_{program}_{}", device.replace('.', "_")))
}

/// Attaches through a pinned tcx link; `true` when an existing link was updated.
fn attach_tcx(
    program: &mut SchedClassifier,
    name: &'static str,
    attach_type: TcAttachType,
    device: &str,
    pin_dir: &Path,
) -> Result<bool, EbpfError> {
    let path = link_pin(pin_dir, name, device);
    if let Ok(pinned) = PinnedLink::from_pin(&path) {
        let link = SchedClassifierLink::try_from(FdLink::from(pinned));
        match link.map(|link| program.attach_to_link(link)) {
            Ok(Ok(id)) => {
                // The pin keeps the link; dropping our handle only closes the descriptor.
                drop(program.take_link(id).map_err(program_error(name))?);
                return Ok(true);
            }
            // A link whose device went away (or not a tcx link): attach afresh.
            Ok(Err(error)) => {
                tracing::warn!(%error, device, program = name, "replacing a defunct pinned tc link")
            }
            Err(error) => {
                tracing::warn!(%error, device, program = name, "replacing a pinned link that is not tcx")
            }
        }
        loader::remove_if_present(&path)?;
    }
    let id = program
        .attach_with_options(
            device,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(program_error(name))?;
    let link = program.take_link(id).map_err(program_error(name))?;
    let link = FdLink::try_from(link).map_err(|_| EbpfError::NoBpfLink(name))?;
    link.pin(&path)
        .map_err(|source| EbpfError::Pin { path, source })?;
    Ok(false)
}

/// Attaches as a netlink filter at our fixed priority and handle, replacing ours if there;
/// `true` when it replaced one.
fn attach_netlink(
    program: &mut SchedClassifier,
    name: &'static str,
    attach_type: TcAttachType,
    device: &str,
) -> Result<bool, EbpfError> {
    if let Err(error) = tc::qdisc_add_clsact(device) {
        // EEXIST: the qdisc is already there (ours from before, or another tool's).
        tracing::debug!(%error, device, "adding the clsact qdisc");
    }
    let existing =
        SchedClassifierLink::attached(device, attach_type, NETLINK_PRIORITY, NETLINK_HANDLE, None)
            .map_err(|source| EbpfError::Io {
                call: "if_nametoindex",
                path: PathBuf::from(device),
                source,
            })?;
    let (id, replaced) = match program.attach_to_link(existing) {
        Ok(id) => (id, true),
        Err(_) => {
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: NETLINK_PRIORITY,
                handle: NETLINK_HANDLE,
                classid: None,
            });
            let id = program
                .attach_with_options(device, attach_type, options)
                .map_err(program_error(name))?;
            (id, false)
        }
    };
    // A netlink filter stays on the qdisc after we exit; dropping the link would detach it.
    std::mem::forget(program.take_link(id).map_err(program_error(name))?);
    Ok(replaced)
}

/// Removes our netlink tc filters from every device of this network namespace (kernels
/// without tcx; tcx links are pinned and [`super::cleanup`] detaches them). Returns how many
/// filters were removed.
pub fn detach_netlink_filters() -> usize {
    let mut removed = 0;
    for device in interface_names() {
        for (name, attach_type) in PROGRAMS {
            if tc::qdisc_detach_program(&device, attach_type, name).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

fn write_devices<T: BorrowMut<MapData>>(
    map: &mut HashMap<T, u32, Device>,
    devices: &[NodeDevice],
) -> Result<(), EbpfError> {
    let stale: Vec<u32> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|ifindex| devices.iter().all(|d| d.ifindex != *ifindex))
        .collect();
    for device in devices {
        map.insert(device.ifindex, device_value(device), 0)
            .map_err(map_error("insert"))?;
    }
    for ifindex in stale {
        map.remove(&ifindex).map_err(map_error("remove"))?;
    }
    Ok(())
}

/// The SNAT range the pinned config holds (`None` before the first attach: all zero).
fn snat_ports_of(ebpf: &mut Ebpf) -> Option<(u16, u16)> {
    let map = ebpf.map_mut(abi::maps::CONFIG)?;
    let map: Array<&mut MapData, Config> = Array::try_from(map).ok()?;
    let config = map.get(&0, 0).ok()?;
    (config.snat_port_max != 0).then_some((config.snat_port_min, config.snat_port_max))
}

/// The SNAT range the pinned config of `pin_dir` holds, for `topoproxy cleanup`.
pub fn pinned_snat_ports(pin_dir: &Path) -> Option<(u16, u16)> {
    let path = pin_dir.join(MAPS_DIR).join(abi::maps::CONFIG);
    let pinned = MapData::from_pin(&path).ok()?;
    let map: Array<MapData, Config> = Array::try_from(Map::Array(pinned)).ok()?;
    let config = map.get(&0, 0).ok()?;
    (config.snat_port_max != 0).then_some((config.snat_port_min, config.snat_port_max))
}

/// Keeps the SNAT range out of the node's ephemeral ports ([`reserved_ports`]), releasing a
/// range an earlier configuration reserved. A failure (a read-only `/proc/sys`) is logged:
/// SNAT works without it, only a widened `ip_local_port_range` may then collide.
fn reserve_snat_ports(previous: Option<(u16, u16)>, range: (u16, u16)) {
    let sysctls = Sysctls::proc();
    if let Some(previous) = previous.filter(|previous| *previous != range) {
        if let Err(error) = reserved_ports::release(&sysctls, previous) {
            tracing::warn!(error = %error_chain(&error), "releasing the former SNAT port range failed");
        }
    }
    if let Err(error) = reserved_ports::reserve(&sysctls, range) {
        tracing::warn!(
            error = %error_chain(&error),
            "the SNAT port range is not reserved: a node socket given one of its ports by a \
             widened ip_local_port_range can collide with SNATed flows"
        );
    }
}

fn write_config(ebpf: &mut Ebpf, (min, max): (u16, u16)) -> Result<(), EbpfError> {
    let map = ebpf
        .map_mut(abi::maps::CONFIG)
        .ok_or(EbpfError::MissingMap(abi::maps::CONFIG))?;
    let mut map: Array<&mut MapData, Config> = Array::try_from(map).map_err(map_error("open"))?;
    let config = Config {
        snat_port_min: min,
        snat_port_max: max,
        _pad: 0,
    };
    map.set(0, config, 0).map_err(map_error("set"))
}

fn map_error(call: &'static str) -> impl Fn(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map {
        map: "north-south",
        call,
        source: Box::new(source),
    }
}

/// The map value for `device`: its addresses as the programs compare them.
pub fn device_value(device: &NodeDevice) -> Device {
    Device {
        addr4: device
            .v4
            .map(|a| convert::endpoint(IpAddr::V4(a), 0).addr[0])
            .unwrap_or(0),
        addr6: device
            .v6
            .map(|a| convert::endpoint(IpAddr::V6(a), 0).addr)
            .unwrap_or([0; 4]),
    }
}

/// The devices of this network namespace holding a node address (`names: None`), or the
/// named ones, each with its first global IPv4 and IPv6 address.
fn node_devices(names: Option<&Vec<String>>) -> Result<Vec<NodeDevice>, EbpfError> {
    let addresses =
        crate::node_addresses::interface_addresses().map_err(|source| EbpfError::Io {
            call: "getifaddrs",
            path: PathBuf::new(),
            source,
        })?;
    let mut devices: Vec<NodeDevice> = Vec::new();
    let wanted: Vec<String> = match names {
        Some(names) => names.clone(),
        None => {
            let mut auto: Vec<String> = addresses
                .iter()
                .filter(|a| a.up && !a.loopback && is_node_address(&a.address))
                .map(|a| a.name.clone())
                .collect();
            auto.dedup();
            auto
        }
    };
    for name in wanted {
        if devices.iter().any(|d| d.name == name) {
            continue;
        }
        let c_name =
            CString::new(name.as_str()).map_err(|_| EbpfError::NoInterface(name.clone()))?;
        // SAFETY: a NUL-terminated name we own.
        let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        if ifindex == 0 {
            return Err(EbpfError::NoInterface(name));
        }
        let mine = || addresses.iter().filter(|a| a.name == name);
        devices.push(NodeDevice {
            ifindex,
            v4: mine().find_map(|a| match a.address {
                IpAddr::V4(v4) if is_node_address(&a.address) => Some(v4),
                _ => None,
            }),
            v6: mine().find_map(|a| match a.address {
                IpAddr::V6(v6) if is_node_address(&a.address) => Some(v6),
                _ => None,
            }),
            name,
        });
    }
    Ok(devices)
}

/// A global unicast address (not loopback, link-local or multicast).
pub fn is_node_address(address: &IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_unspecified())
        }
        IpAddr::V6(v6) => {
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            !(v6.is_loopback() || link_local || v6.is_multicast() || v6.is_unspecified())
        }
    }
}

/// The names of this network namespace's devices (`if_nameindex`).
fn interface_names() -> Vec<String> {
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Vec::new();
    }
    let mut names = Vec::new();
    let mut entry = head;
    // SAFETY: walking the array up to its terminating entry.
    unsafe {
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            names.push(
                CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(head);
    }
    names
}

/// Parses `MIN-MAX` (inclusive, MIN ≥ 1, MIN ≤ MAX).
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let (min, max) = text.trim().split_once('-')?;
    let (min, max): (u16, u16) = (min.trim().parse().ok()?, max.trim().parse().ok()?);
    (min >= 1 && min <= max).then_some((min, max))
}

/// Parses the `north-south-interfaces` setting: `auto`, `none` or a comma-separated list.
pub fn parse_interfaces(text: &str) -> Option<Interfaces> {
    match text.trim() {
        "auto" => Some(Interfaces::Auto),
        "none" => Some(Interfaces::Off),
        list => {
            let names: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_owned)
                .collect();
            let valid = |name: &String| name.len() < libc::IFNAMSIZ && !name.contains(['/', ' ']);
            (!names.is_empty() && names.iter().all(valid)).then_some(Interfaces::Named(names))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_are_global_unicast_only() {
        for global in ["10.0.0.1", "192.0.2.7", "2001:db8::1", "fd00::1"] {
            assert!(is_node_address(&global.parse().expect("ip")), "{global}");
        }
        for other in [
            "127.0.0.1",
            "169.254.1.1",
            "::1",
            "fe80::1",
            "224.0.0.1",
            "0.0.0.0",
        ] {
            assert!(!is_node_address(&other.parse().expect("ip")), "{other}");
        }
    }

    #[test]
    fn settings_parse_and_refuse_nonsense() {
        assert_eq!(parse_port_range("61000-65535"), Some((61000, 65535)));
        assert_eq!(parse_port_range(" 40000 - 40000 "), Some((40000, 40000)));
        for bad in ["", "0-10", "10-9", "a-b", "70000-70001", "100"] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
        assert_eq!(parse_interfaces("auto"), Some(Interfaces::Auto));
        assert_eq!(parse_interfaces("none"), Some(Interfaces::Off));
        assert_eq!(
            parse_interfaces("eth0, bond0.100"),
            Some(Interfaces::Named(vec!["eth0".into(), "bond0.100".into()]))
        );
        for bad in ["", " , ", "a/b", "averyveryverylongname0"] {
            assert_eq!(parse_interfaces(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn masquerade_entries_follow_kube_proxys_settings() {
        let settings = NorthSouthSettings {
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().expect("cidr"),
                "fd00:10:244::/56".parse().expect("cidr"),
            ],
            ..NorthSouthSettings::default()
        };
        let value = masquerade_value(&settings).expect("value");
        assert_eq!((value.masquerade_all, value.cidr_count), (0, 2));
        assert_eq!(
            value.cluster_cidrs[0].addr[0].to_ne_bytes(),
            [10, 244, 0, 0]
        );
        assert_eq!(value.cluster_cidrs[0].prefix_len, 16);
        assert_eq!(value.cluster_cidrs[1].prefix_len, 56);
        assert_eq!(value.cluster_cidrs[1].family, topoproxy_common::FAMILY_V6);
        let all = NorthSouthSettings {
            masquerade_all: true,
            ..NorthSouthSettings::default()
        };
        assert_eq!(masquerade_value(&all).expect("value").masquerade_all, 1);
        let many = NorthSouthSettings {
            cluster_cidrs: vec!["10.0.0.0/8".parse().expect("cidr"); 5],
            ..NorthSouthSettings::default()
        };
        assert!(masquerade_value(&many).is_err());
    }

    #[test]
    fn device_values_hold_network_order_words() {
        let device = NodeDevice {
            name: "eth0".into(),
            ifindex: 2,
            v4: Some(Ipv4Addr::new(10, 77, 0, 1)),
            v6: None,
        };
        let value = device_value(&device);
        assert_eq!(value.addr4.to_ne_bytes(), [10, 77, 0, 1]);
        assert_eq!(value.addr6, [0; 4]);
        assert_eq!(
            link_pin(Path::new("/p"), "tp_ns_ingress", "bond0.100"),
            PathBuf::from("/p/link_tp_ns_ingress_bond0_100")
        );
    }
}
