//! cfk_otel's compiled core: what the request path does on every request, without the GIL where
//! it can. Python reaches it only through `cfk_otel._core` (the seam), which runs the stock
//! OpenTelemetry SDK instead when this module is missing or `CFK_OTEL_NATIVE=false`.

mod call;
mod export;
mod line;
mod metrics;
mod otlp;
mod proto;
mod request;
mod span;
mod stdout;
mod value;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("VERSION", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<otlp::OtlpExporter>()?;
    m.add_function(wrap_pyfunction!(otlp::check_tls, m)?)?;
    m.add_class::<line::RequestLine>()?;
    m.add_class::<stdout::LineBuffer>()?;
    m.add_class::<metrics::Family>()?;
    m.add_function(wrap_pyfunction!(metrics::render, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::record_request, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::float_to_go_string, m)?)?;
    m.add_function(wrap_pyfunction!(request::end_request, m)?)?;
    m.add_function(wrap_pyfunction!(request::end_call, m)?)?;
    m.add_class::<request::PreparedSpan>()?;
    m.add_function(wrap_pyfunction!(request::end_prepared, m)?)?;
    m.add_class::<span::ServerSpans>()?;
    m.add_class::<span::ServerSpan>()?;
    m.add_class::<span::Sender>()?;
    m.add_class::<call::CallTimer>()?;
    m.add_class::<call::TimedCall>()?;
    Ok(())
}
