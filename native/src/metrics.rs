//! The request metrics the core aggregates itself, and their Prometheus / OpenMetrics text.
//!
//! The text is what `prometheus_client` writes for the same families (the SDK's Prometheus
//! reader goes through it): the same number formatting (`floatToGoString`), label escaping and
//! line order, so a scrape reads the same on both paths. `tests/test_native.py` compares them.

use crate::proto::{
    AnyValue, Histogram, HistogramDataPoint, KeyValue, Metric, MetricData, NumberDataPoint, Sum, Value,
    CUMULATIVE,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;

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

#[derive(Clone)]
enum Series {
    /// A counter's total or a gauge's level.
    Counter(f64),
    /// Exemplars (issue 24) belong here: one optional (trace id, span id, value, time) slot per
    /// bucket beside `counts`, written by `observe` when the caller passes a kept span's ids,
    /// read by the OpenMetrics text and `to_otlp`.
    Histogram {
        counts: Vec<u64>,
        sum: f64,
        count: u64,
        min: f64,
        max: f64,
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
                    counts, sum, count, ..
                } => {
                    let mut cumulative = 0u64;
                    for (i, n) in counts.iter().enumerate() {
                        cumulative += n;
                        let le = self.bound_labels.get(i).map_or("+Inf", String::as_str);
                        let _ = write!(out, "{}_bucket", self.name);
                        self.labels(values, Some(le), out);
                        let _ = writeln!(out, " {}", go_string(cumulative as f64));
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
    pub(crate) fn observe(&self, labels: Vec<String>, value: f64) -> PyResult<bool> {
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        let ((), overflowed) = self.update(labels, |series| {
            if let Series::Histogram {
                counts,
                sum,
                count,
                min,
                max,
            } = series
            {
                counts[bucket] += 1;
                *sum += value;
                *count += 1;
                *min = min.min(value);
                *max = max.max(value);
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
                } => Some((labels.clone(), counts.clone(), *sum, *count, *min, *max)),
                Series::Counter(_) => None,
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
/// `http_request_duration_seconds{method,path}` observed. Returns whether either folded a new
/// label set into its overflow series.
#[pyfunction]
pub fn record_request(
    requests: PyRef<'_, Family>,
    duration: PyRef<'_, Family>,
    method: String,
    route: String,
    status: String,
    seconds: f64,
) -> PyResult<(bool, bool)> {
    record_request_in(&requests, &duration, method, route, status, seconds)
}

/// What `record_request` does, for the core's own callers (`request.rs`).
pub(crate) fn record_request_in(
    requests: &Family,
    duration: &Family,
    method: String,
    route: String,
    status: String,
    seconds: f64,
) -> PyResult<(bool, bool)> {
    let counted = requests.add(vec![method.clone(), route.clone(), status], 1.0)?;
    let observed = duration.observe(vec![method, route], seconds)?;
    Ok((counted, observed))
}
