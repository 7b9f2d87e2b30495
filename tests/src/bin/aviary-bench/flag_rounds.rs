//! The flags section's rounds: what each measured and its agent counted, their table and notes
//! (min / median / max over the rounds), and the goals' figures.

use aviary_agent::metrics::sample;

use crate::{
    flag_eval::KEYS,
    flags::{CONFIGS, FLAGGED, RANDOM, STICKY},
    goals::Measured,
    report::{Report, Table},
    spread::Spread,
    wrk::Wrk,
    Args,
};

/// One keep-alive run: wrk's figures, and the agent's CPU and context switches per request
/// (None: no agent).
pub struct Sample {
    pub wrk: anyhow::Result<Wrk>,
    pub cpu_us: Option<f64>,
    pub switches: Option<f64>,
}

impl Sample {
    fn figure(&self, pick: fn(&Wrk) -> f64) -> Option<f64> {
        self.wrk.as_ref().ok().map(pick)
    }

    fn rate(&self) -> Option<f64> {
        self.figure(|w| w.rate)
    }

    fn cpu(&self) -> Option<f64> {
        self.cpu_us
    }
}

/// One round: direct, each configuration (in [`CONFIGS`]' order), and what its agent counted.
pub struct Round {
    pub direct: Sample,
    pub aviary: Vec<Sample>,
    pub counted: Counted,
}

/// What a round's agent counted in its metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Counted {
    /// Evaluations of each flag (in [`KEYS`]' order): all, and those that chose "on".
    pub evaluations: [(f64, f64); 3],
    /// Requests to each configuration's Service (in [`CONFIGS`]' order): all, and the
    /// canary's.
    pub requests: [(f64, f64); 3],
}

/// Reads [`Counted`] from an agent's metrics.
pub fn counted(metrics: &str) -> Counted {
    let evaluations = KEYS.map(|key| {
        let series = "aviary_flag_evaluations_total";
        let flag = ("feature_flag_key", key);
        let on = ("feature_flag_result_variant", "on");
        (
            sample(metrics, series, &[flag]),
            sample(metrics, series, &[flag, on]),
        )
    });
    let requests = CONFIGS.each_ref().map(|config| {
        let series = "aviary_requests_total";
        let to = [
            ("direction", "outbound"),
            ("destination_service", config.service),
        ];
        let canary = ("destination_version", "canary");
        let all = sample(metrics, series, &to);
        (all, sample(metrics, series, &[to[0], to[1], canary]))
    });
    Counted {
        evaluations,
        requests,
    }
}

/// `figure` of configuration `config` in each round, over the rounds.
fn spread(rounds: &[Round], config: usize, figure: fn(&Sample) -> Option<f64>) -> Option<Spread> {
    Spread::of(rounds.iter().filter_map(|r| figure(&r.aviary[config])))
}

/// `combine(figure of config, figure of base)` round by round, over the rounds.
fn paired(
    rounds: &[Round],
    (config, base): (usize, Option<usize>),
    figure: fn(&Sample) -> Option<f64>,
    combine: fn(f64, f64) -> f64,
) -> Option<Spread> {
    Spread::of(rounds.iter().filter_map(|r| {
        let base = base.map_or(&r.direct, |b| &r.aviary[b]);
        Some(combine(figure(&r.aviary[config])?, figure(base)?))
    }))
}

fn ratio(v: f64, base: f64) -> f64 {
    v / base
}

fn minus(v: f64, base: f64) -> f64 {
    v - base
}

fn show_ratios(s: Option<Spread>) -> String {
    s.map_or("-".into(), |s| {
        format!("{:.2}x / {:.2}x / {:.2}x", s.min, s.median, s.max)
    })
}

fn show(s: Option<Spread>, decimals: usize, unit: &str) -> String {
    s.map_or("-".into(), |s| s.show(decimals, unit))
}

/// The figures the goals read.
pub fn record(rounds: &[Round], measured: &mut Measured) {
    let median = |s: Option<Spread>| s.map(|s| s.median);
    let pair = (FLAGGED, Some(RANDOM));
    measured.flags_rate_ratio = median(paired(rounds, pair, Sample::rate, ratio));
    measured.flags_cpu_added_us = median(paired(rounds, pair, Sample::cpu, minus));
    measured.flags_rate = median(spread(rounds, FLAGGED, Sample::rate));
    measured.flags_split_rate = median(spread(rounds, RANDOM, Sample::rate));
    measured.flags_cpu_us = median(spread(rounds, FLAGGED, Sample::cpu));
    measured.flags_split_cpu_us = median(spread(rounds, RANDOM, Sample::cpu));
}

/// The rounds' table and notes.
pub fn report(rounds: &[Round], a: &Args, report: &mut Report) {
    report.text(&format!(
        "Keep-alive through the 90/10 split (wrk -t2 -c{}, each request another user), {} s \
         each, {} rounds; min / median / max over the rounds.",
        a.conns,
        a.secs,
        rounds.len()
    ));
    report.table(&table(rounds));
    for (config, against) in [(FLAGGED, "three flags"), (STICKY, "sticky")] {
        let pair = (config, Some(RANDOM));
        report.note(&format!(
            "{against} against the random split, round by round: throughput {}, CPU per \
             request {}",
            show_ratios(paired(rounds, pair, Sample::rate, ratio)),
            paired(rounds, pair, Sample::cpu, minus).map_or("-".into(), |s| s.show_signed(1, "µs"))
        ));
    }
    report.note(&counted_note(rounds));
    failures(rounds, report);
}

fn table(rounds: &[Round]) -> Table {
    let mut table = Table::new([
        "configuration",
        "keep-alive throughput",
        "ratio to direct",
        "proxy CPU per request",
        "context switches per request, median",
        "p50, median",
        "p99, median",
    ]);
    let direct =
        |f: fn(&Sample) -> Option<f64>| Spread::of(rounds.iter().filter_map(|r| f(&r.direct)));
    table.row([
        "direct".to_owned(),
        show(direct(Sample::rate), 0, "req/s"),
        "-".into(),
        "-".into(),
        "-".into(),
        median_us(direct(|s| s.figure(|w| w.p50_us))),
        median_us(direct(|s| s.figure(|w| w.p99_us))),
    ]);
    for (c, config) in CONFIGS.iter().enumerate() {
        table.row([
            config.name.to_owned(),
            show(spread(rounds, c, Sample::rate), 0, "req/s"),
            show_ratios(paired(rounds, (c, None), Sample::rate, ratio)),
            show(spread(rounds, c, Sample::cpu), 1, "µs"),
            spread(rounds, c, |s| s.switches).map_or("-".into(), |s| format!("{:.2}", s.median)),
            median_us(spread(rounds, c, |s| s.figure(|w| w.p50_us))),
            median_us(spread(rounds, c, |s| s.figure(|w| w.p99_us))),
        ]);
    }
    table
}

fn median_us(s: Option<Spread>) -> String {
    s.map_or("-".into(), |s| format!("{:.0} µs", s.median))
}

/// What the agents counted over the rounds: flag evaluations per request with flags, the
/// users each flag turned on, and the canary's share of each configuration's requests.
fn counted_note(rounds: &[Round]) -> String {
    let mut total = Counted::default();
    for r in rounds {
        for (t, c) in total.evaluations.iter_mut().zip(r.counted.evaluations) {
            *t = (t.0 + c.0, t.1 + c.1);
        }
        for (t, c) in total.requests.iter_mut().zip(r.counted.requests) {
            *t = (t.0 + c.0, t.1 + c.1);
        }
    }
    let percent = |(all, part): (f64, f64)| format!("{:.1}%", 100.0 * part / all);
    let evaluated: f64 = total.evaluations.iter().map(|e| e.0).sum();
    let on: Vec<String> = KEYS
        .iter()
        .zip(total.evaluations)
        .map(|(key, e)| format!("{key} {}", percent(e)))
        .collect();
    let canary: Vec<String> = CONFIGS
        .iter()
        .zip(total.requests)
        .map(|(config, r)| format!("{} {}", config.name, percent(r)))
        .collect();
    format!(
        "the agents counted {:.2} flag evaluations per request with flags ({:.0} requests), \
         users on: {}; the canary's share of the requests: {}",
        evaluated / total.requests[FLAGGED].0,
        total.requests[FLAGGED].0,
        on.join(", "),
        canary.join(", ")
    )
}

/// The runs that failed, as notes.
fn failures(rounds: &[Round], report: &mut Report) {
    for (n, r) in rounds.iter().enumerate() {
        let named = std::iter::once(("direct", &r.direct))
            .chain(CONFIGS.iter().map(|c| c.name).zip(&r.aviary));
        for (name, sample) in named {
            if let Err(e) = &sample.wrk {
                report.note(&format!("failed in round {} under {name}: {e:#}", n + 1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_agent_counted() {
        let metrics = "\
aviary_flag_evaluations_total{evaluator=\"proxy\",namespace=\"bench\",feature_flag_key=\"new-checkout\",feature_flag_result_variant=\"on\",feature_flag_result_reason=\"TARGETING_MATCH\",error_type=\"\"} 20
aviary_flag_evaluations_total{evaluator=\"proxy\",namespace=\"bench\",feature_flag_key=\"new-checkout\",feature_flag_result_variant=\"off\",feature_flag_result_reason=\"TARGETING_MATCH\",error_type=\"\"} 80
aviary_requests_total{direction=\"outbound\",destination_service=\"flagged\",destination_version=\"primary\"} 90
aviary_requests_total{direction=\"outbound\",destination_service=\"flagged\",destination_version=\"canary\"} 10
";
        let counted = counted(metrics);
        assert_eq!(counted.evaluations[0], (100.0, 20.0));
        assert_eq!(counted.evaluations[1], (0.0, 0.0));
        assert_eq!(counted.requests[FLAGGED], (100.0, 10.0));
        assert_eq!(counted.requests[RANDOM], (0.0, 0.0));
    }

    fn sample(rate: f64, cpu_us: Option<f64>) -> Sample {
        Sample {
            wrk: Ok(Wrk {
                rate,
                p50_us: 100.0,
                p99_us: 300.0,
                requests: rate * 5.0,
                non_2xx: 0.0,
                timeouts: 0.0,
                connection_errors: 0.0,
            }),
            cpu_us,
            switches: cpu_us.map(|_| 0.5),
        }
    }

    /// A round whose random split runs at `random` req/s and 20 µs, and whose flags cost
    /// `flags_cost` of its throughput and `flags_cpu` µs more.
    fn round(direct: f64, random: f64, flags_cost: f64, flags_cpu: f64) -> Round {
        Round {
            direct: sample(direct, None),
            aviary: vec![
                sample(random, Some(20.0)),
                sample(random * (1.0 - flags_cost), Some(20.0 + flags_cpu)),
                sample(random, Some(20.0)),
            ],
            counted: Counted::default(),
        }
    }

    #[test]
    fn compares_round_by_round() {
        let mut rounds = vec![
            round(1000.0, 500.0, 0.02, 0.5),
            round(800.0, 320.0, 0.10, 2.0),
            round(1000.0, 450.0, 0.04, 1.0),
        ];
        rounds[2].aviary[STICKY].wrk = Err(anyhow::anyhow!("refused"));
        let mut measured = Measured::default();
        record(&rounds, &mut measured);
        assert_eq!(
            measured.flags_rate_ratio.map(|r| format!("{r:.2}")),
            Some("0.96".into())
        );
        assert_eq!(measured.flags_cpu_added_us, Some(1.0));
        assert_eq!(measured.flags_split_rate, Some(450.0));
        let table = table(&rounds).render();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[2],
            "| direct | 800 / 1000 / 1000 req/s | - | - | - | 100 µs | 300 µs |"
        );
        assert_eq!(
            lines[3],
            "| Aviary 90/10 | 320 / 450 / 500 req/s | 0.40x / 0.45x / 0.50x | 20.0 / 20.0 / 20.0 µs \
             | 0.50 | 100 µs | 300 µs |"
        );
        assert!(lines[5].starts_with("| Aviary 90/10 sticky | 320 / 410 / 500 req/s |"));
    }
}
