//! The Avro side: the schemas in `schemas/` (embedded at build time, the single
//! source of truth), the event to Avro `Value` mapping, and the two wire formats:
//! Avro single-object encoding (`C3 01`, 8-byte little-endian CRC-64-AVRO
//! fingerprint of the Parsing Canonical Form as the specification defines it, see
//! [`super::canonical`], binary datum) and the Confluent Schema Registry format
//! (`00`, 4-byte big-endian schema id, binary datum).

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use apache_avro::types::Value;
use apache_avro::Schema;

use super::canonical;
use crate::domain::event::{
    ConnectorErrorDetails, ConnectorState, ErrorInfo, IssuerErrorDetails, MandateReference,
    NetworkErrorDetails, UnifiedErrorDetails,
};
use crate::domain::{Money, PaymentStatus, PaymentStatusEvent, RedirectForm};

/// The event schema, as committed in `schemas/`.
pub const EVENT_SCHEMA_JSON: &str = include_str!("../../schemas/payment_status_event.avsc");
/// The request schema, as committed in `schemas/`.
pub const REQUEST_SCHEMA_JSON: &str = include_str!("../../schemas/status_check_request.avsc");

/// Marker of Avro single-object encoding.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// Marker of the Confluent Schema Registry wire format.
pub const CONFLUENT_MAGIC: u8 = 0x00;

/// Errors of the Avro layer.
#[derive(Debug, thiserror::Error)]
pub enum AvroError {
    /// A value did not match the schema (a bug, not bad input).
    #[error("avro encoding failed: {0}")]
    Encode(String),
    /// Bytes that are not a datum of the schema.
    #[error("avro decoding failed: {0}")]
    Decode(String),
    /// A header that is neither single-object nor Confluent, or a foreign fingerprint.
    #[error("{0}")]
    Framing(String),
}

/// The parsed schemas with their fingerprints.
pub struct Schemas {
    /// `PaymentStatusEvent`.
    pub event: Schema,
    /// `StatusCheckRequest`.
    pub request: Schema,
    /// CRC-64-AVRO of the event schema's canonical form.
    pub event_fingerprint: u64,
    /// CRC-64-AVRO of the request schema's canonical form.
    pub request_fingerprint: u64,
}

impl Schemas {
    /// The schemas, parsed once per process. The embedded files are tested, so a
    /// parse failure here is a build defect.
    pub fn get() -> &'static Schemas {
        static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
        SCHEMAS.get_or_init(|| {
            #[allow(clippy::expect_used)]
            let event = Schema::parse_str(EVENT_SCHEMA_JSON).expect("embedded event schema parses");
            #[allow(clippy::expect_used)]
            let request =
                Schema::parse_str(REQUEST_SCHEMA_JSON).expect("embedded request schema parses");
            #[allow(clippy::expect_used)]
            let event_fingerprint =
                canonical::fingerprint(EVENT_SCHEMA_JSON).expect("embedded event schema");
            #[allow(clippy::expect_used)]
            let request_fingerprint =
                canonical::fingerprint(REQUEST_SCHEMA_JSON).expect("embedded request schema");
            Schemas {
                event_fingerprint,
                request_fingerprint,
                event,
                request,
            }
        })
    }
}

/// How events are framed on the output topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// Avro single-object encoding (no registry configured).
    SingleObject,
    /// Confluent wire format with this registry schema id.
    Confluent {
        /// The id the registry gave the event schema.
        schema_id: u32,
    },
}

/// Encodes events with the embedded schema in one wire format.
#[derive(Debug, Clone, Copy)]
pub struct EventEncoder {
    format: WireFormat,
}

impl EventEncoder {
    /// An encoder for `format`.
    pub fn new(format: WireFormat) -> Self {
        EventEncoder { format }
    }

    /// Frames and encodes one event.
    pub fn encode(&self, event: &PaymentStatusEvent) -> Result<Vec<u8>, AvroError> {
        let mut out = Vec::with_capacity(512);
        match self.format {
            WireFormat::SingleObject => {
                out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
                out.extend_from_slice(&Schemas::get().event_fingerprint.to_le_bytes());
            }
            WireFormat::Confluent { schema_id } => {
                out.push(CONFLUENT_MAGIC);
                out.extend_from_slice(&schema_id.to_be_bytes());
            }
        }
        write_event(&mut out, event);
        Ok(out)
    }
}

/// Splits a framed value into its framing and datum. For single-object encoding
/// the fingerprint must be `expected_fingerprint`.
pub fn unframe(bytes: &[u8], expected_fingerprint: u64) -> Result<(WireFormat, &[u8]), AvroError> {
    if bytes.len() >= 10 && bytes[..2] == SINGLE_OBJECT_MAGIC {
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&bytes[2..10]);
        let fp = u64::from_le_bytes(fp);
        if fp != expected_fingerprint {
            return Err(AvroError::Framing(format!(
                "single-object fingerprint {fp:#018x} is not the expected schema's {expected_fingerprint:#018x}"
            )));
        }
        return Ok((WireFormat::SingleObject, &bytes[10..]));
    }
    if bytes.len() >= 5 && bytes[0] == CONFLUENT_MAGIC {
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        return Ok((WireFormat::Confluent { schema_id: id }, &bytes[5..]));
    }
    Err(AvroError::Framing(
        "not Avro: neither single-object (C3 01) nor Confluent (00) framing".into(),
    ))
}

/// True when `bytes` start like an Avro-framed value (PRODUCT.md §2).
pub fn looks_like_avro(bytes: &[u8]) -> bool {
    (bytes.len() >= 10 && bytes[..2] == SINGLE_OBJECT_MAGIC)
        || (bytes.len() >= 5 && bytes[0] == CONFLUENT_MAGIC)
}

/// Decodes a framed event back into an Avro value, resolving to `reader` when given.
pub fn decode_event_value(bytes: &[u8], reader: Option<&Schema>) -> Result<Value, AvroError> {
    let schemas = Schemas::get();
    let (_, mut datum) = unframe(bytes, schemas.event_fingerprint)?;
    apache_avro::from_avro_datum(&schemas.event, &mut datum, reader)
        .map_err(|e| AvroError::Decode(e.to_string()))
}

/// Decodes a framed event into JSON (for the demo, tests and debugging).
pub fn decode_event_json(bytes: &[u8]) -> Result<serde_json::Value, AvroError> {
    let value = decode_event_value(bytes, None)?;
    avro_to_json(value)
}

/// Converts an Avro value to JSON: unions collapse to their branch, enums to symbols.
pub fn avro_to_json(value: Value) -> Result<serde_json::Value, AvroError> {
    Ok(match value {
        Value::Null => serde_json::Value::Null,
        Value::Boolean(b) => b.into(),
        Value::Int(i) => i.into(),
        Value::Long(l) | Value::TimestampMillis(l) | Value::TimestampMicros(l) => l.into(),
        Value::Float(f) => f64::from(f).into(),
        Value::Double(d) => d.into(),
        Value::String(s) | Value::Enum(_, s) => s.into(),
        Value::Union(_, inner) => avro_to_json(*inner)?,
        Value::Array(items) => serde_json::Value::Array(
            items
                .into_iter()
                .map(avro_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Value::Map(m) => serde_json::Value::Object(
            m.into_iter()
                .map(|(k, v)| Ok((k, avro_to_json(v)?)))
                .collect::<Result<_, AvroError>>()?,
        ),
        Value::Record(fields) => serde_json::Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| Ok((k, avro_to_json(v)?)))
                .collect::<Result<_, AvroError>>()?,
        ),
        other => {
            return Err(AvroError::Decode(format!(
                "unexpected avro value {other:?}"
            )))
        }
    })
}

// ---- event -> Avro binary (the hot path) ---------------------------------------------
//
// Writes the datum directly, in the field order of `schemas/payment_status_event.avsc`.
// The tests check the bytes against apache-avro's schema-driven encoding of
// `event_to_value` for a minimal and a fully populated event, so a change to the
// schema file that is not mirrored here fails the build's tests.

fn zigzag(out: &mut Vec<u8>, v: i64) {
    let mut n = ((v << 1) ^ (v >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn w_str(out: &mut Vec<u8>, s: &str) {
    zigzag(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

fn w_opt_str(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        None => zigzag(out, 0),
        Some(s) => {
            zigzag(out, 1);
            w_str(out, s);
        }
    }
}

fn w_opt_long(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        None => zigzag(out, 0),
        Some(v) => {
            zigzag(out, 1);
            zigzag(out, v);
        }
    }
}

fn w_opt<T>(out: &mut Vec<u8>, v: &Option<T>, f: impl FnOnce(&mut Vec<u8>, &T)) {
    match v {
        None => zigzag(out, 0),
        Some(x) => {
            zigzag(out, 1);
            f(out, x);
        }
    }
}

fn w_map(out: &mut Vec<u8>, m: &BTreeMap<String, String>) {
    if !m.is_empty() {
        zigzag(out, m.len() as i64);
        for (k, v) in m {
            w_str(out, k);
            w_str(out, v);
        }
    }
    zigzag(out, 0);
}

fn w_money(out: &mut Vec<u8>, m: &Money) {
    zigzag(out, m.minor_amount);
    w_str(out, &m.currency);
}

fn w_error(out: &mut Vec<u8>, e: &ErrorInfo) {
    w_opt(out, &e.unified_details, |out, u| {
        w_opt_str(out, &u.code);
        w_opt_str(out, &u.message);
        w_opt_str(out, &u.description);
        w_opt_str(out, &u.user_guidance_message);
    });
    w_opt(out, &e.issuer_details, |out, i| {
        w_opt_str(out, &i.code);
        w_opt_str(out, &i.message);
        w_opt(out, &i.network_details, |out, n| {
            w_opt_str(out, &n.advice_code);
            w_opt_str(out, &n.decline_code);
            w_opt_str(out, &n.error_message);
        });
    });
    w_opt(out, &e.connector_details, |out, c| {
        w_opt_str(out, &c.code);
        w_opt_str(out, &c.message);
        w_opt_str(out, &c.reason);
        w_opt_str(out, &c.connector_transaction_id);
    });
}

fn position<T: PartialEq>(all: &[T], x: &T) -> i64 {
    all.iter().position(|a| a == x).unwrap_or(0) as i64
}

/// Appends the Avro binary datum of `e` (no framing).
pub fn write_event(out: &mut Vec<u8>, e: &PaymentStatusEvent) {
    use crate::domain::{AuthenticationType, CaptureMethod};
    w_str(out, &e.event_id);
    w_str(out, &e.request_id);
    w_str(out, &e.connector);
    w_str(out, &e.merchant_id);
    zigzag(out, e.observed_at_ms);
    zigzag(
        out,
        i64::from(i32::try_from(e.attempts).unwrap_or(i32::MAX)),
    );
    w_str(out, &e.connector_transaction_id);
    w_opt_str(out, &e.merchant_transaction_id);
    zigzag(out, position(PaymentStatus::ALL, &e.status));
    w_opt(out, &e.error, w_error);
    zigzag(out, i64::from(e.status_code));
    w_map(out, &e.response_headers);
    w_opt(out, &e.mandate_reference, |out, m| {
        w_opt_str(out, &m.mandate_id);
        w_opt_str(out, &m.payment_method_id);
    });
    w_opt_str(out, &e.network_transaction_id);
    w_opt(out, &e.amount, w_money);
    w_opt_long(out, e.captured_amount);
    w_opt_str(out, &e.payment_method_type);
    w_opt(out, &e.capture_method, |out, c| {
        zigzag(out, position(CaptureMethod::ALL, c))
    });
    w_opt(out, &e.auth_type, |out, a| {
        zigzag(out, position(AuthenticationType::ALL, a))
    });
    w_opt_long(out, e.created_at);
    w_opt_long(out, e.updated_at);
    w_opt_long(out, e.authorized_at);
    w_opt_long(out, e.captured_at);
    w_opt_str(out, &e.customer_name);
    w_opt_str(out, &e.email);
    w_opt_str(out, &e.connector_customer_id);
    w_opt_str(out, &e.merchant_order_id);
    w_opt_str(out, &e.metadata);
    w_opt_str(out, &e.connector_response);
    w_opt(out, &e.state, |out, s| {
        w_opt_str(out, &s.connector_customer_id)
    });
    w_opt_str(out, &e.raw_connector_response);
    w_opt_str(out, &e.raw_connector_request);
    match &e.redirection_data {
        None => zigzag(out, 0),
        Some(RedirectForm::Form {
            endpoint,
            method,
            form_fields,
        }) => {
            zigzag(out, 1);
            w_str(out, endpoint);
            w_str(out, method);
            w_map(out, form_fields);
        }
        Some(RedirectForm::Html { html_data }) => {
            zigzag(out, 2);
            w_str(out, html_data);
        }
        Some(RedirectForm::Uri { uri }) => {
            zigzag(out, 3);
            w_str(out, uri);
        }
    }
    match e.incremental_authorization_allowed {
        None => zigzag(out, 0),
        Some(b) => {
            zigzag(out, 1);
            out.push(u8::from(b));
        }
    }
    w_opt_long(out, e.refunded_amount);
    w_opt_long(out, e.refund_pending_amount);
    w_opt_str(out, &e.connector_status);
    zigzag(out, i64::from(e.check_number));
    out.push(u8::from(e.is_final));
    w_opt_long(out, e.next_check_at_ms);
}

// ---- event -> Avro value (reference encoding, used by the tests) -------------------

fn null() -> Value {
    Value::Union(0, Box::new(Value::Null))
}

fn some(v: Value) -> Value {
    Value::Union(1, Box::new(v))
}

fn opt_str(v: &Option<String>) -> Value {
    v.as_ref()
        .map_or_else(null, |s| some(Value::String(s.clone())))
}

fn opt_long(v: Option<i64>) -> Value {
    v.map_or_else(null, |l| some(Value::Long(l)))
}

fn opt_record<T>(v: &Option<T>, f: impl FnOnce(&T) -> Value) -> Value {
    v.as_ref().map_or_else(null, |x| some(f(x)))
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn string_map(m: &BTreeMap<String, String>) -> Value {
    Value::Map(
        m.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<HashMap<_, _>>(),
    )
}

fn enum_value(index: usize, symbol: &str) -> Value {
    Value::Enum(index as u32, symbol.to_owned())
}

fn money(m: &Money) -> Value {
    record(vec![
        ("minor_amount", Value::Long(m.minor_amount)),
        ("currency", Value::String(m.currency.clone())),
    ])
}

fn error_info(e: &ErrorInfo) -> Value {
    record(vec![
        (
            "unified_details",
            opt_record(&e.unified_details, |u: &UnifiedErrorDetails| {
                record(vec![
                    ("code", opt_str(&u.code)),
                    ("message", opt_str(&u.message)),
                    ("description", opt_str(&u.description)),
                    ("user_guidance_message", opt_str(&u.user_guidance_message)),
                ])
            }),
        ),
        (
            "issuer_details",
            opt_record(&e.issuer_details, |i: &IssuerErrorDetails| {
                record(vec![
                    ("code", opt_str(&i.code)),
                    ("message", opt_str(&i.message)),
                    (
                        "network_details",
                        opt_record(&i.network_details, |n: &NetworkErrorDetails| {
                            record(vec![
                                ("advice_code", opt_str(&n.advice_code)),
                                ("decline_code", opt_str(&n.decline_code)),
                                ("error_message", opt_str(&n.error_message)),
                            ])
                        }),
                    ),
                ])
            }),
        ),
        (
            "connector_details",
            opt_record(&e.connector_details, |c: &ConnectorErrorDetails| {
                record(vec![
                    ("code", opt_str(&c.code)),
                    ("message", opt_str(&c.message)),
                    ("reason", opt_str(&c.reason)),
                    (
                        "connector_transaction_id",
                        opt_str(&c.connector_transaction_id),
                    ),
                ])
            }),
        ),
    ])
}

fn redirect(r: &Option<RedirectForm>) -> Value {
    match r {
        None => null(),
        Some(RedirectForm::Form {
            endpoint,
            method,
            form_fields,
        }) => Value::Union(
            1,
            Box::new(record(vec![
                ("endpoint", Value::String(endpoint.clone())),
                ("method", Value::String(method.clone())),
                ("form_fields", string_map(form_fields)),
            ])),
        ),
        Some(RedirectForm::Html { html_data }) => Value::Union(
            2,
            Box::new(record(vec![(
                "html_data",
                Value::String(html_data.clone()),
            )])),
        ),
        Some(RedirectForm::Uri { uri }) => Value::Union(
            3,
            Box::new(record(vec![("uri", Value::String(uri.clone()))])),
        ),
    }
}

fn status_index(status: PaymentStatus) -> usize {
    PaymentStatus::ALL
        .iter()
        .position(|s| *s == status)
        .unwrap_or(0)
}

/// Maps an event to an Avro value of the event schema (field order as in the file).
pub fn event_to_value(e: &PaymentStatusEvent) -> Value {
    use crate::domain::{AuthenticationType, CaptureMethod};
    let capture = |c: &CaptureMethod| {
        enum_value(
            CaptureMethod::ALL.iter().position(|x| x == c).unwrap_or(0),
            c.as_str(),
        )
    };
    let auth = |a: &AuthenticationType| {
        enum_value(
            AuthenticationType::ALL
                .iter()
                .position(|x| x == a)
                .unwrap_or(0),
            a.as_str(),
        )
    };
    record(vec![
        ("event_id", Value::String(e.event_id.clone())),
        ("request_id", Value::String(e.request_id.clone())),
        ("connector", Value::String(e.connector.clone())),
        ("merchant_id", Value::String(e.merchant_id.clone())),
        ("observed_at", Value::TimestampMillis(e.observed_at_ms)),
        (
            "attempts",
            Value::Int(i32::try_from(e.attempts).unwrap_or(i32::MAX)),
        ),
        (
            "connector_transaction_id",
            Value::String(e.connector_transaction_id.clone()),
        ),
        (
            "merchant_transaction_id",
            opt_str(&e.merchant_transaction_id),
        ),
        (
            "status",
            enum_value(status_index(e.status), e.status.as_str()),
        ),
        ("error", opt_record(&e.error, error_info)),
        ("status_code", Value::Long(i64::from(e.status_code))),
        ("response_headers", string_map(&e.response_headers)),
        (
            "mandate_reference",
            opt_record(&e.mandate_reference, |m: &MandateReference| {
                record(vec![
                    ("mandate_id", opt_str(&m.mandate_id)),
                    ("payment_method_id", opt_str(&m.payment_method_id)),
                ])
            }),
        ),
        ("network_transaction_id", opt_str(&e.network_transaction_id)),
        ("amount", opt_record(&e.amount, money)),
        ("captured_amount", opt_long(e.captured_amount)),
        ("payment_method_type", opt_str(&e.payment_method_type)),
        ("capture_method", opt_record(&e.capture_method, capture)),
        ("auth_type", opt_record(&e.auth_type, auth)),
        ("created_at", opt_long(e.created_at)),
        ("updated_at", opt_long(e.updated_at)),
        ("authorized_at", opt_long(e.authorized_at)),
        ("captured_at", opt_long(e.captured_at)),
        ("customer_name", opt_str(&e.customer_name)),
        ("email", opt_str(&e.email)),
        ("connector_customer_id", opt_str(&e.connector_customer_id)),
        ("merchant_order_id", opt_str(&e.merchant_order_id)),
        ("metadata", opt_str(&e.metadata)),
        ("connector_response", opt_str(&e.connector_response)),
        (
            "state",
            opt_record(&e.state, |s: &ConnectorState| {
                record(vec![(
                    "connector_customer_id",
                    opt_str(&s.connector_customer_id),
                )])
            }),
        ),
        ("raw_connector_response", opt_str(&e.raw_connector_response)),
        ("raw_connector_request", opt_str(&e.raw_connector_request)),
        ("redirection_data", redirect(&e.redirection_data)),
        (
            "incremental_authorization_allowed",
            e.incremental_authorization_allowed
                .map_or_else(null, |b| some(Value::Boolean(b))),
        ),
        ("refunded_amount", opt_long(e.refunded_amount)),
        ("refund_pending_amount", opt_long(e.refund_pending_amount)),
        ("connector_status", opt_str(&e.connector_status)),
        ("check_number", Value::Int(e.check_number)),
        ("is_final", Value::Boolean(e.is_final)),
        (
            "next_check_at",
            e.next_check_at_ms
                .map_or_else(null, |t| some(Value::TimestampMillis(t))),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{event_id, CheckFailure, Envelope, FailureCode, SecretFields};
    use crate::domain::{StatusCheckRequest, StatusReport, TransactionId};

    fn sample_event(outcome: Result<StatusReport, CheckFailure>) -> PaymentStatusEvent {
        let mut req = StatusCheckRequest::new(
            TransactionId::parse("tx-9").unwrap(),
            "cm",
            "default",
            "r-9",
        );
        req.amount = Some(Money {
            minor_amount: 1200,
            currency: "EUR".into(),
        });
        req.capture_method = Some(crate::domain::CaptureMethod::MANUAL);
        PaymentStatusEvent::build(
            &req,
            Envelope {
                event_id: event_id("in", 2, 41),
                check_number: 1,
                is_final: false,
                next_check_at_ms: None,
                observed_at_ms: 1_750_000_000_123,
                attempts: 1,
                raw_request: None,
            },
            outcome,
            SecretFields::default(),
        )
    }

    fn charged_report() -> StatusReport {
        let mut r = StatusReport::new(PaymentStatus::AUTHENTICATION_PENDING, 200);
        r.amount = Some(Money {
            minor_amount: 1200,
            currency: "EUR".into(),
        });
        r.redirection_data = Some(RedirectForm::Uri {
            uri: "https://3ds.example/x".into(),
        });
        r.refunded_amount = Some(300);
        r.refund_pending_amount = Some(100);
        r.created_at = Some(1_136_214_245);
        r.connector_status = Some("OPEN".into());
        r.response_headers
            .insert("content-type".into(), "application/json".into());
        r
    }

    #[test]
    fn single_object_framing_is_exact() {
        let bytes = EventEncoder::new(WireFormat::SingleObject)
            .encode(&sample_event(Ok(charged_report())))
            .unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        // The fingerprint fastavro and Java compute from the schema file
        // (tests/fixtures/avro/vectors.json), in wire order.
        let vectors: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/avro/vectors.json")).unwrap();
        let wire = vectors["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["file"] == "schemas/payment_status_event.avsc")
            .unwrap()["wire"]
            .as_str()
            .unwrap()
            .to_owned();
        let hex: String = bytes[2..10].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, wire);
        // The body is exactly the Avro binary datum of the schema.
        let datum = apache_avro::to_avro_datum(
            &Schemas::get().event,
            event_to_value(&sample_event(Ok(charged_report()))),
        )
        .unwrap();
        assert_eq!(&bytes[10..], &datum[..]);
    }

    /// An event with every optional field set (and non-default enum symbols).
    fn full_event() -> PaymentStatusEvent {
        use crate::domain::event::{ConnectorState, MandateReference, NetworkErrorDetails};
        let mut e = sample_event(Ok(charged_report()));
        e.merchant_transaction_id = Some("m-tx".into());
        e.error = Some(ErrorInfo {
            unified_details: Some(UnifiedErrorDetails {
                code: Some("C".into()),
                message: Some("M".into()),
                description: Some("D".into()),
                user_guidance_message: Some("U".into()),
            }),
            issuer_details: Some(IssuerErrorDetails {
                code: Some("I".into()),
                message: Some("IM".into()),
                network_details: Some(NetworkErrorDetails {
                    advice_code: Some("a".into()),
                    decline_code: Some("d".into()),
                    error_message: Some("e".into()),
                }),
            }),
            connector_details: Some(ConnectorErrorDetails {
                code: Some("FAILURE".into()),
                message: Some("cm".into()),
                reason: Some("r".into()),
                connector_transaction_id: Some("tx".into()),
            }),
        });
        e.status = PaymentStatus::VOIDED_POST_CAPTURE;
        e.mandate_reference = Some(MandateReference {
            mandate_id: Some("md".into()),
            payment_method_id: Some("pm".into()),
        });
        e.network_transaction_id = Some("ntx".into());
        e.captured_amount = Some(-5);
        e.auth_type = Some(crate::domain::AuthenticationType::NO_THREE_DS);
        e.capture_method = Some(crate::domain::CaptureMethod::SEQUENTIAL_AUTOMATIC);
        e.updated_at = Some(i64::MAX);
        e.authorized_at = Some(i64::MIN);
        e.captured_at = Some(0);
        e.customer_name = Some("Zoë".into());
        e.email = Some("z@example.com".into());
        e.connector_customer_id = Some("cust".into());
        e.merchant_order_id = Some("ord".into());
        e.metadata = Some("{}".into());
        e.connector_response = Some("{\"x\":1}".into());
        e.state = Some(ConnectorState {
            connector_customer_id: Some("cust".into()),
        });
        e.raw_connector_response = Some("{}".into());
        e.raw_connector_request = Some("GET x".into());
        e.incremental_authorization_allowed = Some(true);
        e.check_number = 7;
        e.is_final = true;
        e.next_check_at_ms = Some(1_750_000_060_000);
        e.attempts = 300;
        e.observed_at_ms = -1;
        // One entry: apache-avro writes maps in HashMap order, so byte equality
        // is only defined for maps of at most one entry (order carries no meaning).
        e.response_headers.clear();
        e.response_headers
            .insert("x-request-id".into(), "abc".into());
        e
    }

    #[test]
    fn direct_writer_matches_the_schema_driven_encoding_byte_for_byte() {
        let schema = &Schemas::get().event;
        let mut forms = vec![
            None,
            Some(RedirectForm::Html {
                html_data: "<p>".into(),
            }),
            Some(RedirectForm::Uri {
                uri: "https://u".into(),
            }),
        ];
        let mut fields = BTreeMap::new();
        fields.insert("a".to_owned(), "1".to_owned());
        forms.push(Some(RedirectForm::Form {
            endpoint: "https://f".into(),
            method: "POST".into(),
            form_fields: fields,
        }));
        let minimal = sample_event(Err(CheckFailure::new(FailureCode::ConnectorTimeout, "t")));
        let mut events = vec![
            minimal,
            sample_event(Ok(StatusReport::new(PaymentStatus::STARTED, 200))),
        ];
        for form in forms {
            let mut e = full_event();
            e.redirection_data = form;
            events.push(e);
        }
        for status in PaymentStatus::ALL {
            let mut e = full_event();
            e.status = *status;
            events.push(e);
        }
        for e in &events {
            let reference = apache_avro::to_avro_datum(schema, event_to_value(e)).unwrap();
            let mut direct = Vec::new();
            write_event(&mut direct, e);
            assert_eq!(direct, reference, "{e:?}");
        }
        // Maps with several entries: equal once decoded.
        let mut e = full_event();
        for i in 0..5 {
            e.response_headers.insert(format!("h{i}"), format!("v{i}"));
        }
        let mut direct = Vec::new();
        write_event(&mut direct, &e);
        let reference = apache_avro::to_avro_datum(schema, event_to_value(&e)).unwrap();
        let decode = |b: &[u8]| {
            avro_to_json(apache_avro::from_avro_datum(schema, &mut &b[..], None).unwrap()).unwrap()
        };
        assert_eq!(decode(&direct), decode(&reference));
    }

    #[test]
    fn confluent_framing_carries_the_schema_id() {
        let bytes = EventEncoder::new(WireFormat::Confluent { schema_id: 42 })
            .encode(&sample_event(Ok(charged_report())))
            .unwrap();
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 42]);
        assert_eq!(
            unframe(&bytes, 0).unwrap().0,
            WireFormat::Confluent { schema_id: 42 }
        );
    }

    #[test]
    fn round_trip_through_the_schema() {
        let event = sample_event(Ok(charged_report()));
        let bytes = EventEncoder::new(WireFormat::SingleObject)
            .encode(&event)
            .unwrap();
        let json = decode_event_json(&bytes).unwrap();
        assert_eq!(json["event_id"], event.event_id.as_str());
        assert_eq!(json["status"], "AUTHENTICATION_PENDING");
        assert_eq!(json["amount"]["minor_amount"], 1200);
        assert_eq!(json["amount"]["currency"], "EUR");
        assert_eq!(json["redirection_data"]["uri"], "https://3ds.example/x");
        assert_eq!(json["refunded_amount"], 300);
        assert_eq!(json["refund_pending_amount"], 100);
        assert_eq!(json["observed_at"], 1_750_000_000_123_i64);
        assert_eq!(json["capture_method"], "MANUAL");
        assert_eq!(json["status_code"], 200);
        assert_eq!(json["response_headers"]["content-type"], "application/json");
        assert_eq!(json["metadata"], serde_json::Value::Null);

        let failed = sample_event(Err(CheckFailure::new(
            FailureCode::TransactionNotFound,
            "404",
        )));
        let json = decode_event_json(
            &EventEncoder::new(WireFormat::SingleObject)
                .encode(&failed)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(json["status"], "PAYMENT_STATUS_UNSPECIFIED");
        assert_eq!(
            json["error"]["unified_details"]["code"],
            "TRANSACTION_NOT_FOUND"
        );
    }

    #[test]
    fn every_status_encodes() {
        for status in PaymentStatus::ALL {
            let mut r = StatusReport::new(*status, 200);
            r.connector_status = Some("X".into());
            let bytes = EventEncoder::new(WireFormat::SingleObject)
                .encode(&sample_event(Ok(r)))
                .unwrap();
            assert_eq!(
                decode_event_json(&bytes).unwrap()["status"],
                status.as_str()
            );
        }
    }

    #[test]
    fn old_reader_without_a_newer_optional_field_reads_new_events() {
        // A reader schema from "before" connector_status and the refund extensions existed.
        let mut reader: serde_json::Value = serde_json::from_str(EVENT_SCHEMA_JSON).unwrap();
        let fields = reader["fields"].as_array_mut().unwrap();
        fields.retain(|f| {
            !matches!(
                f["name"].as_str(),
                Some("connector_status" | "refunded_amount" | "refund_pending_amount")
            )
        });
        let reader = Schema::parse_str(&reader.to_string()).unwrap();
        let bytes = EventEncoder::new(WireFormat::SingleObject)
            .encode(&sample_event(Ok(charged_report())))
            .unwrap();
        let value = decode_event_value(&bytes, Some(&reader)).unwrap();
        let json = avro_to_json(value).unwrap();
        assert_eq!(json["status"], "AUTHENTICATION_PENDING");
        assert!(json.get("connector_status").is_none());
        assert!(json.get("refunded_amount").is_none());
    }

    #[test]
    fn new_reader_with_an_added_optional_field_reads_old_events() {
        let mut reader: serde_json::Value = serde_json::from_str(EVENT_SCHEMA_JSON).unwrap();
        reader["fields"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!(
                {"name": "future_field", "type": ["null", "string"], "default": null}
            ));
        let reader = Schema::parse_str(&reader.to_string()).unwrap();
        let bytes = EventEncoder::new(WireFormat::SingleObject)
            .encode(&sample_event(Ok(charged_report())))
            .unwrap();
        let json = avro_to_json(decode_event_value(&bytes, Some(&reader)).unwrap()).unwrap();
        assert_eq!(json["future_field"], serde_json::Value::Null);
        assert_eq!(json["connector_status"], "OPEN");
    }

    /// Every released version of each schema (`schemas/released/v<N>/`), oldest first.
    fn released(file: &str) -> Vec<(String, Schema)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/released");
        let mut versions: Vec<(u32, String)> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                Some((name.strip_prefix('v')?.parse().ok()?, name))
            })
            .collect();
        versions.sort();
        versions
            .into_iter()
            .filter_map(|(_, v)| {
                let text = std::fs::read_to_string(format!("{dir}/{v}/{file}")).ok()?;
                Some((v, Schema::parse_str(&text).unwrap()))
            })
            .collect()
    }

    #[test]
    fn live_schemas_stay_compatible_with_every_released_version_both_ways() {
        use apache_avro::schema_compatibility::SchemaCompatibility;
        let s = Schemas::get();
        for (file, live) in [
            ("payment_status_event.avsc", &s.event),
            ("status_check_request.avsc", &s.request),
        ] {
            let versions = released(file);
            assert!(!versions.is_empty(), "no released copy of {file}");
            for (version, old) in versions {
                // Old readers read new data (forward), new readers read old data (backward).
                if let Err(e) = SchemaCompatibility::can_read(live, &old) {
                    panic!("{file}: readers of released {version} cannot read the live schema's data: {e}");
                }
                if let Err(e) = SchemaCompatibility::can_read(&old, live) {
                    panic!("{file}: the live schema cannot read data written with released {version}: {e}");
                }
            }
        }
    }

    #[test]
    fn the_guard_catches_incompatible_changes() {
        use apache_avro::schema_compatibility::SchemaCompatibility;
        let s = Schemas::get();
        // A required field added without a default: new readers cannot read old data.
        let mut added: serde_json::Value = serde_json::from_str(EVENT_SCHEMA_JSON).unwrap();
        added["fields"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "required_new", "type": "string"}));
        let added = Schema::parse_str(&added.to_string()).unwrap();
        assert!(SchemaCompatibility::can_read(&s.event, &added).is_err());
        // A field's type changed: old readers cannot read new data.
        let mut changed: serde_json::Value = serde_json::from_str(EVENT_SCHEMA_JSON).unwrap();
        for f in changed["fields"].as_array_mut().unwrap() {
            if f["name"] == "attempts" {
                f["type"] = serde_json::json!("string");
            }
        }
        let changed = Schema::parse_str(&changed.to_string()).unwrap();
        assert!(SchemaCompatibility::can_read(&changed, &s.event).is_err());
    }

    #[test]
    fn foreign_fingerprint_and_garbage_are_rejected() {
        let mut bytes = EventEncoder::new(WireFormat::SingleObject)
            .encode(&sample_event(Ok(charged_report())))
            .unwrap();
        bytes[5] ^= 0xff;
        assert!(matches!(
            decode_event_value(&bytes, None),
            Err(AvroError::Framing(_))
        ));
        assert!(matches!(
            decode_event_value(b"{\"json\":1}", None),
            Err(AvroError::Framing(_))
        ));
        assert!(decode_event_value(&[0xC3, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0xff], None).is_err());
    }
}
