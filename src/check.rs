//! `paysync check`: one-off status checks through the same connector path as
//! `run` (token, retries, circuit breaker, mapping, and the integrity check when
//! an amount is given), with no Kafka. Each result is the event `run` would
//! publish, printed as one JSON line with the Avro event's field names (it is
//! encoded and decoded through the event schema, so the shape cannot drift).
//! Support tickets and credential rotations are its users.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::app::{gateways, StartupError};
use crate::codec::avro::{decode_event_json, EventEncoder, WireFormat};
use crate::config::Settings;
use crate::domain::event::Envelope;
use crate::domain::money::AmountError;
use crate::domain::request::Money;
use crate::domain::{PaymentMethodType, PaymentStatusEvent, StatusCheckRequest, TransactionId};
use crate::pipeline::process::check;
use crate::telemetry::Metrics;

/// What to check (the command line).
#[derive(Debug, Clone)]
pub struct CheckArgs {
    /// Connector; default `processing.default_connector`.
    pub connector: Option<String>,
    /// Merchant account; default `processing.default_merchant`.
    pub merchant: Option<String>,
    /// UCS payment method symbol (`IDEAL`, …); default the connector's.
    pub method: Option<String>,
    /// Expected amount in minor units, with `currency`.
    pub amount: Option<i64>,
    /// ISO 4217 code of `amount`.
    pub currency: Option<String>,
    /// Overall deadline of each id's check (retries and waiting on an open
    /// circuit included).
    pub timeout: Duration,
    /// Transaction ids.
    pub ids: Vec<String>,
}

/// The default of `--timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for CheckArgs {
    fn default() -> Self {
        CheckArgs {
            connector: None,
            merchant: None,
            method: None,
            amount: None,
            currency: None,
            timeout: DEFAULT_TIMEOUT,
            ids: Vec::new(),
        }
    }
}

/// Why the checks could not be made at all (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The configuration cannot work.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// An argument is invalid.
    #[error("{0}")]
    Usage(String),
}

/// What one id came to, in argument order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// The event `run` would publish, as one JSON line; `answered` when the
    /// connector gave a status (FAILURE included: that is the payment's status).
    Checked {
        /// The JSON line.
        json: String,
        /// The connector answered with a status.
        answered: bool,
    },
    /// The id is not a valid transaction id, or the connector cannot serve it: not
    /// checked (the command exits 2 once the other ids are done).
    Invalid(String),
}

/// Checks every id in order, handing each result to `emit` as soon as it is
/// known (so ids already checked are printed even when a later one is invalid).
/// Each id ends within `args.timeout`. Errors are about the whole command (the
/// configuration, the connector, `--amount`): nothing was checked.
pub async fn run(
    settings: &Settings,
    args: &CheckArgs,
    emit: &mut dyn FnMut(Line),
) -> Result<(), CheckError> {
    let connector = args
        .connector
        .clone()
        .unwrap_or_else(|| settings.processing.default_connector.clone());
    let merchant = args
        .merchant
        .clone()
        .unwrap_or_else(|| settings.processing.default_merchant.clone());
    let metrics = Arc::new(Metrics::new());
    let gateways = gateways(settings, &metrics)?;
    let gateway = gateways
        .get(&connector)
        .ok_or_else(|| CheckError::Usage(format!("connector `{connector}` is not configured")))?;
    let method =
        match &args.method {
            None => None,
            Some(m) => Some(PaymentMethodType::parse(m).ok_or_else(|| {
                CheckError::Usage(format!("`{m}` is not a UCS payment method type"))
            })?),
        };
    let amount = match (args.amount, &args.currency) {
        (None, None) => None,
        (Some(minor), _) if minor < 0 => {
            return Err(CheckError::Usage(format!(
                "--amount {minor}: an amount is a non-negative number of minor units"
            )))
        }
        (Some(minor), Some(currency)) => {
            // The same validation as a request's amount: a known currency.
            Money::from_decimal("0", currency)
                .map_err(|e: AmountError| CheckError::Usage(e.to_string()))?;
            Some(Money {
                minor_amount: minor,
                currency: currency.to_ascii_uppercase(),
            })
        }
        _ => {
            return Err(CheckError::Usage(
                "--amount and --currency go together".into(),
            ))
        }
    };
    if args.timeout.is_zero() {
        return Err(CheckError::Usage(
            "--timeout must be greater than zero".into(),
        ));
    }
    let encoder = EventEncoder::new(WireFormat::SingleObject);
    for raw in &args.ids {
        let id = match TransactionId::parse(raw) {
            Ok(id) => id,
            Err(e) => {
                emit(Line::Invalid(format!("`{raw}`: {e}")));
                continue;
            }
        };
        let mut request =
            StatusCheckRequest::new(id, &connector, &merchant, &format!("check:{raw}"));
        request.payment_method_type = method.clone();
        request.amount = amount.clone();
        let http = match gateway.prepare(&request) {
            Ok(http) => http,
            Err(r) => {
                emit(Line::Invalid(format!("`{raw}`: {}", r.message)));
                continue;
            }
        };
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(args.timeout).unwrap_or(now);
        let result = check(gateway, &request, &http, Some(deadline)).await;
        let answered = result.outcome.is_ok();
        let observed_at_ms = now_ms();
        let is_final = result
            .outcome
            .as_ref()
            .is_ok_and(|r| gateway.connector().is_final(r.status));
        let envelope = Envelope {
            event_id: uuid::Uuid::new_v5(
                &CHECK_NAMESPACE,
                format!("{connector}/{raw}/{observed_at_ms}").as_bytes(),
            )
            .to_string(),
            check_number: 1,
            is_final,
            next_check_at_ms: None,
            observed_at_ms,
            attempts: result.attempts,
            raw_request: Some(http.describe()),
        };
        let event =
            PaymentStatusEvent::build(&request, envelope, result.outcome, settings.secret_fields());
        let line = encoder
            .encode(&event)
            .map_err(|e| format!("the event cannot be encoded: {e}"))
            .and_then(|bytes| decode_event_json(&bytes).map_err(|e| e.to_string()));
        match line {
            Ok(json) => emit(Line::Checked {
                json: json.to_string(),
                answered,
            }),
            // A bug (the event does not fit its own schema); say so for this id.
            Err(e) => emit(Line::Invalid(format!("`{raw}`: {e}"))),
        }
    }
    Ok(())
}

/// Event ids of one-off checks: UUIDv5 of `<connector>/<id>/<observed_at>` in a
/// namespace of their own (they have no Kafka position).
const CHECK_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x0c8e_4a51_7d2f_4b6e_9a13_5f2d_c0b7_e841);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
