//! `paysync healthcheck`, the container health check: against a running instance
//! (by URL and from the configuration's `http.listen`) and against a dead port.

use std::process::Command;
use std::time::Duration;

use paysync::demo::simulator::SimOptions;

use crate::support::*;

fn healthcheck(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_paysync"))
        .arg("healthcheck")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_answers_for_a_running_instance_and_fails_on_a_dead_port() {
    let broker = Broker::new();
    let t = broker.topics("healthcheck", 1).await;
    let sim = simulator(SimOptions::default()).await;
    let process = Process::spawn(broker.bootstrap(), &t, &sim.base_url(), "");
    process.wait_ready(Duration::from_secs(60)).await;
    let base = format!("http://{}", process.http);

    let (code, text) = healthcheck(&["--url", &format!("{base}/healthz")]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = healthcheck(&["--url", &format!("{base}/readyz")]);
    assert_eq!(code, Some(0), "{text}");
    // From the configuration, as the image's HEALTHCHECK runs it.
    let (code, text) = healthcheck(&["--config", process.config().to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = healthcheck(&["--ready", "--config", process.config().to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");

    // A dead port: unhealthy, exit 1, with the reason.
    let dead = free_addr();
    let (code, text) = healthcheck(&[
        "--url",
        &format!("http://{dead}/healthz"),
        "--timeout",
        "1s",
    ]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no answer"), "{text}");
    // A 503 is unhealthy too: the simulator has no /readyz.
    let (code, text) = healthcheck(&["--url", &format!("{}/readyz", sim.base_url())]);
    assert_eq!(code, Some(1), "{text}");
    // The simulator's own check, as the compose file runs it.
    let (code, text) = healthcheck(&["--url", &format!("{}/healthz", sim.base_url())]);
    assert_eq!(code, Some(0), "{text}");
}
