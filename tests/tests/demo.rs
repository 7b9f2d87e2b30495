//! The README's demo, in its short mode, with its report checked.

use std::process::Command;

#[test]
fn the_demo_shows_a_canary_split_mirroring_promotion_a_flag_opt_out_and_fail_open() {
    if !aviary_tests::privileged() {
        return;
    }
    let out = Command::new(aviary_tests::workspace_bin("aviary-demo"))
        .arg("--short")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<&str> = stdout.split("\n[").collect();
    assert_eq!(steps.len(), 9, "{stdout}");
    let expect = |step: usize, text: &str| {
        assert!(
            steps[step].contains(text),
            "step {step} lacks {text:?}: {stdout}"
        )
    };

    // 200 GETs split about 90/10 (20 expected; ±4.4 sigma), all answered 200, all proxied.
    expect(3, "200 x 200 | through the node proxy | p50 ");
    let canary: u32 = steps[3]
        .lines()
        .find(|l| l.contains("200 GETs"))
        .and_then(|l| {
            l.split(" podinfo-canary")
                .next()?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
        .expect("a canary count");
    assert!((5..=40).contains(&canary), "canary got {canary} of 200");
    expect(4, "podinfo-mirror got 200 GET copies");
    expect(4, "POSTs mirrored: none");
    expect(4, "aviary_mirror_requests_total{outcome=\"sent\"} 200");
    expect(
        4,
        "aviary_mirror_requests_total{outcome=\"skipped_not_idempotent\"} 50",
    );
    expect(5, "0 podinfo-primary (0.0%),  200 podinfo-canary (100.0%)");
    // The flag: 20 of 100 users expected on the canary (a fixed hash, so a fixed count), then
    // 50, keeping every one of the first.
    let on_canary = |percent: u32| -> usize {
        let prefix = format!("at {percent}%: ");
        steps[6]
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .and_then(|l| l.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no count at {percent}%: {stdout}"))
    };
    let (first, then) = (on_canary(20), on_canary(50));
    assert!((8..=35).contains(&first), "{first} at 20%: {stdout}");
    assert!((35..=65).contains(&then), "{then} at 50%: {stdout}");
    expect(
        6,
        &format!("{first} of the {first} users on it at 20% are still"),
    );
    expect(6, "the mesh sent the user to for 100 of 100 users");
    expect(7, "direct, not proxied");
    expect(8, "direct, not proxied");
    assert!(stdout.contains("connect_failed_open    1"), "{stdout}");
    assert!(stdout.contains("Done: the node, its pods and every eBPF object are gone."));
}
