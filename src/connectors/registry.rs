//! The connector registry: the one place that lists connectors by name. Adding a
//! connector is one line in [`REGISTRY`].

use std::sync::Arc;

use super::Connector;

type Constructor = fn() -> Arc<dyn Connector>;

/// Every connector paysync knows, by the name used in requests and configuration.
#[rustfmt::skip]
const REGISTRY: &[(&str, Constructor)] = &[
    ("cm", || Arc::new(super::cm::CmConnector)),
    ("mollie", || Arc::new(super::mollie::MollieConnector)),
    ("stripe", || Arc::new(super::stripe::StripeConnector)),
];

/// The connector called `name`, if any.
pub fn get(name: &str) -> Option<Arc<dyn Connector>> {
    REGISTRY
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, make)| make())
}

/// True when a connector of that name exists.
pub fn is_known(name: &str) -> bool {
    REGISTRY.iter().any(|(n, _)| *n == name)
}

/// All names.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|(n, _)| *n).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_resolve_to_connectors_of_that_name() {
        for name in super::names() {
            assert_eq!(super::get(name).unwrap().name(), name);
        }
        assert!(super::get("nope").is_none());
    }

    #[test]
    fn every_connectors_scheme_reads_its_fields_and_masks_its_secrets() {
        for name in super::names() {
            crate::connectors::auth::tests::scheme_holds(super::get(name).unwrap().auth());
        }
    }
}
