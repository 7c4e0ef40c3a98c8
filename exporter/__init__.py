"""exporter: a download server for large files and PostgreSQL exports.

One rule about HTTP, in every feature: services are HTTP-free. A `service.py` (and every
domain module beside it) takes plain values (an ExportRequest, a Principal, the client
as `streaming.Client`, the parts of `State` it uses) and returns domain results or
raises domain errors (`errors.py`). Reading the request and making responses (headers,
`StreamingResponse`, JSON, redirects) is done in `routes.py`, with `deps.py` (what
routes take as parameters), and in the feature's one response module (`responses.py`;
`files/response.py`). Only `app.py`, `state.py`, the `deps.py` modules and the routes
see `State` whole. tests/test_layout.py holds both.
"""

__version__ = "0.1.0"
