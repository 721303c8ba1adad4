//! The smoke boot every VM test relies on.

use super::*;

pub(super) const SMOKE: &str = "\
/usr/sbin/ip link add kube-ipvs0 type dummy
/usr/sbin/ip addr add 10.96.0.10/32 dev kube-ipvs0
/usr/sbin/ipvsadm -A -t 10.96.0.10:53 -s rr
/usr/sbin/ipvsadm -Ln > /host/ipvsadm-Ln.txt
cat /host/ipvsadm-Ln.txt
/usr/sbin/ipvsadm -C
$STAGED -r > /host/staged.txt
/usr/sbin/ipvsadm -A -t 10.96.0.10:80
/usr/sbin/ipvsadm -Ln | grep -q 'TCP  10.96.0.10:80 wlc'
/usr/sbin/ipvsadm -C
echo 1 > /proc/sys/net/ipv4/vs/conntrack
grep -q '^bpf /sys/fs/bpf bpf' /proc/mounts
grep -q ' /sys/fs/cgroup cgroup2' /proc/mounts
if [ -x /usr/sbin/nft ]; then
    /usr/sbin/nft add table inet topoproxy-smoke
    /usr/sbin/nft add chain inet topoproxy-smoke post '{ type nat hook postrouting priority srcnat; }'
    /usr/sbin/nft add rule inet topoproxy-smoke post ct state new masquerade
    /usr/sbin/nft delete table inet topoproxy-smoke
fi
if [ -x /usr/sbin/conntrack ]; then /usr/sbin/conntrack -L > /dev/null; fi
echo ok > /host/smoke-done.txt
";

pub(super) const SMOKE_EXPECT: &str = "TCP  10.96.0.10:53 rr";

/// Boots `label` and checks the basics every VM test relies on: modules, `ipvsadm`, a dummy
/// link, the 9p share and a staged glibc binary.
pub fn smoke_test(label: &str, timeout: Duration) -> Result<()> {
    let share = vm_dir().join(format!("share-smoke-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share)?;
    // A glibc binary from the host, run from the share with its own libraries: the path
    // test binaries take.
    let staged = stage_binary(&share, Path::new("/usr/bin/uname"))?;
    write_run_script(&share, &SMOKE.replace("$STAGED", &staged))?;
    let outcome = run_in_vm(label, &share, timeout)?;
    let listing = std::fs::read_to_string(share.join("ipvsadm-Ln.txt")).unwrap_or_default();
    let staged = std::fs::read_to_string(share.join("staged.txt")).unwrap_or_default();
    let release = std::fs::read_to_string(label_file(label)).unwrap_or_default();
    if outcome.exit_code != 0 || !listing.contains(SMOKE_EXPECT) {
        bail!(
            "run.sh exited {}; ipvsadm -Ln {} `{SMOKE_EXPECT}`. Console tail:\n{}",
            outcome.exit_code,
            if listing.contains(SMOKE_EXPECT) {
                "shows"
            } else {
                "does not show"
            },
            tail(&outcome.console_log, 30)
        );
    }
    ensure!(
        staged.trim() == release.trim(),
        "the staged binary printed `{}`, expected the kernel release `{}`. Console tail:\n{}",
        staged.trim(),
        release.trim(),
        tail(&outcome.console_log, 30)
    );
    ensure!(
        share.join("smoke-done.txt").is_file(),
        "the smoke script stopped before its end (nft, conntrack, bpffs or cgroup2 check). \
         Console tail:\n{}",
        tail(&outcome.console_log, 30)
    );
    let _ = std::fs::remove_dir_all(&share);
    Ok(())
}
