//! Pod cgroups, found the way the kubelet lays them out under its kubepods root.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Levels below the root at which a pod's cgroup may sit: `pod<uid>` (Guaranteed),
/// `burstable/pod<uid>`, and the systemd driver's `kubepods-burstable.slice/...pod<uid>.slice`.
const POD_SEARCH_DEPTH: usize = 3;

/// Fails unless `path` is a directory of a cgroup v2 hierarchy.
pub fn ensure_cgroup2(path: &Path) -> anyhow::Result<()> {
    let stat = nix::sys::statfs::statfs(path).map_err(|e| {
        anyhow::anyhow!(
            "cgroup root {} is not usable ({e}); pass --cgroup-root with the kubelet's pod cgroup \
             directory on the cgroup v2 hierarchy",
            path.display()
        )
    })?;
    if stat.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        anyhow::bail!(
            "cgroup root {} is not on cgroup v2; Aviary needs the unified hierarchy (mount cgroup2, \
             e.g. boot with systemd.unified_cgroup_hierarchy=1) and --cgroup-root pointing into it",
            path.display()
        );
    }
    Ok(())
}

/// The kernel's id of a cgroup: its directory's inode number, as bpf_get_current_cgroup_id and
/// its ancestor variant return it.
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// The pod UID a kubelet cgroup directory belongs to, if it is a pod-level cgroup.
/// cgroupfs driver: `pod<uid>`; systemd driver: `kubepods-<qos>-pod<uid_with_underscores>.slice`.
pub fn pod_uid_of(dir_name: &str) -> Option<String> {
    let uid = if let Some(uid) = dir_name.strip_prefix("pod") {
        uid
    } else {
        let slice = dir_name.strip_suffix(".slice")?;
        let at = slice.rfind("-pod")?;
        &slice[at + "-pod".len()..]
    };
    let uid = uid.replace('_', "-");
    let looks_like_uid = uid.len() >= 8 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    looks_like_uid.then_some(uid)
}

/// Finds pod cgroups under the root by UID, caching what it found.
#[derive(Debug)]
pub struct PodCgroups {
    root: PathBuf,
    found: HashMap<String, PathBuf>,
}

impl PodCgroups {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            found: HashMap::new(),
        }
    }

    /// The cgroup id of the pod with this UID, or None while its cgroup does not exist (the
    /// pod has not started yet, or is gone).
    pub fn id_of(&mut self, uid: &str) -> Option<u64> {
        if let Some(path) = self.found.get(uid) {
            if let Ok(id) = cgroup_id(path) {
                return Some(id);
            }
            self.found.remove(uid);
        }
        if !self.found.contains_key(uid) {
            self.rescan();
        }
        cgroup_id(self.found.get(uid)?).ok()
    }

    fn rescan(&mut self) {
        self.found.clear();
        let mut dirs = vec![(self.root.clone(), 0)];
        while let Some((dir, depth)) = dirs.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = entry.path();
                match entry.file_name().to_str().and_then(pod_uid_of) {
                    Some(uid) => {
                        self.found.insert(uid, path);
                    }
                    None if depth + 1 < POD_SEARCH_DEPTH => dirs.push((path, depth + 1)),
                    None => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1c2d3e-0a1b-4c5d-8e9f-001122334455";

    #[test]
    fn recognises_both_kubelet_drivers() {
        assert_eq!(pod_uid_of(&format!("pod{UID}")).as_deref(), Some(UID));
        let systemd = format!("kubepods-burstable-pod{}.slice", UID.replace('-', "_"));
        assert_eq!(pod_uid_of(&systemd).as_deref(), Some(UID));
        let guaranteed = format!("kubepods-pod{}.slice", UID.replace('-', "_"));
        assert_eq!(pod_uid_of(&guaranteed).as_deref(), Some(UID));
    }

    #[test]
    fn ignores_other_directories() {
        for name in [
            "burstable",
            "besteffort",
            "kubepods-burstable.slice",
            "podman",
            "cri-abc",
        ] {
            assert_eq!(pod_uid_of(name), None, "{name}");
        }
    }

    #[test]
    fn finds_pods_at_every_qos_depth_and_notices_new_ones() {
        let root = std::env::temp_dir().join(format!("aviary-cgroup-test-{}", std::process::id()));
        let guaranteed = root.join(format!("pod{UID}"));
        let burstable_uid = "aaaaaaaa-0000-4000-8000-000000000001";
        let burstable = root.join(format!("burstable/pod{burstable_uid}/container"));
        fs::create_dir_all(&guaranteed).unwrap();
        fs::create_dir_all(&burstable).unwrap();

        let mut pods = PodCgroups::new(root.clone());
        assert_eq!(pods.id_of(UID), Some(cgroup_id(&guaranteed).unwrap()));
        let pod_dir = burstable.parent().unwrap();
        assert_eq!(pods.id_of(burstable_uid), Some(cgroup_id(pod_dir).unwrap()));

        let late = "bbbbbbbb-0000-4000-8000-000000000002";
        assert_eq!(pods.id_of(late), None);
        fs::create_dir_all(root.join(format!("besteffort/pod{late}"))).unwrap();
        assert!(pods.id_of(late).is_some());

        fs::remove_dir_all(&guaranteed).unwrap();
        assert_eq!(pods.id_of(UID), None);
        fs::remove_dir_all(&root).unwrap();
    }
}
