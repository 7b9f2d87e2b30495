//! `cargo xtask setup|build|lint|test|fuzz|demo|bench`: everything the project needs, from a
//! fresh machine, in one place. Each command does its own set-up first.
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.10.1";
const NIGHTLY: &str = "nightly";
/// The newest cargo-fuzz; it builds on the installed stable toolchain.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The fuzz targets in fuzz/fuzz_targets, each with its seed corpus in fuzz/corpus/<target>.
const FUZZ_TARGETS: &[&str] = &["duration", "annotations", "policy_yaml", "http_request"];
/// The kernels `cargo xtask test --kernel` boots: Debian's generic images (the -cloud ones lack
/// 9p, over which virtme-ng shares the host's root filesystem with the guest), by series.
const KERNELS: &[&str] = &["6.1"];
/// virtme-ng boots a kernel in qemu over the host's own root filesystem.
const VIRTME_NG_VERSION: &str = "1.42";
/// How many times slower than the host the guest runs CPU-bound work under qemu's TCG (about
/// 6 to 7 here): the tests stretch every bound on waiting by it (`aviary_tests::patience`).
const GUEST_SLOWDOWN: u32 = 6;
/// How long each privileged suite may run in the guest. Under qemu's TCG (nested KVM stops
/// the guest with an emulation failure here) the guest runs several times slower than the
/// host; the lifecycle suite's 100k connections alone take more than 10 minutes there.
const GUEST_SUITE_SECONDS: u64 = 30 * 60;
/// The aviary-tests suites that touch no kernel feature (manifests, and the agent's Kubernetes
/// client against the API server fixture): the kernel matrix leaves them to the host's run.
const HOST_ONLY_SUITES: &[&str] = &["deploy", "kubernetes"];
/// How long the guest may take to boot and shut down, beyond its suites.
const GUEST_BOOT_SECONDS: u64 = 5 * 60;
/// How long `cargo xtask test` fuzzes each target, from its seeds: a smoke test that keeps the
/// targets building and the seeds passing.
const FUZZ_SMOKE_SECONDS: u32 = 20;

#[derive(Parser)]
#[command(about = "Aviary's build, test, demo and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs (idempotent): nightly rust-src, bpf-linker, cargo-fuzz,
    /// iproute2.
    Setup,
    /// Build the agent (release).
    Build,
    /// cargo fmt --check and cargo clippy -D warnings, for the host crates and the programs.
    Lint,
    /// Every test: unit tests, then the privileged end-to-end tests (as root), then a short run
    /// of each fuzz target (left out when arguments select tests).
    Test {
        /// Runs the privileged end-to-end suites (only those) inside a VM booted with Debian's
        /// kernel of this series, under qemu, as root with CI=true; installs what is missing.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(KERNELS))]
        kernel: Option<String>,
        /// Extra arguments for cargo test (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzzes each target (or one) for a while, from its seeds and what earlier runs found.
    Fuzz {
        /// One of: duration, annotations, policy_yaml, http_request.
        #[arg(long)]
        target: Option<String>,
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// The demo, in local mode on a node built from network namespaces (as root).
    Demo {
        /// A short run (CI).
        #[arg(long)]
        short: bool,
    },
    /// The benchmark: the data path against direct connections, in one run (as root).
    Bench {
        /// Arguments for the benchmark (e.g. --secs 10).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse().task) {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            cargo(&[
                "build",
                "--release",
                "-p",
                "aviary-agent",
                "-p",
                "aviary-identity",
            ])
        }
        Task::Lint => {
            setup()?;
            cargo(&["fmt", "--all", "--", "--check"])?;
            // The fuzz targets are a workspace of their own.
            cargo(&["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"])?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            // The programs only build for the BPF target, with the nightly toolchain.
            status(Command::new("cargo").args([
                &format!("+{NIGHTLY}"),
                "clippy",
                "-p",
                "aviary-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]))
        }
        Task::Test {
            kernel: Some(kernel),
            args,
        } => {
            setup()?;
            test_in_vm(&kernel, &args)
        }
        Task::Test { kernel: None, args } => {
            setup()?;
            // The end-to-end tests run the workspace's binaries (agent, test pods).
            cargo(&["build", "--bins"])?;
            let mut test = vec!["test"];
            test.extend(args.iter().map(String::as_str));
            cargo(&test)?;
            if args.is_empty() {
                fuzz(FUZZ_TARGETS, FUZZ_SMOKE_SECONDS)?;
            }
            Ok(())
        }
        Task::Fuzz { target, seconds } => {
            setup()?;
            match target {
                None => fuzz(FUZZ_TARGETS, seconds),
                Some(target) if FUZZ_TARGETS.contains(&target.as_str()) => {
                    fuzz(&[&target], seconds)
                }
                Some(target) => bail!(
                    "no fuzz target {target:?}; the targets are {}",
                    FUZZ_TARGETS.join(", ")
                ),
            }
        }
        Task::Demo { short } => {
            setup()?;
            // The release agent, so the latencies the demo prints are the product's.
            cargo(&["build", "--release", "--bins"])?;
            let mut demo = Command::new(target_dir().join("release/aviary-demo"));
            if short {
                demo.arg("--short");
            }
            status(&mut demo)
        }
        Task::Bench { args } => {
            setup()?;
            // The HTTP load generator, the peer proxies measured beside Aviary, and perf for
            // `--perf`.
            ensure_debian_packages(&[
                ("wrk", &["-v"], "wrk"),
                ("/usr/sbin/nginx", &["-v"], "nginx-light"),
                ("/usr/sbin/haproxy", &["-v"], "haproxy"),
                ("/usr/bin/perf", &["--version"], "linux-perf"),
            ])?;
            cargo(&["build", "--release", "--bins"])?;
            // `--only` is for iterating on one section: the policy benchmark is left out.
            if !args
                .iter()
                .any(|a| a == "--only" || a.starts_with("--only="))
            {
                status(&mut Command::new(
                    target_dir().join("release/aviary-policy-bench"),
                ))?;
            }
            status(Command::new(target_dir().join("release/aviary-bench")).args(args))
        }
    }
}

fn setup() -> anyhow::Result<()> {
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()?;
    ensure_iproute2()
}

/// Boots Debian's kernel of `series` under qemu (TCG) with virtme-ng, over the host's root
/// filesystem, and runs each privileged suite (the test executables of aviary-tests) in it, one
/// after another, as root with CI=true, with `args` for each. The guest's output streams to
/// ours; a suite that fails or runs out of time fails the run, after the others have run.
fn test_in_vm(series: &str, args: &[String]) -> anyhow::Result<()> {
    ensure_debian_packages(&[
        ("qemu-system-x86_64", &["--version"], "qemu-system-x86"),
        // virtme-ng's initramfs runs busybox.
        ("busybox", &["true"], "busybox-static"),
    ])?;
    let vng = ensure_virtme_ng()?;
    let kernel = ensure_debian_kernel(series)?;
    // The suites run the workspace's binaries (agent, test pods).
    cargo(&["build", "--bins"])?;
    let suites: Vec<_> = test_executables("aviary-tests")?
        .into_iter()
        .filter(|(name, _)| !HOST_ONLY_SUITES.contains(&name.as_str()))
        .collect();

    let quoted_args: String = args
        .iter()
        .map(|a| format!(" {}", shell_quote(a)))
        .collect();
    // virtme-ng's init leaves the guest at 4096 open files, fewer than the resources suite's
    // connections need; a node's container runtime gives the agent far more.
    let mut script = format!(
        "ulimit -n \"$(cat /proc/sys/fs/nr_open)\"\n\
         export CI=true AVIARY_TEST_SLOWDOWN={GUEST_SLOWDOWN}\n\
         failed=\n"
    );
    for (name, executable) in &suites {
        script.push_str(&format!(
            "echo \"xtask (guest, $(uname -r)): {name}\"\n\
             timeout {GUEST_SUITE_SECONDS} {}{quoted_args} --test-threads=1 \
             || failed=\"$failed {name}\"\n",
            shell_quote(&executable.to_string_lossy()),
        ));
    }
    script.push_str("[ -z \"$failed\" ] || { echo \"xtask (guest): failed:$failed\"; exit 1; }\n");
    // virtme-ng hands the guest its command on the kernel's command line (base64), which x86
    // cuts at 2 KiB: the guest runs a file instead, over the shared filesystem.
    let script_path = target_dir().join(format!("xtask/guest-{series}.sh"));
    std::fs::create_dir_all(script_path.parent().expect("a file in a directory"))?;
    std::fs::write(&script_path, script)
        .with_context(|| format!("writing {}", script_path.display()))?;

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limit = GUEST_BOOT_SECONDS + GUEST_SUITE_SECONDS * suites.len() as u64;
    eprintln!(
        "xtask: running {} suites on {} under qemu (TCG)",
        suites.len(),
        kernel.display()
    );
    status(
        Command::new("timeout")
            .args(["--kill-after=30", &limit.to_string()])
            .arg(&vng)
            .arg("--run")
            .arg(&kernel)
            // Nested KVM stops this guest with an emulation failure; TCG is slower but works.
            .args([
                "--disable-kvm",
                "--memory",
                "2G",
                "--cpus",
                &cpus.to_string(),
            ])
            .args(["--user", "root", "--cwd"])
            .arg(workspace_root())
            .arg("--")
            .arg("bash")
            .arg(&script_path)
            // The guest's console would otherwise read ours.
            .stdin(std::process::Stdio::null()),
    )
    .with_context(|| {
        format!("the privileged suites on Linux {series}; the guest's output is above")
    })
}

/// The test executables cargo builds for `package`, by target name.
fn test_executables(package: &str) -> anyhow::Result<Vec<(String, PathBuf)>> {
    cargo(&["test", "-p", package, "--no-run"])?;
    let messages = output(
        Command::new("cargo")
            .args(["test", "-p", package, "--no-run", "--message-format=json"])
            .current_dir(workspace_root()),
    )?;
    let mut executables = Vec::new();
    for line in messages.lines() {
        let message: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("cargo printed {line:?}, not JSON"))?;
        let is_test_target = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(executable)) = (
            is_test_target,
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            executables.push((name.to_owned(), PathBuf::from(executable)));
        }
    }
    if executables.is_empty() {
        bail!("cargo built no test executable for {package}");
    }
    Ok(executables)
}

/// A word for `sh`, in single quotes.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// virtme-ng, in a virtual environment of its own made with Debian's python3 (pip may not
/// install into the system's python, PEP 668): ~/.cache/aviary/virtme-ng-<version>/bin/vng.
fn ensure_virtme_ng() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let venv = Path::new(&home)
        .join(".cache/aviary")
        .join(format!("virtme-ng-{VIRTME_NG_VERSION}"));
    let vng = venv.join("bin/vng");
    let installed = Command::new(&vng)
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(VIRTME_NG_VERSION));
    if installed {
        return Ok(vng);
    }
    let python = "/usr/bin/python3";
    let has_venv = Command::new(python)
        .args(["-c", "import ensurepip, venv"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_venv {
        if !is_root() {
            bail!("python3 cannot make virtual environments; install python3-venv (as root: apt-get install python3-venv)");
        }
        status(Command::new("apt-get").arg("update"))?;
        apt_get_install(&["python3-venv"])?;
    }
    eprintln!(
        "xtask: installing virtme-ng {VIRTME_NG_VERSION} in {} (it boots test kernels)",
        venv.display()
    );
    // A half-made environment from an interrupted install is made again.
    let _ = std::fs::remove_dir_all(&venv);
    status(Command::new(python).args(["-m", "venv"]).arg(&venv))?;
    status(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
    )?;
    Ok(vng)
}

/// The newest installed Debian kernel image of `series` (e.g. /boot/vmlinuz-6.1.0-57-amd64);
/// if there is none, installs the newest one the archive has.
fn ensure_debian_kernel(series: &str) -> anyhow::Result<PathBuf> {
    if let Some(image) = newest_debian_kernel(series)? {
        return Ok(image);
    }
    if !is_root() {
        bail!("no Debian {series} kernel in /boot; install one (as root: apt-get install linux-image-{series}.0-<abi>-amd64-unsigned)");
    }
    status(Command::new("apt-get").arg("update"))?;
    let pattern = format!(
        "^linux-image-{}\\.0-[0-9]+-amd64-unsigned$",
        series.replace('.', "\\.")
    );
    let found = output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    let package = found
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .max_by_key(|package| debian_kernel_abi(package, series))
        .with_context(|| format!("the Debian archive has no package matching {pattern}"))?;
    eprintln!("xtask: installing {package}");
    apt_get_install(&[package])?;
    newest_debian_kernel(series)?
        .with_context(|| format!("{package} installed no /boot/vmlinuz-{series}.0-*-amd64"))
}

fn newest_debian_kernel(series: &str) -> anyhow::Result<Option<PathBuf>> {
    let mut newest = None;
    for entry in std::fs::read_dir("/boot").context("reading /boot")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(abi) = name
            .strip_prefix("vmlinuz-")
            .and_then(|kernel| debian_kernel_abi(kernel, series))
        {
            if newest.as_ref().is_none_or(|(newest, _)| abi > *newest) {
                newest = Some((abi, Path::new("/boot").join(&name)));
            }
        }
    }
    Ok(newest.map(|(_, image)| image))
}

/// The ABI number of a generic amd64 kernel of `series`: 57 for `6.1.0-57-amd64` and for the
/// package `linux-image-6.1.0-57-amd64-unsigned`.
fn debian_kernel_abi(name: &str, series: &str) -> Option<u32> {
    let name = name.strip_prefix("linux-image-").unwrap_or(name);
    let name = name.strip_suffix("-unsigned").unwrap_or(name);
    name.strip_prefix(&format!("{series}.0-"))?
        .strip_suffix("-amd64")?
        .parse()
        .ok()
}

/// Runs each fuzz target for `seconds`, one after another (libFuzzer, with the address
/// sanitizer, overflow checks and debug assertions, on the nightly toolchain). The inputs a run
/// finds go to fuzz/corpus/<target> under the target directory (the committed seeds stay as
/// they are), and a failing input to fuzz/artifacts/<target> there; a failure fails the run.
fn fuzz(targets: &[&str], seconds: u32) -> anyhow::Result<()> {
    let work = target_dir().join("fuzz");
    for target in targets {
        let corpus = work.join("corpus").join(target);
        let artifacts = work.join("artifacts").join(target);
        for dir in [&corpus, &artifacts] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        status(
            Command::new("cargo")
                .arg(format!("+{NIGHTLY}"))
                .args(["fuzz", "run", "--target-dir"])
                .arg(target_dir())
                .arg(target)
                .arg(&corpus)
                .arg(Path::new("fuzz/corpus").join(target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                // An input that takes this long is a hang, and a failure like a crash.
                .arg("-timeout=10")
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                .arg("-print_final_stats=1"),
        )?;
    }
    Ok(())
}

/// cargo-fuzz, which builds the fuzz targets with the nightly toolchain. The nightly needs no
/// component for it: its standard library ships the sanitizers' runtimes.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let current = Command::new("cargo").args(["fuzz", "--version"]).output();
    if let Ok(out) = current {
        if String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION) {
            return Ok(());
        }
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    status(Command::new("cargo").args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
        "--force",
    ]))
}

fn ensure_nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        eprintln!("xtask: installing the nightly toolchain (the eBPF programs need it)");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly (build-std for bpfel-unknown-none)");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = current {
        if String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (it uses the nightly's LLVM)");
    status(Command::new("cargo").args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
    ]))
}

/// The test harness and the demo build network namespaces with `ip`.
fn ensure_iproute2() -> anyhow::Result<()> {
    ensure_debian_package("ip", &["-V"], "iproute2")
}

/// Installs a Debian package unless `program args` already runs.
fn ensure_debian_package(program: &str, args: &[&str], package: &str) -> anyhow::Result<()> {
    ensure_debian_packages(&[(program, args, package)])
}

/// Installs, in one apt-get run, the Debian packages whose `program args` does not run yet.
///
/// The packages of daemons (nginx, haproxy) start their own services on install; the benchmark
/// starts its own instances and wants none on the host. So the install runs under a
/// `/usr/sbin/policy-rc.d` that denies every start (exit 101, which invoke-rc.d and
/// deb-systemd-invoke obey), unless one is there already, and a service that runs anyway
/// afterwards is stopped.
fn ensure_debian_packages(wanted: &[(&str, &[&str], &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(program, args, _)| Command::new(program).args(*args).output().is_err())
        .map(|&(_, _, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing: {0}; install them (as root: apt-get install {0})",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let policy = Path::new(POLICY_RC_D);
    let ours = !policy.exists();
    if ours {
        std::fs::write(policy, DENY_SERVICE_STARTS)
            .with_context(|| format!("writing {POLICY_RC_D}"))?;
        status(Command::new("chmod").args(["755", POLICY_RC_D]))?;
    }
    let installed =
        status(Command::new("apt-get").arg("update")).and_then(|()| apt_get_install(&missing));
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    installed?;
    for &(service, pidfile) in DAEMONS {
        let package_installed = missing
            .iter()
            .any(|p| *p == service || p.starts_with(&format!("{service}-")));
        if package_installed && running(pidfile) {
            eprintln!("xtask: stopping the {service} service the package started");
            status(Command::new("service").args([service, "stop"]))?;
        }
    }
    Ok(())
}

fn apt_get_install(packages: &[&str]) -> anyhow::Result<()> {
    status(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const DENY_SERVICE_STARTS: &str =
    "#!/bin/sh\n# Written by `cargo xtask bench` for one apt-get run: start no service.\nexit 101\n";
/// The services of the Debian packages the benchmark installs, with their pid files.
const DAEMONS: &[(&str, &str)] = &[("nginx", "/run/nginx.pid"), ("haproxy", "/run/haproxy.pid")];

/// Whether the pid file names a live process.
fn running(pidfile: &str) -> bool {
    std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    status(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(args))
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(workspace_root());
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_kernel_abi_reads_images_and_packages_of_the_series_only() {
        assert_eq!(debian_kernel_abi("6.1.0-57-amd64", "6.1"), Some(57));
        assert_eq!(
            debian_kernel_abi("linux-image-6.1.0-50-amd64-unsigned", "6.1"),
            Some(50)
        );
        assert_eq!(debian_kernel_abi("6.1.0-57-cloud-amd64", "6.1"), None);
        assert_eq!(debian_kernel_abi("6.12.0-1-amd64", "6.1"), None);
        assert_eq!(debian_kernel_abi("6.18.44-fc-v657", "6.1"), None);
    }

    #[test]
    fn shell_quote_keeps_quotes_and_spaces_in_one_word() {
        let out = Command::new("sh")
            .args(["-c", &format!("printf %s {}", shell_quote("it's a test"))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's a test");
    }
}
