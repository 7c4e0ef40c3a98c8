"""Access: who may download what.

Owns principals and their scopes, tokens, signed links, the limits on downloads per
principal and per deployment, authentication of a request, the routes `/links` and
`/tokens`, and the `exporter token / link` commands.

May import only the core; `exports`, `files` and `web` build on it.
"""
