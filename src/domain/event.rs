//! `PaymentStatusEvent`: what paysync publishes for every usable request, and the
//! pieces it is built from: a connector's normalized answer ([`StatusReport`]) or a
//! failed check ([`CheckFailure`]). Building an event is a pure function.

use std::collections::BTreeMap;

use super::request::{AuthenticationType, CaptureMethod, Money, StatusCheckRequest};
use super::status::PaymentStatus;

/// UCS `ErrorInfo.unified_details`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnifiedErrorDetails {
    /// Stable code, for example `CONNECTOR_TIMEOUT`.
    pub code: Option<String>,
    /// Human-readable message.
    pub message: Option<String>,
    /// Longer description.
    pub description: Option<String>,
    /// Text that may be shown to a customer.
    pub user_guidance_message: Option<String>,
}

/// UCS `ErrorInfo.issuer_details.network_details`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkErrorDetails {
    /// Card network advice code.
    pub advice_code: Option<String>,
    /// Card network decline code.
    pub decline_code: Option<String>,
    /// Card network message.
    pub error_message: Option<String>,
}

/// UCS `ErrorInfo.issuer_details`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IssuerErrorDetails {
    /// Issuer code.
    pub code: Option<String>,
    /// Issuer message.
    pub message: Option<String>,
    /// Card network details.
    pub network_details: Option<NetworkErrorDetails>,
}

/// UCS `ErrorInfo.connector_details`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectorErrorDetails {
    /// The connector's own code (for CM.com: the status, or the HTTP status of an error).
    pub code: Option<String>,
    /// The connector's message, sanitized and bounded.
    pub message: Option<String>,
    /// The connector's reason.
    pub reason: Option<String>,
    /// The transaction id the error is about.
    pub connector_transaction_id: Option<String>,
}

/// UCS `ErrorInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorInfo {
    /// Connector-independent details.
    pub unified_details: Option<UnifiedErrorDetails>,
    /// Issuer details.
    pub issuer_details: Option<IssuerErrorDetails>,
    /// Connector details.
    pub connector_details: Option<ConnectorErrorDetails>,
}

/// UCS `RedirectForm`: the next customer step (a oneof in the proto).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedirectForm {
    /// An HTML form to post.
    Form {
        /// Target URL.
        endpoint: String,
        /// HTTP method.
        method: String,
        /// Form fields.
        form_fields: BTreeMap<String, String>,
    },
    /// A raw HTML page.
    Html {
        /// The HTML.
        html_data: String,
    },
    /// A URL to send the customer to.
    Uri {
        /// The URL.
        uri: String,
    },
}

/// UCS `MandateReference`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MandateReference {
    /// Connector mandate id.
    pub mandate_id: Option<String>,
    /// Payment method id.
    pub payment_method_id: Option<String>,
}

/// A connector's answer to a successful status check, normalized to UCS names.
/// Connectors fill what they know; everything else stays `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// The normalized status.
    pub status: PaymentStatus,
    /// The connector's own status string, as received (extension field).
    pub connector_status: Option<String>,
    /// The connector's HTTP status.
    pub status_code: u16,
    /// A payment-level error the connector reported (for example a FAILURE).
    pub error: Option<ErrorInfo>,
    /// Selected, non-sensitive response headers.
    pub response_headers: BTreeMap<String, String>,
    /// Mandate, if any.
    pub mandate_reference: Option<MandateReference>,
    /// Network transaction id.
    pub network_transaction_id: Option<String>,
    /// Amount authorized or requested.
    pub amount: Option<Money>,
    /// Amount captured, minor units.
    pub captured_amount: Option<i64>,
    /// Authentication type.
    pub auth_type: Option<AuthenticationType>,
    /// Unix seconds.
    pub created_at: Option<i64>,
    /// Unix seconds.
    pub updated_at: Option<i64>,
    /// Unix seconds.
    pub authorized_at: Option<i64>,
    /// Unix seconds.
    pub captured_at: Option<i64>,
    /// Customer name.
    pub customer_name: Option<String>,
    /// Customer e-mail.
    pub email: Option<String>,
    /// Connector customer id.
    pub connector_customer_id: Option<String>,
    /// The merchant's order id / reference.
    pub merchant_order_id: Option<String>,
    /// Next customer step.
    pub redirection_data: Option<RedirectForm>,
    /// Incremental authorization support.
    pub incremental_authorization_allowed: Option<bool>,
    /// Refunded so far, minor units (extension).
    pub refunded_amount: Option<i64>,
    /// Refunds pending, minor units (extension).
    pub refund_pending_amount: Option<i64>,
    /// The UCS payment method the connector reports or used.
    pub payment_method_type: Option<String>,
    /// The raw response body (only published when configured).
    pub raw_response: Option<String>,
}

impl StatusReport {
    /// A report with only a status and HTTP code.
    pub fn new(status: PaymentStatus, status_code: u16) -> Self {
        StatusReport {
            status,
            connector_status: None,
            status_code,
            error: None,
            response_headers: BTreeMap::new(),
            mandate_reference: None,
            network_transaction_id: None,
            amount: None,
            captured_amount: None,
            auth_type: None,
            created_at: None,
            updated_at: None,
            authorized_at: None,
            captured_at: None,
            customer_name: None,
            email: None,
            connector_customer_id: None,
            merchant_order_id: None,
            redirection_data: None,
            incremental_authorization_allowed: None,
            refunded_amount: None,
            refund_pending_amount: None,
            payment_method_type: None,
            raw_response: None,
        }
    }
}

/// Why a status check failed. These are technical failures, never payment
/// outcomes: the event carries `PAYMENT_STATUS_UNSPECIFIED` and this code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureCode {
    /// The connector did not answer in time (after retries).
    ConnectorTimeout,
    /// The connector could not be reached (after retries).
    ConnectorUnreachable,
    /// The connector answered with an error status.
    ConnectorErrorResponse,
    /// The connector does not know the transaction (404).
    TransactionNotFound,
    /// The credentials were refused (401 after one refresh, or 403).
    AuthenticationFailed,
    /// A 2xx body that could not be understood.
    ResponseDeserializationFailed,
    /// The connector's amount or currency differs from the request's.
    IntegrityCheckFailed,
}

impl FailureCode {
    /// The `unified_details.code` value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::ConnectorTimeout => "CONNECTOR_TIMEOUT",
            FailureCode::ConnectorUnreachable => "CONNECTOR_UNREACHABLE",
            FailureCode::ConnectorErrorResponse => "CONNECTOR_ERROR_RESPONSE",
            FailureCode::TransactionNotFound => "TRANSACTION_NOT_FOUND",
            FailureCode::AuthenticationFailed => "AUTHENTICATION_FAILED",
            FailureCode::ResponseDeserializationFailed => "RESPONSE_DESERIALIZATION_FAILED",
            FailureCode::IntegrityCheckFailed => "INTEGRITY_CHECK_FAILED",
        }
    }
}

/// A status check that did not produce a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure {
    /// What went wrong.
    pub code: FailureCode,
    /// A human-readable explanation without secrets or response bodies.
    pub message: String,
    /// The connector's HTTP status, when it answered.
    pub status_code: Option<u16>,
    /// The connector's own error code or text, sanitized and bounded.
    pub connector_code: Option<String>,
    /// The connector's own error message, sanitized and bounded.
    pub connector_message: Option<String>,
    /// The connector's reason (for example the field it objects to), sanitized and bounded.
    pub connector_reason: Option<String>,
}

impl CheckFailure {
    /// A failure with a code and message only.
    pub fn new(code: FailureCode, message: impl Into<String>) -> Self {
        CheckFailure {
            code,
            message: message.into(),
            status_code: None,
            connector_code: None,
            connector_message: None,
            connector_reason: None,
        }
    }

    /// The same failure with the connector's HTTP status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status_code = Some(status);
        self
    }
}

/// The integrity check of the UCS `Get` request, the same for every connector: when
/// the request carries an `amount`, the connector's amount and currency must be
/// exactly that. A mismatch is a failed check (`INTEGRITY_CHECK_FAILED`), never a
/// payment status.
pub fn check_integrity(
    request: &StatusCheckRequest,
    report: &StatusReport,
) -> Result<(), CheckFailure> {
    let Some(expected) = &request.amount else {
        return Ok(());
    };
    if report.amount.as_ref() == Some(expected) {
        return Ok(());
    }
    let got = report.amount.as_ref().map_or_else(
        || "no amount".to_owned(),
        |m| format!("{} {}", m.minor_amount, m.currency),
    );
    Err(CheckFailure::new(
        FailureCode::IntegrityCheckFailed,
        format!(
            "connector reports {got}, request expected {} {}",
            expected.minor_amount, expected.currency
        ),
    )
    .with_status(report.status_code))
}

/// Which secret-bearing fields an event may carry (all off by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SecretFields {
    /// Echo the request's `metadata`.
    pub metadata: bool,
    /// Publish `raw_connector_request` and `raw_connector_response`.
    pub raw_connector: bool,
}

/// Where a request came from and how the check went; the envelope of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Deterministic id, see [`event_id`].
    pub event_id: String,
    /// Which check of a follow chain this is (1 for the first and for requests
    /// that do not follow).
    pub check_number: u32,
    /// The status is final for the connector.
    pub is_final: bool,
    /// When the chain's next check is due (ms since the epoch); `None` when the
    /// chain ended or was never followed.
    pub next_check_at_ms: Option<i64>,
    /// Milliseconds since the epoch when the answer was observed.
    pub observed_at_ms: i64,
    /// Connector calls made (including retries and the call after a token refresh).
    pub attempts: u32,
    /// Method and URL of the status call, without credentials (for `raw_connector_request`).
    pub raw_request: Option<String>,
}

/// The namespace for event ids (a fixed, random UUID: ids are UUIDv5 of the source position).
const EVENT_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6b1f_4a0e_93d2_4c6f_8e71_2f0c_a5d3_9b14);

/// The event id for the request at `topic`/`partition`/`offset`: a UUIDv5 of
/// `"<topic>:<partition>:<offset>"`, so a re-delivered request yields the same id.
pub fn event_id(topic: &str, partition: i32, offset: i64) -> String {
    check_event_id(topic, partition, offset, 1)
}

/// The event id of check `check` of the follow chain that began with the request
/// at `topic`/`partition`/`offset`: the plain [`event_id`] for the first check,
/// the UUIDv5 of `"<topic>:<partition>:<offset>:<check>"` after that, so a
/// duplicated re-check record yields the same id.
pub fn check_event_id(topic: &str, partition: i32, offset: i64, check: u32) -> String {
    let name = if check <= 1 {
        format!("{topic}:{partition}:{offset}")
    } else {
        format!("{topic}:{partition}:{offset}:{check}")
    };
    uuid::Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes()).to_string()
}

/// UCS `ConnectorState` as published: only the customer id. Access tokens are
/// credentials and are never published.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectorState {
    /// Connector customer id.
    pub connector_customer_id: Option<String>,
}

/// The published event: an envelope plus the UCS Get response fields (same names)
/// plus the extensions `refunded_amount`, `refund_pending_amount` and
/// `connector_status`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct PaymentStatusEvent {
    pub event_id: String,
    pub request_id: String,
    pub connector: String,
    pub merchant_id: String,
    pub observed_at_ms: i64,
    pub attempts: u32,
    pub connector_transaction_id: String,
    pub merchant_transaction_id: Option<String>,
    pub status: PaymentStatus,
    pub error: Option<ErrorInfo>,
    pub status_code: u32,
    pub response_headers: BTreeMap<String, String>,
    pub mandate_reference: Option<MandateReference>,
    pub network_transaction_id: Option<String>,
    pub amount: Option<Money>,
    pub captured_amount: Option<i64>,
    pub payment_method_type: Option<String>,
    pub capture_method: Option<CaptureMethod>,
    pub auth_type: Option<AuthenticationType>,
    pub created_at: Option<i64>,
    pub updated_at: Option<i64>,
    pub authorized_at: Option<i64>,
    pub captured_at: Option<i64>,
    pub customer_name: Option<String>,
    pub email: Option<String>,
    pub connector_customer_id: Option<String>,
    pub merchant_order_id: Option<String>,
    pub metadata: Option<String>,
    pub connector_response: Option<String>,
    pub state: Option<ConnectorState>,
    pub raw_connector_response: Option<String>,
    pub raw_connector_request: Option<String>,
    pub redirection_data: Option<RedirectForm>,
    pub incremental_authorization_allowed: Option<bool>,
    pub refunded_amount: Option<i64>,
    pub refund_pending_amount: Option<i64>,
    pub connector_status: Option<String>,
    pub check_number: i32,
    pub is_final: bool,
    pub next_check_at_ms: Option<i64>,
}

impl PaymentStatusEvent {
    /// The event for `request`, given how its check went.
    pub fn build(
        request: &StatusCheckRequest,
        envelope: Envelope,
        outcome: Result<StatusReport, CheckFailure>,
        secrets: SecretFields,
    ) -> Self {
        let mut event = PaymentStatusEvent {
            event_id: envelope.event_id,
            request_id: request.request_id.clone(),
            connector: request.connector.clone(),
            merchant_id: request.merchant_id.clone(),
            observed_at_ms: envelope.observed_at_ms,
            attempts: envelope.attempts,
            connector_transaction_id: request.connector_transaction_id.as_str().to_owned(),
            merchant_transaction_id: request.merchant_transaction_id.clone(),
            status: PaymentStatus::PAYMENT_STATUS_UNSPECIFIED,
            error: None,
            status_code: 0,
            response_headers: BTreeMap::new(),
            mandate_reference: None,
            network_transaction_id: None,
            amount: request.amount.clone(),
            captured_amount: None,
            payment_method_type: request
                .payment_method_type
                .as_ref()
                .map(|m| m.as_str().to_owned()),
            capture_method: request.capture_method,
            auth_type: None,
            created_at: None,
            updated_at: None,
            authorized_at: None,
            captured_at: None,
            customer_name: None,
            email: None,
            connector_customer_id: request.connector_customer_id.clone(),
            merchant_order_id: None,
            metadata: request.metadata.clone().filter(|_| secrets.metadata),
            connector_response: None,
            state: None,
            raw_connector_response: None,
            raw_connector_request: envelope.raw_request.filter(|_| secrets.raw_connector),
            redirection_data: None,
            incremental_authorization_allowed: None,
            refunded_amount: None,
            refund_pending_amount: None,
            connector_status: None,
            check_number: i32::try_from(envelope.check_number).unwrap_or(i32::MAX),
            is_final: envelope.is_final,
            next_check_at_ms: envelope.next_check_at_ms,
        };
        match outcome {
            Ok(report) => {
                event.status = report.status;
                event.error = report.error;
                event.status_code = u32::from(report.status_code);
                event.response_headers = report.response_headers;
                event.mandate_reference = report.mandate_reference;
                event.network_transaction_id = report.network_transaction_id;
                event.amount = report.amount.or(event.amount);
                event.captured_amount = report.captured_amount;
                event.payment_method_type =
                    report.payment_method_type.or(event.payment_method_type);
                event.auth_type = report.auth_type;
                event.created_at = report.created_at;
                event.updated_at = report.updated_at;
                event.authorized_at = report.authorized_at;
                event.captured_at = report.captured_at;
                event.customer_name = report.customer_name;
                event.email = report.email;
                event.connector_customer_id =
                    report.connector_customer_id.or(event.connector_customer_id);
                event.merchant_order_id = report.merchant_order_id;
                event.redirection_data = report.redirection_data;
                event.incremental_authorization_allowed = report.incremental_authorization_allowed;
                event.refunded_amount = report.refunded_amount;
                event.refund_pending_amount = report.refund_pending_amount;
                event.connector_status = report.connector_status;
                event.raw_connector_response =
                    report.raw_response.filter(|_| secrets.raw_connector);
            }
            Err(failure) => {
                event.status_code = failure.status_code.map(u32::from).unwrap_or(0);
                event.error = Some(ErrorInfo {
                    unified_details: Some(UnifiedErrorDetails {
                        code: Some(failure.code.as_str().to_owned()),
                        message: Some(failure.message),
                        ..Default::default()
                    }),
                    issuer_details: None,
                    connector_details: (failure.connector_code.is_some()
                        || failure.connector_message.is_some()
                        || failure.connector_reason.is_some())
                    .then(|| ConnectorErrorDetails {
                        code: failure.connector_code,
                        message: failure.connector_message,
                        reason: failure.connector_reason,
                        connector_transaction_id: Some(
                            request.connector_transaction_id.as_str().to_owned(),
                        ),
                    }),
                });
            }
        }
        if event.connector_customer_id.is_some() {
            event.state = Some(ConnectorState {
                connector_customer_id: event.connector_customer_id.clone(),
            });
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TransactionId;

    fn request() -> StatusCheckRequest {
        let mut r = StatusCheckRequest::new(
            TransactionId::parse("tx-1").unwrap(),
            "cm",
            "default",
            "req-1",
        );
        r.metadata = Some("secret-meta".into());
        r
    }

    fn envelope() -> Envelope {
        Envelope {
            event_id: event_id("in", 0, 7),
            check_number: 1,
            is_final: false,
            next_check_at_ms: None,
            observed_at_ms: 1_700_000_000_000,
            attempts: 2,
            raw_request: Some("GET https://api/x".into()),
        }
    }

    #[test]
    fn check_event_ids_extend_the_first_checks() {
        assert_eq!(check_event_id("in", 0, 7, 1), event_id("in", 0, 7));
        assert_ne!(check_event_id("in", 0, 7, 2), event_id("in", 0, 7));
        assert_eq!(check_event_id("in", 0, 7, 2), check_event_id("in", 0, 7, 2));
        assert_ne!(check_event_id("in", 0, 7, 2), check_event_id("in", 0, 7, 3));
        // UUIDv5 in paysync's namespace of "<topic>:<partition>:<offset>:<check>",
        // as an independent consumer computes it (Python: uuid.uuid5).
        assert_eq!(
            check_event_id("in", 0, 7, 2),
            uuid::Uuid::new_v5(&EVENT_ID_NAMESPACE, b"in:0:7:2").to_string()
        );
    }

    #[test]
    fn event_id_is_deterministic_and_position_specific() {
        assert_eq!(event_id("in", 0, 7), event_id("in", 0, 7));
        assert_ne!(event_id("in", 0, 7), event_id("in", 0, 8));
        assert_ne!(event_id("in", 0, 7), event_id("in", 1, 7));
        assert_ne!(event_id("in", 0, 7), event_id("other", 0, 7));
        assert_eq!(event_id("in", 0, 7).len(), 36);
    }

    #[test]
    fn failed_check_is_unspecified_with_reason_never_failure() {
        let mut failure =
            CheckFailure::new(FailureCode::ConnectorTimeout, "timed out after 3 attempts");
        failure.status_code = None;
        let e = PaymentStatusEvent::build(
            &request(),
            envelope(),
            Err(failure),
            SecretFields::default(),
        );
        assert_eq!(e.status, PaymentStatus::PAYMENT_STATUS_UNSPECIFIED);
        let unified = e.error.unwrap().unified_details.unwrap();
        assert_eq!(unified.code.as_deref(), Some("CONNECTOR_TIMEOUT"));
        assert_eq!(e.status_code, 0);
        assert_eq!(e.attempts, 2);
    }

    #[test]
    fn secrets_are_published_only_when_enabled() {
        let mut report = StatusReport::new(PaymentStatus::CHARGED, 200);
        report.raw_response = Some("{\"status\":\"SUCCESS\"}".into());
        let off = PaymentStatusEvent::build(
            &request(),
            envelope(),
            Ok(report.clone()),
            SecretFields::default(),
        );
        assert_eq!(off.metadata, None);
        assert_eq!(off.raw_connector_request, None);
        assert_eq!(off.raw_connector_response, None);
        let on = PaymentStatusEvent::build(
            &request(),
            envelope(),
            Ok(report),
            SecretFields {
                metadata: true,
                raw_connector: true,
            },
        );
        assert_eq!(on.metadata.as_deref(), Some("secret-meta"));
        assert_eq!(
            on.raw_connector_request.as_deref(),
            Some("GET https://api/x")
        );
        assert!(on.raw_connector_response.is_some());
    }
}
