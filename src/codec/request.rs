//! Request decoding: Kafka value bytes plus headers to a validated
//! [`StatusCheckRequest`], or a [`Rejection`] with a stable code that the
//! dead-letter header `paysync-error-code` carries.
//!
//! Values that begin with Avro framing (`00` + 4-byte id, or `C3 01`) are decoded
//! with the request schema and then validated exactly like JSON, so both formats
//! share one set of rules.

use std::collections::HashSet;
use std::io::Read;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

use super::avro::{self, Schemas};
use crate::domain::request::{
    CaptureMethod, FutureUsage, Money, PaymentExperience, PaymentMethodType, StatusCheckRequest,
    SyncType, TransactionId,
};

/// Stable reasons a request cannot be used. Their `as_str()` values are part of the
/// product contract (dead-letter headers, metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectCode {
    /// Not JSON, or JSON that is not an object.
    InvalidJson,
    /// Avro framing that does not decode with the request schema.
    InvalidAvro,
    /// No `connector_transaction_id`.
    MissingTransactionId,
    /// A `connector_transaction_id` that is not safe for a URL path.
    InvalidTransactionId,
    /// A known field with the wrong type or an invalid value.
    InvalidField,
    /// A routing header that is not UTF-8.
    InvalidHeader,
    /// A connector that is not configured.
    UnknownConnector,
    /// A merchant account that is not configured for the connector.
    UnknownMerchant,
    /// A payment method the connector does not support.
    UnsupportedPaymentMethod,
    /// A value larger than `processing.max_request_bytes`, or no value at all.
    Oversize,
    /// A message without a value (a tombstone).
    EmptyValue,
    /// Processing panicked or the event could not be encoded (a bug); the request
    /// is kept rather than lost.
    InternalError,
    /// The broker refused the event permanently (too large, unknown topic, not
    /// authorized); the request is kept here instead.
    PublishRefused,
    /// Follow mode: the chain's re-check record cannot fit the producer's record
    /// limit even without the input's headers; the chain ended at this check.
    RecheckTooLarge,
}

impl RejectCode {
    /// Every code (for documentation and metric pre-registration).
    pub const ALL: &'static [RejectCode] = &[
        RejectCode::InvalidJson,
        RejectCode::InvalidAvro,
        RejectCode::MissingTransactionId,
        RejectCode::InvalidTransactionId,
        RejectCode::InvalidField,
        RejectCode::InvalidHeader,
        RejectCode::UnknownConnector,
        RejectCode::UnknownMerchant,
        RejectCode::UnsupportedPaymentMethod,
        RejectCode::Oversize,
        RejectCode::EmptyValue,
        RejectCode::InternalError,
        RejectCode::PublishRefused,
        RejectCode::RecheckTooLarge,
    ];

    /// A request rejected for this reason can succeed once something outside the
    /// record changes (an account added, a connector back, a bug fixed), so a
    /// plain `paysync redrive` sends it; the others can never be processed as
    /// they are.
    pub fn recoverable(self) -> bool {
        match self {
            RejectCode::UnknownConnector
            | RejectCode::UnknownMerchant
            | RejectCode::UnsupportedPaymentMethod
            | RejectCode::InternalError
            | RejectCode::PublishRefused => true,
            RejectCode::InvalidJson
            | RejectCode::InvalidAvro
            | RejectCode::MissingTransactionId
            | RejectCode::InvalidTransactionId
            | RejectCode::InvalidField
            | RejectCode::InvalidHeader
            | RejectCode::Oversize
            | RejectCode::EmptyValue
            | RejectCode::RecheckTooLarge => false,
        }
    }

    /// The stable code.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::InvalidJson => "invalid_json",
            RejectCode::InvalidAvro => "invalid_avro",
            RejectCode::MissingTransactionId => "missing_transaction_id",
            RejectCode::InvalidTransactionId => "invalid_transaction_id",
            RejectCode::InvalidField => "invalid_field",
            RejectCode::InvalidHeader => "invalid_header",
            RejectCode::UnknownConnector => "unknown_connector",
            RejectCode::UnknownMerchant => "unknown_merchant",
            RejectCode::UnsupportedPaymentMethod => "unsupported_payment_method",
            RejectCode::Oversize => "oversize",
            RejectCode::EmptyValue => "empty_value",
            RejectCode::InternalError => "internal_error",
            RejectCode::PublishRefused => "publish_refused",
            RejectCode::RecheckTooLarge => "recheck_too_large",
        }
    }
}

/// A request that cannot be used, with a code and a message for the dead letter.
/// Messages name fields, never echo their values (they may be secrets).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct Rejection {
    /// The stable code.
    pub code: RejectCode,
    /// What is wrong, naming the field.
    pub message: String,
}

impl Rejection {
    /// A rejection with a code and message.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }
}

/// Where a message came from; the default `request_id` is built from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePosition<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A Kafka header as received: name and value are bytes (other clients can write
/// names that are not UTF-8), and the value may be null.
pub type RawHeader<'a> = (&'a [u8], Option<&'a [u8]>);

/// The Confluent schema ids whose values are decoded as requests: those listed in
/// `processing.accepted_schema_ids` plus, with a registry, the ids registered under
/// the input topic's subject (refreshed in the background). Shared and cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct AcceptedSchemaIds(Arc<RwLock<HashSet<u32>>>);

impl AcceptedSchemaIds {
    /// A set holding `ids`.
    pub fn new(ids: impl IntoIterator<Item = u32>) -> Self {
        AcceptedSchemaIds(Arc::new(RwLock::new(ids.into_iter().collect())))
    }

    /// True when values framed with `id` are accepted.
    pub fn contains(&self, id: u32) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    /// Adds ids (a registry refresh); ids are never removed while running.
    pub fn extend(&self, ids: impl IntoIterator<Item = u32>) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(ids);
    }
}

/// Settings the decoder needs.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Connector used when neither the field nor the header names one.
    pub default_connector: String,
    /// Merchant account used when neither the field nor the header names one.
    pub default_merchant: String,
    /// Largest accepted value in bytes.
    pub max_request_bytes: usize,
    /// Confluent schema ids accepted for Avro input.
    pub accepted_schema_ids: AcceptedSchemaIds,
    /// Whether a request that says nothing about following is followed.
    pub default_follow: bool,
}

impl DecodeOptions {
    /// Options with these defaults, a 64 KiB value limit and no accepted Confluent ids.
    pub fn new(default_connector: &str, default_merchant: &str) -> Self {
        DecodeOptions {
            default_connector: default_connector.to_owned(),
            default_merchant: default_merchant.to_owned(),
            max_request_bytes: 64 * 1024,
            accepted_schema_ids: AcceptedSchemaIds::default(),
            default_follow: false,
        }
    }
}

/// Decodes one message. `headers` are the Kafka headers (name, value), as bytes.
pub fn decode_request(
    value: Option<&[u8]>,
    headers: &[RawHeader<'_>],
    position: SourcePosition<'_>,
    options: &DecodeOptions,
) -> Result<StatusCheckRequest, Rejection> {
    let bytes =
        value.ok_or_else(|| Rejection::new(RejectCode::EmptyValue, "message has no value"))?;
    if bytes.len() > options.max_request_bytes {
        return Err(Rejection::new(
            RejectCode::Oversize,
            format!(
                "value is {} bytes, more than the limit of {}",
                bytes.len(),
                options.max_request_bytes
            ),
        ));
    }
    let object = if avro::looks_like_avro(bytes) {
        avro_object(bytes, &options.accepted_schema_ids)?
    } else {
        json_object(bytes)?
    };
    from_object(&object, headers, position, options)
}

fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, Rejection> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Rejection::new(
            RejectCode::InvalidJson,
            "value is JSON but not an object",
        )),
        // serde_json's message gives line and column, never the content.
        Err(e) => Err(Rejection::new(
            RejectCode::InvalidJson,
            format!("value is not JSON: {e}"),
        )),
    }
}

/// A reader over a datum that notices when the decoder asked for bytes past the
/// end: apache-avro reads a union index at end of input as branch 0 (null), so a
/// truncated datum would otherwise decode with its remaining optional fields null.
struct ExactReader<'a> {
    rest: &'a [u8],
    ran_out: bool,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && self.rest.is_empty() {
            self.ran_out = true;
        }
        self.rest.read(buf)
    }
}

fn avro_object(
    bytes: &[u8],
    accepted_ids: &AcceptedSchemaIds,
) -> Result<Map<String, Value>, Rejection> {
    let schemas = Schemas::get();
    let (format, datum) = avro::unframe(bytes, schemas.request_fingerprint)
        .map_err(|e| Rejection::new(RejectCode::InvalidAvro, e.to_string()))?;
    if let avro::WireFormat::Confluent { schema_id } = format {
        if !accepted_ids.contains(schema_id) {
            return Err(Rejection::new(
                RejectCode::InvalidAvro,
                format!(
                    "schema id {schema_id} is neither registered for the input topic nor listed in processing.accepted_schema_ids"
                ),
            ));
        }
    }
    // Every declared length must fit what follows before apache-avro, which
    // allocates a declared length before reading it, sees the datum.
    super::bounds::check(&schemas.request, datum).map_err(|e| {
        Rejection::new(
            RejectCode::InvalidAvro,
            format!("not a StatusCheckRequest datum: {e}"),
        )
    })?;
    let mut reader = ExactReader {
        rest: datum,
        ran_out: false,
    };
    let value = apache_avro::from_avro_datum(&schemas.request, &mut reader, None).map_err(|e| {
        Rejection::new(
            RejectCode::InvalidAvro,
            format!("not a StatusCheckRequest datum: {e}"),
        )
    })?;
    if reader.ran_out {
        return Err(Rejection::new(
            RejectCode::InvalidAvro,
            "the StatusCheckRequest datum is truncated",
        ));
    }
    if !reader.rest.is_empty() {
        return Err(Rejection::new(
            RejectCode::InvalidAvro,
            format!(
                "{} bytes follow the StatusCheckRequest datum",
                reader.rest.len()
            ),
        ));
    }
    match avro::avro_to_json(value) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(Rejection::new(
            RejectCode::InvalidAvro,
            "avro datum is not a record",
        )),
    }
}

fn invalid(field: &str, expected: &str) -> Rejection {
    Rejection::new(
        RejectCode::InvalidField,
        format!("field `{field}` must be {expected}"),
    )
}

/// A field's value, treating JSON `null` as absent.
fn present<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

fn opt_string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, Rejection> {
    match present(obj, field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(field, "a string")),
    }
}

/// A string that is used for routing or echoed into headers: non-empty, at most
/// 256 characters, no control characters.
fn opt_routing(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, Rejection> {
    match opt_string(obj, field)? {
        Some(s) if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) => Err(
            invalid(field, "1 to 256 characters without control characters"),
        ),
        other => Ok(other),
    }
}

fn opt_enum<T>(
    obj: &Map<String, Value>,
    field: &str,
    parse: impl Fn(&Value) -> Option<T>,
) -> Result<Option<T>, Rejection> {
    match present(obj, field) {
        None => Ok(None),
        Some(v) => parse(v)
            .map(Some)
            .ok_or_else(|| invalid(field, "a known enum symbol or number")),
    }
}

fn opt_bool(obj: &Map<String, Value>, field: &str) -> Result<Option<bool>, Rejection> {
    match present(obj, field) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(field, "a boolean")),
    }
}

/// `metadata` is a UCS SecretString; callers send either a string or a JSON object.
fn opt_secret(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, Rejection> {
    match present(obj, field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v @ Value::Object(_)) => Ok(Some(v.to_string())),
        Some(_) => Err(invalid(field, "a string or an object")),
    }
}

fn opt_money(obj: &Map<String, Value>) -> Result<Option<Money>, Rejection> {
    let Some(v) = present(obj, "amount") else {
        return Ok(None);
    };
    let Value::Object(m) = v else {
        return Err(invalid("amount", "an object {minor_amount, currency}"));
    };
    // proto JSON writes int64 as a string; accept both.
    let minor_amount = match m.get("minor_amount") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.parse::<i64>().ok(),
        _ => None,
    }
    .filter(|a| *a >= 0)
    .ok_or_else(|| invalid("amount.minor_amount", "a non-negative integer"))?;
    let currency = match m.get("currency") {
        Some(Value::String(c)) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) => {
            c.clone()
        }
        _ => return Err(invalid("amount.currency", "a three-letter ISO 4217 code")),
    };
    Ok(Some(Money {
        minor_amount,
        currency,
    }))
}

fn header<'a>(headers: &[RawHeader<'a>], name: &str) -> Result<Option<&'a str>, Rejection> {
    // The last occurrence wins, as with HTTP-style repeated headers.
    match headers
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
    {
        None | Some((_, None)) => Ok(None),
        Some((_, Some(bytes))) => std::str::from_utf8(bytes).map(Some).map_err(|_| {
            Rejection::new(
                RejectCode::InvalidHeader,
                format!("header `{name}` is not UTF-8"),
            )
        }),
    }
}

/// The JSON field wins over the header, the header over the default.
fn routed(
    obj: &Map<String, Value>,
    field: &str,
    headers: &[RawHeader<'_>],
    header_name: &str,
) -> Result<Option<String>, Rejection> {
    if let Some(v) = opt_routing(obj, field)? {
        return Ok(Some(v));
    }
    match header(headers, header_name)? {
        Some(h) if h.is_empty() || h.len() > 256 || h.chars().any(char::is_control) => {
            Err(Rejection::new(
                RejectCode::InvalidHeader,
                format!(
                    "header `{header_name}` must be 1 to 256 characters without control characters"
                ),
            ))
        }
        Some(h) => Ok(Some(h.to_owned())),
        None => Ok(None),
    }
}

fn from_object(
    obj: &Map<String, Value>,
    headers: &[RawHeader<'_>],
    position: SourcePosition<'_>,
    options: &DecodeOptions,
) -> Result<StatusCheckRequest, Rejection> {
    let id = match present(obj, "connector_transaction_id") {
        None => {
            return Err(Rejection::new(
                RejectCode::MissingTransactionId,
                "field `connector_transaction_id` is required",
            ))
        }
        Some(Value::String(s)) => TransactionId::parse(s)
            .map_err(|e| Rejection::new(RejectCode::InvalidTransactionId, e.to_string()))?,
        Some(_) => {
            return Err(Rejection::new(
                RejectCode::InvalidTransactionId,
                "field `connector_transaction_id` must be a string",
            ))
        }
    };
    let connector = routed(obj, "connector", headers, "x-connector")?
        .unwrap_or_else(|| options.default_connector.clone());
    let merchant_id = routed(obj, "merchant_id", headers, "x-merchant-id")?
        .unwrap_or_else(|| options.default_merchant.clone());
    let request_id = routed(obj, "request_id", headers, "x-request-id")?.unwrap_or_else(|| {
        format!(
            "{}:{}:{}",
            position.topic, position.partition, position.offset
        )
    });
    let payment_method_type = match opt_string(obj, "payment_method_type")? {
        None => None,
        Some(s) => Some(PaymentMethodType::parse(&s).ok_or_else(|| {
            invalid(
                "payment_method_type",
                "a PaymentMethodType symbol such as GOOGLE_PAY",
            )
        })?),
    };
    let connector_customer_id = match present(obj, "state") {
        None => None,
        Some(Value::Object(state)) => opt_string(state, "connector_customer_id")
            .map_err(|_| invalid("state.connector_customer_id", "a string"))?,
        Some(_) => return Err(invalid("state", "an object")),
    };
    let mut request = StatusCheckRequest::new(id, &connector, &merchant_id, &request_id);
    request.payment_method_type = payment_method_type;
    request.merchant_transaction_id = opt_string(obj, "merchant_transaction_id")?;
    request.encoded_data = opt_string(obj, "encoded_data")?;
    request.capture_method = opt_enum(obj, "capture_method", CaptureMethod::parse)?;
    request.amount = opt_money(obj)?;
    request.setup_future_usage = opt_enum(obj, "setup_future_usage", FutureUsage::parse)?;
    request.connector_customer_id = connector_customer_id;
    request.metadata = opt_secret(obj, "metadata")?;
    request.connector_feature_data = opt_secret(obj, "connector_feature_data")?;
    request.sync_type = opt_enum(obj, "sync_type", SyncType::parse)?;
    request.connector_order_reference_id = opt_string(obj, "connector_order_reference_id")?;
    request.test_mode = opt_bool(obj, "test_mode")?;
    request.payment_experience = opt_enum(obj, "payment_experience", PaymentExperience::parse)?;
    request.merchant_request_id = opt_string(obj, "merchant_request_id")?;
    request.follow = match opt_bool(obj, "follow")? {
        Some(f) => f,
        None => match header(headers, "x-follow")? {
            None => options.default_follow,
            Some("true") => true,
            Some("false") => false,
            Some(_) => {
                return Err(Rejection::new(
                    RejectCode::InvalidHeader,
                    "header `x-follow` must be `true` or `false`",
                ))
            }
        },
    };
    request.from_webhook = header(headers, WEBHOOK_SOURCE.0)? == Some(WEBHOOK_SOURCE.1);
    request.connected_account = match opt_string(obj, "connected_account")? {
        None => None,
        Some(a) if is_connected_account(&a) => Some(a),
        Some(_) => {
            return Err(invalid(
                "connected_account",
                "a connected account id (acct_ and 1 to 64 letters or digits)",
            ))
        }
    };
    Ok(request)
}

/// True for a connected account id: `acct_` and 1 to 64 letters or digits
/// (it goes into a header).
pub fn is_connected_account(id: &str) -> bool {
    id.strip_prefix("acct_").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 64 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// The header (name, value) paysync's webhook intake puts on the requests it
/// produces.
pub const WEBHOOK_SOURCE: (&str, &str) = ("x-request-source", "webhook");

/// The header that carries a processor's own event id on a request the intake
/// wrote (processors resend one event id for days, so it is not the request id).
pub const WEBHOOK_EVENT_ID: &str = "x-webhook-event-id";

/// A status-check request the webhook intake writes: the input contract's
/// JSON, keyed by transaction id, with the intake's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRequest {
    /// The payment to check.
    pub transaction_id: TransactionId,
    /// The connector's name.
    pub connector: String,
    /// The merchant account.
    pub merchant_id: String,
    /// This delivery's own id.
    pub request_id: String,
    /// Follow the payment until final.
    pub follow: bool,
    /// The payment method, when the connector's status path needs one.
    pub payment_method_type: Option<PaymentMethodType>,
    /// The processor's event id, when it sends one.
    pub event_id: Option<String>,
    /// A connected account to read the payment through (Stripe Connect).
    pub connected_account: Option<String>,
}

/// A record ready to produce: key, value and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRecord {
    /// The record key.
    pub key: Vec<u8>,
    /// The record value.
    pub value: Vec<u8>,
    /// Headers, in order.
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

impl WebhookRequest {
    /// The record for the input topic; [`decode_request`] reads it back.
    pub fn encode(&self) -> EncodedRecord {
        let mut value = serde_json::json!({
            "connector_transaction_id": self.transaction_id.as_str(),
            "connector": self.connector,
            "merchant_id": self.merchant_id,
            "request_id": self.request_id,
            "follow": self.follow,
        });
        if let Some(m) = &self.payment_method_type {
            value["payment_method_type"] = Value::from(m.as_str());
        }
        if let Some(a) = &self.connected_account {
            value["connected_account"] = Value::from(a.as_str());
        }
        let mut headers = vec![(WEBHOOK_SOURCE.0, WEBHOOK_SOURCE.1.as_bytes().to_vec())];
        if let Some(id) = &self.event_id {
            headers.push((WEBHOOK_EVENT_ID, id.as_bytes().to_vec()));
        }
        EncodedRecord {
            key: self.transaction_id.as_str().as_bytes().to_vec(),
            value: value.to_string().into_bytes(),
            headers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const POS: SourcePosition<'static> = SourcePosition {
        topic: "in",
        partition: 3,
        offset: 99,
    };

    fn decode(v: &[u8], headers: &[RawHeader<'_>]) -> Result<StatusCheckRequest, Rejection> {
        let options = DecodeOptions {
            accepted_schema_ids: AcceptedSchemaIds::new([7]),
            ..DecodeOptions::new("cm", "default")
        };
        decode_request(Some(v), headers, POS, &options)
    }

    #[test]
    fn a_webhook_request_reads_back_as_the_request_it_was() {
        for (method, event_id, follow, account) in [
            (
                Some("IDEAL"),
                Some("evt_1"),
                true,
                Some("acct_1032D82eZvKYlo2C"),
            ),
            (None, None, false, None),
        ] {
            let written = WebhookRequest {
                transaction_id: TransactionId::parse("tr_WDqYK6vllg").unwrap(),
                connector: "mollie".into(),
                merchant_id: "shop".into(),
                request_id: "webhook:mollie:0123".into(),
                follow,
                payment_method_type: method.and_then(PaymentMethodType::parse),
                event_id: event_id.map(str::to_owned),
                connected_account: account.map(str::to_owned),
            };
            let record = written.encode();
            assert_eq!(record.key, b"tr_WDqYK6vllg");
            let headers: Vec<RawHeader<'_>> = record
                .headers
                .iter()
                .map(|(k, v)| (k.as_bytes(), Some(v.as_slice())))
                .collect();
            // The default follow is the opposite, so the field is what counts.
            let options = DecodeOptions {
                default_follow: !follow,
                ..DecodeOptions::new("cm", "default")
            };
            let read = decode_request(Some(&record.value), &headers, POS, &options).unwrap();
            assert_eq!(read.connector_transaction_id, written.transaction_id);
            assert_eq!(read.connector, "mollie");
            assert_eq!(read.merchant_id, "shop");
            assert_eq!(read.request_id, "webhook:mollie:0123");
            assert_eq!(read.follow, follow);
            assert_eq!(read.payment_method_type, written.payment_method_type);
            assert!(read.from_webhook);
            assert_eq!(read.connected_account.as_deref(), account);
            let event_header = record
                .headers
                .iter()
                .find(|(k, _)| *k == WEBHOOK_EVENT_ID)
                .map(|(_, v)| v.as_slice());
            assert_eq!(event_header, event_id.map(str::as_bytes));
        }
    }

    fn code_of(v: serde_json::Value) -> RejectCode {
        decode(v.to_string().as_bytes(), &[]).unwrap_err().code
    }

    #[test]
    fn a_connected_account_must_be_one() {
        for bad in ["acct_", "acct_../x", "acc_1", "acct_1\r\nx-injected: 1"] {
            assert_eq!(
                code_of(json!({"connector_transaction_id": "pi_1", "connected_account": bad})),
                RejectCode::InvalidField,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn minimal_request_gets_defaults() {
        let r = decode(br#"{"connector_transaction_id":"tx-1"}"#, &[]).unwrap();
        assert_eq!(r.connector_transaction_id.as_str(), "tx-1");
        assert_eq!(r.connector, "cm");
        assert_eq!(r.merchant_id, "default");
        assert_eq!(r.request_id, "in:3:99");
        assert_eq!(
            r.payment_method_type, None,
            "the connector picks its default"
        );
    }

    #[test]
    fn every_get_field_is_accepted_and_typed() {
        let r = decode(
            json!({
                "connector_transaction_id": "tx-2",
                "merchant_transaction_id": "m-1",
                "encoded_data": "enc",
                "capture_method": "MANUAL",
                "handle_response": "AAAA",
                "amount": {"minor_amount": "1200", "currency": "EUR"},
                "setup_future_usage": 1,
                "state": {"connector_customer_id": "cust", "access_token": {"token": "ignored"}},
                "metadata": {"k": "v"},
                "connector_feature_data": "cfd",
                "sync_type": "SINGLE_PAYMENT_SYNC",
                "connector_order_reference_id": "ord",
                "test_mode": true,
                "payment_experience": "REDIRECT_TO_URL",
                "merchant_request_id": "idem-1",
                "payment_method_type": "IDEAL",
                "unknown_extra": [1, 2, 3]
            })
            .to_string()
            .as_bytes(),
            &[],
        )
        .unwrap();
        assert_eq!(r.merchant_transaction_id.as_deref(), Some("m-1"));
        assert_eq!(r.capture_method, Some(CaptureMethod::MANUAL));
        assert_eq!(
            r.amount,
            Some(Money {
                minor_amount: 1200,
                currency: "EUR".into()
            })
        );
        assert_eq!(r.setup_future_usage, Some(FutureUsage::OFF_SESSION));
        assert_eq!(r.connector_customer_id.as_deref(), Some("cust"));
        assert_eq!(r.metadata.as_deref(), Some(r#"{"k":"v"}"#));
        assert_eq!(r.sync_type, Some(SyncType::SINGLE_PAYMENT_SYNC));
        assert_eq!(r.test_mode, Some(true));
        assert_eq!(
            r.payment_experience,
            Some(PaymentExperience::REDIRECT_TO_URL)
        );
        assert_eq!(r.merchant_request_id.as_deref(), Some("idem-1"));
        assert_eq!(r.payment_method_type.unwrap().as_str(), "IDEAL");
    }

    #[test]
    fn follow_from_the_field_the_header_or_the_default() {
        let body = br#"{"connector_transaction_id":"tx"}"#;
        assert!(!decode(body, &[]).unwrap().follow, "default off");
        assert!(
            decode(body, &[(b"x-follow", Some(b"true"))])
                .unwrap()
                .follow
        );
        assert!(
            !decode(body, &[(b"x-follow", Some(b"false"))])
                .unwrap()
                .follow
        );
        let field = br#"{"connector_transaction_id":"tx","follow":false}"#;
        assert!(
            !decode(field, &[(b"x-follow", Some(b"true"))])
                .unwrap()
                .follow,
            "the field wins"
        );
        assert_eq!(
            decode(body, &[(b"x-follow", Some(b"yes"))])
                .unwrap_err()
                .code,
            RejectCode::InvalidHeader
        );
        assert_eq!(
            code_of(json!({"connector_transaction_id": "tx", "follow": "yes"})),
            RejectCode::InvalidField
        );
        let options = DecodeOptions {
            default_follow: true,
            ..DecodeOptions::new("cm", "default")
        };
        assert!(
            decode_request(Some(body), &[], POS, &options)
                .unwrap()
                .follow
        );
    }

    #[test]
    fn headers_route_when_fields_are_absent_and_fields_win() {
        let headers: &[RawHeader<'_>] = &[
            (b"x-connector", Some(b"other")),
            (b"X-Merchant-Id", Some(b"shop-2")),
            (b"\xff\xfe", Some(b"a header whose name is not UTF-8")),
            (b"x-request-id", Some(b"req-h")),
        ];
        let r = decode(br#"{"connector_transaction_id":"tx"}"#, headers).unwrap();
        assert_eq!(
            (
                r.connector.as_str(),
                r.merchant_id.as_str(),
                r.request_id.as_str()
            ),
            ("other", "shop-2", "req-h")
        );
        let r = decode(
            br#"{"connector_transaction_id":"tx","connector":"cm","merchant_id":"m","request_id":"r"}"#,
            headers,
        )
        .unwrap();
        assert_eq!(
            (
                r.connector.as_str(),
                r.merchant_id.as_str(),
                r.request_id.as_str()
            ),
            ("cm", "m", "r")
        );
    }

    #[test]
    fn rejections_carry_stable_codes() {
        let cases: Vec<(&[u8], RejectCode)> = vec![
            (b"not json", RejectCode::InvalidJson),
            (b"[1,2]", RejectCode::InvalidJson),
            (b"\"tx\"", RejectCode::InvalidJson),
            (b"{}", RejectCode::MissingTransactionId),
            (
                br#"{"connector_transaction_id":null}"#,
                RejectCode::MissingTransactionId,
            ),
            (
                br#"{"connector_transaction_id":""}"#,
                RejectCode::InvalidTransactionId,
            ),
            (
                br#"{"connector_transaction_id":"../x"}"#,
                RejectCode::InvalidTransactionId,
            ),
            (
                br#"{"connector_transaction_id":"a/b"}"#,
                RejectCode::InvalidTransactionId,
            ),
            (
                br#"{"connector_transaction_id":".."}"#,
                RejectCode::InvalidTransactionId,
            ),
            (
                br#"{"connector_transaction_id":42}"#,
                RejectCode::InvalidTransactionId,
            ),
            (&[0xff, 0xfe, 0x00], RejectCode::InvalidJson),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                decode(bytes, &[]).unwrap_err().code,
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let base = |k: &str, v: serde_json::Value| {
            let mut o = json!({"connector_transaction_id": "tx"});
            o[k] = v;
            o
        };
        for (field, bad) in [
            ("amount", json!(12)),
            ("amount", json!({"minor_amount": -1, "currency": "EUR"})),
            ("amount", json!({"minor_amount": 1, "currency": "eur"})),
            ("amount", json!({"minor_amount": 1.5, "currency": "EUR"})),
            ("capture_method", json!("SOMETIMES")),
            ("test_mode", json!("yes")),
            ("merchant_transaction_id", json!(5)),
            ("payment_method_type", json!("google-pay")),
            ("state", json!("s")),
            ("metadata", json!(7)),
            ("merchant_id", json!("")),
            ("request_id", json!("a\nb")),
        ] {
            assert_eq!(
                code_of(base(field, bad.clone())),
                RejectCode::InvalidField,
                "{field}={bad}"
            );
        }
    }

    #[test]
    fn oversize_and_tombstones_are_rejected_before_parsing() {
        let opts = DecodeOptions {
            max_request_bytes: 16,
            ..DecodeOptions::new("cm", "default")
        };
        let err = decode_request(Some(&[b' '; 17]), &[], POS, &opts).unwrap_err();
        assert_eq!(err.code, RejectCode::Oversize);
        let err = decode_request(None, &[], POS, &opts).unwrap_err();
        assert_eq!(err.code, RejectCode::EmptyValue);
    }

    #[test]
    fn bad_header_is_rejected() {
        let headers: &[RawHeader<'_>] = &[(b"x-merchant-id", Some(&[0xff, 0xff]))];
        assert_eq!(
            decode(br#"{"connector_transaction_id":"tx"}"#, headers)
                .unwrap_err()
                .code,
            RejectCode::InvalidHeader
        );
        // A null routing header counts as absent.
        let headers: &[RawHeader<'_>] = &[(b"x-merchant-id", None)];
        let r = decode(br#"{"connector_transaction_id":"tx"}"#, headers).unwrap();
        assert_eq!(r.merchant_id, "default");
    }

    #[test]
    fn messages_never_echo_values() {
        let err = decode(
            br#"{"connector_transaction_id":"tx","metadata":12345678}"#,
            &[],
        )
        .unwrap_err();
        assert!(!err.message.contains("12345678"), "{}", err.message);
        let err = decode(br#"{"connector_transaction_id":"sk_live_abc/def"}"#, &[]).unwrap_err();
        assert!(!err.message.contains("sk_live"), "{}", err.message);
    }

    #[test]
    fn avro_requests_decode_in_both_framings() {
        use apache_avro::types::{Record, Value as AV};
        let schemas = Schemas::get();
        let mut rec = Record::new(&schemas.request).unwrap();
        rec.put("connector_transaction_id", "tx-avro");
        rec.put(
            "merchant_id",
            AV::Union(1, Box::new(AV::String("shop".into()))),
        );
        rec.put(
            "amount",
            AV::Union(
                1,
                Box::new(AV::Record(vec![
                    ("minor_amount".into(), AV::Long(500)),
                    ("currency".into(), AV::String("USD".into())),
                ])),
            ),
        );
        let datum = apache_avro::to_avro_datum(&schemas.request, rec).unwrap();
        let mut single = vec![0xC3, 0x01];
        single.extend_from_slice(&schemas.request_fingerprint.to_le_bytes());
        single.extend_from_slice(&datum);
        let mut confluent = vec![0, 0, 0, 0, 7];
        confluent.extend_from_slice(&datum);
        for framed in [single, confluent] {
            let r = decode(&framed, &[]).unwrap();
            assert_eq!(r.connector_transaction_id.as_str(), "tx-avro");
            assert_eq!(r.merchant_id, "shop");
            assert_eq!(
                r.amount,
                Some(Money {
                    minor_amount: 500,
                    currency: "USD".into()
                })
            );
        }
        // Wrong fingerprint, truncated datum.
        let mut wrong = vec![0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8];
        wrong.extend_from_slice(&datum);
        assert_eq!(
            decode(&wrong, &[]).unwrap_err().code,
            RejectCode::InvalidAvro
        );
        assert_eq!(
            decode(&[0, 0, 0, 0, 7, 0x80], &[]).unwrap_err().code,
            RejectCode::InvalidAvro
        );
    }

    #[test]
    fn a_truncated_or_padded_avro_datum_is_invalid() {
        // The issue's example: a string "abcd" and nothing for the 17 optional
        // fields. apache-avro alone decodes it with every optional field null.
        let truncated = [0, 0, 0, 0, 7, 0x08, b'a', b'b', b'c', b'd'];
        let err = decode(&truncated, &[]).unwrap_err();
        assert_eq!(err.code, RejectCode::InvalidAvro);
        assert!(err.message.contains("truncated"), "{}", err.message);

        let schemas = Schemas::get();
        let mut rec = apache_avro::types::Record::new(&schemas.request).unwrap();
        rec.put("connector_transaction_id", "tx-exact");
        let datum = apache_avro::to_avro_datum(&schemas.request, rec).unwrap();
        let mut framed = vec![0, 0, 0, 0, 7];
        framed.extend_from_slice(&datum);
        assert!(decode(&framed, &[]).is_ok(), "the exact datum decodes");
        // Every shorter prefix is rejected, never accepted with fields missing.
        for cut in 5..framed.len() {
            assert_eq!(
                decode(&framed[..cut], &[]).map(|_| ()).unwrap_err().code,
                RejectCode::InvalidAvro,
                "prefix of {cut} bytes"
            );
        }
        framed.push(0);
        let err = decode(&framed, &[]).unwrap_err();
        assert_eq!(err.code, RejectCode::InvalidAvro);
        assert!(err.message.contains("1 bytes follow"), "{}", err.message);
    }

    #[test]
    fn confluent_schema_ids_must_be_accepted() {
        let schemas = Schemas::get();
        let mut rec = apache_avro::types::Record::new(&schemas.request).unwrap();
        rec.put("connector_transaction_id", "tx-id");
        let datum = apache_avro::to_avro_datum(&schemas.request, rec).unwrap();
        let mut framed = vec![0, 0, 0, 0, 9];
        framed.extend_from_slice(&datum);
        let err = decode(&framed, &[]).unwrap_err();
        assert_eq!(err.code, RejectCode::InvalidAvro);
        assert!(err.message.contains("schema id 9"), "{}", err.message);
        let options = DecodeOptions::new("cm", "default");
        options.accepted_schema_ids.extend([9]);
        assert!(decode_request(Some(&framed), &[], POS, &options).is_ok());
    }

    #[test]
    fn single_object_requests_carry_the_spec_fingerprint() {
        // The request schema's fingerprint as fastavro and Java compute it
        // (tests/fixtures/avro/vectors.json), in wire order.
        let vectors: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/avro/vectors.json")).unwrap();
        let wire = vectors["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["file"] == "schemas/status_check_request.avsc")
            .unwrap()["wire"]
            .as_str()
            .unwrap()
            .to_owned();
        let hex: String = Schemas::get()
            .request_fingerprint
            .to_le_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, wire);
    }
}
