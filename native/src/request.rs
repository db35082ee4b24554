//! The end of a request, and of a client call, in one crossing from Python.
//!
//! A request ends with up to three records: its server span, its two request metrics and its
//! request line's OTLP log record. Each used to be its own call (with its own Python around it);
//! here they are one. A span or a log record is passed as the argument tuple of
//! `OtlpExporter.record_span` / `record_log` together with the exporter it goes to, `(exporter,
//! arguments)`, or None when there is none to queue (the span sampled out, the line not sent over
//! OTLP).

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::line::{write_line, LineArgs};
use crate::metrics::{record_request_in, Family};
use crate::otlp::{events_weight, InlineFields, OtlpExporter, Tail};
use crate::proto::{put_bytes_field, Event, Span, Status};
use crate::value::{key_values, weight};

/// Keeps the first of several failures: every part is attempted even when one fails.
pub(crate) fn keep<T>(result: PyResult<T>, failure: &mut Option<PyErr>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(error) => {
            failure.get_or_insert(error);
            None
        }
    }
}

/// An ended span or a log record: the exporter that queues it and its `record_*` arguments.
type Ended<'py> = (PyRef<'py, OtlpExporter>, Bound<'py, PyTuple>);

/// A request line: its OTLP record as `record_log`'s arguments (the `logging` route), or the
/// line's own values for the core to write and queue (see `line.rs`).
#[derive(FromPyObject)]
pub enum Log<'py> {
    Line(LineArgs<'py>),
    Ended(Ended<'py>),
}

/// Queues `span`, when there is one.
fn queue_span(span: Option<&Ended<'_>>, failure: &mut Option<PyErr>) {
    if let Some((exporter, arguments)) = span {
        keep(exporter.record_span_args(arguments), failure);
    }
}

/// The end of one HTTP request: the server span queued (when given), `http_requests_total` and
/// `http_request_duration_seconds` recorded (when their families are given), and the request
/// line's log record queued (when given). Returns whether either metric folded a new label set
/// into its overflow series. A part that fails does not stop the others; the first failure is
/// raised once all were attempted.
///
/// `trace_id` and `span_id`, when non-zero, make the duration its bucket's exemplar (the caller
/// gives them only for a request whose trace is exported): the decision travels in this call.
#[pyfunction]
#[pyo3(signature = (
    span, requests, duration, method, route, status, seconds, log=None, trace_id=0, span_id=0,
))]
#[allow(clippy::too_many_arguments)]
pub fn end_request(
    py: Python<'_>,
    span: Option<Ended<'_>>,
    requests: Option<PyRef<'_, Family>>,
    duration: Option<PyRef<'_, Family>>,
    method: String,
    route: String,
    status: String,
    seconds: f64,
    log: Option<Log<'_>>,
    trace_id: u128,
    span_id: u64,
) -> PyResult<(bool, bool)> {
    let mut failure = None;
    queue_span(span.as_ref(), &mut failure);
    let overflowed = end_rest(
        py,
        log.as_ref(),
        requests.as_deref(),
        duration.as_deref(),
        method,
        route,
        status,
        seconds,
        trace_id,
        span_id,
        &mut failure,
    );
    failure.map_or(Ok(overflowed), Err)
}

/// What `end_request` does after the span: the request line written and queued (when given), and
/// the two request metrics recorded (when their families are given), failures kept in `failure`.
/// Also the end of a request whose span is the core's own (`span.rs`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn end_rest(
    py: Python<'_>,
    log: Option<&Log<'_>>,
    requests: Option<&Family>,
    duration: Option<&Family>,
    method: String,
    route: String,
    status: String,
    seconds: f64,
    trace_id: u128,
    span_id: u64,
    failure: &mut Option<PyErr>,
) -> (bool, bool) {
    match log {
        Some(Log::Line(line)) => {
            keep(write_line(py, line, &method, &route, &status, seconds), failure);
        }
        Some(Log::Ended((exporter, arguments))) => {
            keep(exporter.record_log_args(arguments), failure);
        }
        None => {}
    }
    let mut overflowed = (false, false);
    if let (Some(requests), Some(duration)) = (requests, duration) {
        let recorded = record_request_in(
            requests, duration, method, route, status, seconds, trace_id, span_id,
        );
        overflowed = keep(recorded, failure).unwrap_or_default();
    }
    overflowed
}

/// The end of one client call (a query, a Redis command): its span queued (when given) and its
/// duration observed in `family` under `labels` (when given), with `trace_id` and `span_id` as
/// its bucket's exemplar when non-zero. Returns whether the observation folded a new label set
/// into the overflow series; failures as `end_request`.
#[pyfunction]
#[pyo3(signature = (span, family, labels, seconds, trace_id=0, span_id=0))]
pub fn end_call(
    span: Option<Ended<'_>>,
    family: Option<PyRef<'_, Family>>,
    labels: Vec<String>,
    seconds: f64,
    trace_id: u128,
    span_id: u64,
) -> PyResult<bool> {
    let mut failure = None;
    queue_span(span.as_ref(), &mut failure);
    let overflowed = match &family {
        Some(family) => {
            keep(family.observe(labels, seconds, trace_id, span_id), &mut failure).unwrap_or(false)
        }
        None => false,
    };
    failure.map_or(Ok(overflowed), Err)
}

/// A client call's span prepared once per kind of call (a statement on a connection, a command
/// shape on a Redis pool): its scope, name, kind and fixed attributes already in their OTLP form,
/// cut at the limit of the exporter they were converted for. `end_prepared` ends a call of this
/// kind with the values that differ per call only, instead of the span's sixteen arguments and its
/// attribute dict converted again for every call.
#[pyclass(module = "cfk_otel._native", frozen)]
pub struct PreparedSpan {
    exporter: Py<OtlpExporter>,
    scope: usize,
    /// The kind's name, span kind and attributes in their protobuf encoding, made once: each
    /// call's span is queued with them shared, and the export copies them in (see `otlp.rs`).
    fixed: Arc<[u8]>,
    /// What a span of this kind keeps alive before its per-call parts (as `record_span` counts).
    weight: usize,
}

#[pymethods]
impl PreparedSpan {
    #[new]
    fn new(
        exporter: Bound<'_, OtlpExporter>,
        scope: usize,
        name: String,
        kind: i32,
        attributes: &Bound<'_, PyDict>,
    ) -> PyResult<Self> {
        let attributes = key_values(attributes, exporter.get().limit(), 0)?;
        let weight = 160 + name.len() + weight(&attributes);
        // The fields a span's derived encoding would write for these values (an empty name and
        // the unspecified kind are defaults, so not written).
        let mut fixed = Vec::new();
        if !name.is_empty() {
            put_bytes_field(5, name.as_bytes(), &mut fixed);
        }
        if kind != 0 {
            prost::encoding::int32::encode(6, &kind, &mut fixed);
        }
        prost::encoding::message::encode_repeated(9, &attributes, &mut fixed);
        Ok(Self {
            exporter: exporter.unbind(),
            scope,
            fixed: fixed.into(),
            weight,
        })
    }

    /// The exporter its attributes were converted for (and its spans are queued on).
    #[getter]
    fn exporter(&self, py: Python<'_>) -> Py<OtlpExporter> {
        self.exporter.clone_ref(py)
    }
}

/// The end of one prepared client call: its span, of `call`'s kind with these per-call values,
/// queued on `call`'s exporter, and `seconds` observed in `family` under `labels` (when given),
/// with the span's ids as its bucket's exemplar when `exemplar`. The span's flags, trace state
/// and status are as `record_span` takes them. Returns and fails as `end_call`.
#[pyfunction]
#[pyo3(signature = (
    call, trace_id, span_id, parent_span_id, flags, trace_state, start, end, status_code,
    status_message, events, dropped_events, family, labels, seconds, exemplar,
))]
#[allow(clippy::too_many_arguments)]
pub fn end_prepared(
    call: &Bound<'_, PreparedSpan>,
    trace_id: u128,
    span_id: u64,
    parent_span_id: u64,
    flags: u32,
    trace_state: String,
    start: u64,
    end: u64,
    status_code: i32,
    status_message: String,
    events: Option<Bound<'_, PyList>>,
    dropped_events: u32,
    family: Option<PyRef<'_, Family>>,
    labels: Vec<String>,
    seconds: f64,
    exemplar: bool,
) -> PyResult<bool> {
    let mut failure = None;
    let call = call.get();
    let exporter = call.exporter.get();
    if let Some(events) = keep(exporter.events(events.as_ref()), &mut failure) {
        let weight = events_weight(&events);
        let ids = Ids {
            trace_id,
            span_id,
            parent_span_id,
        };
        let status = Status {
            message: status_message,
            code: status_code,
        };
        let (mut span, ids) = call.span(ids, flags, trace_state, start, end, status, events);
        span.dropped_events_count = dropped_events;
        keep(call.push(span, ids, weight), &mut failure);
    }
    let overflowed = match &family {
        Some(family) => {
            let (trace_id, span_id) = if exemplar { (trace_id, span_id) } else { (0, 0) };
            keep(family.observe(labels, seconds, trace_id, span_id), &mut failure).unwrap_or(false)
        }
        None => false,
    };
    failure.map_or(Ok(overflowed), Err)
}

/// A span's ids, and its parent's (0: none).
pub(crate) struct Ids {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_span_id: u64,
}

impl PreparedSpan {
    /// A span of this kind with the values of one call, and its ids' fields (they and its kind's
    /// own fields are written after it: `push`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn span(
        &self,
        ids: Ids,
        flags: u32,
        trace_state: String,
        start: u64,
        end: u64,
        status: Status,
        events: Vec<Event>,
    ) -> (Span, InlineFields) {
        let span = Span {
            trace_id: Vec::new(),
            span_id: Vec::new(),
            trace_state,
            parent_span_id: Vec::new(),
            flags,
            name: String::new(),
            kind: 0,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events,
            dropped_events_count: 0,
            status: Some(status),
        };
        (
            span,
            InlineFields::ids(ids.trace_id, ids.span_id, ids.parent_span_id),
        )
    }

    /// Queues `span` and its `ids` (made by `span`) on this kind's exporter; `extra` is what its
    /// per-call parts keep alive beyond the kind's own weight (its events, say).
    pub(crate) fn push(&self, span: Span, ids: InlineFields, extra: usize) -> PyResult<()> {
        let weight = self.weight + span.trace_state.len() + extra;
        let weight = weight + span.status.as_ref().map_or(0, |status| status.message.len());
        let fixed = Tail::Shared(ids, Arc::clone(&self.fixed));
        self.exporter
            .get()
            .push_span_with(self.scope, span, fixed, weight)
    }
}
