//! No blocking broker call holds what the probes and the intake need: while the
//! transactional producer's commit hangs for 30 s (the broker's answer to
//! EndTxn, and only that, delayed on librdkafka's mock cluster), `/healthz`,
//! `/metrics` and the webhook intake (on its own idempotent producer) of the
//! running binary still answer within 2 s, with both cores kept busy.
//!
//! Before the delivery core was made asynchronous, broker calls ran under the
//! transactions' lock on runtime workers, which also serve the probes and the
//! intake.

use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use paysync::demo::simulator::SimOptions;
use paysync::demo::stack::free_addr;
use paysync::telemetry::sum_metric;
use rdkafka::bindings as rd;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::ClientConfig;

use crate::support::*;

/// A mock cluster this test drives at the request level.
struct Mock {
    cluster: *mut rd::rd_kafka_mock_cluster_t,
    _client: BaseProducer,
}

impl Mock {
    fn new() -> Mock {
        let client: BaseProducer = ClientConfig::new().create().unwrap();
        // SAFETY: a valid client handle; the cluster is destroyed before it.
        let cluster = unsafe { rd::rd_kafka_mock_cluster_new(client.client().native_ptr(), 1) };
        assert!(!cluster.is_null());
        Mock {
            cluster,
            _client: client,
        }
    }

    fn bootstrap(&self) -> String {
        // SAFETY: the cluster is alive; the string is owned by it.
        unsafe { CStr::from_ptr(rd::rd_kafka_mock_cluster_bootstraps(self.cluster)) }
            .to_string_lossy()
            .into_owned()
    }

    fn topic(&self, name: &str, partitions: i32) {
        let name = CString::new(name).unwrap();
        // SAFETY: the cluster is alive; the name is a valid C string.
        let err =
            unsafe { rd::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), partitions, 1) };
        assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    }

    /// The broker answers its next EndTxn (a transaction's commit or abort)
    /// only after `delay`.
    fn delay_next_end_txn(&self, delay: Duration) {
        const END_TXN: i16 = 26;
        // SAFETY: the cluster is alive; one (error, rtt) pair as the count says.
        let err = unsafe {
            rd::rd_kafka_mock_broker_push_request_error_rtts(
                self.cluster,
                1,
                END_TXN,
                1,
                rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
                delay.as_millis() as i64,
            )
        };
        assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_mock_cluster_new, destroyed once.
        unsafe { rd::rd_kafka_mock_cluster_destroy(self.cluster) };
    }
}

/// How long one GET or POST took, and its status.
async fn timed(request: reqwest::RequestBuilder) -> (Duration, u16) {
    let started = Instant::now();
    let status = request
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    (started.elapsed(), status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_the_intake_answer_while_a_commit_hangs() {
    let mock = Mock::new();
    let t = Topics::unique("hang", 1);
    for (name, partitions) in t.specs() {
        mock.topic(name, partitions);
    }
    let sim = simulator(SimOptions::default()).await;
    let intake = free_addr();
    let extra = format!(
        "[webhooks]\nlisten = \"{intake}\"\n[connectors.mollie.accounts.hooks]\n{}",
        paysync::demo::simulator::mollie::ACCOUNT
    );
    let process = Process::spawn_full(
        &mock.bootstrap(),
        &t,
        &sim.base_url(),
        &extra,
        &[("PAYSYNC_PROCESSING__GUARANTEE", "exactly_once")],
    );
    process.wait_ready(Duration::from_secs(60)).await;
    let committed = |m: &str| {
        sum_metric(
            m,
            "paysync_transactions_total",
            &[("topic", t.input.as_str()), ("outcome", "committed")],
        )
    };
    // Work to commit, and the commit's answer held back for 30 s.
    mock.delay_next_end_txn(Duration::from_secs(30));
    for i in 0..5 {
        send_request(
            &mock.bootstrap(),
            &t.input,
            &format!("success-hang-{i}"),
            &format!(r#"{{"connector_transaction_id":"success-hang-{i}"}}"#),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = committed(&process.metrics().await);
    // Both cores busy.
    let stop = Arc::new(AtomicBool::new(false));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                x
            })
        })
        .collect();
    let client = reqwest::Client::new();
    let mut slowest = Duration::ZERO;
    for round in 0..10 {
        let healthz = timed(client.get(format!("http://{}/healthz", process.http))).await;
        let metrics = timed(client.get(format!("http://{}/metrics", process.http))).await;
        let webhook = timed(
            client
                .post(format!("http://{intake}/webhooks/mollie/hooks"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("id=tr_hang{round}")),
        )
        .await;
        for (what, (took, status)) in [
            ("/healthz", healthz),
            ("/metrics", metrics),
            ("webhook", webhook),
        ] {
            assert_eq!(
                status,
                200,
                "{what} in round {round}; log:\n{}",
                process.log()
            );
            slowest = slowest.max(took);
            assert!(
                took < Duration::from_secs(2),
                "{what} took {took:?} while the commit hung (round {round})"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        b.join().unwrap();
    }
    let during = committed(&process.metrics().await);
    assert_eq!(
        during, before,
        "no transaction committed meanwhile: the commit was hanging"
    );
    println!("slowest answer while the commit hung: {slowest:?}");
}
