//! Serves a synthetic cluster from the fake API server until interrupted, so the agent can run
//! as a separate process against it (RSS and sync benchmarks).
//!
//! ```text
//! fake-apiserver [--listen 127.0.0.1:0] [--services N] [--endpoints M] [--zones Z]
//!                [--nodes-per-zone K] [--hints] [--kubeconfig-out PATH]
//! ```
//!
//! Prints the server URL on the first line of stdout once the cluster is loaded. Binds only
//! loopback addresses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use fake_apiserver::{synthetic, FakeApiServer};

struct Args {
    listen: SocketAddr,
    services: usize,
    endpoints: usize,
    zones: usize,
    nodes_per_zone: usize,
    hints: bool,
    kubeconfig_out: Option<PathBuf>,
}

const USAGE: &str = "usage: fake-apiserver [--listen 127.0.0.1:0] [--services N] [--endpoints M] \
[--zones Z] [--nodes-per-zone K] [--hints] [--kubeconfig-out PATH]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        services: 0,
        endpoints: 10,
        zones: 3,
        nodes_per_zone: 3,
        hints: false,
        kubeconfig_out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |name: &str, v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                args.listen = v
                    .parse()
                    .map_err(|_| format!("--listen: {v:?} is not an address like 127.0.0.1:0"))?;
            }
            "--services" => args.services = number("--services", value("--services")?)?,
            "--endpoints" => args.endpoints = number("--endpoints", value("--endpoints")?)?,
            "--zones" => args.zones = number("--zones", value("--zones")?)?,
            "--nodes-per-zone" => {
                args.nodes_per_zone = number("--nodes-per-zone", value("--nodes-per-zone")?)?
            }
            "--hints" => args.hints = true,
            "--kubeconfig-out" => args.kubeconfig_out = Some(value("--kubeconfig-out")?.into()),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let server = match FakeApiServer::start_at(args.listen).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake-apiserver: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let t = Instant::now();
    let objects = synthetic::synthetic_objects(
        args.services,
        args.endpoints,
        args.zones,
        args.nodes_per_zone,
        args.hints,
    );
    let count = objects.len();
    let rv = server.apply_many(objects);
    eprintln!(
        "fake-apiserver: {count} objects loaded in {:?} (resourceVersion {rv})",
        t.elapsed()
    );
    if let Some(path) = &args.kubeconfig_out {
        if let Err(e) = server.write_kubeconfig(path) {
            eprintln!("fake-apiserver: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    println!("{}", server.url());
    shutdown_signal().await;
    ExitCode::SUCCESS
}
