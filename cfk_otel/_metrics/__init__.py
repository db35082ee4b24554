"""Metrics: the document's catalogue and the custom-metric API, the scrape, and the OTLP push."""
