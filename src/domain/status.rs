//! `PaymentStatus`: the full enum of the Unified Connector Service, symbol names and
//! numbers unchanged, and which of its values are final.

use std::fmt;

macro_rules! payment_status {
    ($($variant:ident = $num:expr),+ $(,)?) => {
        /// A payment's status, exactly the UCS `PaymentStatus` enum (same symbols, same numbers).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum PaymentStatus {
            $(
                #[doc = concat!("UCS `", stringify!($variant), "` (", stringify!($num), ").")]
                $variant,
            )+
        }

        impl PaymentStatus {
            /// Every status, in the order of the Avro enum symbols.
            pub const ALL: &'static [PaymentStatus] = &[$(PaymentStatus::$variant),+];

            /// The UCS symbol name, which is also the Avro enum symbol.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(PaymentStatus::$variant => stringify!($variant),)+
                }
            }

            /// The UCS proto number.
            pub fn number(self) -> i32 {
                match self {
                    $(PaymentStatus::$variant => $num,)+
                }
            }

            /// Parses a UCS symbol name; `None` for anything else.
            pub fn from_symbol(symbol: &str) -> Option<Self> {
                match symbol {
                    $(stringify!($variant) => Some(PaymentStatus::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

payment_status! {
    PAYMENT_STATUS_UNSPECIFIED = 0,
    STARTED = 1,
    AUTHENTICATION_FAILED = 2,
    ROUTER_DECLINED = 3,
    AUTHENTICATION_PENDING = 4,
    AUTHENTICATION_SUCCESSFUL = 5,
    AUTHORIZED = 6,
    AUTHORIZATION_FAILED = 7,
    CHARGED = 8,
    AUTHORIZING = 9,
    COD_INITIATED = 10,
    VOIDED = 11,
    VOID_INITIATED = 12,
    CAPTURE_INITIATED = 13,
    CAPTURE_FAILED = 14,
    VOID_FAILED = 15,
    AUTO_REFUNDED = 16,
    PARTIAL_CHARGED = 17,
    PARTIAL_CHARGED_AND_CHARGEABLE = 18,
    UNRESOLVED = 19,
    PENDING = 20,
    FAILURE = 21,
    PAYMENT_METHOD_AWAITED = 22,
    CONFIRMATION_AWAITED = 23,
    DEVICE_DATA_COLLECTION_PENDING = 24,
    PARTIALLY_AUTHORIZED = 25,
    EXPIRED = 26,
    VOIDED_POST_CAPTURE = 57,
}

impl PaymentStatus {
    /// True when the payment will not change any more: the UCS terminal set plus
    /// `EXPIRED`, which is final for CM.com. Subscribers use it to stop polling.
    pub fn is_terminal(self) -> bool {
        use PaymentStatus::*;
        matches!(
            self,
            CHARGED
                | AUTO_REFUNDED
                | VOIDED
                | VOIDED_POST_CAPTURE
                | PARTIAL_CHARGED
                | AUTHENTICATION_FAILED
                | AUTHORIZATION_FAILED
                | VOID_FAILED
                | CAPTURE_FAILED
                | FAILURE
                | EXPIRED
        )
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_round_trip_and_numbers_are_unique() {
        let mut numbers = std::collections::HashSet::new();
        for s in PaymentStatus::ALL {
            assert_eq!(PaymentStatus::from_symbol(s.as_str()), Some(*s));
            assert!(
                numbers.insert(s.number()),
                "duplicate number {}",
                s.number()
            );
        }
        assert_eq!(PaymentStatus::ALL.len(), 28);
        assert_eq!(PaymentStatus::VOIDED_POST_CAPTURE.number(), 57);
        assert_eq!(PaymentStatus::from_symbol("CAPTURED"), None);
    }

    #[test]
    fn terminal_set_matches_ucs_plus_expired() {
        use PaymentStatus::*;
        let terminal: Vec<_> = PaymentStatus::ALL
            .iter()
            .copied()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            vec![
                AUTHENTICATION_FAILED,
                AUTHORIZATION_FAILED,
                CHARGED,
                VOIDED,
                CAPTURE_FAILED,
                VOID_FAILED,
                AUTO_REFUNDED,
                PARTIAL_CHARGED,
                FAILURE,
                EXPIRED,
                VOIDED_POST_CAPTURE
            ]
        );
        for open in [
            STARTED,
            AUTHENTICATION_PENDING,
            AUTHORIZED,
            UNRESOLVED,
            PAYMENT_STATUS_UNSPECIFIED,
        ] {
            assert!(!open.is_terminal(), "{open} must not be terminal");
        }
    }
}
