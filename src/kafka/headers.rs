//! Kafka headers as bytes, read and written through librdkafka's C API.
//!
//! Why this exists: rdkafka 0.39 exposes a header name as `&str` and unwraps
//! `CStr::to_str` when it reads one, so a record whose header *name* is not UTF-8
//! (any librdkafka, franz-go or kcat producer can write one) panics whoever reads
//! its headers, and such a name cannot be written back through its API. paysync
//! reads every header as (name bytes, value bytes or null) and writes dead letters
//! with the same bytes. This is the crate's only `unsafe` code: four FFI calls on
//! header lists that rdkafka owns, each with the invariant it relies on.
//!
//! librdkafka keeps names NUL-terminated, so a name with an embedded NUL byte is
//! read up to that byte (a librdkafka limit, not a paysync choice).

#![allow(unsafe_code)]

use std::ffi::{c_char, c_void, CStr};

use rdkafka::bindings as rd;
use rdkafka::message::{BorrowedHeaders, OwnedHeaders};

/// A header as bytes: name and value (null when the producer sent none).
pub type OwnedHeader = (Vec<u8>, Option<Vec<u8>>);

/// The native list behind rdkafka's `BorrowedHeaders`: rdkafka 0.39 builds a
/// `&BorrowedHeaders` by casting the `rd_kafka_headers_t` pointer (see its
/// `BorrowedHeaders::from_native_ptr` and `OwnedHeaders::as_borrowed`), so the
/// reference's address is the list's. The tests check this against rdkafka's own
/// reader, so an upgrade that changes the representation fails them.
fn native(headers: &BorrowedHeaders) -> *mut rd::rd_kafka_headers_t {
    headers as *const BorrowedHeaders as *mut rd::rd_kafka_headers_t
}

/// Every header of a received record, in order, as bytes.
pub fn read(headers: &BorrowedHeaders) -> Vec<OwnedHeader> {
    let list = native(headers);
    // SAFETY: `list` is a live header list borrowed for the lifetime of `headers`.
    let count = unsafe { rd::rd_kafka_header_cnt(list) };
    let mut out = Vec::with_capacity(count);
    for idx in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `idx < count`; librdkafka writes three out-pointers that stay
        // valid while the list lives (we copy before returning).
        let err =
            unsafe { rd::rd_kafka_header_get_all(list, idx, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka stores names NUL-terminated.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
        let value = (!value.is_null()).then(|| {
            // SAFETY: a non-null value points at `size` bytes owned by the list.
            unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec()
        });
        out.push((name, value));
    }
    out
}

/// A header list for a record to produce, names and values written byte for byte.
pub fn build<'a>(
    headers: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
) -> OwnedHeaders {
    let owned = OwnedHeaders::new_with_capacity(headers.len().max(1));
    let list = native(owned.as_borrowed());
    for (name, value) in headers {
        let (value_ptr, value_len) = match value {
            Some(v) => (v.as_ptr().cast::<c_void>(), v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `list` is owned by `owned`, which outlives this call; librdkafka
        // copies `name_size` name bytes and `value_size` value bytes.
        let err = unsafe {
            rd::rd_kafka_header_add(
                list,
                name.as_ptr().cast::<c_char>(),
                name.len() as isize,
                value_ptr,
                value_len,
            )
        };
        // Adding to a writable list only fails for a read-only list, which this is not.
        debug_assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    }
    owned
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, Headers};

    #[test]
    fn names_and_values_round_trip_byte_for_byte() {
        let input: Vec<OwnedHeader> = vec![
            (b"\xff\xfe".to_vec(), Some(b"x".to_vec())),
            (b"plain".to_vec(), Some(vec![0, 159, 146, 150, 0])),
            (b"null-value".to_vec(), None),
            (b"empty-value".to_vec(), Some(Vec::new())),
            (b"plain".to_vec(), Some(b"repeated".to_vec())),
            ("naïve".as_bytes().to_vec(), Some(b"utf8".to_vec())),
        ];
        let owned = build(input.iter().map(|(k, v)| (k.as_slice(), v.as_deref())));
        assert_eq!(read(owned.as_borrowed()), input);
    }

    #[test]
    fn agrees_with_rdkafkas_own_reader_on_utf8_names() {
        // Guards the pointer cast in `native`: both readers must see the same list.
        let owned = OwnedHeaders::new()
            .insert(Header {
                key: "a",
                value: Some("1"),
            })
            .insert(Header::<&[u8]> {
                key: "b",
                value: None,
            });
        let ours = read(owned.as_borrowed());
        let theirs: Vec<OwnedHeader> = owned
            .iter()
            .map(|h| (h.key.as_bytes().to_vec(), h.value.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(ours, theirs);
        assert_eq!(owned.count(), 2);
    }

    #[test]
    fn an_empty_list_reads_empty() {
        let owned = build(std::iter::empty());
        assert!(read(owned.as_borrowed()).is_empty());
    }
}
