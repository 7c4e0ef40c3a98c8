"""Files: serving a folder's files with the HTTP that download tools rely on.

Owns safe paths (every open walks from the root's descriptor), ranges, conditions
(ETag, If-*), digests, folder listings, the streamed body, the demo files and the
`/files/...` route.

HTTP (the package's rule: exporter/__init__.py) in `routes.py`, `deps.py` and
`response.py`; `service.py` takes a `Files` record (`context.py`) and returns what a path
names, which `response.py` answers.

May import the core and `exporter.access`; never `exports` or `web`.
"""
