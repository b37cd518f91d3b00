//! Checks the test harness itself (tests/common, scripts/kvm-host) without booting a guest:
//! a scenario runs on the KVM host, sees its devices, and its console and exit code come back.

mod common;

use common::{Batch, Scenario};

static BATCH: Batch = Batch::new(scenarios);

fn scenarios() -> Vec<Scenario> {
    vec![Scenario::new("devices").script("echo harness-marker\nls /dev/kvm /dev/vhost-net\nexit 7")]
}

#[test]
fn scenario_sees_kvm_and_reports_console_and_exit_code() {
    let outcome = BATCH.outcome("devices");
    outcome.assert_rc(7);
    outcome.assert_contains("harness-marker");
    outcome.assert_contains("/dev/kvm");
    // The emulated host loads vhost_net; a direct host may not have it.
    if common::emulated_host() {
        outcome.assert_contains("/dev/vhost-net");
    }
    assert!(
        outcome.seconds >= 0.0 && outcome.seconds < 60.0,
        "took {} s",
        outcome.seconds
    );
}
