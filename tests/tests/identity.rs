//! The signer, `aviary-identity`, as its own process against the API server fixture, and the
//! agents' side of it: which agent gets which certificate, and mutual TLS with what it gets.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use aviary_identity::{
    client::{Error, SignerClient},
    credentials::Credentials,
    spiffe::Identity,
    tls::{self, TrustBundle},
};
use aviary_tests::{
    apiserver::{ApiServer, Token},
    workspace_bin,
};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const NAMESPACE: &str = "aviary-system";
const AUDIENCE: &str = "aviary-identity";

fn id(text: &str) -> Identity {
    text.parse().unwrap()
}

/// A pod of `namespace` on `node`, running as `service_account`.
fn pod(api: &ApiServer, namespace: &str, name: &str, service_account: &str, node: &str) -> String {
    let uid = format!("uid-{namespace}-{name}");
    api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {"serviceAccountName": service_account, "nodeName": node, "containers": []},
        "status": {"phase": "Running"},
    }));
    uid
}

/// The cluster: two nodes, each with an agent pod and one workload; a finished pod on node-a.
async fn cluster() -> ApiServer {
    let api = ApiServer::start().await.unwrap();
    for node in ["a", "b"] {
        let uid = pod(
            &api,
            NAMESPACE,
            &format!("aviary-{node}"),
            "aviary",
            &format!("node-{node}"),
        );
        api.issue_token(
            &format!("token-{node}"),
            agent_token(&format!("aviary-{node}"), &uid, &format!("node-{node}")),
        );
    }
    pod(&api, "shop", "checkout-1", "checkout", "node-a");
    pod(&api, "shop", "payments-1", "payments", "node-b");
    api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "report-1", "namespace": "shop"},
        "spec": {"serviceAccountName": "batch", "nodeName": "node-a", "containers": []},
        "status": {"phase": "Succeeded"},
    }));
    api
}

fn agent_token(pod: &str, uid: &str, node: &str) -> Token {
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

/// The signer's process, its files, and its address; stopped and removed when dropped.
struct Signer {
    child: Child,
    dir: PathBuf,
    address: String,
}

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Signer {
    fn start(api: &ApiServer) -> Signer {
        let dir = std::env::temp_dir().join(format!(
            "aviary-identity-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let mut child = Command::new(workspace_bin("aviary-identity"))
            .args(["--listen", "127.0.0.1:0", "--dns-name", "localhost"])
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
    fn bundle(&self, api: &ApiServer) -> TrustBundle {
        let map = api
            .get("v1", "ConfigMap", NAMESPACE, "aviary-trust-bundle")
            .expect("the signer published its trust bundle");
        TrustBundle::from_pem(map["data"]["ca.crt"].as_str().unwrap(), "cluster.local").unwrap()
    }

    /// The client of an agent whose projected token is `token`.
    fn client(&self, api: &ApiServer, token: &str) -> SignerClient {
        let path = self.dir.join(token);
        std::fs::write(&path, token).unwrap();
        SignerClient::new(&self.address, &self.bundle(api), path).unwrap()
    }
}

async fn refused(client: &SignerClient, identity: &str) -> (u16, String) {
    match client.certify(&id(identity)).await {
        Err(Error::Refused { status, reason }) => (status.as_u16(), reason),
        Err(other) => panic!("{identity}: not a refusal: {other}"),
        Ok(_) => panic!("{identity} was certified"),
    }
}

/// Mutual TLS over loopback TCP: `client` connects to `server` expecting `expected`; the
/// identities each end proved to the other.
async fn mutual_tls(
    server: &Credentials,
    client: &Credentials,
    expected: Identity,
    bundle: &TrustBundle,
) -> (Option<Identity>, Option<Identity>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(
        tls::server_config(server, bundle).unwrap(),
    ));
    let accept = async {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.unwrap();
        tls.write_all(&byte).await.unwrap();
        tls::peer_identity(tls.get_ref().1)
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        tls::client_config(client, bundle, expected).unwrap(),
    ));
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = connector.connect(addr.ip().into(), tcp).await.unwrap();
        tls.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.unwrap();
        tls::peer_identity(tls.get_ref().1)
    };
    tokio::join!(accept, connect)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_their_own_nodes_identities_and_speak_mutual_tls_with_them() {
    let api = cluster().await;
    let signer = Signer::start(&api);
    let checkout = id("spiffe://cluster.local/ns/shop/sa/checkout");
    let payments = id("spiffe://cluster.local/ns/shop/sa/payments");

    let on_a = signer
        .client(&api, "token-a")
        .certify(&checkout)
        .await
        .unwrap();
    let on_b = signer
        .client(&api, "token-b")
        .certify(&payments)
        .await
        .unwrap();
    assert_eq!(on_a.identity, checkout);
    let life = on_a.not_after.duration_since(on_a.not_before).unwrap();
    // 24 h, from 5 minutes back (for clocks behind).
    assert_eq!(life, Duration::from_secs(24 * 3600 + 5 * 60));

    let bundle = signer.bundle(&api);
    let (server_saw, client_saw) = mutual_tls(&on_b, &on_a, payments.clone(), &bundle).await;
    assert_eq!(server_saw, Some(checkout));
    assert_eq!(client_saw, Some(payments));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_asks_for_another_nodes_pods_identity_is_refused() {
    let api = cluster().await;
    let signer = Signer::start(&api);
    let agent_a = signer.client(&api, "token-a");
    assert_eq!(
        refused(&agent_a, "spiffe://cluster.local/ns/shop/sa/payments").await,
        (
            403,
            "no pod on node node-a runs as spiffe://cluster.local/ns/shop/sa/payments".into()
        )
    );
    // A pod that has finished no longer holds its identity on the node.
    assert_eq!(
        refused(&agent_a, "spiffe://cluster.local/ns/shop/sa/batch")
            .await
            .0,
        403
    );
    assert_eq!(
        refused(&agent_a, "spiffe://other.example/ns/shop/sa/checkout").await,
        (
            403,
            "spiffe://other.example/ns/shop/sa/checkout is not of this signer's trust domain"
                .into()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_other_than_an_agents_own_are_refused() {
    let api = cluster().await;
    let checkout = "spiffe://cluster.local/ns/shop/sa/checkout";
    // The agent's pod's token for the API server, not for the signer.
    let mut for_the_api_server = agent_token("aviary-a", "uid-aviary-system-aviary-a", "node-a");
    for_the_api_server.audiences = vec!["https://kubernetes.default.svc".into()];
    api.issue_token("token-api", for_the_api_server);
    // A workload's own token.
    let mut workload = agent_token("checkout-1", "uid-shop-checkout-1", "node-a");
    workload.username = "system:serviceaccount:shop:checkout".into();
    api.issue_token("token-workload", workload);
    // A token that names another node than its pod's.
    api.issue_token(
        "token-moved",
        agent_token("aviary-a", "uid-aviary-system-aviary-a", "node-b"),
    );
    let signer = Signer::start(&api);

    assert_eq!(
        refused(&signer.client(&api, "token-forged"), checkout).await,
        (
            401,
            "the token was not accepted: invalid bearer token".into()
        )
    );
    assert_eq!(
        refused(&signer.client(&api, "token-api"), checkout).await.0,
        401
    );
    assert_eq!(
        refused(&signer.client(&api, "token-workload"), checkout).await,
        (
            403,
            "system:serviceaccount:shop:checkout is not the agent's service account".into()
        )
    );
    assert_eq!(
        refused(&signer.client(&api, "token-moved"), checkout).await,
        (
            403,
            "the token's pod aviary-a runs on node-a, and the token was issued on node-b".into()
        )
    );
    // An agent pod that is gone: its token is of no use any more.
    assert!(api.delete("v1", "Pod", NAMESPACE, "aviary-a"));
    assert_eq!(
        refused(&signer.client(&api, "token-a"), checkout).await,
        (
            403,
            "the token's pod aviary-a is gone, or is another pod of that name".into()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_outlives_the_signer_in_its_secret() {
    let api = cluster().await;
    let checkout = id("spiffe://cluster.local/ns/shop/sa/checkout");
    let payments = id("spiffe://cluster.local/ns/shop/sa/payments");
    let first = Signer::start(&api);
    let secret = api
        .get("v1", "Secret", NAMESPACE, "aviary-identity-ca")
        .expect("the signer keeps its CA in a Secret");
    let before = first
        .client(&api, "token-a")
        .certify(&checkout)
        .await
        .unwrap();
    drop(first);

    let second = Signer::start(&api);
    assert_eq!(
        api.get("v1", "Secret", NAMESPACE, "aviary-identity-ca")
            .unwrap()["data"],
        secret["data"]
    );
    let after = second
        .client(&api, "token-b")
        .certify(&payments)
        .await
        .unwrap();
    let (server_saw, client_saw) =
        mutual_tls(&after, &before, payments.clone(), &second.bundle(&api)).await;
    assert_eq!(server_saw, Some(checkout));
    assert_eq!(client_saw, Some(payments));
}
