//! The Debian part of the image: `nft`, `ipvsadm` and `conntrack` from Debian 12's own
//! packages at pinned versions, and exactly the shared libraries they (and the agent) load.
//!
//! The packages are fetched with `apt-get download NAME=VERSION` (apt checks them against the
//! signed archive index) and unpacked with `dpkg-deb -x`; nothing is installed on the host.
//! Which files go into the image is decided from the ELF files themselves: the tools, their
//! `DT_NEEDED` libraries resolved inside the unpacked packages (never on the host), recursively,
//! and glibc's loader named by `PT_INTERP`. A pinned package that supplies none of those files is
//! an error, so the pin list stays the exact set of packages in the image.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};

use crate::util::run;
use object::elf::{FileHeader64, DT_NEEDED, PT_INTERP};
use object::read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _};
use object::Endianness;
use sha2::{Digest as _, Sha256};

/// Debian 12 (bookworm) packages in the image, `(name, version)`. Update the versions when the
/// archive moves on (a point release replaces `+deb12uN` versions, and apt then cannot fetch the
/// old one); `cargo xtask image` says which pin it could not fetch.
pub const PINNED_PACKAGES: &[(&str, &str)] = &[
    // The tools.
    ("nftables", "1.0.6-2+deb12u2"),
    ("ipvsadm", "1:1.31-1+b1"),
    ("conntrack", "1:1.4.7-1+b2"),
    // glibc (the loader, libc, libm) and libgcc_s: the agent and every tool.
    ("libc6", "2.36-9+deb12u14"),
    ("libgcc-s1", "12.2.0-14+deb12u1"),
    // nft.
    ("libnftables1", "1.0.6-2+deb12u2"),
    ("libedit2", "3.1-20221030-2"),
    ("libbsd0", "0.11.7-2"),
    ("libmd0", "1.0.4-2"),
    ("libtinfo6", "6.4-4"),
    ("libnftnl11", "1.2.4-2"),
    ("libxtables12", "1.8.9-2"),
    ("libjansson4", "2.14-2"),
    ("libgmp10", "2:6.2.1+dfsg1-1.1"),
    // nft and conntrack.
    ("libmnl0", "1.0.4-3"),
    // ipvsadm.
    ("libnl-3-200", "3.7.0-0.2+b1"),
    ("libnl-genl-3-200", "3.7.0-0.2+b1"),
    ("libpopt0", "1.19+dfsg-1"),
    // conntrack.
    ("libnetfilter-conntrack3", "1.0.9-3"),
    ("libnfnetlink0", "1.0.2-2"),
];

/// The tools, as `(package, path inside it)`.
pub const TOOLS: &[(&str, &str)] = &[
    ("nftables", "/usr/sbin/nft"),
    ("ipvsadm", "/sbin/ipvsadm"),
    ("conntrack", "/usr/sbin/conntrack"),
];

/// Where glibc's loader looks for libraries when there is no /etc/ld.so.cache (Debian's
/// multiarch directories first).
const LIBRARY_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "lib",
    "usr/lib",
];

/// One fetched and unpacked package.
#[derive(Debug, Clone)]
pub struct Package {
    pub name: String,
    pub version: String,
    /// SHA-256 of the `.deb`, hex.
    pub deb_sha256: String,
    /// Where `dpkg-deb -x` unpacked it.
    pub root: PathBuf,
}

/// A file for the image: its path there, where its bytes are, which package it comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageFile {
    pub image_path: PathBuf,
    pub source: PathBuf,
    pub package: String,
}

/// Fetches every pinned package into `cache` (kept between runs) and unpacks each into
/// `cache/root/NAME_VERSION`.
pub fn fetch(cache: &Path) -> Result<Vec<Package>> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let mut packages = Vec::new();
    for (name, version) in PINNED_PACKAGES {
        let deb = deb_file(&debs, name, version)?;
        let root = cache
            .join("root")
            .join(format!("{name}_{}", version.replace(':', "%3a")));
        if !root.join(".unpacked").is_file() {
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
            fs::write(root.join(".unpacked"), b"").context("marking the unpacked package")?;
        }
        let bytes = fs::read(&deb).with_context(|| format!("reading {}", deb.display()))?;
        packages.push(Package {
            name: (*name).to_owned(),
            version: (*version).to_owned(),
            deb_sha256: format!("{:x}", Sha256::digest(&bytes)),
            root,
        });
    }
    Ok(packages)
}

/// The `.deb` of `name=version` in `debs`, downloaded by apt if not there yet.
fn deb_file(debs: &Path, name: &str, version: &str) -> Result<PathBuf> {
    // apt names the file NAME_VERSION_ARCH.deb with the epoch's colon escaped.
    let prefix = format!("{name}_{}_", version.replace(':', "%3a"));
    if let Some(found) = find_deb(debs, &prefix)? {
        return Ok(found);
    }
    let status = Command::new("apt-get")
        // apt's sandbox user cannot write the cache directory; downloading as root is what
        // apt falls back to anyway (with a warning). The files are checked against the
        // signed index either way.
        .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
        .arg(format!("{name}={version}"))
        .current_dir(debs)
        .status()
        .context("running apt-get download (Debian's apt is needed)")?;
    ensure!(
        status.success(),
        "apt-get download {name}={version} failed: the pin in xtask/src/image/debian.rs may be \
         gone from the archive (`apt-cache policy {name}` shows the current version), or the \
         package lists are stale (`apt-get update`)"
    );
    find_deb(debs, &prefix)?.with_context(|| {
        format!(
            "apt-get download left no {prefix}*.deb in {}",
            debs.display()
        )
    })
}

fn find_deb(debs: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    for entry in fs::read_dir(debs).with_context(|| format!("listing {}", debs.display()))? {
        let path = entry.context("listing the .deb cache")?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(prefix) && name.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The tools and every library they and `extra_elves` (the agent) need, resolved inside the
/// packages, plus glibc's loader and each used package's copyright file. Fails on a library no
/// package supplies and on a pinned package that supplies nothing.
pub fn closure(packages: &[Package], extra_elves: &[PathBuf]) -> Result<Vec<ImageFile>> {
    let mut files = BTreeSet::new();
    let mut pending: Vec<PathBuf> = extra_elves.to_vec();
    for (package_name, path) in TOOLS {
        let package = package_named(packages, package_name)?;
        let source = resolve_in(&package.root, Path::new(path))?
            .with_context(|| format!("{package_name} has no {path}"))?;
        pending.push(source.clone());
        files.insert(ImageFile {
            image_path: PathBuf::from(path),
            source,
            package: package.name.clone(),
        });
    }
    let mut seen_libraries = BTreeSet::new();
    while let Some(elf) = pending.pop() {
        let needs = elf_needs(&elf)?;
        let mut wanted: Vec<(PathBuf, Option<String>)> = needs
            .needed
            .into_iter()
            .map(|soname| (PathBuf::new(), Some(soname)))
            .collect();
        if let Some(interpreter) = needs.interpreter {
            wanted.push((PathBuf::from(interpreter), None));
        }
        for (absolute, soname) in wanted {
            let key = soname
                .clone()
                .unwrap_or_else(|| absolute.display().to_string());
            if !seen_libraries.insert(key.clone()) {
                continue;
            }
            let (image_path, source, package) = match &soname {
                Some(soname) => find_library(packages, soname)?.with_context(|| {
                    format!(
                        "{} needs {soname}, which no pinned package supplies: add its package \
                         to PINNED_PACKAGES in xtask/src/image/debian.rs",
                        elf.display()
                    )
                })?,
                None => find_absolute(packages, &absolute)?.with_context(|| {
                    format!(
                        "{} names the loader {}, which no pinned package supplies",
                        elf.display(),
                        absolute.display()
                    )
                })?,
            };
            pending.push(source.clone());
            files.insert(ImageFile {
                image_path,
                source,
                package,
            });
        }
    }
    let used: BTreeSet<&str> = files.iter().map(|file| file.package.as_str()).collect();
    let unused: Vec<&str> = packages
        .iter()
        .map(|package| package.name.as_str())
        .filter(|name| !used.contains(name))
        .collect();
    ensure!(
        unused.is_empty(),
        "pinned packages that supply nothing the image needs: {}; remove them from \
         PINNED_PACKAGES",
        unused.join(", ")
    );
    let mut with_copyright: Vec<ImageFile> = files.into_iter().collect();
    for package in packages {
        let path = format!("/usr/share/doc/{}/copyright", package.name);
        if let Some(source) = resolve_in(&package.root, Path::new(&path))? {
            with_copyright.push(ImageFile {
                image_path: PathBuf::from(path),
                source,
                package: package.name.clone(),
            });
        }
    }
    with_copyright.sort();
    Ok(with_copyright)
}

fn package_named<'a>(packages: &'a [Package], name: &str) -> Result<&'a Package> {
    packages
        .iter()
        .find(|package| package.name == name)
        .with_context(|| format!("{name} is not among the pinned packages"))
}

/// The library file `soname` as the loader would find it in the packages' library directories:
/// `(path in the image, file to copy, package)`. The image gets a regular file at the soname
/// path (Debian's `libfoo.so.1 -> libfoo.so.1.2.3` link is resolved, not copied).
fn find_library(packages: &[Package], soname: &str) -> Result<Option<(PathBuf, PathBuf, String)>> {
    for dir in LIBRARY_DIRS {
        let image_path = Path::new("/").join(dir).join(soname);
        if let Some(found) = find_absolute(packages, &image_path)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

fn find_absolute(
    packages: &[Package],
    image_path: &Path,
) -> Result<Option<(PathBuf, PathBuf, String)>> {
    for package in packages {
        if let Some(source) = resolve_in(&package.root, image_path)? {
            return Ok(Some((
                image_path.to_path_buf(),
                source,
                package.name.clone(),
            )));
        }
    }
    Ok(None)
}

/// `path` (absolute, as in the image) inside the unpacked package `root`, following symbolic
/// links inside `root` (an absolute link target means `root`-relative, never the host's file).
fn resolve_in(root: &Path, path: &Path) -> Result<Option<PathBuf>> {
    let mut current = path.to_path_buf();
    for _ in 0..16 {
        let on_disk = root.join(current.strip_prefix("/").unwrap_or(&current));
        let Ok(metadata) = fs::symlink_metadata(&on_disk) else {
            return Ok(None);
        };
        if !metadata.file_type().is_symlink() {
            return Ok(metadata.is_file().then_some(on_disk));
        }
        let target = fs::read_link(&on_disk)
            .with_context(|| format!("reading the link {}", on_disk.display()))?;
        current = if target.is_absolute() {
            target
        } else {
            current.parent().unwrap_or(Path::new("/")).join(target)
        };
        current = normalize(&current);
    }
    bail!(
        "too many symbolic links resolving {} in {}",
        path.display(),
        root.display()
    )
}

/// Removes `.` and `..` lexically (link targets like `../lib/x` inside a package root).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(part) => out.push(part),
            _ => {}
        }
    }
    out
}

/// What an ELF file asks the loader for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ElfNeeds {
    /// `DT_NEEDED` sonames, in file order.
    pub needed: Vec<String>,
    /// `PT_INTERP`, for executables.
    pub interpreter: Option<String>,
}

/// Reads `DT_NEEDED` and `PT_INTERP` of a 64-bit ELF file. A static binary has neither.
pub fn elf_needs(path: &Path) -> Result<ElfNeeds> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let parse = || -> object::read::Result<ElfNeeds> {
        let header = FileHeader64::<Endianness>::parse(data.as_slice())?;
        let endian = header.endian()?;
        let mut needs = ElfNeeds::default();
        for segment in header.program_headers(endian, data.as_slice())? {
            if segment.p_type(endian) == PT_INTERP {
                if let Ok(bytes) = segment.data(endian, data.as_slice()) {
                    let name = bytes.split(|b| *b == 0).next().unwrap_or_default();
                    needs.interpreter = Some(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
        let sections = header.sections(endian, data.as_slice())?;
        if let Some((entries, link)) = sections.dynamic(endian, data.as_slice())? {
            let strings = sections.strings(endian, data.as_slice(), link)?;
            for entry in entries {
                if entry.tag32(endian) == Some(DT_NEEDED as i32) {
                    let name = entry.string(endian, strings)?;
                    needs
                        .needed
                        .push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
        Ok(needs)
    };
    parse().with_context(|| format!("reading the ELF headers of {}", path.display()))
}

/// The packages of `files` with the files each supplies, for the report.
pub fn files_by_package(files: &[ImageFile]) -> BTreeMap<&str, Vec<&Path>> {
    let mut by_package: BTreeMap<&str, Vec<&Path>> = BTreeMap::new();
    for file in files {
        by_package
            .entry(file.package.as_str())
            .or_default()
            .push(file.image_path.as_path());
    }
    by_package
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_needed_libraries_and_loader_of_a_host_binary() {
        // Any dynamically linked binary of the host will do; the test binary itself is one.
        let me = std::env::current_exe().unwrap();
        let needs = elf_needs(&me).unwrap();
        assert!(
            needs.needed.iter().any(|name| name == "libc.so.6"),
            "{needs:?}"
        );
        assert_eq!(
            needs.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
    }

    #[test]
    fn links_resolve_inside_the_package_root_never_on_the_host() {
        let root = std::env::temp_dir().join(format!("xtask-debian-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("lib/x86_64-linux-gnu")).unwrap();
        fs::create_dir_all(root.join("lib64")).unwrap();
        fs::write(root.join("lib/x86_64-linux-gnu/libx.so.1.2"), b"x").unwrap();
        std::os::unix::fs::symlink("libx.so.1.2", root.join("lib/x86_64-linux-gnu/libx.so.1"))
            .unwrap();
        // Absolute target: must mean root/lib/..., not the host's /lib.
        std::os::unix::fs::symlink("/lib/x86_64-linux-gnu/libx.so.1", root.join("lib64/ld.so"))
            .unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("lib64/host")).unwrap();
        let expected = Some(root.join("lib/x86_64-linux-gnu/libx.so.1.2"));
        assert_eq!(
            resolve_in(&root, Path::new("/lib/x86_64-linux-gnu/libx.so.1")).unwrap(),
            expected
        );
        assert_eq!(
            resolve_in(&root, Path::new("/lib64/ld.so")).unwrap(),
            expected
        );
        assert_eq!(resolve_in(&root, Path::new("/lib64/host")).unwrap(), None);
        assert_eq!(resolve_in(&root, Path::new("/missing")).unwrap(), None);
        fs::remove_dir_all(root).unwrap();
    }
}
