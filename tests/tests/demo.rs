//! The README's demo, in its short mode, with its report checked.

use std::process::Command;

#[test]
fn the_demo_shows_capture_opt_out_runtime_unenrollment_and_fail_open() {
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
    assert_eq!(steps.len(), 7, "{stdout}");
    let expect =
        |step: usize, text: &str| assert!(steps[step].contains(text), "step {step}: {stdout}");
    expect(3, "20/20 connections through the node proxy");
    expect(4, "20/20 connections direct");
    expect(5, "20/20 connections direct");
    expect(5, "still works through the proxy (peer 10.244.1.1)");
    expect(6, "20/20 connections direct");
    assert!(stdout.contains("connect_failed_open    21"), "{stdout}");
    assert!(stdout.contains("Done: the node, its pods and every eBPF object are gone."));
}
