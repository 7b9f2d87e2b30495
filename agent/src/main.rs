#![forbid(unsafe_code)]

use std::process::ExitCode;

use aviary_agent::config::{Args, Command, Config, LogFormat, Probe};
use clap::Parser as _;

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(Command::Status { admin }) => return status(admin),
        Some(Command::Uninstall { bpffs, pin_name }) => return uninstall(&bpffs.join(pin_name)),
        Some(Command::Probe(Probe::Ready { health, pod_name })) => {
            return probe_ready(health, pod_name)
        }
        Some(Command::MountBpffs { path }) => {
            return match aviary_agent::ebpf::ensure_bpffs(&path) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("aviary-agent: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
    }
    let cfg = match Config::try_from(args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("aviary-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_tracing(cfg.log_format);
    aviary_agent::supervise::abort_on_panic();
    // A parent may hand down a signal mask that blocks these; the agent must always be able to
    // shut down cleanly (finishing its work) when asked.
    let shutdown = nix::sys::signal::SigSet::from_iter([
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ]);
    if let Err(e) = shutdown.thread_unblock() {
        tracing::warn!(error = %e, "could not unblock SIGTERM and SIGINT");
    }
    // The control plane: watchers, compile, admin, metrics, netlink. One thread is plenty, and
    // leaves the CPUs to the data-plane workers (proxy::workers), which have runtimes of their
    // own; blocking work (the netlink scan, map walks) steps off it (block_in_place,
    // spawn_blocking).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("aviary-control")
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("aviary-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(aviary_agent::run::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the cause and its remedy, no backtrace.
            eprintln!("aviary-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn status(admin: std::net::SocketAddr) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(aviary_agent::admin::status(admin)))
    {
        Ok(summary) => {
            print!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aviary-agent status: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn uninstall(pin_dir: &std::path::Path) -> ExitCode {
    match aviary_agent::ebpf::uninstall(pin_dir) {
        Ok(removed) if removed.is_empty() => {
            println!(
                "nothing to uninstall: no Aviary datapath at {}",
                pin_dir.display()
            );
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            println!(
                "uninstalled Aviary's datapath at {}: {} attachments detached, {} maps and {} policy routing entries removed",
                pin_dir.display(),
                removed.links,
                removed.maps,
                removed.routes
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aviary-agent uninstall: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit 0 or 1, with the reason on one line: the kubelet records an exec probe's output.
fn probe_ready(health: std::net::SocketAddr, pod_name: Option<http::HeaderValue>) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(aviary_agent::admin::probe_ready(health, pod_name.as_ref())))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aviary-agent probe ready: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AVIARY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    // Colours only for a person at a terminal, never in a pod's log.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
