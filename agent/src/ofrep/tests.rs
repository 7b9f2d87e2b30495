//! The endpoint over TCP, as applications reach it.

use std::net::Ipv4Addr;

use aviary_flags::FlagSet;
use http::HeaderMap;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::{metrics::sample, table::Workload};

/// The flags of the namespace `shop`: one of each kind of answer.
fn shop_flags() -> NamespaceFlags {
    let on_off = json!({"on": true, "off": false});
    let document = json!({
        "flags": {
            "dark-mode": {"state": "ENABLED", "variants": on_off, "defaultVariant": "off",
                "targeting": {"if": [{"ends_with": [{"var": "email"}, "@example.com"]}, "on", null]},
                "metadata": {"owner": "ui"}},
            "banner": {"state": "ENABLED", "variants": {"big": "BIG", "small": "small"},
                "defaultVariant": "small"},
            "retired": {"state": "DISABLED", "variants": {"a": 1}, "defaultVariant": "a"},
            "no-default": {"state": "ENABLED", "variants": {"a": 1, "b": 2},
                "targeting": {"if": [{"==": [{"var": "plan"}, "gold"]}, "a", null]}},
            "launched": {"state": "ENABLED", "variants": on_off, "defaultVariant": "off",
                "targeting": {"if": [{">": [{"var": "$flagd.timestamp"}, 1_700_000_000]}, "on", "off"]}},
            "stray": {"state": "ENABLED", "variants": on_off, "defaultVariant": "off",
                "targeting": {"if": [true, "maybe", "off"]}},
            "broken": {"state": "SOMETIMES", "variants": on_off, "defaultVariant": "off"},
        },
        "metadata": {"team": "shop"},
    });
    let set = FlagSet::parse(&document).unwrap();
    NamespaceFlags {
        sets: vec![("shop-flags".into(), Arc::new(set))],
    }
}

/// An endpoint being served.
struct Endpoint {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    serving: tokio::task::JoinHandle<()>,
}

/// An endpoint whose table knows the loopback address as a pod of `shop` (or, with `known`
/// false, as nothing).
async fn endpoint(known: bool, limits: Limits) -> Endpoint {
    let pod = Arc::new(Workload {
        namespace: "shop".into(),
        workload: "checkout".into(),
        pod: "checkout-1".into(),
    });
    let pods = known.then(|| (IpAddr::from(Ipv4Addr::LOCALHOST), pod));
    let table = RouteTable {
        pods: pods.into_iter().collect(),
        flags: [("shop".to_owned(), Arc::new(shop_flags()))]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let metrics = Arc::new(Metrics::new(false, None));
    let routes = Arc::new(ArcSwap::from_pointee(table));
    let ofrep = Arc::new(Ofrep::new(routes, metrics.clone(), limits));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(ofrep.serve(listener));
    Endpoint {
        addr,
        metrics,
        serving,
    }
}

/// The address and metrics of an endpoint that knows the loopback address.
async fn known() -> (SocketAddr, Arc<Metrics>) {
    let endpoint = endpoint(true, Limits::default()).await;
    (endpoint.addr, endpoint.metrics)
}

/// A POST of `body` to `path`, with `headers`: the status, headers and body.
async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (StatusCode, HeaderMap, Bytes) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::post(path).header("host", "aviary");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body.into())).unwrap();
    let (head, body) = sender.send_request(request).await.unwrap().into_parts();
    (
        head.status,
        head.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

/// The flag `key` for `context`: the status and the answer.
async fn evaluate(addr: SocketAddr, key: &str, context: Value) -> (StatusCode, Value) {
    let path = format!("/ofrep/v1/evaluate/flags/{key}");
    let body = json!({ "context": context }).to_string();
    let (status, _, body) = post(addr, &path, &[], body).await;
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn a_flag_answers_its_value_variant_reason_and_metadata_and_is_counted() {
    let (addr, metrics) = known().await;
    let user = json!({"targetingKey": "u1", "email": "ada@example.com"});
    let (status, answer) = evaluate(addr, "dark-mode", user).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        answer,
        json!({"key": "dark-mode", "value": true, "variant": "on", "reason": "TARGETING_MATCH",
               "metadata": {"team": "shop", "owner": "ui"}})
    );
    let (_, answer) = evaluate(addr, "dark-mode", json!({"email": "bob@else.where"})).await;
    assert_eq!(
        (&answer["variant"], &answer["reason"]),
        (&json!("off"), &json!("DEFAULT"))
    );
    let (_, answer) = evaluate(addr, "banner", json!({})).await;
    assert_eq!(
        (&answer["value"], &answer["reason"]),
        (&json!("small"), &json!("STATIC"))
    );
    // $flagd.timestamp is now, not 0.
    let (_, answer) = evaluate(addr, "launched", json!({})).await;
    assert_eq!(answer["variant"], "on");

    let text = metrics.render();
    let counted = |labels: &[(&str, &str)]| {
        let all = [&[("evaluator", "ofrep"), ("namespace", "shop")][..], labels].concat();
        sample(&text, "aviary_flag_evaluations_total", &all)
    };
    let on = [
        ("feature_flag_key", "dark-mode"),
        ("feature_flag_result_variant", "on"),
    ];
    assert_eq!(counted(&on), 1.0, "{text}");
    assert_eq!(counted(&[("feature_flag_key", "dark-mode")]), 2.0, "{text}");
}

#[tokio::test]
async fn a_disabled_flag_and_one_without_a_default_answer_their_reason_and_no_value() {
    let (addr, _) = known().await;
    let (status, answer) = evaluate(addr, "retired", json!({"targetingKey": "u1"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        answer,
        json!({"key": "retired", "reason": "DISABLED", "metadata": {"team": "shop"}})
    );
    let (status, answer) = evaluate(addr, "no-default", json!({"plan": "free"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        answer,
        json!({"key": "no-default", "reason": "DEFAULT", "metadata": {"team": "shop"}})
    );
    let (_, answer) = evaluate(addr, "no-default", json!({"plan": "gold"})).await;
    assert_eq!(
        (&answer["value"], &answer["variant"]),
        (&json!(1), &json!("a"))
    );
}

#[tokio::test]
async fn errors_answer_flagds_codes_and_statuses() {
    let (addr, metrics) = known().await;
    let (status, answer) = evaluate(addr, "nope", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(answer["key"], "nope");
    assert_eq!(answer["errorCode"], "FLAG_NOT_FOUND");
    assert!(answer["errorDetails"].as_str().unwrap().contains("nope"));
    // A flag that cannot be used (the store refuses its object; the table may still hold
    // one from elsewhere) and a rule that chose no variant.
    let (status, answer) = evaluate(addr, "broken", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["errorCode"], "PARSE_ERROR");
    assert!(answer["errorDetails"].as_str().unwrap().contains("state"));
    let (status, answer) = evaluate(addr, "stray", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["errorCode"], "GENERAL");
    // A key no flag has is counted under one name, however many a caller makes up.
    let text = metrics.render();
    let missing = [
        ("feature_flag_key", "unknown"),
        ("error_type", "FLAG_NOT_FOUND"),
    ];
    assert_eq!(
        sample(&text, "aviary_flag_evaluations_total", &missing),
        1.0
    );
    assert!(!text.contains("\"nope\""), "{text}");
}

#[tokio::test]
async fn an_invalid_context_is_refused_and_evaluates_nothing() {
    let (addr, metrics) = known().await;
    let path = "/ofrep/v1/evaluate/flags/banner";
    for body in [r#"{"context": "#, r#"{"context": 5}"#, "[]"] {
        let (status, _, answer) = post(addr, path, &[], body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["key"], "banner");
        assert_eq!(answer["errorCode"], "INVALID_CONTEXT", "{body}");
    }
    let (status, _, answer) = post(addr, "/ofrep/v1/evaluate/flags", &[], "{").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["errorCode"], "INVALID_CONTEXT");
    assert_eq!(answer.get("key"), None);
    assert!(!metrics.render().contains("feature_flag_key"));
    // No body at all is an empty context, as flagd takes it.
    let (status, _, _) = post(addr, path, &[], "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_caller_that_is_no_known_pod_gets_403_and_no_flag() {
    let Endpoint { addr, metrics, .. } = endpoint(false, Limits::default()).await;
    for path in [
        "/ofrep/v1/evaluate/flags/banner",
        "/ofrep/v1/evaluate/flags",
    ] {
        let (status, _, body) = post(addr, path, &[], "{}").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("127.0.0.1 is no pod"), "{body}");
        assert!(
            !body.contains("small") && !body.contains("banner"),
            "{body}"
        );
    }
    assert!(!metrics.render().contains("feature_flag_key"));
}

#[tokio::test]
async fn bulk_answers_every_flag_with_an_etag_and_304_while_it_holds() {
    let (addr, _) = known().await;
    let path = "/ofrep/v1/evaluate/flags";
    let context = r#"{"context": {"targetingKey": "u1", "email": "ada@example.com"}}"#;
    let (status, headers, body) = post(addr, path, &[], context).await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    let flags = answer["flags"].as_array().unwrap();
    let keys: Vec<&str> = flags.iter().map(|f| f["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "banner",
            "broken",
            "dark-mode",
            "launched",
            "no-default",
            "retired",
            "stray"
        ]
    );
    // Each as it answers alone.
    let (_, alone) = evaluate(
        addr,
        "dark-mode",
        json!({"targetingKey": "u1", "email": "ada@example.com"}),
    )
    .await;
    assert_eq!(flags[2], alone);
    assert_eq!(flags[1]["errorCode"], "PARSE_ERROR");
    assert_eq!(flags[5]["reason"], "DISABLED");

    let etag = headers[header::ETAG].to_str().unwrap().to_owned();
    let (status, headers, body) = post(addr, path, &[("if-none-match", &etag)], context).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    assert_eq!(headers[header::ETAG], etag.as_str());
    // Another context, another answer: the old tag does not hold.
    let other = r#"{"context": {"targetingKey": "u2"}}"#;
    let (status, headers, _) = post(addr, path, &[("if-none-match", &etag)], other).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(headers[header::ETAG], etag.as_str());
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_wrong_methods_and_paths_are_refused() {
    let (addr, _) = known().await;
    let path = "/ofrep/v1/evaluate/flags/banner";
    let padding = "x".repeat(Limits::default().max_body_bytes);
    let large = format!(r#"{{"context": {{"padding": "{padding}"}}}}"#);
    let (status, headers, _) = post(addr, path, &[], large).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(headers[header::CONNECTION], "close");
    let (status, _, _) = post(addr, "/ofrep/v1/evaluate", &[], "{}").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let get = Request::get(path)
        .header("host", "aviary")
        .body(Full::<Bytes>::default());
    let response = sender.send_request(get.unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()[header::ALLOW], "POST");
}

/// Everything the endpoint sends on a connection until it closes it.
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    let _ = read.await.expect("the endpoint closed the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_connections_are_bounded() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(200),
        body_read_timeout: Duration::from_millis(200),
        max_connections: 2,
        ..Limits::default()
    };
    let addr = endpoint(true, limits).await.addr;
    // Headers that never end.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /ofrep/v1/evaluate/flags HTTP/1.1\r\nhost: a")
        .await
        .unwrap();
    until_closed(&mut stream).await;
    // A body shorter than it said.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = "POST /ofrep/v1/evaluate/flags HTTP/1.1\r\nhost: a\r\ncontent-length: 20\r\n\r\n{";
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // Two held open: a third is closed at once.
    let _held = [
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    let _ = third
        .write_all(b"POST /ofrep/v1/evaluate/flags HTTP/1.1\r\n\r\n")
        .await;
    assert_eq!(until_closed(&mut third).await, "");
}

#[tokio::test]
async fn when_the_endpoint_stops_its_connections_close() {
    let Endpoint { addr, serving, .. } = endpoint(true, Limits::default()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request =
        "POST /ofrep/v1/evaluate/flags/banner HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // Idle between requests when its endpoint stops (its listener handed over): it closes,
    // and its client's next request goes to whoever listens now.
    serving.abort();
    let rest = until_closed(&mut stream).await;
    assert!(rest.contains("\"small\""), "{rest}");
}
