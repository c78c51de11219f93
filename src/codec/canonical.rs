//! The Avro specification's *Parsing Canonical Form* and its CRC-64-AVRO
//! fingerprint, written from the specification, so that the fingerprint paysync
//! puts on every single-object event is the one Java's `SchemaNormalization`,
//! fastavro and goavro compute from the same schema file.
//!
//! Why not apache-avro's `Schema::canonical_form`: apache-avro 0.21 keeps a
//! logical type's underlying type as an object (`{"type":"long"}` for a
//! `timestamp-millis` long) where the specification strips `logicalType` and then
//! writes the primitive by name (`"long"`), so its fingerprint of any schema with a
//! logical type differs from every other implementation's (AVRO-4004).
//!
//! The transformations, in the specification's words: [PRIMITIVES] primitives in
//! their simple form; [FULLNAMES] names replaced by fullnames (namespaces folded in
//! and inherited from the most tightly enclosing named type); [STRIP] only `type`,
//! `name`, `fields`, `symbols`, `items`, `values` and `size` kept; [ORDER] in that
//! order (`name` first); [STRINGS] escapes replaced by the characters (JSON parsing
//! does that); [INTEGERS] plain integers; [WHITESPACE] none. A named type after its
//! first definition is written as its fullname.

use std::collections::HashSet;

use serde_json::{Map, Value};

const PRIMITIVES: &[&str] = &[
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Why a schema has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an Avro schema: {0}")]
pub struct CanonicalError(String);

fn err<T>(message: impl Into<String>) -> Result<T, CanonicalError> {
    Err(CanonicalError(message.into()))
}

/// The Parsing Canonical Form of the schema written as JSON text.
pub fn parsing_canonical_form(schema_json: &str) -> Result<String, CanonicalError> {
    let schema: Value = serde_json::from_str(schema_json)
        .map_err(|e| CanonicalError(format!("invalid JSON: {e}")))?;
    let mut out = String::with_capacity(schema_json.len());
    Canonicalizer::default().write(&schema, None, &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO ("Rabin") of `data`, as the specification's reference code computes it.
pub fn crc64_avro(data: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u64; 256];
        for (i, slot) in table.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & 0u64.wrapping_sub(fp & 1));
            }
            *slot = fp;
        }
        table
    });
    data.iter().fold(EMPTY, |fp, b| {
        (fp >> 8) ^ table[((fp ^ u64::from(*b)) & 0xff) as usize]
    })
}

/// The single-object fingerprint of the schema written as JSON text: CRC-64-AVRO of
/// its Parsing Canonical Form. On the wire it is written little-endian.
pub fn fingerprint(schema_json: &str) -> Result<u64, CanonicalError> {
    parsing_canonical_form(schema_json).map(|form| crc64_avro(form.as_bytes()))
}

#[derive(Default)]
struct Canonicalizer {
    /// Fullnames of the named types defined so far (later uses are references).
    defined: HashSet<String>,
}

fn push_json_string(out: &mut String, s: &str) {
    // serde_json escapes only what JSON requires (quote, backslash, controls),
    // which is what the other implementations write.
    out.push_str(&Value::String(s.to_owned()).to_string());
}

/// The fullname of `name` in `namespace`: a dotted name is already full.
fn fullname(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_owned(),
    }
}

/// The namespace part of a fullname (what nested types inherit).
fn namespace_of(full: &str) -> Option<&str> {
    full.rsplit_once('.').map(|(ns, _)| ns)
}

impl Canonicalizer {
    fn write(
        &mut self,
        schema: &Value,
        namespace: Option<&str>,
        out: &mut String,
    ) -> Result<(), CanonicalError> {
        match schema {
            Value::String(name) => self.write_reference(name, namespace, out),
            Value::Array(branches) => {
                out.push('[');
                for (i, branch) in branches.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.write(branch, namespace, out)?;
                }
                out.push(']');
                Ok(())
            }
            Value::Object(object) => self.write_object(object, namespace, out),
            other => err(format!(
                "a schema must be a string, array or object, not {other}"
            )),
        }
    }

    fn write_reference(
        &self,
        name: &str,
        namespace: Option<&str>,
        out: &mut String,
    ) -> Result<(), CanonicalError> {
        if PRIMITIVES.contains(&name) {
            push_json_string(out, name);
            return Ok(());
        }
        let qualified = fullname(name, namespace);
        let resolved = if self.defined.contains(&qualified) {
            qualified
        } else if self.defined.contains(name) {
            // A type of the null namespace referenced from inside a namespace.
            name.to_owned()
        } else {
            return err(format!("reference to undefined type `{name}`"));
        };
        push_json_string(out, &resolved);
        Ok(())
    }

    fn write_object(
        &mut self,
        object: &Map<String, Value>,
        namespace: Option<&str>,
        out: &mut String,
    ) -> Result<(), CanonicalError> {
        let ty = match object.get("type") {
            Some(Value::String(t)) => t.as_str(),
            // `{"type": <schema>}`: the object only wraps another schema.
            Some(inner @ (Value::Object(_) | Value::Array(_))) => {
                return self.write(inner, namespace, out)
            }
            _ => return err("an object schema needs a `type`"),
        };
        match ty {
            // [STRIP] then [PRIMITIVES]: a primitive with attributes (a logical type,
            // custom properties) is written by name.
            t if PRIMITIVES.contains(&t) => {
                push_json_string(out, t);
                Ok(())
            }
            "record" | "error" | "enum" | "fixed" => self.write_named(object, ty, namespace, out),
            "array" => {
                out.push_str("{\"type\":\"array\",\"items\":");
                let items = object
                    .get("items")
                    .ok_or(CanonicalError("an array needs `items`".into()))?;
                self.write(items, namespace, out)?;
                out.push('}');
                Ok(())
            }
            "map" => {
                out.push_str("{\"type\":\"map\",\"values\":");
                let values = object
                    .get("values")
                    .ok_or(CanonicalError("a map needs `values`".into()))?;
                self.write(values, namespace, out)?;
                out.push('}');
                Ok(())
            }
            // A named type referenced as `{"type": "Name"}`.
            name => self.write_reference(name, namespace, out),
        }
    }

    fn write_named(
        &mut self,
        object: &Map<String, Value>,
        ty: &str,
        enclosing: Option<&str>,
        out: &mut String,
    ) -> Result<(), CanonicalError> {
        let Some(Value::String(name)) = object.get("name") else {
            return err(format!("a {ty} needs a `name`"));
        };
        let namespace = match object.get("namespace") {
            Some(Value::String(ns)) => Some(ns.as_str()),
            Some(Value::Null) | None => enclosing,
            Some(_) => return err("`namespace` must be a string"),
        };
        let full = fullname(name, namespace);
        if !self.defined.insert(full.clone()) {
            return err(format!("type `{full}` is defined twice"));
        }
        out.push_str("{\"name\":");
        push_json_string(out, &full);
        out.push_str(",\"type\":");
        push_json_string(out, ty);
        let inner_namespace = namespace_of(&full).map(str::to_owned);
        match ty {
            "record" | "error" => {
                let Some(Value::Array(fields)) = object.get("fields") else {
                    return err(format!("record `{full}` needs a `fields` array"));
                };
                out.push_str(",\"fields\":[");
                for (i, field) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let (Some(Value::String(field_name)), Some(field_type)) =
                        (field.get("name"), field.get("type"))
                    else {
                        return err(format!("a field of `{full}` needs a `name` and a `type`"));
                    };
                    out.push_str("{\"name\":");
                    push_json_string(out, field_name);
                    out.push_str(",\"type\":");
                    self.write(field_type, inner_namespace.as_deref(), out)?;
                    out.push('}');
                }
                out.push(']');
            }
            "enum" => {
                let Some(Value::Array(symbols)) = object.get("symbols") else {
                    return err(format!("enum `{full}` needs a `symbols` array"));
                };
                out.push_str(",\"symbols\":[");
                for (i, symbol) in symbols.iter().enumerate() {
                    let Value::String(symbol) = symbol else {
                        return err(format!("a symbol of `{full}` is not a string"));
                    };
                    if i > 0 {
                        out.push(',');
                    }
                    push_json_string(out, symbol);
                }
                out.push(']');
            }
            _ => {
                // [INTEGERS]: a plain non-negative integer.
                let Some(size) = object.get("size").and_then(Value::as_u64) else {
                    return err(format!(
                        "fixed `{full}` needs a non-negative integer `size`"
                    ));
                };
                out.push_str(",\"size\":");
                out.push_str(&size.to_string());
            }
        }
        out.push('}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors computed by fastavro and by Java's `SchemaNormalization` (which
    /// agree), with the command that made them: `tests/fixtures/avro/generate.py`.
    const VECTORS: &str = include_str!("../../tests/fixtures/avro/vectors.json");

    fn vectors() -> Vec<(String, String, u64, String)> {
        let v: Value = serde_json::from_str(VECTORS).unwrap();
        v["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["file"].as_str().unwrap().to_owned(),
                    x["canonical"].as_str().unwrap().to_owned(),
                    u64::from_str_radix(x["fingerprint"].as_str().unwrap(), 16).unwrap(),
                    x["wire"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn canonical_forms_and_fingerprints_match_fastavro_and_java() {
        let root = env!("CARGO_MANIFEST_DIR");
        let all = vectors();
        assert!(all.len() >= 11, "the fixture covers every case");
        for (file, canonical, fp, wire) in all {
            let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
            assert_eq!(parsing_canonical_form(&text).unwrap(), canonical, "{file}");
            assert_eq!(fingerprint(&text).unwrap(), fp, "{file}");
            assert_eq!(hex(&fp.to_le_bytes()), wire, "{file}: wire order");
        }
    }

    #[test]
    fn the_fingerprint_of_released_v1_is_the_one_fastavro_printed() {
        // From the issue that found the defect: fastavro prints the wire bytes of
        // the v1 event schema as 4532462da89119e3 (apache-avro's were different).
        let v1 = include_str!("../../schemas/released/v1/payment_status_event.avsc");
        let fp = fingerprint(v1).unwrap();
        assert_eq!(hex(&fp.to_le_bytes()), "4532462da89119e3");
    }

    #[test]
    fn crc64_avro_reference_values() {
        // The specification's empty-input value, and the fingerprint of "int" that
        // the Avro test suite lists (7275d51a3f395c8f).
        assert_eq!(crc64_avro(b""), 0xc15d_213a_a4d7_a795);
        assert_eq!(crc64_avro(b"\"int\""), 0x7275_d51a_3f39_5c8f);
    }

    #[test]
    fn malformed_schemas_are_errors_not_panics() {
        for bad in [
            "",
            "[",
            "42",
            "{}",
            r#"{"type":"record","name":"R"}"#,
            r#"{"type":"record","name":"R","fields":[{"name":"a"}]}"#,
            r#"{"type":"enum","name":"E","symbols":[1]}"#,
            r#"{"type":"fixed","name":"F","size":-1}"#,
            r#"{"type":"array"}"#,
            r#""Undefined""#,
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":"R2"}]}"#,
            r#"["int",{"type":"fixed","name":"F","size":1},{"type":"fixed","name":"F","size":1}]"#,
        ] {
            assert!(parsing_canonical_form(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn recursive_records_reference_themselves_by_fullname() {
        let form = parsing_canonical_form(
            r#"{"type":"record","name":"Node","namespace":"t","fields":[
                {"name":"next","type":["null","Node"]}]}"#,
        )
        .unwrap();
        assert_eq!(
            form,
            r#"{"name":"t.Node","type":"record","fields":[{"name":"next","type":["null","t.Node"]}]}"#
        );
    }
}
