//! The processes of the test harness's pods.
//!
//! - `exec`: joins a cgroup, then a network namespace, then runs a program: a container's
//!   process, placed the way a container runtime places it.
//! - `serve`: a backend that greets each TCP connection with its name and the addresses it
//!   sees, then echoes; it also echoes UDP datagrams.
//! - `hold-serve`: greets like `serve`, then holds each connection silent until its peer closes
//!   it, however many there are, on one thread.
//! - `connect`, `session`, `udp`, `hold`: clients.
//! - `http-serve`, `http-load`, `http-get`, `reconnect`: an HTTP/1.1 backend and its clients.
//! - `grpc-serve`, `grpc-unary`, `grpc-stream`: a gRPC backend and its client
//!   (`aviary_tests::grpc`).
//! - `sniff`: what crosses an interface, as a packet socket sees it.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    ffi::CString,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aviary_tests::grpc::{self, EchoRequest};
use clap::{Parser, Subcommand};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
struct Cli {
    /// The load and stream commands end when their standard input closes, if that comes
    /// before their `--secs`: a test's load then outlasts whatever the test does meanwhile
    /// (an upgrade, on a machine of any speed), and still ends by itself.
    #[arg(long, global = true)]
    until_stdin_closes: bool,
    #[command(subcommand)]
    command: Command,
}

/// Set once standard input closes, under `--until-stdin-closes`.
static STDIN_CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether a load or a stream goes on: before its deadline, and before it is told to stop.
fn running(deadline: Instant) -> bool {
    Instant::now() < deadline && !STDIN_CLOSED.load(Ordering::Acquire)
}

#[derive(Subcommand)]
enum Command {
    /// Watch the frames crossing `interface` (of this network namespace), both ways, for
    /// `secs`. Prints "sniffing" once it watches, then how many IPv4 TCP segments crossed
    /// ("segments <n>"), how many of them had `port` at either end ("port <n>") and carried TLS
    /// records ("tls <n>": payloads opening with a record header), and how many payloads held
    /// `needle` ("needle <n>").
    Sniff {
        #[arg(long)]
        interface: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        needle: String,
        #[arg(long)]
        secs: f64,
    },
    /// Join `cgroup` (a cgroup v2 directory), then `netns` (a namespace file), then exec.
    Exec {
        #[arg(long)]
        netns: PathBuf,
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Greet and echo on TCP `port`; echo datagrams on UDP `udp_port`.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        udp_port: Option<u16>,
    },
    /// Open `count` connections (`parallel` at a time); on each, read the greeting, send a
    /// line and check its echo. Prints the first greeting, then "ok <count>", then how many
    /// greetings named each peer address ("peer <ip> <n>") and each backend ("name <name> <n>").
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        parallel: u64,
    },
    /// Greet each TCP connection on `port` like `serve`, then say nothing more and close it when
    /// the peer closes: many idle connections on one thread.
    HoldServe {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    /// Open `count` connections (`parallel` at a time), read each one's greeting, then hold them
    /// all open and idle for `secs` and exit. Prints the first greeting, then "open <count>"
    /// once every connection is open.
    Hold {
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        #[arg(long)]
        secs: f64,
    },
    /// One connection: print the greeting, then echo each stdin line through it.
    Session { addr: SocketAddr },
    /// Send one datagram and print the reply.
    Udp { addr: SocketAddr },
    /// An HTTP/1.1 backend: answers 200 naming itself in `x-backend`; counts the mirrored
    /// requests it gets (`x-aviary-mirror`) by method, and reports them at GET /stats.
    HttpServe {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    /// `count` requests (or as many as fit in `secs`) on each of `connections` keep-alive
    /// HTTP/1.1 connections, reconnecting after a `connection: close` response; prints how many
    /// got each status ("status <code> <n>") and each backend ("backend <name> <n>"), the peers
    /// the backends saw ("peer <ip> <n>"), the backend of the last one ("last <name>"), how
    /// many requests failed ("errors <n>", and "error <why>" for each), the connections opened
    /// ("connections <n>") and the latency percentiles ("latency p50_us <n>", "latency p99_us
    /// <n>").
    HttpLoad {
        addr: SocketAddr,
        #[arg(long, default_value_t = u32::MAX)]
        count: u32,
        #[arg(long)]
        secs: Option<f64>,
        #[arg(long, default_value_t = 1)]
        connections: u32,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// One GET for each user `0..users` on one keep-alive connection, each carrying
    /// `x-user-id: user-<n>` and every `--header` ("name: value"); prints "user <n> <backend>
    /// <flags>" for each, `flags` being the `x-aviary-flag-` headers the backend saw (which
    /// `http-serve` echoes in `x-seen-flags`), or "-".
    HttpUsers {
        addr: SocketAddr,
        #[arg(long)]
        users: u32,
        #[arg(long)]
        header: Vec<String>,
    },
    /// Asks the OFREP endpoint at `addr` for the flag `flag` once for each user `0..users`
    /// (targeting key `user-<n>`, as `http-users` sends it), on one keep-alive connection;
    /// prints "user <n> <variant>" for each ("-" without one).
    OfrepUsers {
        addr: SocketAddr,
        #[arg(long)]
        flag: String,
        #[arg(long)]
        users: u32,
    },
    /// One HTTP/1.1 GET; prints the response body.
    HttpGet { addr: SocketAddr, path: String },
    /// `count` GETs with `Connection: close`, each on a new connection from the same source
    /// `port`: the server closes first and holds a TIME_WAIT socket the next connect must
    /// recycle. Prints how many got each status ("status <code> <n>").
    Reconnect {
        addr: SocketAddr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: u32,
    },
    /// A gRPC backend (`aviary_tests::grpc`) on `port`, naming itself in its replies.
    GrpcServe {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    /// `count` unary calls on one HTTP/2 connection, each asking to end with `code` (0: OK, an
    /// echo of `text`). Prints how many ended with each status ("status <code> <n>"), the
    /// backends that answered ("backend <name> <n>"), and each failure ("failed <code>
    /// <message>").
    GrpcUnary {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Calls until this many seconds passed instead (on the same channel, which reconnects
        /// as it must).
        #[arg(long)]
        secs: Option<f64>,
        #[arg(long, default_value_t = 0)]
        code: i32,
        #[arg(long, default_value = "echo")]
        text: String,
    },
    /// One server-streaming call asking for `replies` replies and to end with `code`. Prints
    /// how many replies came ("replies <n>", after checking they came in order), their backend
    /// ("backend <name> <n>"), the status ("status <code> 1"), and a failure ("failed <code>
    /// <message>").
    GrpcStream {
        addr: SocketAddr,
        #[arg(long)]
        replies: u32,
        #[arg(long, default_value_t = 0)]
        code: i32,
        #[arg(long, default_value = "echo")]
        text: String,
    },
    /// One long-lived connection carrying a byte pattern to an echoing backend (`serve`, or with
    /// `--upgrade` an HTTP upgrade to `http-serve`) and checking every byte that comes back, for
    /// `secs` (or until its standard input closes); then a half-close, and the rest of the echo. Prints "streaming" once the stream is
    /// established, then "stream <bytes> ok"; fails on the first byte out of place, or a
    /// connection that ends early.
    EchoStream {
        addr: SocketAddr,
        /// The most it streams for.
        #[arg(long)]
        secs: f64,
        #[arg(long)]
        upgrade: bool,
    },
    /// Load for the benchmark; each mode runs for `secs` and prints one line of results.
    Load {
        #[command(subcommand)]
        mode: Load,
    },
}

#[derive(Subcommand)]
enum Load {
    /// `conns` keep-alive connections, each sending 64-byte requests and awaiting the echo.
    Rr {
        addr: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        secs: f64,
    },
    /// `parallel` workers, each opening a new connection per request.
    Crr {
        addr: SocketAddr,
        #[arg(long)]
        parallel: usize,
        #[arg(long)]
        secs: f64,
    },
    /// One connection streaming 64 KiB writes while reading the echo.
    Stream {
        addr: SocketAddr,
        #[arg(long)]
        secs: f64,
    },
    /// connect() alone, timed, to a listener of this process on loopback: what the connect
    /// programs add to a connection they do not capture.
    ConnectLocal {
        #[arg(long)]
        count: u32,
    },
}

fn main() {
    let cli = Cli::parse();
    if cli.until_stdin_closes {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            STDIN_CLOSED.store(true, Ordering::Release);
        });
    }
    if let Err(e) = run(cli.command) {
        eprintln!("aviary-testpod: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Exec {
            netns,
            cgroup,
            command,
        } => exec(netns, cgroup, command),
        Command::Serve {
            name,
            port,
            udp_port,
        } => serve(name, port, udp_port),
        Command::Connect {
            addr,
            count,
            parallel,
        } => connect_many(addr, count, parallel),
        Command::HoldServe { name, port } => hold_serve(name, port),
        Command::Hold {
            addr,
            count,
            parallel,
            secs,
        } => hold(addr, count, parallel, Duration::from_secs_f64(secs)),
        Command::Session { addr } => session(addr),
        Command::Udp { addr } => udp(addr),
        Command::Sniff {
            interface,
            port,
            needle,
            secs,
        } => sniff(
            &interface,
            port,
            needle.as_bytes(),
            Duration::from_secs_f64(secs),
        ),
        Command::Load { mode } => load(mode),
        Command::HttpServe { name, port } => http_serve(name, port),
        Command::HttpLoad {
            addr,
            count,
            secs,
            connections,
            method,
            path,
        } => {
            // Bounded either way: by count, or by time.
            let deadline = Instant::now() + Duration::from_secs_f64(secs.unwrap_or(600.0));
            http_load(addr, count, connections, deadline, &method, &path)
        }
        Command::HttpUsers {
            addr,
            users,
            header,
        } => http_users(addr, users, &header),
        Command::OfrepUsers { addr, flag, users } => ofrep_users(addr, &flag, users),
        Command::EchoStream {
            addr,
            secs,
            upgrade,
        } => echo_stream(addr, Duration::from_secs_f64(secs), upgrade),
        Command::Reconnect { addr, port, count } => reconnect(addr, port, count),
        Command::GrpcServe { name, port } => runtime()?.block_on(async {
            let listener = tokio::net::TcpListener::bind(("::", port)).await?;
            println!("serving {name} on {port}");
            Ok(grpc::serve(listener, &name).await?)
        }),
        Command::GrpcUnary {
            addr,
            count,
            secs,
            code,
            text,
        } => {
            let deadline = Instant::now() + Duration::from_secs_f64(secs.unwrap_or(600.0));
            runtime()?.block_on(grpc_unary(addr, count, deadline, code, text))
        }
        Command::GrpcStream {
            addr,
            replies,
            code,
            text,
        } => runtime()?.block_on(grpc_stream(addr, replies, code, text)),
        Command::HttpGet { addr, path } => {
            let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            (&stream).write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())?;
            let Message { body, .. } =
                read_message(&mut BufReader::new(stream))?.context("no response")?;
            print!("{}", String::from_utf8_lossy(&body));
            Ok(())
        }
    }
}

fn exec(netns: PathBuf, cgroup: PathBuf, command: Vec<String>) -> anyhow::Result<()> {
    // The cgroup first: inside the namespace, /sys may not show the cgroup v2 mount.
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
    let ns = std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    let args: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()?;
    let err = nix::unistd::execvp(&args[0], &args).unwrap_err();
    bail!("exec {}: {err}", command[0])
}

fn serve(name: String, port: u16, udp_port: Option<u16>) -> anyhow::Result<()> {
    if let Some(udp_port) = udp_port {
        // Dual-stack: IPv4 peers arrive v4-mapped and are printed as IPv4.
        let socket = UdpSocket::bind(("::", udp_port))?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let reply = format!(
                    "udp from {}: {}",
                    canonical(from),
                    String::from_utf8_lossy(&buf[..n])
                );
                let _ = socket.send_to(reply.as_bytes(), from);
            }
        });
    }
    let listener = TcpListener::bind(("::", port))?;
    println!("serving {name} on {port}");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
                return;
            };
            let (peer, local) = (canonical(peer), canonical(local));
            // One write: see http_serve.
            let greeting = format!("hello from {name} peer={peer} local={local}\n");
            if stream.write_all(greeting.as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: many connections need many.
fn raise_open_files_limit() -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising the open files limit")
}

fn hold_serve(name: String, port: u16) -> anyhow::Result<()> {
    raise_open_files_limit()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(("::", port)).await?;
        println!("serving {name} on {port}");
        loop {
            let (mut stream, peer) = listener.accept().await?;
            let local = stream.local_addr()?;
            let greeting = format!(
                "hello from {name} peer={} local={}\n",
                canonical(peer),
                canonical(local)
            );
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                if stream.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                // Until the peer closes (or sends something, which this server never expects).
                let _ = stream.read(&mut [0u8; 1]).await;
            });
        }
    })
}

fn hold(addr: SocketAddr, count: usize, parallel: usize, secs: Duration) -> anyhow::Result<()> {
    raise_open_files_limit()?;
    let next = AtomicU64::new(0);
    let first = Mutex::new(None);
    let held = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..parallel.max(1))
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<Vec<TcpStream>> {
                    let mut held = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if i >= count {
                            return Ok(held);
                        }
                        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
                            .with_context(|| format!("connection {i}"))?;
                        stream.set_read_timeout(Some(IO_TIMEOUT))?;
                        let greeting = read_line(&stream).context("reading the greeting")?;
                        first.lock().unwrap().get_or_insert(greeting);
                        held.push(stream);
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker panicked"))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    println!("{}", first.into_inner().unwrap().unwrap_or_default());
    println!("open {}", held.iter().map(Vec::len).sum::<usize>());
    std::io::stdout().flush()?;
    std::thread::sleep(secs);
    Ok(())
}

/// One line, read without a buffer that could take bytes past it.
fn read_line(mut stream: &TcpStream) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if stream.read(&mut byte)? == 0 {
            bail!("closed after {} bytes", line.len());
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

/// A v4-mapped address as the IPv4 address it is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Greeting line, then one echoed line.
fn exchange(addr: SocketAddr, payload: &str) -> anyhow::Result<String> {
    let stream =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut greeting = String::new();
    reader
        .read_line(&mut greeting)
        .context("reading the greeting")?;
    if greeting.is_empty() {
        bail!("connection to {addr} closed before the greeting");
    }
    (&stream).write_all(format!("{payload}\n").as_bytes())?;
    let mut echo = String::new();
    reader.read_line(&mut echo).context("reading the echo")?;
    if echo.trim_end() != payload {
        bail!("echo mismatch: sent {payload:?}, got {echo:?}");
    }
    Ok(greeting.trim_end().to_owned())
}

/// The backend a greeting names.
fn name_of(greeting: &str) -> String {
    greeting
        .strip_prefix("hello from ")
        .and_then(|g| g.split(' ').next())
        .unwrap_or("?")
        .to_owned()
}

/// The peer address a greeting names.
fn peer_of(greeting: &str) -> String {
    let peer = greeting
        .split(' ')
        .find_map(|w| w.strip_prefix("peer="))
        .unwrap_or("?");
    peer.parse::<SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| peer.to_owned())
}

fn connect_many(addr: SocketAddr, count: u64, parallel: u64) -> anyhow::Result<()> {
    let first = exchange(addr, "first")?;
    println!("{first}");
    let peers = Mutex::new(BTreeMap::from([(peer_of(&first), 1u64)]));
    let names = Mutex::new(BTreeMap::from([(name_of(&first), 1u64)]));
    let next = AtomicU64::new(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..parallel.max(1))
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return Ok(());
                        }
                        let greeting = exchange(addr, &format!("payload {i}"))
                            .with_context(|| format!("connection {i}"))?;
                        *peers.lock().unwrap().entry(peer_of(&greeting)).or_default() += 1;
                        *names.lock().unwrap().entry(name_of(&greeting)).or_default() += 1;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("worker panicked"))
    })?;
    println!("ok {count}");
    for (peer, n) in peers.into_inner().unwrap() {
        println!("peer {peer} {n}");
    }
    for (name, n) in names.into_inner().unwrap() {
        println!("name {name} {n}");
    }
    Ok(())
}

fn session(addr: SocketAddr) -> anyhow::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    print!("{line}");
    std::io::stdout().flush()?;
    for input in std::io::stdin().lines() {
        (&stream).write_all(format!("{}\n", input?).as_bytes())?;
        line.clear();
        reader.read_line(&mut line)?;
        if line.is_empty() {
            bail!("connection closed");
        }
        print!("{line}");
        std::io::stdout().flush()?;
    }
    Ok(())
}

fn udp(addr: SocketAddr) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.send_to(b"ping", addr)?;
    let mut buf = [0u8; 2048];
    let (n, _) = socket
        .recv_from(&mut buf)
        .context("waiting for the reply")?;
    println!("{}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}

fn load(mode: Load) -> anyhow::Result<()> {
    match mode {
        Load::Rr { addr, conns, secs } => {
            let latencies = workers(conns, secs, |deadline| {
                let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                let mut reader = BufReader::new(stream.try_clone()?);
                reader.read_line(&mut String::new())?;
                let (request, mut reply) = ([b'x'; 64], [0u8; 64]);
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let start = Instant::now();
                    (&stream).write_all(&request)?;
                    reader.read_exact(&mut reply)?;
                    latencies.push(start.elapsed());
                }
                Ok(latencies)
            })?;
            report("rr", secs, latencies);
        }
        Load::Crr {
            addr,
            parallel,
            secs,
        } => {
            let latencies = workers(parallel, secs, |deadline| {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let start = Instant::now();
                    exchange(addr, "request")?;
                    latencies.push(start.elapsed());
                }
                Ok(latencies)
            })?;
            report("crr", secs, latencies);
        }
        Load::Stream { addr, secs } => {
            let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            let mut reader = BufReader::new(stream.try_clone()?);
            reader.read_line(&mut String::new())?;
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let writer = std::thread::spawn(move || -> anyhow::Result<u64> {
                let chunk = vec![b'y'; 64 * 1024];
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    (&stream).write_all(&chunk).context("stream write")?;
                    sent += chunk.len() as u64;
                }
                stream.shutdown(std::net::Shutdown::Write)?;
                Ok(sent)
            });
            let mut buf = vec![0u8; 256 * 1024];
            let mut received = 0u64;
            loop {
                let n = reader.read(&mut buf).context("stream read")?;
                if n == 0 {
                    break;
                }
                received += n as u64;
            }
            let sent = writer.join().expect("writer panicked")?;
            if sent != received {
                bail!("sent {sent} bytes, {received} came back");
            }
            println!("stream bytes={received} secs={secs}");
        }
        Load::ConnectLocal { count } => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            std::thread::spawn(move || listener.incoming().for_each(drop));
            let mut samples = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let start = Instant::now();
                let stream = TcpStream::connect(addr)?;
                samples.push(start.elapsed());
                drop(stream);
            }
            samples.sort_unstable();
            let median = samples.get(samples.len() / 2).copied().unwrap_or_default();
            println!("connect count={count} median_ns={}", median.as_nanos());
        }
    }
    Ok(())
}

/// Runs `n` workers until `secs` pass; returns every latency they measured.
fn workers(
    n: usize,
    secs: f64,
    work: impl Fn(Instant) -> anyhow::Result<Vec<Duration>> + Sync,
) -> anyhow::Result<Vec<Duration>> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n).map(|_| scope.spawn(|| work(deadline))).collect();
        let mut all = Vec::new();
        for handle in handles {
            all.extend(handle.join().expect("worker panicked")?);
        }
        Ok(all)
    })
}

fn report(mode: &str, secs: f64, mut latencies: Vec<Duration>) {
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
    };
    let us = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e6);
    println!(
        "{mode} requests={} secs={secs} p50_us={:.1} p99_us={:.1}",
        latencies.len(),
        us(pct(0.50)),
        us(pct(0.99))
    );
}

/// One HTTP/1.1 message: its start line, headers (names lowercased) and Content-Length body.
struct Message {
    start: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn reconnect(addr: SocketAddr, port: u16, count: u32) -> anyhow::Result<()> {
    use nix::sys::socket::{
        bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
        SockaddrStorage,
    };
    use nix::sys::time::TimeVal;
    use std::os::fd::AsRawFd as _;
    let mut statuses = BTreeMap::new();
    for _ in 0..count {
        let family = if addr.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let fd = socket(family, SockType::Stream, SockFlag::empty(), None)?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        // Bounds connect(): a SYN the peer drops would otherwise be retried for minutes.
        setsockopt(
            &fd,
            sockopt::SendTimeout,
            &TimeVal::new(IO_TIMEOUT.as_secs() as _, 0),
        )?;
        let local = match addr {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], port)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], port)),
        };
        bind(fd.as_raw_fd(), &SockaddrStorage::from(local)).context("binding the source port")?;
        connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))
            .with_context(|| format!("connecting from port {port} again"))?;
        let stream = TcpStream::from(fd);
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        (&stream).write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")?;
        let mut reader = BufReader::new(stream);
        let message = read_message(&mut reader)?.context("no response")?;
        let status = message.start.split(' ').nth(1).unwrap_or("none").to_owned();
        *statuses.entry(status).or_insert(0u32) += 1;
        // Until the server's close: this end closes second, and holds no TIME_WAIT.
        std::io::copy(&mut reader, &mut std::io::sink())?;
    }
    for (status, n) in statuses {
        println!("status {status} {n}");
    }
    Ok(())
}

/// The next message, or None at a clean end of stream.
fn read_message(reader: &mut impl std::io::BufRead) -> anyhow::Result<Option<Message>> {
    let mut start = String::new();
    if reader.read_line(&mut start)? == 0 {
        return Ok(None);
    }
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').context("malformed header")?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let len: usize = headers.get("content-length").map_or(Ok(0), |v| v.parse())?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(Some(Message {
        start: start.trim_end().to_owned(),
        headers,
        body,
    }))
}

fn http_serve(name: String, port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("::", port))?;
    let mirrored: &'static Mutex<BTreeMap<String, u64>> = Box::leak(Box::default());
    println!("serving {name} on {port}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let peer = stream.peer_addr()?.ip().to_canonical();
            let mut reader = BufReader::new(stream.try_clone()?);
            while let Some(Message { start, headers, .. }) = read_message(&mut reader)? {
                if let Some(protocol) = headers.get("upgrade") {
                    // An upgrade: agreed to, then every byte echoed until the peer closes.
                    let switched = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {protocol}\r\nx-backend: {name}\r\n\r\n"
                    );
                    (&stream).write_all(switched.as_bytes())?;
                    let early = reader.buffer().to_vec();
                    (&stream).write_all(&early)?;
                    let mut raw = reader.into_inner();
                    raw.set_read_timeout(None)?;
                    std::io::copy(&mut raw, &mut &stream)?;
                    stream.shutdown(std::net::Shutdown::Write)?;
                    return Ok(());
                }
                let method = start.split(' ').next().unwrap_or_default().to_owned();
                let body = if start.starts_with("GET /stats ") {
                    let counts = mirrored.lock().unwrap();
                    counts
                        .iter()
                        .map(|(m, n)| format!("mirrored {m} {n}\n"))
                        .collect::<String>()
                } else {
                    if headers.contains_key("x-aviary-mirror") {
                        *mirrored.lock().unwrap().entry(method).or_default() += 1;
                    }
                    name.clone()
                };
                // One write per message, as real servers do: several small writes would meet
                // Nagle and delayed ACKs and stall each exchange by tens of milliseconds.
                let flags: Vec<String> = headers
                    .iter()
                    .filter_map(|(k, v)| Some(format!("{}={v}", k.strip_prefix("x-aviary-flag-")?)))
                    .collect();
                let seen_flags = if flags.is_empty() {
                    String::new()
                } else {
                    format!("x-seen-flags: {}\r\n", flags.join(","))
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\nx-backend: {name}\r\nx-peer: {peer}\r\n{seen_flags}content-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let close = headers
                    .get("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                let response = if close {
                    response.replacen("\r\n\r\n", "\r\nconnection: close\r\n\r\n", 1)
                } else {
                    response
                };
                (&stream).write_all(response.as_bytes())?;
                if close {
                    break;
                }
            }
            Ok(())
        });
    }
    Ok(())
}

fn http_load(
    addr: SocketAddr,
    count: u32,
    connections: u32,
    deadline: Instant,
    method: &str,
    path: &str,
) -> anyhow::Result<()> {
    let results: Vec<LoadResults> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..connections.max(1))
            .map(|_| scope.spawn(|| http_load_one(addr, count, deadline, method, path)))
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a load thread panicked"))
            .collect()
    });
    let mut all = LoadResults::default();
    for result in results {
        for (map, from) in [
            (&mut all.statuses, result.statuses),
            (&mut all.backends, result.backends),
            (&mut all.peers, result.peers),
        ] {
            for (key, n) in from {
                *map.entry(key).or_default() += n;
            }
        }
        all.errors.extend(result.errors);
        all.latencies.extend(result.latencies);
        all.connections += result.connections;
        all.last = result.last;
    }
    for (peer, n) in &all.peers {
        println!("peer {peer} {n}");
    }
    println!("last {}", all.last);
    print_tally("status", &all.statuses);
    print_tally("backend", &all.backends);
    println!("errors {}", all.errors.len());
    for error in &all.errors {
        println!("error {error}");
    }
    println!("connections {}", all.connections);
    all.latencies.sort();
    if let Some(last) = all.latencies.len().checked_sub(1) {
        let at = |p: f64| all.latencies[(last as f64 * p).round() as usize].as_micros();
        println!("latency p50_us {}", at(0.5));
        println!("latency p99_us {}", at(0.99));
    }
    Ok(())
}

fn http_users(addr: SocketAddr, users: u32, extra: &[String]) -> anyhow::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let extra: String = extra.iter().map(|h| format!("{h}\r\n")).collect();
    for user in 0..users {
        let request = format!(
            "GET / HTTP/1.1\r\nhost: podinfo\r\nx-user-id: user-{user}\r\n{extra}content-length: 0\r\n\r\n"
        );
        (&stream).write_all(request.as_bytes())?;
        let Message { headers, .. } =
            read_message(&mut reader)?.context("the connection closed before the response")?;
        let field = |name: &str| headers.get(name).cloned().unwrap_or_else(|| "-".into());
        println!(
            "user {user} {} {}",
            field("x-backend"),
            field("x-seen-flags")
        );
    }
    Ok(())
}

fn ofrep_users(addr: SocketAddr, flag: &str, users: u32) -> anyhow::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    for user in 0..users {
        let body = serde_json::json!({"context": {"targetingKey": format!("user-{user}")}});
        let body = body.to_string();
        let request = format!(
            "POST /ofrep/v1/evaluate/flags/{flag} HTTP/1.1\r\nhost: ofrep\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        (&stream).write_all(request.as_bytes())?;
        let Message { start, body, .. } =
            read_message(&mut reader)?.context("the connection closed before the answer")?;
        let answer: serde_json::Value = serde_json::from_slice(&body)
            .with_context(|| format!("{start}: {}", String::from_utf8_lossy(&body)))?;
        let variant = answer["variant"].as_str().unwrap_or("-");
        println!("user {user} {variant}");
    }
    Ok(())
}

#[derive(Default)]
struct LoadResults {
    statuses: BTreeMap<String, u32>,
    backends: BTreeMap<String, u32>,
    peers: BTreeMap<String, u32>,
    errors: Vec<String>,
    latencies: Vec<Duration>,
    connections: u32,
    last: String,
}

/// One connection's load: requests one after another, a new connection after a
/// `connection: close` answer or a failure (which counts as an error).
fn http_load_one(
    addr: SocketAddr,
    count: u32,
    deadline: Instant,
    method: &str,
    path: &str,
) -> LoadResults {
    let mut results = LoadResults::default();
    let body = if method == "GET" || method == "HEAD" {
        ""
    } else {
        "data"
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: podinfo\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let connect = || -> anyhow::Result<(TcpStream, BufReader<TcpStream>)> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok((stream, reader))
    };
    let mut conn = None;
    for _ in 0..count {
        if !running(deadline) {
            break;
        }
        let sent = Instant::now();
        let exchange = (|| -> anyhow::Result<Message> {
            if conn.is_none() {
                conn = Some(connect()?);
                results.connections += 1;
            }
            let (stream, reader) = conn.as_mut().expect("connected");
            (&*stream).write_all(request.as_bytes())?;
            read_message(reader)?.context("the connection closed before the response")
        })();
        let Message { start, headers, .. } = match exchange {
            Ok(message) => message,
            Err(e) => {
                results.errors.push(format!("{e:#}"));
                conn = None;
                continue;
            }
        };
        results.latencies.push(sent.elapsed());
        if headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            conn = None;
        }
        let status = start.split(' ').nth(1).unwrap_or("?").to_owned();
        *results.statuses.entry(status).or_default() += 1;
        results.last = headers.get("x-backend").cloned().unwrap_or_default();
        *results.backends.entry(results.last.clone()).or_default() += 1;
        *results
            .peers
            .entry(headers.get("x-peer").cloned().unwrap_or_default())
            .or_default() += 1;
    }
    results
}

/// The byte at `offset` of an echo stream's pattern: it changes at every offset, and does not
/// repeat with a short period, so a lost, doubled or reordered chunk shows.
fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(2654435761) >> 13) as u8
}

fn echo_stream(addr: SocketAddr, secs: Duration, upgrade: bool) -> anyhow::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    if upgrade {
        (&stream).write_all(
            b"GET /echo HTTP/1.1\r\nhost: echo\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )?;
        let head = read_head(&stream)?;
        if !head.starts_with("HTTP/1.1 101") {
            bail!("the upgrade was refused: {head:?}");
        }
    } else {
        let greeting = read_line(&stream)?;
        if !greeting.starts_with("hello from") {
            bail!("no greeting: {greeting:?}");
        }
    }
    // The test waits for this line before it disturbs the stream.
    println!("streaming");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + secs;
    let writer = stream.try_clone()?;
    let sending = std::thread::spawn(move || -> anyhow::Result<u64> {
        let mut offset = 0u64;
        let mut chunk = vec![0u8; 4096];
        while running(deadline) {
            for byte in chunk.iter_mut() {
                *byte = pattern_byte(offset);
                offset += 1;
            }
            (&writer).write_all(&chunk).context("writing")?;
            std::thread::sleep(Duration::from_millis(1));
        }
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(offset)
    });
    let mut received = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = (&stream).read(&mut buf).context("reading the echo")?;
        if n == 0 {
            break;
        }
        for &byte in &buf[..n] {
            if byte != pattern_byte(received) {
                bail!(
                    "byte {received} came back as {byte}, not {}",
                    pattern_byte(received)
                );
            }
            received += 1;
        }
    }
    let sent = sending.join().expect("the writer panicked")?;
    if received != sent {
        bail!("sent {sent} bytes, {received} came back");
    }
    println!("stream {received} ok");
    Ok(())
}

/// A response head, read byte by byte so that nothing past it is taken.
fn read_head(stream: &TcpStream) -> anyhow::Result<String> {
    let mut head = String::new();
    loop {
        let line = read_line(stream)?;
        if line.is_empty() {
            return Ok(head);
        }
        head.push_str(&line);
        head.push('\n');
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Prints "`word` key n" for each key.
fn print_tally(word: &str, counts: &BTreeMap<String, u32>) {
    for (key, n) in counts {
        println!("{word} {key} {n}");
    }
}

async fn grpc_unary(
    addr: SocketAddr,
    count: u32,
    deadline: Instant,
    code: i32,
    text: String,
) -> anyhow::Result<()> {
    let mut client = grpc::Client::connect(addr).await?;
    let (mut statuses, mut backends) = (BTreeMap::new(), BTreeMap::new());
    for _ in 0..count {
        if !running(deadline) {
            break;
        }
        let request = EchoRequest {
            text: text.clone(),
            code,
            count: 0,
        };
        let code = match client.unary(request).await {
            Ok(reply) => {
                if reply.text != text {
                    bail!("echoed {:?} for {text:?}", reply.text);
                }
                *backends.entry(reply.backend).or_default() += 1;
                tonic::Code::Ok
            }
            Err(status) => {
                println!("failed {:?} {}", status.code(), status.message());
                status.code()
            }
        };
        *statuses.entry(format!("{code:?}")).or_default() += 1;
    }
    print_tally("status", &statuses);
    print_tally("backend", &backends);
    Ok(())
}

async fn grpc_stream(
    addr: SocketAddr,
    replies: u32,
    code: i32,
    text: String,
) -> anyhow::Result<()> {
    let mut client = grpc::Client::connect(addr).await?;
    let request = EchoRequest {
        text,
        code,
        count: replies,
    };
    let streamed = client.server_streaming(request).await;
    let mut backends = BTreeMap::new();
    for (expected, reply) in (0..).zip(&streamed.replies) {
        if reply.index != expected {
            bail!("reply {} came as number {expected}", reply.index);
        }
        *backends.entry(reply.backend.clone()).or_default() += 1;
    }
    println!("replies {}", streamed.replies.len());
    print_tally("backend", &backends);
    let status = &streamed.status;
    println!("status {:?} 1", status.code());
    if status.code() != tonic::Code::Ok {
        println!("failed {:?} {}", status.code(), status.message());
    }
    Ok(())
}

fn sniff(interface: &str, port: u16, needle: &[u8], secs: Duration) -> anyhow::Result<()> {
    use nix::sys::socket::{
        recvfrom, setsockopt, socket, sockopt, AddressFamily, LinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    use std::os::fd::AsRawFd as _;
    let index = nix::net::if_::if_nametoindex(interface)
        .with_context(|| format!("no interface {interface}"))? as usize;
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::EthAll,
    )?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 100_000),
    )?;
    println!("sniffing");
    std::io::stdout().flush()?;
    let (mut segments, mut on_port, mut tls, mut needles) = (0u32, 0u32, 0u32, 0u32);
    let deadline = Instant::now() + secs;
    let mut frame = vec![0u8; 65_536];
    while Instant::now() < deadline {
        let (n, from) = match recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut frame) {
            Ok(received) => received,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if from.is_none_or(|from| from.ifindex() != index) {
            continue;
        }
        let Some((ports, payload)) = tcp_payload(&frame[..n]) else {
            continue;
        };
        segments += 1;
        if ports.0 == port || ports.1 == port {
            on_port += 1;
            // A record header: handshake (22) or application data (23), TLS 1.2's version on
            // the wire (TLS 1.3 records say 1.2).
            if payload.len() >= 5 && matches!(payload[0], 22 | 23) && payload[1..3] == [3, 3] {
                tls += 1;
            }
        }
        if payload.windows(needle.len()).any(|w| w == needle) {
            needles += 1;
        }
    }
    println!("segments {segments}");
    println!("port {on_port}");
    println!("tls {tls}");
    println!("needle {needles}");
    Ok(())
}

/// The TCP ports (source, destination) and payload of an Ethernet frame carrying IPv4 TCP.
fn tcp_payload(frame: &[u8]) -> Option<((u16, u16), &[u8])> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let ip = ip.get(..total)?;
    let tcp = ip.get(usize::from(ip[0] & 0x0f) * 4..)?;
    let ports = (
        u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]),
        u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]),
    );
    let payload = tcp.get(usize::from(tcp.get(12)? >> 4) * 4..)?;
    Some((ports, payload))
}
