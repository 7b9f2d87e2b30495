//! The README's demo, in its short mode, with its report checked.

use std::process::Command;

#[test]
fn the_demo_shows_a_canary_split_mirroring_promotion_opt_out_and_fail_open() {
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
    assert_eq!(steps.len(), 8, "{stdout}");
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
    expect(6, "direct, not proxied");
    expect(7, "direct, not proxied");
    assert!(stdout.contains("connect_failed_open    1"), "{stdout}");
    assert!(stdout.contains("Done: the node, its pods and every eBPF object are gone."));
}
