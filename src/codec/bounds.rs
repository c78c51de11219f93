//! A walk over an Avro binary datum that checks every length it declares (of a
//! string, bytes, or the item count of an array or map block) against the bytes
//! that are left, before apache-avro decodes it. apache-avro allocates a declared
//! length before it reads the bytes (up to its process-wide limit of 512 MiB), so
//! a 20-byte record that declares a 500 MB string would cost 500 MB first and be
//! refused after. The walk allocates nothing; the datum is already bounded by
//! `processing.max_request_bytes`, so no decode of outside bytes allocates more
//! than that for a declared length.

use apache_avro::schema::{Name, Namespace, ResolvedSchema};
use apache_avro::Schema;

/// Why a datum cannot be what its schema says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    /// It ends before the schema says it does.
    #[error("the datum is truncated")]
    Truncated,
    /// A declared length or count is larger than the bytes that follow, or negative.
    #[error("a declared length ({declared}) exceeds the {left} bytes left")]
    Length {
        /// What the datum declares.
        declared: i64,
        /// What is left.
        left: usize,
    },
    /// A varint longer than ten bytes, or a union branch that does not exist.
    #[error("malformed datum: {0}")]
    Malformed(&'static str),
    /// The schema nests deeper than the walk follows (recursive named types).
    #[error("the datum nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Nesting the walk follows at most (a recursive schema could nest without end).
const MAX_DEPTH: usize = 64;

/// Checks that every length `datum` declares fits the bytes left after it.
pub fn check(schema: &Schema, datum: &[u8]) -> Result<(), BoundsError> {
    let resolved =
        ResolvedSchema::try_from(schema).map_err(|_| BoundsError::Malformed("schema names"))?;
    let mut walk = Walk {
        rest: datum,
        names: resolved.get_names(),
    };
    walk.value(schema, &None, 0)
}

struct Walk<'a, 's> {
    rest: &'a [u8],
    names: &'s std::collections::HashMap<Name, &'s Schema>,
}

impl Walk<'_, '_> {
    fn take(&mut self, n: usize) -> Result<(), BoundsError> {
        if n > self.rest.len() {
            return Err(BoundsError::Truncated);
        }
        self.rest = &self.rest[n..];
        Ok(())
    }

    /// A zig-zag varint (int or long).
    fn long(&mut self) -> Result<i64, BoundsError> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let Some((&b, rest)) = self.rest.split_first() else {
                return Err(BoundsError::Truncated);
            };
            self.rest = rest;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err(BoundsError::Malformed("varint longer than ten bytes"))
    }

    /// A length that must fit the bytes left.
    fn length(&mut self) -> Result<usize, BoundsError> {
        let declared = self.long()?;
        let left = self.rest.len();
        match usize::try_from(declared) {
            Ok(n) if n <= left => Ok(n),
            _ => Err(BoundsError::Length { declared, left }),
        }
    }

    fn value(
        &mut self,
        schema: &Schema,
        namespace: &Namespace,
        depth: usize,
    ) -> Result<(), BoundsError> {
        if depth > MAX_DEPTH {
            return Err(BoundsError::TooDeep);
        }
        match schema {
            Schema::Null => Ok(()),
            Schema::Boolean => self.take(1),
            Schema::Int
            | Schema::Long
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => self.long().map(drop),
            Schema::Float => self.take(4),
            Schema::Double => self.take(8),
            Schema::Decimal(d) => self.value(&d.inner, namespace, depth + 1),
            Schema::Bytes | Schema::String | Schema::Uuid | Schema::BigDecimal => {
                let n = self.length()?;
                self.take(n)
            }
            Schema::Fixed(f) => self.take(f.size),
            Schema::Duration => self.take(12),
            Schema::Enum(_) => self.long().map(drop),
            Schema::Union(u) => {
                let index = self.long()?;
                let branch = usize::try_from(index)
                    .ok()
                    .and_then(|i| u.variants().get(i))
                    .ok_or(BoundsError::Malformed("union branch out of range"))?;
                self.value(branch, namespace, depth + 1)
            }
            Schema::Record(r) => {
                for field in &r.fields {
                    self.value(&field.schema, &r.name.namespace, depth + 1)?;
                }
                Ok(())
            }
            Schema::Array(a) => self.blocks(|w| w.value(&a.items, namespace, depth + 1)),
            Schema::Map(m) => self.blocks(|w| {
                let n = w.length()?;
                w.take(n)?;
                w.value(&m.types, namespace, depth + 1)
            }),
            Schema::Ref { name } => {
                let full = name.fully_qualified_name(namespace);
                let target = *self
                    .names
                    .get(&full)
                    .ok_or(BoundsError::Malformed("unknown named type"))?;
                self.value(target, &full.namespace, depth + 1)
            }
        }
    }

    /// Array or map blocks: a count (negative: followed by the block's byte
    /// size), its items, until a zero count. Every item takes at least one byte
    /// here or the count must still fit the bytes left, so a huge count of
    /// zero-byte items cannot make the walk (or apache-avro's `reserve`) run long.
    fn blocks(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), BoundsError>,
    ) -> Result<(), BoundsError> {
        loop {
            let declared = self.long()?;
            if declared == 0 {
                return Ok(());
            }
            let count = declared.checked_abs().ok_or(BoundsError::Length {
                declared,
                left: self.rest.len(),
            })?;
            if declared < 0 {
                self.length()?;
            }
            let left = self.rest.len();
            let count = usize::try_from(count)
                .ok()
                .filter(|c| *c <= left)
                .ok_or(BoundsError::Length { declared, left })?;
            for _ in 0..count {
                item(self)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zigzag(v: i64) -> Vec<u8> {
        let mut u = ((v << 1) ^ (v >> 63)) as u64;
        let mut out = Vec::new();
        loop {
            let b = (u & 0x7f) as u8;
            u >>= 7;
            if u == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    #[test]
    fn a_declared_length_beyond_the_datum_is_refused_without_reading_it() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"s","type":"string"}]}"#,
        )
        .unwrap();
        let mut datum = zigzag(500_000_000);
        datum.extend_from_slice(b"only a few bytes");
        assert_eq!(
            check(&schema, &datum),
            Err(BoundsError::Length {
                declared: 500_000_000,
                left: 16
            })
        );
        let mut ok = zigzag(3);
        ok.extend_from_slice(b"abc");
        assert_eq!(check(&schema, &ok), Ok(()));
        assert_eq!(
            check(&schema, &zigzag(-1)),
            Err(BoundsError::Length {
                declared: -1,
                left: 0
            })
        );
    }

    #[test]
    fn huge_block_counts_and_bad_branches_are_refused() {
        let array = Schema::parse_str(r#"{"type":"array","items":"null"}"#).unwrap();
        assert!(matches!(
            check(&array, &zigzag(i64::MAX)),
            Err(BoundsError::Length { .. })
        ));
        assert!(matches!(
            check(&array, &zigzag(i64::MIN)),
            Err(BoundsError::Length { .. })
        ));
        let union = Schema::parse_str(r#"["null","string"]"#).unwrap();
        assert_eq!(
            check(&union, &zigzag(2)),
            Err(BoundsError::Malformed("union branch out of range"))
        );
        assert_eq!(
            check(&union, &[0xff; 11]),
            Err(BoundsError::Malformed("varint longer than ten bytes"))
        );
    }

    #[test]
    fn the_request_schema_walks_what_apache_avro_writes() {
        use apache_avro::types::Record;
        let schemas = super::super::avro::Schemas::get();
        let mut rec = Record::new(&schemas.request).unwrap();
        rec.put("connector_transaction_id", "tx-1");
        let datum = apache_avro::to_avro_datum(&schemas.request, rec).unwrap();
        assert_eq!(check(&schemas.request, &datum), Ok(()));
        assert_eq!(
            check(&schemas.request, &datum[..datum.len() - 1]),
            Err(BoundsError::Truncated)
        );
    }
}
