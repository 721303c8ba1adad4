//! Commands a test runs to set up its world, and waiting for what they cause. The one place
//! that turns a failed command into a test failure with the command's output.
//!
//! Include with `#[path = "support/process.rs"] mod process;`.

#![allow(dead_code)]

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `program args`, panicking with its output when it fails; returns its stdout
/// (`k8s_harness::stdout_of`, the harness's one command runner).
pub fn sh(program: &str, args: &[&str]) -> String {
    stdout_of(Command::new(program).args(args), program)
}

/// Runs `command` (built with paths, environment or redirections [`sh`] cannot give) and
/// returns its stdout, panicking with both outputs when it fails; `what` names it.
pub fn stdout_of(command: &mut Command, what: &str) -> String {
    k8s_harness::stdout_of(command, what).unwrap_or_else(|error| panic!("{error}"))
}

/// [`sh`] with `input` written to the command's stdin (an `nft -f -` script, say).
pub fn sh_fed(program: &str, args: &[&str], input: &str) -> String {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program} {args:?}: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("writing the stdin of {program} {args:?}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {program} {args:?}: {e}"));
    k8s_harness::checked_stdout(&command, program, out).unwrap_or_else(|error| panic!("{error}"))
}

/// Runs a command and ignores its outcome (cleanup paths).
pub fn sh_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

/// Runs `command` with `sh -c` (a pipeline or `&&` chain), failing the test with its output
/// when it fails.
pub fn shell(command: &str) {
    let output = Command::new("sh")
        .arg("-c")
        .arg(command)
        .output()
        .unwrap_or_else(|e| panic!("starting sh -c `{command}`: {e}"));
    assert!(
        output.status.success(),
        "`{command}` failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Gives `child` up to `grace` to exit on its own (after it was told to), then kills it;
/// either way it is reaped.
pub fn wait_or_kill(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `check` until it returns `Ok` or `timeout` passes; panics with the last error.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not reached within {timeout:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
