//! The initramfs: busybox, the guest tools, the modules and `/init`, as an in-memory cpio.

use super::*;

/// A cpio `newc` archive in memory.
#[derive(Default)]
pub(super) struct Cpio {
    pub(super) data: Vec<u8>,
    pub(super) inode: u32,
    pub(super) dirs: BTreeSet<String>,
}

impl Cpio {
    pub(super) fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.inode += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }
    pub(super) fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }
    pub(super) fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_owned());
        self.entry(path, 0o040755, &[]);
    }
    pub(super) fn file(&mut self, path: &str, mode: u32, body: &[u8]) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o100000 | mode, body);
    }
    pub(super) fn symlink(&mut self, path: &str, target: &str) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o120777, target.as_bytes());
    }
    pub(super) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

/// The shared libraries (and dynamic loader) `ldd` lists for a binary, resolved to real files.
pub fn ldd_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Static binaries: "not a dynamic executable".
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("ldd {}: {line}", binary.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

pub(super) const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /proc /sys /dev /tmp /run /host
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /sys/fs/bpf /sys/fs/cgroup /var
ln -s /run /var/run
grep -q ' /sys/fs/bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf || echo "TOPOPROXY-VM: mounting bpffs failed"
grep -q ' /sys/fs/cgroup ' /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup || echo "TOPOPROXY-VM: mounting cgroup2 failed"
KVER=$(uname -r)
while read -r m; do
    insmod "/lib/modules/$KVER/$m" || echo "TOPOPROXY-VM: insmod $m failed"
done < /etc/topoproxy-modules
ip link set lo up
code=125
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host /host; then
    if [ -f /host/run.sh ]; then
        cd /host
        sh /host/run.sh
        code=$?
        cd /
    else
        echo "TOPOPROXY-VM: /host/run.sh missing"
        code=126
    fi
    echo "$code" > /host/exit-code
    sync
    umount /host
else
    echo "TOPOPROXY-VM: mounting the 9p share failed"
    code=124
fi
echo "TOPOPROXY-VM-EXIT $code"
byte=$code
[ "$byte" -gt 127 ] && byte=127
printf "\\$(printf %03o "$byte")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
poweroff -f
"#;

/// Builds `target/vm/initramfs-<release>.cpio.gz` for a prepared kernel.
pub fn build_initramfs(kernel: &Kernel) -> Result<PathBuf> {
    let started = Instant::now();
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "host",
        "root",
    ] {
        cpio.dir(dir);
    }
    ensure!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} not found: run `cargo xtask vm-setup` (installs busybox-static)"
    );
    let busybox = std::fs::read(BUSYBOX)?;
    ensure!(
        ldd_libraries(Path::new(BUSYBOX))?.is_empty(),
        "{BUSYBOX} is dynamically linked: install busybox-static (`cargo xtask vm-setup`)"
    );
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.symlink("bin/sh", "busybox");
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    cpio.file("etc/group", 0o644, b"root:x:0:\n");
    cpio.file(
        "etc/nsswitch.conf",
        0o644,
        b"passwd: files\ngroup: files\nhosts: files\n",
    );
    cpio.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n");
    for file in GUEST_FILES {
        match std::fs::read(file) {
            Ok(body) => cpio.file(file, 0o644, &body),
            Err(e) => println!("vm: warning: {file} not copied into the guest: {e}"),
        }
    }

    let mut libs = BTreeSet::new();
    for (name, guest) in GUEST_TOOLS {
        let host = match name.strip_suffix('?') {
            Some(optional) => match find_in_path(optional) {
                Some(host) => host,
                None => {
                    println!(
                        "vm: warning: {optional} not found on the host, the guest will lack it \
                         (run `cargo xtask vm-setup`)"
                    );
                    continue;
                }
            },
            None => require_tool(name)?,
        };
        cpio.file(guest, 0o755, &std::fs::read(&host)?);
        libs.extend(ldd_libraries(&host)?);
    }
    let shipped: BTreeSet<&str> = GUEST_TOOLS
        .iter()
        .filter(|(name, _)| find_in_path(name.trim_end_matches('?')).is_some())
        .map(|(name, _)| name.trim_end_matches('?'))
        .collect();
    for (tool, link) in GUEST_TOOL_LINKS {
        if shipped.contains(tool) {
            cpio.symlink(link, tool);
        }
    }
    if shipped.contains("iptables") {
        libs.extend(xtables_extensions(&mut cpio)?);
    }
    for lib in &libs {
        let body = std::fs::read(lib).with_context(|| format!("reading {}", lib.display()))?;
        cpio.file(&lib.to_string_lossy(), 0o755, &body);
    }

    let set = resolve_modules(kernel)?;
    let modules_root = format!("lib/modules/{}", kernel.release);
    for (_, ko, bytes) in &set.modules {
        cpio.file(&format!("{modules_root}/{}", ko.display()), 0o644, bytes);
    }
    let paths: BTreeMap<&str, &Path> = set
        .modules
        .iter()
        .map(|(n, p, _)| (n.as_str(), p.as_path()))
        .collect();
    let mut order = String::new();
    for name in &set.boot_order {
        writeln!(order, "{}", paths[name.as_str()].display())?;
    }
    cpio.file("etc/topoproxy-modules", 0o644, order.as_bytes());
    // modules.dep for the on-demand modprobe the kernel runs (e.g. ip_vs_wlc), in depmod's
    // format: "path: dep-path dep-path".
    let mut dep = String::new();
    for (_, ko, bytes) in &set.modules {
        let deps: Vec<String> = module_depends(bytes)
            .iter()
            .filter_map(|d| paths.get(d.as_str()))
            .map(|p| p.display().to_string())
            .collect();
        writeln!(dep, "{}: {}", ko.display(), deps.join(" "))?;
    }
    cpio.file(
        &format!("{modules_root}/modules.dep"),
        0o644,
        dep.as_bytes(),
    );
    for extra in ["modules.builtin", "modules.order"] {
        if let Ok(body) = std::fs::read(kernel.modules().join(extra)) {
            cpio.file(&format!("{modules_root}/{extra}"), 0o644, &body);
        }
    }

    let archive = cpio.finish();
    let out = kernel.initramfs();
    std::fs::create_dir_all(vm_dir())?;
    let gz = compress_gzip(&archive)?;
    // Per-process temporary name: several worktrees may build the same image at once.
    let tmp = out.with_extension(format!("gz.tmp{}", std::process::id()));
    std::fs::write(&tmp, &gz)?;
    std::fs::rename(&tmp, &out)?;
    println!(
        "vm: initramfs {} ({} modules, {:.1} MB) in {:.1} s",
        out.display(),
        set.modules.len(),
        gz.len() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// Copies the iptables extensions into the initramfs; returns the libraries they need.
pub(super) fn xtables_extensions(cpio: &mut Cpio) -> Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(XTABLES_EXTENSIONS) else {
        println!("vm: warning: {XTABLES_EXTENSIONS} missing, iptables in the guest has no matches");
        return Ok(libs);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(OsStr::to_str) != Some("so") {
            continue;
        }
        let body = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        cpio.file(&path.to_string_lossy(), 0o644, &body);
        libs.extend(ldd_libraries(&path)?);
    }
    Ok(libs)
}

pub(super) fn compress_gzip(data: &[u8]) -> Result<Vec<u8>> {
    decompress("gzip", &["-c", "-6", "-n"], data).context("gzip of the initramfs")
}

/// Hash of everything an initramfs is built from besides the kernel: the init script, the
/// module and tool lists, and the size and modification time of busybox and each host tool.
pub(super) fn initramfs_inputs_hash() -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    // `DefaultHasher::new` uses fixed keys: stable for one toolchain, enough for a cache name.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    INIT.hash(&mut hasher);
    BOOT_MODULES.hash(&mut hasher);
    ON_DEMAND_MODULES.hash(&mut hasher);
    GUEST_TOOLS.hash(&mut hasher);
    GUEST_TOOL_LINKS.hash(&mut hasher);
    GUEST_FILES.hash(&mut hasher);
    let files = std::iter::once(PathBuf::from(BUSYBOX)).chain(
        GUEST_TOOLS
            .iter()
            .filter_map(|(name, _)| find_in_path(name.trim_end_matches('?'))),
    );
    for file in files {
        file.hash(&mut hasher);
        if let Ok(meta) = std::fs::metadata(&file) {
            meta.len().hash(&mut hasher);
            meta.modified().ok().hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// The initramfs for a kernel, built when no image for the current inputs exists yet.
pub fn ensure_initramfs(kernel: &Kernel) -> Result<PathBuf> {
    let out = kernel.initramfs();
    if out.is_file() {
        Ok(out)
    } else {
        build_initramfs(kernel)
    }
}
