//! A client call timed in the core: what an instrumented asyncpg query or redis command returns
//! when it runs under the core's server span (`cfk_otel/_instrumentation/db.py`).
//!
//! `TimedCall` is the awaitable in place of the call's own. Each step passes through to the
//! call's coroutine in one C call (`PyIter_Send`), with no Python frame of ours around it. When
//! the call returns, its client span (a child of the server span, a prepared kind's name and
//! attributes: `PreparedSpan`) is queued and its duration observed in its histogram, in the same
//! step. A call that fails, or one slower than the slow-query threshold, ends in Python instead
//! (`CallTimer.fallback`): the exception event, the status and the slow-query report are the
//! instrumentation's, made there on a span with these ids and this start.
//!
//! Nothing here reaches the app's call: a failure of our own is handed to the seam's guard.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyException, PyRuntimeError, PyStopAsyncIteration, PyStopIteration};
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;

use crate::metrics::Family;
use crate::proto::Status;
use crate::request::{keep, Ids, PreparedSpan};
use crate::span::{now_ns, Child, ServerSpan, HAS_IS_REMOTE};

/// Times the calls of one instrumentation (made once by `seam.call_timer`).
#[pyclass(module = "cfk_otel._native", frozen)]
pub struct CallTimer {
    /// `fallback(context, span_id, start, seconds, error)`: the end of a failed or slow call, in
    /// Python.
    fallback: Py<PyAny>,
    /// `overflow(context)`: the histogram folded a new label set into its overflow series.
    overflow: Py<PyAny>,
    /// The seam's guard (`failed(error)`), told of a failure of our own.
    guard: Py<PyAny>,
    coroutine: Py<PyAny>,
}

#[pymethods]
impl CallTimer {
    #[new]
    fn new(py: Python<'_>, fallback: Py<PyAny>, overflow: Py<PyAny>, guard: Py<PyAny>) -> PyResult<Self> {
        let coroutine = py.import("types")?.getattr("CoroutineType")?.unbind();
        Ok(Self {
            fallback,
            overflow,
            guard,
            coroutine,
        })
    }

    /// `awaited` (the call's awaitable, of `call`'s kind) timed as a child of `parent`: its
    /// span id made now, as the server span's were, and the head decision the server span's
    /// (set-up's parent-based sampler; the caller checked it is). `exported`: whether a sampled
    /// span's trace is exported (then its ids are the duration's exemplar). `slow`: from this
    /// many seconds on, the call ends in `fallback`. `context` is handed back to the callbacks.
    #[pyo3(signature = (call, parent, family, labels, awaited, exported, slow, context))]
    #[allow(clippy::too_many_arguments)]
    fn time(
        slf: &Bound<'_, Self>,
        call: Py<PreparedSpan>,
        parent: PyRef<'_, ServerSpan>,
        family: Py<Family>,
        labels: Vec<String>,
        awaited: Bound<'_, PyAny>,
        exported: bool,
        slow: f64,
        context: Py<PyAny>,
    ) -> PyResult<TimedCall> {
        let py = slf.py();
        let child = parent.child(py)?;
        // A coroutine steps as it is; another awaitable through its iterator.
        let stepping = if awaited.get_type().as_ptr() == slf.get().coroutine.as_ptr() {
            awaited
        } else {
            awaited.call_method0(intern!(py, "__await__"))?
        };
        Ok(TimedCall {
            timer: slf.clone().unbind(),
            running: Mutex::new(Some(Running {
                awaited: stepping.unbind(),
                labels,
                started: false,
            })),
            call,
            family,
            context,
            exemplar: exported && child.sampled,
            child,
            slow,
            start: now_ns(),
            clock: Instant::now(),
        })
    }
}

/// A call not ended yet.
struct Running {
    awaited: Py<PyAny>,
    labels: Vec<String>,
    started: bool,
}

/// One timed call (see the module's documentation): an awaitable, and its own iterator.
#[pyclass(module = "cfk_otel._native", frozen)]
pub struct TimedCall {
    timer: Py<CallTimer>,
    /// Held only between steps, never while the call's code runs (which might reach this object).
    running: Mutex<Option<Running>>,
    call: Py<PreparedSpan>,
    family: Py<Family>,
    context: Py<PyAny>,
    child: Child,
    exemplar: bool,
    slow: f64,
    start: u64,
    clock: Instant,
}

#[pymethods]
impl TimedCall {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.step(py, &py.None().into_bound(py))
    }

    fn send(&self, py: Python<'_>, value: Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        self.step(py, &value)
    }

    /// Raises `kind` (with `value` and `traceback`, as `coroutine.throw` takes them) in the call.
    #[pyo3(signature = (kind, value=None, traceback=None))]
    fn throw(
        &self,
        py: Python<'_>,
        kind: Bound<'_, PyAny>,
        value: Option<Bound<'_, PyAny>>,
        traceback: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let awaited = self.awaited(py)?;
        let thrown = match awaited.bind(py).getattr(intern!(py, "throw")) {
            Ok(throw) => match (value, traceback) {
                (None, None) => throw.call1((kind,)),
                (value, None) => throw.call1((kind, value)),
                (value, traceback) => throw.call1((kind, value, traceback)),
            },
            Err(_) => Err(PyErr::from_value(value.unwrap_or(kind))),
        };
        match thrown {
            Ok(yielded) => Ok(Some(yielded.unbind())),
            Err(error) if error.is_instance_of::<PyStopIteration>(py) => {
                self.finish(py, None);
                Err(error)
            }
            Err(error) => {
                self.finish(py, Some(&error));
                Err(error)
            }
        }
    }

    /// Closes the call; one that had started ends as it stands (as a coroutine's `finally` would).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let Some(running) = self.take() else {
            return Ok(());
        };
        let awaited = running.awaited.bind(py);
        let closed = match awaited.getattr(intern!(py, "close")) {
            Ok(close) => close.call0().map(|_| ()),
            Err(_) => Ok(()),
        };
        if running.started {
            self.end(py, running.labels, None);
        }
        closed
    }
}

impl TimedCall {
    /// The call's awaitable, or the error of awaiting an ended call again.
    fn awaited(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match running.as_mut() {
            Some(running) => {
                running.started = true;
                Ok(running.awaited.clone_ref(py))
            }
            None => Err(PyRuntimeError::new_err("cannot reuse an already awaited call")),
        }
    }

    fn take(&self) -> Option<Running> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// One step of the call: what it yields, or its end.
    fn step(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        let awaited = self.awaited(py)?;
        let mut result: *mut ffi::PyObject = std::ptr::null_mut();
        // SAFETY: both objects are alive (held here) and `result` receives a new reference or
        // stays null, as `PyIter_Send` documents.
        let sent = unsafe { ffi::PyIter_Send(awaited.as_ptr(), value.as_ptr(), &mut result) };
        match sent {
            ffi::PySendResult::PYGEN_NEXT => {
                // SAFETY: a new reference (see above).
                Ok(Some(unsafe { Bound::from_owned_ptr(py, result) }.unbind()))
            }
            ffi::PySendResult::PYGEN_RETURN => {
                // SAFETY: a new reference (see above).
                let returned = unsafe { Bound::from_owned_ptr(py, result) };
                self.finish(py, None);
                Err(PyStopIteration::new_err((returned.unbind(),)))
            }
            ffi::PySendResult::PYGEN_ERROR => {
                let error = PyErr::fetch(py);
                self.finish(py, Some(&error));
                Err(error)
            }
        }
    }

    /// The call ended: with `error` raised, or returned.
    fn finish(&self, py: Python<'_>, error: Option<&PyErr>) {
        if let Some(running) = self.take() {
            self.end(py, running.labels, error);
        }
    }

    fn end(&self, py: Python<'_>, labels: Vec<String>, error: Option<&PyErr>) {
        let elapsed = self.clock.elapsed();
        let seconds = elapsed.as_secs_f64();
        let timer = self.timer.get();
        // An exception the app sees as one (a cursor's end is not; nor a cancellation).
        let failed = error.filter(|error| {
            error.is_instance_of::<PyException>(py) && !error.is_instance_of::<PyStopAsyncIteration>(py)
        });
        let ended = if failed.is_some() || seconds >= self.slow {
            let error = failed.map(|error| error.value(py).clone());
            let child = &self.child;
            timer
                .fallback
                .call1(py, (&self.context, child.span_id, self.start, seconds, error))
                .map(|_| ())
        } else {
            self.record(py, labels, elapsed, seconds)
        };
        if let Err(failure) = ended {
            if let Err(unsaid) = timer
                .guard
                .call_method1(py, intern!(py, "failed"), (failure.value(py),))
            {
                unsaid.write_unraisable(py, None);
            }
        }
    }

    /// The span queued (when sampled) and the duration observed, as `end_prepared` does for a
    /// call that kept its kind's name and attributes, no status and no event.
    fn record(&self, py: Python<'_>, labels: Vec<String>, elapsed: Duration, seconds: f64) -> PyResult<()> {
        let mut failure = None;
        let child = &self.child;
        if child.sampled {
            let call = self.call.get();
            let ids = Ids {
                trace_id: child.trace_id,
                span_id: child.span_id,
                parent_span_id: child.parent_span_id,
            };
            let end = self
                .start
                .saturating_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
            let status = Status {
                message: String::new(),
                code: 0,
            };
            let (span, ids) = call.span(
                ids,
                HAS_IS_REMOTE,
                child.trace_state.clone(),
                self.start,
                end,
                status,
                Vec::new(),
            );
            keep(call.push(span, ids, 0), &mut failure);
        }
        let (trace_id, span_id) = if self.exemplar {
            (child.trace_id, child.span_id)
        } else {
            (0, 0)
        };
        let observed = self.family.get().observe(labels, seconds, trace_id, span_id);
        if keep(observed, &mut failure) == Some(true) {
            keep(
                self.timer.get().overflow.call1(py, (&self.context,)),
                &mut failure,
            );
        }
        failure.map_or(Ok(()), Err)
    }
}
