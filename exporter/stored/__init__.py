"""Stored exports: an export run to completion into a file (POST /exports, or `Prefer:
respond-async` on an export URL), watched while it runs (GET /exports/{id}), fetched with
everything a file download has (GET /exports/{id}/file), cancelled or removed (DELETE),
expired and cleaned up on a schedule; `exporter exports`.

Owns `exporter.stored_exports`, the storage of their files (`storage.py`: a folder
now, an object store later, behind one small interface) and the writer other code fills
a stored export through (`store.py`: the stored copies of streamed exports use it too).

HTTP (the package's rule: exporter/__init__.py) in `routes.py`, `deps.py` and
`responses.py` (with the resume copies' 206); `service.py` returns rows, files and
`Started`.

Sits above exports and files (it runs the exports' own COPY and serves its files with
the files' machinery) and below web: imports the core, access, exports and files. The
exports feature reaches it only through the interfaces it defines for it
(`exports/context.py`'s `StoredStarts`, `exports/resume_copies.py`, and
`exports/responses.py`'s `ServedCopies`), which the app fills from `State`.
"""
