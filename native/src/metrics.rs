//! The request metrics the core aggregates itself, and their Prometheus / OpenMetrics text.
//!
//! The text is what `prometheus_client` writes for the same families (the SDK's Prometheus
//! reader goes through it): the same number formatting (`floatToGoString`), label escaping and
//! line order, so a scrape reads the same on both paths. `tests/test_native.py` compares them.

use crate::proto::{
    AnyValue, Exemplar as OtlpExemplar, Histogram, HistogramDataPoint, KeyValue, Metric, MetricData,
    NumberDataPoint, Sum, Value, CUMULATIVE,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The label value of the series that label sets past a family's `max_series` share.
const OVERFLOW: &str = "overflow";

/// Python's `repr(float)`: the shortest text that reads back to the same number, fixed notation
/// for decimal exponents from -4 to 15, scientific with a signed two-digit exponent otherwise.
pub fn python_repr(value: f64) -> String {
    if value.is_nan() {
        return "nan".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Ryu gives the shortest round-trip digits and, as Python, breaks an exact tie to even
    // (Rust's own `{:e}` rounds it up): "-2.0655949856306962E15", "1E-5", "123.5".
    let mut buffer = ryu::Buffer::new();
    let text = buffer.format_finite(value);
    let (mantissa, exponent) = text.split_once(['e', 'E']).unwrap_or((text, "0"));
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    // As digits d1 d2 ... and the decimal exponent of d1.
    let mut digits: String = format!("{whole}{fraction}");
    let mut exponent: i32 = exponent.parse::<i32>().unwrap_or(0) + whole.len() as i32 - 1;
    let leading = digits.len() - digits.trim_start_matches('0').len();
    digits.drain(..leading);
    exponent -= leading as i32;
    let digits = digits.trim_end_matches('0').to_string();
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        let mut out = String::from(sign);
        if point <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-point) as usize));
            out.push_str(&digits);
        } else if (point as usize) >= digits.len() {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', point as usize - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..point as usize]);
            out.push('.');
            out.push_str(&digits[point as usize..]);
        }
        out
    } else {
        let mut out = String::from(sign);
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(
            out,
            "e{}{:02}",
            if exponent < 0 { '-' } else { '+' },
            exponent.abs()
        );
        out
    }
}

/// prometheus_client's `floatToGoString`: Go switches to exponents sooner than Python.
pub fn go_string(value: f64) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "+Inf".into() } else { "-Inf".into() };
    }
    let text = python_repr(value);
    match text.find('.') {
        Some(dot) if value > 0.0 && dot > 6 => {
            let joined = format!("{}.{}{}", &text[..1], &text[1..dot], &text[dot + 1..]);
            let mantissa = joined.trim_end_matches(['0', '.']);
            format!("{mantissa}e+{:02}", dot - 1)
        }
        _ => text,
    }
}

fn escape_label(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' => out.push_str("\\\""),
            _ => out.push(c),
        }
    }
}

fn escape_help(value: &str, openmetrics: bool) -> String {
    let text = value.replace('\\', "\\\\").replace('\n', "\\n");
    if openmetrics {
        text.replace('"', "\\\"")
    } else {
        text
    }
}

/// One measurement with the trace it was taken in: the latest of its bucket.
#[derive(Clone, Copy)]
struct Exemplar {
    trace_id: u128,
    span_id: u64,
    value: f64,
    /// Wall-clock time, unix nanoseconds.
    time: u64,
}

impl Exemplar {
    /// ` # {trace_id="...",span_id="..."} value seconds.millis`: OpenMetrics' exemplar on a
    /// `_bucket` line, in the form the SDK path's text writes too.
    fn write_openmetrics(&self, out: &mut String) {
        let millis = self.time / 1_000_000;
        let _ = write!(
            out,
            " # {{trace_id=\"{:032x}\",span_id=\"{:016x}\"}} {} {}.{:03}",
            self.trace_id,
            self.span_id,
            go_string(self.value),
            millis / 1000,
            millis % 1000
        );
    }

    fn to_otlp(self) -> OtlpExemplar {
        OtlpExemplar {
            filtered_attributes: Vec::new(),
            time_unix_nano: self.time,
            as_double: Some(self.value),
            span_id: self.span_id.to_be_bytes().to_vec(),
            trace_id: self.trace_id.to_be_bytes().to_vec(),
        }
    }
}

/// An exemplar's ids, when the caller passed a kept span's (0 is no id in W3C Trace Context).
fn exemplar_ids(trace_id: u128, span_id: u64) -> Option<(u128, u64)> {
    (trace_id != 0 && span_id != 0).then_some((trace_id, span_id))
}

fn now_unix_nano() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

#[derive(Clone)]
enum Series {
    /// A counter's total or a gauge's level.
    Counter(f64),
    /// `exemplars` is empty until the first exemplar, then one slot per bucket (the latest
    /// measurement of a kept trace in that bucket): memory bounded by the bucket count.
    Histogram {
        counts: Vec<u64>,
        sum: f64,
        count: u64,
        min: f64,
        max: f64,
        exemplars: Vec<Option<Exemplar>>,
    },
}

struct Table {
    index: HashMap<Vec<String>, usize>,
    rows: Vec<(Vec<String>, Series)>,
}

/// One metric family: a counter, a gauge, or a histogram with fixed bucket bounds.
///
/// Past `max_series` label sets (0: no bound), a new label set is folded into one series whose
/// every label value is "overflow", as the SDK's cardinality limit does.
#[pyclass(module = "cfk_otel._native", frozen)]
pub struct Family {
    name: String,
    help: String,
    unit: String,
    label_names: Vec<String>,
    // The label positions in name order: the exposition writes labels sorted, as the SDK's
    // Prometheus reader does, whatever order they were declared in.
    sorted: Vec<usize>,
    bounds: Vec<f64>,
    bound_labels: Vec<String>,
    histogram: bool,
    gauge: bool,
    max_series: usize,
    // The instrument's own name and unit, as OTLP carries them ("http.server..." or the
    // document's name, "s"); the exposition name above has the unit and _total suffixes.
    otlp_name: String,
    otlp_unit: String,
    table: Mutex<Table>,
}

impl Family {
    /// Applies `change` to the series of `labels` (made when new) and returns what it returns,
    /// and whether a new label set was folded into the overflow series.
    fn update<T>(&self, labels: Vec<String>, change: impl FnOnce(&mut Series) -> T) -> PyResult<(T, bool)> {
        if labels.len() != self.label_names.len() {
            return Err(PyValueError::new_err(format!(
                "{} takes labels {:?}, got {} values",
                self.name,
                self.label_names,
                labels.len()
            )));
        }
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut labels = labels;
        let mut overflowed = false;
        if self.max_series > 0 && table.rows.len() >= self.max_series && !table.index.contains_key(&labels) {
            labels = vec![OVERFLOW.to_string(); self.label_names.len()];
            overflowed = true;
        }
        let at = match table.index.get(&labels) {
            Some(&at) => at,
            None => {
                let fresh = if self.histogram {
                    Series::Histogram {
                        counts: vec![0; self.bounds.len() + 1],
                        sum: 0.0,
                        count: 0,
                        min: f64::INFINITY,
                        max: f64::NEG_INFINITY,
                        exemplars: Vec::new(),
                    }
                } else {
                    Series::Counter(0.0)
                };
                let at = table.rows.len();
                table.rows.push((labels.clone(), fresh));
                table.index.insert(labels, at);
                at
            }
        };
        Ok((change(&mut table.rows[at].1), overflowed))
    }

    /// `{name="value",...}` in name order, as prometheus_client writes them, with a
    /// histogram bucket's `le` in its place among them.
    fn labels(&self, values: &[String], le: Option<&str>, out: &mut String) {
        if values.is_empty() && le.is_none() {
            return;
        }
        out.push('{');
        let mut first = true;
        let mut pair = |name: &str, value: &str, out: &mut String| {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(name);
            out.push_str("=\"");
            escape_label(value, out);
            out.push('"');
        };
        let mut le = le;
        for &i in &self.sorted {
            let name = self.label_names[i].as_str();
            if let Some(bound) = le.filter(|_| name > "le") {
                pair("le", bound, out);
                le = None;
            }
            pair(name, &values[i], out);
        }
        if let Some(bound) = le {
            pair("le", bound, out);
        }
        out.push('}');
    }

    fn render_into(&self, openmetrics: bool, out: &mut String) {
        let table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let kind = if self.histogram {
            "histogram"
        } else if self.gauge {
            "gauge"
        } else {
            "counter"
        };
        let family = if openmetrics && kind == "counter" {
            self.name.strip_suffix("_total").unwrap_or(&self.name)
        } else {
            &self.name
        };
        let _ = writeln!(out, "# HELP {family} {}", escape_help(&self.help, openmetrics));
        let _ = writeln!(out, "# TYPE {family} {kind}");
        if openmetrics && !self.unit.is_empty() {
            let _ = writeln!(out, "# UNIT {family} {}", self.unit);
        }
        for (values, series) in &table.rows {
            match series {
                Series::Counter(total) => {
                    out.push_str(&self.name);
                    self.labels(values, None, out);
                    let _ = writeln!(out, " {}", go_string(*total));
                }
                Series::Histogram {
                    counts,
                    sum,
                    count,
                    exemplars,
                    ..
                } => {
                    let mut cumulative = 0u64;
                    for (i, n) in counts.iter().enumerate() {
                        cumulative += n;
                        let le = self.bound_labels.get(i).map_or("+Inf", String::as_str);
                        let _ = write!(out, "{}_bucket", self.name);
                        self.labels(values, Some(le), out);
                        let _ = write!(out, " {}", go_string(cumulative as f64));
                        // The Prometheus text format has no exemplars: OpenMetrics only.
                        if let Some(Some(exemplar)) = exemplars.get(i).filter(|_| openmetrics) {
                            exemplar.write_openmetrics(out);
                        }
                        out.push('\n');
                    }
                    let _ = write!(out, "{}_count", self.name);
                    self.labels(values, None, out);
                    let _ = writeln!(out, " {}", go_string(*count as f64));
                    let _ = write!(out, "{}_sum", self.name);
                    self.labels(values, None, out);
                    let _ = writeln!(out, " {}", go_string(*sum));
                }
            }
        }
    }
}

impl Family {
    /// This family's OTLP form: cumulative, every series since `start` (unix nanoseconds).
    pub fn to_otlp(&self, start: u64, now: u64) -> Metric {
        let table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let attributes = |values: &[String]| -> Vec<KeyValue> {
            self.label_names
                .iter()
                .zip(values)
                .map(|(key, value)| KeyValue {
                    key: key.clone(),
                    value: Some(AnyValue {
                        value: Some(Value::String(value.clone())),
                    }),
                })
                .collect()
        };
        let data = if self.histogram {
            MetricData::Histogram(Histogram {
                aggregation_temporality: CUMULATIVE,
                data_points: table
                    .rows
                    .iter()
                    .filter_map(|(values, series)| match series {
                        Series::Histogram {
                            counts,
                            sum,
                            count,
                            min,
                            max,
                            exemplars,
                        } => Some(HistogramDataPoint {
                            attributes: attributes(values),
                            start_time_unix_nano: start,
                            time_unix_nano: now,
                            count: *count,
                            sum: Some(*sum),
                            bucket_counts: counts.clone(),
                            explicit_bounds: self.bounds.clone(),
                            flags: 0,
                            min: Some(*min),
                            max: Some(*max),
                            exemplars: exemplars.iter().flatten().map(|e| e.to_otlp()).collect(),
                        }),
                        Series::Counter(_) => None,
                    })
                    .collect(),
            })
        } else {
            MetricData::Sum(Sum {
                aggregation_temporality: CUMULATIVE,
                is_monotonic: !self.gauge,
                data_points: table
                    .rows
                    .iter()
                    .filter_map(|(values, series)| match series {
                        Series::Counter(total) => Some(NumberDataPoint {
                            attributes: attributes(values),
                            start_time_unix_nano: start,
                            time_unix_nano: now,
                            as_double: Some(*total),
                            flags: 0,
                        }),
                        Series::Histogram { .. } => None,
                    })
                    .collect(),
            })
        };
        Metric {
            name: self.otlp_name.clone(),
            description: self.help.clone(),
            unit: self.otlp_unit.clone(),
            data: Some(data),
        }
    }
}

#[pymethods]
impl Family {
    /// A counter when `bounds` is None (a gauge with `gauge=True`), else a histogram with those
    /// upper bounds (ascending), written in `le` as `bound_labels` gives them (the SDK writes
    /// `str()` of each bound).
    #[new]
    #[pyo3(signature = (
        name, help, unit, label_names, bounds=None, bound_labels=None, otlp_name=None, otlp_unit=None,
        *, gauge=false, max_series=0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: String,
        help: String,
        unit: String,
        label_names: Vec<String>,
        bounds: Option<Vec<f64>>,
        bound_labels: Option<Vec<String>>,
        otlp_name: Option<String>,
        otlp_unit: Option<String>,
        gauge: bool,
        max_series: usize,
    ) -> PyResult<Self> {
        let histogram = bounds.is_some();
        if histogram && gauge {
            return Err(PyValueError::new_err(format!("{name}: a gauge has no buckets")));
        }
        let bounds = bounds.unwrap_or_default();
        if bounds
            .windows(2)
            .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
        {
            return Err(PyValueError::new_err(format!(
                "{name}: bucket bounds must ascend"
            )));
        }
        let bound_labels = bound_labels.unwrap_or_else(|| bounds.iter().map(|b| go_string(*b)).collect());
        if bound_labels.len() != bounds.len() {
            return Err(PyValueError::new_err(format!("{name}: one label per bound")));
        }
        let mut sorted: Vec<usize> = (0..label_names.len()).collect();
        sorted.sort_by(|a, b| label_names[*a].cmp(&label_names[*b]));
        Ok(Self {
            otlp_name: otlp_name.unwrap_or_else(|| name.clone()),
            otlp_unit: otlp_unit.unwrap_or_default(),
            name,
            help,
            unit,
            label_names,
            sorted,
            bounds,
            bound_labels,
            histogram,
            gauge,
            max_series,
            table: Mutex::new(Table {
                index: HashMap::new(),
                rows: Vec::new(),
            }),
        })
    }

    /// Adds `value` to a counter's or a gauge's series; True when a new label set went to the
    /// overflow series.
    pub(crate) fn add(&self, labels: Vec<String>, value: f64) -> PyResult<bool> {
        let ((), overflowed) = self.update(labels, |series| {
            if let Series::Counter(total) = series {
                *total += value;
            }
        })?;
        Ok(overflowed)
    }

    /// Sets a gauge's series to `value`; True when a new label set went to the overflow series.
    fn set(&self, labels: Vec<String>, value: f64) -> PyResult<bool> {
        let ((), overflowed) = self.update(labels, |series| {
            if let Series::Counter(level) = series {
                *level = value;
            }
        })?;
        Ok(overflowed)
    }

    /// One fewer in a gauge's series, never below 0: False when it was below 1 (then it is 0,
    /// if it existed at all; a series is never made by a finish).
    fn finish(&self, labels: Vec<String>) -> PyResult<bool> {
        {
            let table = self
                .table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !table.index.contains_key(&labels) {
                return Ok(false);
            }
        }
        let (done, _) = self.update(labels, |series| match series {
            Series::Counter(level) if *level >= 1.0 => {
                *level -= 1.0;
                true
            }
            Series::Counter(level) => {
                *level = 0.0;
                false
            }
            Series::Histogram { .. } => false,
        })?;
        Ok(done)
    }

    /// Makes the series of `labels` (at 0, every bucket empty) if it is not there yet.
    fn touch(&self, labels: Vec<String>) -> PyResult<()> {
        self.update(labels, |_| ()).map(|_| ())
    }

    /// Records `value` in a histogram's series: its bucket is the first bound >= value. True
    /// when a new label set went to the overflow series.
    ///
    /// `trace_id` and `span_id` (both non-zero) make the measurement its bucket's exemplar,
    /// in place of the one before: pass them only for a span whose trace is exported.
    #[pyo3(signature = (labels, value, trace_id=0, span_id=0))]
    pub(crate) fn observe(
        &self,
        labels: Vec<String>,
        value: f64,
        trace_id: u128,
        span_id: u64,
    ) -> PyResult<bool> {
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        let exemplar = exemplar_ids(trace_id, span_id).map(|(trace_id, span_id)| Exemplar {
            trace_id,
            span_id,
            value,
            time: now_unix_nano(),
        });
        let buckets = self.bounds.len() + 1;
        let ((), overflowed) = self.update(labels, |series| {
            if let Series::Histogram {
                counts,
                sum,
                count,
                min,
                max,
                exemplars,
            } = series
            {
                counts[bucket] += 1;
                *sum += value;
                *count += 1;
                *min = min.min(value);
                *max = max.max(value);
                if exemplar.is_some() {
                    if exemplars.is_empty() {
                        exemplars.resize(buckets, None); // once per series
                    }
                    exemplars[bucket] = exemplar;
                }
            }
        })?;
        Ok(overflowed)
    }

    /// A counter's or gauge's series: (label values, value), in the order they were made.
    fn values(&self) -> Vec<(Vec<String>, f64)> {
        let table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        table
            .rows
            .iter()
            .filter_map(|(labels, series)| match series {
                Series::Counter(value) => Some((labels.clone(), *value)),
                Series::Histogram { .. } => None,
            })
            .collect()
    }

    /// A histogram's series: (label values, bucket counts, sum, count, min, max).
    #[allow(clippy::type_complexity)]
    fn rows(&self) -> Vec<(Vec<String>, Vec<u64>, f64, u64, f64, f64)> {
        let table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        table
            .rows
            .iter()
            .filter_map(|(labels, series)| match series {
                Series::Histogram {
                    counts,
                    sum,
                    count,
                    min,
                    max,
                    ..
                } => Some((labels.clone(), counts.clone(), *sum, *count, *min, *max)),
                Series::Counter(_) => None,
            })
            .collect()
    }

    /// A histogram's exemplars: per series that has any, (label values, [(bucket index,
    /// trace id, span id, value, unix nanoseconds)]), in the order the series were made.
    #[allow(clippy::type_complexity)]
    fn exemplars(&self) -> Vec<(Vec<String>, Vec<(usize, u128, u64, f64, u64)>)> {
        let table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        table
            .rows
            .iter()
            .filter_map(|(labels, series)| match series {
                Series::Histogram { exemplars, .. } if !exemplars.is_empty() => Some((
                    labels.clone(),
                    exemplars
                        .iter()
                        .enumerate()
                        .filter_map(|(i, e)| e.map(|e| (i, e.trace_id, e.span_id, e.value, e.time)))
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    }

    /// This family's exposition text (Prometheus 0.0.4, or OpenMetrics without `# EOF`).
    #[pyo3(signature = (openmetrics=false))]
    fn render(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        self.render_into(openmetrics, &mut out);
        out
    }
}

/// Several families' text in one call (what a scrape asks for).
#[pyfunction]
#[pyo3(signature = (families, openmetrics=false))]
pub fn render(families: Vec<PyRef<'_, Family>>, openmetrics: bool) -> String {
    let mut out = String::with_capacity(families.len() * 1024);
    for family in &families {
        family.render_into(openmetrics, &mut out);
    }
    out
}

#[pyfunction]
pub fn float_to_go_string(value: f64) -> String {
    go_string(value)
}

/// The end of one request in one call: `http_requests_total{method,path,status}` counted and
/// `http_request_duration_seconds{method,path}` observed, with the server span's ids as the
/// bucket's exemplar when they are given (non-zero: its trace is exported). Returns whether
/// either folded a new label set into its overflow series.
#[pyfunction]
#[pyo3(signature = (requests, duration, method, route, status, seconds, trace_id=0, span_id=0))]
#[allow(clippy::too_many_arguments)]
pub fn record_request(
    requests: PyRef<'_, Family>,
    duration: PyRef<'_, Family>,
    method: String,
    route: String,
    status: String,
    seconds: f64,
    trace_id: u128,
    span_id: u64,
) -> PyResult<(bool, bool)> {
    record_request_in(
        &requests, &duration, method, route, status, seconds, trace_id, span_id,
    )
}

/// What `record_request` does, for the core's own callers (`request.rs`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_request_in(
    requests: &Family,
    duration: &Family,
    method: String,
    route: String,
    status: String,
    seconds: f64,
    trace_id: u128,
    span_id: u64,
) -> PyResult<(bool, bool)> {
    let counted = requests.add(vec![method.clone(), route.clone(), status], 1.0)?;
    let observed = duration.observe(vec![method, route], seconds, trace_id, span_id)?;
    Ok((counted, observed))
}
