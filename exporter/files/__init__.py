"""Serving files from a folder: paths, conditions, ranges, digests, the streamed body."""
