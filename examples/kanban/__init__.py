"""CF-Kanban, the example service: tickets, boards, AI agents and live board updates.

It contains no telemetry set-up: run it as production would,
``opentelemetry-instrument uvicorn kanban.app:app --app-dir examples --port 3000``,
and cfk_otel traces, measures and logs it. The only cfk_otel calls are the ones the
monitoring document asks an app to make (logger, capture_error, set_user, domain metrics).
"""
