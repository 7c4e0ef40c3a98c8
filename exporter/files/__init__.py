"""Files: serving a folder's files with the HTTP that download tools rely on.

Owns safe paths (every open walks from the root's descriptor), ranges, conditions
(ETag, If-*), digests, folder listings, the streamed body, the demo files and the
`/files/...` route.

May import the core and `exporter.access`; never `exports` or `web`.
"""
