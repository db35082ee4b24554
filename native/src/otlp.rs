//! Finished spans, log records and metric collections handed over by Python, and their OTLP/HTTP
//! export.

use prost::Message;
use pyo3::conversion::FromPyObjectOwned;
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::export::{tls_config, Config, Exporter, Weighed};
use crate::metrics::Family;
use crate::proto::{
    field_head, field_len, put_span_ids, AnyValue, Event, ExportMetricsServiceRequest, InstrumentationScope,
    LogRecord, Metric, Resource, ResourceMetrics, ScopeMetrics, Span, Status,
};
use crate::value::{any_value, key_values, weight, Limit};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Signal {
    Traces,
    Logs,
    Metrics,
}

enum Payload {
    /// A span, and its fields encoded apart from it.
    Span(Span, Tail),
    Log(LogRecord, Tail),
    Metrics(Vec<Metric>),
}

/// One queued item: which scope it belongs to, its OTLP form, and what it weighs.
pub struct Item {
    scope: usize,
    payload: Payload,
    weight: usize,
}

impl Weighed for Item {
    fn weight(&self) -> usize {
        self.weight
    }
}

/// What a queued span keeps alive, roughly: its fixed size and its text and attributes.
pub(crate) fn span_weight(span: &Span) -> usize {
    160 + span.name.len()
        + span.trace_state.len()
        + span.status.as_ref().map_or(0, |status| status.message.len())
        + weight(&span.attributes)
        + events_weight(&span.events)
}

/// What a span's events keep alive (their share of `span_weight`).
pub(crate) fn events_weight(events: &[Event]) -> usize {
    events
        .iter()
        .map(|e| e.name.len() + 32 + weight(&e.attributes))
        .sum()
}

/// Fields of a span or log record encoded apart from it, written after its own (a message's
/// fields may come in any order, and these are not in the struct): its own, encoded straight
/// from the request's values (a `ServerSpan`'s, a request line's record), or a prepared client
/// call's ids followed by its kind's fields, shared by every call of that kind (`PreparedSpan`).
pub(crate) enum Tail {
    None,
    Own(Vec<u8>),
    Shared(InlineFields, Arc<[u8]>),
}

/// A few short fields encoded in place (a span's ids: at most 38 bytes).
pub(crate) struct InlineFields {
    bytes: [u8; 40],
    len: usize,
}

impl InlineFields {
    /// The ids' fields of a span (`trace_id`, `span_id`, and `parent_span_id` when not 0).
    pub(crate) fn ids(trace_id: u128, span_id: u64, parent_span_id: u64) -> Self {
        let mut fields = Self {
            bytes: [0; 40],
            len: 0,
        };
        // Encoded into a stack buffer: no allocation (a `&mut [u8]` is a `BufMut`).
        let mut out: &mut [u8] = &mut fields.bytes;
        let start = out.len();
        put_span_ids(trace_id, span_id, parent_span_id, &mut out);
        fields.len = start - out.len();
        fields
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Tail {
    pub(crate) fn len(&self) -> usize {
        match self {
            Tail::None => 0,
            Tail::Own(bytes) => bytes.len(),
            Tail::Shared(inline, shared) => inline.len + shared.len(),
        }
    }

    fn write(&self, buf: &mut Vec<u8>) {
        match self {
            Tail::None => {}
            Tail::Own(bytes) => buf.extend_from_slice(bytes),
            Tail::Shared(inline, shared) => {
                buf.extend_from_slice(inline.bytes());
                buf.extend_from_slice(shared);
            }
        }
    }
}

/// One scope's items, and the length of their `ScopeSpans` (`ScopeLogs`) message.
type ScopeItems<'a, M> = (&'a InstrumentationScope, &'a [(M, Tail)], usize);

/// `ExportTraceServiceRequest { resource_spans: [{ resource, scope_spans: [{ scope, spans }] }] }`
/// (`M`: `Span`), or the logs request's same shape (`M`: `LogRecord`), as prost would encode it,
/// each item followed by its `Tail`.
fn encode_envelope<M: Message>(
    resource: &Resource,
    scopes: &[InstrumentationScope],
    items: &[Vec<(M, Tail)>],
) -> Vec<u8> {
    let item_len = |(item, tail): &(M, Tail)| item.encoded_len() + tail.len();
    let scope_items: Vec<ScopeItems<'_, M>> = scopes
        .iter()
        .zip(items)
        .filter(|(_, items)| !items.is_empty())
        .map(|(scope, items)| {
            let len = field_len(1, scope.encoded_len())
                + items.iter().map(|i| field_len(2, item_len(i))).sum::<usize>();
            (scope, items.as_slice(), len)
        })
        .collect();
    let resource_items = field_len(1, resource.encoded_len())
        + scope_items
            .iter()
            .map(|(_, _, len)| field_len(2, *len))
            .sum::<usize>();
    let mut buf = Vec::with_capacity(field_len(1, resource_items));
    field_head(1, resource_items, &mut buf);
    field_head(1, resource.encoded_len(), &mut buf);
    resource.encode_raw(&mut buf);
    for (scope, items, len) in scope_items {
        field_head(2, len, &mut buf);
        field_head(1, scope.encoded_len(), &mut buf);
        scope.encode_raw(&mut buf);
        for item in items {
            field_head(2, item_len(item), &mut buf);
            item.0.encode_raw(&mut buf);
            item.1.write(&mut buf);
        }
    }
    buf
}

fn encode(signal: Signal, resource: &Resource, scopes: &[InstrumentationScope], batch: Vec<Item>) -> Vec<u8> {
    let mut spans: Vec<Vec<(Span, Tail)>> = (0..scopes.len()).map(|_| Vec::new()).collect();
    let mut logs: Vec<Vec<(LogRecord, Tail)>> = (0..scopes.len()).map(|_| Vec::new()).collect();
    let mut metrics: Vec<Vec<Metric>> = vec![Vec::new(); scopes.len()];
    for item in batch {
        match item.payload {
            Payload::Span(span, tail) => spans[item.scope].push((span, tail)),
            Payload::Log(log, tail) => logs[item.scope].push((log, tail)),
            Payload::Metrics(collected) => metrics[item.scope].extend(collected),
        }
    }
    match signal {
        Signal::Traces => encode_envelope(resource, scopes, &spans),
        Signal::Logs => encode_envelope(resource, scopes, &logs),
        Signal::Metrics => ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(resource.clone()),
                scope_metrics: scopes
                    .iter()
                    .zip(metrics)
                    .filter(|(_, metrics)| !metrics.is_empty())
                    .map(|(scope, metrics)| ScopeMetrics {
                        scope: Some(scope.clone()),
                        metrics,
                        schema_url: String::new(),
                    })
                    .collect(),
                schema_url: String::new(),
            }],
        }
        .encode_to_vec(),
    }
}

/// An id's bytes, or none for 0: OTLP writes an absent parent or span as an empty field.
fn id_bytes(bytes: &[u8]) -> Vec<u8> {
    if bytes.iter().all(|b| *b == 0) {
        Vec::new()
    } else {
        bytes.to_vec()
    }
}

fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or(Duration::MAX)
}

/// Raises `ValueError` when the TLS material (PEM text) cannot be used, saying which part;
/// what `OtlpExporter` would raise for the same arguments, without starting one.
#[pyfunction]
#[pyo3(signature = (certificate=None, client_certificate=None, client_key=None))]
pub fn check_tls(
    certificate: Option<Vec<u8>>,
    client_certificate: Option<Vec<u8>>,
    client_key: Option<Vec<u8>>,
) -> PyResult<()> {
    tls_config(
        certificate.as_deref(),
        client_certificate.as_deref(),
        client_key.as_deref(),
    )
    .map(|_| ())
    .map_err(PyValueError::new_err)
}

/// Exports one signal's finished spans or log records over OTLP/HTTP from a native thread.
///
/// One call per item (`record_span`, `record_log`), no Python objects kept: the item is converted
/// to its OTLP form at once and queued; batching, encoding, compression and retries happen off the
/// GIL (see `export.rs`).
#[pyclass(module = "cfk_otel._native", frozen)]
pub struct OtlpExporter {
    exporter: Exporter<Item>,
    signal: Signal,
    // Shared with the export thread's encoder; only ever appended to (see `scope`).
    scopes: Arc<Mutex<Vec<InstrumentationScope>>>,
    limit: Option<Limit>,
}

/// Scopes an exporter names at most: a log record's scope is its `logging` logger's name.
const MAX_SCOPES: usize = 256;

/// Item `index` of an argument tuple.
fn at<'py, T: FromPyObjectOwned<'py>>(args: &Bound<'py, PyTuple>, index: usize) -> PyResult<T> {
    args.get_item(index)?.extract::<T>().map_err(Into::into)
}

fn arity(args: &Bound<'_, PyTuple>, method: &str, count: usize) -> PyResult<()> {
    if args.len() == count {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "{method} takes {count} arguments, got {}",
            args.len()
        )))
    }
}

impl OtlpExporter {
    /// `record_span` with its sixteen positional arguments in one tuple: how a span ended
    /// together with other work (see `request.rs`) is handed over.
    pub(crate) fn record_span_args(&self, args: &Bound<'_, PyTuple>) -> PyResult<()> {
        arity(args, "record_span", 16)?;
        let attributes = args.get_item(10)?;
        let events = args.get_item(11)?;
        let events = if events.is_none() {
            None
        } else {
            Some(events.cast::<PyList>()?.clone())
        };
        self.record_span(
            at(args, 0)?,
            at(args, 1)?,
            at(args, 2)?,
            at(args, 3)?,
            at(args, 4)?,
            at(args, 5)?,
            at(args, 6)?,
            at(args, 7)?,
            at(args, 8)?,
            at(args, 9)?,
            attributes.cast::<PyDict>()?,
            events.as_ref(),
            at(args, 12)?,
            at(args, 13)?,
            at(args, 14)?,
            at(args, 15)?,
        )
    }

    /// `record_log` with its first ten positional arguments in one tuple (no event name).
    pub(crate) fn record_log_args(&self, args: &Bound<'_, PyTuple>) -> PyResult<()> {
        arity(args, "record_log", 10)?;
        self.record_log(
            at(args, 0)?,
            at(args, 1)?,
            at(args, 2)?,
            at(args, 3)?,
            at(args, 4)?,
            &args.get_item(5)?,
            args.get_item(6)?.cast::<PyDict>()?,
            at(args, 7)?,
            at(args, 8)?,
            at(args, 9)?,
            String::new(),
        )
    }

    /// The longest text value an attribute keeps.
    pub(crate) fn limit(&self) -> Option<Limit> {
        self.limit
    }

    /// A span's events, each `(name, time_unix_nano, attributes)`, in their OTLP form.
    pub(crate) fn events(&self, events: Option<&Bound<'_, PyList>>) -> PyResult<Vec<Event>> {
        let mut converted = Vec::new();
        for event in events.into_iter().flat_map(|events| events.iter()) {
            let (name, time, attrs): (String, u64, Bound<'_, PyDict>) = event.extract()?;
            converted.push(Event {
                time_unix_nano: time,
                name,
                attributes: key_values(&attrs, self.limit, 0)?,
                dropped_attributes_count: 0,
            });
        }
        Ok(converted)
    }

    /// Queues one span of `scope` built in the core or from `record_span`'s arguments, its
    /// scope checked; `weight` is what it keeps alive (`span_weight`, or a prepared client
    /// call's share of it counted once, see `request.rs`).
    pub(crate) fn push_span(&self, scope: usize, span: Span, weight: usize) -> PyResult<()> {
        self.push_span_with(scope, span, Tail::None, weight)
    }

    /// `push_span` for a span whose fields in `tail` it does not hold.
    pub(crate) fn push_span_with(&self, scope: usize, span: Span, tail: Tail, weight: usize) -> PyResult<()> {
        self.check(Signal::Traces, scope)?;
        self.exporter.push(Item {
            scope,
            payload: Payload::Span(span, tail),
            weight,
        });
        Ok(())
    }

    /// Queues one log record built in the core (its scope checked, its weight counted).
    pub(crate) fn push_log(&self, scope: usize, record: LogRecord) -> PyResult<()> {
        self.push_log_with(scope, record, Tail::None)
    }

    /// `push_log` for a record whose fields in `tail` it does not hold.
    pub(crate) fn push_log_with(&self, scope: usize, record: LogRecord, tail: Tail) -> PyResult<()> {
        self.check(Signal::Logs, scope)?;
        let weight = 96
            + record.severity_text.len()
            + record.event_name.len()
            + weight(&record.attributes)
            + record.body.as_ref().map_or(0, crate::value::any_weight)
            + tail.len();
        self.exporter.push(Item {
            scope,
            payload: Payload::Log(record, tail),
            weight,
        });
        Ok(())
    }

    fn check(&self, signal: Signal, scope: usize) -> PyResult<()> {
        if signal != self.signal {
            return Err(PyValueError::new_err(format!(
                "this exporter sends {:?}",
                self.signal
            )));
        }
        if scope >= self.scopes.lock().map_or(0, |scopes| scopes.len()) {
            return Err(PyIndexError::new_err("no such scope"));
        }
        Ok(())
    }
}

#[pymethods]
impl OtlpExporter {
    #[new]
    #[pyo3(signature = (
        signal, url, headers, resource, scopes, *, gzip=false, timeout=10.0, max_queue_size=2048,
        max_queue_bytes=16 << 20, max_export_batch_size=512, schedule_delay=5.0,
        max_retry_elapsed=300.0, attribute_value_length_limit=None, truncation_marker=false,
        certificate=None, client_certificate=None, client_key=None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        signal: &str,
        url: String,
        headers: Vec<(String, String)>,
        resource: &Bound<'_, PyDict>,
        scopes: Vec<(String, String)>,
        gzip: bool,
        timeout: f64,
        max_queue_size: usize,
        max_queue_bytes: usize,
        max_export_batch_size: usize,
        schedule_delay: f64,
        max_retry_elapsed: f64,
        attribute_value_length_limit: Option<usize>,
        truncation_marker: bool,
        certificate: Option<Vec<u8>>,
        client_certificate: Option<Vec<u8>>,
        client_key: Option<Vec<u8>>,
    ) -> PyResult<Self> {
        let signal = match signal {
            "traces" => Signal::Traces,
            "logs" => Signal::Logs,
            "metrics" => Signal::Metrics,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown signal {other:?}: traces, logs, metrics"
                )))
            }
        };
        let config = Config {
            url,
            headers,
            gzip,
            timeout: seconds(timeout),
            max_queue: max_queue_size.max(1),
            max_queue_bytes: max_queue_bytes.max(1),
            max_batch: max_export_batch_size.max(1),
            delay: seconds(schedule_delay),
            max_retry_elapsed: seconds(max_retry_elapsed),
            tls: tls_config(
                certificate.as_deref(),
                client_certificate.as_deref(),
                client_key.as_deref(),
            )
            .map_err(PyValueError::new_err)?,
        };
        let resource = Resource {
            attributes: key_values(resource, None, 0)?,
            dropped_attributes_count: 0,
        };
        let scopes: Vec<InstrumentationScope> = scopes
            .into_iter()
            .map(|(name, version)| InstrumentationScope {
                name,
                version,
                ..Default::default()
            })
            .collect();
        let scopes = Arc::new(Mutex::new(scopes));
        let shared = Arc::clone(&scopes);
        let encoder = move |batch| {
            // A snapshot: scopes added while this batch is encoded are not in it, nor used by it.
            let scopes = shared.lock().map(|s| s.clone()).unwrap_or_default();
            encode(signal, &resource, &scopes, batch)
        };
        Ok(Self {
            exporter: Exporter::start(config, Box::new(encoder))?,
            signal,
            scopes,
            limit: attribute_value_length_limit.map(|chars| Limit {
                chars,
                marker: truncation_marker,
            }),
        })
    }

    /// The index of the scope named `name` and `version`, added when new; None once
    /// `MAX_SCOPES` are named (the caller then records through the SDK).
    fn scope(&self, name: String, version: String) -> Option<usize> {
        let mut scopes = self.scopes.lock().ok()?;
        if let Some(index) = scopes.iter().position(|s| s.name == name && s.version == version) {
            return Some(index);
        }
        if scopes.len() >= MAX_SCOPES {
            return None;
        }
        scopes.push(InstrumentationScope {
            name,
            version,
            ..Default::default()
        });
        Some(scopes.len() - 1)
    }

    /// Queues one finished span. `events` is a list of `(name, time_unix_nano, attributes)`.
    #[pyo3(signature = (
        scope, trace_id, span_id, parent_span_id, flags, trace_state, name, kind, start, end,
        attributes, events=None, status_code=0, status_message=String::new(),
        dropped_attributes=0, dropped_events=0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn record_span(
        &self,
        scope: usize,
        trace_id: u128,
        span_id: u64,
        parent_span_id: u64,
        flags: u32,
        trace_state: String,
        name: String,
        kind: i32,
        start: u64,
        end: u64,
        attributes: &Bound<'_, PyDict>,
        events: Option<&Bound<'_, PyList>>,
        status_code: i32,
        status_message: String,
        dropped_attributes: u32,
        dropped_events: u32,
    ) -> PyResult<()> {
        self.check(Signal::Traces, scope)?;
        let attributes = key_values(attributes, self.limit, 0)?;
        let converted = self.events(events)?;
        let span = Span {
            trace_id: trace_id.to_be_bytes().to_vec(),
            span_id: span_id.to_be_bytes().to_vec(),
            trace_state,
            parent_span_id: id_bytes(&parent_span_id.to_be_bytes()),
            flags,
            name,
            kind,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes,
            dropped_attributes_count: dropped_attributes,
            events: converted,
            dropped_events_count: dropped_events,
            // Always present, as the SDK writes it (an empty message for an unset status).
            status: Some(Status {
                message: status_message,
                code: status_code,
            }),
        };
        let weight = span_weight(&span);
        self.push_span(scope, span, weight)
    }

    /// Queues one log record. `trace_id` and `span_id` are 0 outside a span.
    #[pyo3(signature = (
        scope, time, observed_time, severity_number, severity_text, body, attributes,
        trace_id=0, span_id=0, flags=0, event_name=String::new(),
    ))]
    #[allow(clippy::too_many_arguments)]
    fn record_log(
        &self,
        scope: usize,
        time: u64,
        observed_time: u64,
        severity_number: i32,
        severity_text: String,
        body: &Bound<'_, PyAny>,
        attributes: &Bound<'_, PyDict>,
        trace_id: u128,
        span_id: u64,
        flags: u32,
        event_name: String,
    ) -> PyResult<()> {
        self.check(Signal::Logs, scope)?;
        let attributes = key_values(attributes, self.limit, 0)?;
        // A None body is written as an empty value, as the SDK writes it.
        let body = if body.is_none() {
            Some(AnyValue::default())
        } else {
            any_value(body, None, 0)? // the body is the message: cut by the caller, as the SDK leaves it
        };
        let record = LogRecord {
            time_unix_nano: time,
            observed_time_unix_nano: observed_time,
            severity_number,
            severity_text,
            body,
            attributes,
            dropped_attributes_count: 0,
            flags,
            trace_id: id_bytes(&trace_id.to_be_bytes()),
            span_id: id_bytes(&span_id.to_be_bytes()),
            event_name,
        };
        self.push_log(scope, record)
    }

    /// Queues one collection of `families` (cumulative since `start`, at `now`, in unix
    /// nanoseconds): one export request, as a periodic metric reader makes.
    fn record_metrics(
        &self,
        scope: usize,
        families: Vec<PyRef<'_, Family>>,
        start: u64,
        now: u64,
    ) -> PyResult<()> {
        self.check(Signal::Metrics, scope)?;
        let collected: Vec<Metric> = families.iter().map(|family| family.to_otlp(start, now)).collect();
        let weight = collected.iter().map(|m| m.encoded_len()).sum::<usize>() + 64;
        self.exporter.push(Item {
            scope,
            payload: Payload::Metrics(collected),
            weight,
        });
        Ok(())
    }

    /// Exports what is queued; False when `timeout` seconds passed first.
    fn force_flush(&self, py: Python<'_>, timeout: f64) -> bool {
        py.detach(|| self.exporter.flush(seconds(timeout)))
    }

    /// Exports what is queued within `timeout` seconds, then stops; what is left is dropped.
    fn shutdown(&self, py: Python<'_>, timeout: f64) -> bool {
        py.detach(|| self.exporter.shutdown(seconds(timeout)))
    }

    /// The counters: accepted, exported, dropped (queue full, export failed), rejected, failed
    /// attempts, what is queued now (items and bytes), and the last error in words.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.exporter.stats();
        let (queued, queued_bytes) = self.exporter.queued();
        let out = PyDict::new(py);
        out.set_item("accepted", stats.accepted.load(Relaxed))?;
        out.set_item("exported", stats.exported.load(Relaxed))?;
        out.set_item("dropped_queue_full", stats.dropped_queue_full.load(Relaxed))?;
        out.set_item("dropped_export_failed", stats.dropped_export_failed.load(Relaxed))?;
        out.set_item("rejected", stats.rejected.load(Relaxed))?;
        out.set_item("failed_attempts", stats.failed_attempts.load(Relaxed))?;
        out.set_item("queued", queued)?;
        out.set_item("queued_bytes", queued_bytes)?;
        let last = stats.last_error.lock().map(|e| e.clone()).unwrap_or(None);
        out.set_item("last_error", last)?;
        Ok(out)
    }
}
