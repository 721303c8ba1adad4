//! Where IPVS programming time goes: the same table (N services × 10 destinations) sent through
//! [`IpvsClient::execute`] in several modes, each timed per `sendmsg` batch, beside
//! `ipvsadm -R` of the same lines, all in one boot.
//!
//! Needs IPVS (root, the `ip_vs` module), so it runs inside the VM: `cargo xtask vm-bench`
//! builds it, stages it and runs it with `TOPOPROXY_IPVS_BATCH_SIZES=1000,3000` set. Without
//! that variable (a plain `cargo bench` on a host without IPVS) it says so and exits.
//!
//! Every mode runs in a network namespace of its own (IPVS state is per namespace): deleted
//! destinations stay in the namespace's trash for 2–3 minutes and every destination added
//! meanwhile walks that whole list, so a mode run after another one's flush would pay for it
//! (measured here: the same `ipvsadm -R` of 11,000 lines took 10 s over an empty trash and
//! 73 s after 66,000 deletions).
//!
//! Modes:
//! - `diff-order/ack-every`: every service, then every destination (the differ's order), each
//!   message asking for an acknowledgement: what the agent sent before issue 14;
//! - `diff-order/ack-last`: same order, only each batch's last message asks;
//! - `ipvsadm-order/ack-last`: each service followed by its destinations, as `ipvsadm -R`
//!   sends them (and the agent now does);
//! - `ipvsadm-order/sequential`: one request per `sendmsg`, waiting for its answer (what
//!   `ipvsadm -R` does, without its process and parsing);
//! - `ipvsadm-order/ack-last/no-estimation`: with `net.ipv4.vs.run_estimation=0`, to show
//!   what the kernel's rate estimators cost while the table grows;
//! - `ipvsadm -R`: the real tool, same lines;
//!
//! then the read-back the agent's periodic re-read does (one service dump, one destination
//! dump per service).
//!
//! Per mode: total seconds, batches, and the batches split into five equal groups in send
//! order, each with its mean kernel time per message (inside `sendmsg`), mean reply-reading
//! time per message and mean encoding time per message (µs), so growth with the table's size
//! shows.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use topoproxy::dataplane::ipvs::netlink::{
    Acknowledgements, BatchTiming, Command, Forward, IpvsClient, IpvsDestination, IpvsService,
    ServiceId,
};
use topoproxy::model::Protocol;

const DESTINATIONS: usize = 10;
const RUN_ESTIMATION: &str = "/proc/sys/net/ipv4/vs/run_estimation";

fn service_id(index: usize) -> ServiceId {
    let n = (10u32 << 24 | 96 << 16) + 1 + index as u32;
    ServiceId {
        protocol: Protocol::Tcp,
        address: IpAddr::V4(Ipv4Addr::from(n)),
        port: 80,
    }
}

fn destination(service: usize, index: usize) -> IpvsDestination {
    let n = (10u32 << 24 | 244 << 16) + 1 + (service * DESTINATIONS + index) as u32;
    IpvsDestination {
        address: IpAddr::V4(Ipv4Addr::from(n)),
        port: 8080,
        weight: 1,
        forward: Forward::Masq,
        active_connections: 0,
        inactive_connections: 0,
    }
}

fn new_service(index: usize) -> Command {
    Command::NewService(IpvsService {
        id: service_id(index),
        scheduler: "rr".to_owned(),
        scheduler_flags: 0,
        persistence_timeout: None,
    })
}

/// Every service first, then every destination.
fn diff_order(services: usize) -> Vec<Command> {
    let mut commands: Vec<Command> = (0..services).map(new_service).collect();
    for s in 0..services {
        for d in 0..DESTINATIONS {
            commands.push(Command::NewDestination(service_id(s), destination(s, d)));
        }
    }
    commands
}

/// Each service followed by its destinations.
fn ipvsadm_order(services: usize) -> Vec<Command> {
    let mut commands = Vec::new();
    for s in 0..services {
        commands.push(new_service(s));
        for d in 0..DESTINATIONS {
            commands.push(Command::NewDestination(service_id(s), destination(s, d)));
        }
    }
    commands
}

fn restore_lines(commands: &[Command]) -> String {
    let mut text = String::new();
    for command in commands {
        match command {
            Command::NewService(s) => {
                text += &format!("-A -t {}:{} -s rr\n", s.id.address, s.id.port);
            }
            Command::NewDestination(id, d) => {
                text += &format!(
                    "-a -t {}:{} -r {}:{} -m -w 1\n",
                    id.address, id.port, d.address, d.port
                );
            }
            _ => {}
        }
    }
    text
}

fn micros_per_message(batches: &[BatchTiming], part: impl Fn(&BatchTiming) -> Duration) -> f64 {
    let messages: usize = batches.iter().map(|b| b.messages).sum();
    let total: Duration = batches.iter().map(part).sum();
    total.as_secs_f64() * 1e6 / messages.max(1) as f64
}

fn report(size: usize, mode: &str, took: Duration, batches: &[BatchTiming]) {
    let groups: Vec<String> = batches
        .chunks(batches.len().div_ceil(5).max(1))
        .map(|group| {
            format!(
                "{:.0}/{:.0}/{:.1}",
                micros_per_message(group, |b| b.send),
                micros_per_message(group, |b| b.replies),
                micros_per_message(group, |b| b.encode)
            )
        })
        .collect();
    let messages: usize = batches.iter().map(|b| b.messages).sum();
    println!(
        "ipvs-batches services={size} mode={mode} total_s={:.2} batches={} messages={messages} \
         kernel_s={:.2} replies_s={:.2} encode_s={:.3} per_fifth_us(kernel/replies/encode per message)=[{}]",
        took.as_secs_f64(),
        batches.len(),
        batches.iter().map(|b| b.send).sum::<Duration>().as_secs_f64(),
        batches.iter().map(|b| b.replies).sum::<Duration>().as_secs_f64(),
        batches.iter().map(|b| b.encode).sum::<Duration>().as_secs_f64(),
        groups.join(" ")
    );
}

/// Moves this (single-threaded) process into a new network namespace and opens a client
/// there: empty IPVS tables, an empty destination trash. Drop the previous client first: its
/// socket keeps its namespace (and that namespace's table, estimators and service-hash
/// entries, shared by all namespaces) alive.
fn fresh_client() -> Result<IpvsClient, String> {
    // SAFETY: unshare has no memory-safety preconditions; the bench runs one thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        ));
    }
    // IPVS refuses real servers it has no route to: a dummy link holding 10.0.0.0/8.
    let setup = "ip link set lo up && ip link add tp-pods type dummy && \
                 ip addr add 10.255.255.254/8 dev tp-pods && ip link set tp-pods up";
    let status = Process::new("sh")
        .args(["-c", setup])
        .status()
        .map_err(|e| format!("{setup}: {e}"))?;
    if !status.success() {
        return Err(format!("{setup}: {status}"));
    }
    let mut client = IpvsClient::connect().map_err(|e| format!("connect: {e}"))?;
    client.record_batches(true);
    Ok(client)
}

fn run_mode(
    client: &mut IpvsClient,
    size: usize,
    mode: &str,
    commands: &[Command],
) -> Result<(), String> {
    let started = Instant::now();
    let results = client.execute(commands);
    let took = started.elapsed();
    if let Some(error) = results.iter().find_map(|r| r.as_ref().err()) {
        return Err(format!("{mode}: {error}"));
    }
    report(size, mode, took, &client.take_batch_timings());
    Ok(())
}

/// `net.ipv4.vs.run_estimation` of the current namespace (since Linux 5.16).
fn set_estimation(on: bool) -> bool {
    std::fs::write(RUN_ESTIMATION, if on { "1" } else { "0" }).is_ok()
}

fn bench_size(size: usize) -> Result<(), String> {
    let diff = diff_order(size);
    let interleaved = ipvsadm_order(size);

    let mut client = fresh_client()?;
    client.set_acknowledgements(Acknowledgements::Every);
    run_mode(&mut client, size, "diff-order/ack-every", &diff)?;
    drop(client);
    run_mode(&mut fresh_client()?, size, "diff-order/ack-last", &diff)?;
    run_mode(
        &mut fresh_client()?,
        size,
        "ipvsadm-order/ack-last",
        &interleaved,
    )?;
    let mut client = fresh_client()?;
    if set_estimation(false) {
        run_mode(
            &mut client,
            size,
            "ipvsadm-order/ack-last/no-estimation",
            &interleaved,
        )?;
    }
    drop(client);
    let mut client = fresh_client()?;
    client.set_batch_limit(1);
    run_mode(&mut client, size, "ipvsadm-order/sequential", &interleaved)?;
    client.set_batch_limit(usize::MAX);

    // The periodic re-read: one service dump, then one destination dump per service.
    let started = Instant::now();
    let services = client.services().map_err(|e| format!("dump: {e}"))?;
    let dumped = started.elapsed();
    let mut destinations = 0;
    for service in &services {
        destinations += client
            .destinations(&service.id)
            .map_err(|e| format!("dump: {e}"))?
            .len();
    }
    println!(
        "ipvs-batches services={size} read_back_s={:.2} (service dump {:.2} s, {} services, {destinations} destinations)",
        started.elapsed().as_secs_f64(),
        dumped.as_secs_f64(),
        services.len()
    );

    // ipvsadm -R in a namespace of its own too.
    drop(client);
    drop(fresh_client()?);
    let lines = restore_lines(&interleaved);
    let started = Instant::now();
    let mut restore = Process::new("ipvsadm")
        .arg("-R")
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("ipvsadm -R: {e}"))?;
    if let Some(mut stdin) = restore.stdin.take() {
        stdin
            .write_all(lines.as_bytes())
            .map_err(|e| format!("ipvsadm -R stdin: {e}"))?;
    }
    let status = restore.wait().map_err(|e| format!("ipvsadm -R: {e}"))?;
    println!(
        "ipvs-batches services={size} mode=ipvsadm-R total_s={:.2} exit={status}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() {
    let Ok(sizes) = std::env::var("TOPOPROXY_IPVS_BATCH_SIZES") else {
        println!("ipvs_batches: needs IPVS; `cargo xtask vm-bench` runs it inside the VM");
        return;
    };
    for size in sizes
        .split(',')
        .filter_map(|s| s.trim().parse::<usize>().ok())
    {
        if let Err(error) = bench_size(size) {
            eprintln!("ipvs_batches services={size}: {error}");
            std::process::exit(1);
        }
    }
}
