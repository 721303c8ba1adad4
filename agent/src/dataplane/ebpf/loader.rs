//! Loading, attaching, pinning and adopting the eBPF programs and maps, and removing them.
//!
//! Everything of ours lives in one bpffs directory (`/sys/fs/bpf/topoproxy` by default): the
//! maps under their own names, each program as `prog_<name>_v<version>` (bpffs refuses dots
//! in names) and its cgroup link as `link_<name>`. A pinned link keeps its program attached
//! after the agent exits, so Services keep resolving while it is down; the next agent finds
//! the pins and adopts them instead of attaching again. The version is a hash of the embedded
//! object: an agent whose programs differ from the pinned ones (an upgrade, or a downgrade)
//! swaps its programs into the existing links with `BPF_LINK_UPDATE`, which the kernel does
//! atomically, so no connect goes unbalanced in between. [`cleanup`] detaches and unpins all
//! of it.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, LpmTrie, Map, PerCpuHashMap};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use topoproxy_common::{maps, MAPS_DIR};

use super::maps::PinnedMaps;
use super::{EbpfError, EbpfSettings};

/// The object built from `ebpf/` by `agent/build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/topoproxy-ebpf"));

/// The embedded object, for the north-south loader (its maps are shared through the pins).
pub(super) fn object() -> &'static [u8] {
    OBJECT
}

/// Every program with the hook it attaches to.
///
/// # Minimum kernel version
///
/// connect4/6 4.17, sendmsg4/6 4.18, recvmsg4/6 5.2, getpeername4/6 5.8; cgroup `bpf_link`
/// (which pinning needs) 5.7. `bpf_get_netns_cookie` in these hooks: 5.7.
pub const PROGRAMS: [&str; 8] = [
    "tp_connect4",
    "tp_connect6",
    "tp_sendmsg4",
    "tp_sendmsg6",
    "tp_recvmsg4",
    "tp_recvmsg6",
    "tp_getpeername4",
    "tp_getpeername6",
];

/// Where fresh maps are pinned until the programs switch to them.
const STAGING_MAPS_DIR: &str = "maps_staging";

const MAP_NAMES: [&str; 10] = [
    maps::SERVICES,
    maps::BACKENDS,
    maps::REV_NAT,
    maps::AFFINITY,
    maps::SERVICE_STATS,
    maps::BACKEND_STATS,
    maps::LOG_CONFIG,
    maps::LOG_BUDGET,
    maps::SOURCE_RANGES,
    maps::MAGLEV,
];

/// What [`load`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Programs whose pinned link was already there (a previous agent attached them).
    pub adopted: Vec<&'static str>,
    /// Programs attached by this call.
    pub attached: Vec<&'static str>,
    /// Programs of another version whose links now run this agent's programs.
    pub upgraded: Vec<&'static str>,
    /// Whether the kernel took the object's BTF with the programs this call loaded (it then
    /// knows their functions and source lines); `None` when every program was adopted.
    pub btf: Option<bool>,
}

/// The version of the embedded programs: FNV-1a of the object, as 16 hex digits. Any change to
/// the programs or the map ABI changes it.
pub fn programs_version() -> String {
    let hash = OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

fn link_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join(format!("link_{program}"))
}

/// Where this agent's version of `program` is pinned.
pub fn program_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join(format!("prog_{program}_v{}", programs_version()))
}

/// The id of the program our links run for `tp_connect4` (every program of one load shares
/// the maps, the log ring buffer among them).
pub(super) fn pinned_program_id(pin_dir: &Path) -> Result<u32, EbpfError> {
    let path = program_pin(pin_dir, PROGRAMS[0]);
    aya::programs::ProgramInfo::from_pin(&path)
        .map(|info| info.id())
        .map_err(|source| EbpfError::Program {
            program: PROGRAMS[0],
            source: Box::new(source),
        })
}

/// Pins of `program` from any other version (`prog_<name>` before versions were recorded).
fn stale_program_pins(pin_dir: &Path, program: &str) -> Result<Vec<PathBuf>, EbpfError> {
    let ours = program_pin(pin_dir, program);
    let unversioned = format!("prog_{program}");
    let versioned = format!("prog_{program}_v");
    let entries = std::fs::read_dir(pin_dir).map_err(|source| EbpfError::Io {
        call: "read_dir",
        path: pin_dir.to_owned(),
        source,
    })?;
    let mut stale = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| EbpfError::Io {
            call: "read_dir",
            path: pin_dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if (name == unversioned || name.starts_with(&versioned)) && entry.path() != ours {
            stale.push(entry.path());
        }
    }
    Ok(stale)
}

/// Whether this agent's maps are all pinned in `pin_dir` (an agent of this map ABI has
/// programmed them).
pub fn maps_pinned(pin_dir: &Path) -> bool {
    let maps_dir = pin_dir.join(MAPS_DIR);
    MAP_NAMES.iter().all(|name| maps_dir.join(name).exists())
}

/// Creates or opens the pinned maps and makes sure every program is attached through a pinned
/// link, adopting the links a previous agent left.
///
/// When this agent's maps are not all pinned (a first start, an agent of another map ABI
/// before it, or a pin removed by hand), it loads fresh maps into a staging directory and
/// attaches only where no link exists. Links that exist keep running their programs, with
/// the maps they were loaded with, until [`MapSwitch::complete`] swaps them over, which the
/// caller does once it has written the whole table into the new maps: no connect finds an
/// empty table in between.
pub(super) fn load(
    settings: &EbpfSettings,
) -> Result<(PinnedMaps, LoadReport, Option<MapSwitch>), EbpfError> {
    raise_memlock();
    if let Some(parent) = settings.pin_dir.parent() {
        ensure_bpffs(parent)?;
    }
    create_dir(&settings.pin_dir)?;
    if !maps_pinned(&settings.pin_dir) {
        return load_switching(settings);
    }
    let maps_dir = settings.pin_dir.join(MAPS_DIR);
    let mut ebpf = load_object(&maps_dir)?;
    let mut report = LoadReport::default();
    let mut cgroup = CgroupHandle::default();
    for name in PROGRAMS {
        let link_path = link_pin(&settings.pin_dir, name);
        if let Ok(link) = bpf_obj_get(&link_path) {
            if is_bpf_object(&program_pin(&settings.pin_dir, name)) {
                report.adopted.push(name);
            } else {
                // Another version of the programs, on these same maps: swap now.
                load_program(&mut ebpf, name)?;
                swap_into_link(&mut ebpf, name, &link, &settings.pin_dir)?;
                report.upgraded.push(name);
            }
            continue;
        }
        attach(&mut ebpf, name, cgroup.open(settings)?, &settings.pin_dir)?;
        report.attached.push(name);
    }
    report.btf = loaded_with_btf(&mut ebpf);
    Ok((take_maps(&mut ebpf)?, report, None))
}

/// The first half of [`load`] for fresh maps: they are pinned under a staging name, so an
/// agent stopped before the switch leaves nothing the next one would mistake for filled maps.
fn load_switching(
    settings: &EbpfSettings,
) -> Result<(PinnedMaps, LoadReport, Option<MapSwitch>), EbpfError> {
    let staging = settings.pin_dir.join(STAGING_MAPS_DIR);
    // Whatever is there now no program of a link reads: running programs hold their maps by
    // reference, not by pin.
    remove_pin_dir(&staging)?;
    remove_pin_dir(&settings.pin_dir.join(MAPS_DIR))?;
    create_dir(&staging)?;
    let mut ebpf = load_object(&staging)?;
    let mut report = LoadReport::default();
    let mut cgroup = CgroupHandle::default();
    let mut links = Vec::new();
    for name in PROGRAMS {
        let link_path = link_pin(&settings.pin_dir, name);
        match bpf_obj_get(&link_path) {
            Ok(link) => {
                load_program(&mut ebpf, name)?;
                links.push((name, link));
            }
            Err(_) => {
                attach(&mut ebpf, name, cgroup.open(settings)?, &settings.pin_dir)?;
                report.attached.push(name);
            }
        }
    }
    report.btf = loaded_with_btf(&mut ebpf);
    let maps = take_maps(&mut ebpf)?;
    let switch = MapSwitch {
        ebpf,
        links,
        pin_dir: settings.pin_dir.clone(),
    };
    if switch.links.is_empty() {
        switch.complete()?;
        return Ok((maps, report, None));
    }
    tracing::info!(
        links = switch.links.len(),
        "new maps loaded; the running programs keep serving until the table is written"
    );
    Ok((maps, report, Some(switch)))
}

/// Programs loaded with fresh maps, waiting to take over the links that still run programs
/// on other maps.
pub(super) struct MapSwitch {
    ebpf: Ebpf,
    links: Vec<(&'static str, OwnedFd)>,
    pin_dir: PathBuf,
}

impl MapSwitch {
    /// Swaps every waiting link to this agent's programs, publishes the maps under their
    /// final name and removes maps of other versions. Returns the programs swapped.
    pub(super) fn complete(mut self) -> Result<Vec<&'static str>, EbpfError> {
        let mut swapped = Vec::new();
        for (name, link) in std::mem::take(&mut self.links) {
            swap_into_link(&mut self.ebpf, name, &link, &self.pin_dir)?;
            swapped.push(name);
        }
        let staging = self.pin_dir.join(STAGING_MAPS_DIR);
        let maps_dir = self.pin_dir.join(MAPS_DIR);
        std::fs::rename(&staging, &maps_dir).map_err(|source| EbpfError::Io {
            call: "rename",
            path: staging.clone(),
            source,
        })?;
        remove_stale_maps(&self.pin_dir)?;
        Ok(swapped)
    }
}

/// Maps no program of ours reads any more: version 1's (pinned in the pin directory itself)
/// and other versions' directories.
fn remove_stale_maps(pin_dir: &Path) -> Result<(), EbpfError> {
    for name in MAP_NAMES {
        remove_if_present(&pin_dir.join(name))?;
    }
    for entry in read_dir(pin_dir)? {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("maps_v") && name != MAPS_DIR && name != STAGING_MAPS_DIR {
            remove_pin_dir(&entry.path())?;
        }
    }
    Ok(())
}

/// The cgroup the programs attach to, opened on first use.
#[derive(Default)]
struct CgroupHandle(Option<File>);

impl CgroupHandle {
    fn open(&mut self, settings: &EbpfSettings) -> Result<&File, EbpfError> {
        if self.0.is_none() {
            let path = settings.cgroup()?;
            let file = File::open(&path).map_err(|source| EbpfError::Io {
                call: "open",
                path: path.clone(),
                source,
            })?;
            self.0 = Some(file);
        }
        self.0.as_ref().ok_or(EbpfError::NoCgroup2)
    }
}

fn load_object(maps_dir: &Path) -> Result<Ebpf, EbpfError> {
    EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .load(OBJECT)
        .map_err(|source| EbpfError::Load {
            pin_dir: maps_dir.to_owned(),
            source: Box::new(source),
        })
}

/// The cgroup program `name` of the object.
fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(|source| program_error(name, source))
}

/// Whether the programs of `ebpf` this process loaded carry the object's BTF: aya loads the
/// programs without it, after a warning, when the kernel refuses the BTF. `None` when none
/// was loaded here.
fn loaded_with_btf(ebpf: &mut Ebpf) -> Option<bool> {
    PROGRAMS.iter().find_map(|name| {
        let info = sock_addr_program(ebpf, name).ok()?.info().ok()?;
        Some(info.btf_id().is_some())
    })
}

fn program_error(program: &'static str, source: aya::programs::ProgramError) -> EbpfError {
    EbpfError::Program {
        program,
        source: Box::new(source),
    }
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), EbpfError> {
    sock_addr_program(ebpf, name)?
        .load()
        .map_err(|source| program_error(name, source))
}

/// Swaps this agent's loaded `name` into the pinned link of another program, in one
/// `BPF_LINK_UPDATE`; then pins it and drops the old program's pins (the kernel frees the old
/// program once nothing holds it).
fn swap_into_link(
    ebpf: &mut Ebpf,
    name: &'static str,
    link: &OwnedFd,
    pin_dir: &Path,
) -> Result<(), EbpfError> {
    let program_error = |source| program_error(name, source);
    let program = sock_addr_program(ebpf, name)?;
    let program_fd = program.fd().map_err(program_error)?;
    bpf_link_update(link, program_fd.as_fd()).map_err(|source| EbpfError::Io {
        call: "BPF_LINK_UPDATE",
        path: link_pin(pin_dir, name),
        source,
    })?;
    let prog_path = program_pin(pin_dir, name);
    remove_if_present(&prog_path)?;
    program.pin(&prog_path).map_err(|source| EbpfError::Pin {
        path: prog_path,
        source,
    })?;
    for stale in stale_program_pins(pin_dir, name)? {
        remove_if_present(&stale)?;
    }
    tracing::info!(
        program = name,
        version = %programs_version(),
        "this agent's program now runs in the pinned link"
    );
    Ok(())
}

fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    pin_dir: &Path,
) -> Result<(), EbpfError> {
    let program_error = |source| program_error(name, source);
    let program = sock_addr_program(ebpf, name)?;
    program.load().map_err(program_error)?;
    let prog_path = program_pin(pin_dir, name);
    // A program pin without its link is left from an interrupted start: replace it.
    remove_if_present(&prog_path)?;
    for stale in stale_program_pins(pin_dir, name)? {
        remove_if_present(&stale)?;
    }
    program.pin(&prog_path).map_err(|source| EbpfError::Pin {
        path: prog_path.clone(),
        source,
    })?;
    // A cgroup bpf_link always coexists with other programs; BPF_LINK_CREATE refuses any
    // flag, so `Single` (no flag) it is.
    let link_id = program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(program_error)?;
    let link = program.take_link(link_id).map_err(program_error)?;
    // Only a bpf_link (kernel 5.7+) can be pinned; a prog_attach link would detach with us.
    let link = FdLink::try_from(link).map_err(|_| EbpfError::NoBpfLink(name))?;
    let link_path = link_pin(pin_dir, name);
    remove_if_present(&link_path)?;
    link.pin(&link_path).map_err(|source| EbpfError::Pin {
        path: link_path,
        source,
    })?;
    Ok(())
}

fn take_maps(ebpf: &mut Ebpf) -> Result<PinnedMaps, EbpfError> {
    fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, EbpfError> {
        ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))
    }
    let map_error = |name: &'static str| {
        move |source| EbpfError::Map {
            map: name,
            call: "open",
            source: Box::new(source),
        }
    };
    Ok(PinnedMaps {
        services: HashMap::try_from(take(ebpf, maps::SERVICES)?)
            .map_err(map_error(maps::SERVICES))?,
        backends: HashMap::try_from(take(ebpf, maps::BACKENDS)?)
            .map_err(map_error(maps::BACKENDS))?,
        rev_nat: HashMap::try_from(take(ebpf, maps::REV_NAT)?).map_err(map_error(maps::REV_NAT))?,
        affinity: HashMap::try_from(take(ebpf, maps::AFFINITY)?)
            .map_err(map_error(maps::AFFINITY))?,
        service_stats: PerCpuHashMap::try_from(take(ebpf, maps::SERVICE_STATS)?)
            .map_err(map_error(maps::SERVICE_STATS))?,
        backend_stats: PerCpuHashMap::try_from(take(ebpf, maps::BACKEND_STATS)?)
            .map_err(map_error(maps::BACKEND_STATS))?,
        log_config: Array::try_from(take(ebpf, maps::LOG_CONFIG)?)
            .map_err(map_error(maps::LOG_CONFIG))?,
        source_ranges: LpmTrie::try_from(take(ebpf, maps::SOURCE_RANGES)?)
            .map_err(map_error(maps::SOURCE_RANGES))?,
        maglev: HashMap::try_from(take(ebpf, maps::MAGLEV)?).map_err(map_error(maps::MAGLEV))?,
    })
}

fn create_dir(dir: &Path) -> Result<(), EbpfError> {
    std::fs::create_dir_all(dir).map_err(|source| EbpfError::Io {
        call: "create_dir_all",
        path: dir.to_owned(),
        source,
    })
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, EbpfError> {
    let io_error = |source| EbpfError::Io {
        call: "read_dir",
        path: dir.to_owned(),
        source,
    };
    std::fs::read_dir(dir)
        .map_err(io_error)?
        .map(|entry| entry.map_err(io_error))
        .collect()
}

/// Removes a directory of map pins and the directory; nothing there is fine.
fn remove_pin_dir(dir: &Path) -> Result<usize, EbpfError> {
    if !dir.is_dir() {
        return Ok(0);
    }
    let entries = read_dir(dir)?;
    for entry in &entries {
        remove_if_present(&entry.path())?;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(entries.len()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(entries.len()),
        Err(source) => Err(EbpfError::Io {
            call: "remove_dir",
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Whether `path` opens as a BPF object (a stale regular file would not).
fn is_bpf_object(path: &Path) -> bool {
    bpf_obj_get(path).is_ok()
}

pub(super) fn remove_if_present(path: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(EbpfError::Io {
            call: "remove_file",
            path: path.to_owned(),
            source,
        }),
    }
}

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs on `dir` unless it is one already, as systemd does at boot: a minimal host or
/// a container may not have it, and pins anywhere else would not be on bpffs.
fn ensure_bpffs(dir: &Path) -> Result<(), EbpfError> {
    let path =
        std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|error| EbpfError::Io {
            call: "statfs",
            path: dir.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, error),
        })?;
    // SAFETY: statfs fills the zeroed struct we own.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(EbpfError::Io {
            call: "statfs",
            path: dir.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    if stat.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    tracing::info!(path = %dir.display(), "mounting bpffs");
    // SAFETY: plain mount(2) with NUL-terminated strings we own.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(EbpfError::Io {
            call: "mount bpffs on",
            path: dir.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones to the cgroup. Raising
/// it needs CAP_SYS_RESOURCE, which a container may lack: then we warn and go on.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::warn!(
            error = %io::Error::last_os_error(),
            "setrlimit(RLIMIT_MEMLOCK) failed; harmless on kernels 5.11 and later"
        );
    }
}

/// What [`cleanup`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Links detached.
    pub detached: usize,
    /// Pins removed (links, programs, maps).
    pub unpinned: usize,
    /// The SNAT range taken out of `ip_local_reserved_ports`, if the tc programs had one.
    pub released_snat_ports: Option<(u16, u16)>,
}

/// Detaches every program of ours and removes the pin directory with all its pins. Safe to
/// run when nothing is there. A running agent's map handles stay valid but no longer steer
/// traffic.
pub fn cleanup(settings: &EbpfSettings) -> Result<CleanupReport, EbpfError> {
    let mut report = CleanupReport::default();
    if !settings.pin_dir.is_dir() {
        return Ok(report);
    }
    // Read before the maps go; the reservation is ours only while the programs SNAT.
    if let Some(range) = super::north_south::pinned_snat_ports(&settings.pin_dir) {
        let sysctls = crate::dataplane::ipvs::sysctl::Sysctls::proc();
        match super::reserved_ports::release(&sysctls, range) {
            Ok(_) => report.released_snat_ports = Some(range),
            Err(error) => tracing::warn!(
                error = %crate::dataplane::error_chain(&error),
                "taking the SNAT port range out of ip_local_reserved_ports failed"
            ),
        }
    }
    let mut paths: Vec<PathBuf> = read_dir(&settings.pin_dir)?
        .iter()
        .map(|entry| entry.path())
        .collect();
    // Links first: traffic stops being steered before the maps disappear.
    paths.sort_by_key(|path| {
        !path
            .file_name()
            .is_some_and(|name| name.as_bytes().starts_with(b"link_"))
    });
    for path in paths {
        if path.is_dir() {
            report.unpinned += remove_pin_dir(&path)?;
            continue;
        }
        let is_link = path
            .file_name()
            .is_some_and(|name| name.as_bytes().starts_with(b"link_"));
        if is_link {
            if let Ok(fd) = bpf_obj_get(&path) {
                // Detach even if another process still holds the link (kernel 5.9+); on older
                // kernels removing the last pin below detaches it once no one holds it.
                if bpf_link_detach(&fd).is_ok() {
                    report.detached += 1;
                }
            }
        }
        remove_if_present(&path)?;
        report.unpinned += 1;
    }
    match std::fs::remove_dir(&settings.pin_dir) {
        Ok(()) => Ok(report),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(report),
        Err(source) => Err(EbpfError::Io {
            call: "remove_dir",
            path: settings.pin_dir.clone(),
            source,
        }),
    }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

fn bpf(command: libc::c_long, attr: &mut [u64; 3]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded union prefix large enough for both commands used here.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    bpf_obj_get_with_flags(path, 0)
}

/// `BPF_F_RDONLY`: the descriptor may look up and iterate but not update or delete.
const BPF_F_RDONLY: u32 = 1 << 3;

/// Opens the pinned object at `path` through a descriptor the kernel refuses writes on.
pub(super) fn bpf_obj_get_read_only(path: &Path) -> io::Result<OwnedFd> {
    bpf_obj_get_with_flags(path, BPF_F_RDONLY)
}

fn bpf_obj_get_with_flags(path: &Path, file_flags: u32) -> io::Result<OwnedFd> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    // union bpf_attr { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [path.as_ptr() as u64, u64::from(file_flags) << 32, 0];
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("BPF_OBJ_GET returned a bad fd"))?;
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes `link` run `program` instead of its current one, atomically (kernel 5.7+ for cgroup
/// links).
fn bpf_link_update(link: &OwnedFd, program: BorrowedFd<'_>) -> io::Result<()> {
    // union bpf_attr { struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags;
    //                           __u32 old_prog_fd; } link_update; }
    let link_fd = u64::from(link.as_raw_fd() as u32);
    let program_fd = u64::from(program.as_raw_fd() as u32);
    let mut attr = [link_fd | program_fd << 32, 0, 0];
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

fn bpf_link_detach(fd: &OwnedFd) -> io::Result<()> {
    // union bpf_attr { struct { __u32 link_fd; } link_detach; }
    let mut attr = [u64::from(fd.as_raw_fd() as u32), 0, 0];
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// The cgroup v2 mount point, from `/proc/self/mountinfo` (it is `/sys/fs/cgroup` on most
/// systems, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, EbpfError> {
    let path = Path::new("/proc/self/mountinfo");
    let mountinfo = std::fs::read_to_string(path).map_err(|source| EbpfError::Io {
        call: "read",
        path: path.to_owned(),
        source,
    })?;
    parse_cgroup2_mount(&mountinfo).ok_or(EbpfError::NoCgroup2)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mount-point options [optional…] - fstype source super
        let (fields, rest) = line.split_once(" - ")?;
        let fstype = rest.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = fields.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// Undoes the octal escapes (`\040` for a space) mountinfo uses in paths.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], escaped) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_v1_ones() {
        let mountinfo = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_mount_is_none_and_escapes_are_undone() {
        assert_eq!(
            parse_cgroup2_mount("25 30 0:23 / /x rw - tmpfs t rw\n"),
            None
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / /mnt/my\\040cg rw - cgroup2 c rw\n"),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }
}
