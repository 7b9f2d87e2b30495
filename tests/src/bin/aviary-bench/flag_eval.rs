//! The flags the flags section evaluates, and the cost of one evaluation in process (no
//! network): `FlagSet::evaluate` with a context like the one the proxy makes for a request,
//! many times over, repeated.

use std::{
    hint::black_box,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use aviary_flags::FlagSet;
use serde_json::{json, Map, Value};

use crate::{report::Table, spread::Spread};

/// A fractional rollout: on for 20% of users, by their targeting key.
pub const FRACTIONAL: &str = "new-checkout";
/// A rule on a request attribute: on for requests from the Netherlands and Belgium.
pub const RULE: &str = "eu-banner";
/// No rule: its default variant.
pub const STATIC: &str = "dark-mode";
/// The three, as the Service names them (`aviary.dev/flags`).
pub const KEYS: [&str; 3] = [FRACTIONAL, RULE, STATIC];
/// The countries the bench's users come from, in turn (two of five are in the rule's).
pub const COUNTRIES: [&str; 5] = ["NL", "BE", "DE", "FR", "US"];

/// Evaluations per timed run, and timed runs per row.
const ITERATIONS: usize = 200_000;
const REPEATS: usize = 9;
/// Distinct users the timed runs go through.
const USERS: usize = 4096;

/// The flags, as a FeatureFlag's `spec.flagSpec` holds them (flagd's format).
pub fn flag_spec() -> Value {
    let on_off = json!({"on": true, "off": false});
    json!({"flags": {
        FRACTIONAL: {
            "state": "ENABLED", "variants": on_off, "defaultVariant": "off",
            "targeting": {"fractional": [["on", 20], ["off", 80]]},
        },
        RULE: {
            "state": "ENABLED", "variants": on_off, "defaultVariant": "off",
            "targeting": {"if": [{"in": [{"var": "headers.x-country"}, ["NL", "BE"]]}, "on", "off"]},
        },
        STATIC: {"state": "ENABLED", "variants": on_off, "defaultVariant": "on"},
    }})
}

/// The context the proxy makes for the bench's user `n` (agent/src/proxy/http/flags.rs): the
/// targeting key from `x-user-id`, the request's method, path and host, the `x-country`
/// header the Service names, and the source pod.
pub fn context(n: usize) -> Map<String, Value> {
    let context = json!({
        "targetingKey": format!("user-{n}"),
        "method": "GET",
        "path": "/",
        "host": "10.96.3.22",
        "headers": {"x-country": COUNTRIES[n % COUNTRIES.len()]},
        "source": {"namespace": "bench", "workload": "fclient"},
    });
    match context {
        Value::Object(fields) => fields,
        _ => unreachable!("an object"),
    }
}

/// One row of the table: the flags evaluated one after the other, per request.
pub struct Row {
    pub name: &'static str,
    pub keys: &'static [&'static str],
    /// ns per request (the row's flags each evaluated once), over the timed runs.
    pub ns: Spread,
    /// The share of users each flag of the row turns on.
    pub on: Vec<f64>,
}

const ROWS: [(&str, &[&str]); 4] = [
    ("fractional rollout (20% by targetingKey)", &[FRACTIONAL]),
    ("rule on headers.x-country (in NL, BE)", &[RULE]),
    ("static (no rule)", &[STATIC]),
    ("the three, one after the other", &KEYS),
];

/// Times each row `REPEATS` times, the rows in turn, each run `ITERATIONS` requests.
pub fn measure() -> anyhow::Result<Vec<Row>> {
    let set = FlagSet::parse(&flag_spec()).context("the bench's flags")?;
    anyhow::ensure!(set.refused().next().is_none(), "a bench flag is refused");
    let contexts: Vec<Map<String, Value>> = (0..USERS).map(context).collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    // Warm up (caches, the allocator), untimed.
    for (_, keys) in ROWS {
        time_ns(&set, keys, &contexts, ITERATIONS / 10, now);
    }
    let mut runs = vec![Vec::new(); ROWS.len()];
    for _ in 0..REPEATS {
        for ((_, keys), runs) in ROWS.iter().zip(&mut runs) {
            runs.push(time_ns(&set, keys, &contexts, ITERATIONS, now));
        }
    }
    let on = |key: &str| {
        let on = contexts
            .iter()
            .filter(|c| set.evaluate(key, *c, now).variant == Some("on"))
            .count();
        on as f64 / contexts.len() as f64
    };
    ROWS.iter()
        .zip(runs)
        .map(|((name, keys), runs)| {
            Ok(Row {
                name,
                keys,
                ns: Spread::of(runs).context("no timed run")?,
                on: keys.iter().map(|key| on(key)).collect(),
            })
        })
        .collect()
}

/// ns per request: `iterations` requests, each a user of `contexts` in turn, each evaluating
/// `keys`.
fn time_ns(
    set: &FlagSet,
    keys: &[&str],
    contexts: &[Map<String, Value>],
    iterations: usize,
    now: i64,
) -> f64 {
    let start = Instant::now();
    for i in 0..iterations {
        let context = black_box(&contexts[i % contexts.len()]);
        for key in keys {
            black_box(set.evaluate(black_box(key), context, now));
        }
    }
    start.elapsed().as_nanos() as f64 / iterations as f64
}

/// The paragraph above the table.
pub fn intro() -> String {
    format!(
        "One evaluation in process (no network): FlagSet::evaluate with the proxy's context \
         (targetingKey, method, path, host, headers.x-country, source), {ITERATIONS} requests \
         per timed run going through {USERS} users, {REPEATS} runs per row, the rows in turn."
    )
}

pub fn table(rows: &[Row]) -> Table {
    let mut table = Table::new([
        "flags evaluated per request",
        "ns per request, min / median / max",
        "users on",
    ]);
    for row in rows {
        let on: Vec<String> = row
            .keys
            .iter()
            .zip(&row.on)
            .map(|(key, share)| format!("{key} {:.1}%", 100.0 * share))
            .collect();
        table.row([row.name.to_owned(), row.ns.show(0, "ns"), on.join(", ")]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_turn_on_the_users_they_say() {
        let set = FlagSet::parse(&flag_spec()).unwrap();
        assert_eq!(set.refused().count(), 0);
        let on = |key: &str| {
            (0..1000)
                .filter(|&n| set.evaluate(key, &context(n), 0).variant == Some("on"))
                .count()
        };
        assert!((150..=250).contains(&on(FRACTIONAL)), "{}", on(FRACTIONAL));
        assert_eq!(on(RULE), 400);
        assert_eq!(on(STATIC), 1000);
    }
}
