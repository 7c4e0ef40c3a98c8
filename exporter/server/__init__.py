"""The server process around the app: uvicorn's HTTP protocol with bounds on the request
head and on buffered writes and with ASGI's zero-copy send, the root-path prefix, and the
logging configuration.

Part of the core: imports only `exporter.config` and the standard library.
"""
