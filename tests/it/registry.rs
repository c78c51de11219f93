//! Schema Registry: register or look up the event schema at start-up, the Confluent
//! wire format on the output topic, and the start-up failures (incompatible,
//! unreachable, not registered).

use std::time::Duration;

use paysync::config::RegistrySettings;
use paysync::demo::simulator::SimOptions;
use paysync::kafka::tools::RawProducer;
use paysync::schema_registry::{RegistryClient, RegistryError};
use secrecy::SecretString;
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::*;

fn registry_settings(url: &str, auto_register: bool) -> RegistrySettings {
    RegistrySettings {
        url: url.parse().unwrap(),
        username: Some("sr-user".into()),
        password: Some(SecretString::from("sr-pass".to_owned())),
        auto_register,
        subject: "payment-status-events-value".into(),
    }
}

const SCHEMA: &str = paysync::codec::avro::EVENT_SCHEMA_JSON;

#[tokio::test]
async fn registers_the_schema_with_basic_auth_and_returns_its_id() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/subjects/payment-status-events-value/versions"))
        .and(header(
            "content-type",
            "application/vnd.schemaregistry.v1+json",
        ))
        // base64("sr-user:sr-pass")
        .and(header("authorization", "Basic c3ItdXNlcjpzci1wYXNz"))
        .and(body_string_contains("PaymentStatusEvent"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"id": 42})))
        .expect(1)
        .mount(&server)
        .await;
    let client = RegistryClient::new(registry_settings(&server.uri(), true)).unwrap();
    assert_eq!(
        client
            .schema_id("payment-status-events-value", SCHEMA)
            .await
            .unwrap(),
        42
    );
}

#[tokio::test]
async fn looks_up_without_registering_when_auto_register_is_off() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/subjects/payment-status-events-value"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            serde_json::json!({"subject": "payment-status-events-value", "id": 7, "version": 3, "schema": "{}"}),
        ))
        .mount(&server)
        .await;
    let client = RegistryClient::new(registry_settings(&server.uri(), false)).unwrap();
    assert_eq!(
        client
            .schema_id("payment-status-events-value", SCHEMA)
            .await
            .unwrap(),
        7
    );

    let missing = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(404).set_body_json(
                serde_json::json!({"error_code": 40403, "message": "Schema not found"}),
            ),
        )
        .mount(&missing)
        .await;
    let client = RegistryClient::new(registry_settings(&missing.uri(), false)).unwrap();
    let err = client
        .schema_id("payment-status-events-value", SCHEMA)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotRegistered { .. }), "{err}");
}

#[tokio::test]
async fn request_schema_ids_are_listed_from_the_input_subject() {
    let registry = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/subjects/in-value/versions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!([1, 2])))
        .mount(&registry)
        .await;
    for (version, id) in [(1, 31), (2, 47)] {
        Mock::given(method("GET"))
            .and(path(format!("/subjects/in-value/versions/{version}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                serde_json::json!({"subject": "in-value", "version": version, "id": id, "schema": "{}"}),
            ))
            .mount(&registry)
            .await;
    }
    let client = RegistryClient::new(registry_settings(&registry.uri(), true)).unwrap();
    assert_eq!(client.subject_ids("in-value").await.unwrap(), vec![31, 47]);
    // A subject that does not exist (404) has no ids; it is not an error.
    assert!(client.subject_ids("other-value").await.unwrap().is_empty());
}

#[tokio::test]
async fn an_incompatible_schema_is_a_clear_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(409).set_body_json(serde_json::json!({
            "error_code": 409,
            "message": "Schema being registered is incompatible with an earlier schema for subject"
        })))
        .mount(&server)
        .await;
    let client = RegistryClient::new(registry_settings(&server.uri(), true)).unwrap();
    let err = client
        .schema_id_with_retries("payment-status-events-value", SCHEMA, 3)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Incompatible { .. }));
    let text = err.to_string();
    assert!(
        text.contains("incompatible") && text.contains("payment-status-events-value"),
        "{text}"
    );
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        1,
        "incompatible is not retried"
    );
}

#[tokio::test]
async fn an_unreachable_registry_is_retried_then_reported() {
    let closed = free_addr();
    let client = RegistryClient::new(registry_settings(&format!("http://{closed}"), true)).unwrap();
    let err = client
        .schema_id_with_retries("s", SCHEMA, 2)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
    assert!(!err.to_string().contains("sr-pass"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_use_the_confluent_wire_format_with_the_registered_id() {
    let registry = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"id": 1234})))
        .mount(&registry)
        .await;
    let broker = Broker::new();
    let t = broker.topics("registry", 1).await;
    let sim = simulator(SimOptions::default()).await;
    let extra = format!("[schema_registry]\nurl = \"{}\"\n", registry.uri());
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), &extra))
        .await
        .unwrap();
    let requests = registry.received_requests().await.unwrap();
    assert_eq!(
        requests[0].url.path(),
        format!("/subjects/{}-value/versions", t.output)
    );
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    producer
        .send(
            &t.input,
            None,
            Some(b"k"),
            Some(br#"{"connector_transaction_id":"success-sr"}"#),
            &[],
        )
        .await
        .unwrap();
    let records = read_outputs(broker.bootstrap(), &t, 1, Duration::from_secs(60)).await;
    let value = records[0].value.as_deref().unwrap();
    assert_eq!(
        &value[..5],
        &[0, 0, 0, 0x04, 0xD2],
        "magic byte and id 1234, big-endian"
    );
    let schema = apache_avro::Schema::parse_str(SCHEMA).unwrap();
    let datum = apache_avro::from_avro_datum(&schema, &mut &value[5..], None).unwrap();
    let json = paysync::codec::avro::avro_to_json(datum).unwrap();
    assert_eq!(json["status"], "CHARGED");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_fails_on_an_incompatible_schema() {
    let registry = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(409)
                .set_body_json(serde_json::json!({"message": "incompatible"})),
        )
        .mount(&registry)
        .await;
    let broker = Broker::new();
    let t = broker.topics("registry-bad", 1).await;
    let extra = format!("[schema_registry]\nurl = \"{}\"\n", registry.uri());
    let err = match paysync::app::start(settings(
        broker.bootstrap(),
        &t,
        "http://127.0.0.1:9",
        &extra,
    ))
    .await
    {
        Ok(_) => panic!("start-up must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("incompatible"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_requests_in_both_framings_flow_through_the_pipeline() {
    use apache_avro::types::{Record, Value};
    use paysync::codec::Schemas;
    let broker = Broker::new();
    let t = broker.topics("avro-in", 1).await;
    let sim = simulator(SimOptions::default()).await;
    let mut s = settings(broker.bootstrap(), &t, &sim.base_url(), "");
    s.processing.accepted_schema_ids = vec![9];
    let app = paysync::app::start(s).await.unwrap();
    let schemas = Schemas::get();
    let datum = |id: &str| {
        let mut rec = Record::new(&schemas.request).unwrap();
        rec.put("connector_transaction_id", id);
        rec.put(
            "request_id",
            Value::Union(1, Box::new(Value::String(format!("avro-{id}")))),
        );
        apache_avro::to_avro_datum(&schemas.request, rec).unwrap()
    };
    let mut single = vec![0xC3, 0x01];
    single.extend_from_slice(&schemas.request_fingerprint.to_le_bytes());
    single.extend_from_slice(&datum("success-avro-1"));
    let mut confluent = vec![0, 0, 0, 0, 9];
    confluent.extend_from_slice(&datum("authorized-avro-2"));
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    producer
        .send(&t.input, None, Some(b"1"), Some(&single), &[])
        .await
        .unwrap();
    producer
        .send(&t.input, None, Some(b"2"), Some(&confluent), &[])
        .await
        .unwrap();
    let records = read_outputs(broker.bootstrap(), &t, 2, Duration::from_secs(60)).await;
    let mut seen: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            let json =
                paysync::codec::avro::decode_event_json(r.value.as_deref().unwrap()).unwrap();
            (
                json["request_id"].as_str().unwrap().to_owned(),
                json["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("avro-authorized-avro-2".to_owned(), "AUTHORIZED".to_owned()),
            ("avro-success-avro-1".to_owned(), "CHARGED".to_owned())
        ]
    );
    app.stop().await;
}
