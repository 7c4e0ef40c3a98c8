"""The web page at `/` (server-rendered, Jinja2, a little plain JavaScript) and CORS for
other origins.

May import the core and every feature (`access`, `exports`, `files`): it shows them.
"""
