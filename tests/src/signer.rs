//! The signer, `aviary-identity`, as a process of the test against the API server fixture:
//! the pods and tokens it checks, and where agents reach it.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use aviary_identity::{client::SignerClient, spiffe::Identity, tls::TrustBundle};
use serde_json::json;

use crate::{
    apiserver::{ApiServer, Token},
    workspace_bin,
};

pub const NAMESPACE: &str = "aviary-system";
pub const AUDIENCE: &str = "aviary-identity";

pub fn id(text: &str) -> Identity {
    text.parse().unwrap()
}

/// A pod of `namespace` on `node`, running as `service_account`.
pub fn pod(
    api: &ApiServer,
    namespace: &str,
    name: &str,
    service_account: &str,
    node: &str,
) -> String {
    let uid = format!("uid-{namespace}-{name}");
    api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {"serviceAccountName": service_account, "nodeName": node, "containers": []},
        "status": {"phase": "Running"},
    }));
    uid
}

pub fn agent_token(pod: &str, uid: &str, node: &str) -> Token {
    Token {
        username: format!("system:serviceaccount:{NAMESPACE}:aviary"),
        uid: format!("sa-uid-{pod}"),
        extra: [
            ("authentication.kubernetes.io/pod-name", pod),
            ("authentication.kubernetes.io/pod-uid", uid),
            ("authentication.kubernetes.io/node-name", node),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), vec![v.to_owned()]))
        .collect(),
        audiences: vec![AUDIENCE.to_owned()],
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A directory of this test's, removed when dropped.
pub struct Scratch(PathBuf);

impl Default for Scratch {
    fn default() -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "aviary-identity-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Scratch {
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The signer's process, its files, and its address; stopped when dropped.
pub struct Signer {
    child: Child,
    dir: Scratch,
    pub address: String,
}

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Signer {
    pub fn start(api: &ApiServer) -> Signer {
        Signer::start_with(api, &["--listen", "127.0.0.1:0"])
    }

    /// With these flags (`--listen` among them).
    pub fn start_with(api: &ApiServer, flags: &[&str]) -> Signer {
        let dir = Scratch::default();
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let mut child = Command::new(workspace_bin("aviary-identity"))
            .args(["--dns-name", "localhost"])
            .args(flags)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Its first lines come as it talks to the fixture, which serves on this runtime.
        let address = tokio::task::block_in_place(|| loop {
            let line = lines
                .next()
                .expect("the signer ended before it listened")
                .unwrap();
            eprintln!("[signer] {line}");
            if let Some(rest) = line.split("listen=127.0.0.1:").nth(1) {
                let port = rest.split_whitespace().next().unwrap();
                break format!("localhost:{port}");
            }
        });
        // The rest of its log goes to the test's.
        std::thread::spawn(move || {
            lines
                .map_while(Result::ok)
                .for_each(|l| eprintln!("[signer] {l}"))
        });
        Signer {
            child,
            dir,
            address,
        }
    }

    /// The trust bundle, as agents read it from the ConfigMap.
    pub fn bundle(&self, api: &ApiServer) -> TrustBundle {
        TrustBundle::from_pem(&Signer::bundle_pem(api), "cluster.local").unwrap()
    }

    /// The client of an agent whose projected token is `token`.
    pub fn client(&self, api: &ApiServer, token: &str) -> SignerClient {
        let path = self.dir.join(token);
        std::fs::write(&path, token).unwrap();
        SignerClient::new(&self.address, &self.bundle(api), path).unwrap()
    }
}

impl Signer {
    /// The signer's address as the agent of `node` reaches it: a port in the node's network
    /// namespace that `runtime` forwards to the signer on this machine's loopback, under the
    /// name (`localhost`) its certificate carries.
    pub fn forwarded_into(&self, node: &crate::Node, runtime: &tokio::runtime::Handle) -> String {
        let port = self.address.rsplit(':').next().expect("host:port");
        let signer: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let listener = node.listen_in_node();
        let local = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((mut inner, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outer) = tokio::net::TcpStream::connect(signer).await {
                        let _ = tokio::io::copy_bidirectional(&mut inner, &mut outer).await;
                    }
                });
            }
        });
        format!("localhost:{}", local.port())
    }

    /// The trust bundle's PEM, as the agents' mounted ConfigMap holds it.
    pub fn bundle_pem(api: &ApiServer) -> String {
        let map = api
            .get("v1", "ConfigMap", NAMESPACE, "aviary-trust-bundle")
            .expect("the signer published its trust bundle");
        map["data"]["ca.crt"].as_str().unwrap().to_owned()
    }
}
