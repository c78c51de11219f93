//! The webhook intake facing the internet, through the binary with raw
//! sockets: connections bounded in number (the headless closed first, the
//! backlog waiting, nothing accepted only to be closed), idle time, requests
//! per connection, head size, a peer that reads nothing dropped after the
//! write timeout; readiness of its own (`/readyz/webhooks`, `--role`); TLS; a
//! fatal producer error rebuilt; and a small flood of forgeries and bad
//! clients beside genuine webhooks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use paysync::connectors::webhook::hmac_sha256_header;
use paysync::demo::simulator::{Latency, SimOptions};
use paysync::telemetry::sum_metric;

use crate::support::*;
use crate::webhooks::{intake_with, post, InputReader, Intake, SECRET};

const FORM: &str = "application/x-www-form-urlencoded";

/// A complete classic Mollie webhook for `tx` to the default account.
fn classic(tx: &str) -> Vec<u8> {
    let body = format!("id={tx}");
    format!(
        "POST /webhooks/mollie/default HTTP/1.1\r\nhost: paysync\r\ncontent-type: {FORM}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A small request every route refuses (404), for connection tests.
const MISS: &[u8] =
    b"POST /webhooks/nothing/here HTTP/1.1\r\nhost: paysync\r\ncontent-length: 0\r\n\r\n";

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads one response head and its body (by content-length).
fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).ok()?;
    Some(head + &String::from_utf8_lossy(&body))
}

/// True once the peer closed (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

async fn metric(process: &Process, name: &str, labels: &[(&str, &str)]) -> f64 {
    sum_metric(&process.metrics().await, name, labels)
}

/// Fails the test with the intake's metrics and log.
async fn fail(process: &Process, e: tokio::task::JoinError) -> ! {
    let m = process.metrics().await;
    let lines: Vec<&str> = m.lines().filter(|l| l.contains("webhook")).collect();
    panic!("{e}\n{}\n{}", lines.join("\n"), process.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_and_each_clock_closes_what_it_bounds() {
    let broker = Broker::new();
    let settings = "max_connections = 4\nheader_read_timeout = \"1s\"\nidle_timeout = \"1s\"\n\
                    body_read_timeout = \"2s\"\nmax_requests_per_connection = 3\nmax_headers = 16";
    let Intake {
        brokers,
        t,
        sim,
        listen,
        process,
    } = intake_with(
        &broker,
        "intake-conns",
        1,
        settings,
        SimOptions::default(),
        &[],
    )
    .await;
    let mut input = InputReader::new(&brokers, &t);

    let checks = tokio::task::spawn_blocking(move || {
        // A head over max_headers: 431.
        let mut s = connect(listen);
        let mut head = String::from("POST /webhooks/mollie/default HTTP/1.1\r\nhost: paysync\r\n");
        for i in 0..20 {
            head.push_str(&format!("x-filler-{i}: {i}\r\n"));
        }
        head.push_str("content-length: 0\r\n\r\n");
        s.write_all(head.as_bytes()).unwrap();
        let answer = read_response(&mut s).unwrap_or_default();
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

        // Three requests on one connection, the third answered with close.
        let mut s = connect(listen);
        for i in 1..=3 {
            s.write_all(MISS).unwrap();
            let answer = read_response(&mut s).unwrap();
            assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
            let closes = answer.to_ascii_lowercase().contains("connection: close");
            assert_eq!(closes, i == 3, "request {i}: {answer}");
        }
        assert!(
            closed_within(&mut s, Duration::from_secs(2)),
            "open after its last request"
        );

        // Kept alive, then idle: closed after idle_timeout (1 s, watched every 250 ms).
        let mut s = connect(listen);
        s.write_all(MISS).unwrap();
        read_response(&mut s).unwrap();
        let idle_from = Instant::now();
        assert!(closed_within(&mut s, Duration::from_secs(5)));
        let idle = idle_from.elapsed();
        assert!(
            idle >= Duration::from_millis(900) && idle < Duration::from_millis(2500),
            "idle connection closed after {idle:?}"
        );

        // At the bound, a connection without a head makes room at once.
        let headless: Vec<TcpStream> = (0..4).map(|_| connect(listen)).collect();
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let mut s = connect(listen);
        s.write_all(&classic("tr_success-evict-1")).unwrap();
        let answer = read_response(&mut s).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let evicting = started.elapsed();
        assert!(
            evicting < Duration::from_millis(800),
            "served after {evicting:?}: it waited for a header timeout instead of closing a headless connection"
        );
        drop((headless, s));
        std::thread::sleep(Duration::from_millis(1500)); // the headless are gone
    });
    if let Err(e) = checks.await {
        fail(&process, e).await;
    }
    // One headless connection made room: none was closed for a connection
    // that was not there (the listener's readiness outlives the backlog).
    assert_eq!(
        metric(
            &process,
            "paysync_webhook_connections_closed_total",
            &[("reason", "evicted")]
        )
        .await,
        1.0
    );

    let checks = tokio::task::spawn_blocking(move || {
        // At the bound with every connection's body arriving slowly, the
        // next is served at once: the body that has been arriving longest
        // makes room (a client could otherwise hold every place with one
        // byte a second); the others are answered 408 at body_read_timeout.
        let mut slow: Vec<TcpStream> = (0..4)
            .map(|i| {
                let mut s = connect(listen);
                s.write_all(
                    format!("POST /webhooks/mollie/default HTTP/1.1\r\nhost: p\r\ncontent-type: {FORM}\r\ncontent-length: 100\r\n\r\nid=tr_slow{i}").as_bytes(),
                )
                .unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(400));
        let started = Instant::now();
        let mut s = connect(listen);
        s.write_all(&classic("tr_success-backlog-1")).unwrap();
        let answer = read_response(&mut s).unwrap();
        let waited = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            waited < Duration::from_millis(1000),
            "served after {waited:?}: it waited for the slow bodies' timeout"
        );
        let answers: Vec<String> = slow
            .iter_mut()
            .map(|s| read_response(s).unwrap_or_default())
            .collect();
        let timed_out = answers
            .iter()
            .filter(|a| a.starts_with("HTTP/1.1 408"))
            .count();
        let closed = answers.iter().filter(|a| a.is_empty()).count();
        assert_eq!((timed_out, closed), (3, 1), "{answers:?}");
    });
    if let Err(e) = checks.await {
        fail(&process, e).await;
    }
    // Both genuine webhooks reached Kafka.
    let records = input.read(2, Duration::from_secs(10)).await;
    let mut keys: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(r.key.as_deref().unwrap()).into_owned())
        .collect();
    keys.sort();
    assert_eq!(keys, ["tr_success-backlog-1", "tr_success-evict-1"]);
    let closed = |reason: &'static str| {
        let process = &process;
        async move {
            metric(
                process,
                "paysync_webhook_connections_closed_total",
                &[("reason", reason)],
            )
            .await
        }
    };
    assert_eq!(
        closed("evicted").await,
        2.0,
        "a headless connection, then the slowest body"
    );
    assert!(closed("idle_timeout").await >= 1.0);
    sim.stop().await;
}

/// A peer that pipelines requests and reads nothing: its answers pile up until
/// writes block, and it is dropped `write_timeout` later (before, one was
/// still held after 70 s with 3 MB queued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_reads_nothing_is_dropped_after_the_write_timeout() {
    let broker = Broker::new();
    let settings = "write_timeout = \"2s\"\nmax_requests_per_connection = 1000000";
    let Intake {
        sim,
        listen,
        process,
        ..
    } = intake_with(
        &broker,
        "intake-noread",
        1,
        settings,
        SimOptions::default(),
        &[],
    )
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(listen).await.unwrap().into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut stream = stream;
        let burst: Vec<u8> = MISS.repeat(100);
        // Until the server stops reading and then closes: the write fails.
        for _ in 0..100_000 {
            if stream.write_all(&burst).is_err() {
                return true;
            }
        }
        false
    });
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if metric(
            &process,
            "paysync_webhook_connections_closed_total",
            &[("reason", "write_timeout")],
        )
        .await
            >= 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still held after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dropped = started.elapsed();
    assert!(
        tokio::task::spawn_blocking(move || writer.join().unwrap())
            .await
            .unwrap(),
        "the peer's writes never failed"
    );
    assert!(
        dropped < Duration::from_secs(30),
        "dropped after {dropped:?}"
    );
    // The intake still serves.
    let answer = post(
        &format!("http://{listen}/webhooks/mollie/default"),
        FORM,
        &[],
        b"id=tr_success-after-1",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    sim.stop().await;
}

/// The intake's readiness is its own: a connector outage holds the
/// processor's watermark (`/readyz` 503) while `/readyz/webhooks` stays 200
/// and webhooks are stored; `--role webhooks` runs the intake alone and
/// `--role processor` without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intake_is_ready_on_its_own_and_runs_alone() {
    let broker = Broker::new();
    let slow = SimOptions {
        latency: Latency::Fixed(Duration::from_secs(120)),
        ..SimOptions::default()
    };
    let Intake {
        brokers,
        t,
        sim,
        listen,
        process,
    } = intake_with(
        &broker,
        "intake-ready",
        1,
        "",
        slow,
        &[("PAYSYNC_PROCESSING__STUCK_AFTER", "1s")],
    )
    .await;
    process.wait_ready(Duration::from_secs(60)).await;
    let url = format!("http://{listen}/webhooks/mollie/default");
    let first = post(&url, FORM, &[], b"id=tr_success-outage-1").await;
    assert_eq!(first.status, 200, "{}", first.body);
    // The check hangs on the connector: the processor turns unready...
    let http = process.http;
    let get = |path: &'static str| async move {
        let r = reqwest::get(format!("http://{http}/{path}")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get("readyz").await;
        if status == 503 {
            assert!(body.contains("has not moved"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...and the intake does not.
    assert_eq!(get("readyz/webhooks").await.0, 200);
    let second = post(&url, FORM, &[], b"id=tr_success-outage-2").await;
    assert_eq!(second.status, 200, "{}", second.body);
    let mut input = InputReader::new(&brokers, &t);
    assert_eq!(input.read(2, Duration::from_secs(10)).await.len(), 2);
    drop(process);

    // The intake alone: ready without a consumer or a connector call; what it
    // stores stays unprocessed in the input topic.
    let alone = Process::spawn_full(
        &brokers,
        &t,
        &sim.base_url(),
        &crate::webhooks::webhook_settings(listen, ""),
        &[("PAYSYNC_ROLE", "webhooks")],
    );
    alone.wait_ready(Duration::from_secs(30)).await;
    let answer = post(&url, FORM, &[], b"id=tr_success-alone-1").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let records = input.read(1, Duration::from_secs(10)).await;
    assert_eq!(records[0].key.as_deref(), Some(&b"tr_success-alone-1"[..]));
    let metrics = alone.metrics().await;
    assert_eq!(sum_metric(&metrics, "paysync_requests_total", &[]), 0.0);
    drop(alone);

    // The processor alone: no intake listening, /readyz/webhooks is 404.
    let processor = Process::spawn_full(
        &brokers,
        &t,
        &sim.base_url(),
        &crate::webhooks::webhook_settings(listen, ""),
        &[("PAYSYNC_ROLE", "processor")],
    );
    processor.wait_ready(Duration::from_secs(60)).await;
    let r = reqwest::get(format!("http://{}/readyz/webhooks", processor.http))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(TcpStream::connect(listen).is_err(), "the intake listens");
    sim.stop().await;
}

/// TLS on the listener: a client that trusts the certificate posts a webhook
/// and gets its 200; one that does not trust it gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_speaks_tls_when_given_a_certificate() {
    let broker = Broker::new();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let settings = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        dir.join("server.pem").display(),
        dir.join("server-key.pem").display()
    );
    let Intake {
        sim,
        listen,
        process,
        ..
    } = intake_with(
        &broker,
        "intake-tls",
        1,
        &settings,
        SimOptions::default(),
        &[],
    )
    .await;
    let cert = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(cert)
        .build()
        .unwrap();
    let url = format!(
        "https://localhost:{}/webhooks/mollie/default",
        listen.port()
    );
    let r = trusting
        .post(&url)
        .header("content-type", FORM)
        .body("id=tr_success-tls-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        reqwest::Client::new()
            .post(&url)
            .body("id=tr_x")
            .send()
            .await
            .is_err(),
        "an untrusted certificate was accepted"
    );
    // Plain HTTP to the TLS port gets no webhook through.
    let plain = reqwest::Client::new()
        .post(format!("http://{listen}/webhooks/mollie/default"))
        .body("id=tr_x")
        .send()
        .await;
    assert!(plain.map(|r| r.status().as_u16() != 200).unwrap_or(true));
    let metrics = process.metrics().await;
    assert_eq!(
        sum_metric(
            &metrics,
            "paysync_webhooks_total",
            &[("outcome", "accepted")]
        ),
        1.0
    );
    sim.stop().await;
}

/// A small flood beside genuine signed webhooks (the README's benchmark runs
/// the large one on the release binary): forged signatures from the genuine
/// sender's own address, clients that read nothing, idle connections and
/// bodies one byte a second. Every genuine webhook is answered 200 within a
/// second and reaches Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_and_bad_clients_do_not_get_genuine_webhooks_refused() {
    let broker = Broker::new();
    // The account's bucket (30/s) takes the genuine 20/s, and is far less
    // than the forgeries' rate: were they charged to it, the genuine ones
    // would be refused.
    // The verification budget is out of the way (the forgers, as fast as they
    // are answered, reach about 24,000 a second here; past the budget every
    // request is 503, by design): this test is about the account's bucket.
    let settings = "requests_per_second = 30\nburst = 30\nmax_connections = 512\n\
                    max_verifications_per_second = 1000000";
    let Intake {
        brokers,
        t,
        sim,
        listen,
        process,
    } = intake_with(
        &broker,
        "intake-flood",
        2,
        settings,
        SimOptions::default(),
        &[],
    )
    .await;
    let mut input = InputReader::new(&brokers, &t);
    let url = format!("http://{listen}/webhooks/mollie/signed");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 100 idle connections, 20 slow bodies, 20 that pipeline and read nothing.
    let mut held: Vec<TcpStream> = (0..100).map(|_| connect(listen)).collect();
    let bad = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut slow: Vec<TcpStream> = (0..20)
                .map(|_| {
                    let mut s = connect(listen);
                    s.write_all(b"POST /webhooks/mollie/signed HTTP/1.1\r\nhost: p\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{").unwrap();
                    s
                })
                .collect();
            let mut deaf: Vec<TcpStream> = (0..20).map(|_| connect(listen)).collect();
            for s in &mut deaf {
                s.set_write_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
            }
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut slow {
                    let _ = s.write_all(b" ");
                }
                for s in &mut deaf {
                    let _ = s.write_all(&MISS.repeat(20));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    // Forgeries: 4 senders, as fast as they are answered.
    let forgers: Vec<_> = (0..4)
        .map(|i| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body =
                        format!(r#"{{"id":"event_f{i}_{n}","entityId":"tr_forged{i}x{n}"}}"#);
                    let sig = hmac_sha256_header("whsec_a_guess", body.as_bytes());
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("x-mollie-signature", sig)
                        .body(body)
                        .send()
                        .await;
                    if let Ok(r) = r {
                        let status = r.status().as_u16();
                        let text = r.text().await.unwrap_or_default();
                        assert_eq!(status, 401, "{text}");
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    // 60 genuine webhooks, 20 a second.
    let mut slowest = Duration::ZERO;
    for i in 0..60 {
        let body = format!(r#"{{"id":"event_g{i}","entityId":"tr_success-flood-{i}"}}"#);
        let sig = hmac_sha256_header(SECRET, body.as_bytes());
        let started = Instant::now();
        let answer = post(
            &url,
            "application/json",
            &[("x-mollie-signature", sig.as_str())],
            body.as_bytes(),
        )
        .await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert_eq!(answer.status, 200, "genuine {i}: {}", answer.body);
        assert!(took < Duration::from_secs(1), "genuine {i} took {took:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut forged = 0;
    for f in forgers {
        match f.await {
            Ok(n) => forged += n,
            Err(e) => fail(&process, e).await,
        }
    }
    bad.join().unwrap();
    held.clear();
    assert!(forged >= 300, "only {forged} forgeries sent");
    let records = input.read(60, Duration::from_secs(20)).await;
    let mut keys: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(r.key.as_deref().unwrap()).into_owned())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 60, "every genuine webhook's request in Kafka");
    let metrics = process.metrics().await;
    assert!(
        sum_metric(
            &metrics,
            "paysync_webhooks_total",
            &[("outcome", "bad_signature")]
        ) >= forged as f64 - 4.0
    );
    assert_eq!(
        sum_metric(
            &metrics,
            "paysync_webhooks_total",
            &[("outcome", "throttled")]
        ),
        0.0
    );
    println!("flood: {forged} forgeries, slowest genuine answer {slowest:?}");
    sim.stop().await;
}

/// A fatal error of the intake's producer rebuilds it (counted), 5 times in
/// 10 minutes; the sixth fails liveness, so the orchestrator restarts the
/// process (before, a fatal error only flipped readiness, for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_rebuilds_the_producer_then_fails_liveness() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use paysync::codec::request::WebhookRequest;
    use paysync::domain::TransactionId;
    use paysync::intake::Store;
    use paysync::kafka::intake_producer::{IntakeProducer, MAX_REBUILDS};
    use rdkafka::bindings as rd;

    let broker = Broker::mock();
    let t = broker.topics("intake-fatal", 1).await;
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", broker.bootstrap())
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "5000");
    let rebuilds = Arc::new(AtomicU64::new(0));
    let counted = rebuilds.clone();
    let producer = IntakeProducer::new(
        config,
        Box::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        }),
    )
    .unwrap();
    let record = WebhookRequest {
        transaction_id: TransactionId::parse("tr_fatal").unwrap(),
        connector: "mollie".into(),
        merchant_id: "default".into(),
        request_id: "webhook:mollie:1".into(),
        follow: false,
        payment_method_type: None,
        event_id: None,
        connected_account: None,
    }
    .encode();
    let topic = t.input.clone();
    let producer = &producer;
    let store = |_: &IntakeProducer| producer.store(&topic, &record, Duration::from_secs(10));
    store(producer).await.unwrap();
    for round in 1..=MAX_REBUILDS as u64 + 1 {
        let client = producer.client();
        let reason = std::ffi::CString::new("injected by the test").unwrap();
        #[allow(unsafe_code)]
        // SAFETY: the producer outlives the call; the reason is a valid C string.
        unsafe {
            rd::rd_kafka_test_fatal_error(
                rdkafka::producer::Producer::client(&*client).native_ptr(),
                rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
        drop(client);
        assert!(
            store(producer).await.is_err(),
            "round {round}: stored on a fatal producer"
        );
        if round <= MAX_REBUILDS as u64 {
            assert_eq!(rebuilds.load(Ordering::Relaxed), round);
            assert!(producer.health().alive.is_ok(), "round {round}");
            store(producer).await.unwrap();
        } else {
            assert_eq!(rebuilds.load(Ordering::Relaxed), MAX_REBUILDS as u64);
            let why = producer.health().alive.unwrap_err();
            assert!(why.contains("restart"), "{why}");
            assert!(producer.health().ready.is_err());
        }
    }
}

/// Bodies being read are bounded in bytes across connections: 64 clients
/// declaring 1 MiB bodies to the Stripe route (its limit) and sending them
/// slowly hold 64 MiB; the next body is answered 503 before it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_flight_are_bounded_in_bytes() {
    let broker = Broker::new();
    let Intake {
        sim,
        listen,
        process,
        ..
    } = intake_with(
        &broker,
        "intake-bodies",
        1,
        "body_read_timeout = \"20s\"",
        SimOptions::default(),
        &[("PAYSYNC_ROLE", "webhooks")],
    )
    .await;
    let head = |n: usize| {
        format!(
            "POST /webhooks/stripe/shop HTTP/1.1\r\nhost: p\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n\r\n{{"
        )
    };
    let checks = tokio::task::spawn_blocking(move || {
        let held: Vec<TcpStream> = (0..64)
            .map(|_| {
                let mut s = connect(listen);
                s.write_all(head(1024 * 1024).as_bytes()).unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let mut s = connect(listen);
        s.write_all(head(1024 * 1024).as_bytes()).unwrap();
        let answer = read_response(&mut s).unwrap_or_default();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
        drop(held);
    });
    if let Err(e) = checks.await {
        fail(&process, e).await;
    }
    assert!(
        metric(
            &process,
            "paysync_webhooks_total",
            &[("connector", "stripe"), ("outcome", "overloaded")]
        )
        .await
            >= 1.0
    );
    sim.stop().await;
}
