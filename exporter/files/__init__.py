"""Files: serving a folder's files, or an object store's (EXPORTER_FILES_ROOT=s3://...),
with the HTTP that download tools rely on.

Owns safe paths (every open walks from the root's descriptor; in a store, `store.py`
checks keys by the same rules), ranges, conditions (ETag, If-*), digests, folder
listings, the sources of a body (`source.py`: a file or an object) and the streamed body,
the demo files and the `/files/...` route.

HTTP (the package's rule: exporter/__init__.py) in `routes.py`, `deps.py` and
`response.py`; `service.py` takes a `Files` record (`context.py`) and returns what a path
names, which `response.py` answers.

May import the core and `exporter.access`; never `exports` or `web`.
"""
