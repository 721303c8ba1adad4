//! The socket iterator that destroys UDP sockets by cookie: an `iter/udp` tracing program that
//! calls the `bpf_sock_destroy` kfunc (kernel 6.5+), as Cilium's socket termination does.
//!
//! Why not aya: aya 0.14 loads `Iter` programs from an object file, but aya-obj 0.3 cannot
//! relocate a kfunc call (it knows no `BPF_PSEUDO_KFUNC_CALL`: an `extern` function in the
//! eBPF crate fails the load as an unknown call) and aya-ebpf 0.2.1 has no `iter` section
//! macro. The program is a dozen instructions plus three per cookie, so it is built here
//! ([`destroy_program`], pure) and loaded with the `bpf()` syscall; the kfunc's and the
//! iterator's BTF ids come from the running kernel's BTF through aya.
//!
//! The cookies are the program's constants: the agent picks the sockets (sock_diag dump and
//! `TP_REV_NAT`, in user space) and the program only destroys them, so one program serves
//! every network namespace (a cookie is unique on the host).

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use aya::Btf;
use aya_obj::btf::BtfKind;

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        Self {
            code,
            dst,
            src,
            off,
            imm,
        }
    }

    /// The kernel's encoding: registers in one byte, destination in the low nibble.
    pub fn to_bytes(self) -> [u8; 8] {
        let mut bytes = [0u8; 8];
        bytes[0] = self.code;
        bytes[1] = (self.src << 4) | (self.dst & 0x0f);
        bytes[2..4].copy_from_slice(&self.off.to_ne_bytes());
        bytes[4..8].copy_from_slice(&self.imm.to_ne_bytes());
        bytes
    }
}

// Opcodes (include/uapi/linux/bpf.h, bpf_common.h).
const LDX_MEM_DW: u8 = 0x79;
const JEQ_IMM: u8 = 0x15;
const JEQ_REG: u8 = 0x1d;
const JA: u8 = 0x05;
const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
/// `src_reg` of a call to a kernel function (kfunc) by BTF id.
const PSEUDO_KFUNC_CALL: u8 = 2;
/// `bpf_get_socket_cookie`: for tracing programs it takes a `struct sock_common *`.
const HELPER_GET_SOCKET_COOKIE: i32 = 46;
/// `offsetof(struct bpf_iter__udp, udp_sk)`: after the `meta` pointer.
const UDP_SK_OFFSET: i16 = 8;

/// Cookies one program holds: its jumps are 16-bit (3 instructions per cookie).
pub(super) const MAX_COOKIES: usize = 4096;

/// The `iter/udp` program destroying each socket whose cookie is in `cookies` (at most
/// [`MAX_COOKIES`]):
///
/// ```text
///     r6 = ctx->udp_sk; if r6 == 0 goto out
///     r0 = bpf_get_socket_cookie(r6)
///     if r0 == cookie[i] goto destroy   (for each i)
///     goto out
/// destroy:
///     bpf_sock_destroy(r6)
/// out:
///     return 0
/// ```
pub(super) fn destroy_program(cookies: &[u64], sock_destroy_btf_id: u32) -> Vec<Insn> {
    let n = cookies.len();
    let destroy = 5 + 3 * n;
    let out = destroy + 2;
    // A jump's offset counts from the instruction after it.
    let jump = |from: usize, to: usize| (to - from - 1) as i16;
    let mut program = vec![
        Insn::new(LDX_MEM_DW, 6, 1, UDP_SK_OFFSET, 0),
        Insn::new(JEQ_IMM, 6, 0, jump(1, out), 0),
        Insn::new(MOV64_REG, 1, 6, 0, 0),
        Insn::new(CALL, 0, 0, 0, HELPER_GET_SOCKET_COOKIE),
    ];
    for (i, cookie) in cookies.iter().enumerate() {
        let at = program.len();
        debug_assert_eq!(at, 4 + 3 * i);
        // The 64-bit immediate spans two instructions: low half, then high half.
        program.push(Insn::new(LD_IMM64, 7, 0, 0, *cookie as u32 as i32));
        program.push(Insn::new(0, 0, 0, 0, (*cookie >> 32) as u32 as i32));
        program.push(Insn::new(JEQ_REG, 0, 7, jump(at + 2, destroy), 0));
    }
    program.push(Insn::new(JA, 0, 0, jump(program.len(), out), 0));
    program.push(Insn::new(MOV64_REG, 1, 6, 0, 0));
    program.push(Insn::new(
        CALL,
        0,
        PSEUDO_KFUNC_CALL,
        0,
        sock_destroy_btf_id as i32,
    ));
    program.push(Insn::new(MOV64_IMM, 0, 0, 0, 0));
    program.push(Insn::new(EXIT, 0, 0, 0, 0));
    program
}

/// Why destroying sockets failed.
#[derive(Debug, thiserror::Error)]
pub enum SockDestroyError {
    #[error("reading the kernel's BTF failed")]
    Btf(#[source] aya::BtfError),
    #[error("the kernel has no {0} (bpf_sock_destroy needs 6.5 or later)")]
    Unsupported(&'static str),
    #[error("{call} failed{log}")]
    Syscall {
        call: &'static str,
        /// The verifier's log, when the load failed.
        log: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the socket iterator failed")]
    Read(#[source] io::Error),
    #[error("sock_diag dump failed")]
    Diag(#[source] io::Error),
    #[error("network namespace {path} failed")]
    Netns {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The running kernel's BTF ids the program needs; `Unsupported` before 6.5.
#[derive(Debug, Clone, Copy)]
pub(super) struct KernelIds {
    iter_udp: u32,
    sock_destroy: u32,
}

impl KernelIds {
    pub fn probe() -> Result<Self, SockDestroyError> {
        let btf = Btf::from_sys_fs().map_err(SockDestroyError::Btf)?;
        let id = |name: &'static str| {
            btf.id_by_type_name_kind(name, BtfKind::Func)
                .map_err(|_| SockDestroyError::Unsupported(name))
        };
        Ok(Self {
            iter_udp: id("bpf_iter_udp")?,
            sock_destroy: id("bpf_sock_destroy")?,
        })
    }
}

// bpf(2) commands and types.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`, up to `attach_btf_id`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` of an iterator.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_ITER_CREATE`.
#[repr(C)]
#[derive(Default)]
struct IterCreateAttr {
    link_fd: u32,
    flags: u32,
}

fn bpf<T>(
    cmd: libc::c_long,
    call: &'static str,
    attr: &mut T,
    log: &[u8],
) -> Result<OwnedFd, SockDestroyError> {
    // SAFETY: `attr` is a `repr(C)` prefix of `union bpf_attr` for `cmd`, valid for its size;
    // the pointers it holds outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        let source = io::Error::last_os_error();
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let log = String::from_utf8_lossy(&log[..end]);
        let log = if log.is_empty() {
            String::new()
        } else {
            format!(": {}", log.trim_end())
        };
        return Err(SockDestroyError::Syscall { call, log, source });
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// A loaded and linked destroy program; [`Self::run_here`] runs it over the UDP sockets of
/// the calling thread's network namespace. Dropping it unloads it.
pub(super) struct DestroyIterator {
    link: OwnedFd,
    _program: OwnedFd,
}

impl DestroyIterator {
    pub fn load(ids: KernelIds, cookies: &[u64]) -> Result<Self, SockDestroyError> {
        let insns: Vec<u8> = destroy_program(cookies, ids.sock_destroy)
            .into_iter()
            .flat_map(Insn::to_bytes)
            .collect();
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut name = [0u8; 16];
        name[..11].copy_from_slice(b"tp_udp_term");
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_TRACING,
            insn_cnt: (insns.len() / 8) as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_TRACE_ITER,
            attach_btf_id: ids.iter_udp,
            ..Default::default()
        };
        let program = bpf(BPF_PROG_LOAD, "BPF_PROG_LOAD", &mut attr, &log)?;
        let mut attr = LinkCreateAttr {
            prog_fd: program.as_raw_fd() as u32,
            attach_type: BPF_TRACE_ITER,
            ..Default::default()
        };
        let link = bpf(BPF_LINK_CREATE, "BPF_LINK_CREATE", &mut attr, &[])?;
        Ok(Self {
            link,
            _program: program,
        })
    }

    /// Walks every UDP socket of this thread's network namespace: `BPF_ITER_CREATE` runs the
    /// target's `init_seq_private`, `bpf_iter_init_seq_net` (fs/proc/proc_net.c), which takes
    /// `current->nsproxy->net_ns`, the creating thread's, not the link's or the program's.
    pub fn run_here(&self) -> Result<(), SockDestroyError> {
        let mut attr = IterCreateAttr {
            link_fd: self.link.as_raw_fd() as u32,
            flags: 0,
        };
        let iterator = bpf(BPF_ITER_CREATE, "BPF_ITER_CREATE", &mut attr, &[])?;
        // The program writes nothing: reading to the end is what runs it.
        let mut file = std::fs::File::from(iterator);
        let mut sink = Vec::new();
        file.read_to_end(&mut sink)
            .map_err(SockDestroyError::Read)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(program: &[Insn], at: usize) -> usize {
        (at as isize + 1 + program[at].off as isize) as usize
    }

    #[test]
    fn every_cookie_jumps_to_the_destroy_call_and_the_rest_to_the_exit() {
        let cookies = [7u64, 0x1234_5678_9abc_def0, u64::MAX];
        let program = destroy_program(&cookies, 4242);
        let destroy = program
            .iter()
            .position(|insn| insn.code == CALL && insn.src == PSEUDO_KFUNC_CALL)
            .expect("a kfunc call")
            - 1;
        let exit = program.len() - 2;
        assert_eq!(program[exit].code, MOV64_IMM);
        assert_eq!(program[destroy + 1].imm, 4242);
        assert_eq!(target(&program, 1), exit, "a null socket exits");
        for (i, cookie) in cookies.iter().enumerate() {
            let load = 4 + 3 * i;
            let low = program[load].imm as u32 as u64;
            let high = program[load + 1].imm as u32 as u64;
            assert_eq!(high << 32 | low, *cookie);
            assert_eq!(program[load + 2].code, JEQ_REG);
            assert_eq!(target(&program, load + 2), destroy);
        }
        let fallthrough = 4 + 3 * cookies.len();
        assert_eq!(program[fallthrough].code, JA);
        assert_eq!(target(&program, fallthrough), exit);
    }

    #[test]
    fn the_largest_program_keeps_its_jumps_in_range() {
        let cookies: Vec<u64> = (0..MAX_COOKIES as u64).collect();
        let program = destroy_program(&cookies, 1);
        assert_eq!(target(&program, 1), program.len() - 2);
        assert_eq!(target(&program, 6), program.len() - 4);
    }

    #[test]
    fn instructions_encode_the_destination_in_the_low_nibble() {
        let bytes = Insn::new(MOV64_REG, 1, 6, -2, 5).to_bytes();
        assert_eq!(bytes[0], 0xbf);
        assert_eq!(bytes[1], 0x61);
        assert_eq!(i16::from_ne_bytes([bytes[2], bytes[3]]), -2);
        assert_eq!(
            i32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            5
        );
    }

    #[test]
    fn attrs_match_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 112);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, attach_btf_id), 108);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, iter_info), 16);
    }
}
