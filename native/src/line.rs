//! The request line built from one record: the JSON line for stdout, byte for byte what
//! `JsonFormatter._line` writes, and the OTLP log record `OtlpHandler.prepare_request` queues,
//! from the values `end_request` already has plus a few of the line's own.
//!
//! The line's configuration (the service fields, where stdout lines go, the logs exporter and
//! the line's scope) is a `RequestLine`, built once by Python; per request only numbers and the
//! path cross. The stdout line is appended to the process's `LineBuffer` (see `stdout.rs`),
//! which Python's writer empties in batches (stdout stays looked up per write there); the OTLP
//! record is queued here, without a Python dict or tuple.

use std::fmt::Write;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::otlp::{OtlpExporter, Tail};
use crate::proto::{
    encode_double_attribute, encode_int_attribute, encode_text_value, put_bytes_field, LogRecord,
};
use crate::stdout::LineBuffer;
use crate::value::encode_cut_attribute;

/// `outputs` bits: the line goes to stdout, its record over OTLP.
const STDOUT: u32 = 1;
const OTLP: u32 = 2;
/// `outputs` bit: the line's time, ids and flags are the server span's that ends with it
/// (`ServerSpan.end_request` fills them in: see `own_span`), not the tuple's.
pub const OWN_SPAN: u32 = 4;

/// `args` with the ending server span's ids and flags and the time now, when its outputs ask
/// for them (`OWN_SPAN`): no Python `int` made for a 128-bit id, nor a `time.time()` call.
pub fn own_span(mut args: LineArgs<'_>, trace_id: u128, span_id: u64, flags: u8) -> LineArgs<'_> {
    if args.7 & OWN_SPAN != 0 {
        args.1 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |elapsed| elapsed.as_secs_f64());
        (args.4, args.5, args.6) = (trace_id, span_id, u32::from(flags));
        args.7 &= !OWN_SPAN;
    }
    args
}

/// A request line's configuration, made once per route (see `cfk_otel._logs.requests`).
#[pyclass(module = "cfk_otel._native", frozen)]
pub struct RequestLine {
    service_fields: String,
    /// Where stdout lines wait, and the Python callable that writes what waits there.
    stdout: Option<(Py<LineBuffer>, Py<PyAny>)>,
    exporter: Option<Py<OtlpExporter>>,
    scope: usize,
}

/// One request's line: its configuration and what is its own (see `cfk_otel._logs.requests`):
/// created (epoch seconds), level, path, trace id, span id, trace flags, outputs.
pub type LineArgs<'py> = (PyRef<'py, RequestLine>, f64, i32, String, u128, u64, u32, u32);

/// What a line says, from the request's values.
struct Fields<'a> {
    created: f64,
    level: Level,
    method: &'a str,
    path: &'a str,
    route: &'a str,
    status: &'a str,
    duration_ms: f64,
    /// `duration_ms` as `repr` and as `%g` write it.
    ms_text: (String, String),
    trace_id: u128,
    span_id: u64,
}

/// A `logging` level: the document's name, the OTLP severity number and text.
#[derive(Clone, Copy)]
struct Level {
    name: &'static str,
    number: i32,
    text: &'static str,
}

fn level(levelno: i32) -> PyResult<Level> {
    let (name, number, text) = match levelno {
        10 => ("debug", 5, "DEBUG"),
        20 => ("info", 9, "INFO"),
        30 => ("warn", 13, "WARN"),
        40 => ("error", 17, "ERROR"),
        50 => ("fatal", 21, "FATAL"),
        other => return Err(PyValueError::new_err(format!("no request line at level {other}"))),
    };
    Ok(Level { name, number, text })
}

/// `round(seconds * 1_000_000) / 1000`, as Python computes it (round half to even).
fn duration_ms(seconds: f64) -> PyResult<f64> {
    let micros = seconds * 1_000_000.0;
    if !micros.is_finite() {
        return Err(PyValueError::new_err("a request's duration must be finite"));
    }
    Ok(micros.round_ties_even() / 1000.0)
}

impl<'a> Fields<'a> {
    /// A line's fields from the request's values (`levelno`: a `logging` level).
    #[allow(clippy::too_many_arguments)]
    fn new(
        created: f64,
        levelno: i32,
        method: &'a str,
        path: &'a str,
        route: &'a str,
        status: &'a str,
        seconds: f64,
        trace_id: u128,
        span_id: u64,
    ) -> PyResult<Self> {
        let duration_ms = duration_ms(seconds)?;
        Ok(Self {
            created,
            level: level(levelno)?,
            method,
            path,
            route,
            status,
            duration_ms,
            ms_text: ms_text(duration_ms),
            trace_id,
            span_id,
        })
    }

    fn has_span(&self) -> bool {
        self.trace_id != 0 && self.span_id != 0
    }

    /// `f"{method} {path} {status} {duration_ms:g}ms"`.
    fn message(&self) -> String {
        format!(
            "{} {} {} {}ms",
            self.method, self.path, self.status, self.ms_text.1
        )
    }

    /// The stdout line, as `JsonFormatter._line` writes it.
    fn json(&self, service_fields: &str, message: &str) -> PyResult<String> {
        let mut out = String::with_capacity(256 + 2 * (message.len() + self.route.len()));
        out.push_str("{\"timestamp\":\"");
        utc_timestamp(&mut out, self.created)?;
        out.push_str("\",\"level\":\"");
        out.push_str(self.level.name);
        out.push_str("\",\"message\":");
        json_string(&mut out, message);
        out.push(',');
        out.push_str(service_fields);
        out.push_str(",\"method\":");
        json_string(&mut out, self.method);
        out.push_str(",\"path\":");
        json_string(&mut out, self.path);
        out.push_str(",\"route\":");
        json_string(&mut out, self.route);
        out.push_str(",\"status\":");
        out.push_str(self.status);
        out.push_str(",\"duration_ms\":");
        out.push_str(&self.ms_text.0);
        if self.has_span() {
            let _ = write!(
                out,
                ",\"trace_id\":\"{:032x}\",\"span_id\":\"{:016x}\"",
                self.trace_id, self.span_id
            );
        }
        out.push('}');
        Ok(out)
    }
}

/// The OTLP record `LogSink.prepared` describes for the same line: its numbers in the
/// `LogRecord`, its text (severity, body, attributes) and ids encoded straight into its tail.
fn log_record(
    fields: &Fields<'_>,
    message: &str,
    exporter: &OtlpExporter,
    flags: u32,
) -> PyResult<(LogRecord, Tail)> {
    let status: i64 = fields
        .status
        .parse()
        .map_err(|_| PyValueError::new_err("a request's status must be a number"))?;
    let limit = exporter.limit();
    let stamp = (fields.created * 1e9) as u64; // int(created * 1e9), as Python truncates
    let mut tail = Vec::with_capacity(192 + message.len() + fields.path.len() + fields.route.len());
    put_bytes_field(3, fields.level.text.as_bytes(), &mut tail); // severity_text
    encode_text_value(5, message, &mut tail); // body
    encode_cut_attribute(6, "method", fields.method, limit, &mut tail);
    encode_cut_attribute(6, "path", fields.path, limit, &mut tail);
    encode_cut_attribute(6, "route", fields.route, limit, &mut tail);
    encode_int_attribute(6, "status", status, &mut tail);
    encode_double_attribute(6, "duration_ms", fields.duration_ms, &mut tail);
    let flags = if fields.has_span() {
        put_bytes_field(9, &fields.trace_id.to_be_bytes(), &mut tail);
        put_bytes_field(10, &fields.span_id.to_be_bytes(), &mut tail);
        flags
    } else {
        0
    };
    let record = LogRecord {
        time_unix_nano: stamp,
        observed_time_unix_nano: stamp,
        severity_number: fields.level.number,
        flags,
        ..LogRecord::default()
    };
    Ok((record, Tail::Own(tail)))
}

/// Writes one request's line where `args` says: the JSON line into the process's line buffer
/// (written in a batch soon after), the record into the exporter's queue. Both are attempted;
/// the first failure is returned.
pub fn write_line(
    py: Python<'_>,
    args: &LineArgs<'_>,
    method: &str,
    route: &str,
    status: &str,
    seconds: f64,
) -> PyResult<()> {
    let (config, created, levelno, path, trace_id, span_id, flags, outputs) = args;
    if outputs & OWN_SPAN != 0 {
        return Err(PyValueError::new_err(
            "a request line that takes its server span's ids ends with that span (ServerSpan.end_request)",
        ));
    }
    let fields = Fields::new(
        *created, *levelno, method, path, route, status, seconds, *trace_id, *span_id,
    )?;
    let message = fields.message();
    let mut failure: Option<PyErr> = None;
    if outputs & STDOUT != 0 {
        if let Some((lines, writer)) = &config.stdout {
            let written = fields
                .json(&config.service_fields, &message)
                .and_then(|line| lines.get().push(py, &line, writer));
            if let Err(error) = written {
                failure.get_or_insert(error);
            }
        }
    }
    if outputs & OTLP != 0 {
        if let Some(exporter) = &config.exporter {
            let exporter = exporter.get();
            let queued = log_record(&fields, &message, exporter, *flags)
                .and_then(|(record, tail)| exporter.push_log_with(config.scope, record, tail));
            if let Err(error) = queued {
                failure.get_or_insert(error);
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

#[pymethods]
impl RequestLine {
    /// `service_fields`: the line's `"service":...,"environment":...,"version":...` (JSON,
    /// without braces); `stdout`: the line buffer stdout lines wait in and the callable that
    /// writes what waits there (None: no stdout); `exporter` and `scope`: where the OTLP record
    /// goes (None: not over OTLP).
    #[new]
    #[pyo3(signature = (service_fields, stdout=None, exporter=None, scope=0))]
    fn new(
        service_fields: String,
        stdout: Option<(Py<LineBuffer>, Py<PyAny>)>,
        exporter: Option<Py<OtlpExporter>>,
        scope: usize,
    ) -> Self {
        Self {
            service_fields,
            stdout,
            exporter,
            scope,
        }
    }

    /// The JSON line of one request, as the line buffer is given it (what the tests compare).
    #[pyo3(signature = (created, level, method, path, route, status, seconds, trace_id=0, span_id=0))]
    #[allow(clippy::too_many_arguments)]
    fn render(
        &self,
        created: f64,
        level: i32,
        method: &str,
        path: &str,
        route: &str,
        status: &str,
        seconds: f64,
        trace_id: u128,
        span_id: u64,
    ) -> PyResult<String> {
        let fields = Fields::new(
            created, level, method, path, route, status, seconds, trace_id, span_id,
        )?;
        fields.json(&self.service_fields, &fields.message())
    }
}

/// `json.encoder.encode_basestring`: quotes, backslashes and C0 controls escaped, the rest as is.
fn json_string(out: &mut String, text: &str) {
    out.push('"');
    let mut start = 0;
    for (index, byte) in text.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&text[start..index]); // an ASCII byte: always a character boundary
        if escape.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escape);
        }
        start = index + 1;
    }
    out.push_str(&text[start..]);
    out.push('"');
}

/// `utc_timestamp`: `2026-01-31T12:00:00.123Z` (UTC, milliseconds truncated).
fn utc_timestamp(out: &mut String, created: f64) -> PyResult<()> {
    if !(0.0..253_402_300_800.0).contains(&created) {
        return Err(PyValueError::new_err(
            "a request line's time must fall in years 1970-9999",
        ));
    }
    let seconds = created.trunc();
    let millis = ((created - seconds) * 1000.0) as u32;
    let seconds = seconds as i64;
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    );
    Ok(())
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A float's digits and decimal exponent as `{:e}` gives them (`precision` digits after the
/// point, or the shortest that round-trips): ("-", "12345", 3) for -1.2345e3.
fn scientific(value: f64, precision: Option<usize>) -> (&'static str, String, i32) {
    let text = match precision {
        Some(precision) => format!("{:.*e}", precision, value.abs()),
        None => format!("{:e}", value.abs()),
    };
    let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
    let sign = if value.is_sign_negative() { "-" } else { "" };
    (sign, mantissa.replace('.', ""), exponent.parse().unwrap_or(0))
}

/// Digits with the decimal point placed after `exponent + 1` of them (zeros added as needed).
fn positional(digits: &str, exponent: i32) -> (String, String) {
    if exponent < 0 {
        let zeros = "0".repeat(exponent.unsigned_abs() as usize - 1);
        return ("0".to_owned(), format!("{zeros}{digits}"));
    }
    let point = exponent as usize + 1;
    if digits.len() <= point {
        (format!("{digits:0<point$}"), String::new())
    } else {
        (digits[..point].to_owned(), digits[point..].to_owned())
    }
}

/// Python's exponent: a sign and at least two digits (`e+16`, `e-05`).
fn exponent_text(exponent: i32) -> String {
    let sign = if exponent < 0 { '-' } else { '+' };
    format!("e{sign}{:02}", exponent.unsigned_abs())
}

/// Durations under this many microseconds are written from their integer count (see
/// `ms_text`): below 1000 ms both `repr` and `%g` give every digit of `micros / 1000`.
const EXACT_MICROS: f64 = 1_000_000.0;

/// `duration_ms` (`micros / 1000`) as `repr` and as `%g` write it: from the integer count of
/// microseconds when it has at most six digits (the usual case, no float formatting), else
/// from the float.
fn ms_text(duration_ms: f64) -> (String, String) {
    let micros = duration_ms * 1000.0;
    if !(0.0..EXACT_MICROS).contains(&micros) {
        return (py_repr(duration_ms), format_g(duration_ms));
    }
    let micros = micros.round() as u32; // exact: duration_ms is micros / 1000, micros < 10^6
    let (whole, fraction) = (micros / 1000, micros % 1000);
    if fraction == 0 {
        return (format!("{whole}.0"), whole.to_string());
    }
    let fraction = format!("{fraction:03}");
    let fraction = fraction.trim_end_matches('0');
    let text = format!("{whole}.{fraction}");
    (text.clone(), text)
}

/// Python's `repr` of a float (the shortest text that reads back the same).
fn py_repr(value: f64) -> String {
    if !value.is_finite() {
        return if value.is_nan() {
            "nan".into()
        } else if value > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let (sign, digits, exponent) = scientific(value, None);
    if (-4..16).contains(&exponent) {
        let (whole, fraction) = positional(&digits, exponent);
        let fraction = if fraction.is_empty() { "0" } else { &fraction };
        return format!("{sign}{whole}.{fraction}");
    }
    let (first, rest) = digits.split_at(1);
    let point = if rest.is_empty() { "" } else { "." };
    format!("{sign}{first}{point}{rest}{}", exponent_text(exponent))
}

/// Python's `format(value, "g")`: six significant digits, trailing zeros dropped.
fn format_g(value: f64) -> String {
    if !value.is_finite() {
        return py_repr(value);
    }
    let (sign, digits, exponent) = scientific(value, Some(5));
    let digits = digits.trim_end_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    if value == 0.0 {
        return format!("{sign}0");
    }
    if (-4..6).contains(&exponent) {
        let (whole, fraction) = positional(digits, exponent);
        let point = if fraction.is_empty() { "" } else { "." };
        return format!("{sign}{whole}{point}{fraction}");
    }
    let (first, rest) = digits.split_at(1);
    let point = if rest.is_empty() { "" } else { "." };
    format!("{sign}{first}{point}{rest}{}", exponent_text(exponent))
}
