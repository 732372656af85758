"""Entrypoints of docqa: the `docqa` command line and the driver that runs a job on Ray."""
