//! A Kubernetes API server fixture that speaks the real list/watch wire protocol, for testing the
//! agent's kube-rs client without a cluster:
//! - lists carry `metadata.resourceVersion` and page with `limit`/`continue`;
//! - `?watch=true` answers with a chunked stream of JSON events from the requested
//!   resourceVersion, `BOOKMARK`s on request, and an `ERROR` event with a `410 Gone` Status when
//!   that version has been compacted away, as etcd-backed servers do;
//! - field selectors on plain fields (`spec.nodeName=...`);
//! - GET, POST, PUT (with resourceVersion conflicts) and JSON merge PATCH, on objects and on their
//!   `status` subresource;
//! - TokenReview: tokens the test issues ([`ApiServer::issue_token`]) review as authenticated,
//!   with their user, extras and audiences, as a real API server reviews bound service-account
//!   tokens; any other token reviews as not authenticated;
//! - resources can be made "not served" (404, like a CRD that is not installed), watches can be
//!   dropped, and the whole server can refuse requests (an outage).
//!
//! It serves plain HTTP on loopback; kube's client talks to it through an ordinary kubeconfig.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::{body::Frame, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::mpsc};

type Body = BoxBody<Bytes, Infallible>;

/// A resource's collection path, e.g. "/api/v1/pods" or
/// "/apis/gateway.networking.k8s.io/v1/httproutes".
type Collection = String;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectId {
    collection: Collection,
    namespace: String,
    name: String,
}

struct Watch {
    collection: Collection,
    namespace: Option<String>,
    selector: Vec<(String, String)>,
    sender: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    revision: u64,
    objects: BTreeMap<ObjectId, Value>,
    /// Every change with its resourceVersion, for watches that start in the past.
    history: Vec<(u64, ObjectId, &'static str, Value)>,
    /// Watches and list continuations older than this get 410 Gone.
    compacted: u64,
    not_served: Vec<Collection>,
    down: bool,
    watches: Vec<Watch>,
    requests: Vec<String>,
    tokens: BTreeMap<String, Token>,
}

/// What a token the fixture issued stands for.
#[derive(Clone, Debug)]
pub struct Token {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub username: String,
    pub uid: String,
    /// Bound tokens carry the pod (and node) they were issued to, under
    /// `authentication.kubernetes.io/pod-name`, `pod-uid` and `node-name`.
    pub extra: BTreeMap<String, Vec<String>>,
    /// The audiences the token is valid for.
    pub audiences: Vec<String>,
}

/// The fixture; it stops serving when dropped.
pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    /// Serves on a loopback port of the caller's network namespace.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await?)
    }

    /// Serves on `listener` (which may be bound in another network namespace); call within a
    /// tokio runtime.
    pub fn start_on(listener: TcpListener) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // As the API server's (Go sets it on every TCP connection): without it, a watch
                // event written soon after another waits for the client's delayed ACK (40 ms).
                let _ = stream.set_nodelay(true);
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(serve(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig that points at this server.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fixture\n\
             clusters: [{{name: fixture, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: fixture, user: {{}}}}]\n\
             contexts: [{{name: fixture, context: {{cluster: fixture, user: fixture}}}}]\n",
            self.url()
        );
        std::fs::write(path, config)?;
        Ok(())
    }

    /// Creates or updates an object (a JSON Kubernetes object with apiVersion, kind and
    /// metadata), as a controller or kubectl would. Returns its new resourceVersion.
    pub fn apply(&self, object: Value) -> u64 {
        let id = id_of(&object).expect("an object with apiVersion, kind and metadata.name");
        let mut state = self.state.lock().unwrap();
        let previous = state.objects.get(&id).cloned();
        let mut object = object;
        if let Some(previous) = &previous {
            object["metadata"]["uid"] = previous["metadata"]["uid"].clone();
            let generation = previous["metadata"]["generation"].as_i64().unwrap_or(1);
            let spec_changed = previous.get("spec") != object.get("spec");
            object["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
            if object.get("status").is_none() {
                if let Some(status) = previous.get("status") {
                    object["status"] = status.clone();
                }
            }
        } else {
            if object["metadata"]["uid"].is_null() {
                // Unique per creation, as real UIDs are.
                let uid = format!("uid-{}-{}-{}", id.namespace, id.name, state.revision + 1);
                object["metadata"]["uid"] = json!(uid);
            }
            object["metadata"]["generation"] = json!(1);
        }
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.record(id, kind, object)
    }

    /// [`ApiServer::apply`] for each object of multi-document YAML; returns the last
    /// resourceVersion.
    pub fn apply_yaml(&self, yaml: &str) -> u64 {
        serde_saphyr::from_multiple::<serde_json::Value>(yaml)
            .expect("test YAML parses")
            .into_iter()
            .filter(|doc| !doc.is_null())
            .fold(0, |_, doc| self.apply(doc))
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let id = ObjectId {
            collection: collection(api_version, kind),
            namespace: namespace.into(),
            name: name.into(),
        };
        let mut state = self.state.lock().unwrap();
        match state.objects.get(&id).cloned() {
            Some(object) => {
                state.record(id, "DELETED", object);
                true
            }
            None => false,
        }
    }

    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let id = ObjectId {
            collection: collection(api_version, kind),
            namespace: namespace.into(),
            name: name.into(),
        };
        self.state.lock().unwrap().objects.get(&id).cloned()
    }

    /// Sends a BOOKMARK with the current resourceVersion on every open watch.
    pub fn bookmark(&self) {
        let mut state = self.state.lock().unwrap();
        let revision = state.revision;
        state.watches.retain(|w| {
            let (api_version, kind) = api_version_kind(&w.collection);
            let event = json!({"type": "BOOKMARK", "object": {
                "apiVersion": api_version, "kind": kind,
                "metadata": {"resourceVersion": revision.to_string()}}});
            w.sender.send(line(&event)).is_ok()
        });
    }

    /// Forgets history up to now: a watch that resumes from an older resourceVersion gets 410.
    pub fn compact(&self) {
        let mut state = self.state.lock().unwrap();
        state.compacted = state.revision;
        let revision = state.revision;
        state.history.retain(|(rv, ..)| *rv > revision);
    }

    /// Ends every open watch stream, as a restarted API server or a load balancer would.
    pub fn drop_watches(&self) {
        self.state.lock().unwrap().watches.clear();
    }

    /// While down, every request fails with 503 and open watches end.
    pub fn set_down(&self, down: bool) {
        let mut state = self.state.lock().unwrap();
        state.down = down;
        if down {
            state.watches.clear();
        }
    }

    /// Makes a resource unknown (404), like a CRD that is not installed, or known again.
    pub fn set_served(&self, api_version: &str, kind: &str, served: bool) {
        let collection = collection(api_version, kind);
        let mut state = self.state.lock().unwrap();
        state.not_served.retain(|c| *c != collection);
        if !served {
            state.not_served.push(collection);
        }
    }

    /// The requests served so far, as "METHOD path?query".
    /// Issues `token` as the API server issues a projected service-account token.
    pub fn issue_token(&self, token: &str, claims: Token) {
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_owned(), claims);
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn open_watches(&self) -> usize {
        let mut state = self.state.lock().unwrap();
        state.watches.retain(|w| !w.sender.is_closed());
        state.watches.len()
    }
}

impl State {
    fn record(&mut self, id: ObjectId, kind: &'static str, mut object: Value) -> u64 {
        self.revision += 1;
        let revision = self.revision;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        if kind == "DELETED" {
            self.objects.remove(&id);
        } else {
            self.objects.insert(id.clone(), object.clone());
        }
        self.watches.retain(|w| {
            !w.matches(&id, &object) || w.sender.send(event_line(kind, &object)).is_ok()
        });
        self.history.push((revision, id, kind, object));
        revision
    }
}

impl Watch {
    fn matches(&self, id: &ObjectId, object: &Value) -> bool {
        self.collection == id.collection
            && self.namespace.as_ref().is_none_or(|ns| *ns == id.namespace)
            && selected(&self.selector, object)
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    line(&json!({"type": kind, "object": object}))
}

fn line(event: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(event).unwrap();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// "v1" + "Pod" -> "/api/v1/pods"; "gateway.networking.k8s.io/v1" + "HTTPRoute" ->
/// "/apis/gateway.networking.k8s.io/v1/httproutes".
fn collection(api_version: &str, kind: &str) -> Collection {
    // A kind already plural (NodePods) names its collection as it is.
    let kind = kind.to_lowercase();
    let plural = if kind.ends_with('s') {
        kind
    } else {
        format!("{kind}s")
    };
    if api_version.contains('/') {
        format!("/apis/{api_version}/{plural}")
    } else {
        format!("/api/{api_version}/{plural}")
    }
}

fn api_version_kind(collection: &str) -> (String, String) {
    let (prefix, plural) = collection.rsplit_once('/').unwrap_or_default();
    let api_version = prefix
        .trim_start_matches("/apis/")
        .trim_start_matches("/api/")
        .to_owned();
    let kind = match plural {
        "pods" => "Pod",
        "namespaces" => "Namespace",
        "services" => "Service",
        "endpointslices" => "EndpointSlice",
        "httproutes" => "HTTPRoute",
        "leases" => "Lease",
        "events" => "Event",
        "nodes" => "Node",
        "nodepods" => "NodePods",
        "featureflags" => "FeatureFlag",
        other => other,
    };
    (api_version, kind.to_owned())
}

fn id_of(object: &Value) -> Option<ObjectId> {
    let api_version = object["apiVersion"].as_str()?;
    let kind = object["kind"].as_str()?;
    let name = object["metadata"]["name"].as_str()?;
    let namespace = match kind {
        "Namespace" | "Node" | "NodePods" => "",
        _ => object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default"),
    };
    Some(ObjectId {
        collection: collection(api_version, kind),
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// What a request path names.
struct Target {
    collection: Collection,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn target(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (format!("/api/{version}"), rest),
        ["apis", group, version, rest @ ..] => (format!("/apis/{group}/{version}"), rest),
        _ => return None,
    };
    let owned = |s: &&str| Some((*s).to_owned());
    let (resource, namespace, name, status) = match rest {
        [resource] => (*resource, None, None, false),
        ["namespaces", ns, resource] => (*resource, owned(ns), None, false),
        ["namespaces", ns, resource, name] => (*resource, owned(ns), owned(name), false),
        ["namespaces", ns, resource, name, "status"] => (*resource, owned(ns), owned(name), true),
        ["namespaces", name] => ("namespaces", Some(String::new()), owned(name), false),
        [resource, name] => (*resource, Some(String::new()), owned(name), false),
        _ => return None,
    };
    Some(Target {
        collection: format!("{prefix}/{resource}"),
        namespace,
        name,
        status,
    })
}

fn query(request: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `spec.nodeName=n1,metadata.name=x` as (path, value) pairs.
fn field_selector(text: Option<&String>) -> Vec<(String, String)> {
    text.map(|t| {
        t.split(',')
            .filter_map(|term| term.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
    .unwrap_or_default()
}

fn selected(selector: &[(String, String)], object: &Value) -> bool {
    selector.iter().all(|(path, value)| {
        let field = path.split('.').fold(object, |v, key| &v[key]);
        field.as_str().unwrap_or_default() == value
    })
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
        "reason": reason, "message": message, "code": code.as_u16()});
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

async fn serve(state: &Mutex<State>, request: Request<hyper::body::Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = query(&request);
    {
        let mut state = state.lock().unwrap();
        state.requests.push(format!(
            "{method} {}",
            request.uri().path_and_query().map_or("", |p| p.as_str())
        ));
        if state.down {
            return status_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "down",
            );
        }
    }
    let Some(target) = target(&path) else {
        return status_response(StatusCode::NOT_FOUND, "NotFound", "no such path");
    };
    if state
        .lock()
        .unwrap()
        .not_served
        .contains(&target.collection)
    {
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match (method.as_str(), &target.name) {
        ("GET", None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(state, &target, &query)
        }
        ("GET", None) => list(&state.lock().unwrap(), &target, &query),
        ("GET", Some(name)) => {
            let state = state.lock().unwrap();
            match state.objects.get(&object_id(&target, name)) {
                Some(object) => respond(StatusCode::OK, object),
                None => status_response(StatusCode::NOT_FOUND, "NotFound", "not found"),
            }
        }
        ("POST", None) if target.collection == TOKEN_REVIEWS => {
            review_token(&state.lock().unwrap(), body)
        }
        ("POST", None) => create(&mut state.lock().unwrap(), &target, body),
        ("PUT", Some(name)) => replace(&mut state.lock().unwrap(), &target, name, body),
        ("PATCH", Some(name)) => merge_patch(&mut state.lock().unwrap(), &target, name, body),
        _ => status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the fixture",
        ),
    }
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// A TokenReview's status, as the API server fills it in: authenticated when the token is one
/// the fixture issued and valid for one of the audiences asked for (or, with none asked for, for
/// the API server's own, which the fixture's tokens are not).
fn review_token(state: &State, mut review: Value) -> Response<Body> {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<&str> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let claims = state.tokens.get(token).filter(|claims| {
        wanted
            .iter()
            .any(|audience| claims.audiences.iter().any(|a| a == audience))
    });
    review["status"] = match claims {
        Some(claims) => json!({
            "authenticated": true,
            "audiences": wanted,
            "user": {
                "username": claims.username,
                "uid": claims.uid,
                "groups": ["system:serviceaccounts", "system:authenticated"],
                "extra": claims.extra,
            },
        }),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    respond(StatusCode::CREATED, &review)
}

fn object_id(target: &Target, name: &str) -> ObjectId {
    ObjectId {
        collection: target.collection.clone(),
        namespace: target.namespace.clone().unwrap_or_default(),
        name: name.to_owned(),
    }
}

fn in_scope(target: &Target, selector: &[(String, String)], id: &ObjectId, object: &Value) -> bool {
    id.collection == target.collection
        && target
            .namespace
            .as_ref()
            .is_none_or(|ns| *ns == id.namespace)
        && selected(selector, object)
}

fn list(state: &State, target: &Target, query: &BTreeMap<String, String>) -> Response<Body> {
    let selector = field_selector(query.get("fieldSelector"));
    let (snapshot, offset) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, offset) = token.split_once(':').unwrap_or(("0", "0"));
            let rv: u64 = rv.parse().unwrap_or(0);
            if rv < state.compacted {
                return status_response(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old",
                );
            }
            (rv, offset.parse().unwrap_or(0))
        }
        None => (state.revision, 0),
    };
    let items: Vec<&Value> = state
        .objects
        .iter()
        .filter(|(id, object)| in_scope(target, &selector, id, object))
        .map(|(_, object)| object)
        .collect();
    let limit = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<Value> = items
        .iter()
        .skip(offset)
        .take(limit)
        .map(|o| (*o).clone())
        .collect();
    let more = offset + page.len() < items.len();
    let (api_version, kind) = api_version_kind(&target.collection);
    let mut metadata = json!({"resourceVersion": snapshot.to_string()});
    if more {
        metadata["continue"] = json!(format!("{snapshot}:{}", offset + page.len()));
    }
    respond(
        StatusCode::OK,
        &json!({"apiVersion": api_version, "kind": format!("{kind}List"),
            "metadata": metadata, "items": page}),
    )
}

fn watch(
    state: &Mutex<State>,
    target: &Target,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let (sender, mut receiver) = mpsc::unbounded_channel::<Bytes>();
    let selector = field_selector(query.get("fieldSelector"));
    {
        let mut state = state.lock().unwrap();
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(state.revision);
        if from < state.compacted {
            // Real servers answer 200 and then an ERROR event carrying the 410 Status.
            let gone = json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status",
                "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from} ({})", state.compacted)}});
            let _ = sender.send(line(&gone));
            drop(sender);
        } else {
            for (rv, id, kind, object) in &state.history {
                if *rv > from && in_scope(target, &selector, id, object) {
                    let _ = sender.send(event_line(kind, object));
                }
            }
            state.watches.push(Watch {
                collection: target.collection.clone(),
                namespace: target.namespace.clone(),
                selector,
                sender,
            });
        }
    }
    // A watch ends by itself after timeoutSeconds, as the real server's does.
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(60);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let stream = async_stream(move |yield_| async move {
        loop {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(bytes)) => {
                    if yield_.send(Ok(Frame::data(bytes))).await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

/// A body stream fed by a task: the task ends when the client goes away.
fn async_stream<F, Fut>(
    producer: F,
) -> tokio_stream_shim::ReceiverStream<Result<Frame<Bytes>, Infallible>>
where
    F: FnOnce(mpsc::Sender<Result<Frame<Bytes>, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(producer(tx));
    tokio_stream_shim::ReceiverStream(rx)
}

mod tokio_stream_shim {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    /// The receiving end of a channel as a Stream (the one piece of tokio-stream needed here).
    pub struct ReceiverStream<T>(pub tokio::sync::mpsc::Receiver<T>);

    impl<T> futures::Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

fn create(state: &mut State, target: &Target, mut body: Value) -> Response<Body> {
    let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
        return status_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "name is required",
        );
    };
    if let Some(ns) = &target.namespace {
        if !ns.is_empty() {
            body["metadata"]["namespace"] = json!(ns);
        }
    }
    let id = object_id(target, &name);
    if state.objects.contains_key(&id) {
        return status_response(StatusCode::CONFLICT, "AlreadyExists", "already exists");
    }
    body["metadata"]["uid"] = json!(format!(
        "uid-{}-{}-{}",
        id.namespace,
        name,
        state.revision + 1
    ));
    body["metadata"]["generation"] = json!(1);
    state.record(id.clone(), "ADDED", body);
    respond(StatusCode::CREATED, &state.objects[&id])
}

fn replace(state: &mut State, target: &Target, name: &str, mut body: Value) -> Response<Body> {
    let id = object_id(target, name);
    let Some(current) = state.objects.get(&id).cloned() else {
        return status_response(StatusCode::NOT_FOUND, "NotFound", "not found");
    };
    if let Err(conflict) = check_version(&current, &body) {
        return conflict;
    }
    body["metadata"]["uid"] = current["metadata"]["uid"].clone();
    body["metadata"]["generation"] = current["metadata"]["generation"].clone();
    state.record(id.clone(), "MODIFIED", body);
    respond(StatusCode::OK, &state.objects[&id])
}

fn merge_patch(state: &mut State, target: &Target, name: &str, patch: Value) -> Response<Body> {
    let id = object_id(target, name);
    let Some(current) = state.objects.get(&id).cloned() else {
        return status_response(StatusCode::NOT_FOUND, "NotFound", "not found");
    };
    if let Err(conflict) = check_version(&current, &patch) {
        return conflict;
    }
    let mut updated = current.clone();
    if target.status {
        // The status subresource changes status only, whatever else the patch says.
        merge(&mut updated["status"], &patch["status"]);
    } else {
        merge(&mut updated, &patch);
        updated["status"] = current["status"].clone();
    }
    updated["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
    state.record(id.clone(), "MODIFIED", updated);
    respond(StatusCode::OK, &state.objects[&id])
}

/// A write that names a resourceVersion succeeds only against that version.
#[allow(clippy::result_large_err)]
fn check_version(current: &Value, body: &Value) -> Result<(), Response<Body>> {
    match body["metadata"]["resourceVersion"].as_str() {
        Some(rv) if Some(rv) != current["metadata"]["resourceVersion"].as_str() => {
            Err(status_response(
                StatusCode::CONFLICT,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version",
            ))
        }
        _ => Ok(()),
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().unwrap();
            for (key, value) in fields {
                if value.is_null() {
                    object.remove(key);
                } else {
                    merge(object.entry(key).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_collections_and_objects() {
        let t = target("/api/v1/namespaces/shop/pods/web").unwrap();
        assert_eq!(
            (
                t.collection.as_str(),
                t.namespace.as_deref(),
                t.name.as_deref()
            ),
            ("/api/v1/pods", Some("shop"), Some("web"))
        );
        let t =
            target("/apis/gateway.networking.k8s.io/v1/namespaces/t/httproutes/r/status").unwrap();
        assert!(t.status);
        assert_eq!(
            t.collection,
            "/apis/gateway.networking.k8s.io/v1/httproutes"
        );
        let t = target("/api/v1/namespaces/shop").unwrap();
        assert_eq!(t.collection, "/api/v1/namespaces");
        assert_eq!(t.name.as_deref(), Some("shop"));
        assert_eq!(collection("v1", "Service"), "/api/v1/services");
        assert_eq!(
            collection("coordination.k8s.io/v1", "Lease"),
            "/apis/coordination.k8s.io/v1/leases"
        );
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge(&mut doc, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }
}
