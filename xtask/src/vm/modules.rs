//! A kernel's modules resolved with their dependencies for the initramfs.

use super::*;

/// Module name → path (relative to the modules directory) of every module of a kernel, from
/// `modules.order`-independent walking of `kernel/`.
pub(super) fn module_index(modules: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![modules.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.file_name().and_then(OsStr::to_str).unwrap_or_default();
            let Some(stem) = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                .iter()
                .find_map(|ext| name.strip_suffix(ext))
            else {
                continue;
            };
            let relative = path.strip_prefix(modules)?.to_path_buf();
            index.insert(stem.replace('-', "_"), relative);
        }
    }
    Ok(index)
}

pub(super) fn builtin_modules(modules: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .filter_map(|name| name.strip_suffix(".ko"))
        .map(|name| name.replace('-', "_"))
        .collect()
}

/// A module's bytes, decompressed.
pub(super) fn read_module(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        decompress("xz", &["-dc"], &bytes)
    } else if name.ends_with(".zst") {
        decompress("zstd", &["-dcq"], &bytes)
    } else if name.ends_with(".gz") {
        decompress("gzip", &["-dc"], &bytes)
    } else {
        Ok(bytes)
    }
}

/// The `depends=` entry of a module's `.modinfo`.
pub(super) fn module_depends(ko: &[u8]) -> Vec<String> {
    let needle = b"\0depends=";
    let Some(at) = find_bytes(ko, needle) else {
        return Vec::new();
    };
    let rest = &ko[at + needle.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// The modules (decompressed) to put into an initramfs, in load order, with dependencies
/// first, read from each module's `depends=`, the same data depmod writes to modules.dep.
pub(super) struct ModuleSet {
    /// (name, path relative to the modules directory ending in `.ko`, bytes)
    pub(super) modules: Vec<(String, PathBuf, Vec<u8>)>,
    /// Names loaded by /init, in order.
    pub(super) boot_order: Vec<String>,
}

pub(super) fn resolve_modules(kernel: &Kernel) -> Result<ModuleSet> {
    let dir = kernel.modules();
    let index = module_index(&dir)?;
    let builtin = builtin_modules(&dir);
    let mut loaded: BTreeMap<String, usize> = BTreeMap::new();
    let mut set = ModuleSet {
        modules: Vec::new(),
        boot_order: Vec::new(),
    };
    #[allow(clippy::too_many_arguments)]
    pub(super) fn visit(
        name: &str,
        optional: bool,
        dir: &Path,
        index: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        loaded: &mut BTreeMap<String, usize>,
        set: &mut ModuleSet,
        chain: &mut Vec<String>,
    ) -> Result<bool> {
        if loaded.contains_key(name) {
            return Ok(true);
        }
        if chain.iter().any(|c| c == name) {
            bail!("module dependency cycle: {} -> {name}", chain.join(" -> "));
        }
        let Some(relative) = index.get(name) else {
            if builtin.contains(name) {
                return Ok(false);
            }
            if optional {
                return Ok(false);
            }
            bail!("module {name} is neither a module nor built into this kernel");
        };
        let bytes = read_module(&dir.join(relative))?;
        chain.push(name.to_owned());
        for dep in module_depends(&bytes) {
            visit(&dep, false, dir, index, builtin, loaded, set, chain)
                .with_context(|| format!("a dependency of {name}"))?;
        }
        chain.pop();
        let mut ko = relative.to_string_lossy().into_owned();
        for ext in [".xz", ".zst", ".gz"] {
            if let Some(stripped) = ko.strip_suffix(ext) {
                ko = stripped.to_owned();
            }
        }
        loaded.insert(name.to_owned(), set.modules.len());
        set.modules
            .push((name.to_owned(), PathBuf::from(ko), bytes));
        Ok(true)
    }
    for (list, boot) in [(BOOT_MODULES, true), (ON_DEMAND_MODULES, false)] {
        for entry in list {
            let (name, optional) = match entry.strip_suffix('?') {
                Some(name) => (name, true),
                None => (*entry, false),
            };
            let before = set.modules.len();
            visit(
                name,
                optional,
                &dir,
                &index,
                &builtin,
                &mut loaded,
                &mut set,
                &mut Vec::new(),
            )
            .with_context(|| format!("resolving module {name} for {}", kernel.release))?;
            if boot {
                let added: Vec<String> = set.modules[before..]
                    .iter()
                    .map(|(n, _, _)| n.clone())
                    .collect();
                set.boot_order.extend(added);
            }
        }
    }
    Ok(set)
}
