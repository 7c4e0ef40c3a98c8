"""exporter: a download server for large files and PostgreSQL exports."""

__version__ = "0.1.0"
