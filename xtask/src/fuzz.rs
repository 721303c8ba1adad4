//! `cargo xtask fuzz [--seconds N] [--target NAME]`: every fuzz target in `fuzz/` (cargo fuzz,
//! libFuzzer) for a bounded time each; fails on the first crash, panic, timeout or leak and
//! says where libFuzzer left the input.
//!
//! - cargo-fuzz is installed from crates.io at a pinned version when missing.
//! - The toolchain is the project's stable one with `RUSTC_BOOTSTRAP=1` (as the eBPF build
//!   does): cargo fuzz passes a few `-Z` flags; no nightly to download and keep in step.
//! - No sanitizer (`-s none`): the targets are safe Rust; what they look for is panics,
//!   overflow (debug assertions are on), hangs and unbounded allocation, which libFuzzer
//!   itself catches; AddressSanitizer would halve the executions.
//! - Seeds are committed in `fuzz/seeds/<target>/` (`fuzz/seeds/make-seeds.py` rebuilds them
//!   from the captured vectors and golden inputs) and only read; what libFuzzer discovers
//!   goes to `<target dir>/fuzz/corpus/<target>/`, kept between runs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};

use crate::util::tail;

/// The cargo-fuzz release the project uses.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target in fuzz/Cargo.toml, in the order they run.
pub const TARGETS: [&str; 5] = [
    "yaml_plan",
    "ipvs_netlink",
    "nft_json",
    "conntrack_netlink",
    "config_file",
];

/// What one bounded run did.
struct Outcome {
    target: &'static str,
    executions: u64,
    corpus_units: u64,
    seconds: f64,
}

/// Runs each of `targets` (all when empty) for `seconds`; fails on the first crash.
pub fn fuzz(seconds: u64, targets: &[String], seed: Option<u32>) -> Result<()> {
    let selected: Vec<&'static str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets
            .iter()
            .map(|name| {
                TARGETS
                    .iter()
                    .copied()
                    .find(|known| known == name)
                    .with_context(|| format!("no fuzz target {name:?} (known: {TARGETS:?})"))
            })
            .collect::<Result<_>>()?
    };
    ensure!(seconds > 0, "--seconds must be more than 0");
    install_cargo_fuzz()?;
    // One build of every target, then each binary run directly: `cargo fuzz run` would invoke
    // cargo again per target, with other profile settings, and rebuild the agent each time.
    println!("fuzz: building the targets");
    let status = cargo_fuzz()
        .arg("build")
        .args(FUZZ_FLAGS)
        .status()
        .context("running cargo fuzz build")?;
    ensure!(status.success(), "cargo fuzz build failed ({status})");
    let mut outcomes = Vec::new();
    for target in selected {
        outcomes.push(run_target(target, seconds, seed)?);
    }
    println!("fuzz: {seconds} s per target, no crash");
    println!("| target | executions | corpus units after | seconds |");
    println!("|---|---|---|---|");
    for outcome in &outcomes {
        println!(
            "| {} | {} | {} | {:.0} |",
            outcome.target, outcome.executions, outcome.corpus_units, outcome.seconds
        );
    }
    Ok(())
}

/// Release build with debug assertions (overflow checks), no sanitizer.
const FUZZ_FLAGS: [&str; 4] = ["--sanitizer", "none", "--debug-assertions", "--release"];

/// Where `cargo fuzz build` puts a target's binary.
fn binary(target: &str) -> std::path::PathBuf {
    crate::target_dir()
        .join("x86_64-unknown-linux-gnu/release")
        .join(target)
}

fn run_target(target: &'static str, seconds: u64, seed: Option<u32>) -> Result<Outcome> {
    let root = crate::workspace_root();
    let corpus = crate::target_dir().join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let seeds = root.join("fuzz/seeds").join(target);
    ensure!(seeds.is_dir(), "no seeds in {}", seeds.display());
    let artifacts = crate::target_dir().join("fuzz/artifacts").join(target);
    std::fs::create_dir_all(&artifacts)
        .with_context(|| format!("creating {}", artifacts.display()))?;
    println!("fuzz: {target} for {seconds} s");
    let started = Instant::now();
    let mut command = Command::new(binary(target));
    if let Some(seed) = seed {
        command.arg(format!("-seed={seed}"));
    }
    let output = command
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // One input taking a second is a hang for these decoders.
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(&corpus)
        .arg(&seeds)
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", binary(target).display()))?;
    let log = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        eprintln!("{}", tail(&log, 60));
        bail!(
            "fuzz target {target} failed ({}): the input is in {} (replay it with \
             `{} FILE`, then add it as a regression test)",
            output.status,
            artifacts.display(),
            binary(target).display()
        );
    }
    for line in log
        .lines()
        .filter(|line| line.starts_with("stat::") || line.starts_with("Done "))
    {
        println!("  {line}");
    }
    Ok(Outcome {
        target,
        executions: final_stat(&log, "stat::number_of_executed_units")
            .context("libFuzzer printed no execution count")?,
        corpus_units: count_files(&corpus),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `cargo fuzz` in the workspace root, on the project's toolchain with `-Z` allowed.
fn cargo_fuzz() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command
        .arg("fuzz")
        .env("RUSTC_BOOTSTRAP", "1")
        .current_dir(crate::workspace_root());
    command
}

fn install_cargo_fuzz() -> Result<()> {
    if installed_version().as_deref() == Some(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    println!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} (crates.io)");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ])
        .status()
        .context("running cargo install cargo-fuzz")?;
    ensure!(
        status.success(),
        "cargo install cargo-fuzz failed ({status})"
    );
    ensure!(
        installed_version().as_deref() == Some(CARGO_FUZZ_VERSION),
        "cargo-fuzz {CARGO_FUZZ_VERSION} installed but `cargo fuzz --version` does not say so: \
         is ~/.cargo/bin on PATH?"
    );
    Ok(())
}

/// "cargo-fuzz 0.13.2" → "0.13.2".
fn installed_version() -> Option<String> {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args(["fuzz", "--version"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

/// A `stat::NAME: VALUE` line of libFuzzer's `-print_final_stats=1`.
fn final_stat(log: &str, name: &str) -> Option<u64> {
    log.lines().find_map(|line| {
        line.strip_prefix(name)?
            .trim_start_matches(':')
            .trim()
            .parse()
            .ok()
    })
}

fn count_files(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().count() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_final_stats() {
        let log = "INFO: seed corpus: files: 4\nDone 1234 runs in 2 second(s)\n\
                   stat::number_of_executed_units: 1234\nstat::average_exec_per_sec:     617\n";
        assert_eq!(
            final_stat(log, "stat::number_of_executed_units"),
            Some(1234)
        );
        assert_eq!(final_stat(log, "stat::average_exec_per_sec"), Some(617));
        assert_eq!(final_stat(log, "stat::peak_rss_mb"), None);
    }

    #[test]
    fn every_target_has_seeds_and_a_source() {
        let root = crate::workspace_root();
        for target in TARGETS {
            let seeds = root.join("fuzz/seeds").join(target);
            assert!(count_files(&seeds) > 0, "{} is empty", seeds.display());
            let source = root.join("fuzz/fuzz_targets").join(format!("{target}.rs"));
            assert!(source.is_file(), "{} is missing", source.display());
        }
    }
}
