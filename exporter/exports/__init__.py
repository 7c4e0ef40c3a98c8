"""Exports: PostgreSQL datasets streamed as CSV or NDJSON.

Owns the catalog (what can be exported), the query grammar and the SQL built from it,
the COPY stream, one export's life (snapshot, stream, audit), the renderers (a format
is one module in `renderers/`), and the routes `/datasets...` and `/downloads...`.

HTTP (the package's rule: exporter/__init__.py) in `routes.py`, `downloads.py`,
`deps.py` and `responses.py`; `service.py` takes an `Exports` record (`context.py`: the
parts of the state the feature uses) and returns an `Answer` that `responses.py` makes
into a response.

May import the core (`exporter.config`, `db`, `audit`, `errors`, `http`, `streaming`,
`state`, `openapi`, `server`) and `exporter.access`; never `files` or `web`.
"""
