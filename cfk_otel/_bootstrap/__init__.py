"""Set-up: the distro and configurator entry points, the process's providers, resource and shutdown."""
