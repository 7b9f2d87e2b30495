//! Gateway API durations (HTTPRoute `timeouts`): any text parses or is refused, never panics,
//! and what parses is exactly what the Gateway API's own pattern accepts.
#![no_main]

use std::{sync::LazyLock, time::Duration};

use aviary_agent::policy::gamma::parse_duration;
use libfuzzer_sys::fuzz_target;
use regex::Regex;

/// The pattern the Gateway API's CRD validates `timeouts` with.
static GATEWAY_API_DURATION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$").expect("a valid pattern"));

/// Four parts of 99999 hours each: the longest duration the pattern admits.
const LONGEST: Duration = Duration::from_secs(4 * 99_999 * 3600);

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_duration(text);
    assert_eq!(
        parsed.is_ok(),
        GATEWAY_API_DURATION.is_match(text),
        "{text:?}: {parsed:?}"
    );
    if let Ok(Some(duration)) = parsed {
        assert!(duration <= LONGEST, "{text:?}: {duration:?}");
    }
});
