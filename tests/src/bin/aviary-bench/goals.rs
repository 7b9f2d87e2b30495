//! The project's goals, judged from one run's figures.

use crate::report::Report;

/// The figures the goals need; None when a section was left out or a shape failed.
#[derive(Debug, Default, Clone)]
pub struct Measured {
    /// L4 keep-alive req/resp, req/s: direct, and through Aviary with no route.
    pub l4_direct_rate: Option<f64>,
    pub l4_opaque_rate: Option<f64>,
    /// HTTP keep-alive throughput, req/s.
    pub direct_rate: Option<f64>,
    pub split_rate: Option<f64>,
    pub mirror_rate: Option<f64>,
    pub nginx_mirror_rate: Option<f64>,
    /// Proxy CPU per keep-alive request, µs.
    pub split_cpu_us: Option<f64>,
    pub haproxy_cpu_us: Option<f64>,
    /// One connection, sequential: p50 in µs.
    pub direct_seq_p50_us: Option<f64>,
    pub split_seq_p50_us: Option<f64>,
    pub haproxy_seq_p50_us: Option<f64>,
    /// At the fixed rate: p99 in µs.
    pub direct_fixed_p99_us: Option<f64>,
    pub split_fixed_p99_us: Option<f64>,
    /// The agent's peak RSS, the highest seen in the run.
    pub agent_rss_kib: Option<u64>,
    /// Keep-alive load across an upgrade, or why there was no upgrade to measure.
    pub upgrade: Option<Result<Upgrade, String>>,
    /// The 90/10 split with three flags evaluated per request against the same split without,
    /// medians over the flags section's rounds: of the per-round throughput ratio and CPU per
    /// request added, and of each one's throughput (req/s) and CPU per request (µs).
    pub flags_rate_ratio: Option<f64>,
    pub flags_cpu_added_us: Option<f64>,
    pub flags_rate: Option<f64>,
    pub flags_split_rate: Option<f64>,
    pub flags_cpu_us: Option<f64>,
    pub flags_split_cpu_us: Option<f64>,
    /// The three flags evaluated in process, ns per request (the median run).
    pub flags_eval_ns: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Upgrade {
    /// Non-2xx answers and requests that timed out.
    pub failed: f64,
    /// Connections broken on connect, read or write.
    pub connection_errors: f64,
    pub p99_us: f64,
    /// The same load with no upgrade.
    pub steady_p99_us: f64,
}

impl Measured {
    pub fn rss_kib(&mut self, kib: u64) {
        self.agent_rss_kib = Some(self.agent_rss_kib.map_or(kib, |k| k.max(kib)));
    }
}

#[derive(Debug, PartialEq)]
pub struct Goal {
    pub name: &'static str,
    /// None: not measured in this run.
    pub pass: Option<bool>,
    pub detail: String,
}

/// A goal made of checks: FAIL if any measured check fails, else n/a if one was not
/// measured, else PASS.
fn all(checks: &[Option<bool>]) -> Option<bool> {
    if checks.contains(&Some(false)) {
        Some(false)
    } else if checks.contains(&None) {
        None
    } else {
        Some(true)
    }
}

fn show(v: Option<f64>, unit: &str) -> String {
    v.map_or("not measured".into(), |v| format!("{v:.0}{unit}"))
}

fn show_ratio(v: Option<f64>) -> String {
    v.map_or("not measured".into(), |v| format!("{v:.2}x"))
}

fn show_us(v: Option<f64>) -> String {
    v.map_or("not measured".into(), |v| format!("{v:.1} µs"))
}

fn show_delta_us(v: Option<f64>) -> String {
    v.map_or("not measured".into(), |v| format!("{v:+.1} µs"))
}

/// The detail, or a plain "not measured" when none of its figures were.
fn unless_missing(figures: &[Option<f64>], detail: String) -> String {
    if figures.iter().all(Option::is_none) {
        "not measured in this run".into()
    } else {
        detail
    }
}

/// Each goal, judged from `m`.
pub fn evaluate(m: &Measured) -> Vec<Goal> {
    vec![
        split(m),
        mirroring(m),
        sequential(m),
        fixed_rate(m),
        opaque(m),
        memory(m),
        upgrade(m),
        flags(m),
        flag_evaluations(m),
    ]
}

/// The goals in the report: the page's last data-path section, printed as stdout shows it.
pub fn report(goals: &[Goal], report: &mut Report) {
    report.section("Goals", "");
    report.text(
        "Goals (from this run), each PASS or FAIL, or n/a where the section that measures it \
         was left out:",
    );
    let lines: Vec<String> = goals
        .iter()
        .map(|goal| {
            let verdict = match goal.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "n/a ",
            };
            format!("{verdict}  {}: {}", goal.name, goal.detail)
        })
        .collect();
    report.code(&lines.join("\n"));
}

fn ratio(v: Option<f64>, d: Option<f64>) -> Option<f64> {
    Some(v? / d?)
}

fn minus(v: Option<f64>, d: Option<f64>) -> Option<f64> {
    Some(v? - d?)
}

fn at_least(v: Option<f64>, min: f64) -> Option<bool> {
    v.map(|v| v >= min)
}

fn split(m: &Measured) -> Goal {
    let split = ratio(m.split_rate, m.direct_rate);
    let cpu = m
        .split_cpu_us
        .zip(m.haproxy_cpu_us)
        .map(|(aviary, haproxy)| aviary <= haproxy);
    Goal {
        name: "keep-alive 90/10 split >= 0.8x direct, CPU/request <= haproxy's",
        pass: all(&[at_least(split, 0.8), cpu]),
        detail: unless_missing(
            &[m.split_rate, m.split_cpu_us, m.haproxy_cpu_us],
            format!(
                "{} of direct; CPU {} per request, haproxy {}",
                show_ratio(split),
                show_us(m.split_cpu_us),
                show_us(m.haproxy_cpu_us)
            ),
        ),
    }
}

fn mirroring(m: &Measured) -> Goal {
    let mirror = ratio(m.mirror_rate, m.direct_rate);
    let nginx_mirror = ratio(m.nginx_mirror_rate, m.direct_rate);
    let ahead = m
        .mirror_rate
        .zip(m.nginx_mirror_rate)
        .map(|(aviary, nginx)| aviary > nginx);
    Goal {
        name: "100% GET mirroring >= 0.6x direct, ahead of nginx's mirror",
        pass: all(&[at_least(mirror, 0.6), ahead]),
        detail: unless_missing(
            &[m.mirror_rate, m.nginx_mirror_rate],
            format!(
                "{} of direct ({}); nginx split + mirror {} ({})",
                show_ratio(mirror),
                show(m.mirror_rate, " req/s"),
                show_ratio(nginx_mirror),
                show(m.nginx_mirror_rate, " req/s")
            ),
        ),
    }
}

fn sequential(m: &Measured) -> Goal {
    let added = minus(m.split_seq_p50_us, m.direct_seq_p50_us);
    let haproxy_added = minus(m.haproxy_seq_p50_us, m.direct_seq_p50_us);
    Goal {
        name: "one connection, sequential: 90/10 added p50 <= haproxy's",
        pass: added.zip(haproxy_added).map(|(a, h)| a <= h),
        detail: unless_missing(
            &[m.split_seq_p50_us, m.haproxy_seq_p50_us],
            format!(
                "Aviary {}, haproxy {} over direct's {}",
                show_delta_us(added),
                show_delta_us(haproxy_added),
                show_us(m.direct_seq_p50_us)
            ),
        ),
    }
}

fn fixed_rate(m: &Measured) -> Goal {
    let fixed = minus(m.split_fixed_p99_us, m.direct_fixed_p99_us);
    Goal {
        name: "fixed 2,000 req/s: 90/10 p99 within +0.3 ms of direct",
        pass: fixed.map(|f| f <= 300.0),
        detail: unless_missing(
            &[m.split_fixed_p99_us],
            format!(
                "{} ({} against {})",
                show_delta_us(fixed),
                show_us(m.split_fixed_p99_us),
                show_us(m.direct_fixed_p99_us)
            ),
        ),
    }
}

fn opaque(m: &Measured) -> Goal {
    let opaque = ratio(m.l4_opaque_rate, m.l4_direct_rate);
    Goal {
        name: "opaque TCP (no route) keep-alive >= 0.8x direct",
        pass: at_least(opaque, 0.8),
        detail: unless_missing(
            &[m.l4_opaque_rate],
            format!(
                "{} ({} against {})",
                show_ratio(opaque),
                show(m.l4_opaque_rate, " req/s"),
                show(m.l4_direct_rate, " req/s")
            ),
        ),
    }
}

fn memory(m: &Measured) -> Goal {
    let rss_mib = m.agent_rss_kib.map(|k| k as f64 / 1024.0);
    Goal {
        name: "agent RSS under load < 40 MiB",
        pass: rss_mib.map(|r| r < 40.0),
        detail: rss_mib.map_or("not measured".into(), |r| format!("{r:.1} MiB peak")),
    }
}

fn upgrade(m: &Measured) -> Goal {
    Goal {
        name: "0 failed requests and 0 broken connections across an upgrade under load",
        pass: m.upgrade.as_ref().map(|u| {
            u.as_ref()
                .is_ok_and(|u| u.failed == 0.0 && u.connection_errors == 0.0)
        }),
        detail: match &m.upgrade {
            None => "not measured in this run".into(),
            Some(Err(why)) => format!("no upgrade: {why}"),
            Some(Ok(u)) => format!(
                "{:.0} failed, {:.0} broken; p99 {} across the upgrade, {} without",
                u.failed,
                u.connection_errors,
                show_us(Some(u.p99_us)),
                show_us(Some(u.steady_p99_us))
            ),
        },
    }
}

fn flags(m: &Measured) -> Goal {
    let cpu = m.flags_cpu_added_us.map(|added| added <= 1.0);
    Goal {
        name: "three flags per request on the 90/10 split: throughput >= 0.95x the split \
               without, CPU/request at most 1 µs more",
        pass: all(&[at_least(m.flags_rate_ratio, 0.95), cpu]),
        detail: unless_missing(
            &[m.flags_rate_ratio, m.flags_cpu_added_us],
            format!(
                "{} of the split without ({} against {}); CPU {} per request ({} against {}); \
                 medians over the rounds",
                show_ratio(m.flags_rate_ratio),
                show(m.flags_rate, " req/s"),
                show(m.flags_split_rate, " req/s"),
                show_delta_us(m.flags_cpu_added_us),
                show_us(m.flags_cpu_us),
                show_us(m.flags_split_cpu_us)
            ),
        ),
    }
}

fn flag_evaluations(m: &Measured) -> Goal {
    Goal {
        name: "the three flags evaluated in process (fractional, rule, static) <= 1 µs per request",
        pass: m.flags_eval_ns.map(|ns| ns <= 1000.0),
        detail: m
            .flags_eval_ns
            .map_or("not measured in this run".into(), |ns| {
                format!("{ns:.0} ns (the median run)")
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Measured {
        Measured {
            l4_direct_rate: Some(70000.0),
            l4_opaque_rate: Some(42000.0),
            direct_rate: Some(60000.0),
            split_rate: Some(50000.0),
            mirror_rate: Some(20000.0),
            nginx_mirror_rate: Some(25000.0),
            split_cpu_us: Some(30.0),
            haproxy_cpu_us: Some(40.0),
            direct_seq_p50_us: Some(60.0),
            split_seq_p50_us: Some(100.0),
            haproxy_seq_p50_us: Some(90.0),
            direct_fixed_p99_us: Some(400.0),
            split_fixed_p99_us: Some(650.0),
            agent_rss_kib: Some(26 * 1024),
            upgrade: Some(Ok(Upgrade {
                failed: 0.0,
                connection_errors: 0.0,
                p99_us: 900.0,
                steady_p99_us: 700.0,
            })),
            flags_rate_ratio: Some(0.97),
            flags_cpu_added_us: Some(0.6),
            flags_rate: Some(48500.0),
            flags_split_rate: Some(50000.0),
            flags_cpu_us: Some(30.6),
            flags_split_cpu_us: Some(30.0),
            flags_eval_ns: Some(450.0),
        }
    }

    fn verdicts(m: &Measured) -> Vec<Option<bool>> {
        evaluate(m).into_iter().map(|g| g.pass).collect()
    }

    #[test]
    fn judges_each_goal() {
        // split 0.83x and cheaper than haproxy; mirror 0.33x and behind nginx; +40 µs
        // against haproxy's +30; +250 µs at the fixed rate; opaque 0.6x; 26 MiB.
        let m = full();
        assert_eq!(
            verdicts(&m),
            [
                Some(true),
                Some(false),
                Some(false),
                Some(true),
                Some(false),
                Some(true),
                Some(true),
                Some(true),
                Some(true)
            ]
        );
        let goals = evaluate(&m);
        assert_eq!(
            goals[0].detail,
            "0.83x of direct; CPU 30.0 µs per request, haproxy 40.0 µs"
        );
        assert_eq!(
            goals[2].detail,
            "Aviary +40.0 µs, haproxy +30.0 µs over direct's 60.0 µs"
        );
        assert_eq!(goals[3].detail, "+250.0 µs (650.0 µs against 400.0 µs)");
        assert_eq!(
            goals[6].detail,
            "0 failed, 0 broken; p99 900.0 µs across the upgrade, 700.0 µs without"
        );
        let mut faster = full();
        faster.split_fixed_p99_us = Some(350.0);
        assert_eq!(
            evaluate(&faster)[3].detail,
            "-50.0 µs (350.0 µs against 400.0 µs)"
        );
    }

    #[test]
    fn a_failed_check_fails_its_goal_and_a_missing_one_is_na() {
        let mut m = full();
        m.split_cpu_us = Some(50.0);
        assert_eq!(verdicts(&m)[0], Some(false));
        m.split_cpu_us = None;
        assert_eq!(verdicts(&m)[0], None);
        // Below 0.8x fails even with the CPU figure missing.
        m.split_rate = Some(30000.0);
        assert_eq!(verdicts(&m)[0], Some(false));
    }

    #[test]
    fn sections_left_out_are_not_measured() {
        let mut m = Measured::default();
        m.rss_kib(30 * 1024);
        m.rss_kib(20 * 1024);
        assert_eq!(m.agent_rss_kib, Some(30 * 1024));
        assert_eq!(
            verdicts(&m),
            [None, None, None, None, None, Some(true), None, None, None]
        );
        assert_eq!(evaluate(&m)[7].detail, "not measured in this run");
        assert_eq!(evaluate(&m)[4].detail, "not measured in this run");
    }

    #[test]
    fn one_broken_connection_or_no_upgrade_fails_the_upgrade_goal() {
        let mut m = full();
        let Some(Ok(upgrade)) = &mut m.upgrade else {
            unreachable!()
        };
        upgrade.connection_errors = 1.0;
        assert_eq!(verdicts(&m)[6], Some(false));
        m.upgrade = Some(Err("the successor never took over".into()));
        assert_eq!(verdicts(&m)[6], Some(false));
        assert_eq!(
            evaluate(&m)[6].detail,
            "no upgrade: the successor never took over"
        );
    }

    #[test]
    fn flags_fail_on_throughput_or_cpu() {
        let m = full();
        assert_eq!(
            evaluate(&m)[7].detail,
            "0.97x of the split without (48500 req/s against 50000 req/s); CPU +0.6 µs per \
             request (30.6 µs against 30.0 µs); medians over the rounds"
        );
        let mut slower = full();
        slower.flags_rate_ratio = Some(0.94);
        assert_eq!(verdicts(&slower)[7], Some(false));
        let mut costlier = full();
        costlier.flags_cpu_added_us = Some(1.1);
        assert_eq!(verdicts(&costlier)[7], Some(false));
        costlier.flags_eval_ns = Some(1200.0);
        assert_eq!(verdicts(&costlier)[8], Some(false));
    }

    #[test]
    fn boundaries_pass() {
        let mut m = full();
        m.split_rate = Some(48000.0);
        m.split_fixed_p99_us = Some(700.0);
        m.split_seq_p50_us = Some(90.0);
        m.agent_rss_kib = Some(40 * 1024);
        m.flags_rate_ratio = Some(0.95);
        m.flags_cpu_added_us = Some(1.0);
        m.flags_eval_ns = Some(1000.0);
        let v = verdicts(&m);
        assert_eq!(
            (v[0], v[2], v[3], v[5], v[7], v[8]),
            (
                Some(true),
                Some(true),
                Some(true),
                Some(false),
                Some(true),
                Some(true)
            )
        );
    }
}
