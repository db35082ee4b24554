"""Structured logs: one record, one renderer (JSON or pretty), the stdout and OTLP
handlers, the app's logger and the request line."""
