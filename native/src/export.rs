//! A bounded queue drained by one native thread that batches, encodes and POSTs OTLP/HTTP.
//!
//! Memory is bounded twice: by a count and by an estimate in bytes. When either bound would be
//! passed, the oldest items go first (they are the least useful when an outage ends), and each is
//! counted. A failed export (refused, reset, timed out, 429/502/503/504) is retried with exponential
//! backoff and jitter, honouring `Retry-After`, until it succeeds or `max_retry_elapsed` passes;
//! meanwhile the queue keeps taking new items within its bounds. Nothing here holds the GIL.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use ureq::tls::{parse_pem, Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

/// How an exporter sends, and how much it may hold.
#[derive(Clone, Debug)]
pub struct Config {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub gzip: bool,
    pub timeout: Duration,
    pub max_queue: usize,
    pub max_queue_bytes: usize,
    pub max_batch: usize,
    pub delay: Duration,
    pub max_retry_elapsed: Duration,
    /// Custom roots and a client certificate; None: Mozilla's roots, no client certificate.
    pub tls: Option<TlsConfig>,
}

/// TLS material from PEM text, read as the SDK's OTLP/HTTP exporter reads its files:
/// - `ca`: the certificates trusted as roots, instead of the bundled ones
///   (`OTEL_EXPORTER_OTLP_CERTIFICATE`);
/// - `cert`: the client certificate chain (`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`), with its
///   private key from `key` (`OTEL_EXPORTER_OTLP_CLIENT_KEY`) or, without one, from the same file;
///   a key without a certificate is ignored.
///
/// Errors say which part is wrong, never what it holds.
pub fn tls_config(
    ca: Option<&[u8]>,
    cert: Option<&[u8]>,
    key: Option<&[u8]>,
) -> Result<Option<TlsConfig>, String> {
    if ca.is_none() && cert.is_none() {
        return Ok(None);
    }
    let mut builder = TlsConfig::builder();
    if let Some(ca) = ca {
        let (roots, _) = pem_items(ca, "certificate")?;
        if roots.is_empty() {
            return Err("certificate: no PEM certificate in the file".into());
        }
        builder = builder.root_certs(RootCerts::new_with_certs(&roots));
    }
    if let Some(cert) = cert {
        let (chain, own_key) = pem_items(cert, "client certificate")?;
        if chain.is_empty() {
            return Err("client certificate: no PEM certificate in the file".into());
        }
        let private_key = match key {
            Some(key) => pem_items(key, "client key")?.1,
            None => own_key,
        };
        let Some(private_key) = private_key else {
            return Err(if key.is_some() {
                "client key: no PEM private key in the file".into()
            } else {
                "client certificate: no private key in the file, and no client key given".into()
            });
        };
        builder = builder.client_cert(Some(ClientCert::new_with_certs(&chain, private_key)));
    }
    Ok(Some(builder.build()))
}

/// The certificates of a PEM text, and its first private key.
fn pem_items(
    pem: &[u8],
    what: &str,
) -> Result<(Vec<Certificate<'static>>, Option<PrivateKey<'static>>), String> {
    let mut certificates = Vec::new();
    let mut key = None;
    for item in parse_pem(pem) {
        match item.map_err(|_| format!("{what}: the file is not valid PEM"))? {
            PemItem::Certificate(certificate) => certificates.push(certificate),
            PemItem::PrivateKey(private_key) => {
                key.get_or_insert(private_key);
            }
            _ => {}
        }
    }
    Ok((certificates, key))
}

/// Something the queue holds: it knows roughly how many bytes it keeps alive.
pub trait Weighed {
    fn weight(&self) -> usize;
}

/// Counters, read without the queue's lock.
#[derive(Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub exported: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_export_failed: AtomicU64,
    pub rejected: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl Stats {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn fail(&self, error: String) {
        self.failed_attempts.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(error);
    }
}

struct Queue<T> {
    items: VecDeque<T>,
    bytes: usize,
    flush_wanted: u64,
    flush_done: u64,
    shutdown_by: Option<Instant>,
    stopped: bool,
    // The thread waits for a batch to fill (not in a retry's pause): only then does a push
    // wake it. A collector that is down keeps the queue full, and waking the pausing thread
    // on every push would cost each request a context switch for nothing.
    waiting_for_batch: bool,
}

struct Shared<T> {
    config: Config,
    queue: Mutex<Queue<T>>,
    wake: Condvar,
    done: Condvar,
    stats: Stats,
    encode: Box<dyn Fn(Vec<T>) -> Vec<u8> + Send + Sync>,
}

/// The queue and its thread.
pub struct Exporter<T: Weighed + Send + 'static> {
    shared: Arc<Shared<T>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock<U>(mutex: &Mutex<U>) -> MutexGuard<'_, U> {
    // A panic on the export thread must not take the app's threads with it.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn wait<'a, U>(condvar: &Condvar, guard: MutexGuard<'a, U>, timeout: Duration) -> MutexGuard<'a, U> {
    condvar
        .wait_timeout(guard, timeout)
        .map_or_else(|e| e.into_inner().0, |r| r.0)
}

enum Outcome {
    Sent,
    /// Worth another try, after the server's `Retry-After` when it gave one.
    Retry(Option<Duration>, String),
    Rejected(String),
}

impl<T: Weighed + Send + 'static> Exporter<T> {
    pub fn start(
        config: Config,
        encode: Box<dyn Fn(Vec<T>) -> Vec<u8> + Send + Sync>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            config,
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                flush_wanted: 0,
                flush_done: 0,
                shutdown_by: None,
                stopped: false,
                waiting_for_batch: false,
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
            stats: Stats::default(),
            encode,
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("cfk-otel-export".into())
            .spawn(move || run(&worker))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    pub fn queued(&self) -> (usize, usize) {
        let queue = lock(&self.shared.queue);
        (queue.items.len(), queue.bytes)
    }

    /// Takes one item; never blocks beyond the queue's lock.
    pub fn push(&self, item: T) {
        let config = &self.shared.config;
        let stats = &self.shared.stats;
        let weight = item.weight();
        let mut queue = lock(&self.shared.queue);
        if queue.shutdown_by.is_some() {
            Stats::add(&stats.dropped_queue_full, 1);
            return;
        }
        Stats::add(&stats.accepted, 1);
        if weight > config.max_queue_bytes {
            Stats::add(&stats.dropped_queue_full, 1);
            return;
        }
        while !queue.items.is_empty()
            && (queue.items.len() >= config.max_queue || queue.bytes + weight > config.max_queue_bytes)
        {
            if let Some(old) = queue.items.pop_front() {
                queue.bytes -= old.weight();
                Stats::add(&stats.dropped_queue_full, 1);
            }
        }
        queue.items.push_back(item);
        queue.bytes += weight;
        if queue.waiting_for_batch && queue.items.len() >= config.max_batch {
            queue.waiting_for_batch = false;
            self.shared.wake.notify_one();
        }
    }

    /// Exports what is queued now; false when `timeout` passed first.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut queue = lock(&self.shared.queue);
        if queue.stopped {
            return queue.items.is_empty();
        }
        queue.flush_wanted += 1;
        let wanted = queue.flush_wanted;
        self.shared.wake.notify_one();
        while queue.flush_done < wanted && !queue.stopped {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            queue = wait(&self.shared.done, queue, deadline - now);
        }
        true
    }

    /// Exports what is queued, retrying no later than `timeout` from now; then the thread ends.
    /// What is still queued then is dropped and counted. False when the thread was still busy.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        {
            let mut queue = lock(&self.shared.queue);
            if queue.shutdown_by.is_none() {
                queue.shutdown_by = Some(deadline);
            }
            self.shared.wake.notify_all();
            while !queue.stopped {
                let now = Instant::now();
                if now >= deadline + Duration::from_millis(50) {
                    return false; // an HTTP call is still in flight: leave the thread be
                }
                queue = wait(
                    &self.shared.done,
                    queue,
                    deadline + Duration::from_millis(50) - now,
                );
            }
        }
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
        true
    }
}

fn run<T: Weighed + Send>(shared: &Shared<T>) {
    let config = &shared.config;
    let agent = agent(config);
    let mut next = Instant::now() + config.delay;
    loop {
        let mut queue = lock(&shared.queue);
        loop {
            let flush = queue.flush_done < queue.flush_wanted;
            if queue.shutdown_by.is_some() || flush || queue.items.len() >= config.max_batch {
                break;
            }
            let now = Instant::now();
            if now >= next {
                if !queue.items.is_empty() {
                    break;
                }
                next = now + config.delay;
            }
            queue.waiting_for_batch = true;
            queue = wait(&shared.wake, queue, next - now);
            queue.waiting_for_batch = false;
        }
        let take = queue.items.len().min(config.max_batch);
        let batch: Vec<T> = queue.items.drain(..take).collect();
        queue.bytes -= batch.iter().map(Weighed::weight).sum::<usize>();
        let flush_target = queue.flush_wanted;
        drop(queue);

        if !batch.is_empty() {
            send(shared, &agent, batch);
        }
        next = Instant::now() + config.delay;

        let mut queue = lock(&shared.queue);
        if queue.items.is_empty() {
            queue.flush_done = flush_target;
            shared.done.notify_all();
        }
        if let Some(by) = queue.shutdown_by {
            if queue.items.is_empty() || Instant::now() >= by {
                let left = queue.items.len();
                queue.items.clear();
                queue.bytes = 0;
                Stats::add(&shared.stats.dropped_export_failed, left);
                queue.stopped = true;
                queue.flush_done = queue.flush_wanted;
                shared.done.notify_all();
                return;
            }
        }
    }
}

fn agent(config: &Config) -> ureq::Agent {
    let mut builder = ureq::Agent::config_builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.clone());
    }
    builder
        .timeout_global(Some(config.timeout))
        .http_status_as_error(false)
        .user_agent(concat!("cfk-otel-native/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

fn send<T: Weighed + Send>(shared: &Shared<T>, agent: &ureq::Agent, batch: Vec<T>) {
    let config = &shared.config;
    let stats = &shared.stats;
    let count = batch.len();
    let mut body = (shared.encode)(batch);
    if config.gzip {
        let mut encoder =
            flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
        if encoder.write_all(&body).is_ok() {
            if let Ok(compressed) = encoder.finish() {
                body = compressed;
            }
        }
    }
    let started = Instant::now();
    let mut backoff = Duration::from_secs(1);
    loop {
        let pause = match post(config, agent, &body) {
            Outcome::Sent => {
                Stats::add(&stats.exported, count);
                return;
            }
            Outcome::Rejected(error) => {
                stats.fail(error);
                Stats::add(&stats.rejected, count);
                return;
            }
            Outcome::Retry(after, error) => {
                stats.fail(error);
                after.unwrap_or_else(|| jitter(backoff))
            }
        };
        let mut queue = lock(&shared.queue);
        let give_up_at = started + config.max_retry_elapsed;
        let resume = Instant::now() + pause;
        let limit = queue.shutdown_by.map_or(give_up_at, |by| by.min(give_up_at));
        if resume >= limit {
            drop(queue);
            Stats::add(&stats.dropped_export_failed, count);
            return;
        }
        // Sleep, but wake at once for a shutdown: then one last try, right away.
        while queue.shutdown_by.is_none() {
            let now = Instant::now();
            if now >= resume {
                break;
            }
            queue = wait(&shared.wake, queue, resume - now);
        }
        drop(queue);
        // Capped low: the collector is a DaemonSet on the same node, so a retry is cheap, and
        // a collector back from a restart is used within seconds, before the queue fills.
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The longest pause between two attempts of one batch (before jitter).
const MAX_BACKOFF: Duration = Duration::from_secs(5);

fn post(config: &Config, agent: &ureq::Agent, body: &[u8]) -> Outcome {
    let mut request = agent
        .post(&config.url)
        .header("Content-Type", "application/x-protobuf");
    if config.gzip {
        request = request.header("Content-Encoding", "gzip");
    }
    for (name, value) in &config.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    match request.send(body) {
        Ok(mut response) => {
            let status = response.status().as_u16();
            // Read the body so the connection can be reused.
            let _ = response.body_mut().read_to_vec();
            match status {
                200..=299 => Outcome::Sent,
                429 | 502 | 503 | 504 => Outcome::Retry(retry_after(&response), format!("HTTP {status}")),
                _ => Outcome::Rejected(format!("HTTP {status}")),
            }
        }
        Err(error) => Outcome::Retry(None, describe(&error)),
    }
}

/// What went wrong, in words that never hold the URL (it may carry credentials).
fn describe(error: &ureq::Error) -> String {
    match error {
        ureq::Error::Timeout(what) => format!("timed out ({what:?})"),
        ureq::Error::Io(io) => format!("{:?}", io.kind()),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::HostNotFound => "host not found".into(),
        _ => "transport error".into(),
    }
}

fn retry_after(response: &ureq::http::Response<ureq::Body>) -> Option<Duration> {
    let seconds: u64 = response
        .headers()
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds.min(60)))
}

/// Between half and all of `backoff`, from the clock's low bits (no RNG dependency needed).
fn jitter(backoff: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let fraction = 0.5 + f64::from(nanos % 1000) / 2000.0;
    backoff.mul_f64(fraction)
}
