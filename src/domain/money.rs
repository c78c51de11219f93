//! Amounts: ISO 4217 minor-unit exponents and exact conversion of decimal strings
//! (`"10.00" EUR`) to minor units (`1000`). No floating point anywhere: an amount
//! with more decimals than its currency has is an error, never rounded.

use super::Money;

/// Currencies whose minor unit is not hundredths (ISO 4217 "minor unit" column).
const EXPONENTS: &[(&str, u32)] = &[
    ("BHD", 3),
    ("BIF", 0),
    ("CLF", 4),
    ("CLP", 0),
    ("DJF", 0),
    ("GNF", 0),
    ("IQD", 3),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KMF", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("LYD", 3),
    ("OMR", 3),
    ("PYG", 0),
    ("RWF", 0),
    ("TND", 3),
    ("UGX", 0),
    ("UYI", 0),
    ("UYW", 4),
    ("VND", 0),
    ("VUV", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("XPF", 0),
];

/// Every other active ISO 4217 currency: two decimals. HRK (the Croatian kuna,
/// replaced by the euro in 2023) stays: Mollie still lists it, and old payments
/// are answered in it.
const TWO_DECIMALS: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
    "CHE", "CHF", "CHW", "CNY", "COP", "COU", "CRC", "CUP", "CVE", "CZK", "DKK", "DOP", "DZD",
    "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GTQ", "GYD",
    "HKD", "HNL", "HRK", "HTG", "HUF", "IDR", "ILS", "INR", "IRR", "JMD", "KES", "KGS", "KHR",
    "KPW", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "MAD", "MDL", "MGA", "MKD", "MMK",
    "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO",
    "NOK", "NPR", "NZD", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "QAR", "RON", "RSD", "RUB",
    "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC",
    "SYP", "SZL", "THB", "TJS", "TMT", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "USD", "USN",
    "UYU", "UZS", "VED", "VES", "WST", "XCD", "XCG", "YER", "ZAR", "ZMW", "ZWG",
];

/// The number of decimals of an ISO 4217 currency; `None` for a code that is not one.
pub fn currency_exponent(code: &str) -> Option<u32> {
    if let Some((_, e)) = EXPONENTS.iter().find(|(c, _)| *c == code) {
        return Some(*e);
    }
    TWO_DECIMALS.contains(&code).then_some(2)
}

/// Why a decimal amount cannot be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Not an ISO 4217 currency code.
    #[error("`{0}` is not an ISO 4217 currency")]
    UnknownCurrency(String),
    /// Not a plain decimal number (`123`, `123.4`, `-1.05`).
    #[error("amount is not a decimal number")]
    NotDecimal,
    /// More decimals than the currency has.
    #[error("amount has {got} decimals, {currency} has {allowed}")]
    TooPrecise {
        /// The currency.
        currency: String,
        /// Decimals given.
        got: usize,
        /// Decimals the currency has.
        allowed: u32,
    },
    /// Larger than an `int64` of minor units.
    #[error("amount is out of range")]
    OutOfRange,
}

impl Money {
    /// Converts `"10.00"` in `currency` to minor units, exactly: `"10.5"` EUR is 1050,
    /// `"5"` JPY is 5, `"1.2345"` EUR is an error.
    pub fn from_decimal(value: &str, currency: &str) -> Result<Money, AmountError> {
        let exponent = currency_exponent(currency)
            .ok_or_else(|| AmountError::UnknownCurrency(currency.to_owned()))?;
        let (negative, digits) = match value.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        let is_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !is_digits(whole) || !is_digits(fraction) || digits.ends_with('.') {
            return Err(AmountError::NotDecimal);
        }
        if fraction.len() > exponent as usize {
            return Err(AmountError::TooPrecise {
                currency: currency.to_owned(),
                got: fraction.len(),
                allowed: exponent,
            });
        }
        let mut minor: i64 = 0;
        let padded = fraction
            .bytes()
            .chain(std::iter::repeat(b'0'))
            .take(exponent as usize);
        for b in whole.bytes().chain(padded) {
            minor = minor
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(b - b'0')))
                .ok_or(AmountError::OutOfRange)?;
        }
        Ok(Money {
            minor_amount: if negative { -minor } else { minor },
            currency: currency.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_convert_exactly_by_exponent() {
        let cases: &[(&str, &str, i64)] = &[
            ("10.00", "EUR", 1000),
            ("10.5", "EUR", 1050),
            ("10", "EUR", 1000),
            ("0.01", "EUR", 1),
            ("1234", "JPY", 1234),
            ("1.234", "KWD", 1234),
            ("1.2", "KWD", 1200),
            ("1.2345", "CLF", 12345),
            ("-5.00", "USD", -500),
            ("92233720368547758.07", "EUR", i64::MAX),
        ];
        for (value, currency, want) in cases {
            assert_eq!(
                Money::from_decimal(value, currency).unwrap().minor_amount,
                *want,
                "{value} {currency}"
            );
        }
    }

    #[test]
    fn anything_inexact_or_malformed_is_an_error() {
        use AmountError::*;
        type Is = fn(&AmountError) -> bool;
        let cases: &[(&str, &str, Is)] = &[
            ("10.001", "EUR", |e| matches!(e, TooPrecise { .. })),
            ("1.5", "JPY", |e| matches!(e, TooPrecise { .. })),
            ("1.2345", "KWD", |e| matches!(e, TooPrecise { .. })),
            ("10.00", "XYZ", |e| matches!(e, UnknownCurrency(_))),
            ("10.00", "eur", |e| matches!(e, UnknownCurrency(_))),
            ("", "EUR", |e| *e == NotDecimal),
            (".5", "EUR", |e| *e == NotDecimal),
            ("5.", "EUR", |e| *e == NotDecimal),
            ("1e3", "EUR", |e| *e == NotDecimal),
            ("+1.00", "EUR", |e| *e == NotDecimal),
            ("1,00", "EUR", |e| *e == NotDecimal),
            (" 1.00", "EUR", |e| *e == NotDecimal),
            ("--1", "EUR", |e| *e == NotDecimal),
            ("92233720368547758.08", "EUR", |e| *e == OutOfRange),
        ];
        for (value, currency, is) in cases {
            let err = Money::from_decimal(value, currency).unwrap_err();
            assert!(is(&err), "{value} {currency}: {err:?}");
        }
    }

    #[test]
    fn every_currency_mollie_lists_is_known_with_its_exponent() {
        // Mollie's "Supported currencies" (docs.mollie.com, Payments API), with the
        // minor unit ISO 4217 gives them. The audit found HRK missing.
        let mollie: &[(&str, u32)] = &[
            ("AED", 2),
            ("AUD", 2),
            ("BGN", 2),
            ("BRL", 2),
            ("CAD", 2),
            ("CHF", 2),
            ("CZK", 2),
            ("DKK", 2),
            ("EUR", 2),
            ("GBP", 2),
            ("HKD", 2),
            ("HRK", 2),
            ("HUF", 2),
            ("ILS", 2),
            ("ISK", 0),
            ("JPY", 0),
            ("MXN", 2),
            ("MYR", 2),
            ("NOK", 2),
            ("NZD", 2),
            ("PHP", 2),
            ("PLN", 2),
            ("RON", 2),
            ("RUB", 2),
            ("SEK", 2),
            ("SGD", 2),
            ("THB", 2),
            ("TWD", 2),
            ("USD", 2),
            ("ZAR", 2),
        ];
        for (code, exponent) in mollie {
            assert_eq!(currency_exponent(code), Some(*exponent), "{code}");
        }
        assert_eq!(
            Money::from_decimal("10.50", "HRK").unwrap().minor_amount,
            1050
        );
    }

    #[test]
    fn every_listed_code_is_three_upper_case_letters_and_listed_once() {
        let mut seen = std::collections::HashSet::new();
        for code in EXPONENTS
            .iter()
            .map(|(c, _)| *c)
            .chain(TWO_DECIMALS.iter().copied())
        {
            assert!(
                code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()),
                "{code}"
            );
            assert!(seen.insert(code), "{code} twice");
        }
        assert!(seen.len() > 150);
    }
}
