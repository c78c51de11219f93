//! `paysync demo`: the whole pipeline in one process with no outside services.
//! librdkafka's in-process mock cluster is the broker and [`simulator`] plays the
//! connectors; paysync itself runs through [`crate::app::start`], exactly as
//! `paysync run` does. Sample requests cover every status, a retried 5xx, an
//! honoured 429, failed checks, invalid requests, and one payment followed until
//! it is final (a 1 s schedule; the simulator moves it from open to authorized to
//! paid). Two payments arrive as webhooks through the intake's real HTTP path
//! (a CM.com webhook and a signed Mollie event). Each event is printed as one
//! JSON line, each dead letter with its reason, then a summary table with the
//! followed chain and the webhooks' answers.

pub mod simulator;
pub mod stack;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::codec::avro::decode_event_json;
use crate::config::Settings;
use crate::kafka::tools::{MockBroker, RawProducer, RawRecord, TopicReader};
use crate::telemetry::sum_metric;
use simulator::{SimOptions, Simulator};

const INPUT: &str = "payment-status-requests";
const OUTPUT: &str = "payment-status-events";
const DLQ: &str = "payment-status-requests.dlq";
/// The demo's follow schedule for CM.com: every second, up to ten times.
const FOLLOW: &str = "[connectors.cm.follow]\nschedule = [[\"1s\", 10]]\npublish = \"changes\"\n[webhooks]\nlisten = \"127.0.0.1:0\"\n";
/// The demo Mollie account's webhook secret (signed events are verified with it).
const MOLLIE_WEBHOOK_SECRET: &str = "demo-webhook-secret";

/// The demo's Stripe event (test mode, as the simulator's key).
const STRIPE_EVENT: &str = r#"{"id":"evt_demo0001","object":"event","type":"payment_intent.succeeded","livemode":false,"created":1763719200,"data":{"object":{"id":"pi_success-3003","object":"payment_intent"}}}"#;
const RECHECK: &str = "payment-status-requests.recheck.1s";
/// The followed sample.
const FOLLOWED: &str = "progress-1015";
/// The followed payment is open, then authorized after this, then paid after twice this.
const PROGRESS_STEP: Duration = Duration::from_millis(1500);

/// A sample request: value and headers.
struct Sample {
    value: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

const SAMPLES: &[Sample] = &[
    Sample {
        value: r#"{"connector_transaction_id":"open-3ds-1001","payment_method_type":"GOOGLE_PAY"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"open-1002","payment_method_type":"APPLE_PAY"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"authorized-1003","payment_method_type":"CREDIT"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"success-1004","payment_method_type":"IDEAL","amount":{"minor_amount":1200,"currency":"EUR"},"merchant_transaction_id":"order-42"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"cancelled-1005","payment_method_type":"BANCONTACT_CARD"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"expired-1006","payment_method_type":"CHECKOUT"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"failure-1007"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"unknown-1008"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"flaky-1009","request_id":"retry-after-500"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"ratelimited-1010","request_id":"honour-429"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"notfound-1011"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"malformed-1012"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"success-1013","amount":{"minor_amount":999,"currency":"EUR"}}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"success-1014"}"#,
        headers: &[
            ("x-request-id", "from-header-1014"),
            ("x-merchant-id", "default"),
            ("x-connector", "cm"),
        ],
    },
    Sample {
        value: r#"{"connector_transaction_id":"success-1004","payment_method_type":"IDEAL"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"progress-1015","follow":true}"#,
        headers: &[],
    },
    Sample {
        value: "this is not json",
        headers: &[],
    },
    Sample {
        value: r#"{"merchant_id":"default"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"../etc/passwd"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"x-1","connector":"adyen"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"x-2","merchant_id":"nobody"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"x-3","payment_method_type":"PAYPAL"}"#,
        headers: &[],
    },
    Sample {
        value: r#"{"connector_transaction_id":"x-4","amount":"12 EUR"}"#,
        headers: &[],
    },
];

/// Scenarios shown for every simulated connector besides the default one.
const OTHER_CONNECTOR_SCENARIOS: &[&str] = &[
    "open-3ds-",
    "pending-",
    "authorized-",
    "success-",
    "cancelled-",
    "expired-",
    "failure-",
    "notfound-",
];

/// Every sample: the hand-written ones (default connector, and the rejections),
/// then a request per scenario for every other simulated connector.
fn samples() -> Vec<(String, Vec<(&'static str, &'static str)>)> {
    let mut out: Vec<(String, Vec<(&'static str, &'static str)>)> = SAMPLES
        .iter()
        .map(|s| (s.value.to_owned(), s.headers.to_vec()))
        .collect();
    for connector in simulator::SIMULATED {
        if connector.name == crate::config::DEFAULT_CONNECTOR {
            continue;
        }
        for (i, prefix) in OTHER_CONNECTOR_SCENARIOS.iter().enumerate() {
            out.push((
                format!(
                    r#"{{"connector_transaction_id":"{}{prefix}{}-{}","connector":"{}"}}"#,
                    connector.id_prefix,
                    connector.name,
                    2001 + i,
                    connector.name
                ),
                Vec::new(),
            ));
        }
    }
    out
}

/// Sends the demo's webhooks to the intake at `addr`, as the processors would:
/// a CM.com webhook (the method in the URL) and a signed Mollie event. Returns
/// what was sent with the answer's status.
async fn send_webhooks(addr: SocketAddr) -> Result<Vec<(String, u16)>, String> {
    let client = reqwest::Client::new();
    let mollie_event = r#"{"resource":"event","id":"event_demo0001","type":"payment-link.paid","entityId":"tr_success-3002","createdAt":"2026-11-21T10:00:00+00:00"}"#;
    let signature = crate::connectors::webhook::hmac_sha256_header(
        MOLLIE_WEBHOOK_SECRET,
        mollie_event.as_bytes(),
    );
    let sends = [
        (
            "cm: transaction success-3001 (?method=IDEAL)",
            client
                .post(format!("http://{addr}/webhooks/cm/default?method=IDEAL"))
                .header("content-type", "application/json")
                .body(r#"{"createdAt":"2026-11-21T10:00:00Z","event":"StatusChanged","transaction":"success-3001","reference":"order-77","payment":"pay-1"}"#),
        ),
        (
            "mollie: signed event for tr_success-3002",
            client
                .post(format!("http://{addr}/webhooks/mollie/default"))
                .header("content-type", "application/json")
                .header("x-mollie-signature", signature)
                .body(mollie_event),
        ),
        (
            "stripe: signed payment_intent.succeeded for pi_success-3003",
            client
                .post(format!("http://{addr}/webhooks/stripe/default"))
                .header("content-type", "application/json")
                .header(
                    "stripe-signature",
                    crate::connectors::stripe::signature_header(
                        simulator::stripe::SIM_WEBHOOK_SECRET,
                        crate::clock::system_now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                        STRIPE_EVENT.as_bytes(),
                    ),
                )
                .body(STRIPE_EVENT),
        ),
    ];
    let mut out = Vec::new();
    for (what, request) in sends {
        let status = request
            .send()
            .await
            .map_err(|e| format!("webhook ({what}): {e}"))?
            .status()
            .as_u16();
        if status != 200 {
            return Err(format!("webhook ({what}) answered {status}"));
        }
        out.push((what.to_owned(), status));
    }
    Ok(out)
}

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where to serve /metrics, /healthz, /readyz (falls back to a free port when busy).
    pub listen: SocketAddr,
}

/// The settings the demo runs with: the local stack's, on the demo's topics.
pub fn demo_settings(
    brokers: &str,
    base_url: &str,
    listen: SocketAddr,
) -> Result<Settings, String> {
    let topics = stack::Topics {
        input: INPUT.into(),
        output: OUTPUT.into(),
        dlq: DLQ.into(),
        group: "paysync-demo".into(),
        partitions: 3,
    };
    Settings::from_toml(
        &stack::StackSettings {
            brokers,
            topics: &topics,
            simulator: base_url,
            listen,
            extra: FOLLOW,
        }
        .toml(),
    )
    .map_err(|e| e.to_string())
}

/// Runs the demo; returns the text of the summary, or an error.
pub async fn run(options: DemoOptions) -> Result<String, String> {
    let started = Instant::now();
    let broker = MockBroker::start(&[(INPUT, 3), (OUTPUT, 3), (DLQ, 1), (RECHECK, 3)])?;
    let sim = Simulator::start(
        "127.0.0.1:0".parse().map_err(|_| "address")?,
        SimOptions {
            progress_step: PROGRESS_STEP,
            ..SimOptions::default()
        },
    )
    .await?;
    let listen = match tokio::net::TcpListener::bind(options.listen).await {
        Ok(l) => {
            drop(l);
            options.listen
        }
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let mut settings = demo_settings(&broker.bootstrap(), &sim.base_url(), listen)?;
    if let Some(account) = settings
        .connectors
        .get_mut("mollie")
        .and_then(|c| c.gateway.accounts.get_mut("default"))
    {
        account.webhook_secret = Some(MOLLIE_WEBHOOK_SECRET.into());
    }
    if let Some(account) = settings
        .connectors
        .get_mut("stripe")
        .and_then(|c| c.gateway.accounts.get_mut("default"))
    {
        account.webhook_secret = Some(simulator::stripe::SIM_WEBHOOK_SECRET.into());
    }
    let app = crate::app::start(settings)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "paysync demo: broker {} (in-process), CM.com simulator {}, metrics http://{}/metrics",
        broker.bootstrap(),
        sim.base_url(),
        app.http_addr()
    );

    let producer = RawProducer::new(&broker.bootstrap())?;
    let samples = samples();
    for (i, (value, headers)) in samples.iter().enumerate() {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        let key = format!("sample-{i}");
        producer
            .send(
                INPUT,
                None,
                Some(key.as_bytes()),
                Some(value.as_bytes()),
                &headers,
            )
            .await?;
    }
    let webhook_addr = app
        .webhook_addr()
        .ok_or("the demo's webhook intake is off")?;
    let webhooks = send_webhooks(webhook_addr).await?;
    let total = samples.len() + webhooks.len();
    // One record per request, plus the followed chain's two changes of status.
    let expected = total + 2;

    let brokers = broker.bootstrap();
    let records = tokio::task::spawn_blocking(move || -> Result<Vec<RawRecord>, String> {
        let mut reader = TopicReader::new(&brokers, &[(OUTPUT, 3), (DLQ, 1)])?;
        Ok(reader.read(expected, Duration::from_secs(60)))
    })
    .await
    .map_err(|e| e.to_string())??;
    let processing_time = started.elapsed();

    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    let mut chain = Vec::new();
    for r in &records {
        if r.topic == OUTPUT {
            let json = decode_event_json(r.value.as_deref().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            if json["connector_transaction_id"] == FOLLOWED {
                chain.push(json.clone());
            }
            let status = json["status"].as_str().unwrap_or("?").to_owned();
            let mut label = match json["error"]["unified_details"]["code"].as_str() {
                Some(code) if status == "PAYMENT_STATUS_UNSPECIFIED" => {
                    format!("{status} ({code})")
                }
                _ => status,
            };
            let connector = json["connector"].as_str().unwrap_or_default();
            if connector != crate::config::DEFAULT_CONNECTOR {
                label = format!("{connector}: {label}");
            }
            *by_status.entry(label).or_default() += 1;
            println!("{json}");
        } else {
            let reason = r.header("paysync-error-code").unwrap_or_default();
            *by_reason.entry(reason.clone()).or_default() += 1;
            let line = serde_json::json!({"dead_letter": {
                "reason": reason,
                "message": r.header("paysync-error-message"),
                "key": r.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
                "value": r.value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
                "source": format!("{}:{}:{}", r.header("paysync-source-topic").unwrap_or_default(),
                    r.header("paysync-source-partition").unwrap_or_default(), r.header("paysync-source-offset").unwrap_or_default()),
            }});
            println!("{line}");
        }
    }
    let metrics_text = app.metrics().render();
    app.stop().await;
    sim.stop().await;

    let events: usize = by_status.values().sum();
    let dead: usize = by_reason.values().sum();
    let mut out = String::new();
    let _ = writeln!(out, "\npaysync demo summary");
    let _ = writeln!(out, "  {:<62} {:>5}", "requests", total);
    let _ = writeln!(out, "  {:<62} {:>5}", "events", events);
    for (k, v) in &by_status {
        let _ = writeln!(out, "    {k:<60} {v:>5}");
    }
    let _ = writeln!(out, "  {:<62} {:>5}", "dead letters", dead);
    for (k, v) in &by_reason {
        let _ = writeln!(out, "    {k:<60} {v:>5}");
    }
    let _ = writeln!(
        out,
        "  {:<62} {:>5}",
        "connector calls (Get Transaction)",
        sum_metric(&metrics_text, "paysync_connector_requests_total", &[]) as u64
            - sum_metric(&metrics_text, "paysync_token_refreshes_total", &[]) as u64
    );
    let _ = writeln!(
        out,
        "  {:<62} {:>5}",
        "token requests",
        sum_metric(&metrics_text, "paysync_token_refreshes_total", &[]) as u64
    );
    let _ = writeln!(
        out,
        "  {:<62} {:>5}",
        "retries (5xx)",
        sum_metric(
            &metrics_text,
            "paysync_connector_retries_total",
            &[("reason", "5xx")]
        ) as u64
    );
    let _ = writeln!(
        out,
        "  {:<62} {:>5}",
        "retries (429, Retry-After honoured)",
        sum_metric(
            &metrics_text,
            "paysync_connector_retries_total",
            &[("reason", "429")]
        ) as u64
    );
    let _ = writeln!(
        out,
        "  {:<62} {:>5}",
        "re-checks scheduled (follow mode)",
        sum_metric(&metrics_text, "paysync_rechecks_scheduled_total", &[]) as u64
    );
    let _ = writeln!(
        out,
        "  webhooks (POST to the intake, answered after the broker's ack):"
    );
    for (what, status) in &webhooks {
        let _ = writeln!(out, "    {what:<56} {status:>7}");
    }
    chain.sort_by_key(|e| e["check_number"].as_i64());
    let _ = writeln!(out, "  followed {FOLLOWED} (published checks):");
    for e in &chain {
        let end = match (e["is_final"].as_bool(), e["next_check_at"].is_null()) {
            (_, false) => "next check due",
            (Some(true), true) => "final: chain ended",
            _ => "chain gave up",
        };
        let _ = writeln!(
            out,
            "    check {:<3} {:<47} {end}",
            e["check_number"],
            e["status"].as_str().unwrap_or("?"),
        );
    }
    let _ = writeln!(
        out,
        "  {:<62} {:>5.2}s",
        "time taken",
        processing_time.as_secs_f64()
    );
    if events + dead != expected {
        return Err(format!(
            "{out}\nexpected {} records, got {}",
            expected,
            events + dead
        ));
    }
    Ok(out)
}
