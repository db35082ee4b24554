//! Finished spans handed over by Python, and their OTLP encoding.

use prost::Message;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::time::Duration;

use crate::export::{Config, Exporter, Weighed};
use crate::proto::{
    Event, ExportTraceServiceRequest, InstrumentationScope, Resource, ResourceSpans, ScopeSpans, Span, Status,
};
use crate::value::{key_values, weight};

pub struct Finished {
    scope: usize,
    span: Span,
    weight: usize,
}

impl Weighed for Finished {
    fn weight(&self) -> usize {
        self.weight
    }
}

fn encode(resource: &Resource, scopes: &[InstrumentationScope], batch: Vec<Finished>) -> Vec<u8> {
    let mut by_scope: Vec<Vec<Span>> = vec![Vec::new(); scopes.len()];
    for finished in batch {
        by_scope[finished.scope].push(finished.span);
    }
    let scope_spans = scopes
        .iter()
        .zip(by_scope)
        .filter(|(_, spans)| !spans.is_empty())
        .map(|(scope, spans)| ScopeSpans {
            scope: Some(scope.clone()),
            spans,
            schema_url: String::new(),
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans,
            schema_url: String::new(),
        }],
    }
    .encode_to_vec()
}

/// Exports finished spans over OTLP/HTTP from a native thread.
///
/// One call per span (`record`), no Python objects kept: the span is converted to its OTLP form
/// at once and queued; batching, encoding, compression and retries happen off the GIL.
#[pyclass(module = "cfk_otel._native", frozen)]
pub struct SpanExporter {
    exporter: Exporter<Finished>,
    scopes: usize,
    limit: Option<usize>,
}

#[pymethods]
impl SpanExporter {
    #[new]
    #[pyo3(signature = (
        url, headers, resource, scopes, *, gzip=false, timeout=10.0, max_queue_size=2048,
        max_queue_bytes=16 << 20, max_export_batch_size=512, schedule_delay=5.0,
        max_retry_elapsed=300.0, attribute_value_length_limit=None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
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
    ) -> PyResult<Self> {
        let seconds = |s: f64| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX);
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
        let count = scopes.len();
        let exporter = Exporter::start(config, Box::new(move |batch| encode(&resource, &scopes, batch)))?;
        Ok(Self {
            exporter,
            scopes: count,
            limit: attribute_value_length_limit,
        })
    }

    /// Queues one finished span. `events` is a list of `(name, time_unix_nano, attributes)`.
    #[pyo3(signature = (
        scope, trace_id, span_id, parent_span_id, flags, trace_state, name, kind, start, end,
        attributes, events=None, status_code=0, status_message=String::new(),
    ))]
    #[allow(clippy::too_many_arguments)]
    fn record(
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
    ) -> PyResult<()> {
        if scope >= self.scopes {
            return Err(pyo3::exceptions::PyIndexError::new_err("no such scope"));
        }
        let attributes = key_values(attributes, self.limit, 0)?;
        let mut converted = Vec::new();
        if let Some(events) = events {
            for event in events.iter() {
                let (name, time, attrs): (String, u64, Bound<'_, PyDict>) = event.extract()?;
                converted.push(Event {
                    time_unix_nano: time,
                    name,
                    attributes: key_values(&attrs, self.limit, 0)?,
                    dropped_attributes_count: 0,
                });
            }
        }
        let weight = 160
            + name.len()
            + trace_state.len()
            + status_message.len()
            + weight(&attributes)
            + converted
                .iter()
                .map(|e: &Event| e.name.len() + 32 + weight(&e.attributes))
                .sum::<usize>();
        let span = Span {
            trace_id: trace_id.to_be_bytes().to_vec(),
            span_id: span_id.to_be_bytes().to_vec(),
            trace_state,
            parent_span_id: if parent_span_id == 0 {
                Vec::new()
            } else {
                parent_span_id.to_be_bytes().to_vec()
            },
            flags,
            name,
            kind,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes,
            dropped_attributes_count: 0,
            events: converted,
            dropped_events_count: 0,
            // Always present, as the SDK writes it (an empty message for an unset status).
            status: Some(Status {
                message: status_message,
                code: status_code,
            }),
        };
        self.exporter.push(Finished { scope, span, weight });
        Ok(())
    }

    /// Exports what is queued; False when `timeout` seconds passed first.
    fn force_flush(&self, py: Python<'_>, timeout: f64) -> bool {
        let timeout = Duration::try_from_secs_f64(timeout.max(0.0)).unwrap_or(Duration::MAX);
        py.detach(|| self.exporter.flush(timeout))
    }

    /// Exports what is queued within `timeout` seconds, then stops; what is left is dropped.
    fn shutdown(&self, py: Python<'_>, timeout: f64) -> bool {
        let timeout = Duration::try_from_secs_f64(timeout.max(0.0)).unwrap_or(Duration::MAX);
        py.detach(|| self.exporter.shutdown(timeout))
    }

    /// The counters: accepted, exported, dropped (queue full, export failed), rejected, failed
    /// attempts, what is queued now (items and bytes), and the last error in words.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        use std::sync::atomic::Ordering::Relaxed;
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
