//! The end of a request, and of a client call, in one crossing from Python.
//!
//! A request ends with up to three records: its server span, its two request metrics and its
//! request line's OTLP log record. Each used to be its own call (with its own Python around it);
//! here they are one. A span or a log record is passed as the argument tuple of
//! `OtlpExporter.record_span` / `record_log` together with the exporter it goes to, `(exporter,
//! arguments)`, or None when there is none to queue (the span sampled out, the line not sent over
//! OTLP).

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::line::{write_line, LineArgs};
use crate::metrics::{record_request_in, Family};
use crate::otlp::OtlpExporter;

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
