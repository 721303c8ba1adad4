//! The conntrack sysctls kube-proxy writes at start (`conntrack.*` in its configuration, its
//! `--conntrack-*` flags), with its rules for when (k8s.io/kubernetes pkg/proxy/conntrack
//! `sysctls.go`): the table size is `maxPerCore` × CPUs, at least `min`, at most 2^20, and
//! only when `maxPerCore` > 0; each timeout only when > 0; `tcp_be_liberal` only when true;
//! a value already in place is not rewritten; the hash table grows to a quarter of the
//! table size when smaller.
//!
//! Which sysctls to write is a pure function ([`conntrack_sysctls`]); [`apply`] writes them.

use std::path::Path;
use std::time::Duration;

use super::ipvs::sysctl::{SysctlError, Sysctls};

/// kube-proxy's cap on the scaled table size.
pub const MAX_CONNTRACK_MAX: u64 = 1_048_576;
/// Where the conntrack module takes its hash-table size.
pub const HASHSIZE_PATH: &str = "/sys/module/nf_conntrack/parameters/hashsize";

/// The `conntrack.*` settings, each as kube-proxy reads it (0 or `None`: leave the kernel's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConntrackSettings {
    pub max_per_core: u32,
    pub min: u32,
    pub tcp_established_timeout: Duration,
    pub tcp_close_wait_timeout: Duration,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Duration,
    pub udp_stream_timeout: Duration,
}

impl ConntrackSettings {
    /// kube-proxy's defaults (`SetDefaults_KubeProxyConfiguration`): 32768 per core, at least
    /// 131072, established TCP 24 h, CLOSE_WAIT 1 h (kubernetes/kubernetes#32551).
    pub fn kube_proxy_defaults() -> Self {
        Self {
            max_per_core: 32 * 1024,
            min: 128 * 1024,
            tcp_established_timeout: Duration::from_secs(24 * 60 * 60),
            tcp_close_wait_timeout: Duration::from_secs(60 * 60),
            ..Self::default()
        }
    }
}

/// The table size kube-proxy would set on a machine of `cpus` CPUs, if any.
pub fn conntrack_max(settings: &ConntrackSettings, cpus: u64) -> Option<u64> {
    if settings.max_per_core == 0 {
        return None;
    }
    let scaled = u64::from(settings.max_per_core) * cpus;
    Some(if scaled > MAX_CONNTRACK_MAX {
        MAX_CONNTRACK_MAX
    } else {
        scaled.max(u64::from(settings.min))
    })
}

/// The sysctls (under `net/netfilter/`) to write and their values, in kube-proxy's order.
pub fn conntrack_sysctls(settings: &ConntrackSettings, cpus: u64) -> Vec<(&'static str, u64)> {
    let mut list = Vec::new();
    if let Some(max) = conntrack_max(settings, cpus) {
        list.push(("net/netfilter/nf_conntrack_max", max));
    }
    let timeouts = [
        (
            "net/netfilter/nf_conntrack_tcp_timeout_established",
            settings.tcp_established_timeout,
        ),
        (
            "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
            settings.tcp_close_wait_timeout,
        ),
    ];
    // kube-proxy truncates to whole seconds; a sub-second timeout is written as 0 there too.
    list.extend(
        timeouts
            .into_iter()
            .filter(|(_, timeout)| !timeout.is_zero())
            .map(|(name, timeout)| (name, timeout.as_secs())),
    );
    if settings.tcp_be_liberal {
        list.push(("net/netfilter/nf_conntrack_tcp_be_liberal", 1));
    }
    let udp = [
        (
            "net/netfilter/nf_conntrack_udp_timeout",
            settings.udp_timeout,
        ),
        (
            "net/netfilter/nf_conntrack_udp_timeout_stream",
            settings.udp_stream_timeout,
        ),
    ];
    list.extend(
        udp.into_iter()
            .filter(|(_, timeout)| !timeout.is_zero())
            .map(|(name, timeout)| (name, timeout.as_secs())),
    );
    list
}

/// The hash-table size to write when the table grows to `max`: a quarter of it, only when
/// the current one is smaller.
pub fn hashsize_for(max: u64, current: u64) -> Option<u64> {
    (current < max / 4).then_some(max / 4)
}

/// Why the conntrack settings could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackSysctlError {
    #[error("setting a conntrack sysctl from the conntrack.* settings")]
    Sysctl(#[from] SysctlError),
    #[error("reading or writing {path}")]
    Hashsize {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds {value:?}, not a number")]
    HashsizeValue { path: String, value: String },
}

/// Writes what [`conntrack_sysctls`] says into `sysctls`, and grows the hash table at
/// `hashsize_path` with the table; returns the names written.
pub fn apply(
    settings: &ConntrackSettings,
    cpus: u64,
    sysctls: &Sysctls,
    hashsize_path: &Path,
) -> Result<Vec<&'static str>, ConntrackSysctlError> {
    let mut written = Vec::new();
    for (name, value) in conntrack_sysctls(settings, cpus) {
        if sysctls.ensure(name, &value.to_string())? {
            written.push(name);
        }
        if name == "net/netfilter/nf_conntrack_max" {
            let hashsize_error = |source| ConntrackSysctlError::Hashsize {
                path: hashsize_path.display().to_string(),
                source,
            };
            let text = std::fs::read_to_string(hashsize_path).map_err(hashsize_error)?;
            let current: u64 =
                text.trim()
                    .parse()
                    .map_err(|_| ConntrackSysctlError::HashsizeValue {
                        path: hashsize_path.display().to_string(),
                        value: text.trim().to_owned(),
                    })?;
            if let Some(size) = hashsize_for(value, current) {
                std::fs::write(hashsize_path, size.to_string()).map_err(hashsize_error)?;
                tracing::info!(hashsize = size, "set the conntrack hash table size");
            }
        }
    }
    Ok(written)
}

/// CPUs as kube-proxy counts them (cadvisor's topology, else the Go runtime's count): the
/// online CPUs.
pub fn cpus() -> u64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kube-proxy's own table (pkg/proxy/conntrack/sysctls_test.go, `TestGetConntrackMax`).
    #[test]
    fn table_size_follows_kube_proxy() {
        let size = |max_per_core, min, cpus| {
            conntrack_max(
                &ConntrackSettings {
                    max_per_core,
                    min,
                    ..ConntrackSettings::default()
                },
                cpus,
            )
        };
        assert_eq!(size(0, 0, 4), None);
        assert_eq!(size(0, 1, 4), None, "min alone sets nothing");
        assert_eq!(size(32768, 131072, 2), Some(131072), "the floor");
        assert_eq!(size(32768, 0, 12), Some(393216), "scaled");
        assert_eq!(size(32768, 0, 64), Some(MAX_CONNTRACK_MAX), "capped");
        assert_eq!(
            size(32768, 2_000_000, 64),
            Some(MAX_CONNTRACK_MAX),
            "cap over min"
        );
    }

    #[test]
    fn defaults_write_what_kube_proxy_writes() {
        let list = conntrack_sysctls(&ConntrackSettings::kube_proxy_defaults(), 8);
        assert_eq!(
            list,
            vec![
                ("net/netfilter/nf_conntrack_max", 262144),
                ("net/netfilter/nf_conntrack_tcp_timeout_established", 86400),
                ("net/netfilter/nf_conntrack_tcp_timeout_close_wait", 3600),
            ]
        );
        assert!(conntrack_sysctls(&ConntrackSettings::default(), 8).is_empty());
        let all = conntrack_sysctls(
            &ConntrackSettings {
                tcp_be_liberal: true,
                udp_timeout: Duration::from_secs(30),
                udp_stream_timeout: Duration::from_millis(120_900),
                ..ConntrackSettings::default()
            },
            8,
        );
        assert_eq!(
            all,
            vec![
                ("net/netfilter/nf_conntrack_tcp_be_liberal", 1),
                ("net/netfilter/nf_conntrack_udp_timeout", 30),
                ("net/netfilter/nf_conntrack_udp_timeout_stream", 120),
            ]
        );
    }

    #[test]
    fn hash_table_grows_only_when_smaller_than_a_quarter() {
        assert_eq!(hashsize_for(262144, 16384), Some(65536));
        assert_eq!(hashsize_for(262144, 65536), None);
        assert_eq!(hashsize_for(262144, 100000), None);
    }

    #[test]
    fn apply_writes_changed_values_and_the_hash_size() {
        let dir = std::env::temp_dir().join(format!("topoproxy-ct-{}", std::process::id()));
        let netfilter = dir.join("sys/net/netfilter");
        std::fs::create_dir_all(&netfilter).expect("mkdir");
        for (name, value) in [
            ("nf_conntrack_max", "65536"),
            ("nf_conntrack_tcp_timeout_established", "86400"),
            ("nf_conntrack_tcp_timeout_close_wait", "60"),
        ] {
            std::fs::write(netfilter.join(name), format!("{value}\n")).expect("write");
        }
        let hashsize = dir.join("hashsize");
        std::fs::write(&hashsize, "16384\n").expect("write");
        let written = apply(
            &ConntrackSettings::kube_proxy_defaults(),
            8,
            &Sysctls::at(dir.join("sys")),
            &hashsize,
        )
        .expect("applies");
        let read = |path: &Path| std::fs::read_to_string(path).expect("read");
        assert_eq!(
            written,
            vec![
                "net/netfilter/nf_conntrack_max",
                "net/netfilter/nf_conntrack_tcp_timeout_close_wait"
            ],
            "the established timeout already had its value"
        );
        assert_eq!(read(&netfilter.join("nf_conntrack_max")).trim(), "262144");
        assert_eq!(read(&hashsize).trim(), "65536");
        std::fs::write(&hashsize, "many\n").expect("write");
        std::fs::write(netfilter.join("nf_conntrack_max"), "1\n").expect("write");
        let error = apply(
            &ConntrackSettings::kube_proxy_defaults(),
            8,
            &Sysctls::at(dir.join("sys")),
            &hashsize,
        )
        .expect_err("a bad hashsize is an error");
        assert!(error.to_string().contains("not a number"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
