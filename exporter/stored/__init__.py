"""Stored exports: an export run to completion into a file (POST /exports, or `Prefer:
respond-async` on an export URL), watched while it runs (GET /exports/{id}), fetched with
everything a file download has (GET /exports/{id}/file), cancelled or removed (DELETE),
expired and cleaned up on a schedule; `exporter exports`.

Owns `exporter.stored_exports`, the storage of their files (`storage.py`: a folder
now, an object store later, behind one small interface) and the writer other code fills
a stored export through (`store.py`: the stored copies of streamed exports use it too).

Sits above exports and files (it runs the exports' own COPY and serves its files with
the files' machinery) and below web: imports the core, access, exports and files. The
exports feature reaches it only through `State.stored`.
"""
