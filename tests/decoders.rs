//! Property tests over every decoder of outside bytes: request values (JSON and
//! both Avro framings) with arbitrary Kafka headers, every registered connector's
//! status, error and token bodies, and `Retry-After` values. Each decoder gets
//! arbitrary input and structure-aware input (valid documents, the connectors'
//! recorded fixtures among them, mutated field by field; Avro datums cut, extended
//! and bit-flipped). The property: no panic, and every outcome is a value
//! that satisfies the type's invariants or a typed rejection.
//!
//! Cases per decoder: `PAYSYNC_FUZZ_CASES` (default 2,000, CI's short run). The
//! dedicated run: `PAYSYNC_FUZZ_CASES=100000 cargo test --release --test decoders`.

use std::time::{Duration, SystemTime};

use paysync::codec::avro::Schemas;
use paysync::codec::{
    decode_request, AcceptedSchemaIds, DecodeOptions, RejectCode, SourcePosition,
};
use paysync::connectors::{parse_retry_after, registry, Connector, HttpResponse};
use paysync::domain::{StatusCheckRequest, TransactionId};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

/// The largest single allocation asked of the allocator since the last reset
/// (every thread): the property tests below bound it for declared lengths.
static LARGEST_ALLOCATION: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct Measuring;

// SAFETY: forwards every call to the system allocator unchanged; it only records
// the requested size.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Measuring {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new, std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.realloc(ptr, layout, new)
    }
}

#[global_allocator]
static ALLOCATOR: Measuring = Measuring;

fn cases() -> u32 {
    std::env::var("PAYSYNC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

const POS: SourcePosition<'static> = SourcePosition {
    topic: "in",
    partition: 0,
    offset: 1,
};

fn options() -> DecodeOptions {
    DecodeOptions {
        accepted_schema_ids: AcceptedSchemaIds::new([1, 7]),
        max_request_bytes: 4096,
        ..DecodeOptions::new("cm", "default")
    }
}

/// The decoder's contract: a request whose invariants hold, or a known code.
fn check_request(value: Option<&[u8]>, headers: &[(Vec<u8>, Option<Vec<u8>>)]) {
    let hs: Vec<(&[u8], Option<&[u8]>)> = headers
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_deref()))
        .collect();
    match decode_request(value, &hs, POS, &options()) {
        Ok(r) => {
            assert!(TransactionId::parse(r.connector_transaction_id.as_str()).is_ok());
            assert!(!r.connector.is_empty() && r.connector.len() <= 256);
            assert!(!r.merchant_id.is_empty() && r.merchant_id.len() <= 256);
            assert!(!r.request_id.chars().any(char::is_control));
        }
        Err(rejection) => {
            assert!(RejectCode::ALL.contains(&rejection.code));
            assert!(!rejection.message.is_empty());
        }
    }
}

fn header() -> impl Strategy<Value = (Vec<u8>, Option<Vec<u8>>)> {
    let name = prop_oneof![
        Just(b"x-connector".to_vec()),
        Just(b"x-merchant-id".to_vec()),
        Just(b"X-Request-Id".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..12),
    ];
    let value = proptest::option::of(prop_oneof![
        Just(b"cm".to_vec()),
        Just(b"default".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..300),
    ]);
    (name, value)
}

fn headers() -> impl Strategy<Value = Vec<(Vec<u8>, Option<Vec<u8>>)>> {
    proptest::collection::vec(header(), 0..5)
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
        Just(json!("tx-1")),
        Just(json!("MANUAL")),
        Just(json!("EUR")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const REQUEST_FIELDS: &[&str] = &[
    "connector_transaction_id",
    "connector",
    "merchant_id",
    "request_id",
    "payment_method_type",
    "merchant_transaction_id",
    "encoded_data",
    "capture_method",
    "amount",
    "setup_future_usage",
    "state",
    "metadata",
    "connector_feature_data",
    "sync_type",
    "connector_order_reference_id",
    "test_mode",
    "payment_experience",
    "merchant_request_id",
];

/// A valid request with some fields replaced by arbitrary JSON.
fn mutated_request() -> impl Strategy<Value = Value> {
    let mutations = proptest::collection::vec(
        (proptest::sample::select(REQUEST_FIELDS), json_value()),
        0..4,
    );
    mutations.prop_map(|m| {
        let mut v = json!({
            "connector_transaction_id": "tx-1",
            "amount": {"minor_amount": 1200, "currency": "EUR"},
            "capture_method": "MANUAL",
            "state": {"connector_customer_id": "c"},
        });
        for (field, value) in m {
            v[field] = value;
        }
        v
    })
}

#[test]
fn request_values_of_arbitrary_bytes() {
    runner()
        .run(
            &(
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..600)),
                headers(),
            ),
            |(value, headers)| {
                check_request(value.as_deref(), &headers);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn json_requests_mutated_field_by_field() {
    runner()
        .run(&(mutated_request(), headers()), |(v, headers)| {
            check_request(Some(v.to_string().as_bytes()), &headers);
            Ok(())
        })
        .unwrap();
}

/// A request datum with random optional fields, then framed and damaged.
fn avro_request() -> impl Strategy<Value = Vec<u8>> {
    use apache_avro::types::{Record, Value as AV};
    let fields = (
        "[A-Za-z0-9._-]{0,70}",
        proptest::option::of(".{0,20}"),
        proptest::option::of((any::<i64>(), "[A-Z]{3}")),
        proptest::option::of(any::<bool>()),
    );
    let framing = prop_oneof![Just(0u8), Just(1u8), Just(2u8)];
    let damage = prop_oneof![Just(None), (any::<usize>(), any::<u8>()).prop_map(Some),];
    let cut = proptest::option::of(any::<usize>());
    let tail = proptest::collection::vec(any::<u8>(), 0..3);
    (fields, framing, damage, cut, tail).prop_map(
        |((id, merchant, amount, test_mode), framing, damage, cut, tail)| {
            let schemas = Schemas::get();
            let mut rec = Record::new(&schemas.request).unwrap();
            rec.put("connector_transaction_id", id);
            if let Some(m) = merchant {
                rec.put("merchant_id", AV::Union(1, Box::new(AV::String(m))));
            }
            if let Some((minor, currency)) = amount {
                rec.put(
                    "amount",
                    AV::Union(
                        1,
                        Box::new(AV::Record(vec![
                            ("minor_amount".into(), AV::Long(minor)),
                            ("currency".into(), AV::String(currency)),
                        ])),
                    ),
                );
            }
            if let Some(b) = test_mode {
                rec.put("test_mode", AV::Union(1, Box::new(AV::Boolean(b))));
            }
            let datum = apache_avro::to_avro_datum(&schemas.request, rec).unwrap();
            let mut framed = match framing {
                0 => {
                    let mut f = vec![0xC3, 0x01];
                    f.extend_from_slice(&schemas.request_fingerprint.to_le_bytes());
                    f
                }
                1 => vec![0, 0, 0, 0, 7],
                _ => vec![0, 0, 0, 0, 99],
            };
            framed.extend_from_slice(&datum);
            if let Some((at, byte)) = damage {
                let at = at % framed.len();
                framed[at] ^= byte;
            }
            if let Some(c) = cut {
                framed.truncate(c % (framed.len() + 1));
            }
            framed.extend_from_slice(&tail);
            framed
        },
    )
}

#[test]
fn avro_requests_cut_extended_and_flipped() {
    runner()
        .run(&(avro_request(), headers()), |(v, headers)| {
            check_request(Some(&v), &headers);
            Ok(())
        })
        .unwrap();
}

/// Audit: a 20-byte Avro record that declared a 500 MB string made apache-avro
/// allocate the 500 MB before it found the datum too short. Now it is
/// `invalid_avro` and no allocation comes near the declared length.
#[test]
fn a_declared_length_larger_than_the_datum_allocates_nothing_like_it() {
    let fp = Schemas::get().request_fingerprint.to_le_bytes();
    for framing in [
        vec![0u8, 0, 0, 0, 7],
        [&[0xC3u8, 0x01][..], &fp[..]].concat(),
    ] {
        // connector_transaction_id: a string of 500,000,000 bytes (zig-zag varint).
        let mut value = framing;
        let mut n: u64 = 500_000_000 << 1;
        while n >= 0x80 {
            value.push((n as u8) | 0x80);
            n >>= 7;
        }
        value.push(n as u8);
        value.extend_from_slice(b"abcdefghij");
        LARGEST_ALLOCATION.store(0, std::sync::atomic::Ordering::Relaxed);
        let err = decode_request(Some(&value), &[], POS, &options()).unwrap_err();
        let largest = LARGEST_ALLOCATION.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(err.code, RejectCode::InvalidAvro, "{}", err.message);
        assert!(
            largest < 16 << 20,
            "an allocation of {largest} bytes while decoding {} bytes",
            value.len()
        );
    }
}

fn response(status: u16, body: Vec<u8>) -> HttpResponse {
    HttpResponse {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body,
    }
}

fn request_for(connector: &str) -> StatusCheckRequest {
    let mut r = StatusCheckRequest::new(
        TransactionId::parse("tx-1").unwrap(),
        connector,
        "default",
        "r",
    );
    r.amount = Some(paysync::domain::Money {
        minor_amount: 1200,
        currency: "EUR".into(),
    });
    r
}

/// Each connector's conformance table (`tests/fixtures/<name>/cases.json`).
fn conformance(connector: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/{connector}/cases.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The 2xx status bodies among a connector's fixtures, parsed.
fn fixture_bodies(connector: &str) -> Vec<Value> {
    conformance(connector)["status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let path = format!(
                "{}/tests/fixtures/{connector}/{}",
                env!("CARGO_MANIFEST_DIR"),
                c["fixture"].as_str().unwrap()
            );
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
        })
        .collect()
}

/// What every connector's decoders must hold to, for any body: a report whose
/// FAILURE is one the connector stated, or a failure with a message; error-body
/// and token parsing never panic.
fn check_body(connector: &dyn Connector, body: Vec<u8>) {
    let failure_statuses: Vec<String> = conformance(connector.name())["failure_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    match connector.parse_status(&request_for(connector.name()), &response(200, body.clone())) {
        Ok(report) => {
            if report.status == paysync::domain::PaymentStatus::FAILURE {
                let said = report.connector_status.clone().unwrap_or_default();
                assert!(failure_statuses.contains(&said), "FAILURE from {said:?}");
            }
            assert!(report
                .connector_status
                .as_ref()
                .is_none_or(|s| s.chars().count() <= 256));
        }
        Err(failure) => {
            assert!(!failure.message.is_empty());
            assert_ne!(failure.code.as_str(), "");
        }
    }
    let _ = connector.parse_error(&body);
    // The token endpoints' parsers (the schemes that have one).
    let endpoints: [&dyn paysync::connectors::TokenEndpoint; 1] =
        [&paysync::connectors::cm::CmToken];
    for endpoint in endpoints {
        match endpoint.parse_token(&response(200, body.clone())) {
            Ok(token) => assert!(token.expires_in > Duration::ZERO),
            Err(failure) => assert!(!failure.message.is_empty()),
        }
    }
}

fn connectors() -> Vec<std::sync::Arc<dyn Connector>> {
    registry::names()
        .into_iter()
        .map(|n| registry::get(n).unwrap())
        .collect()
}

#[test]
fn connector_bodies_of_arbitrary_bytes() {
    for connector in connectors() {
        runner()
            .run(&proptest::collection::vec(any::<u8>(), 0..400), |body| {
                check_body(connector.as_ref(), body);
                Ok(())
            })
            .unwrap();
    }
}

/// A connector's recorded bodies with up to three fields (top level or one
/// level down) replaced by arbitrary JSON, or removed.
fn mutated(bodies: Vec<Value>) -> impl Strategy<Value = Value> {
    let paths: Vec<(String, Option<String>)> = bodies
        .iter()
        .flat_map(|b| b.as_object().into_iter().flatten())
        .flat_map(|(k, v)| {
            let mut p = vec![(k.clone(), None)];
            if let Some(inner) = v.as_object() {
                p.extend(inner.keys().map(|i| (k.clone(), Some(i.clone()))));
            }
            p
        })
        .collect();
    let mutation = (
        proptest::sample::select(paths),
        proptest::option::of(json_value()),
    );
    (
        proptest::sample::select(bodies),
        proptest::collection::vec(mutation, 0..4),
    )
        .prop_map(|(mut body, mutations)| {
            for ((outer, inner), value) in mutations {
                let slot = match inner {
                    None => body.as_object_mut(),
                    Some(_) => body.get_mut(&outer).and_then(Value::as_object_mut),
                };
                let Some(map) = slot else { continue };
                let key = inner.unwrap_or(outer);
                match value {
                    Some(v) => {
                        map.insert(key, v);
                    }
                    None => {
                        map.remove(&key);
                    }
                }
            }
            body
        })
}

#[test]
fn connector_bodies_mutated_field_by_field() {
    for connector in connectors() {
        runner()
            .run(&mutated(fixture_bodies(connector.name())), |v| {
                check_body(connector.as_ref(), v.to_string().into_bytes());
                Ok(())
            })
            .unwrap();
    }
}

#[test]
fn token_bodies() {
    let token =
        (json_value(), json_value()).prop_map(|(t, e)| json!({"access_token": t, "expires_in": e}));
    for connector in connectors() {
        runner()
            .run(&token, |v| {
                check_body(connector.as_ref(), v.to_string().into_bytes());
                Ok(())
            })
            .unwrap();
    }
}

#[test]
fn retry_after_values() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let value = prop_oneof![
        ".{0,40}",
        "[0-9]{1,30}",
        " ?-?[0-9]{1,6} ?",
        any::<u64>().prop_map(|s| {
            httpdate::fmt_http_date(
                SystemTime::UNIX_EPOCH + Duration::from_secs(s % 253_402_300_799),
            )
        }),
        "(Mon|Tue|Sun), [0-9]{2} (Jan|Feb|Dec) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
    ];
    runner()
        .run(&value, |v| {
            if let Some(d) = parse_retry_after(&v, now) {
                // Whatever the server says, it is a finite wait the policy then caps.
                assert!(d.as_secs() < u64::MAX);
            }
            Ok(())
        })
        .unwrap();
}

/// What every connector's webhook reader must hold to, for any body, headers and
/// query: no panic; a check names a transaction id that obeys the input
/// contract's rule; a refusal is a 4xx whose message does not echo the body.
fn check_webhook(
    connector: &dyn Connector,
    body: &[u8],
    headers: &[(String, String)],
    query: &[(String, String)],
    secret: Option<&secrecy::SecretString>,
) {
    use paysync::connectors::webhook::{Webhook, WebhookCheck};
    let webhook = Webhook {
        body,
        headers,
        query,
        secret,
        now: SystemTime::now(),
        tolerance: None,
        mode: None,
    };
    match connector.read_webhook(&webhook) {
        Ok(WebhookCheck::Check { transaction_id, .. }) => {
            assert!(TransactionId::parse(transaction_id.as_str()).is_ok());
        }
        Ok(WebhookCheck::Ignore(why)) => assert!(!why.is_empty()),
        Err(e) => {
            assert!((400..500).contains(&e.status()));
            let message = e.to_string();
            // A body of 12+ printable bytes never reaches the message verbatim.
            if let Ok(text) = std::str::from_utf8(body) {
                let text = text.trim();
                if text.len() >= 12 {
                    assert!(!message.contains(text), "{message:?} echoes the body");
                }
            }
        }
    }
}

/// A webhook body: arbitrary bytes, or JSON/form shaped like the processors'
/// (with arbitrary values where the ids go).
fn webhook_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        (json_value(), json_value()).prop_map(|(a, b)| {
            json!({"createdAt": "2026-11-21T10:00:00Z", "event": "x", "transaction": a, "reference": b})
                .to_string()
                .into_bytes()
        }),
        (json_value(), json_value()).prop_map(|(id, entity)| {
            json!({"resource": "event", "id": id, "entityId": entity})
                .to_string()
                .into_bytes()
        }),
        ".{0,80}".prop_map(|v| format!("id={v}").into_bytes()),
        "(tr|ord|re|chb)_[A-Za-z0-9%./-]{0,40}".prop_map(|v| format!("id={v}").into_bytes()),
        (
            "(payment_intent\\.(succeeded|canceled)|charge\\.refunded|customer\\.created|.{0,12})",
            json_value(),
            json_value(),
            json_value(),
            json_value(),
        )
            .prop_map(|(kind, id, pi, live, account)| {
                json!({"id": "evt_1", "object": "event", "type": kind, "livemode": live,
                       "account": account, "data": {"object": {"id": id, "payment_intent": pi}}})
                .to_string()
                .into_bytes()
            }),
    ]
}

#[test]
fn webhooks_of_arbitrary_bytes_headers_and_queries() {
    let secret = secrecy::SecretString::from("whsec_fuzz".to_owned());
    let strategy = (
        webhook_body(),
        proptest::collection::vec(
            (
                prop_oneof![
                    Just("content-type".to_owned()),
                    Just("x-mollie-signature".to_owned()),
                    "[a-z-]{1,12}"
                ],
                ".{0,80}",
            ),
            0..4,
        ),
        proptest::collection::vec(
            (
                prop_oneof![Just("method".to_owned()), "[a-z]{1,8}"],
                ".{0,20}",
            ),
            0..3,
        ),
        any::<bool>(),
    );
    for connector in connectors() {
        runner()
            .run(&strategy, |(body, mut headers, query, signed)| {
                let secret = signed.then_some(&secret);
                check_webhook(connector.as_ref(), &body, &headers, &query, secret);
                // Signed as Stripe signs, so its event reader sees the body too.
                if signed {
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    headers.push((
                        "stripe-signature".to_owned(),
                        paysync::connectors::stripe::signature_header("whsec_fuzz", now, &body),
                    ));
                    check_webhook(connector.as_ref(), &body, &headers, &query, secret);
                }
                Ok(())
            })
            .unwrap();
    }
}
