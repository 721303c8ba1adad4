//! The roles this binary plays inside the world's namespaces (`--role serve`, `--role client`).

use super::*;

/// `xtask demo --role serve POD ZONE ADDRESS PROTO/PORT…` or `--role client CGROUP|none`.
pub fn role(args: &[String]) -> Result<()> {
    match args.split_first() {
        Some((role, rest)) if role == "serve" => serve(rest),
        Some((role, rest)) if role == "client" => client(rest),
        _ => bail!("unknown demo role {args:?}"),
    }
}

/// A pod: answers "<pod> <zone>" to every TCP connect and UDP datagram on its ports.
pub(super) fn serve(args: &[String]) -> Result<()> {
    let [name, zone, address, ports @ ..] = args else {
        bail!("serve needs POD ZONE ADDRESS PROTO/PORT…");
    };
    let address: Ipv4Addr = address.parse().context("parsing the pod address")?;
    let answer = format!("{name} {zone}");
    let mut threads = Vec::new();
    for spec in ports {
        let (proto, port) = spec
            .split_once('/')
            .and_then(|(proto, port)| Some((Proto::parse(proto)?, port.parse::<u16>().ok()?)))
            .with_context(|| format!("bad port {spec:?}"))?;
        let answer = answer.clone();
        match proto {
            Proto::Tcp => {
                let listener = TcpListener::bind((address, port))
                    .with_context(|| format!("binding tcp {address}:{port}"))?;
                threads.push(std::thread::spawn(move || {
                    // An accept error (a reset before accept) only loses that connection.
                    for mut stream in listener.incoming().flatten() {
                        let _ = writeln!(stream, "{answer}");
                    }
                }));
            }
            Proto::Udp => {
                let socket = UdpSocket::bind((address, port))
                    .with_context(|| format!("binding udp {address}:{port}"))?;
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    while let Ok((_, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(answer.as_bytes(), from);
                    }
                }));
            }
        }
    }
    println!("ready");
    std::io::stdout().flush().context("flushing stdout")?;
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// The client: joins the cgroup (unless "none"), then runs `PROTO VIP PORT COUNT` lines from
/// stdin, answering each with one JSON line of answers and errors.
pub(super) fn client(args: &[String]) -> Result<()> {
    let [cgroup] = args else {
        bail!("client needs CGROUP|none");
    };
    if cgroup != "none" {
        let procs = Path::new(cgroup).join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("joining {}", procs.display()))?;
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    for line in std::io::stdin().lines() {
        let line = line.context("reading a command")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let (proto, target, count) = match words.as_slice() {
            ["quit"] => return Ok(()),
            [proto, vip, port, count] => (
                Proto::parse(proto).context("protocol")?,
                SocketAddr::new(vip.parse().context("vip")?, port.parse().context("port")?),
                count.parse::<usize>().context("count")?,
            ),
            _ => bail!("unknown client command {line:?}"),
        };
        let mut answers = Vec::new();
        let mut errors = Vec::new();
        for _ in 0..count {
            let result = match proto {
                Proto::Tcp => tcp_ask(target),
                Proto::Udp => udp_ask(target),
            };
            match result {
                Ok(answer) => answers.push(answer),
                Err(error) => errors.push(error.to_string()),
            }
        }
        let reply = serde_json::json!({ "answers": answers, "errors": errors });
        writeln!(stdout, "{reply}")?;
        stdout.flush()?;
    }
    Ok(())
}

pub(super) fn tcp_ask(target: SocketAddr) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let peer = stream.peer_addr()?;
    if peer != target {
        return Err(std::io::Error::other(format!(
            "peer is {peer}, not the VIP"
        )));
    }
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer.trim().to_owned())
}

pub(super) fn udp_ask(target: SocketAddr) -> std::io::Result<String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send_to(b"who", target)?;
    let mut buf = [0u8; 512];
    let (len, from) = socket.recv_from(&mut buf)?;
    if from != target {
        return Err(std::io::Error::other(format!(
            "reply from {from}, not the VIP"
        )));
    }
    Ok(String::from_utf8_lossy(&buf[..len]).trim().to_owned())
}

// ---- reading the example and the tools' output ----
