"""The web page at `/` (server-rendered, Jinja2, a little plain JavaScript), CORS for
other origins, and GET /metrics for admins (`routes.py`).

All of it is HTTP (the package's rule, exporter/__init__.py, is about the features'
services, which it calls with the parts of the state they use).

May import the core and every feature (`access`, `exports`, `files`): it shows them.
"""
