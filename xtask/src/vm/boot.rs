//! Shares and runs: staging binaries into a share and booting QEMU with it.

use super::*;

/// Copies a host binary and the libraries `ldd` lists for it into `share`: the binary to
/// `share/bin/<name>`, the libraries to `share/lib/`. Returns the path to run it inside the
/// VM; `run.sh` from [`write_run_script`] sets `LD_LIBRARY_PATH=/host/lib`.
pub fn stage_binary(share: &Path, path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .and_then(OsStr::to_str)
        .with_context(|| format!("{} has no file name", path.display()))?;
    let bin = share.join("bin");
    let lib = share.join("lib");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&lib)?;
    link_or_copy(path, &bin.join(name))?;
    for library in ldd_libraries(path)? {
        let file = library.file_name().context("library name")?;
        // std::fs::copy follows symlinks, so the copy holds the real library.
        std::fs::copy(&library, lib.join(file))
            .with_context(|| format!("copying {} into the share", library.display()))?;
    }
    Ok(format!("/host/bin/{name}"))
}

/// Hard-links `from` to `to` (test executables are hundreds of megabytes and the share sits in
/// the same target directory), copying when a link cannot be made (another filesystem).
pub fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} into the share", from.display()))
}

/// Writes `share/run.sh`: exits on the first failing command; binaries staged with
/// [`stage_binary`] find their libraries.
pub fn write_run_script(share: &Path, body: &str) -> Result<()> {
    let script = format!(
        "#!/bin/sh\nset -e\nexport LD_LIBRARY_PATH=/host/lib\nexport PATH=/usr/sbin:/usr/bin:/sbin:/bin\n{body}\n"
    );
    std::fs::write(share.join("run.sh"), script).context("writing run.sh into the share")
}

/// How a VM is booted beyond kernel, share and timeout.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest memory in MiB. 1 GiB leaves room for the agent at 10,000 Services.
    pub memory_mib: u32,
    /// Extra host folders exported read-only over 9p as `(mount tag, host path)`; `run.sh`
    /// mounts them (`mount -t 9p -o trans=virtio,version=9p2000.L,ro TAG DIR`).
    pub read_only_shares: Vec<(String, PathBuf)>,
    /// A virtio NIC on QEMU's user networking: the guest is 10.0.2.15 and reaches the host's
    /// loopback at [`HOST_ADDRESS`] (QEMU opens the guest's connections there from the host).
    /// `run.sh` brings it up (see [`UPLINK_UP`]).
    pub user_network: bool,
    /// A second virtio NIC (the guest's `eth1`) on this host tap, which the caller made and
    /// addressed: a path from the host into the guest, which user networking lacks (the
    /// apiserver reaching a kubelet in the guest, `tests/vm_k8s_real_node.rs`).
    pub tap: Option<String>,
}

/// The host's loopback as the guest sees it over QEMU's user networking.
pub const HOST_ADDRESS: &str = "10.0.2.2";

/// Shell lines that configure the guest's uplink (QEMU's user-network defaults, no DHCP).
/// No default route, v4 or v6 (slirp sends router advertisements: they are ignored): the guest
/// reaches only 10.0.2.0/24 (the host at 10.0.2.2), so a VIP or a real server the other VM tests
/// expect to be unroutable stays unroutable when they share the boot with the parity tests.
pub const UPLINK_UP: &str = "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_ra && \
echo 0 > /proc/sys/net/ipv6/conf/eth0/autoconf && \
/usr/sbin/ip link set eth0 up && \
/usr/sbin/ip addr add 10.0.2.15/24 dev eth0 || echo 'TOPOPROXY-VM: the uplink failed'
";

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            memory_mib: 1024,
            read_only_shares: Vec::new(),
            user_network: false,
            tap: None,
        }
    }
}

/// Boots `kernel_version` (a label from [`KERNELS`]) with `share_dir` mounted at `/host`, runs
/// `/host/run.sh` and returns its exit status and the console. QEMU is killed when `timeout`
/// passes.
pub fn run_in_vm(kernel_version: &str, share_dir: &Path, timeout: Duration) -> Result<VmOutcome> {
    run_in_vm_with(kernel_version, share_dir, timeout, &VmOptions::default())
}

/// The 9p `-virtfs` argument for a host folder.
pub(super) fn virtfs_arg(tag: &str, path: &Path, read_only: bool) -> Result<String> {
    let path = path
        .canonicalize()
        .with_context(|| format!("share directory {}", path.display()))?;
    let path = path.to_str().context("share path is not UTF-8")?;
    ensure!(
        !path.contains(','),
        "share path {path} contains a comma, which -virtfs cannot take"
    );
    let mut arg = format!("local,path={path},mount_tag={tag},security_model=none");
    if read_only {
        arg.push_str(",readonly=on");
    }
    Ok(arg)
}

/// [`run_in_vm`] with explicit [`VmOptions`].
pub fn run_in_vm_with(
    kernel_version: &str,
    share_dir: &Path,
    timeout: Duration,
    options: &VmOptions,
) -> Result<VmOutcome> {
    let qemu = require_tool(QEMU)?;
    let kernel = ensure_kernel(kernel_version)?;
    let initramfs = ensure_initramfs(&kernel)?;
    let share = share_dir
        .canonicalize()
        .with_context(|| format!("share directory {}", share_dir.display()))?;
    ensure!(
        share.join("run.sh").is_file(),
        "{} has no run.sh (see write_run_script)",
        share.display()
    );
    let exit_file = share.join("exit-code");
    let _ = std::fs::remove_file(&exit_file);
    let mut qemu_cmd = Command::new(&qemu);
    qemu_cmd
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .arg("-m")
        .arg(format!("{}M", options.memory_mib))
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(kernel.vmlinux())
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-virtfs")
        .arg(virtfs_arg("host", &share, false)?);
    for (tag, path) in &options.read_only_shares {
        qemu_cmd.arg("-virtfs").arg(virtfs_arg(tag, path, true)?);
    }
    let mut child = qemu_cmd
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .args(if options.user_network {
            // The tests connect only to HOST_ADDRESS (the host's loopback). `restrict=on`
            // would cut that too, and a guestfwd chardev carries one connection at a time.
            // `romfile=`: no iPXE option ROM to load at boot.
            vec![
                "-netdev",
                "user,id=uplink",
                "-device",
                "virtio-net-pci,netdev=uplink,romfile=",
            ]
        } else {
            vec!["-nic", "none"]
        })
        .args(options.tap.iter().flat_map(|tap| {
            [
                "-netdev".to_owned(),
                format!("tap,id=node,ifname={tap},script=no,downscript=no"),
                "-device".to_owned(),
                "virtio-net-pci,netdev=node,romfile=".to_owned(),
            ]
        }))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let console = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let console = Arc::clone(&console);
        readers.push(std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 8192];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                console
                    .lock()
                    .map(|mut c| c.extend_from_slice(&buf[..n]))
                    .ok();
            }
        }));
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for reader in readers {
        let _ = reader.join();
    }
    let console_log = {
        let bytes = console.lock().map(|c| c.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    };
    let Some(status) = status else {
        bail!(
            "the VM ({kernel_version}, {}) did not finish within {:?}; QEMU was killed. \
             Console tail:\n{}",
            kernel.release,
            timeout,
            tail(&console_log, 30)
        );
    };
    let from_file = std::fs::read_to_string(&exit_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let from_marker = console_log.lines().rev().find_map(|line| {
        line.trim()
            .strip_prefix(EXIT_MARKER)?
            .trim()
            .parse::<i32>()
            .ok()
    });
    let exit_code = from_file.or(from_marker).ok_or_else(|| {
        anyhow!(
            "the VM ({kernel_version}, {}) stopped ({status}) without reporting an exit code \
             (no {} and no {EXIT_MARKER} line). Console tail:\n{}",
            kernel.release,
            exit_file.display(),
            tail(&console_log, 30)
        )
    })?;
    Ok(VmOutcome {
        exit_code,
        console_log,
    })
}
