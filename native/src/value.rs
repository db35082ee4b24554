//! Python values to OTLP `AnyValue`, as the OpenTelemetry SDK's encoder maps them.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::proto::{
    encode_int_attribute, encode_text_attribute, AnyValue, ArrayValue, KeyValue, KeyValueList, Value,
};

/// Nesting deeper than this is written as the value's `str()` (a guard against hostile input).
const MAX_DEPTH: usize = 8;

/// The longest text value kept (the `OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT` rule), and whether a cut
/// value says so (`…[truncated N chars]`, as cfk_otel's own limits write it; the SDK's do not).
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub chars: usize,
    pub marker: bool,
}

/// Cuts `text` to at most `limit` characters, with the marker if the limit has one.
pub fn cut(mut text: String, limit: Option<Limit>) -> String {
    if let Some(limit) = limit {
        if let Some((index, _)) = text.char_indices().nth(limit.chars) {
            let removed = if limit.marker {
                text[index..].chars().count()
            } else {
                0
            };
            text.truncate(index);
            if limit.marker {
                text.push_str(&format!("…[truncated {removed} chars]"));
            }
        }
    }
    text
}

/// The value's OTLP form, or None where the SDK's encoder has none (an int outside int64, an
/// object of another type): the SDK then drops the attribute, and so does the core. A Python
/// `None` (what `BoundedAttributes` leaves of a value it could not clean) is an empty value.
pub fn any_value(value: &Bound<'_, PyAny>, limit: Option<Limit>, depth: usize) -> PyResult<Option<AnyValue>> {
    if value.is_none() {
        return Ok(Some(AnyValue::default()));
    }
    let value = if value.is_instance_of::<PyString>() {
        Value::String(cut(value.extract::<String>()?, limit))
    } else if value.is_instance_of::<PyBool>() {
        Value::Bool(value.extract()?)
    } else if value.is_instance_of::<PyInt>() {
        match value.extract::<i64>() {
            Ok(int) => Value::Int(int),
            Err(_) => return Ok(None),
        }
    } else if value.is_instance_of::<PyFloat>() {
        Value::Double(value.extract()?)
    } else if value.is_instance_of::<PyBytes>() {
        Value::Bytes(value.extract()?)
    } else if depth < MAX_DEPTH && (value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>()) {
        let mut values = Vec::new();
        for item in value.try_iter()? {
            match any_value(&item?, limit, depth + 1)? {
                Some(item) => values.push(item),
                None => return Ok(None),
            }
        }
        Value::Array(ArrayValue { values })
    } else if depth < MAX_DEPTH && value.is_instance_of::<PyDict>() {
        Value::KvList(KeyValueList {
            values: key_values(value.cast::<PyDict>()?, limit, depth + 1)?,
        })
    } else {
        return Ok(None);
    };
    Ok(Some(AnyValue { value: Some(value) }))
}

/// Whether `text` is kept whole under `limit`.
fn within(text: &str, limit: Option<Limit>) -> bool {
    limit.is_none_or(|limit| text.len() <= limit.chars || text.chars().count() <= limit.chars)
}

/// `encode_text_attribute` for `text` cut at `limit` (a `String` made only when it is cut).
pub fn encode_cut_attribute(tag: u32, key: &str, text: &str, limit: Option<Limit>, buf: &mut Vec<u8>) {
    if within(text, limit) {
        encode_text_attribute(tag, key, text, buf);
    } else {
        encode_text_attribute(tag, key, &cut(text.to_owned(), limit), buf);
    }
}

/// Appends `key` = `value` as one `KeyValue`, field `tag` of its message, as prost encodes the
/// `KeyValue` that `any_value` makes of it (nothing when it makes none). A text kept whole and
/// an exact `int` are written straight from the Python object, without a `String` made.
pub fn encode_attribute(
    tag: u32,
    key: &str,
    value: &Bound<'_, PyAny>,
    limit: Option<Limit>,
    buf: &mut Vec<u8>,
) -> PyResult<()> {
    if let Ok(text) = value.cast::<PyString>() {
        encode_cut_attribute(tag, key, text.to_str()?, limit, buf);
        return Ok(());
    }
    if value.is_exact_instance_of::<PyInt>() {
        if let Ok(int) = value.extract::<i64>() {
            encode_int_attribute(tag, key, int, buf);
            return Ok(());
        }
    }
    if let Some(value) = any_value(value, limit, 0)? {
        let pair = KeyValue {
            key: key.to_owned(),
            value: Some(value),
        };
        prost::encoding::message::encode(tag, &pair, buf);
    }
    Ok(())
}

pub fn key_values(dict: &Bound<'_, PyDict>, limit: Option<Limit>, depth: usize) -> PyResult<Vec<KeyValue>> {
    let mut out = Vec::with_capacity(dict.len());
    for (key, value) in dict.iter() {
        if let Some(value) = any_value(&value, limit, depth)? {
            out.push(KeyValue {
                key: key.str()?.to_string(),
                value: Some(value),
            });
        }
    }
    Ok(out)
}

/// Bytes a value keeps alive, roughly: what the queue's byte bound counts.
pub fn weight(values: &[KeyValue]) -> usize {
    values
        .iter()
        .map(|kv| kv.key.len() + 16 + kv.value.as_ref().map_or(0, any_weight))
        .sum()
}

pub fn any_weight(value: &AnyValue) -> usize {
    match &value.value {
        Some(Value::String(s)) => s.len(),
        Some(Value::Bytes(b)) => b.len(),
        Some(Value::Array(a)) => a.values.iter().map(any_weight).sum::<usize>() + 16,
        Some(Value::KvList(l)) => weight(&l.values),
        _ => 8,
    }
}
