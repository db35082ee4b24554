"""The seam: the compiled core when present, the stock OpenTelemetry SDK through its public APIs otherwise."""
