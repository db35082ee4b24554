//! The server span of an HTTP request as an object of the core: one call when the request starts
//! (`ServerSpans.start`: the ids, set-up's head sampler's decision, the parent's trace state),
//! one when it ends (`ServerSpan.end_request`: the span's own attributes read from the ASGI
//! scope, the span queued, the request metrics and the request line recorded).
//!
//! In between it is the span the app sees (`trace.get_current_span()`): Python registers the
//! class as a virtual subclass of `opentelemetry.trace.Span`, and it behaves as `CoreSpan` does
//! (a sampled-out one as the SDK's `NonRecordingSpan`). What the app adds goes through the SDK's
//! own `BoundedAttributes` with the span limits; the rarely used parts of the API (an exception's
//! event, a status's rules, the warnings) call the seam's Python helpers (`cfk_otel/_core/seam.py`,
//! the same rules as `CoreSpan`'s; `tests/test_server_span.py` holds the two to the SDK's span).
//!
//! Used only in the default set-up: the provider's sampler is set-up's own (`sampling.HEAD`), no
//! keeper of sampled-out traces, no processor added by the app; `start` answers None whenever
//! that stopped holding (the caller then takes the general path, `Spans.start`).

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyString, PyTuple};

use crate::line::own_span;
use crate::metrics::Family;
use crate::otlp::{span_weight, OtlpExporter, Tail};
use crate::proto::{put_bytes_field, put_span_ids, Event, Span, Status};
use crate::request::{end_rest, keep, Log};
use crate::value::{encode_attribute, key_values, Limit};

/// OTLP's span flags as the SDK's encoder writes them: "is the parent remote" is known.
pub(crate) const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;
/// OTLP's `SPAN_KIND_SERVER`.
const SERVER: i32 = 2;
const SAMPLED: u8 = 1;
/// The low 64 bits of a trace id, which the ratio samplers compare with their bound.
const TRACE_ID_LIMIT: u128 = (1 << 64) - 1;
/// What the route resolver names a request that matched no route (`cfk_otel._asgi.routes`).
const UNMATCHED: &str = "unmatched";

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Random ids, as the SDK's `RandomIdGenerator` makes them (uniform, never 0): SplitMix64 over
/// a counter seeded from the OS, the process id and the clock. A `ServerSpans` (and so its
/// generator) is made anew in each process: a fork moves the seam's generation, and a forked
/// child's first request builds its own.
struct Ids {
    state: AtomicU64,
}

impl Ids {
    fn new() -> Self {
        let mut seed = [0u8; 8];
        let from_os = File::open("/dev/urandom")
            .and_then(|mut file| file.read_exact(&mut seed))
            .is_ok();
        let mut state = u64::from_ne_bytes(seed);
        if !from_os {
            state ^= splitmix(now_ns());
        }
        state ^= splitmix(u64::from(std::process::id()) << 32 | 0x5bd1_e995);
        Ids {
            state: AtomicU64::new(splitmix(state)),
        }
    }

    fn next(&self) -> u64 {
        splitmix(self.state.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed))
    }

    fn trace_id(&self) -> u128 {
        loop {
            let id = u128::from(self.next()) << 64 | u128::from(self.next());
            if id != 0 {
                return id;
            }
        }
    }

    fn span_id(&self) -> u64 {
        loop {
            let id = self.next();
            if id != 0 {
                return id;
            }
        }
    }
}

/// Starts the server spans of one middleware's HTTP requests while the set-up it was made for
/// holds (see the module's documentation). Made by `cfk_otel._core.seam.Spans`.
#[pyclass(module = "cfk_otel._native", frozen)]
pub struct ServerSpans {
    seam: Py<PyModule>,
    sampling: Py<PyModule>,
    exporter: Py<OtlpExporter>,
    get_current_span: Py<PyAny>,
    generation: Py<PyList>,
    made_at: i64,
    head: Py<PyAny>,
    bound: u128,
    parent_based: bool,
    /// The provider's id generator when it is not exactly the SDK's `RandomIdGenerator` (then
    /// it is asked for each id), and the generator it was made with.
    id_generator: Py<PyAny>,
    python_ids: bool,
    ids: Ids,
    /// W3C's random-trace-id flag as the installed API has it (0: none), and whether a new
    /// trace's id is random (`is_trace_id_random`).
    random_bit: u8,
    root_random: bool,
    /// The `TraceFlags` objects for flags 0 to 3, `SpanKind.SERVER`, the unset status, the
    /// span limits, the SDK's `BoundedAttributes`.
    flags: Py<PyTuple>,
    kind: Py<PyAny>,
    unset: Py<PyAny>,
    limits: Py<PyAny>,
    bounded: Py<PyAny>,
    scrub_url: Py<PyAny>,
    warning: Py<PyAny>,
}

impl ServerSpans {
    /// Whether the set-up this was made for still holds; else `start` leaves the span to
    /// `Spans.start` (which makes a new `ServerSpans` when it applies).
    fn holds(&self, py: Python<'_>) -> PyResult<bool> {
        let generation = self.generation.bind(py).get_item(0)?.extract::<i64>()?;
        if generation != self.made_at {
            return Ok(false);
        }
        // The global provider is not asked again: this was made for the SDK's provider that
        // `get_tracer_provider()` answered (or one given to the middleware), and the API sets
        // the global provider once (`set_tracer_provider` refuses a second).
        // The provider's sampler and id generator are fixed when it is made (the SDK's public
        // API changes neither): checked once, by `seam.server_spans`. Set-up's own sampler and
        // keeper are the process's, and may change.
        let sampling = self.sampling.bind(py);
        Ok(
            sampling.getattr(intern!(py, "HEAD"))?.as_ptr() == self.head.as_ptr()
                && sampling.getattr(intern!(py, "KEEPER"))?.is_none(),
        )
    }
}

#[pymethods]
impl ServerSpans {
    #[new]
    #[pyo3(signature = (
        seam, exporter, provider, head, bound, parent_based, python_ids, root_random,
        random_bit, limits,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        seam: Bound<'_, PyModule>,
        exporter: Py<OtlpExporter>,
        provider: Bound<'_, PyAny>,
        head: Bound<'_, PyAny>,
        bound: u128,
        parent_based: bool,
        python_ids: bool,
        root_random: bool,
        random_bit: u8,
        limits: Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let trace = py.import("opentelemetry.trace")?;
        let generation = seam.getattr("_GENERATION")?.cast_into::<PyList>()?;
        let made_at = generation.get_item(0)?.extract::<i64>()?;
        let flags = seam.getattr("_server_flags")?.call0()?.cast_into::<PyTuple>()?;
        if flags.len() != 4 {
            return Err(PyValueError::new_err("four trace flags expected"));
        }
        Ok(ServerSpans {
            sampling: seam.getattr("_sampling")?.cast_into::<PyModule>()?.unbind(),
            exporter,
            get_current_span: trace.getattr("get_current_span")?.unbind(),
            generation: generation.unbind(),
            made_at,
            head: head.unbind(),
            bound,
            parent_based,
            id_generator: provider.getattr("id_generator")?.unbind(),
            python_ids,
            ids: Ids::new(),
            random_bit,
            root_random,
            flags: flags.unbind(),
            kind: trace.getattr("SpanKind")?.getattr("SERVER")?.unbind(),
            unset: seam.getattr("_UNSET")?.unbind(),
            limits: limits.unbind(),
            bounded: seam.getattr("BoundedAttributes")?.unbind(),
            scrub_url: seam.getattr("scrub_url")?.unbind(),
            warning: seam.getattr("_log")?.getattr("warning")?.unbind(),
            seam: seam.unbind(),
        })
    }

    /// The server span of a request named `name` whose parent is in `parent` (None: the
    /// current context; the caller's own current context, when empty, is not looked into), or
    /// None when the set-up this was made for no longer holds. Decides
    /// as `Spans._start_native` does with set-up's own sampler (`sampling.Head.sample`).
    /// A failure (a custom id generator's, say) answers None too: `Spans.start` then meets it
    /// under its guard, which says so once.
    #[pyo3(signature = (name, parent=None))]
    fn start(
        slf: &Bound<'_, Self>,
        name: String,
        parent: Option<Bound<'_, PyAny>>,
    ) -> Option<Py<ServerSpan>> {
        Self::begin(slf, name, parent).unwrap_or(None)
    }
}

impl ServerSpans {
    fn begin(
        slf: &Bound<'_, Self>,
        name: String,
        parent: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Option<Py<ServerSpan>>> {
        let py = slf.py();
        let this = slf.get();
        if !this.holds(py)? {
            return Ok(None);
        }
        // An empty context (most requests': no incoming trace, nothing current) has no span.
        let empty = parent
            .as_ref()
            .is_some_and(|parent| parent.cast::<PyDict>().is_ok_and(|context| context.is_empty()));
        let context = if empty {
            py.None().into_bound(py)
        } else {
            let current = this.get_current_span.call1(py, (parent,))?;
            current.bind(py).call_method0(intern!(py, "get_span_context"))?
        };
        let valid = !context.is_none() && context.getattr(intern!(py, "is_valid"))?.is_truthy()?;
        let generator = this.id_generator.bind(py);
        let span_id = if this.python_ids {
            generator
                .call_method0(intern!(py, "generate_span_id"))?
                .extract::<u64>()?
        } else {
            this.ids.span_id()
        };
        let (trace_id, random, sampled, parent) = if valid {
            let trace_id = context.getattr(intern!(py, "trace_id"))?.extract::<u128>()?;
            let flags = context.getattr(intern!(py, "trace_flags"))?.extract::<u8>()?;
            let sampled = if this.parent_based {
                flags & SAMPLED != 0
            } else {
                trace_id & TRACE_ID_LIMIT < this.bound
            };
            let span_id = context.getattr(intern!(py, "span_id"))?.extract::<u64>()?;
            let remote = context.getattr(intern!(py, "is_remote"))?.is_truthy()?;
            let state = context.getattr(intern!(py, "trace_state"))?;
            let parent = Parent {
                context: context.unbind(),
                span_id,
                remote,
                trace_state: (!state.is_none()).then(|| state.unbind()),
            };
            (trace_id, flags & this.random_bit != 0, sampled, Some(parent))
        } else {
            let (trace_id, random) = if this.python_ids {
                let trace_id = generator
                    .call_method0(intern!(py, "generate_trace_id"))?
                    .extract::<u128>()?;
                let random = this.random_bit != 0
                    && generator
                        .call_method0(intern!(py, "is_trace_id_random"))?
                        .is_truthy()?;
                (trace_id, random)
            } else {
                (this.ids.trace_id(), this.root_random)
            };
            (trace_id, random, trace_id & TRACE_ID_LIMIT < this.bound, None)
        };
        let flags = u8::from(sampled) | if random { this.random_bit } else { 0 };
        let span = ServerSpan {
            home: slf.clone().unbind(),
            trace_id,
            span_id,
            flags,
            sampled,
            parent,
            context: None,
            name,
            start_time: now_ns(),
            end_time: None,
            own: Vec::new(),
            extra: None,
            events: None,
            dropped_events: 0,
            status: None,
        };
        Ok(Some(Py::new(py, span)?))
    }
}

/// A client span's ids and head decision, from the server span it starts under
/// (`ServerSpan::child`).
pub(crate) struct Child {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
    pub parent_span_id: u64,
    pub trace_state: String,
}

/// A valid parent: its context (what `parent` answers) and the parts the export needs.
struct Parent {
    context: Py<PyAny>,
    span_id: u64,
    remote: bool,
    trace_state: Option<Py<PyAny>>,
}

/// One HTTP request's server span (see the module's documentation). A sampled-out one records
/// nothing, as the SDK's `NonRecordingSpan`.
#[pyclass(module = "cfk_otel._native")]
pub struct ServerSpan {
    home: Py<ServerSpans>,
    #[pyo3(get)]
    trace_id: u128,
    #[pyo3(get)]
    span_id: u64,
    /// W3C trace flags: sampled, and the random-trace-id bit where the API has it.
    #[pyo3(get)]
    flags: u8,
    /// Set-up's head sampler's decision; with it, whether the span records at all.
    #[pyo3(get)]
    sampled: bool,
    parent: Option<Parent>,
    context: Option<Py<PyAny>>,
    #[pyo3(get)]
    name: String,
    #[pyo3(get)]
    start_time: u64,
    #[pyo3(get)]
    end_time: Option<u64>,
    /// cfk_otel's own attributes (set by `end_request`), and the app's in the SDK's
    /// `BoundedAttributes` (made at the first).
    own: Vec<(&'static str, Py<PyAny>)>,
    extra: Option<Py<PyAny>>,
    /// `(name, time, attributes)` of each event, as `CoreSpan.events`.
    events: Option<Py<PyList>>,
    #[pyo3(get)]
    dropped_events: u32,
    /// None: unset.
    status: Option<Py<PyAny>>,
}

/// Says `message` in cfk_otel's log, as the SDK's span does (never while the span is borrowed:
/// a log handler may ask the current span for its context).
fn warn(py: Python<'_>, home: &Py<ServerSpans>, message: &str) -> PyResult<()> {
    home.get().warning.call1(py, (message,))?;
    Ok(())
}

/// `scope[key]` when there, else None (a scope is a dict).
fn get<'py>(scope: &Bound<'py, PyDict>, key: &Bound<'py, PyString>) -> PyResult<Option<Bound<'py, PyAny>>> {
    scope.get_item(key)
}

/// Text decoded as latin-1, as the ASGI header values are.
fn latin1(value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    let py = value.py();
    if let Ok(bytes) = value.cast::<PyBytes>() {
        let text: String = bytes.as_bytes().iter().map(|&b| char::from(b)).collect();
        return Ok(PyString::new(py, &text).into_any().unbind());
    }
    Ok(value.call_method1(intern!(py, "decode"), ("latin-1",))?.unbind())
}

impl ServerSpan {
    fn recording(&self) -> bool {
        self.sampled && self.end_time.is_none()
    }

    fn limit<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        self.home.get().limits.bind(py).getattr(name)
    }

    /// Ours first, then the app's while the span's attribute limit allows; and how many of the
    /// app's were dropped (as `CoreSpan._merged`).
    fn merged<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyDict>, u32)> {
        let merged = PyDict::new(py);
        for (key, value) in &self.own {
            merged.set_item(*key, value.bind(py))?;
        }
        let Some(extra) = &self.extra else {
            return Ok((merged, 0));
        };
        let extra = extra.bind(py);
        let limit: Option<usize> = self.limit(py, "max_span_attributes")?.extract()?;
        let mut dropped: u32 = extra.getattr("dropped")?.extract()?;
        for item in extra.call_method0("items")?.try_iter()? {
            let (key, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
            if merged.contains(&key)? || limit.is_none_or(|limit| merged.len() < limit) {
                merged.set_item(key, value)?;
            } else {
                dropped += 1;
            }
        }
        Ok((merged, dropped))
    }

    /// The span's own attributes from the ASGI scope, as the middleware's `_finish` sets them.
    fn read_scope(
        &mut self,
        scope: &Bound<'_, PyDict>,
        method: &Bound<'_, PyString>,
        route: &Bound<'_, PyString>,
        matched: bool,
        status: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let py = scope.py();
        let home = self.home.get();
        let mut own: Vec<(&'static str, Py<PyAny>)> = Vec::with_capacity(10);
        own.push(("http.request.method", method.clone().into_any().unbind()));
        let path = match get(scope, intern!(py, "path"))? {
            Some(path) => path,
            None => PyString::new(py, "").into_any(),
        };
        // An absolute-form target (GET http://user:pw@host/...) loses its userinfo.
        let plain = path
            .cast::<PyString>()
            .is_ok_and(|text| text.to_str().is_ok_and(|t| !t.contains('@')));
        let path = if plain {
            path
        } else {
            home.scrub_url.bind(py).call1((path,))?
        };
        own.push(("url.path", path.unbind()));
        let scheme =
            get(scope, intern!(py, "scheme"))?.unwrap_or_else(|| PyString::new(py, "http").into_any());
        own.push(("url.scheme", scheme.unbind()));
        let version =
            get(scope, intern!(py, "http_version"))?.unwrap_or_else(|| PyString::new(py, "1.1").into_any());
        own.push(("network.protocol.version", version.unbind()));
        if matched {
            own.push(("http.route", route.clone().into_any().unbind()));
        }
        if status.is_truthy()? {
            own.push(("http.response.status_code", status.clone().unbind()));
        }
        if let Some(server) = get(scope, intern!(py, "server"))? {
            if server.is_truthy()? {
                own.push(("server.address", server.get_item(0)?.unbind()));
                let port = server.get_item(1)?;
                if !port.is_none() {
                    own.push(("server.port", port.unbind()));
                }
            }
        }
        if let Some(client) = get(scope, intern!(py, "client"))? {
            if client.is_truthy()? {
                own.push(("client.address", client.get_item(0)?.unbind()));
            }
        }
        if let Some(headers) = get(scope, intern!(py, "headers"))? {
            if headers.is_truthy()? {
                for item in headers.try_iter()? {
                    let (key, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
                    let found = match key.cast::<PyBytes>() {
                        Ok(bytes) => bytes.as_bytes() == b"user-agent",
                        Err(_) => key.eq(PyBytes::new(py, b"user-agent"))?,
                    };
                    if found {
                        own.push(("user_agent.original", latin1(&value)?));
                        break;
                    }
                }
            }
        }
        self.own = own;
        Ok(())
    }

    /// The ended span in OTLP form, for the exporter's queue.
    fn otlp(&self, py: Python<'_>, limit: Option<Limit>) -> PyResult<(Span, Tail)> {
        // The ids, the name and (the usual case: only the span's own) the attributes are encoded
        // straight from their values into the tail, the `Span` left without them.
        let mut tail = Vec::with_capacity(64 + 48 * self.own.len());
        let (attributes, dropped) = if self.extra.is_none() {
            for (key, value) in &self.own {
                encode_attribute(9, key, value.bind(py), limit, &mut tail)?;
            }
            (Vec::new(), 0)
        } else {
            let (merged, dropped) = self.merged(py)?;
            (key_values(&merged, limit, 0)?, dropped)
        };
        let mut events = Vec::new();
        if let Some(list) = &self.events {
            for event in list.bind(py).iter() {
                let (name, time, attrs): (String, u64, Bound<'_, PyDict>) = event.extract()?;
                events.push(Event {
                    time_unix_nano: time,
                    name,
                    attributes: key_values(&attrs, limit, 0)?,
                    dropped_attributes_count: 0,
                });
            }
        }
        let (code, message) = match &self.status {
            None => (0, String::new()),
            Some(status) => {
                let status = status.bind(py);
                let code = status
                    .getattr("status_code")?
                    .getattr("value")?
                    .extract::<i32>()?;
                let description = status.getattr("description")?;
                let message = if description.is_truthy()? {
                    description.extract::<String>()?
                } else {
                    String::new()
                };
                (code, message)
            }
        };
        let (parent_span_id, remote) = self.parent.as_ref().map_or((0, false), |p| (p.span_id, p.remote));
        put_span_ids(self.trace_id, self.span_id, parent_span_id, &mut tail);
        if !self.name.is_empty() {
            put_bytes_field(5, self.name.as_bytes(), &mut tail);
        }
        let span = Span {
            trace_id: Vec::new(),
            span_id: Vec::new(),
            trace_state: self.trace_state_header(py)?,
            parent_span_id: Vec::new(),
            flags: if remote {
                HAS_IS_REMOTE | IS_REMOTE
            } else {
                HAS_IS_REMOTE
            },
            name: String::new(),
            kind: SERVER,
            start_time_unix_nano: self.start_time,
            end_time_unix_nano: self.end_time.unwrap_or(self.start_time),
            attributes,
            dropped_attributes_count: dropped,
            events,
            dropped_events_count: self.dropped_events,
            status: Some(Status { message, code }),
        };
        Ok((span, Tail::Own(tail)))
    }

    /// The parent's trace state as its header (`key=value,...`; empty when it has none).
    fn trace_state_header(&self, py: Python<'_>) -> PyResult<String> {
        match self.parent.as_ref().and_then(|p| p.trace_state.as_ref()) {
            Some(state) if state.bind(py).is_truthy()? => state
                .bind(py)
                .call_method0(intern!(py, "to_header"))?
                .extract::<String>(),
            _ => Ok(String::new()),
        }
    }

    /// What a client span started under this one takes from it (`call.rs`): the trace id, a new
    /// span id (as this span's were made), the head decision (the parent-based sampler's: this
    /// span's), this span's id as the parent's, and the trace state's header.
    pub(crate) fn child(&self, py: Python<'_>) -> PyResult<Child> {
        let home = self.home.get();
        let span_id = if home.python_ids {
            home.id_generator
                .bind(py)
                .call_method0(intern!(py, "generate_span_id"))?
                .extract::<u64>()?
        } else {
            home.ids.span_id()
        };
        Ok(Child {
            trace_id: self.trace_id,
            span_id,
            sampled: self.sampled,
            parent_span_id: self.span_id,
            trace_state: self.trace_state_header(py)?,
        })
    }

    /// Queues the ended span (sampled: the only ones that record).
    fn queue(&self, py: Python<'_>) -> PyResult<()> {
        let exporter = self.home.get().exporter.get();
        let (span, tail) = self.otlp(py, exporter.limit())?;
        let weight = span_weight(&span) + tail.len();
        exporter.push_span_with(0, span, tail, weight)
    }

    /// The exemplar's ids: the span's when its trace is exported (`sampling.ids_for_exemplar`).
    fn exemplar(&self, py: Python<'_>) -> PyResult<(u128, u64)> {
        let sampling = self.home.get().sampling.bind(py);
        if self.sampled {
            let exported = sampling.getattr(intern!(py, "EXPORTED"))?.is_truthy()?;
            return Ok(if exported {
                (self.trace_id, self.span_id)
            } else {
                (0, 0)
            });
        }
        if sampling.getattr(intern!(py, "KEEPER"))?.is_none() {
            return Ok((0, 0));
        }
        sampling
            .getattr("ids_for_exemplar")?
            .call1((self.trace_id, self.span_id, false, true))?
            .extract()
    }
}

#[pymethods]
impl ServerSpan {
    /// The span's `SpanContext`, made at the first call (the seam's `SpanContext`).
    fn get_span_context(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if let Some(context) = &self.context {
            return Ok(context.clone_ref(py));
        }
        let home = self.home.get();
        let kwargs = PyDict::new(py);
        kwargs.set_item("is_remote", false)?;
        kwargs.set_item(
            "trace_flags",
            home.flags.bind(py).get_item(usize::from(self.flags & 3))?,
        )?;
        kwargs.set_item(
            "trace_state",
            self.parent
                .as_ref()
                .and_then(|p| p.trace_state.as_ref().map(|s| s.clone_ref(py))),
        )?;
        let context = home
            .seam
            .bind(py)
            .getattr(intern!(py, "SpanContext"))?
            .call((self.trace_id, self.span_id), Some(&kwargs))?
            .unbind();
        self.context = Some(context.clone_ref(py));
        Ok(context)
    }

    /// The span's context, as the SDK's span has it.
    #[getter]
    fn context(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.get_span_context(py)
    }

    /// The parent's `SpanContext` (None for a root).
    #[getter]
    fn parent(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.parent.as_ref().map(|p| p.context.clone_ref(py))
    }

    #[getter]
    fn kind(&self, py: Python<'_>) -> Py<PyAny> {
        self.home.get().kind.clone_ref(py)
    }

    #[getter]
    fn status(&self, py: Python<'_>) -> Py<PyAny> {
        match &self.status {
            Some(status) => status.clone_ref(py),
            None => self.home.get().unset.clone_ref(py),
        }
    }

    #[getter]
    fn events(&self, py: Python<'_>) -> Py<PyList> {
        match &self.events {
            Some(events) => events.clone_ref(py),
            None => PyList::empty(py).unbind(),
        }
    }

    /// Ours and the app's, as exported.
    #[getter]
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        Ok(self.merged(py)?.0)
    }

    /// `(trace_id, span_id)` for an exemplar, or `(0, 0)` when its trace is not exported
    /// (as `CoreSpan.exemplar_ids`, without making the span's context).
    fn exemplar_ids(&self, py: Python<'_>) -> PyResult<(u128, u64)> {
        self.exemplar(py)
    }

    fn is_recording(&self) -> bool {
        self.recording()
    }

    fn set_attribute(slf: &Bound<'_, Self>, key: Bound<'_, PyAny>, value: Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let (home, extra) = {
            let this = slf.borrow();
            if !this.sampled {
                return Ok(());
            }
            let home = this.home.clone_ref(py);
            if this.end_time.is_some() {
                drop(this);
                return warn(py, &home, "Setting attribute on ended span.");
            }
            (home, this.extra.as_ref().map(|extra| extra.clone_ref(py)))
        };
        let extra = match extra {
            Some(extra) => extra.into_bound(py),
            None => {
                let home = home.get();
                let limits = home.limits.bind(py);
                let kwargs = PyDict::new(py);
                kwargs.set_item("max_value_len", limits.getattr("max_attribute_length")?)?;
                kwargs.set_item("immutable", false)?;
                let extra = home
                    .bounded
                    .bind(py)
                    .call((limits.getattr("max_span_attributes")?,), Some(&kwargs))?;
                slf.borrow_mut().extra = Some(extra.clone().unbind());
                extra
            }
        };
        // Outside the span's borrow: cleaning a value may log, and a log handler may ask the
        // current span (this one) for its context.
        extra.set_item(key, value)
    }

    fn set_attributes(slf: &Bound<'_, Self>, attributes: Bound<'_, PyAny>) -> PyResult<()> {
        for item in attributes.call_method0("items")?.try_iter()? {
            let (key, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
            Self::set_attribute(slf, key, value)?;
        }
        Ok(())
    }

    #[pyo3(signature = (name, attributes=None, timestamp=None))]
    fn add_event(
        slf: &Bound<'_, Self>,
        name: String,
        attributes: Option<Bound<'_, PyAny>>,
        timestamp: Option<u64>,
    ) -> PyResult<()> {
        let py = slf.py();
        let home = {
            let mut this = slf.borrow_mut();
            if !this.recording() {
                return Ok(());
            }
            let max_events: Option<usize> = this.limit(py, "max_events")?.extract()?;
            let count = this.events.as_ref().map_or(0, |events| events.bind(py).len());
            if max_events.is_some_and(|max| count >= max) {
                this.dropped_events += 1;
                return Ok(());
            }
            this.home.clone_ref(py)
        };
        let home = home.get();
        let limits = home.limits.bind(py);
        let kwargs = PyDict::new(py);
        kwargs.set_item("max_value_len", limits.getattr("max_attribute_length")?)?;
        kwargs.set_item("immutable", true)?;
        let bounded = home.bounded.bind(py).call(
            (limits.getattr("max_event_attributes")?, attributes),
            Some(&kwargs),
        )?;
        let attributes = py.get_type::<PyDict>().call1((bounded,))?;
        let time = timestamp.filter(|&t| t != 0).unwrap_or_else(now_ns);
        let event = (name, time, attributes);
        let mut this = slf.borrow_mut();
        if !this.recording() {
            return Ok(()); // ended while its attributes were cleaned
        }
        match &this.events {
            Some(events) => events.bind(py).append(event)?,
            None => this.events = Some(PyList::new(py, [event])?.unbind()),
        }
        Ok(())
    }

    #[pyo3(signature = (context, attributes=None))]
    fn add_link(
        &self,
        py: Python<'_>,
        context: Bound<'_, PyAny>,
        attributes: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let _ = (context, attributes);
        if !self.sampled {
            return Ok(());
        }
        let seam = self.home.get().seam.clone_ref(py);
        seam.bind(py).getattr("_link_added")?.call0()?;
        Ok(())
    }

    fn update_name(&mut self, name: String) {
        if self.recording() {
            self.name = name;
        }
    }

    #[pyo3(signature = (status, description=None))]
    fn set_status(
        slf: &Bound<'_, Self>,
        status: Bound<'_, PyAny>,
        description: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let (home, current) = {
            let this = slf.borrow();
            if !this.recording() {
                return Ok(());
            }
            (this.home.clone_ref(py), this.status(py))
        };
        // A status made here may log (a description without ERROR): outside the borrow.
        let next = home
            .get()
            .seam
            .bind(py)
            .getattr("_next_status")?
            .call1((current, status, description))?;
        let mut this = slf.borrow_mut();
        if this.recording() {
            this.status = Some(next.unbind());
        }
        Ok(())
    }

    #[pyo3(signature = (exception, attributes=None, timestamp=None, escaped=false))]
    fn record_exception(
        slf: &Bound<'_, Self>,
        exception: Bound<'_, PyAny>,
        attributes: Option<Bound<'_, PyAny>>,
        timestamp: Option<u64>,
        escaped: bool,
    ) -> PyResult<()> {
        let py = slf.py();
        let home = {
            let this = slf.borrow();
            if !this.recording() {
                return Ok(());
            }
            this.home.clone_ref(py)
        };
        let event = home
            .get()
            .seam
            .bind(py)
            .getattr("_exception_event")?
            .call1((exception, attributes, escaped))?;
        Self::add_event(slf, "exception".to_owned(), Some(event), timestamp)
    }

    /// Ends the span and queues it (sampled), without the request's attributes, metrics or
    /// line: the app ending the span it was given. A failure is logged, never raised.
    #[pyo3(signature = (end_time=None))]
    fn end(slf: &Bound<'_, Self>, end_time: Option<u64>) -> PyResult<()> {
        let py = slf.py();
        let mut this = slf.borrow_mut();
        if !this.sampled {
            return Ok(());
        }
        let home = this.home.clone_ref(py);
        if this.end_time.is_some() {
            drop(this);
            return warn(py, &home, "Calling end() on an ended span.");
        }
        this.end_time = Some(end_time.filter(|&t| t != 0).unwrap_or_else(now_ns));
        let queued = this.queue(py);
        drop(this);
        if let Err(error) = queued {
            let seam = home.get().seam.bind(py);
            seam.getattr("_span_failed")?.call1((error.into_value(py),))?;
        }
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(slf: &Bound<'_, Self>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        Self::end(slf, None)?;
        Ok(false)
    }

    /// The end of the HTTP request in one call: the span's own attributes read from `scope`,
    /// its name `"{method} {route}"` (a matched route), the span ended and queued (sampled),
    /// and as `end_request` does, the request line (`log`) and the two request metrics (when
    /// their families are given), the span's ids as the duration's exemplar when its trace is
    /// exported. A part that fails does not stop the others; the first failure is handed to
    /// the seam's `_end_failed` (logged once, never raised into the app) once all were
    /// attempted. Returns whether either metric folded a new label set into its overflow
    /// series.
    #[pyo3(signature = (scope, method, route, status, seconds, requests=None, duration=None, log=None))]
    #[allow(clippy::too_many_arguments)]
    fn end_request(
        slf: &Bound<'_, Self>,
        scope: &Bound<'_, PyAny>,
        method: &Bound<'_, PyString>,
        route: &Bound<'_, PyString>,
        status: &Bound<'_, PyAny>,
        seconds: f64,
        requests: Option<PyRef<'_, Family>>,
        duration: Option<PyRef<'_, Family>>,
        log: Option<Log<'_>>,
    ) -> PyResult<(bool, bool)> {
        let py = slf.py();
        let mut failure = None;
        let method_text = method.to_string_lossy().into_owned();
        let route_text = route.to_string_lossy().into_owned();
        let (home, ended_before, (trace_id, span_id), log) = {
            let mut this = slf.borrow_mut();
            let log = match log {
                Some(Log::Line(line)) => {
                    Some(Log::Line(own_span(line, this.trace_id, this.span_id, this.flags)))
                }
                other => other,
            };
            let ended_before = this.sampled && this.end_time.is_some();
            if this.sampled && !ended_before {
                let matched = route_text != UNMATCHED;
                let read = scope
                    .cast::<PyDict>()
                    .map_err(PyErr::from)
                    .and_then(|scope| this.read_scope(scope, method, route, matched, status));
                keep(read, &mut failure);
                if matched {
                    this.name = format!("{method_text} {route_text}");
                }
                this.end_time = Some(now_ns());
                keep(this.queue(py), &mut failure);
            }
            let ids = keep(this.exemplar(py), &mut failure).unwrap_or((0, 0));
            (this.home.clone_ref(py), ended_before, ids, log)
        };
        if ended_before {
            keep(warn(py, &home, "Calling end() on an ended span."), &mut failure);
        }
        // str(status), without a Python str for the usual exact int.
        let exact = status
            .is_exact_instance_of::<PyInt>()
            .then(|| status.extract::<i64>().ok())
            .flatten();
        let status_text = match exact {
            Some(code) => code.to_string(),
            None => match status.str() {
                Ok(text) => text.to_string(),
                Err(error) => {
                    failure.get_or_insert(error);
                    String::new()
                }
            },
        };
        let overflowed = end_rest(
            py,
            log.as_ref(),
            requests.as_deref(),
            duration.as_deref(),
            method_text,
            route_text,
            status_text,
            seconds,
            trace_id,
            span_id,
            &mut failure,
        );
        if let Some(error) = failure {
            let seam = home.get().seam.bind(py);
            seam.getattr("_end_failed")?.call1((error.into_value(py),))?;
        }
        Ok(overflowed)
    }

    fn __repr__(&self) -> String {
        format!(
            "ServerSpan(name={:?}, trace_id={:032x}, span_id={:016x}, sampled={})",
            self.name, self.trace_id, self.span_id, self.sampled
        )
    }
}

/// The `send` an HTTP request's app is given: notes the response's status and returns the
/// server's own `send(message)`, without a coroutine of ours in between.
#[pyclass(module = "cfk_otel._native")]
pub struct Sender {
    send: Py<PyAny>,
    /// The `http.response.start` message's status (0: none yet).
    #[pyo3(get)]
    status: Py<PyAny>,
}

#[pymethods]
impl Sender {
    #[new]
    fn new(py: Python<'_>, send: Py<PyAny>) -> Self {
        Sender {
            send,
            status: 0i32
                .into_pyobject(py)
                .map_or_else(|_| py.None(), |zero| zero.into_any().unbind()),
        }
    }

    fn __call__(&mut self, py: Python<'_>, message: Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        if let Ok(dict) = message.cast::<PyDict>() {
            if let Some(kind) = dict.get_item(intern!(py, "type"))? {
                if kind.eq(intern!(py, "http.response.start"))? {
                    if let Some(status) = dict.get_item(intern!(py, "status"))? {
                        self.status = status.unbind();
                    }
                }
            }
        }
        self.send.call1(py, (message,))
    }
}
