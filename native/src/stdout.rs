//! Request lines for stdout, held briefly in the core and written in batches.
//!
//! A request appends its rendered line to a bounded buffer (no Python call, no syscall); a
//! thread of the core wakes when the oldest held line is `hold` old, or when the buffer passes
//! `flush_bytes`, takes the GIL and calls the Python writer, which takes the text (`take`) and
//! writes it in one `write` and `flush` on the stream of the moment (`sys.stdout`, looked up
//! then). While the writer is stuck (a blocked pipe) requests keep appending, up to `max_bytes`;
//! past that a line is dropped and counted, never waited for. The writer also runs, in the
//! caller's thread, before any other line of ours reaches the stream (`flush`), so lines keep
//! their order.
//!
//! One buffer per process: after a fork the child makes its own (its parent's thread is not
//! there), so it never writes the parent's lines.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// What the buffer holds, and who writes it.
struct Held {
    text: String,
    lines: u64,
    /// When the oldest held line came (None: nothing held).
    since: Option<Instant>,
    /// The Python callable that takes and writes what is held (the stdout handler's).
    writer: Option<Py<PyAny>>,
    thread: Option<JoinHandle<()>>,
    /// `close` ran: no thread any more, each line is written as it comes.
    closed: bool,
}

struct Shared {
    held: Mutex<Held>,
    wake: Condvar,
    written: AtomicU64,
    dropped_full: AtomicU64,
    dropped_failed: AtomicU64,
    hold: Duration,
    flush_bytes: usize,
    max_bytes: usize,
}

fn lock(mutex: &Mutex<Held>) -> MutexGuard<'_, Held> {
    // A panic on the writing thread must not take the app's threads with it.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The request lines of this process on their way to stdout (see the module's comment).
#[pyclass(module = "cfk_otel._native", frozen)]
pub struct LineBuffer {
    shared: Arc<Shared>,
}

impl LineBuffer {
    /// Appends one line (without its newline), written by `writer` within `hold`; dropped and
    /// counted when the buffer is full. Never blocks on the stream.
    pub fn push(&self, py: Python<'_>, line: &str, writer: &Py<PyAny>) -> PyResult<()> {
        let shared = &self.shared;
        let mut held = lock(&shared.held);
        if held.text.len() + line.len() + 1 > shared.max_bytes {
            drop(held);
            shared.dropped_full.fetch_add(1, Relaxed);
            return Ok(());
        }
        let was = held.text.len();
        held.text.push_str(line);
        held.text.push('\n');
        held.lines += 1;
        if held.writer.as_ref().is_none_or(|w| !w.is(writer)) {
            held.writer = Some(writer.clone_ref(py));
        }
        if held.closed {
            drop(held);
            return writer.call0(py).map(|_| ());
        }
        if was == 0 {
            held.since = Some(Instant::now());
            if held.thread.is_none() {
                let worker = Arc::clone(shared);
                let thread = std::thread::Builder::new()
                    .name("cfk-otel-stdout".into())
                    .spawn(move || run(&worker))
                    .map_err(|e| PyValueError::new_err(format!("no stdout thread: {e}")))?;
                held.thread = Some(thread);
            }
            shared.wake.notify_one(); // the thread's clock starts
        } else if was < shared.flush_bytes && held.text.len() >= shared.flush_bytes {
            shared.wake.notify_one(); // enough for one write: now
        }
        Ok(())
    }
}

impl Drop for LineBuffer {
    fn drop(&mut self) {
        // The thread ends with its buffer. `try_lock`: a buffer inherited through a fork may
        // have been locked by its parent's thread, which is not in this process.
        if let Ok(mut held) = self.shared.held.try_lock() {
            held.closed = true;
            self.shared.wake.notify_all();
        }
    }
}

/// The writing thread: waits for held lines, then for the oldest to be `hold` old (or the
/// buffer to pass `flush_bytes`, or `close`), then calls the writer with the GIL.
fn run(shared: &Shared) {
    let mut held = lock(&shared.held);
    loop {
        let Some(since) = held.since else {
            if held.closed {
                return;
            }
            held = shared
                .wake
                .wait(held)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            continue;
        };
        let due = since + shared.hold;
        let now = Instant::now();
        if !held.closed && held.text.len() < shared.flush_bytes && now < due {
            held = shared
                .wake
                .wait_timeout(held, due - now)
                .map_or_else(|e| e.into_inner().0, |r| r.0);
            continue;
        }
        drop(held);
        let attached = Python::try_attach(|py| {
            let writer = lock(&shared.held).writer.as_ref().map(|w| w.clone_ref(py));
            if let Some(writer) = writer {
                // The writer reports its own failures (once, on stderr); nothing to add here.
                let _ = writer.call0(py);
            }
        });
        held = lock(&shared.held);
        if held.since == Some(since) {
            // The writer did not take these lines (none set, or it failed before `take`): they
            // are lost rather than retried in a loop.
            let (_, lines) = clear(&mut held);
            shared.dropped_failed.fetch_add(lines, Relaxed);
        }
        if attached.is_none() {
            return; // the interpreter is finishing
        }
    }
}

fn clear(held: &mut Held) -> (String, u64) {
    held.since = None;
    (std::mem::take(&mut held.text), std::mem::take(&mut held.lines))
}

#[pymethods]
impl LineBuffer {
    /// `hold`: the longest a line waits (seconds); `flush_bytes`: held bytes that start a write
    /// at once; `max_bytes`: the most held, past which lines are dropped.
    #[new]
    #[pyo3(signature = (hold=0.05, flush_bytes=65_536, max_bytes=1_048_576))]
    fn new(hold: f64, flush_bytes: usize, max_bytes: usize) -> PyResult<Self> {
        if !(0.0..=60.0).contains(&hold) {
            return Err(PyValueError::new_err("hold must be 0-60 seconds"));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                held: Mutex::new(Held {
                    text: String::new(),
                    lines: 0,
                    since: None,
                    writer: None,
                    thread: None,
                    closed: false,
                }),
                wake: Condvar::new(),
                written: AtomicU64::new(0),
                dropped_full: AtomicU64::new(0),
                dropped_failed: AtomicU64::new(0),
                hold: Duration::from_secs_f64(hold),
                flush_bytes,
                max_bytes,
            }),
        })
    }

    /// The held lines, now out of the buffer, and how many (for the writer to write: "" when
    /// nothing is held).
    fn take(&self) -> (String, u64) {
        let (text, lines) = clear(&mut lock(&self.shared.held));
        self.shared.written.fetch_add(lines, Relaxed);
        (text, lines)
    }

    /// Counts `lines` the writer took but could not write (the stream failed).
    fn lost(&self, lines: u64) {
        self.shared.written.fetch_sub(lines, Relaxed);
        self.shared.dropped_failed.fetch_add(lines, Relaxed);
    }

    /// Writes what is held now, in this thread, through the writer (nothing when nothing is held).
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let writer = {
            let held = lock(&self.shared.held);
            if held.text.is_empty() {
                return Ok(());
            }
            held.writer.as_ref().map(|w| w.clone_ref(py))
        };
        match writer {
            Some(writer) => writer.call0(py).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Stops the thread once it has written what is held, waiting for it at most `timeout`
    /// seconds (it may be stuck in a write); later lines are written as they come, in the
    /// caller's thread. True when the thread finished in time.
    fn close(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let thread = {
            let mut held = lock(&self.shared.held);
            held.closed = true;
            held.thread.take()
        };
        self.shared.wake.notify_all();
        let Some(thread) = thread else {
            return self.flush(py).map(|()| true);
        };
        let deadline = Instant::now() + Duration::from_secs_f64(timeout.clamp(0.0, 60.0));
        Ok(py.detach(|| {
            while !thread.is_finished() {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = thread.join();
            true
        }))
    }

    /// The counters, in the exporters' shape (see `OtlpExporter.stats`): lines written, held,
    /// dropped (the buffer full, the stream failing).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let shared = &self.shared;
        let queued = lock(&shared.held).lines;
        let written = shared.written.load(Relaxed);
        let full = shared.dropped_full.load(Relaxed);
        let failed = shared.dropped_failed.load(Relaxed);
        let out = PyDict::new(py);
        out.set_item("accepted", written + queued + failed)?;
        out.set_item("exported", written)?;
        out.set_item("queued", queued)?;
        out.set_item("dropped_queue_full", full)?;
        out.set_item("dropped_export_failed", failed)?;
        out.set_item("rejected", 0)?;
        out.set_item("failed_attempts", 0)?;
        out.set_item("last_error", py.None())?;
        Ok(out)
    }
}
