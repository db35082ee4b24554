"""The cfk-otel command: doctor (the production checklist, live checks), env, deploy files."""
