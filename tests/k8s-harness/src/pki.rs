//! The control plane's certificates: one CA for clients and serving, one front-proxy CA (the
//! apiserver's requestheader authentication, as kubeadm sets it up), and the service-account
//! signing key. Written as PEM files into the control plane's folder.
//!
//! rustls (kube's TLS) wants X.509 v3 with `CA:TRUE` only on CAs and an IP SAN for
//! `127.0.0.1` on the serving certificate; rcgen writes exactly that.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Every file the components are started with.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: CertFiles,
    pub front_proxy_ca: CertFiles,
    pub apiserver: CertFiles,
    pub front_proxy_client: CertFiles,
    pub admin: CertFiles,
    pub controller_manager: CertFiles,
    /// `system:kube-proxy`, which the default bindings give `system:node-proxier`.
    pub kube_proxy: CertFiles,
    /// `system:kube-scheduler`, which the default bindings give its role.
    pub scheduler: CertFiles,
    /// Service-account token signing key (private; the apiserver derives the public half).
    pub service_account_key: PathBuf,
    /// Its public half, which verifies the tokens.
    pub service_account_public_key: PathBuf,
}

struct Authority {
    issuer: Issuer<'static, KeyPair>,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

/// The cluster CA's common name (also what [`Pki::issue_kubelet`] signs as).
const CA_NAME: &str = "topoproxy-test-ca";

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name, None);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl Authority {
    fn create(dir: &Path, file: &str, common_name: &str) -> (Self, CertFiles) {
        let params = ca_params(common_name);
        let key = KeyPair::generate().expect("generating a CA key");
        let cert = params.self_signed(&key).expect("self-signing the CA");
        let files = CertFiles {
            cert: dir.join(format!("{file}.crt")),
            key: dir.join(format!("{file}.key")),
        };
        write(&files.cert, &cert.pem());
        write(&files.key, &key.serialize_pem());
        let issuer = Issuer::new(params, key);
        (Self { issuer }, files)
    }

    fn issue(
        &self,
        dir: &Path,
        file: &str,
        subject: DistinguishedName,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> CertFiles {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("certificate subject names");
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("generating a key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("signing a certificate");
        let files = CertFiles {
            cert: dir.join(format!("{file}.crt")),
            key: dir.join(format!("{file}.key")),
        };
        write(&files.cert, &cert.pem());
        write(&files.key, &key.serialize_pem());
        files
    }
}

impl Pki {
    /// The files [`Pki::create`] wrote into `dir`, found again (a copy of a control plane's
    /// PKI folder, e.g. the one `cargo xtask vm-test` shares with the guest).
    pub fn at(dir: &Path) -> Self {
        let pair = |file: &str| CertFiles {
            cert: dir.join(format!("{file}.crt")),
            key: dir.join(format!("{file}.key")),
        };
        Self {
            ca: pair("ca"),
            front_proxy_ca: pair("front-proxy-ca"),
            apiserver: pair("apiserver"),
            front_proxy_client: pair("front-proxy-client"),
            admin: pair("admin"),
            controller_manager: pair("controller-manager"),
            kube_proxy: pair("kube-proxy"),
            scheduler: pair("kube-scheduler"),
            service_account_key: dir.join("sa.key"),
            service_account_public_key: dir.join("sa.pub"),
        }
    }

    /// Creates every certificate under `dir`; the apiserver's serving certificate names
    /// `address` (where it listens) besides loopback and the `kubernetes` Service's names.
    pub fn create(dir: &Path, address: std::net::Ipv4Addr) -> Self {
        std::fs::create_dir_all(dir).expect("creating the pki folder");
        let (ca, ca_files) = Authority::create(dir, "ca", CA_NAME);
        let (front, front_files) =
            Authority::create(dir, "front-proxy-ca", "topoproxy-test-front-proxy-ca");
        let address = address.to_string();
        let mut names = vec![
            "127.0.0.1",
            // The host's loopback as a QEMU guest on user networking reaches it
            // (tests/vm_k8s_parity.rs).
            "10.0.2.2",
            "localhost",
            "10.96.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        if !names.contains(&address.as_str()) {
            names.push(&address);
        }
        let apiserver = ca.issue(
            dir,
            "apiserver",
            name("kube-apiserver", None),
            &names,
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        let front_proxy_client = front.issue(
            dir,
            "front-proxy-client",
            name("front-proxy-client", None),
            &[],
            client.clone(),
        );
        let admin = ca.issue(
            dir,
            "admin",
            name("topoproxy-test-admin", Some("system:masters")),
            &[],
            client.clone(),
        );
        let controller_manager = ca.issue(
            dir,
            "controller-manager",
            name("system:kube-controller-manager", None),
            &[],
            client.clone(),
        );
        let kube_proxy = ca.issue(
            dir,
            "kube-proxy",
            name("system:kube-proxy", None),
            &[],
            client.clone(),
        );
        let scheduler = ca.issue(
            dir,
            "kube-scheduler",
            name("system:kube-scheduler", None),
            &[],
            client,
        );
        let sa = KeyPair::generate().expect("generating the service-account key");
        let service_account_key = dir.join("sa.key");
        write(&service_account_key, &sa.serialize_pem());
        let service_account_public_key = dir.join("sa.pub");
        write(&service_account_public_key, &sa.public_key_pem());
        Self {
            ca: ca_files,
            front_proxy_ca: front_files,
            apiserver,
            front_proxy_client,
            admin,
            controller_manager,
            kube_proxy,
            scheduler,
            service_account_key,
            service_account_public_key,
        }
    }
}

/// A kubelet's certificates: its client identity (`system:node:<name>` in `system:nodes`,
/// which the Node authorizer and NodeRestriction admit) and its serving certificate (the
/// apiserver's `exec` and `logs` connect to it).
#[derive(Clone, Debug)]
pub struct KubeletCerts {
    pub client: CertFiles,
    pub serving: CertFiles,
}

impl Pki {
    /// Issues a kubelet's certificates for `node`, serving on `addresses`, from the cluster
    /// CA (its key is read back from the control plane's folder).
    pub fn issue_kubelet(&self, dir: &Path, node: &str, addresses: &[&str]) -> KubeletCerts {
        std::fs::create_dir_all(dir).expect("creating the kubelet's pki folder");
        let key_pem = std::fs::read_to_string(&self.ca.key).expect("reading the CA key");
        let key = KeyPair::from_pem(&key_pem).expect("parsing the CA key");
        let ca = Authority {
            issuer: Issuer::new(ca_params(CA_NAME), key),
        };
        let client = ca.issue(
            dir,
            "kubelet-client",
            name(&format!("system:node:{node}"), Some("system:nodes")),
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let serving = ca.issue(
            dir,
            "kubelet-serving",
            name(&format!("system:node:{node}"), Some("system:nodes")),
            addresses,
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        KubeletCerts { client, serving }
    }
}
