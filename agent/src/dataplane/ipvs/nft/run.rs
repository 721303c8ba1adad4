//! The process edge: finding `nft`, feeding it a script on stdin, collecting its output.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::NftError;

/// Where `nft` lives when PATH does not say (Debian and most distributions).
const FALLBACK: &str = "/usr/sbin/nft";

/// Finds `nft` in PATH, else at `/usr/sbin/nft`.
pub fn find_nft() -> Result<PathBuf, NftError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nft"))
        .chain(std::iter::once(PathBuf::from(FALLBACK)))
        .find(|candidate| is_executable(candidate))
        .ok_or(NftError::NotFound)
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// How to start `nft`: the program and the arguments that come before nft's own (for
/// example `nsenter --net=/run/netns/X nft`).
#[derive(Debug, Clone)]
pub struct Invocation {
    pub program: PathBuf,
    pub leading_args: Vec<OsString>,
}

/// What a successful run printed.
pub struct Output {
    pub stdout: String,
}

impl Invocation {
    /// Runs nft with `args`, writing `stdin` (if any) to it. `action` names the call in errors.
    /// Messages are forced to the C locale so callers can recognise them.
    pub fn run(
        &self,
        action: &'static str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output, NftError> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.leading_args)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| NftError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        // Write from a thread so a chatty nft can never block us on a full pipe.
        let output = std::thread::scope(|scope| {
            let writer = child.stdin.take().map(|mut pipe| {
                let script = stdin.unwrap_or_default();
                scope.spawn(move || pipe.write_all(script.as_bytes()))
            });
            let output = child.wait_with_output();
            let written = match writer {
                Some(handle) => handle
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("stdin writer panicked"))),
                None => Ok(()),
            };
            (output, written)
        });
        let (output, written) = output;
        let output = output.map_err(|source| NftError::Wait { action, source })?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if !output.status.success() {
            return Err(NftError::Failed {
                action,
                status: output.status,
                stderr,
            });
        }
        // nft succeeded, so it read everything it needed; a write error here would mean it
        // exited early, which a zero status rules out. Report it anyway rather than hide it.
        written.map_err(|source| NftError::Wait { action, source })?;
        Ok(Output {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        })
    }
}
