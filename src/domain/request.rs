//! `StatusCheckRequest`: a validated request to learn one payment's current status,
//! with the field names of the UCS `PaymentServiceGetRequest`. Values of this type
//! are always valid: the codec is the only way in from bytes, and it rejects what
//! cannot be used.

use std::fmt;

/// Upper bound on a transaction id: it goes into a URL path segment.
pub const TRANSACTION_ID_MAX_LEN: usize = 64;

/// A connector transaction id that is safe to place in a URL path segment:
/// 1 to 64 characters of `[A-Za-z0-9._-]`, and neither `.` nor `..`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionId(String);

/// Why a string is not a usable transaction id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransactionIdError {
    /// Empty string.
    #[error("connector_transaction_id is empty")]
    Empty,
    /// Longer than [`TRANSACTION_ID_MAX_LEN`] characters.
    #[error("connector_transaction_id is longer than {TRANSACTION_ID_MAX_LEN} characters")]
    TooLong,
    /// A character outside `[A-Za-z0-9._-]`.
    #[error("connector_transaction_id may only contain A-Z, a-z, 0-9, '.', '_' and '-'")]
    BadCharacter,
    /// `.` or `..`, which a URL resolver would treat as a path step.
    #[error("connector_transaction_id may not be '.' or '..'")]
    DotSegment,
}

impl TransactionId {
    /// Validates `raw` as a transaction id.
    pub fn parse(raw: &str) -> Result<Self, TransactionIdError> {
        if raw.is_empty() {
            return Err(TransactionIdError::Empty);
        }
        if raw.len() > TRANSACTION_ID_MAX_LEN {
            return Err(TransactionIdError::TooLong);
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(TransactionIdError::BadCharacter);
        }
        if raw == "." || raw == ".." {
            return Err(TransactionIdError::DotSegment);
        }
        Ok(TransactionId(raw.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// An amount in minor units of an ISO 4217 currency (UCS `Money`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    /// Amount in the currency's smallest unit (cents for EUR).
    pub minor_amount: i64,
    /// ISO 4217 alphabetic code, upper case.
    pub currency: String,
}

/// Defines a proto-style enum: symbol names as written in the UCS proto, with numbers.
macro_rules! proto_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $num:expr),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum $name {
            $(
                #[doc = concat!("`", stringify!($variant), "` (", stringify!($num), ").")]
                $variant,
            )+
        }

        impl $name {
            /// Every symbol, in declaration order (the Avro symbol order).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The proto symbol name.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant),)+ }
            }

            /// Parses a proto symbol name or its number (proto JSON accepts both).
            pub fn parse(value: &serde_json::Value) -> Option<Self> {
                match value {
                    serde_json::Value::String(s) => match s.as_str() {
                        $(stringify!($variant) => Some($name::$variant),)+
                        _ => None,
                    },
                    serde_json::Value::Number(n) => match n.as_i64()? {
                        $(x if x == $num => Some($name::$variant),)+
                        _ => None,
                    },
                    _ => None,
                }
            }

            /// Parses a proto symbol name.
            pub fn from_symbol(s: &str) -> Option<Self> {
                match s { $(stringify!($variant) => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

proto_enum!(
    /// UCS `CaptureMethod`.
    CaptureMethod {
        CAPTURE_METHOD_UNSPECIFIED = 0,
        AUTOMATIC = 1,
        MANUAL = 2,
        MANUAL_MULTIPLE = 3,
        SCHEDULED = 4,
        SEQUENTIAL_AUTOMATIC = 5,
    }
);

proto_enum!(
    /// UCS `FutureUsage`.
    FutureUsage {
        FUTURE_USAGE_UNSPECIFIED = 0,
        OFF_SESSION = 1,
        ON_SESSION = 2,
    }
);

proto_enum!(
    /// UCS `SyncRequestType`.
    SyncType {
        SYNC_REQUEST_TYPE_UNSPECIFIED = 0,
        SINGLE_PAYMENT_SYNC = 1,
        MULTIPLE_CAPTURE_SYNC = 2,
    }
);

proto_enum!(
    /// UCS `PaymentExperience`.
    PaymentExperience {
        PAYMENT_EXPERIENCE_UNSPECIFIED = 0,
        REDIRECT_TO_URL = 1,
        INVOKE_SDK_CLIENT = 2,
        DISPLAY_QR_CODE = 3,
        ONE_CLICK = 4,
        LINK_WALLET = 5,
        INVOKE_PAYMENT_APP = 6,
        DISPLAY_WAIT_SCREEN = 7,
        COLLECT_OTP = 8,
    }
);

proto_enum!(
    /// UCS `AuthenticationType`.
    AuthenticationType {
        AUTHENTICATION_TYPE_UNSPECIFIED = 0,
        THREE_DS = 1,
        NO_THREE_DS = 2,
    }
);

/// A UCS `PaymentMethodType` name (for example `GOOGLE_PAY`). The UCS enum is long
/// and grows; the domain keeps the validated name and each connector decides which
/// names it supports, and which it uses when a request names none.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PaymentMethodType(String);

impl PaymentMethodType {
    /// Accepts 1 to 64 characters of `[A-Z0-9_]`, the shape of a proto enum symbol.
    pub fn parse(raw: &str) -> Option<Self> {
        let ok = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        ok.then(|| PaymentMethodType(raw.to_owned()))
    }

    /// The symbol name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated status-check request: the UCS Get request fields plus routing
/// (connector, merchant account, request id) resolved from JSON fields or headers.
///
/// `metadata` and `connector_feature_data` are UCS `SecretString`s: they are kept so
/// that they can be echoed when configuration allows it, and are never logged.
#[derive(Clone, PartialEq)]
pub struct StatusCheckRequest {
    /// The connector's transaction id (required).
    pub connector_transaction_id: TransactionId,
    /// Connector name, for example `cm`.
    pub connector: String,
    /// Merchant account name; selects the credentials.
    pub merchant_id: String,
    /// Correlation id echoed on the event.
    pub request_id: String,
    /// Payment method, when the request names one (the connector's default otherwise).
    pub payment_method_type: Option<PaymentMethodType>,
    /// Caller's own transaction id.
    pub merchant_transaction_id: Option<String>,
    /// Opaque encoded data.
    pub encoded_data: Option<String>,
    /// Capture method, echoed.
    pub capture_method: Option<CaptureMethod>,
    /// Expected amount, checked against the connector's answer.
    pub amount: Option<Money>,
    /// Future usage intent.
    pub setup_future_usage: Option<FutureUsage>,
    /// Connector customer id from a previous flow (`state.connector_customer_id`).
    pub connector_customer_id: Option<String>,
    /// UCS `metadata` (secret).
    pub metadata: Option<String>,
    /// UCS `connector_feature_data` (secret).
    pub connector_feature_data: Option<String>,
    /// Sync type.
    pub sync_type: Option<SyncType>,
    /// Connector's order reference.
    pub connector_order_reference_id: Option<String>,
    /// Test mode flag.
    pub test_mode: Option<bool>,
    /// Payment experience.
    pub payment_experience: Option<PaymentExperience>,
    /// Per-request idempotency token.
    pub merchant_request_id: Option<String>,
    /// Keep re-checking on the connector's schedule until the status is final.
    pub follow: bool,
    /// It came from paysync's webhook intake (`x-request-source: webhook`): a
    /// webhook only names a payment, so an id the connector does not know (404)
    /// publishes nothing: a forged webhook cannot put events on the topic.
    pub from_webhook: bool,
    /// A connected account to read the payment through (Stripe Connect's
    /// `Stripe-Account`); JSON field `connected_account`.
    pub connected_account: Option<String>,
}

impl fmt::Debug for StatusCheckRequest {
    // Hand-written so that the secret fields can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusCheckRequest")
            .field("connector_transaction_id", &self.connector_transaction_id)
            .field("connector", &self.connector)
            .field("merchant_id", &self.merchant_id)
            .field("request_id", &self.request_id)
            .field("payment_method_type", &self.payment_method_type)
            .field("follow", &self.follow)
            .field("amount", &self.amount)
            .field("metadata", &self.metadata.as_ref().map(|_| "[REDACTED]"))
            .field(
                "connector_feature_data",
                &self.connector_feature_data.as_ref().map(|_| "[REDACTED]"),
            )
            .finish_non_exhaustive()
    }
}

impl StatusCheckRequest {
    /// A request with only the required field set and the given routing; the
    /// optional Get fields are empty.
    pub fn new(id: TransactionId, connector: &str, merchant_id: &str, request_id: &str) -> Self {
        StatusCheckRequest {
            connector_transaction_id: id,
            connector: connector.to_owned(),
            merchant_id: merchant_id.to_owned(),
            request_id: request_id.to_owned(),
            payment_method_type: None,
            merchant_transaction_id: None,
            encoded_data: None,
            capture_method: None,
            amount: None,
            setup_future_usage: None,
            connector_customer_id: None,
            metadata: None,
            connector_feature_data: None,
            sync_type: None,
            connector_order_reference_id: None,
            test_mode: None,
            payment_experience: None,
            merchant_request_id: None,
            follow: false,
            from_webhook: false,
            connected_account: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_id_rules() {
        for ok in [
            "a",
            "8db1e7fa-ba8a-4189-92fd-67a20217443d",
            "A.b_c-9",
            "...",
            &"x".repeat(64),
        ] {
            assert!(TransactionId::parse(ok).is_ok(), "{ok} should be accepted");
        }
        let cases: &[(&str, TransactionIdError)] = &[
            ("", TransactionIdError::Empty),
            (&"x".repeat(65), TransactionIdError::TooLong),
            ("../x", TransactionIdError::BadCharacter),
            ("a/b", TransactionIdError::BadCharacter),
            ("a b", TransactionIdError::BadCharacter),
            ("a%2Fb", TransactionIdError::BadCharacter),
            ("é", TransactionIdError::BadCharacter),
            ("a?b", TransactionIdError::BadCharacter),
            (".", TransactionIdError::DotSegment),
            ("..", TransactionIdError::DotSegment),
        ];
        for (raw, want) in cases {
            assert_eq!(TransactionId::parse(raw).unwrap_err(), *want, "{raw:?}");
        }
    }

    #[test]
    fn proto_enums_parse_names_and_numbers() {
        use serde_json::json;
        assert_eq!(
            CaptureMethod::parse(&json!("MANUAL")),
            Some(CaptureMethod::MANUAL)
        );
        assert_eq!(
            CaptureMethod::parse(&json!(1)),
            Some(CaptureMethod::AUTOMATIC)
        );
        assert_eq!(CaptureMethod::parse(&json!("manual")), None);
        assert_eq!(CaptureMethod::parse(&json!(99)), None);
        assert_eq!(CaptureMethod::parse(&json!(true)), None);
        assert_eq!(
            PaymentExperience::parse(&json!(8)),
            Some(PaymentExperience::COLLECT_OTP)
        );
    }

    #[test]
    fn debug_never_shows_secret_fields() {
        let mut r =
            StatusCheckRequest::new(TransactionId::parse("t1").unwrap(), "cm", "default", "r1");
        r.metadata = Some("very-secret-metadata".into());
        r.connector_feature_data = Some("feature-secret".into());
        let shown = format!("{r:?}");
        assert!(!shown.contains("very-secret-metadata"));
        assert!(!shown.contains("feature-secret"));
        assert!(shown.contains("t1"));
    }
}
