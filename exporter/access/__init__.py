"""Access: who may download what.

Owns principals and their scopes, tokens, signed links, the limits on downloads per
principal and per deployment, authentication of a request, the routes `/links` and
`/tokens`, and the `exporter token / link` commands.

HTTP (the package's rule: exporter/__init__.py) in `routes.py`, `deps.py` (the state, the
principal, the client as services see it), `authenticate.py` and the middleware in
`limits.py`; `service.py` and `admission.py` take plain values.

May import only the core; `exports`, `files` and `web` build on it.
"""
