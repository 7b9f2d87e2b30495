//! What the programs need of the kernel, probed before anything loads, as `bpftool feature
//! probe` does: each program type, map type and helper the object uses. A kernel that lacks one
//! is refused with one line naming what is missing, not with a verifier log.

use super::explain;
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

/// One piece of the kernel the programs use.
#[derive(Debug, Clone, Copy)]
enum Feature {
    Program(ProgramType),
    Map(MapType),
    /// A helper, called from a program of this type.
    Helper(ProgramType, BpfHelper),
}

/// A piece, by the name a person looks up, and whether only inbound capture needs it.
struct Need {
    name: &'static str,
    feature: Feature,
    inbound_only: bool,
}

const fn need(name: &'static str, feature: Feature) -> Need {
    Need {
        name,
        feature,
        inbound_only: false,
    }
}

const fn inbound(name: &'static str, feature: Feature) -> Need {
    Need {
        name,
        feature,
        inbound_only: true,
    }
}

use Feature::{Helper, Map, Program};
use ProgramType::{CgroupSockAddr, SchedClassifier, SkLookup, SkMsg, SockOps};

/// Everything `aviary-ebpf` uses, kept beside what the programs call (ebpf/aviary-ebpf).
const NEEDS: &[Need] = &[
    need("cgroup_sock_addr programs", Program(CgroupSockAddr)),
    need("sock_ops programs", Program(SockOps)),
    need("sk_msg programs", Program(SkMsg)),
    need("hash maps", Map(MapType::Hash)),
    need("LRU hash maps", Map(MapType::LruHash)),
    need("per-CPU arrays", Map(MapType::PerCpuArray)),
    need("sockmaps", Map(MapType::SockMap)),
    need("sockhashes", Map(MapType::SockHash)),
    need(
        "bpf_get_current_ancestor_cgroup_id in connect programs",
        Helper(
            CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
        ),
    ),
    need(
        "bpf_get_socket_cookie in connect programs",
        Helper(CgroupSockAddr, BpfHelper::BPF_FUNC_get_socket_cookie),
    ),
    need(
        "bpf_sk_release in connect programs",
        Helper(CgroupSockAddr, BpfHelper::BPF_FUNC_sk_release),
    ),
    need(
        "bpf_get_socket_cookie in sock_ops",
        Helper(SockOps, BpfHelper::BPF_FUNC_get_socket_cookie),
    ),
    need(
        "bpf_sock_ops_cb_flags_set",
        Helper(SockOps, BpfHelper::BPF_FUNC_sock_ops_cb_flags_set),
    ),
    need(
        "bpf_sock_hash_update",
        Helper(SockOps, BpfHelper::BPF_FUNC_sock_hash_update),
    ),
    need(
        "bpf_msg_redirect_hash",
        Helper(SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash),
    ),
    inbound("sched_cls (TC) programs", Program(SchedClassifier)),
    inbound("sk_lookup programs", Program(SkLookup)),
    inbound(
        "bpf_skc_lookup_tcp in TC programs",
        Helper(SchedClassifier, BpfHelper::BPF_FUNC_skc_lookup_tcp),
    ),
    inbound(
        "bpf_sk_assign in TC programs",
        Helper(SchedClassifier, BpfHelper::BPF_FUNC_sk_assign),
    ),
    inbound(
        "bpf_sk_assign in sk_lookup programs",
        Helper(SkLookup, BpfHelper::BPF_FUNC_sk_assign),
    ),
];

/// What of the programs' needs this kernel lacks (inbound capture's only when it is on), by
/// name; an error when the kernel could not be asked.
pub fn missing(with_inbound: bool) -> anyhow::Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for need in NEEDS.iter().filter(|n| with_inbound || !n.inbound_only) {
        let step = || format!("probing the kernel for {}", need.name);
        let supported = match need.feature {
            Program(program) => is_program_supported(program).map_err(|e| explain(&step(), &e))?,
            Map(map) => is_map_supported(map).map_err(|e| explain(&step(), &e))?,
            Helper(program, helper) => {
                is_helper_supported(program, helper).map_err(|e| explain(&step(), &e))?
            }
        };
        if !supported {
            missing.push(need.name);
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probing loads programs: as root only, where the agent runs.
    #[test]
    fn this_kernel_has_everything_the_programs_use() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: probing the kernel needs root");
            return;
        }
        assert_eq!(missing(true).unwrap(), Vec::<&str>::new());
    }

    #[test]
    fn inbound_needs_are_asked_for_only_with_inbound_capture() {
        let outbound: Vec<&str> = NEEDS
            .iter()
            .filter(|n| !n.inbound_only)
            .map(|n| n.name)
            .collect();
        assert!(outbound.contains(&"bpf_msg_redirect_hash"));
        assert!(!outbound.iter().any(|n| n.contains("sk_assign")));
    }
}
