//! Local mode: the same Kubernetes objects, read from YAML files instead of the API server.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{anyhow, Context as _};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use notify::{
    event::{AccessKind, EventKind},
    RecommendedWatcher, RecursiveMode, Watcher as _,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::feature_flag::{self, FeatureFlag};
use super::object::Object;

/// How long a burst of file events must be quiet before the files are read: an editor's save
/// (a temporary file written, then renamed over the old one) is one change, read once.
pub const DEBOUNCE: Duration = Duration::from_millis(20);

/// The files are also checked this often, whatever inotify says: it cannot watch a path that
/// does not exist yet, and its queue can overflow.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(5);

/// Parses multi-document Kubernetes YAML (or JSON). `kind: List` documents are unpacked; kinds
/// Aviary does not use are skipped, so a directory of ordinary manifests works as it is. Each
/// document is read (serde-saphyr, within its limits on size and nesting) into a JSON value,
/// which the object types are then read from, as the API server's JSON would be.
pub fn parse_documents(text: &str) -> anyhow::Result<Vec<Object>> {
    parse_file(text, "flagd")
}

/// [`parse_documents`] for a file named `name` (its stem): a flagd flag file in it (`{"flags":
/// ..., "$evaluators": ...}`, with no apiVersion nor kind) stands for a FeatureFlag named after
/// it, in the namespace its flag set's metadata names (`"metadata": {"namespace": "shop"}`),
/// else `default`.
pub fn parse_file(text: &str, name: &str) -> anyhow::Result<Vec<Object>> {
    let mut objects = Vec::new();
    let mut reader = text.as_bytes();
    // Empty documents yield nothing, and are not counted.
    for (index, document) in serde_saphyr::read::<_, Value>(&mut reader).enumerate() {
        let value = document
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("document {}", index + 1))?;
        if value.is_null() {
            continue;
        }
        let result = if is_flagd_file(&value) {
            let name = flagd_object_name(name, objects.len());
            flagd_feature_flag(value, name).map(|flag| objects.push(flag))
        } else {
            collect(value, &mut objects)
        };
        result.with_context(|| format!("document {}", index + 1))?;
    }
    Ok(objects)
}

fn collect(value: Value, out: &mut Vec<Object>) -> anyhow::Result<()> {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = value.get("items").cloned().unwrap_or_default();
            let items: Vec<Value> = serde_json::from_value(items).context("List items")?;
            return items.into_iter().try_for_each(|item| collect(item, out));
        }
        ("v1", "Namespace") => Object::Namespace(Box::new(serde_json::from_value(value)?)),
        ("v1", "Pod") => Object::Pod(Box::new(serde_json::from_value(value)?)),
        ("v1", "Service") => {
            let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(value)?;
            Object::Service(Box::new(svc.into()))
        }
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
            Object::HttpRoute(Box::new(serde_json::from_value(value)?))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
                serde_json::from_value(value)?;
            Object::EndpointSlice(Box::new(slice.into()))
        }
        (feature_flag::API_VERSION, feature_flag::KIND) => Object::FeatureFlag(Box::new(
            FeatureFlag::from_json(value).map_err(|e| anyhow!("FeatureFlag: {e}"))?,
        )),
        ("", _) | (_, "") => {
            return Err(anyhow!(
                "not a Kubernetes object: apiVersion and kind are required"
            ))
        }
        _ => {
            debug!(%api_version, %kind, "skipping a kind Aviary does not use");
            return Ok(());
        }
    };
    out.push(object);
    Ok(())
}

/// A flagd flag file's document: flags, and no apiVersion nor kind.
fn is_flagd_file(value: &Value) -> bool {
    value.get("flags").is_some_and(Value::is_object)
        && value.get("apiVersion").is_none()
        && value.get("kind").is_none()
}

/// The name of the FeatureFlag a flagd document of the file `stem` stands for: the stem as a
/// Kubernetes name, and the document's place after the first.
fn flagd_object_name(stem: &str, place: usize) -> String {
    let mut name: String = stem
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    if place > 0 {
        name.push_str(&format!("-{place}"));
    }
    name
}

fn flagd_feature_flag(value: Value, name: String) -> anyhow::Result<Object> {
    let namespace = match value.pointer("/metadata/namespace") {
        None => "default".to_owned(),
        Some(Value::String(namespace)) if !namespace.is_empty() => namespace.clone(),
        Some(other) => {
            return Err(anyhow!(
                "flagd file: metadata.namespace must name a namespace, not {other}"
            ))
        }
    };
    let meta = ObjectMeta {
        name: Some(name),
        namespace: Some(namespace),
        ..ObjectMeta::default()
    };
    Ok(Object::FeatureFlag(Box::new(FeatureFlag::new(meta, value))))
}

/// A file or directory of manifests, reread when a file changes. A file that fails to parse
/// keeps contributing its last good objects until it is fixed.
pub struct LocalSource {
    root: PathBuf,
    files: BTreeMap<PathBuf, LoadedFile>,
    listed_once: bool,
}

struct LoadedFile {
    stamp: (SystemTime, u64),
    objects: Vec<Object>,
}

impl LocalSource {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            files: BTreeMap::new(),
            listed_once: false,
        }
    }

    /// Rereads what changed. Returns every object when anything changed (always on the first
    /// call), None otherwise.
    pub fn poll(&mut self) -> Option<Vec<Object>> {
        let mut changed = !self.listed_once;
        self.listed_once = true;
        let paths = match manifest_files(&self.root) {
            Ok(paths) => paths,
            Err(e) => {
                warn!(path = %self.root.display(), error = %format!("{e:#}"), "cannot list policy files; keeping the last good policy");
                return changed.then(|| self.objects());
            }
        };
        let before = self.files.len();
        self.files.retain(|path, _| paths.contains(path));
        changed |= self.files.len() != before;

        for path in paths {
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            match fs::read_to_string(&path)
                .map_err(anyhow::Error::from)
                .and_then(|t| parse_file(&t, &file_stem(&path)))
            {
                Ok(objects) => {
                    self.files.insert(path, LoadedFile { stamp, objects });
                    changed = true;
                }
                Err(e) => {
                    warn!(file = %path.display(), error = %format!("{e:#}"), "policy file rejected; its last good version stays in force");
                    // Remember the stamp so the same broken contents are not reported again,
                    // but keep the objects of the last good read.
                    let objects = self
                        .files
                        .remove(&path)
                        .map(|f| f.objects)
                        .unwrap_or_default();
                    self.files.insert(path, LoadedFile { stamp, objects });
                }
            }
        }
        changed.then(|| self.objects())
    }

    fn objects(&self) -> Vec<Object> {
        self.files
            .values()
            .flat_map(|f| f.objects.iter().cloned())
            .collect()
    }
}

/// Follows a [`LocalSource`]'s files as they change (inotify, through `notify`).
pub struct LocalWatch {
    source: LocalSource,
    events: mpsc::UnboundedReceiver<()>,
    /// The watch lasts as long as this: dropped, it stops. None when it could not be set up
    /// (the rescan still runs).
    _watcher: Option<RecommendedWatcher>,
}

impl LocalWatch {
    pub fn new(root: PathBuf) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let watcher = watch(&root, events_tx)
            .inspect_err(|e| {
                warn!(path = %root.display(), error = %e, "cannot watch the policy files; checking them every {RESCAN_INTERVAL:?}")
            })
            .ok();
        Self {
            source: LocalSource::new(root),
            events,
            _watcher: watcher,
        }
    }

    /// Every object: at once the first time, then each time the files changed.
    pub async fn changed(&mut self) -> Vec<Object> {
        loop {
            if let Some(objects) = self.source.poll() {
                return objects;
            }
            tokio::select! {
                Some(()) = self.events.recv() => {
                    // The rest of the burst, until it goes quiet.
                    while let Ok(Some(())) =
                        tokio::time::timeout(DEBOUNCE, self.events.recv()).await
                    {}
                }
                () = tokio::time::sleep(RESCAN_INTERVAL) => {}
            }
        }
    }
}

/// Watches `root` (a directory, recursively) and its parent directory, where a file replaced
/// by a rename, or a root made later, shows; sends a unit on each event that may change what
/// the files hold.
fn watch(root: &Path, events: mpsc::UnboundedSender<()>) -> notify::Result<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Opening a file (reading it, as the source itself does) changes nothing; an error
        // (the queue overflowed) may hide a change.
        let opened = event
            .as_ref()
            .is_ok_and(|e| matches!(e.kind, EventKind::Access(AccessKind::Open(_))));
        if !opened {
            let _ = events.send(());
        }
    })?;
    if root.is_dir() {
        watcher.watch(root, RecursiveMode::Recursive)?;
    }
    if let Some(parent) = root.parent().filter(|p| p.is_dir()) {
        watcher.watch(parent, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

/// The manifest files at `root`: the file itself, or the .yaml/.yml/.json files below a
/// directory (hidden files, such as editors' swap files, are skipped), in a stable order.
/// A file's name without its extension: `flags.json` is `flags`.
fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn manifest_files(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let meta = fs::metadata(root).with_context(|| format!("reading {}", root.display()))?;
    if meta.is_file() {
        return Ok(vec![root.to_owned()]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else if [".yaml", ".yml", ".json"]
                .iter()
                .any(|ext| name.ends_with(ext))
            {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aviary-local-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(objects: &[Object]) -> Vec<String> {
        objects.iter().map(|o| o.key().to_string()).collect()
    }

    #[test]
    fn parses_multi_document_yaml_lists_and_skips_other_kinds() {
        let text = format!(
            "{NS}---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: s, namespace: shop}}\n"
        );
        assert_eq!(
            names(&parse_documents(&text).unwrap()),
            ["Namespace/shop", "Service/shop/s"]
        );
    }

    #[test]
    fn a_flagd_flag_file_stands_for_a_featureflag_named_after_it() {
        let flagd = r#"{
            "$schema": "https://flagd.dev/schema/v0/flags.json",
            "metadata": {"namespace": "shop"},
            "flags": {"new-checkout": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off"}},
            "$evaluators": {}
        }"#;
        let objects = parse_file(flagd, "Checkout.flags").unwrap();
        assert_eq!(names(&objects), ["FeatureFlag/shop/checkout-flags"]);
        let Object::FeatureFlag(flag) = &objects[0] else {
            panic!("{objects:?}")
        };
        let set = flag.flags.as_ref().unwrap();
        assert_eq!(set.keys().collect::<Vec<_>>(), ["new-checkout"]);
        // Without a namespace: default. A second document in the file is named apart.
        let two = "flags: {a: {state: DISABLED, variants: {x: 1}}}
---
flags: {}
";
        assert_eq!(
            names(&parse_file(two, "flags").unwrap()),
            ["FeatureFlag/default/flags", "FeatureFlag/default/flags-1"]
        );
        let err = parse_file(r#"{"metadata": {"namespace": 7}, "flags": {}}"#, "f").unwrap_err();
        assert!(
            format!("{err:#}").contains("must name a namespace"),
            "{err:#}"
        );
    }

    #[test]
    fn broken_documents_are_errors_that_say_where() {
        let err = parse_documents(&format!("{NS}---\nkind: [unclosed\n")).unwrap_err();
        assert!(format!("{err:#}").starts_with("document 2"), "{err:#}");
        let err = parse_documents("metadata: {name: x}\n").unwrap_err();
        assert!(
            format!("{err:#}").contains("apiVersion and kind are required"),
            "{err:#}"
        );
        let err = parse_documents("apiVersion: v1\nkind: Pod\nmetadata: {name: 7}\nspec: 3\n")
            .unwrap_err();
        assert!(format!("{err:#}").starts_with("document 1"), "{err:#}");
    }

    #[test]
    fn nesting_beyond_the_parsers_budget_is_an_error_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
        let err = parse_documents(&deep).unwrap_err();
        assert!(format!("{err:#}").starts_with("document 1"), "{err:#}");
    }

    #[test]
    fn reloads_changes_and_keeps_the_last_good_version_of_a_broken_file() {
        let dir = temp_dir("reload");
        fs::write(dir.join("ns.yaml"), NS).unwrap();
        fs::write(dir.join(".ns.yaml.swp"), "garbage").unwrap();
        let mut source = LocalSource::new(dir.clone());
        assert_eq!(names(&source.poll().unwrap()), ["Namespace/shop"]);
        assert!(source.poll().is_none(), "nothing changed");

        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: shop}\n";
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/svc.yml"), svc).unwrap();
        assert_eq!(
            names(&source.poll().unwrap()),
            ["Namespace/shop", "Service/shop/s"]
        );

        // Broken: the file's last good objects stay.
        fs::write(
            dir.join("sub/svc.yml"),
            "apiVersion: v1\nkind: Service\nmetadata: [\n",
        )
        .unwrap();
        assert!(source.poll().is_none());
        assert_eq!(
            names(&source.objects()),
            ["Namespace/shop", "Service/shop/s"]
        );

        fs::remove_file(dir.join("sub/svc.yml")).unwrap();
        assert_eq!(names(&source.poll().unwrap()), ["Namespace/shop"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_watch_reads_a_save_once_as_it_happens() {
        let dir = temp_dir("watch");
        let file = dir.join("policy.yaml");
        fs::write(&file, NS).unwrap();
        let mut watch = LocalWatch::new(dir.clone());
        assert_eq!(names(&watch.changed().await), ["Namespace/shop"]);

        // An editor's save: a temporary file written in two steps, then renamed over the old
        // one. Read once, whole, long before the rescan would have.
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: shop}\n";
        let tmp = dir.join(".policy.yaml.tmp");
        fs::write(&tmp, NS).unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("---\n{svc}").as_bytes()))
            .unwrap();
        fs::rename(&tmp, &file).unwrap();
        let changed = tokio::time::timeout(RESCAN_INTERVAL / 2, watch.changed())
            .await
            .expect("the change was seen before the rescan");
        assert_eq!(names(&changed), ["Namespace/shop", "Service/shop/s"]);
        let again = tokio::time::timeout(DEBOUNCE * 10, watch.changed()).await;
        assert!(again.is_err(), "the save was read once");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_watched_file_replaced_by_a_rename_is_followed() {
        let dir = temp_dir("watch-file");
        let file = dir.join("policy.yaml");
        let mut watch = LocalWatch::new(file.clone());
        assert_eq!(watch.changed().await, Vec::new(), "not there yet");
        fs::write(dir.join("new.yaml"), NS).unwrap();
        fs::rename(dir.join("new.yaml"), &file).unwrap();
        let changed = tokio::time::timeout(RESCAN_INTERVAL / 2, watch.changed())
            .await
            .expect("the file was seen before the rescan");
        assert_eq!(names(&changed), ["Namespace/shop"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_path_yields_nothing_and_recovers() {
        let dir = temp_dir("missing");
        let file = dir.join("later.yaml");
        let mut source = LocalSource::new(file.clone());
        assert_eq!(source.poll().unwrap(), Vec::new());
        fs::write(&file, NS).unwrap();
        assert_eq!(names(&source.poll().unwrap()), ["Namespace/shop"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
