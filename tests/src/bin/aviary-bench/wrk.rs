//! wrk, the HTTP load generator: one run from a pod, its `--latency` report read, and the
//! script that paces it to a fixed rate.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context as _};
use aviary_tests::{Node, Pod};

const WRK: &str = "/usr/bin/wrk";

/// One wrk run: requests per second, latency percentiles, and errors.
#[derive(Debug, Clone, Copy)]
pub struct Wrk {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests: f64,
    /// Answers other than 2xx and 3xx.
    pub non_2xx: f64,
    /// Requests with no answer within wrk's --timeout.
    pub timeouts: f64,
    /// Socket errors on connect, read and write: broken connections.
    pub connection_errors: f64,
}

impl Wrk {
    /// Failed requests and connection errors together.
    pub fn errors(&self) -> f64 {
        self.non_2xx + self.timeouts + self.connection_errors
    }
}

/// Fails, saying how to get it, when wrk is not installed.
pub fn require() -> anyhow::Result<()> {
    if !Path::new(WRK).exists() {
        bail!("wrk is not installed: run `cargo xtask bench`, which installs it");
    }
    Ok(())
}

/// wrk from `client` to `url` for `secs`, with `args` (threads, connections, ...).
pub fn run(node: &Node, client: &Pod, url: &str, args: &[&str], secs: f64) -> anyhow::Result<Wrk> {
    let secs_arg = format!("{}s", secs.ceil());
    let args = [
        &["--latency", "-d", &secs_arg, "--timeout", "5s"],
        args,
        &[url],
    ]
    .concat();
    let out = node.run_program(
        client,
        Path::new(WRK),
        &args,
        Duration::from_secs_f64(secs + 60.0),
    );
    let report = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse(&report).with_context(|| format!("wrk said: {report}"))
}

/// A wrk script that paces each connection so that all of them together send `rate`
/// requests per second (wrk's `delay()` runs before each request).
pub fn pacing_script(dir: &Path, rate: u32, conns: u32) -> anyhow::Result<String> {
    let path = dir.join("pace.lua");
    let interval_ms = 1000.0 * f64::from(conns) / f64::from(rate);
    std::fs::write(
        &path,
        format!("function delay()\n  return {interval_ms}\nend\n"),
    )?;
    Ok(path.to_string_lossy().into_owned())
}

/// A wrk script that sends each request as another user: `x-user-id` differs on every request
/// (each thread numbers its own, after its own id), and `x-country` takes each of `countries`
/// in turn. wrk then writes each request in Lua, which costs it some throughput, so every
/// target compared is measured with the same script.
pub fn users_script(dir: &Path, countries: &[&str]) -> anyhow::Result<String> {
    let path = dir.join("users.lua");
    let countries: Vec<String> = countries.iter().map(|c| format!("{c:?}")).collect();
    let script = format!(
        "local threads = 0\n\
         function setup(thread)\n  thread:set(\"thread_id\", threads)\n  threads = threads + 1\nend\n\
         local countries = {{{}}}\n\
         local n = 0\n\
         function request()\n  n = n + 1\n\
         \x20 wrk.headers[\"x-user-id\"] = \"user-\" .. thread_id .. \"-\" .. n\n\
         \x20 wrk.headers[\"x-country\"] = countries[n % #countries + 1]\n\
         \x20 return wrk.format()\nend\n",
        countries.join(", ")
    );
    std::fs::write(&path, script)?;
    Ok(path.to_string_lossy().into_owned())
}

fn duration_us(text: &str) -> anyhow::Result<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("not a duration: {text:?}")
    };
    Ok(number.parse::<f64>()? * scale)
}

/// Reads wrk's `--latency` report.
pub fn parse(report: &str) -> anyhow::Result<Wrk> {
    let words = |prefix: &str| {
        report
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
    };
    let percentile = |p: &str| -> anyhow::Result<f64> {
        duration_us(&words(p).context("no latency distribution")?[1])
    };
    let requests: f64 = words("Requests/sec:").context("no Requests/sec")?[1].parse()?;
    let total: f64 = report
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no request count")?;
    let non_2xx: f64 = words("Non-2xx").map_or(Ok(0.0), |w| w[4].parse())?;
    // "Socket errors: connect 0, read 16, write 0, timeout 0"
    let socket = words("Socket errors:").unwrap_or_default();
    let socket_errors = |kind: &str| -> anyhow::Result<f64> {
        match socket.iter().position(|w| w == kind) {
            Some(at) => Ok(socket
                .get(at + 1)
                .context("a socket error count")?
                .trim_end_matches(',')
                .parse()?),
            None => Ok(0.0),
        }
    };
    Ok(Wrk {
        rate: requests,
        p50_us: percentile("50%")?,
        p99_us: percentile("99%")?,
        requests: total,
        non_2xx,
        timeouts: socket_errors("timeout")?,
        connection_errors: socket_errors("connect")?
            + socket_errors("read")?
            + socket_errors("write")?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_wrk_report() {
        let report = "Running 5s test @ http://10.96.1.21/\n  2 threads and 32 connections\n\
            \x20 Latency Distribution\n     50%  250.00us\n     75%  400.00us\n     90%    1.00ms\n     99%    2.50ms\n\
            \x20 123456 requests in 5.00s, 10.00MB read\n  Non-2xx or 3xx responses: 3\n\
            Requests/sec:  24691.20\nTransfer/sec:      2.00MB\n";
        let wrk = super::parse(report).unwrap();
        assert_eq!(wrk.rate, 24691.2);
        assert_eq!(wrk.p50_us, 250.0);
        assert_eq!(wrk.p99_us, 2500.0);
        assert_eq!(wrk.requests, 123456.0);
        assert_eq!(wrk.errors(), 3.0);

        let broken = report.replace(
            "Requests/sec",
            "Socket errors: connect 1, read 16, write 2, timeout 4\nRequests/sec",
        );
        let wrk = super::parse(&broken).unwrap();
        assert_eq!(
            (wrk.non_2xx, wrk.timeouts, wrk.connection_errors),
            (3.0, 4.0, 19.0)
        );
        assert_eq!(wrk.errors(), 26.0);
    }
}
