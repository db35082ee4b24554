"""Health: the check registry, the dependency checks and the probe endpoints."""
