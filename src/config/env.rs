//! Environment overrides: `PAYSYNC_<SECTION>__<KEY>`, `__` between levels, upper
//! case. Values are parsed like TOML values (numbers, booleans, strings); names of
//! librdkafka properties under `kafka.common|consumer|producer` are written with
//! `_` for `.` and their values stay strings. The variables come in as a list, not
//! from the live environment, so loading is testable.

use figment::providers::Serialized;
use figment::value::{Dict, Value};

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "PAYSYNC_";

/// The overrides in `vars` as a figment provider.
pub(super) fn provider(vars: &[(String, String)]) -> Serialized<Dict> {
    let mut root = Dict::new();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            continue; // PAYSYNC_CONFIG and friends are not settings.
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        let passthrough = path.len() == 3
            && path[0] == "kafka"
            && matches!(path[1].as_str(), "common" | "consumer" | "producer");
        let (parents, leaf) = path.split_at(path.len() - 1);
        let leaf = if passthrough {
            leaf[0].replace('_', ".")
        } else {
            leaf[0].clone()
        };
        let parsed = if passthrough {
            Value::from(value.clone())
        } else {
            value
                .parse::<Value>()
                .unwrap_or_else(|_| Value::from(value.clone()))
        };
        insert(&mut root, parents, leaf, parsed);
    }
    Serialized::defaults(root)
}

/// Sets `parents.leaf = value`, creating (or replacing non-table) parents.
fn insert(dict: &mut Dict, parents: &[String], leaf: String, value: Value) {
    match parents.split_first() {
        None => {
            dict.insert(leaf, value);
        }
        Some((first, rest)) => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, leaf, value);
            } else {
                let mut inner = Dict::new();
                insert(&mut inner, rest, leaf, value);
                *entry = Value::from(inner);
            }
        }
    }
}
