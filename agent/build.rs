//! Builds the eBPF programs (ebpf/aviary-ebpf) with the nightly toolchain and bpf-linker, into
//! OUT_DIR/aviary, which the loader embeds.
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/aviary-ebpf");
    let root = root.to_str().expect("the repository path is UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "aviary-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
