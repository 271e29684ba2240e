"""Adapters that plug qrkd into other frameworks. Each module here imports its framework, so none is imported by
`import qrkd`: load the one you need explicitly (e.g. `import qrkd.integrations.torchdistill`)."""
