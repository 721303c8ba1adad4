//! `cargo xtask k8s-setup`: the real Kubernetes the tests run against, installed idempotently on
//! Debian 12 (as root).
//!
//! - `kube-apiserver`, `kube-controller-manager`, `kube-scheduler`, `kube-proxy`, `kubelet` and
//!   `kubectl` built from the `k8s.io/kubernetes` Go module that `tests/k8s/go.mod` requires
//!   (its staging modules are mapped to their published copies there), CGO off, with the
//!   release's version stamped in.
//! - `kustomize` and `helm` by `go install` at the versions below.
//! - `etcd-server`, `haproxy`, `containerd`, `runc` and the CNI plugins from Debian's apt.
//! - The real node's test images (a pod sandbox, an echo server and CoreDNS, [`test_images`]).
//!
//! Binaries are kept outside the work tree (`$TOPOPROXY_CACHE`, else
//! `$XDG_CACHE_HOME/topoproxy`, else `~/.cache/topoproxy`) beside Go's own module and build
//! caches, so a fresh clone on the same machine (CI) finds them: the Kubernetes binaries under
//! `k8s/<version>/` with a copy of the `go.sum` they were built from (when `go.sum` changes,
//! a command is rebuilt only if a module it compiles from changed version), the tools under
//! `bin/` with a `<tool>.version` stamp each.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};

use crate::util::{output, run};
use crate::vm::{apt_get, dpkg_installed, dpkg_version};

/// The Kubernetes commands built from the module, in build order (cheapest first, so a failure
/// in the long kube-apiserver build comes after the others are cached).
pub const KUBERNETES_COMMANDS: [&str; 6] = [
    "kube-proxy",
    "kubectl",
    "kube-scheduler",
    "kubelet",
    "kube-controller-manager",
    "kube-apiserver",
];

/// Go-installed tools: (binary, package, version).
const GO_TOOLS: [(&str, &str, &str); 3] = [
    (
        "kustomize",
        "sigs.k8s.io/kustomize/kustomize/v5",
        // v5.8.3 needs Go 1.27; this machine has 1.26.
        "v5.8.2",
    ),
    ("helm", "helm.sh/helm/v3/cmd/helm", "v3.22.0"),
    // The CRI client, to look at the real node's containers as an operator would.
    ("crictl", "sigs.k8s.io/cri-tools/cmd/crictl", "v1.37.0"),
];

/// etcd and haproxy for the control plane; containerd, runc and the CNI plugins for the real
/// node (`tests/k8s-harness/src/node.rs`).
const APT_PACKAGES: [&str; 5] = [
    "etcd-server",
    "haproxy",
    "containerd",
    "runc",
    "containernetworking-plugins",
];

/// The folder that outlives work trees: `$TOPOPROXY_CACHE`, `$XDG_CACHE_HOME/topoproxy` or
/// `~/.cache/topoproxy`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TOPOPROXY_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("topoproxy");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/topoproxy")
}

/// Where `kustomize` and `helm` live.
pub fn tools_bin_dir() -> PathBuf {
    cache_dir().join("bin")
}

fn go_module_dir() -> PathBuf {
    crate::workspace_root().join("tests/k8s")
}

/// The `k8s.io/kubernetes` version `tests/k8s/go.mod` requires: the one source of the version.
pub fn kubernetes_version() -> Result<String> {
    let go_mod = go_module_dir().join("go.mod");
    let text = std::fs::read_to_string(&go_mod)
        .with_context(|| format!("reading {}", go_mod.display()))?;
    text.lines()
        .filter_map(|line| {
            let mut words = line.trim().trim_start_matches("require").split_whitespace();
            (words.next() == Some("k8s.io/kubernetes"))
                .then(|| words.next().map(str::to_owned))
                .flatten()
        })
        .next()
        .with_context(|| format!("{} requires no k8s.io/kubernetes", go_mod.display()))
}

/// Where the Kubernetes binaries of `version` live.
pub fn kubernetes_bin_dir(version: &str) -> PathBuf {
    cache_dir().join("k8s").join(version)
}

pub fn k8s_setup() -> Result<()> {
    let started = Instant::now();
    let uid = output(Command::new("id").arg("-u"))?;
    ensure!(
        uid.trim() == "0",
        "k8s-setup installs apt packages and must run as root (try `sudo -E cargo xtask k8s-setup`)"
    );
    let go = go_version()?;
    println!("k8s-setup: {go}");
    apt_packages()?;
    kubernetes_binaries()?;
    go_tools()?;
    test_images()?;
    print_versions()?;
    println!(
        "k8s-setup: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The Go release used when the machine has none: the toolchain module the Go proxy serves
/// (what `GOTOOLCHAIN` downloads), at the version this machine kind ships.
const GO_TOOLCHAIN: &str = "v0.0.1-go1.26.8.linux-amd64";

/// `go` on PATH or in `/usr/local/go`, else the toolchain unpacked into the cache.
fn go_binary() -> PathBuf {
    crate::vm::find_in_path("go")
        .or_else(|| Some(PathBuf::from("/usr/local/go/bin/go")).filter(|p| p.is_file()))
        .unwrap_or_else(|| go_toolchain_dir().join("bin/go"))
}

// Python's zipfile, keeping the executable bits (unzip may be missing on a fresh machine).
const UNPACK_TOOLCHAIN: &str = "import os, sys, zipfile\n\
    zip_path, prefix, dest = sys.argv[1:4]\n\
    with zipfile.ZipFile(zip_path) as z:\n\
    \x20   for info in z.infolist():\n\
    \x20       if not info.filename.startswith(prefix) or info.is_dir():\n\
    \x20           continue\n\
    \x20       target = os.path.join(dest, info.filename[len(prefix):])\n\
    \x20       os.makedirs(os.path.dirname(target), exist_ok=True)\n\
    \x20       with z.open(info) as src, open(target, 'wb') as out:\n\
    \x20           out.write(src.read())\n\
    \x20       os.chmod(target, (info.external_attr >> 16) & 0o777 or 0o644)\n";

fn go_toolchain_dir() -> PathBuf {
    cache_dir().join("go").join(GO_TOOLCHAIN)
}

fn go_command() -> Command {
    let mut cmd = Command::new(go_binary());
    // The machine's own Go (or the one fetched above); never a toolchain download mid-build.
    cmd.env("GOTOOLCHAIN", "local").env("CGO_ENABLED", "0");
    cmd
}

/// Fetches the Go toolchain from the module proxy when the machine has no Go: the zip holds a
/// whole Go distribution under `golang.org/toolchain@VERSION/`.
fn ensure_go() -> Result<()> {
    if go_binary().is_file() {
        return Ok(());
    }
    let dir = go_toolchain_dir();
    let zip = cache_dir().join(format!("go-{GO_TOOLCHAIN}.zip"));
    std::fs::create_dir_all(cache_dir()).context("creating the cache folder")?;
    let url = format!("https://proxy.golang.org/golang.org/toolchain/@v/{GO_TOOLCHAIN}.zip");
    println!("k8s-setup: no Go on this machine; fetching {url}");
    run(Command::new("curl")
        .args(["-fsSL", "-o"])
        .arg(&zip)
        .arg(&url))
    .context("downloading the Go toolchain from the module proxy")?;
    let prefix = format!("golang.org/toolchain@{GO_TOOLCHAIN}/");
    run(Command::new("python3")
        .args(["-c", UNPACK_TOOLCHAIN])
        .arg(&zip)
        .arg(&prefix)
        .arg(&dir))
    .context("unpacking the Go toolchain")?;
    let _ = std::fs::remove_file(&zip);
    ensure!(
        go_binary().is_file(),
        "the Go toolchain was unpacked but {} is missing",
        go_binary().display()
    );
    Ok(())
}

fn go_version() -> Result<String> {
    ensure_go()?;
    output(go_command().arg("version"))
        .map(|v| v.trim().to_owned())
        .context("Go is needed to build Kubernetes (Go 1.26)")
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .into_iter()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("k8s-setup: apt-get install {}", missing.join(" "));
    if run(apt_get()
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
    .is_err()
    {
        run(apt_get().args(["update", "-q"])).context("apt-get update failed")?;
        run(apt_get()
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))
        .with_context(|| format!("apt-get install {} failed", missing.join(" ")))?;
    }
    // Debian starts the packaged daemons; the tests start their own on other ports.
    for service in ["etcd", "haproxy", "containerd"] {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", service])
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status();
    }
    Ok(())
}

fn kubernetes_binaries() -> Result<()> {
    let version = kubernetes_version()?;
    let dir = kubernetes_bin_dir(&version);
    let go_sum =
        std::fs::read(go_module_dir().join("go.sum")).context("reading tests/k8s/go.sum")?;
    let stamp = dir.join("go.sum");
    let built_from = std::fs::read_to_string(&stamp).ok();
    let fresh = built_from.as_deref().map(str::as_bytes) == Some(go_sum.as_slice());
    let mut missing = Vec::new();
    for command in KUBERNETES_COMMANDS {
        let present = dir.join(command).is_file();
        let current = present
            && (fresh
                || built_from
                    .as_deref()
                    .is_some_and(|old| built_with_same_modules(command, old)));
        if !current {
            missing.push(command);
        }
    }
    if missing.is_empty() {
        println!(
            "k8s-setup: Kubernetes {version} binaries cached in {}",
            dir.display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(&stamp);
    let minor = version
        .trim_start_matches('v')
        .split('.')
        .nth(1)
        .context("a Kubernetes version like v1.36.3")?;
    let ldflags = format!(
        "-s -w -X k8s.io/component-base/version.gitVersion={version} \
         -X k8s.io/component-base/version.gitMajor=1 \
         -X k8s.io/component-base/version.gitMinor={minor} \
         -X k8s.io/component-base/version.gitTreeState=clean \
         -X k8s.io/client-go/pkg/version.gitVersion={version}"
    );
    // The build cache of Kubernetes is several gigabytes and worthless once the binaries are
    // cached (they are rebuilt only when go.sum changes): it lives beside them and goes after.
    let build_cache = dir.join("go-build-cache");
    let built = build_commands(&missing, &dir, &build_cache, &version, &ldflags);
    let _ = std::fs::remove_dir_all(&build_cache);
    built?;
    std::fs::write(&stamp, go_sum).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

/// Whether `command`, built when `go.sum` read `old_go_sum`, would be built from the same
/// module versions now: every module it compiles from (`go list -deps`, replacements applied)
/// had its zip hash for exactly that version in the old `go.sum` and no other version's. A
/// `go.sum` that only gained modules for other commands (as when kubelet was added) then
/// rebuilds only those.
fn built_with_same_modules(command: &str, old_go_sum: &str) -> bool {
    let listed = output(
        go_command()
            .args([
                "list",
                "-deps",
                "-f",
                "{{with .Module}}{{with .Replace}}{{.Path}} {{.Version}}{{else}}{{.Path}} {{.Version}}{{end}}{{end}}",
            ])
            .arg(format!("k8s.io/kubernetes/cmd/{command}"))
            .current_dir(go_module_dir()),
    );
    listed.is_ok_and(|listed| modules_unchanged(&listed, old_go_sum))
}

/// Whether every `path version` line of `listed` names the one version whose zip hash
/// `old_go_sum` holds for that path (lines ending `/go.mod` hash only a go.mod).
fn modules_unchanged(listed: &str, old_go_sum: &str) -> bool {
    let zip_versions = |path: &str| -> Vec<&str> {
        old_go_sum
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let (module, version) = (words.next()?, words.next()?);
                (module == path && !version.ends_with("/go.mod")).then_some(version)
            })
            .collect()
    };
    let modules: std::collections::BTreeSet<&str> = listed
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    !modules.is_empty()
        && modules.into_iter().all(|line| match line.split_once(' ') {
            Some((path, version)) => zip_versions(path) == [version],
            None => false,
        })
}

fn build_commands(
    commands: &[&str],
    dir: &Path,
    build_cache: &Path,
    version: &str,
    ldflags: &str,
) -> Result<()> {
    for &command in commands {
        println!("k8s-setup: building {command} {version} (kube-apiserver takes ~12 minutes cold)");
        let started = Instant::now();
        run(go_command()
            .env("GOCACHE", build_cache)
            .args(["build", "-trimpath", "-ldflags", ldflags, "-o"])
            .arg(dir.join(command))
            .arg(format!("k8s.io/kubernetes/cmd/{command}"))
            .current_dir(go_module_dir()))
        .with_context(|| format!("building {command} from k8s.io/kubernetes {version}"))?;
        println!(
            "k8s-setup: {command} built in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Where the real node's test images are kept (`tests/k8s-harness` reads them from there).
pub fn test_images_dir() -> PathBuf {
    cache_dir().join("test-images")
}

fn test_images() -> Result<()> {
    let sources = go_module_dir().join("images");
    crate::image::test_images::build_test_images(&test_images_dir(), &sources, &|dir, binary| {
        run(go_command()
            .args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
            .arg(binary)
            .arg(".")
            .current_dir(dir))
        .with_context(|| format!("building {}", dir.display()))
    })?;
    Ok(())
}

fn go_tools() -> Result<()> {
    let bin = tools_bin_dir();
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    for (name, package, version) in GO_TOOLS {
        let stamp = bin.join(format!("{name}.version"));
        let installed = std::fs::read_to_string(&stamp).unwrap_or_default();
        if installed.trim() == version && bin.join(name).is_file() {
            continue;
        }
        println!("k8s-setup: go install {package}@{version}");
        run(go_command()
            .args(["install", &format!("{package}@{version}")])
            .env("GOBIN", &bin)
            .current_dir(std::env::temp_dir()))
        .with_context(|| format!("go install {package}@{version}"))?;
        std::fs::write(&stamp, version).with_context(|| format!("writing {}", stamp.display()))?;
    }
    Ok(())
}

fn first_line(program: &Path, args: &[&str]) -> Result<String> {
    let text = output(Command::new(program).args(args))?;
    Ok(text.lines().next().unwrap_or_default().trim().to_owned())
}

fn print_versions() -> Result<()> {
    let version = kubernetes_version()?;
    let dir = kubernetes_bin_dir(&version);
    for command in KUBERNETES_COMMANDS {
        let args: &[&str] = if command == "kubectl" {
            &["version", "--client"]
        } else {
            &["--version"]
        };
        let printed = first_line(&dir.join(command), args)?;
        ensure!(
            printed.contains(&version),
            "{command} reports {printed:?}, expected {version}"
        );
        println!("k8s-setup: {command}: {printed}");
    }
    let bin = tools_bin_dir();
    println!(
        "k8s-setup: kustomize: {}",
        first_line(&bin.join("kustomize"), &["version"])?
    );
    println!(
        "k8s-setup: helm: {}",
        std::fs::read_to_string(bin.join("helm.version"))?.trim()
    );
    for package in APT_PACKAGES {
        match dpkg_version(package) {
            Some(v) => println!("k8s-setup: {package}: {v}"),
            None => bail!("{package} is not installed"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_toolchain_unpacker_is_valid_python() {
        let status = std::process::Command::new("python3")
            .args(["-c", "import ast, sys; ast.parse(sys.argv[1])"])
            .arg(super::UNPACK_TOOLCHAIN)
            .status()
            .expect("running python3");
        assert!(status.success());
    }

    const OLD_GO_SUM: &str = "\
k8s.io/api v0.36.3 h1:aaa=
k8s.io/api v0.36.3/go.mod h1:bbb=
golang.org/x/net v0.40.0 h1:ccc=
golang.org/x/net v0.40.0/go.mod h1:ddd=
golang.org/x/net v0.38.0/go.mod h1:eee=
";

    #[test]
    fn a_command_built_from_the_same_module_versions_is_kept() {
        let listed = "k8s.io/api v0.36.3\ngolang.org/x/net v0.40.0\nk8s.io/api v0.36.3\n";
        assert!(super::modules_unchanged(listed, OLD_GO_SUM));
    }

    #[test]
    fn a_changed_or_new_module_version_rebuilds() {
        let unchanged = |listed: &str| super::modules_unchanged(listed, OLD_GO_SUM);
        assert!(!unchanged("golang.org/x/net v0.41.0\n"));
        // Only the go.mod of v0.38.0 was hashed: nothing was compiled from it.
        assert!(!unchanged("golang.org/x/net v0.38.0\n"));
        assert!(!unchanged("k8s.io/cri-streaming v0.36.3\n"));
        assert!(!unchanged(""));
    }
}
