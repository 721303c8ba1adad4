//! [`FakeKernel`]: an [`IpvsKernel`] that keeps state as the kernel does, for unit tests of
//! the IPVS dataplane without root or QEMU; and its faulty form, which fails a chosen call.
//!
//! Kept like the kernel: creating a service or destination that exists answers `EEXIST`;
//! editing or deleting a missing service answers `ESRCH`, a missing destination `ENOENT`;
//! destinations of a missing service list empty; the service dump leaves out the services set
//! to be skipped ([`FakeState::dump_skips`]), as the real multipart dump can while another
//! namespace deletes services, while a GET still finds them; binding a bound address and
//! unbinding an unbound one succeed; an nft update fails, changing nothing, when the table is
//! missing or lacks an element it removes; an nft read returns the hairpin set, not the
//! destinations, as the real table holds only that.
//!
//! The handle is shared ([`Clone`]): a test keeps one to look at the state and to give the
//! same kernel to a second dataplane, as a restarted agent finds it.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::conntrack::{BackendFlow, ConntrackError};
use super::kernel::IpvsKernel;
use super::link::LinkError;
use super::netlink::{
    Command, IpvsDestination, IpvsError, IpvsService, MessageCounts, Request, ServiceId,
};
use super::nft::render::Hairpin;
use super::nft::{ListedTable, NftError, NftSettings, NftState};

/// A kind of kernel call, for faults and the call log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CallKind {
    DumpServices,
    GetService,
    Destinations,
    /// One command of a batch: each counts as a call of its own.
    Command,
    DeleteLink,
    LinkAddresses,
    AddressesElsewhere,
    AddAddress,
    DeleteAddress,
    NftExists,
    NftRead,
    NftReplace,
    NftUpdate,
    NftDelete,
    FlushConntrack,
}

/// Which call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Calls of this kind only are counted; `None`: every call.
    pub kind: Option<CallKind>,
    /// The counted call that fails, from 0.
    pub at: usize,
    pub span: FaultSpan,
}

/// Which calls fail besides the one a [`Fault`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultSpan {
    /// None: the kernel answers again at once.
    Once,
    /// Every counted call after it (of the fault's kind, when it names one).
    Onward,
    /// Every call after it, of any kind, as if the agent had died there: the kernel keeps
    /// what the calls before it did, and nothing more happens.
    Crash,
}

/// One call, as the fake saw it, with what it carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    DumpServices,
    GetService(ServiceId),
    Destinations(ServiceId),
    Command(Command),
    DeleteLink,
    LinkAddresses,
    AddressesElsewhere,
    AddAddress(IpAddr),
    DeleteAddress(IpAddr),
    NftExists,
    NftRead,
    NftReplace(NftState),
    NftUpdate { from: NftState, to: NftState },
    NftDelete,
    FlushConntrack(Vec<BackendFlow>),
}

/// One virtual service and its real servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeService {
    pub service: IpvsService,
    pub destinations: BTreeMap<(IpAddr, u16), IpvsDestination>,
}

/// What the fake kernel holds.
#[derive(Debug, Default)]
pub struct FakeState {
    pub services: BTreeMap<ServiceId, FakeService>,
    /// No dummy link (a node where nothing made one); the link's calls find nothing then.
    pub link_missing: bool,
    /// The addresses on the dummy link.
    pub link: BTreeSet<IpAddr>,
    /// The addresses on the other links.
    pub elsewhere: BTreeSet<IpAddr>,
    /// The nft table's sets; `None`: no table.
    pub nft: Option<NftState>,
    /// Services the dump leaves out (the GET still finds them).
    pub dump_skips: BTreeSet<ServiceId>,
    /// Every call that reached the kernel (failed ones included), in order.
    pub calls: Vec<Call>,
    sent: MessageCounts,
    fault: Option<Fault>,
    counted: usize,
    crashed: bool,
}

/// A kernel in memory. See the module.
#[derive(Debug, Clone, Default)]
pub struct FakeKernel {
    state: Arc<Mutex<FakeState>>,
}

impl FakeKernel {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state, to set up or look at. Poisoning only follows a panicking test.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// From now on, fails the call `fault` names (counting from now). `None`: no faults.
    pub fn set_fault(&self, fault: Option<Fault>) {
        let mut state = self.state();
        state.fault = fault;
        state.counted = 0;
        state.crashed = false;
    }

    /// How many calls the current fault counted: with a fault at `usize::MAX`, how many calls
    /// a run makes.
    pub fn counted(&self) -> usize {
        self.state().counted
    }

    /// Logs `call` and says whether it fails.
    fn call(&self, kind: CallKind, call: Call) -> bool {
        let mut state = self.state();
        state.calls.push(call);
        state.fails(kind)
    }
}

impl FakeState {
    fn fails(&mut self, kind: CallKind) -> bool {
        if self.crashed {
            return true;
        }
        let Some(fault) = self.fault else {
            return false;
        };
        if fault.kind.is_some_and(|wanted| wanted != kind) {
            return false;
        }
        let this = self.counted;
        self.counted += 1;
        match fault.span {
            FaultSpan::Onward => this >= fault.at,
            FaultSpan::Once => this == fault.at,
            FaultSpan::Crash => {
                self.crashed = this == fault.at;
                self.crashed
            }
        }
    }

    fn execute(&mut self, command: &Command) -> Result<(), IpvsError> {
        let refuse = |errno| refusal(command, errno);
        match command {
            Command::NewService(service) => {
                self.sent.new_service += 1;
                if self.services.contains_key(&service.id) {
                    return Err(refuse(libc::EEXIST));
                }
                self.services.insert(
                    service.id,
                    FakeService {
                        service: service.clone(),
                        destinations: BTreeMap::new(),
                    },
                );
            }
            Command::SetService(service) => {
                self.sent.set_service += 1;
                let held = self
                    .services
                    .get_mut(&service.id)
                    .ok_or_else(|| refuse(libc::ESRCH))?;
                held.service = service.clone();
            }
            Command::DelService(id) => {
                self.sent.del_service += 1;
                self.services
                    .remove(id)
                    .ok_or_else(|| refuse(libc::ESRCH))?;
            }
            Command::NewDestination(id, destination) => {
                self.sent.new_destination += 1;
                let held = self
                    .services
                    .get_mut(id)
                    .ok_or_else(|| refuse(libc::ESRCH))?;
                let at = (destination.address, destination.port);
                if held.destinations.contains_key(&at) {
                    return Err(refuse(libc::EEXIST));
                }
                held.destinations.insert(at, destination.clone());
            }
            Command::SetDestination(id, destination) => {
                self.sent.set_destination += 1;
                let held = self
                    .services
                    .get_mut(id)
                    .ok_or_else(|| refuse(libc::ESRCH))?;
                let current = held
                    .destinations
                    .get_mut(&(destination.address, destination.port))
                    .ok_or_else(|| refuse(libc::ENOENT))?;
                // The kernel keeps a real server's connection counters across an edit.
                current.weight = destination.weight;
                current.forward = destination.forward;
            }
            Command::DelDestination(id, address, port) => {
                self.sent.del_destination += 1;
                let held = self
                    .services
                    .get_mut(id)
                    .ok_or_else(|| refuse(libc::ESRCH))?;
                held.destinations
                    .remove(&(*address, *port))
                    .ok_or_else(|| refuse(libc::ENOENT))?;
            }
        }
        Ok(())
    }
}

/// The kernel's refusal of `command` with `errno`, as the netlink client reports it.
fn refusal(command: &Command, errno: i32) -> IpvsError {
    let request = Box::new(Request::Command(command.clone()));
    match errno {
        libc::EEXIST => IpvsError::Exists { request },
        _ => IpvsError::NotFound { request, errno },
    }
}

fn injected() -> io::Error {
    io::Error::other("fault injected by the fake kernel")
}

fn ipvs_fault(request: Request) -> IpvsError {
    IpvsError::Kernel {
        request: Box::new(request),
        errno: libc::EIO,
        message: None,
        source: io::Error::from_raw_os_error(libc::EIO),
    }
}

fn nft_fault() -> NftError {
    NftError::Wait {
        action: "injected fault",
        source: injected(),
    }
}

fn link_fault() -> LinkError {
    LinkError::Connect(injected())
}

/// The hairpin set's elements for `destinations`, as the real table derives them.
fn hairpins(state: &NftState) -> BTreeSet<Hairpin> {
    state
        .destinations
        .iter()
        .map(|(key, address, port)| (*address, key.protocol, *port))
        .collect()
}

/// `to` applied over `table`, where `from` is what the caller believes the table holds.
/// `None` when an element to remove is missing (nft refuses the whole transaction).
fn update(table: &NftState, from: &NftState, to: &NftState) -> Option<NftState> {
    let mut next = table.clone();
    for (key, value) in &from.services {
        if to.services.get(key) != Some(value) && next.services.remove(key) != Some(*value) {
            return None;
        }
    }
    for (key, value) in &from.source_ranges {
        if to.source_ranges.get(key) != Some(value)
            && next.source_ranges.remove(key).as_ref() != Some(value)
        {
            return None;
        }
    }
    for element in from.destinations.difference(&to.destinations) {
        if !next.destinations.remove(element) {
            return None;
        }
    }
    for address in from.node_addresses.difference(&to.node_addresses) {
        if !next.node_addresses.remove(address) {
            return None;
        }
    }
    next.services
        .extend(to.services.iter().map(|(key, value)| (*key, *value)));
    next.source_ranges.extend(
        to.source_ranges
            .iter()
            .map(|(key, value)| (*key, value.clone())),
    );
    next.destinations.extend(to.destinations.iter().copied());
    next.node_addresses
        .extend(to.node_addresses.iter().copied());
    Some(next)
}

impl IpvsKernel for FakeKernel {
    fn dump_services(&mut self) -> Result<Vec<IpvsService>, IpvsError> {
        if self.call(CallKind::DumpServices, Call::DumpServices) {
            return Err(ipvs_fault(Request::DumpServices));
        }
        let mut state = self.state();
        state.sent.dump_services += 1;
        Ok(state
            .services
            .values()
            .filter(|held| !state.dump_skips.contains(&held.service.id))
            .map(|held| held.service.clone())
            .collect())
    }

    fn get_service(&mut self, id: &ServiceId) -> Result<Option<IpvsService>, IpvsError> {
        if self.call(CallKind::GetService, Call::GetService(*id)) {
            return Err(ipvs_fault(Request::GetService(*id)));
        }
        let mut state = self.state();
        state.sent.get_service += 1;
        Ok(state.services.get(id).map(|held| held.service.clone()))
    }

    fn destinations(&mut self, id: &ServiceId) -> Result<Vec<IpvsDestination>, IpvsError> {
        if self.call(CallKind::Destinations, Call::Destinations(*id)) {
            return Err(ipvs_fault(Request::DumpDestinations(*id)));
        }
        let mut state = self.state();
        state.sent.dump_destinations += 1;
        Ok(state
            .services
            .get(id)
            .map(|held| held.destinations.values().cloned().collect())
            .unwrap_or_default())
    }

    fn execute(&mut self, commands: &[Command]) -> Vec<Result<(), IpvsError>> {
        commands
            .iter()
            .map(|command| {
                if self.call(CallKind::Command, Call::Command(command.clone())) {
                    return Err(ipvs_fault(Request::Command(command.clone())));
                }
                self.state().execute(command)
            })
            .collect()
    }

    fn messages_sent(&self) -> MessageCounts {
        self.state().sent
    }

    fn has_link(&self) -> bool {
        !self.state().link_missing
    }

    fn delete_link(&mut self) -> impl Future<Output = Result<(), LinkError>> + Send {
        let result = if self.call(CallKind::DeleteLink, Call::DeleteLink) {
            Err(link_fault())
        } else {
            let mut state = self.state();
            state.link_missing = true;
            state.link.clear();
            Ok(())
        };
        std::future::ready(result)
    }

    fn link_addresses(&self) -> impl Future<Output = Result<BTreeSet<IpAddr>, LinkError>> + Send {
        let result = if self.call(CallKind::LinkAddresses, Call::LinkAddresses) {
            Err(link_fault())
        } else {
            Ok(self.state().link.clone())
        };
        std::future::ready(result)
    }

    fn addresses_elsewhere(
        &self,
    ) -> impl Future<Output = Result<BTreeSet<IpAddr>, LinkError>> + Send {
        let result = if self.call(CallKind::AddressesElsewhere, Call::AddressesElsewhere) {
            Err(link_fault())
        } else {
            Ok(self.state().elsewhere.clone())
        };
        std::future::ready(result)
    }

    fn add_address(&self, address: IpAddr) -> impl Future<Output = Result<(), LinkError>> + Send {
        let result = if self.call(CallKind::AddAddress, Call::AddAddress(address)) {
            Err(link_fault())
        } else if self.state().link_missing {
            Err(LinkError::Missing)
        } else {
            self.state().link.insert(address);
            Ok(())
        };
        std::future::ready(result)
    }

    fn delete_address(
        &self,
        address: IpAddr,
    ) -> impl Future<Output = Result<(), LinkError>> + Send {
        let result = if self.call(CallKind::DeleteAddress, Call::DeleteAddress(address)) {
            Err(link_fault())
        } else {
            self.state().link.remove(&address);
            Ok(())
        };
        std::future::ready(result)
    }

    fn nft_exists(&mut self) -> Result<bool, NftError> {
        if self.call(CallKind::NftExists, Call::NftExists) {
            return Err(nft_fault());
        }
        Ok(self.state().nft.is_some())
    }

    fn nft_read(&mut self) -> Result<Option<ListedTable>, NftError> {
        if self.call(CallKind::NftRead, Call::NftRead) {
            return Err(nft_fault());
        }
        Ok(self.state().nft.as_ref().map(|table| ListedTable {
            hairpins: hairpins(table),
            state: NftState {
                destinations: BTreeSet::new(),
                ..table.clone()
            },
        }))
    }

    fn nft_replace(&mut self, _settings: &NftSettings, state: &NftState) -> Result<(), NftError> {
        if self.call(CallKind::NftReplace, Call::NftReplace(state.clone())) {
            return Err(nft_fault());
        }
        self.state().nft = Some(state.clone());
        Ok(())
    }

    fn nft_update(&mut self, from: &NftState, to: &NftState) -> Result<(), NftError> {
        let call = Call::NftUpdate {
            from: from.clone(),
            to: to.clone(),
        };
        if from == to {
            // nft is not run for an empty change, so nothing can fail.
            self.state().calls.push(call);
            return Ok(());
        }
        if self.call(CallKind::NftUpdate, call) {
            return Err(nft_fault());
        }
        let mut state = self.state();
        let next = state
            .nft
            .as_ref()
            .and_then(|table| update(table, from, to))
            .ok_or_else(|| NftError::Wait {
                action: "update (the table lacks an element it removes)",
                source: io::Error::from_raw_os_error(libc::ENOENT),
            })?;
        state.nft = Some(next);
        Ok(())
    }

    fn nft_delete(&mut self) -> Result<(), NftError> {
        if self.call(CallKind::NftDelete, Call::NftDelete) {
            return Err(nft_fault());
        }
        self.state().nft = None;
        Ok(())
    }

    fn flush_conntrack(&mut self, flows: &[BackendFlow]) -> Result<usize, ConntrackError> {
        if self.call(
            CallKind::FlushConntrack,
            Call::FlushConntrack(flows.to_vec()),
        ) {
            return Err(ConntrackError::Socket(injected()));
        }
        Ok(0)
    }
}
