//! The demo's client as the world drives it, and the tally of who answered.

use super::*;

pub(super) struct Tally {
    /// Answer text ("<pod> <zone>") → how many times.
    pub(super) answers: BTreeMap<String, usize>,
    pub(super) errors: Vec<String>,
}

/// The client process: `--role client`, in the node namespace (and the demo cgroup) or, for
/// the outside client, in its own namespace beyond the uplink.
pub(super) struct Client {
    pub(super) child: Child,
    pub(super) stdin: ChildStdin,
    pub(super) stdout: BufReader<ChildStdout>,
}

impl Client {
    /// The client in `netns`, in `cgroup` if given.
    pub(super) fn spawn(world: &World, netns: &str, cgroup: Option<&Path>) -> Result<Self> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(&world.binaries.xtask)
            .args(["demo", "--role", "client"])
            .arg(cgroup.map_or_else(|| "none".to_owned(), |c| c.display().to_string()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("starting the client")?;
        let stdin = child.stdin.take().context("client stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("client stdout")?);
        let mut client = Self {
            child,
            stdin,
            stdout,
        };
        let hello = client.line()?;
        ensure!(hello == "ready", "the client did not start: {hello:?}");
        Ok(client)
    }

    pub(super) fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        let read = self
            .stdout
            .read_line(&mut line)
            .context("reading from the client")?;
        ensure!(read > 0, "the client process exited");
        Ok(line.trim_end().to_owned())
    }

    pub(super) fn probe(&mut self, probe: &Probe, count: usize) -> Result<Tally> {
        writeln!(
            self.stdin,
            "{} {} {} {count}",
            probe.protocol.lower(),
            probe.vip,
            probe.port
        )
        .context("writing to the client")?;
        let answer: Value =
            serde_json::from_str(&self.line()?).context("parsing the client's answer")?;
        let mut tally = Tally {
            answers: BTreeMap::new(),
            errors: Vec::new(),
        };
        for item in answer["answers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            *tally
                .answers
                .entry(item.as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
        for item in answer["errors"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            tally.errors.push(item.as_str().unwrap_or("?").to_owned());
        }
        Ok(tally)
    }

    pub(super) fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the roles: processes the demo starts inside its namespaces ----
