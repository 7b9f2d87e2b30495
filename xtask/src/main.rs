//! `cargo xtask setup|build|lint|test|fuzz|demo|bench`: everything the project needs, from a
//! fresh machine, in one place. Each command does its own set-up first.
#![forbid(unsafe_code)]

mod house;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.10.1";
const NIGHTLY: &str = "nightly";
/// The newest cargo-fuzz; it builds on the installed stable toolchain.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The fuzz targets in fuzz/fuzz_targets, each with its seed corpus in fuzz/corpus/<target>.
const FUZZ_TARGETS: &[&str] = &[
    "duration",
    "annotations",
    "policy_yaml",
    "http_request",
    "flag_set",
];
/// The kernels `cargo xtask test --kernel` boots: Debian's generic images (the -cloud ones lack
/// 9p, over which virtme-ng shares the host's root filesystem with the guest), by series.
const KERNELS: &[&str] = &["6.1"];
/// virtme-ng boots a kernel in qemu over the host's own root filesystem.
const VIRTME_NG_VERSION: &str = "1.42";
/// OpenFeature's Python pieces the flag tests compare with: flagd's reference evaluator (the
/// core that implements the current `fractional`), and the SDK with its OFREP provider, a real
/// OFREP client.
const OPENFEATURE_PACKAGES: &[&str] = &[
    "openfeature-flagd-core==2.0.0",
    "openfeature-sdk==0.10.0",
    "openfeature-provider-ofrep==0.3.0",
];
/// How many times slower than the host the guest runs CPU-bound work under qemu's TCG (about
/// 6 to 7 here): the tests stretch every bound on waiting by it (`aviary_tests::patience`).
const GUEST_SLOWDOWN: u32 = 6;
/// How long each privileged suite may run in the guest. Under qemu's TCG (nested KVM stops
/// the guest with an emulation failure here) the guest runs several times slower than the
/// host; the lifecycle suite's 100k connections alone take more than 10 minutes there.
const GUEST_SUITE_SECONDS: u64 = 30 * 60;
/// The aviary-tests suites that touch no kernel feature (manifests, the agent's Kubernetes
/// client against the API server fixture, and OFREP: plain TCP to the node's address, from the
/// OpenFeature clients the host's run installs): the kernel matrix leaves them to the host's
/// run.
const HOST_ONLY_SUITES: &[&str] = &["deploy", "kubernetes", "ofrep"];
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
    /// Runs `.ci/run` as CI runs it on a new machine (as root): CI=true, in a fresh clone of
    /// HEAD, with xtask's cache in an empty folder and no virtme-ng helpers on PATH.
    FreshCheck {
        /// Keeps the clone and its cache afterwards, for a look at what failed.
        #[arg(long)]
        keep: bool,
    },
    /// The benchmark (as root): policy at scale, then the data path against direct
    /// connections; a full run (no --only) writes docs/benchmarks.md from what it measured.
    Bench {
        /// Arguments for the benchmark (e.g. --secs 10; --only http; --markdown PATH, which
        /// writes the page there instead, or for one section).
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
            // Before the slower checks: it reads the code and builds nothing.
            house::check(Path::new("."))?;
            setup()?;
            cargo(&["fmt", "--all", "--", "--check"])?;
            // The fuzz targets are a workspace of their own.
            cargo(&["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"])?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            // The programs only build for the BPF target, with the nightly toolchain.
            status(tool("cargo").args([
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
            timed("the build", || cargo(&["build", "--bins"]))?;
            // The flag tests' reference evaluator and OFREP client.
            let openfeature = ensure_openfeature()?;
            let mut test = vec!["test"];
            test.extend(args.iter().map(String::as_str));
            timed("the tests", || {
                status(
                    cargo_command()
                        .args(&test)
                        .env("AVIARY_OPENFEATURE_PYTHON", &openfeature),
                )
            })?;
            if args.is_empty() {
                timed("fuzzing", || fuzz(FUZZ_TARGETS, FUZZ_SMOKE_SECONDS))?;
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
            let mut demo = tool(target_dir().join("release/aviary-demo"));
            if short {
                demo.arg("--short");
            }
            status(&mut demo)
        }
        Task::FreshCheck { keep } => fresh_check(keep),
        Task::Bench { args } => bench(&args),
    }
}

/// The page a full `cargo xtask bench` writes, from the workspace's root.
const BENCH_PAGE: &str = "docs/benchmarks.md";

/// Installs what the benchmark needs, builds it, and runs it with `args`. A full run (no
/// `--only`) runs the policy benchmark first and writes [`BENCH_PAGE`] (or the page
/// `--markdown` names) from both; `--only` is for iterating on one section: the policy
/// benchmark is left out, and a page is written only when `--markdown` asks for one.
fn bench(args: &[String]) -> anyhow::Result<()> {
    setup()?;
    // The HTTP load generator, the peer proxies measured beside Aviary, and perf for `--perf`.
    ensure_debian_packages(&[
        ("wrk", &["-v"], "wrk"),
        ("/usr/sbin/nginx", &["-v"], "nginx-light"),
        ("/usr/sbin/haproxy", &["-v"], "haproxy"),
        ("/usr/bin/perf", &["--version"], "linux-perf"),
    ])?;
    cargo(&["build", "--release", "--bins"])?;
    let mut bench = tool(target_dir().join("release/aviary-bench"));
    bench.args(args);
    if !has_flag(args, "--only") {
        // The policy benchmark's section, which the page takes in after the goals.
        let policy = target_dir().join("bench/policy.md");
        std::fs::create_dir_all(target_dir().join("bench"))?;
        status(
            tool(target_dir().join("release/aviary-policy-bench"))
                .arg("--markdown")
                .arg(&policy),
        )?;
        bench.arg("--policy-markdown").arg(&policy);
        if !has_flag(args, "--markdown") {
            bench
                .arg("--markdown")
                .arg(workspace_root().join(BENCH_PAGE));
        }
    }
    bench.arg("--invoked-as").arg(bench_command(args));
    status(&mut bench)
}

/// Whether `args` give `flag`, as `--flag value` or `--flag=value`.
fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter()
        .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

/// The command line the benchmark's page shows: `cargo xtask bench` and `args`, each quoted
/// only where a shell needs it.
fn bench_command(args: &[String]) -> String {
    let plain = |a: &str| {
        !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.,:=/+".contains(c))
    };
    std::iter::once("cargo xtask bench".to_owned())
        .chain(
            args.iter()
                .map(|a| if plain(a) { a.clone() } else { shell_quote(a) }),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where xtask keeps the tools it installs for itself (virtme-ng's environment):
/// `AVIARY_CACHE_DIR`, or ~/.cache/aviary. `cargo xtask fresh-check` points it at an empty
/// folder.
fn cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(CACHE_DIR_VAR) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("neither AVIARY_CACHE_DIR nor HOME is set")?;
    Ok(Path::new(&home).join(".cache/aviary"))
}

const CACHE_DIR_VAR: &str = "AVIARY_CACHE_DIR";

/// Cargo's own bin folder, where `cargo install` puts bpf-linker (which rustc starts by name
/// when it links the programs) and cargo-fuzz: `CARGO_HOME`/bin, or ~/.cargo/bin.
fn cargo_bin() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// virtme-ng's virtual environment; its `bin/` holds `vng` and the helpers `vng` starts by
/// name (`virtme-run`, `virtme-ng-init`).
fn virtme_ng_env() -> anyhow::Result<PathBuf> {
    Ok(cache_dir()?.join(format!("virtme-ng-{VIRTME_NG_VERSION}")))
}

/// The `PATH` every tool xtask starts runs with: the folders of the tools xtask installs
/// itself first (cargo's bin, virtme-ng's environment), then `inherited`. Nothing xtask starts
/// may depend on a tool that only an install by hand put on the caller's `PATH`.
fn tool_path(own: &[PathBuf], inherited: Option<OsString>) -> anyhow::Result<OsString> {
    let inherited = inherited.unwrap_or_default();
    let rest = std::env::split_paths(&inherited)
        .filter(|dir| !dir.as_os_str().is_empty() && !own.contains(dir));
    let dirs: Vec<PathBuf> = own.iter().cloned().chain(rest).collect();
    std::env::join_paths(dirs).context("a folder of PATH has a ':' in its name")
}

/// A command for an external tool, with the tool environment of [`tool_path`].
fn tool(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut own: Vec<PathBuf> = cargo_bin().into_iter().collect();
    own.extend(virtme_ng_env().ok().map(|env| env.join("bin")));
    let mut command = Command::new(program);
    match tool_path(&own, std::env::var_os("PATH")) {
        Ok(path) => {
            command.env("PATH", path);
        }
        Err(e) => eprintln!("xtask: {e:#}; tools start with the PATH as it is"),
    }
    command
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
    let kernel = ensure_debian_kernel(series)?;
    let vng = ensure_virtme_ng(&kernel)?;
    // The suites run the workspace's binaries (agent, test pods).
    cargo(&["build", "--bins"])?;
    let suites: Vec<_> = test_executables("aviary-tests")?
        .into_iter()
        .filter(|(name, _)| !HOST_ONLY_SUITES.contains(&name.as_str()))
        .collect();
    let script = guest_script(&suites, args);
    // virtme-ng hands the guest its command on the kernel's command line (base64), which x86
    // cuts at 2 KiB: the guest runs a file instead, over the shared filesystem.
    let script_path = target_dir().join(format!("xtask/guest-{series}.sh"));
    std::fs::create_dir_all(script_path.parent().expect("a file in a directory"))?;
    std::fs::write(&script_path, script)
        .with_context(|| format!("writing {}", script_path.display()))?;

    let limit = GUEST_BOOT_SECONDS + GUEST_SUITE_SECONDS * suites.len() as u64;
    eprintln!(
        "xtask: running {} suites on {} under qemu (TCG)",
        suites.len(),
        kernel.display()
    );
    let mut guest = guest(&vng, &kernel, limit);
    guest.arg("bash").arg(&script_path);
    timed(&format!("the suites on Linux {series}"), || {
        relayed(&mut guest)
    })
    .with_context(|| {
        format!("the privileged suites on Linux {series}; the guest's output is above")
    })
}

/// The script the guest runs: each suite in turn, as root with CI=true, timed, with `args`;
/// it fails if one failed, after all have run.
fn guest_script(suites: &[(String, PathBuf)], args: &[String]) -> String {
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
    for (name, executable) in suites {
        script.push_str(&format!(
            "echo \"xtask (guest, $(uname -r)): {name}\"\n\
             start=$(date +%s)\n\
             timeout {GUEST_SUITE_SECONDS} {}{quoted_args} --test-threads=1 \
             || failed=\"$failed {name}\"\n\
             echo \"xtask (guest): {name} took $(( $(date +%s) - start )) s\"\n",
            shell_quote(&executable.to_string_lossy()),
        ));
    }
    script.push_str("[ -z \"$failed\" ] || { echo \"xtask (guest): failed:$failed\"; exit 1; }\n");
    script
}

/// A guest of `kernel` under qemu (TCG), over the host's root filesystem, killed after
/// `seconds`; its command comes after (a `--` is there already).
fn guest(vng: &Path, kernel: &Path, seconds: u64) -> Command {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut command = tool("timeout");
    command
        .args(["--kill-after=30", &seconds.to_string()])
        .arg(vng)
        .arg("--run")
        .arg(kernel)
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
        // The guest's console would otherwise read ours.
        .stdin(std::process::Stdio::null());
    command
}

/// `.ci/run` in a fresh clone of HEAD, as CI=true, with [`cache_dir`] an empty folder and the
/// folders that hold virtme-ng's helpers taken off PATH, as on a new machine (the Debian
/// packages xtask installs stay, as the machine has them).
fn fresh_check(keep: bool) -> anyhow::Result<()> {
    let dirty = output(tool("git").args(["status", "--porcelain", "--untracked-files=no"]))?;
    if !dirty.trim().is_empty() {
        eprintln!("xtask: the check runs HEAD; the uncommitted changes are not in it");
    }
    let scratch = std::env::temp_dir().join(format!("aviary-fresh-check-{}", std::process::id()));
    let (clone, cache) = (scratch.join("aviary"), scratch.join("cache"));
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    status(
        tool("git")
            .args(["clone", "--quiet"])
            .arg(workspace_root())
            .arg(&clone),
    )?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::env::split_paths(&path).filter(|dir| !dir.join("virtme-run").exists()),
    )?;
    let mut ci = Command::new("bash");
    ci.arg(".ci/run")
        .current_dir(&clone)
        .env("PATH", path)
        .env("CI", "true")
        .env(CACHE_DIR_VAR, &cache)
        .stdin(std::process::Stdio::null());
    // What `cargo xtask` itself runs with would steer the clone's cargo.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if (name.starts_with("CARGO") && name != "CARGO_HOME")
            || name.starts_with("RUSTUP_TOOLCHAIN")
        {
            ci.env_remove(&*name);
        }
    }
    eprintln!(
        "xtask: running .ci/run in {} with an empty cache {}",
        clone.display(),
        cache.display()
    );
    let start = Instant::now();
    let ran = ci.status().context("running bash .ci/run");
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    if keep {
        eprintln!("xtask: kept {}", scratch.display());
    } else {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    match ran? {
        ran if ran.success() => {
            eprintln!("xtask: fresh-machine check passed in {minutes:.1} min");
            Ok(())
        }
        ran => bail!("fresh-machine check failed after {minutes:.1} min ({ran})"),
    }
}

/// Runs `stage`, and says how long it took (CI's log is read for these lines).
fn timed<T>(stage: &str, run: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    let result = run();
    let verdict = if result.is_ok() { "passed" } else { "failed" };
    eprintln!(
        "xtask: {stage} {verdict} in {} s",
        start.elapsed().as_secs()
    );
    result
}

/// The test executables cargo builds for `package`, by target name.
fn test_executables(package: &str) -> anyhow::Result<Vec<(String, PathBuf)>> {
    cargo(&["test", "-p", package, "--no-run"])?;
    let messages = output(
        tool("cargo")
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
/// install into the system's python, PEP 668): [`virtme_ng_env`]`/bin/vng`. Once installed,
/// it must boot `kernel` and run a command there before anything relies on it (`vng` starts
/// its helpers by name, which a version check does not exercise); a marker in the environment
/// records that it did.
fn ensure_virtme_ng(kernel: &Path) -> anyhow::Result<PathBuf> {
    let venv = virtme_ng_env()?;
    let vng = venv.join("bin/vng");
    let installed = tool(&vng)
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(VIRTME_NG_VERSION));
    if !installed {
        install_virtme_ng(&venv)?;
    }
    let kernel_name = kernel.file_name().context("a kernel image's path")?;
    let booted = venv.join(format!("booted-{}", kernel_name.to_string_lossy()));
    if booted.exists() {
        return Ok(vng);
    }
    eprintln!(
        "xtask: checking that virtme-ng boots {} and runs a command there",
        kernel.display()
    );
    let said = output(guest(&vng, kernel, GUEST_BOOT_SECONDS).args(["echo", GUEST_HELLO]))
        .with_context(|| format!("virtme-ng in {} could not start a guest", venv.display()))?;
    if !said.contains(GUEST_HELLO) {
        bail!(
            "virtme-ng in {} booted {} but the guest's command did not run; it printed:\n{said}",
            venv.display(),
            kernel.display()
        );
    }
    std::fs::write(&booted, "")?;
    Ok(vng)
}

/// What the boot check's guest prints.
const GUEST_HELLO: &str = "aviary: the guest runs commands";

fn install_virtme_ng(venv: &Path) -> anyhow::Result<()> {
    eprintln!(
        "xtask: installing virtme-ng {VIRTME_NG_VERSION} in {} (it boots test kernels)",
        venv.display()
    );
    python_env(venv, &[&format!("virtme-ng=={VIRTME_NG_VERSION}")])
}

/// The Python interpreter of [`OPENFEATURE_PACKAGES`]' environment, installed if it is not, or
/// not with these versions (its marker lists what it holds).
fn ensure_openfeature() -> anyhow::Result<PathBuf> {
    let venv = cache_dir()?.join("openfeature");
    let marker = venv.join("aviary-packages");
    let wanted = OPENFEATURE_PACKAGES.join("\n");
    if std::fs::read_to_string(&marker).is_ok_and(|held| held == wanted) {
        return Ok(venv.join("bin/python"));
    }
    eprintln!(
        "xtask: installing {} in {} (the flag tests compare with them)",
        OPENFEATURE_PACKAGES.join(", "),
        venv.display()
    );
    python_env(&venv, OPENFEATURE_PACKAGES)?;
    std::fs::write(&marker, wanted)?;
    Ok(venv.join("bin/python"))
}

/// A virtual environment at `venv` made with Debian's python3 (pip may not install into the
/// system's python, PEP 668), holding `packages`.
fn python_env(venv: &Path, packages: &[&str]) -> anyhow::Result<()> {
    let python = "/usr/bin/python3";
    let has_venv = tool(python)
        .args(["-c", "import ensurepip, venv"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_venv {
        if !is_root() {
            bail!("python3 cannot make virtual environments; install python3-venv (as root: apt-get install python3-venv)");
        }
        status(tool("apt-get").arg("update"))?;
        apt_get_install(&["python3-venv"])?;
    }
    // A half-made environment from an interrupted install is made again.
    let _ = std::fs::remove_dir_all(venv);
    status(tool(python).args(["-m", "venv"]).arg(venv))?;
    status(
        tool(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(packages),
    )
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
    status(tool("apt-get").arg("update"))?;
    let pattern = format!(
        "^linux-image-{}\\.0-[0-9]+-amd64-unsigned$",
        series.replace('.', "\\.")
    );
    let found = output(tool("apt-cache").args(["search", "--names-only", &pattern]))?;
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
            tool("cargo")
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
    let current = tool("cargo").args(["fuzz", "--version"]).output();
    if let Ok(out) = current {
        if String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION) {
            return Ok(());
        }
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    status(tool("cargo").args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
        "--force",
    ]))
}

fn ensure_nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output(tool("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        eprintln!("xtask: installing the nightly toolchain (the eBPF programs need it)");
        status(tool("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    }
    let installed =
        output(tool("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly (build-std for bpfel-unknown-none)");
        status(tool("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let current = tool("bpf-linker").arg("--version").output();
    if let Ok(out) = current {
        if String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (it uses the nightly's LLVM)");
    status(tool("cargo").args([
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
        .filter(|(program, args, _)| tool(program).args(*args).output().is_err())
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
        status(tool("chmod").args(["755", POLICY_RC_D]))?;
    }
    let installed = status(tool("apt-get").arg("update")).and_then(|()| apt_get_install(&missing));
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
            status(tool("service").args([service, "stop"]))?;
        }
    }
    Ok(())
}

fn apt_get_install(packages: &[&str]) -> anyhow::Result<()> {
    status(
        tool("apt-get")
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
    output(tool("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
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
    status(cargo_command().args(args))
}

/// The cargo that runs xtask, as a tool.
fn cargo_command() -> Command {
    tool(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(workspace_root());
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` with its output passed on through pipes, line by line as it comes: the guest's
/// console reopens its standard output, and when that is a file (`cargo xtask test --kernel 6.1
/// > log`) it would truncate it, losing what came before.
fn relayed(cmd: &mut Command) -> anyhow::Result<()> {
    use std::io::Write as _;
    cmd.current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    let pass_on = |from: Box<dyn std::io::Read + Send>, to: fn() -> Box<dyn std::io::Write>| {
        std::thread::spawn(move || {
            let mut from = std::io::BufReader::new(from);
            let mut line = Vec::new();
            while std::io::BufRead::read_until(&mut from, b'\n', &mut line).is_ok_and(|n| n > 0) {
                let mut to = to();
                let _ = to.write_all(&line).and_then(|()| to.flush());
                line.clear();
            }
        })
    };
    let out = child.stdout.take().context("the child's stdout")?;
    let err = child.stderr.take().context("the child's stderr")?;
    let threads = [
        pass_on(Box::new(out), || Box::new(std::io::stdout())),
        pass_on(Box::new(err), || Box::new(std::io::stderr())),
    ];
    let status = child
        .wait()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    for thread in threads {
        let _ = thread.join();
    }
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
    fn xtasks_own_tool_folders_come_first_on_path_once() {
        let own = [PathBuf::from("/c/.cargo/bin"), PathBuf::from("/c/venv/bin")];
        let path = tool_path(&own, Some("/usr/bin:/c/venv/bin:/bin".into())).unwrap();
        assert_eq!(path, "/c/.cargo/bin:/c/venv/bin:/usr/bin:/bin");
        assert_eq!(tool_path(&own, None).unwrap(), "/c/.cargo/bin:/c/venv/bin");
    }

    /// The PATH a command starts with, folder by folder.
    fn path_of(command: &Command) -> Vec<PathBuf> {
        let (_, path) = command
            .get_envs()
            .find(|(name, _)| *name == "PATH")
            .expect("PATH is set");
        std::env::split_paths(path.expect("PATH is not removed")).collect()
    }

    #[test]
    fn every_external_tool_starts_with_the_folders_of_what_xtask_installs() {
        let own = [cargo_bin().unwrap(), virtme_ng_env().unwrap().join("bin")];
        // vng starts virtme-run by name; rustc starts bpf-linker by name; cargo finds
        // cargo-fuzz; the others are Debian's.
        let vng = virtme_ng_env().unwrap().join("bin/vng");
        let kernel = Path::new("/boot/vmlinuz-6.1.0-57-amd64");
        let commands = [
            guest(&vng, kernel, 60),
            tool("cargo"),
            tool("bpf-linker"),
            tool("rustup"),
            tool("/usr/bin/python3"),
            tool("apt-get"),
            tool("git"),
        ];
        for command in commands {
            assert_eq!(path_of(&command)[..2], own, "{command:?}");
        }
    }

    #[test]
    fn the_guest_runs_the_suite_command_after_its_own_options() {
        let vng = Path::new("/cache/virtme-ng-1.42/bin/vng");
        let mut command = guest(vng, Path::new("/boot/vmlinuz-6.1.0-57-amd64"), 60);
        command.args(["echo", GUEST_HELLO]);
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(command.get_program(), "timeout");
        assert!(args.contains(&"--disable-kvm".into()), "{args:?}");
        let dashes = args.iter().position(|a| a == "--").unwrap();
        assert_eq!(args[dashes + 1..], ["echo", GUEST_HELLO]);
        assert_eq!(args[2], "/cache/virtme-ng-1.42/bin/vng");
    }

    #[test]
    fn the_guest_script_times_each_suite_and_fails_when_one_did() {
        let suites = [
            ("mesh".to_owned(), PathBuf::from("/t/mesh-1")),
            ("upgrade".to_owned(), PathBuf::from("/t/upgrade-2")),
        ];
        let script = guest_script(&suites, &["pods_on".to_owned()]);
        assert!(
            script.contains("'/t/mesh-1' 'pods_on' --test-threads=1"),
            "{script}"
        );
        assert!(script.contains("xtask (guest): upgrade took"), "{script}");
        assert!(script.contains("AVIARY_TEST_SLOWDOWN="), "{script}");
        assert!(script.ends_with("exit 1; }\n"), "{script}");
    }

    #[test]
    fn shell_quote_keeps_quotes_and_spaces_in_one_word() {
        let out = Command::new("sh")
            .args(["-c", &format!("printf %s {}", shell_quote("it's a test"))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's a test");
    }

    #[test]
    fn a_full_bench_is_one_without_only_and_its_page_shows_how_it_ran() {
        let args = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert!(has_flag(
            &args(&["--secs", "5", "--only", "http"]),
            "--only"
        ));
        assert!(has_flag(&args(&["--only=l4"]), "--only"));
        assert!(!has_flag(&args(&["--secs", "5", "--perf", "3"]), "--only"));
        assert!(!has_flag(&args(&["--onlyx"]), "--only"));
        assert_eq!(
            bench_command(&args(&["--secs", "5", "--agent-args", "--workers 1"])),
            "cargo xtask bench --secs 5 --agent-args '--workers 1'"
        );
    }
}
