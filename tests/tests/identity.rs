//! The signer, `aviary-identity`, as its own process against the API server fixture, and the
//! agents' side of it: which agent gets which certificate, and mutual TLS with what it gets.

use std::time::Duration;

use aviary_agent::identity::{maintain, Certificates, IdentityConfig};
use aviary_identity::{
    client::{Error, SignerClient},
    credentials::Credentials,
    spiffe::Identity,
    tls::{self, TrustBundle},
};
use aviary_tests::{
    apiserver::ApiServer,
    signer::{agent_token, id, pod, Scratch, Signer, NAMESPACE},
    wait_until,
};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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

/// The configuration of node-a's agent for `signer`, its trust bundle and token in `dir`.
fn keeper(signer: &Signer, api: &ApiServer, dir: &Scratch) -> IdentityConfig {
    let bundle = dir.join("ca.crt");
    let map = api
        .get("v1", "ConfigMap", NAMESPACE, "aviary-trust-bundle")
        .unwrap();
    std::fs::write(&bundle, map["data"]["ca.crt"].as_str().unwrap()).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "token-a").unwrap();
    IdentityConfig {
        signer: signer.address.clone(),
        trust_domain: "cluster.local".into(),
        trust_bundle: bundle,
        token,
    }
}

/// Polls (off the runtime's threads) until `check` holds.
async fn eventually(what: &str, timeout: Duration, check: impl Fn() -> bool + Send + 'static) {
    let held = tokio::task::spawn_blocking(move || wait_until(timeout, || check().then_some(())))
        .await
        .unwrap();
    assert!(held.is_some(), "{what}, within {timeout:?}");
}

/// Waits until `certificates` holds one for `identity` (with `held` false: until it holds none).
async fn until_held(
    certificates: &std::sync::Arc<Certificates>,
    identity: &Identity,
    held: bool,
    what: &str,
    timeout: Duration,
) {
    let (c, identity) = (certificates.clone(), identity.clone());
    eventually(what, timeout, move || c.get(&identity).is_some() == held).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_at_half_life_and_rides_out_a_signer_outage() {
    let api = cluster().await;
    let signer = Signer::start_with(
        &api,
        &["--listen", "127.0.0.1:0", "--certificate-lifetime", "10s"],
    );
    let listen = signer.address.replace("localhost", "127.0.0.1");
    let files = Scratch::default();
    let config = keeper(&signer, &api, &files);
    let checkout = id("spiffe://cluster.local/ns/shop/sa/checkout");
    let certificates = std::sync::Arc::new(Certificates::default());
    let (wanted_tx, wanted) = tokio::sync::watch::channel([checkout.clone()].into());
    let keeping = tokio::spawn(maintain(config, wanted, certificates.clone()));

    until_held(
        &certificates,
        &checkout,
        true,
        "a certificate",
        Duration::from_secs(5),
    )
    .await;
    let first = certificates.get(&checkout).unwrap();
    assert_eq!(certificates.status(), "identity: 1 certificate in force");
    // Renewed half way through its 10 s.
    let (c, wanted_id, was) = (certificates.clone(), checkout.clone(), first.not_after);
    eventually("a renewal", Duration::from_secs(8), move || {
        c.get(&wanted_id).is_some_and(|now| now.not_after > was)
    })
    .await;
    let renewed = certificates.get(&checkout).unwrap();
    let at = renewed.received.duration_since(first.received).unwrap();
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(7)).contains(&at),
        "renewed {at:?} after the first"
    );

    // The signer goes: the certificate stays in force until it expires, and the status says so.
    drop(signer);
    let c = certificates.clone();
    eventually("a failure reported", Duration::from_secs(8), move || {
        c.status().contains("failing since")
    })
    .await;
    let status = certificates.status();
    assert!(status.contains("the signer at localhost:"), "{status}");
    assert!(
        status.contains("1 certificate in force, the first until"),
        "{status}"
    );
    assert!(certificates.get(&checkout).is_some(), "{status}");
    // Then it expires, and is dropped.
    until_held(
        &certificates,
        &checkout,
        false,
        "the expired certificate dropped",
        Duration::from_secs(12),
    )
    .await;

    // Back on the same address: a new certificate, and the trouble is over.
    let _signer = Signer::start_with(
        &api,
        &["--listen", &listen, "--certificate-lifetime", "10s"],
    );
    until_held(
        &certificates,
        &checkout,
        true,
        "a certificate again",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(certificates.status(), "identity: 1 certificate in force");

    // An identity the node may not have: refused, and said so; what it may have is kept.
    let payments = id("spiffe://cluster.local/ns/shop/sa/payments");
    wanted_tx
        .send([checkout.clone(), payments.clone()].into())
        .unwrap();
    let c = certificates.clone();
    eventually("the refusal reported", Duration::from_secs(5), move || {
        c.status()
            .contains("no pod on node node-a runs as spiffe://cluster.local/ns/shop/sa/payments")
    })
    .await;
    assert!(certificates.get(&checkout).is_some());
    assert!(certificates.get(&payments).is_none());

    // No pod needs it any more: dropped.
    wanted_tx.send(Default::default()).unwrap();
    until_held(
        &certificates,
        &checkout,
        false,
        "the certificate dropped",
        Duration::from_secs(5),
    )
    .await;
    drop(wanted_tx);
    keeping.await.unwrap();
}
