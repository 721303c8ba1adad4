//! etcd, one or two kube-apiservers (optionally behind haproxy) and kube-controller-manager,
//! started in a fresh folder and torn down on drop.
//!
//! The apiservers run with TLS from [`Pki`], RBAC and Node authorization, and service-account
//! token signing, as kubeadm configures them. The controller manager runs only the controllers
//! that tests need (EndpointSlice and its mirroring, service accounts and their tokens,
//! namespaces, garbage collection, the root CA publisher; for real nodes also DaemonSets,
//! Deployments and ReplicaSets); node lifecycle stays off, so Nodes
//! without a kubelet stay Ready. No scheduler, no kubelet: tests create Pods with a `nodeName`
//! and patch their status themselves ([`crate::objects`]).

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::pki::{CertFiles, Pki};
use crate::process::{Daemon, Isolation};
use crate::Binaries;

/// The Service CIDRs (dual-stack), as `--service-cluster-ip-range` takes them.
pub const SERVICE_CIDRS: &str = "10.96.0.0/16,fd00:10:96::/112";

/// How the control plane is laid out.
#[derive(Clone, Debug)]
pub struct Options {
    /// kube-apiserver instances (1 or 2).
    pub apiservers: usize,
    /// A TCP load balancer (haproxy) in front of the apiservers, as an HA control plane has.
    pub load_balancer: bool,
    /// Start kube-controller-manager (the EndpointSlice controller writes slices and hints).
    pub controller_manager: bool,
    /// For real kubelets ([`crate::node::RealNode`]): the ServiceAccount admission plugin
    /// (Pods get their token volume), the DaemonSet, Deployment and ReplicaSet controllers,
    /// kube-scheduler (their Pods are bound by it), and the apiserver's client certificate for kubelets (`exec`,
    /// `logs`).
    pub real_nodes: bool,
    /// Where the apiservers (and the load balancer) listen and every client reaches them:
    /// loopback, or for real nodes (each in a network namespace of its own) the host's
    /// address on their segment ([`crate::network::NodeNetwork::host_address`]). Off
    /// loopback the apiserver also advertises it in `default/kubernetes`' endpoints, so the
    /// `kubernetes` Service has a backend.
    pub address: Ipv4Addr,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            apiservers: 1,
            load_balancer: false,
            controller_manager: true,
            real_nodes: false,
            address: Ipv4Addr::LOCALHOST,
        }
    }
}

struct ApiServer {
    port: u16,
    hostname: String,
    daemon: Option<Daemon>,
}

/// A running control plane. Dropping it kills every process and removes its folder.
pub struct ControlPlane {
    dir: PathBuf,
    bins: Binaries,
    pki: Pki,
    etcd_port: u16,
    etcd: Option<Daemon>,
    apiservers: Vec<ApiServer>,
    load_balancer: Option<(u16, Daemon)>,
    controller_manager: Option<Daemon>,
    scheduler: Option<Daemon>,
    real_nodes: bool,
    address: Ipv4Addr,
    admin_kubeconfig: PathBuf,
}

/// Ports handed out by [`free_port`], below Linux's default ephemeral range (32768–60999) and
/// the NodePort range (30000–32767).
const TEST_PORTS: std::ops::Range<u16> = 20000..30000;

/// A free TCP port on loopback for a daemon to listen on.
///
/// Not an ephemeral port (`bind :0`): between releasing one and the daemon binding it, any
/// outgoing connection on the machine (the tests' clients, another control plane's) may take it
/// as its local port, and the daemon then fails with "address already in use". Ports come from
/// [`TEST_PORTS`] instead, each handed out once per process, starting at an offset drawn from the
/// process id so concurrent test processes start far apart; one that is taken is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let offset = std::process::id().wrapping_mul(2654435761) % span;
        let _ = NEXT.compare_exchange(u32::MAX, offset, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let index = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let Ok(index) = u16::try_from(index) else {
            continue;
        };
        let port = TEST_PORTS.start + index;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {TEST_PORTS:?}")
}

/// A fresh folder for one control plane: on tmpfs when there is one (etcd's fsyncs are the
/// slowest part of a write), else the temporary directory.
fn scratch_dir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = base.join(format!("topoproxy-k8s-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// A minimal HTTP/1.1 exchange (`Connection: close`, a JSON `body`): etcd's JSON gateway,
/// and the agent's endpoints in topoproxy's tests (`tests/support/http.rs`). The status and
/// the body, or `None` when nothing answers (connecting waits 2 s, the answer 10 s).
pub fn plain_http(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let status = reply.split_whitespace().nth(1)?.parse().ok()?;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Polls `ready` every 50 ms until it holds or `limit` passes; panics with `what` and `log`.
pub fn wait_until(
    what: &str,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    while !ready() {
        if Instant::now() > deadline {
            panic!("{what}: not within {limit:?}\n--- log ---\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A kubeconfig file naming `server`, the CA, and either a client certificate or a token.
pub fn write_kubeconfig(path: &Path, server: &str, ca: &Path, user: &KubeconfigUser) {
    let user_fields = match user {
        KubeconfigUser::Cert(files) => format!(
            "    client-certificate: {}\n    client-key: {}\n",
            files.cert.display(),
            files.key.display()
        ),
        KubeconfigUser::Token(token) => format!("    token: {token}\n"),
    };
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    \
         certificate-authority: {}\nusers:\n- name: test\n  user:\n{user_fields}contexts:\n- name: test\n  \
         context:\n    cluster: test\n    user: test\ncurrent-context: test\n",
        ca.display()
    );
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Who a kubeconfig authenticates as.
pub enum KubeconfigUser {
    Cert(CertFiles),
    Token(String),
}

impl ControlPlane {
    /// Starts everything and waits until the apiservers are ready and (if started) the
    /// controller manager has created the `default` ServiceAccount.
    pub async fn start(options: Options) -> Self {
        assert!(
            (1..=2).contains(&options.apiservers),
            "one or two apiservers"
        );
        let bins = Binaries::locate();
        let dir = scratch_dir();
        let pki = Pki::create(&dir.join("pki"), options.address);
        let etcd_port = free_port();
        let apiservers = (0..options.apiservers)
            .map(|i| ApiServer {
                port: free_port(),
                hostname: format!("topoproxy-test-apiserver-{i}"),
                daemon: None,
            })
            .collect();
        let mut plane = Self {
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            bins,
            pki,
            etcd_port,
            etcd: None,
            apiservers,
            load_balancer: None,
            controller_manager: None,
            scheduler: None,
            real_nodes: options.real_nodes,
            address: options.address,
        };
        plane.start_etcd();
        for i in 0..options.apiservers {
            plane.start_apiserver(i);
        }
        if options.load_balancer {
            plane.start_load_balancer();
        }
        let server = plane.server_url();
        write_kubeconfig(
            &plane.admin_kubeconfig,
            &server,
            &plane.pki.ca.cert,
            &KubeconfigUser::Cert(plane.pki.admin.clone()),
        );
        for i in 0..options.apiservers {
            plane.wait_apiserver_ready(i).await;
        }
        if options.controller_manager {
            plane.start_controller_manager().await;
        }
        if options.real_nodes {
            plane.start_scheduler();
        }
        plane
    }

    /// A control plane started elsewhere (by `cargo xtask vm-test`, on the VM's host), reached
    /// at `endpoint`, with a copy of its PKI folder in `pki`: for clients and real nodes
    /// ([`crate::node::RealNode`]) on this machine. It runs no component here; dropping it
    /// removes only its local folder.
    pub fn attach(endpoint: std::net::SocketAddrV4, pki: &Path) -> Self {
        let dir = scratch_dir();
        let plane = Self {
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            bins: Binaries::locate_node(),
            pki: Pki::at(pki),
            etcd_port: 0,
            etcd: None,
            apiservers: vec![ApiServer {
                port: endpoint.port(),
                hostname: String::new(),
                daemon: None,
            }],
            load_balancer: None,
            controller_manager: None,
            scheduler: None,
            real_nodes: true,
            address: *endpoint.ip(),
        };
        write_kubeconfig(
            &plane.admin_kubeconfig,
            &plane.server_url(),
            &plane.pki.ca.cert,
            &KubeconfigUser::Cert(plane.pki.admin.clone()),
        );
        plane
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The address clients use: the load balancer if there is one, else the first apiserver.
    pub fn endpoint(&self) -> SocketAddr {
        let port = match &self.load_balancer {
            Some((port, _)) => *port,
            None => self.apiservers[0].port,
        };
        SocketAddr::from((self.address, port))
    }

    pub fn server_url(&self) -> String {
        format!("https://{}", self.endpoint())
    }

    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A kubeconfig at `name` in the control plane's folder for `user`.
    pub fn kubeconfig(&self, name: &str, user: &KubeconfigUser) -> PathBuf {
        let path = self.dir.join(name);
        write_kubeconfig(&path, &self.server_url(), &self.pki.ca.cert, user);
        path
    }

    /// A client with cluster-admin rights (group `system:masters`).
    pub async fn admin_client(&self) -> kube::Client {
        client_for(&self.admin_kubeconfig).await
    }

    fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_port)
    }

    fn start_etcd(&mut self) {
        let peer = free_port();
        let data = self.dir.join("etcd");
        let mut cmd = Command::new(&self.bins.etcd);
        cmd.args(["--name", "test", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &self.etcd_url()])
            .args(["--advertise-client-urls", &self.etcd_url()])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("test=http://127.0.0.1:{peer}"),
            ])
            .args(["--logger", "zap", "--log-level", "warn"]);
        let daemon = Daemon::spawn(
            "etcd",
            cmd,
            &self.dir.join("etcd.log"),
            &Isolation::default(),
        );
        let address = SocketAddr::from(([127, 0, 0, 1], self.etcd_port));
        wait_until(
            "etcd healthy",
            Duration::from_secs(60),
            || {
                assert!(!daemon.exited(), "etcd exited:\n{}", daemon.log_tail(30));
                plain_http(address, "GET", "/health", "")
                    .is_some_and(|(s, b)| s == 200 && b.contains("true"))
            },
            || daemon.log_tail(30),
        );
        self.etcd = Some(daemon);
    }

    /// Starts apiserver `index` (again, after [`Self::kill_apiserver`]); does not wait.
    pub fn start_apiserver(&mut self, index: usize) {
        let ApiServer { port, hostname, .. } = &self.apiservers[index];
        let pki = &self.pki;
        let issuer = "https://kubernetes.default.svc.cluster.local";
        let address = self.address.to_string();
        let mut cmd = Command::new(&self.bins.kube_apiserver);
        cmd.args(["--bind-address", &address, "--advertise-address", &address])
            .args(["--secure-port", &port.to_string()])
            .args(["--etcd-servers", &self.etcd_url()])
            .args(["--service-cluster-ip-range", SERVICE_CIDRS])
            .args(["--authorization-mode", "Node,RBAC"])
            .arg("--client-ca-file")
            .arg(&pki.ca.cert)
            .arg("--tls-cert-file")
            .arg(&pki.apiserver.cert)
            .arg("--tls-private-key-file")
            .arg(&pki.apiserver.key)
            .args([
                "--service-account-issuer",
                issuer,
                "--api-audiences",
                issuer,
            ])
            .arg("--service-account-key-file")
            .arg(&pki.service_account_public_key)
            .arg("--service-account-signing-key-file")
            .arg(&pki.service_account_key)
            .arg("--requestheader-client-ca-file")
            .arg(&pki.front_proxy_ca.cert)
            .args(["--requestheader-allowed-names", "front-proxy-client"])
            .args(["--requestheader-extra-headers-prefix", "X-Remote-Extra-"])
            .args(["--requestheader-group-headers", "X-Remote-Group"])
            .args(["--requestheader-username-headers", "X-Remote-User"])
            .arg("--proxy-client-cert-file")
            .arg(&pki.front_proxy_client.cert)
            .arg("--proxy-client-key-file")
            .arg(&pki.front_proxy_client.key)
            .args(["--profiling=false", "-v", "1"]);
        if self.address.is_loopback() {
            // 127.0.0.1 may not be written into default/kubernetes' endpoints ("in the
            // loopback range"): no reconciler, and that Service has no endpoints then.
            cmd.args(["--endpoint-reconciler-type", "none"]);
        }
        if self.real_nodes {
            cmd.arg("--kubelet-client-certificate")
                .arg(&pki.admin.cert)
                .arg("--kubelet-client-key")
                .arg(&pki.admin.key)
                .args(["--kubelet-preferred-address-types", "InternalIP"]);
        } else {
            // Without a ServiceAccount admission plugin, Pods need not wait for the
            // namespace's default ServiceAccount (no kubelet mounts tokens here anyway).
            cmd.args(["--disable-admission-plugins", "ServiceAccount"]);
        }
        let log = self.dir.join(format!("apiserver-{index}.log"));
        let isolation = Isolation {
            hostname: Some(hostname.clone()),
            ..Isolation::default()
        };
        let daemon = Daemon::spawn(&format!("kube-apiserver-{index}"), cmd, &log, &isolation);
        self.apiservers[index].daemon = Some(daemon);
    }

    /// SIGKILLs apiserver `index`.
    pub fn kill_apiserver(&mut self, index: usize) {
        if let Some(mut daemon) = self.apiservers[index].daemon.take() {
            daemon.kill();
        }
    }

    /// An admin client talking to apiserver `index` only (not through the load balancer).
    pub async fn apiserver_client(&self, index: usize) -> kube::Client {
        let port = self.apiservers[index].port;
        let path = self.dir.join(format!("apiserver-{index}.kubeconfig"));
        write_kubeconfig(
            &path,
            &format!("https://{}:{port}", self.address),
            &self.pki.ca.cert,
            &KubeconfigUser::Cert(self.pki.admin.clone()),
        );
        client_for(&path).await
    }

    /// Waits until apiserver `index` answers `/readyz` with 200 (admin credentials).
    pub async fn wait_apiserver_ready(&self, index: usize) {
        let client = self.apiserver_client(index).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let request = http_request("/readyz");
            if let Ok(text) = client.request_text(request).await {
                if text.trim() == "ok" {
                    return;
                }
            }
            let daemon = self.apiservers[index].daemon.as_ref();
            let log = || daemon.map(|d| d.log_tail(40)).unwrap_or_default();
            if daemon.is_none_or(Daemon::exited) {
                panic!("kube-apiserver-{index} is not running\n{}", log());
            }
            if Instant::now() > deadline {
                panic!("kube-apiserver-{index} not ready within 120 s\n{}", log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn start_load_balancer(&mut self) {
        let port = free_port();
        let address = self.address;
        let mut config = format!(
            "global\n  maxconn 4096\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  \
             timeout server 1h\n  retries 1\n  option redispatch\n\
             frontend apiserver\n  bind {address}:{port}\n  default_backend apiservers\n\
             backend apiservers\n  option httpchk GET /readyz\n  http-check expect status 200\n"
        );
        for (i, api) in self.apiservers.iter().enumerate() {
            config.push_str(&format!(
                "  server api{i} {}:{} check check-ssl verify none inter 1s fall 2 rise 1\n",
                self.address, api.port
            ));
        }
        let file = self.dir.join("haproxy.cfg");
        std::fs::write(&file, config).expect("writing haproxy.cfg");
        let mut cmd = Command::new(&self.bins.haproxy);
        cmd.arg("-db").arg("-f").arg(&file);
        let daemon = Daemon::spawn(
            "haproxy",
            cmd,
            &self.dir.join("haproxy.log"),
            &Isolation::default(),
        );
        self.load_balancer = Some((port, daemon));
    }

    async fn start_controller_manager(&mut self) {
        let kubeconfig = self.kubeconfig(
            "controller-manager.kubeconfig",
            &KubeconfigUser::Cert(self.pki.controller_manager.clone()),
        );
        let mut controllers = vec![
            "endpointslice-controller",
            "endpointslice-mirroring-controller",
            "endpoints-controller",
            "serviceaccount-controller",
            "serviceaccount-token-controller",
            "namespace-controller",
            "garbage-collector-controller",
            "root-ca-certificate-publisher-controller",
        ];
        if self.real_nodes {
            // Deployments too (CoreDNS as kube-dns, `crate::kube_dns`).
            controllers.extend([
                "daemonset-controller",
                "deployment-controller",
                "replicaset-controller",
            ]);
        }
        let mut cmd = component_command(&self.bins.kube_controller_manager, &kubeconfig);
        cmd.arg("--use-service-account-credentials")
            .arg("--service-account-private-key-file")
            .arg(&self.pki.service_account_key)
            .arg("--root-ca-file")
            .arg(&self.pki.ca.cert)
            .args(["--leader-elect=false", "--secure-port", "0"])
            .args(["--controllers", &controllers.join(",")])
            .args(["--endpointslice-updates-batch-period", "0s", "-v", "1"]);
        let daemon = Daemon::spawn(
            "kube-controller-manager",
            cmd,
            &self.dir.join("controller-manager.log"),
            &Isolation::default(),
        );
        self.controller_manager = Some(daemon);
        // The serviceaccount controller creating `default` says the controllers are running.
        let client = self.admin_client().await;
        let accounts: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
            kube::Api::namespaced(client, "default");
        let deadline = Instant::now() + Duration::from_secs(120);
        while accounts.get_opt("default").await.ok().flatten().is_none() {
            let daemon = self.controller_manager.as_ref();
            let log = || daemon.map(|d| d.log_tail(40)).unwrap_or_default();
            if daemon.is_none_or(Daemon::exited) {
                panic!("kube-controller-manager is not running\n{}", log());
            }
            if Instant::now() > deadline {
                panic!(
                    "kube-controller-manager did not start its controllers\n{}",
                    log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// kube-scheduler, as `system:kube-scheduler`: the DaemonSet controller leaves binding
    /// its Pods to the scheduler (their node affinity names the node).
    fn start_scheduler(&mut self) {
        let kubeconfig = self.kubeconfig(
            "scheduler.kubeconfig",
            &KubeconfigUser::Cert(self.pki.scheduler.clone()),
        );
        let mut cmd = component_command(&self.bins.kube_scheduler, &kubeconfig);
        cmd.args(["--leader-elect=false", "--secure-port", "0", "-v", "1"]);
        self.scheduler = Some(Daemon::spawn(
            "kube-scheduler",
            cmd,
            &self.dir.join("scheduler.log"),
            &Isolation::default(),
        ));
    }

    /// The current etcd revision.
    pub fn etcd_revision(&self) -> i64 {
        let address = SocketAddr::from(([127, 0, 0, 1], self.etcd_port));
        // key "/registry" in base64: any range request returns the store's revision.
        let (status, body) =
            plain_http(address, "POST", "/v3/kv/range", r#"{"key":"L3JlZ2lzdHJ5"}"#)
                .expect("etcd range request");
        assert_eq!(status, 200, "etcd range: {body}");
        let reply: serde_json::Value = serde_json::from_str(&body).expect("etcd range reply");
        reply["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no revision in {body}"))
    }

    /// Compacts etcd's history up to its current revision: any watch or list from an older
    /// resourceVersion that reaches etcd now gets 410 Gone.
    pub fn compact_etcd(&self) -> i64 {
        let revision = self.etcd_revision();
        let address = SocketAddr::from(([127, 0, 0, 1], self.etcd_port));
        let body = format!(r#"{{"revision":"{revision}","physical":true}}"#);
        let (status, reply) = plain_http(address, "POST", "/v3/kv/compaction", &body)
            .expect("etcd compaction request");
        assert_eq!(status, 200, "etcd compaction: {reply}");
        revision
    }

    /// The logs of every component, for a failing test's report.
    pub fn logs(&self, lines: usize) -> String {
        let mut all = String::new();
        let daemons = self
            .etcd
            .iter()
            .chain(self.apiservers.iter().filter_map(|a| a.daemon.as_ref()))
            .chain(self.load_balancer.iter().map(|(_, d)| d))
            .chain(self.controller_manager.iter())
            .chain(self.scheduler.iter());
        for daemon in daemons {
            all.push_str(&format!(
                "--- {} ---\n{}\n",
                daemon.name(),
                daemon.log_tail(lines)
            ));
        }
        all
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs(30));
        }
        self.scheduler.take();
        self.controller_manager.take();
        self.load_balancer.take();
        for api in &mut self.apiservers {
            api.daemon.take();
        }
        self.etcd.take();
        if std::env::var_os("TOPOPROXY_KEEP_K8S").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A control-plane component authenticating, and delegating authentication and authorization
/// checks, with one kubeconfig.
fn component_command(binary: &Path, kubeconfig: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--authentication-kubeconfig")
        .arg(kubeconfig)
        .arg("--authorization-kubeconfig")
        .arg(kubeconfig);
    cmd
}

/// A GET request for `path` (kube's raw request form).
pub fn http_request(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path)
        .body(Vec::new())
        .expect("a GET request")
}

/// A client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> kube::Client {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kubeconfig.display()));
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .expect("a kube config");
    kube::Client::try_from(config).expect("a kube client")
}
