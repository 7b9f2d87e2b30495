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

/// The kubelet's pod root under a cgroup v2 mount, by cgroup driver: the systemd driver's
/// slice (the default with cgroup v2) first, then the cgroupfs driver's directory.
const POD_ROOTS: [(&str, &str); 2] = [("kubepods.slice", "systemd"), ("kubepods", "cgroupfs")];

/// The cgroup v2 mount points in `mountinfo` (`/proc/self/mountinfo`), the visible one first: a
/// later mount on the same path hides an earlier one (a DaemonSet's host mount over the
/// container's own cgroup view, say).
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            // Fields: id parent major:minor root mount-point options... - fstype source options
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?;
            (after.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    mounts.reverse();
    mounts
}

/// Where the kubelet keeps its pods' cgroups, and its cgroup driver: `kubepods.slice` or
/// `kubepods` under a cgroup v2 mount of `mountinfo`, whichever `is_dir` finds first.
pub fn find_pod_root(
    mountinfo: &str,
    is_dir: impl Fn(&Path) -> bool,
) -> anyhow::Result<(PathBuf, &'static str)> {
    let mounts = cgroup2_mounts(mountinfo);
    if mounts.is_empty() {
        anyhow::bail!(
            "no cgroup v2 hierarchy is mounted; Aviary needs the unified hierarchy (mount cgroup2, \
             e.g. boot with systemd.unified_cgroup_hierarchy=1)"
        );
    }
    mounts
        .iter()
        .flat_map(|mount| POD_ROOTS.map(|(dir, driver)| (mount.join(dir), driver)))
        .find(|(root, _)| is_dir(root))
        .ok_or_else(|| {
            let looked: Vec<String> = mounts.iter().map(|m| m.display().to_string()).collect();
            anyhow::anyhow!(
                "no kubelet pod cgroups found: looked for kubepods.slice (systemd driver) and \
                 kubepods (cgroupfs driver) under the cgroup v2 mounts {}; mount the host's \
                 cgroup v2 hierarchy into the agent, or pass --cgroup-root",
                looked.join(", ")
            )
        })
}

/// The pod root this node's agent attaches to: `configured` (`--cgroup-root`), else the one
/// found under this process's cgroup v2 mounts.
pub fn pod_root(configured: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(root) = configured {
        return Ok(root.to_owned());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| anyhow::anyhow!("reading /proc/self/mountinfo to find cgroup v2: {e}"))?;
    let (root, driver) = find_pod_root(&mountinfo, Path::is_dir)?;
    tracing::info!(root = %root.display(), driver, "found the kubelet's pod cgroups");
    Ok(root)
}

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

    const CGROUPFS: &str =
        "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:4 - cgroup2 cgroup2 rw\n\
         31 1 8:1 / / rw - ext4 /dev/vda rw\n";
    /// A DaemonSet's container: its own cgroup view, and the host's mounted over it.
    const CONTAINER: &str = "40 30 0:50 / /sys/fs/cgroup ro - cgroup2 cgroup ro\n\
         41 30 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
    /// cgroup v1 with the unified hierarchy beside it (this project's CI machine).
    const HYBRID: &str = "24 30 0:22 / /sys/fs/cgroup/unified rw shared:7 - cgroup2 cgroup2 rw\n\
         25 30 0:23 / /sys/fs/cgroup/cpu rw shared:8 - cgroup cgroup rw,cpu\n";

    fn only(dirs: &'static [&'static str]) -> impl Fn(&Path) -> bool {
        move |path| dirs.iter().any(|d| path == Path::new(d))
    }

    #[test]
    fn the_cgroup2_mounts_are_found_wherever_they_are_the_visible_one_first() {
        assert_eq!(cgroup2_mounts(CGROUPFS), [PathBuf::from("/sys/fs/cgroup")]);
        assert_eq!(
            cgroup2_mounts(HYBRID),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(cgroup2_mounts(CONTAINER).len(), 2);
        assert!(cgroup2_mounts("31 1 8:1 / / rw - ext4 /dev/vda rw\n").is_empty());
    }

    #[test]
    fn the_pod_root_is_found_for_either_driver_and_any_mount() {
        let systemd = only(&["/sys/fs/cgroup/kubepods.slice"]);
        assert_eq!(
            find_pod_root(CGROUPFS, systemd).unwrap(),
            (PathBuf::from("/sys/fs/cgroup/kubepods.slice"), "systemd")
        );
        let cgroupfs = only(&["/sys/fs/cgroup/kubepods"]);
        assert_eq!(
            find_pod_root(CONTAINER, cgroupfs).unwrap(),
            (PathBuf::from("/sys/fs/cgroup/kubepods"), "cgroupfs")
        );
        let hybrid = only(&["/sys/fs/cgroup/unified/kubepods"]);
        assert_eq!(
            find_pod_root(HYBRID, hybrid).unwrap().0,
            PathBuf::from("/sys/fs/cgroup/unified/kubepods")
        );
    }

    #[test]
    fn no_pod_root_or_no_cgroup2_is_one_line_with_its_remedy() {
        let err = find_pod_root(CGROUPFS, |_| false).unwrap_err().to_string();
        assert!(
            err.contains("kubepods.slice") && err.contains("--cgroup-root"),
            "{err}"
        );
        assert!(err.contains("/sys/fs/cgroup"), "{err}");
        let err = find_pod_root("31 1 8:1 / / rw - ext4 /dev/vda rw\n", |_| true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no cgroup v2"), "{err}");
        assert!(!err.contains('\n'));
    }

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
