//! The demo's world: namespaces, pods, the agent and its clients, built and torn down in order.

use super::*;

pub(super) struct World {
    pub(super) root: PathBuf,
    pub(super) source: PathBuf,
    pub(super) cgroup: PathBuf,
    pub(super) binaries: Binaries,
    pub(super) node: NodeInfo,
    pub(super) pods: Vec<Pod>,
    /// Per probe: indices into `pods` of its backends.
    pub(super) backends: Vec<Vec<usize>>,
    /// shop/frontend's NodePort on the node address and its externalIPs, for the outside
    /// client (their backends are the ClusterIP's: `backends[FRONTEND]`).
    pub(super) outside: Vec<Probe>,
    /// The source files as copied, for restoring.
    pub(super) originals: BTreeMap<PathBuf, String>,
    pub(super) metrics: SocketAddr,
    pub(super) healthz: SocketAddr,
    pub(super) agent: Option<Child>,
    pub(super) servers: BTreeMap<usize, Child>,
    pub(super) client: Option<Client>,
    /// Set once torn down or kept, so Drop does nothing more.
    pub(super) done: bool,
}

impl World {
    /// Copies the example, reads the node and the demo Services' pods from the plan, and
    /// builds namespaces, pods, the cgroup and the agent. A failure part-way tears down what
    /// exists (Drop).
    pub(super) fn create(root: PathBuf, node: &str, binaries: Binaries) -> Result<Self> {
        let source = root.join("cluster");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        copy_dir(&crate::workspace_root().join("examples/cluster"), &source)?;
        let mut originals = BTreeMap::new();
        for file in yaml_files(&source)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            originals.insert(file, text);
        }
        let plan = plan_json(&binaries.topoproxy, &source, node)?;
        let node = node_info(&originals, node)?;
        let (pods, backends) = pods_from_plan(&plan)?;
        let outside = outside::frontends(&plan, &node)?;
        let cgroup = cgroup2_mount()?.join(CGROUP_NAME);
        let mut world = Self {
            root,
            source,
            cgroup,
            binaries,
            node,
            pods,
            backends,
            outside,
            originals,
            metrics: crate::util::free_loopback_port()?,
            healthz: crate::util::free_loopback_port()?,
            agent: None,
            servers: BTreeMap::new(),
            client: None,
            done: false,
        };
        world.check_probes()?;
        world.build_network()?;
        outside::build_network(&world)?;
        for index in 0..world.pods.len() {
            world.start_server(index)?;
        }
        world.record_pids()?;
        world.describe();
        std::fs::create_dir(&world.cgroup)
            .with_context(|| format!("creating the cgroup {}", world.cgroup.display()))?;
        world.start_agent()?;
        world.client = Some(Client::spawn(
            &world,
            &world.node.netns(),
            Some(&world.cgroup),
        )?);
        Ok(world)
    }

    pub(super) fn local(&self, probe: usize) -> BTreeSet<usize> {
        self.expected(probe, true)
    }

    pub(super) fn remote(&self, probe: usize) -> BTreeSet<usize> {
        self.expected(probe, false)
    }

    /// The probe's answering pods in (or outside) the node's zone.
    pub(super) fn expected(&self, probe: usize, in_zone: bool) -> BTreeSet<usize> {
        self.backends[probe]
            .iter()
            .copied()
            .filter(|&i| {
                !self.pods[i].terminating && (self.pods[i].zone == self.node.zone) == in_zone
            })
            .collect()
    }

    pub(super) fn zone_pods(&self) -> BTreeSet<usize> {
        (0..self.pods.len())
            .filter(|&i| self.pods[i].zone == self.node.zone)
            .collect()
    }

    pub(super) fn check_probes(&self) -> Result<()> {
        for (i, probe) in PROBES.iter().enumerate() {
            ensure!(
                !self.local(i).is_empty() && !self.remote(i).is_empty(),
                "{} ({}) needs ready pods both in {} and elsewhere for this demo",
                probe.label(),
                probe.service,
                self.node.zone
            );
        }
        Ok(())
    }

    pub(super) fn names(&self, pods: &BTreeSet<usize>) -> String {
        pods.iter()
            .map(|&i| format!("{} ({})", self.pods[i].name, self.pods[i].zone))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The node namespace with the node's address on its loopback, and per pod a namespace
    /// joined to it by a veth pair, routed by /32 both ways (as a CNI would).
    pub(super) fn build_network(&self) -> Result<()> {
        let node_ns = self.node.netns();
        let node_ip = self.node.address;
        ip(&format!("netns add {node_ns}"))?;
        ip(&format!("-n {node_ns} link set lo up"))?;
        ip(&format!("-n {node_ns} addr add {node_ip}/32 dev lo"))?;
        for (i, pod) in self.pods.iter().enumerate() {
            let (pod_ns, pod_ip, veth) = (pod.netns(), pod.address, format!("tpd{i}"));
            ip(&format!("netns add {pod_ns}"))?;
            ip(&format!("-n {pod_ns} link set lo up"))?;
            ip(&format!(
                "-n {node_ns} link add {veth} type veth peer name eth0 netns {pod_ns}"
            ))?;
            ip(&format!("-n {node_ns} link set {veth} alias {}", pod.name))?;
            ip(&format!("-n {pod_ns} addr add {pod_ip}/32 dev eth0"))?;
            ip(&format!("-n {pod_ns} link set eth0 up"))?;
            ip(&format!("-n {node_ns} link set {veth} up"))?;
            ip(&format!("-n {pod_ns} route add {node_ip}/32 dev eth0"))?;
            ip(&format!(
                "-n {node_ns} route add {pod_ip}/32 dev {veth} src {node_ip}"
            ))?;
        }
        Ok(())
    }

    pub(super) fn describe(&self) {
        println!("\n-- the world (network namespaces on this machine; nothing leaves them)");
        println!(
            "   node   {:<16} {:<15} {:<8} {}  the client runs here, in cgroup {}",
            self.node.netns().trim_start_matches(NETNS_PREFIX),
            self.node.address,
            self.node.name,
            self.node.zone,
            self.cgroup.display()
        );
        for pod in &self.pods {
            let ports: Vec<String> = pod
                .ports
                .iter()
                .map(|(proto, port)| format!("{}/{port}", proto.lower()))
                .collect();
            println!(
                "   pod    {:<16} {:<15} {:<8} {}  {}{}",
                pod.name,
                pod.address,
                pod.node,
                pod.zone,
                ports.join(" "),
                if pod.terminating {
                    "  (terminating, still serving)"
                } else {
                    ""
                }
            );
        }
        outside::describe(self);
        println!(
            "   source {}  (a copy of examples/cluster)",
            self.source.display()
        );
    }

    pub(super) fn start_server(&mut self, index: usize) -> Result<()> {
        let pod = &self.pods[index];
        let log = self.open_log("pods.log")?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", pod.netns()))
            .arg("--")
            .arg(&self.binaries.xtask)
            .args(["demo", "--role", "serve", &pod.name, &pod.zone])
            .arg(pod.address.to_string())
            .args(
                pod.ports
                    .iter()
                    .map(|(proto, port)| format!("{}/{port}", proto.lower())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting the server of pod {}", pod.name))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        if read.is_err() || line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the server of pod {} did not start (see {})",
                pod.name,
                self.root.join("pods.log").display()
            );
        }
        self.servers.insert(index, child);
        Ok(())
    }

    pub(super) fn stop_server(&mut self, index: usize) {
        if let Some(mut child) = self.servers.remove(&index) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(super) fn open_log(&self, name: &str) -> Result<std::fs::File> {
        let path = self.root.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    pub(super) fn agent_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["run", "--proxy-mode", "ebpf", "--source"]
            .map(str::to_owned)
            .to_vec();
        args.push(self.source.display().to_string());
        args.extend(
            [
                "--hostname-override",
                &self.node.name,
                "--bpf-pin-dir",
                PIN_DIR,
                "--cgroup-path",
                &self.cgroup.display().to_string(),
                "--metrics-bind-address",
                &self.metrics.to_string(),
                "--healthz-bind-address",
                &self.healthz.to_string(),
                "--min-sync-period",
                "0",
                "--source-poll-period",
                POLL_PERIOD,
                // Named, not auto: the tc programs go on the uplink to the outside client
                // only, never on a pod's veth.
                "--north-south-interfaces",
                outside::UPLINK,
            ]
            .map(str::to_owned),
        );
        args
    }

    pub(super) fn start_agent(&mut self) -> Result<()> {
        let args = self.agent_args();
        let netns = format!("--net=/run/netns/{}", self.node.netns());
        println!("\n-- the agent, in the node's namespace (it attaches its tc programs there)");
        println!("   nsenter {netns} topoproxy {}", args.join(" "));
        let log = self.open_log("agent.log")?;
        let log2 = log.try_clone().context("cloning the agent log handle")?;
        let started = Instant::now();
        // nsenter execs the agent (no --fork), so the child's pid is the agent's.
        let child = Command::new("nsenter")
            .arg(&netns)
            .arg("--")
            .arg(&self.binaries.topoproxy)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .context("starting topoproxy run")?;
        let pid = child.id();
        self.agent = Some(child);
        self.record_pids()?;
        loop {
            check_interrupted()?;
            if let Some(agent) = self.agent.as_mut() {
                if let Some(status) = agent.try_wait().context("waiting for the agent")? {
                    bail!("the agent exited at start: {status}");
                }
            }
            if self
                .agent_get(self.healthz, "/healthz")
                .is_ok_and(|(status, _)| status == 200)
            {
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the agent's /healthz did not answer 200 within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "   pid {pid}, /healthz 200 after {:.2} s; log {}",
            started.elapsed().as_secs_f64(),
            self.root.join("agent.log").display()
        );
        Ok(())
    }

    /// A GET of the agent's HTTP servers: they listen on the node namespace's loopback.
    pub(super) fn agent_get(&self, address: SocketAddr, path: &str) -> Result<(u16, String)> {
        let path = path.to_owned();
        in_netns(&self.node.netns(), move || http_get(address, &path))
    }

    pub(super) fn record_pids(&self) -> Result<()> {
        let mut pids: Vec<u32> = self.servers.values().map(Child::id).collect();
        pids.extend(self.agent.as_ref().map(Child::id));
        let text: String = pids.iter().map(|pid| format!("{pid}\n")).collect();
        let path = self.root.join("pids");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub(super) fn print_agent_log_tail(&self) {
        let path = self.root.join("agent.log");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let lines: Vec<&str> = text.lines().collect();
            println!("   last lines of {}:", path.display());
            for line in &lines[lines.len().saturating_sub(15)..] {
                println!("   | {line}");
            }
        }
    }

    // ---- the steps ----

    pub(super) fn run_steps(&mut self) -> Result<()> {
        let zone = self.node.zone.clone();
        let local: Vec<BTreeSet<usize>> = (0..PROBES.len()).map(|i| self.local(i)).collect();
        let remote: Vec<BTreeSet<usize>> = (0..PROBES.len()).map(|i| self.remote(i)).collect();

        section(&format!(
            "1. A client on {} ({zone}) reaches only {zone} pods",
            self.node.name
        ));
        println!(
            "   Why, in the planner's words (topoproxy plan --source … --node {} --explain, kube-dns):",
            self.node.name
        );
        for line in self.explain_block()?.lines() {
            println!("   | {line}");
        }
        self.converge(&local)?;
        self.show_plan(&PROBES, true)?;
        let falling_back_before = self.falling_back_metric()?;
        let answered = self.traffic(&local, &format!("only {zone} answered"))?;
        self.outside_cgroup()?;
        self.show_list(&PROBES, &answered)?;

        let stopped = self.zone_pods();
        section(&format!(
            "2. The {zone} pods stop: traffic falls back to the other zones"
        ));
        println!("   Stopping {}", self.names(&stopped));
        println!(
            "   and marking their endpoints `ready: false, serving: false` in the EndpointSlices"
        );
        println!("   (as the kubelet and the EndpointSlice controller would).");
        for &i in &stopped {
            self.stop_server(i);
        }
        self.record_pids()?;
        let addresses: BTreeSet<Ipv4Addr> = stopped.iter().map(|&i| self.pods[i].address).collect();
        self.write_stopped(&addresses)?;
        let elapsed = self.converge(&remote)?;
        println!(
            "   The agent re-read the YAML and reprogrammed the maps {:.2} s after the write.",
            elapsed.as_secs_f64()
        );
        self.show_plan(&PROBES, false)?;
        let falling_back_after = self.falling_back_metric_above(falling_back_before)?;
        println!(
            "   Metric topoproxy_services_falling_back: {falling_back_before} before, {falling_back_after} now; --explain says:"
        );
        for line in self.explain_block()?.lines().filter(|line| {
            line.trim_start().starts_with("topology:") || line.contains("falling back")
        }) {
            println!("   | {}", line.trim_start());
        }
        let answered = self.traffic(
            &remote,
            &format!("no answer from {zone}; the other zones took over"),
        )?;
        self.show_list(&PROBES, &answered)?;

        section(&format!(
            "3. The {zone} pods return: traffic returns to {zone}"
        ));
        for &i in &stopped {
            self.start_server(i)?;
        }
        self.record_pids()?;
        self.restore_source()?;
        println!(
            "   Restarted {} and restored their endpoints.",
            self.names(&stopped)
        );
        let elapsed = self.converge(&local)?;
        println!(
            "   The agent reprogrammed the maps {:.2} s after the write.",
            elapsed.as_secs_f64()
        );
        self.show_plan(&PROBES, true)?;
        let answered = self.traffic(&local, &format!("only {zone} answered again"))?;
        self.show_list(&PROBES, &answered)?;

        self.outside_step()
    }

    /// Waits until the kernel's active tiers (`topoproxy list`) hold exactly `expected` for
    /// every probe; returns how long that took.
    pub(super) fn converge(&self, expected: &[BTreeSet<usize>]) -> Result<Duration> {
        let started = Instant::now();
        let want: BTreeMap<VsKey, BTreeSet<SocketAddrV4>> = PROBES
            .iter()
            .enumerate()
            .map(|(i, probe)| (probe.vs(), self.endpoints(probe, &expected[i])))
            .collect();
        loop {
            check_interrupted()?;
            let text = self.list()?;
            let listed = parse_list(&text);
            let matches = want
                .iter()
                .all(|(vs, backends)| listed.get(vs).map(|l| &l.backends) == Some(backends));
            if matches {
                return Ok(started.elapsed());
            }
            if started.elapsed() > CONVERGE_TIMEOUT {
                bail!(
                    "after {} s the kernel's table still differs from what the demo expects \
                     ({}); topoproxy list printed:\n{text}",
                    CONVERGE_TIMEOUT.as_secs(),
                    want.iter()
                        .map(|((proto, vs), b)| format!(
                            "{} {vs} -> {}",
                            proto.upper(),
                            b.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(" ")
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Prints the kernel's table for the demo's Services after traffic, and checks that its
    /// per-backend connect counters saw at least the answers the client got from each.
    pub(super) fn show_list(&self, probes: &[Probe], answered: &Answered) -> Result<()> {
        let text = self.list()?;
        let listed = parse_list(&text);
        println!("   The kernel's table for these Services (topoproxy list --proxy-mode ebpf --bpf-pin-dir {PIN_DIR};");
        println!("   ActiveConn is the per-backend connect counter of the eBPF maps):");
        for line in text.lines().take(3) {
            println!("   | {}", line.trim_end());
        }
        let mut short = Vec::new();
        for probe in probes {
            let Some(section) = listed.get(&probe.vs()) else {
                bail!("topoproxy list lost {}", probe.label());
            };
            for line in &section.lines {
                println!("   | {}", line.trim_end());
            }
            for (backend, &count) in answered.get(&probe.vs()).into_iter().flatten() {
                let counted = section.counters.get(backend).copied().unwrap_or(0);
                if counted < count as u64 {
                    short.push(format!(
                        "{} -> {backend}: counter {counted}, but {count} answers came from it",
                        probe.label()
                    ));
                }
            }
        }
        ensure!(
            short.is_empty(),
            "the kernel's counters disagree with the traffic: {}",
            short.join("; ")
        );
        Ok(())
    }

    pub(super) fn endpoints(
        &self,
        probe: &Probe,
        pods: &BTreeSet<usize>,
    ) -> BTreeSet<SocketAddrV4> {
        pods.iter()
            .filter_map(|&i| {
                let pod = &self.pods[i];
                let port = self.target_port(probe, i)?;
                Some(SocketAddrV4::new(pod.address, port))
            })
            .collect()
    }

    /// The pod port a probe lands on (the example's targetPort).
    pub(super) fn target_port(&self, probe: &Probe, pod: usize) -> Option<u16> {
        let ports: Vec<u16> = self.pods[pod]
            .ports
            .iter()
            .filter(|(proto, _)| *proto == probe.protocol)
            .map(|(_, port)| *port)
            .collect();
        // Every demo pod serves one port per protocol.
        ports.first().copied()
    }

    pub(super) fn list(&self) -> Result<String> {
        let out = Command::new(&self.binaries.topoproxy)
            .args(["list", "--proxy-mode", "ebpf", "--bpf-pin-dir", PIN_DIR])
            .output()
            .context("running topoproxy list")?;
        ensure!(
            out.status.success(),
            "topoproxy list failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The agent's own view, `/plan?format=json`: which tier serves each probe.
    pub(super) fn show_plan(&self, probes: &[Probe], zone_local: bool) -> Result<()> {
        let (status, body) = self.agent_get(self.metrics, "/plan?format=json")?;
        ensure!(status == 200, "/plan?format=json answered {status}");
        let plan: Value = serde_json::from_str(&body).context("parsing /plan?format=json")?;
        println!("   The agent's plan (GET /plan?format=json): active tier per Service port");
        for probe in probes {
            let vs = find_vs(&plan, probe)?;
            let active = vs["activeTier"].as_str().unwrap_or("?");
            let falling_back = vs["fallingBack"].as_bool().unwrap_or(false);
            let tiers: Vec<String> = vs["tiers"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|tier| {
                    let zones: BTreeSet<&str> = tier["backends"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|b| b["zone"].as_str())
                        .collect();
                    format!(
                        "{} [{}]",
                        tier["kind"].as_str().unwrap_or("?"),
                        zones.into_iter().collect::<Vec<_>>().join(" ")
                    )
                })
                .collect();
            println!(
                "   {:<18} {:<20} active {:<10} fallingBack {:<5}  tiers: {}",
                probe.service,
                probe.label(),
                active,
                falling_back,
                tiers.join(", ")
            );
            if zone_local {
                ensure!(
                    active == "SameZone" && !falling_back,
                    "{} {}: the agent's plan should serve the same zone, but its active tier is \
                     {active} (fallingBack {falling_back})",
                    probe.service,
                    probe.label()
                );
            } else {
                ensure!(
                    active != "SameZone" && falling_back,
                    "{} {}: the agent's plan should have fallen back, but its active tier is \
                     {active} (fallingBack {falling_back})",
                    probe.service,
                    probe.label()
                );
            }
        }
        Ok(())
    }

    pub(super) fn falling_back_metric(&self) -> Result<f64> {
        let (status, body) = self.agent_get(self.metrics, "/metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        crate::util::metric(&body, "topoproxy_services_falling_back")
            .context("/metrics has no topoproxy_services_falling_back")
    }

    /// Waits for the gauge to rise above `before`. The agent publishes its table statistics
    /// after the kernel writes and the map switch, so the maps can already show the change
    /// while the gauge still holds the previous sync's value.
    pub(super) fn falling_back_metric_above(&self, before: f64) -> Result<f64> {
        let started = Instant::now();
        loop {
            check_interrupted()?;
            let now = self.falling_back_metric()?;
            if now > before {
                return Ok(now);
            }
            ensure!(
                started.elapsed() <= CONVERGE_TIMEOUT,
                "topoproxy_services_falling_back did not rise within {} s ({before} → {now})",
                CONVERGE_TIMEOUT.as_secs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `topoproxy plan --explain` for kube-dns's first port on this node.
    pub(super) fn explain_block(&self) -> Result<String> {
        let out = Command::new(&self.binaries.topoproxy)
            .arg("plan")
            .arg("--source")
            .arg(&self.source)
            .args(["--node", &self.node.name, "--explain"])
            .output()
            .context("running topoproxy plan --explain")?;
        ensure!(
            out.status.success(),
            "topoproxy plan --explain failed: {}",
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut block = String::new();
        let mut in_service = false;
        let mut ports = 0;
        for line in text.lines() {
            if line.starts_with("Service ") {
                if in_service {
                    break;
                }
                in_service = line.starts_with("Service kube-system/kube-dns ");
            } else if in_service && line.starts_with("  port ") {
                ports += 1;
            }
            if in_service && ports <= 1 {
                let _ = writeln!(block, "{line}");
            }
        }
        ensure!(
            !block.is_empty(),
            "plan --explain has no kube-system/kube-dns section"
        );
        Ok(block)
    }

    /// CONNECTS connects (or queries) per probe from the client in the demo cgroup; see
    /// [`Self::ask_all`].
    pub(super) fn traffic(
        &mut self,
        expected: &[BTreeSet<usize>],
        verdict: &str,
    ) -> Result<Answered> {
        println!(
            "   The client (in the demo cgroup, in {}):",
            self.node.netns()
        );
        let mut client = self.client.take().context("no client")?;
        let asked = self.ask_all(&mut client, &PROBES, expected);
        self.client = Some(client);
        let answered = asked?;
        println!("   ✓ {verdict}; every answer came back from the VIP (getpeername / recvfrom)");
        Ok(answered)
    }

    /// CONNECTS connects (or queries) per probe from `client`; each answer must come from
    /// the probe's `expected` pods, with the probe's address as the peer, and a probe with
    /// several expected pods must have spread over more than one.
    pub(super) fn ask_all(
        &self,
        client: &mut Client,
        probes: &[Probe],
        expected: &[BTreeSet<usize>],
    ) -> Result<Answered> {
        let mut failures = Vec::new();
        let mut answered = Answered::new();
        for (probe, expected) in probes.iter().zip(expected) {
            check_interrupted()?;
            let tally = client.probe(probe, CONNECTS)?;
            self.print_tally(probe, &tally);
            self.add_answers(probe, &tally, &mut answered);
            failures.extend(self.judge(probe, &tally, expected));
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(answered)
    }

    pub(super) fn print_tally(&self, probe: &Probe, tally: &Tally) {
        let verb = match probe.protocol {
            Proto::Tcp => "TCP connects",
            Proto::Udp => "UDP queries",
        };
        let answers: Vec<String> = tally
            .answers
            .iter()
            .map(|(answer, count)| format!("{} ×{count}", self.answer_label(answer)))
            .collect();
        println!(
            "   {CONNECTS} {verb} to {}:{} ({}) → {}{}",
            probe.vip,
            probe.port,
            probe.what(),
            if answers.is_empty() {
                "no answer".to_owned()
            } else {
                answers.join(", ")
            },
            if tally.errors.is_empty() {
                String::new()
            } else {
                format!("; {} failed: {}", tally.errors.len(), tally.errors[0])
            }
        );
    }

    /// Counts each answer against the backend (pod address and target port) that gave it.
    pub(super) fn add_answers(&self, probe: &Probe, tally: &Tally, answered: &mut Answered) {
        for (answer, count) in &tally.answers {
            let name = answer.split_whitespace().next().unwrap_or("");
            let backend = self
                .pods
                .iter()
                .position(|pod| pod.name == name)
                .and_then(|i| {
                    Some(SocketAddrV4::new(
                        self.pods[i].address,
                        self.target_port(probe, i)?,
                    ))
                });
            if let Some(backend) = backend {
                *answered
                    .entry(probe.vs())
                    .or_default()
                    .entry(backend)
                    .or_default() += count;
            }
        }
    }

    /// What was wrong with one probe's answers: failures, strays, no spread.
    pub(super) fn judge(
        &self,
        probe: &Probe,
        tally: &Tally,
        expected: &BTreeSet<usize>,
    ) -> Vec<String> {
        let mut failures = Vec::new();
        let wanted: BTreeSet<&str> = expected
            .iter()
            .map(|&p| self.pods[p].name.as_str())
            .collect();
        let got: BTreeSet<&str> = tally
            .answers
            .keys()
            .map(|answer| answer.split_whitespace().next().unwrap_or(""))
            .collect();
        if !tally.errors.is_empty() {
            failures.push(format!(
                "{}: {} of {CONNECTS} failed (first: {})",
                probe.label(),
                tally.errors.len(),
                tally.errors[0]
            ));
        }
        let strays: Vec<&&str> = got.difference(&wanted).collect();
        if !strays.is_empty() {
            failures.push(format!(
                "{}: expected answers only from {}, also got {strays:?}",
                probe.label(),
                self.names(expected)
            ));
        }
        if strays.is_empty() && wanted.len() > 1 && got.len() < 2 {
            failures.push(format!(
                "{}: all {CONNECTS} answers came from {got:?}, none from the rest of {}",
                probe.label(),
                self.names(expected)
            ));
        }
        failures
    }

    pub(super) fn answer_label(&self, answer: &str) -> String {
        let mut words = answer.split_whitespace();
        match (words.next(), words.next()) {
            (Some(name), Some(zone)) => format!("{name} ({zone})"),
            _ => format!("{answer:?}"),
        }
    }

    /// A process in the same namespace but outside the demo cgroup is not translated.
    pub(super) fn outside_cgroup(&self) -> Result<()> {
        let mut outsider = Client::spawn(self, &self.node.netns(), None)?;
        let probe = &PROBES[1];
        let tally = outsider.probe(probe, 1)?;
        ensure!(
            tally.answers.is_empty(),
            "a process outside the demo cgroup reached {} through {}: the programs leak",
            tally
                .answers
                .keys()
                .next()
                .map(String::as_str)
                .unwrap_or("?"),
            probe.label()
        );
        println!("   ✓ the same connect from a process outside the demo cgroup is not translated:");
        println!(
            "     {} → {}; the host's own processes are untouched",
            probe.label(),
            tally.errors.first().map(String::as_str).unwrap_or("failed")
        );
        Ok(())
    }

    /// Rewrites the source copy with `addresses`' endpoints not ready and not serving.
    pub(super) fn write_stopped(&self, addresses: &BTreeSet<Ipv4Addr>) -> Result<()> {
        let mut found = BTreeSet::new();
        for (file, text) in &self.originals {
            let (edited, hits) = set_conditions(
                text,
                addresses,
                "ready: false, serving: false, terminating: false",
            );
            if hits.is_empty() {
                continue;
            }
            found.extend(hits);
            self.replace_file(file, &edited)?;
        }
        let missing: Vec<String> = addresses
            .difference(&found)
            .map(ToString::to_string)
            .collect();
        ensure!(
            missing.is_empty(),
            "no endpoint conditions found for {} in {}",
            missing.join(", "),
            self.source.display()
        );
        Ok(())
    }

    pub(super) fn restore_source(&self) -> Result<()> {
        for (file, text) in &self.originals {
            let current = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            if &current != text {
                self.replace_file(file, text)?;
            }
        }
        Ok(())
    }

    /// Writes beside the source and renames, so the agent never reads half a file.
    pub(super) fn replace_file(&self, file: &Path, text: &str) -> Result<()> {
        let staging = self.root.join("staging.tmp");
        std::fs::write(&staging, text).with_context(|| format!("writing {}", staging.display()))?;
        std::fs::rename(&staging, file).with_context(|| format!("renaming onto {}", file.display()))
    }

    // ---- the end ----

    /// Leaves everything running and says how to explore and clean up.
    pub(super) fn keep(&mut self) -> Result<()> {
        self.done = true;
        if let Some(client) = self.client.take() {
            client.quit();
        }
        self.record_pids()?;
        let agent = self.agent.as_ref().map_or(0, Child::id);
        section("Kept (--keep): the world is still running");
        println!(
            "   agent pid {agent}, log {}",
            self.root.join("agent.log").display()
        );
        println!(
            "   live table:     nsenter --net=/run/netns/{} curl -s http://{}/plan",
            self.node.netns(),
            self.metrics
        );
        println!(
            "   kernel table:   {} list --proxy-mode ebpf --bpf-pin-dir {PIN_DIR}",
            self.binaries.topoproxy.display()
        );
        println!(
            "   a client shell: nsenter --net=/run/netns/{} sh -c 'echo $$ > {}/cgroup.procs; exec bash'",
            self.node.netns(),
            self.cgroup.display()
        );
        println!("                   then e.g. `bash -c 'cat < /dev/tcp/10.96.0.10/53'` (exit the shell before cleaning up)");
        outside::keep_hint(self);
        println!(
            "   edit the YAML:  {} (re-read every {POLL_PERIOD})",
            self.source.display()
        );
        println!("   clean up:       cargo xtask demo --clean");
        // The children stay; forget their handles without killing them.
        self.agent.take();
        self.servers.clear();
        Ok(())
    }

    /// Stops everything the demo started and removes what it created; checks nothing is left.
    pub(super) fn teardown(&mut self) -> Result<()> {
        self.done = true;
        section("Clean-up");
        if let Some(client) = self.client.take() {
            client.quit();
        }
        let indices: Vec<usize> = self.servers.keys().copied().collect();
        for index in indices {
            self.stop_server(index);
        }
        if let Some(agent) = self.agent.take() {
            stop_gracefully(agent);
        }
        let _ = std::fs::remove_file(self.root.join("pids"));
        remove_leftovers(&self.root, Some(&self.binaries.topoproxy))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if !self.done {
            if let Err(error) = self.teardown() {
                eprintln!("demo clean-up: {error:#}");
            }
        }
    }
}
