"""All settings, read once from `EXPORTER_*` environment variables."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from exporter.tables import APP_SCHEMA

# The first path segments the app's routes use (see exporter/server/prefix.py).
ROUTE_NAMES = frozenset({"datasets", "files", "links", "downloads", "tokens", "session",
                         "healthz", "docs", "redoc", "openapi.json", "exports", "metrics"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXPORTER_", extra="ignore")

    # No URL means: start the embedded PostgreSQL with its data under `data_dir`.
    database_url: str | None = None
    # Everything a local run writes: the embedded PostgreSQL (`pgdata`), stored exports
    # (`exports`, unless EXPORTER_EXPORTS_DIR), the demo files (`files`, unless
    # EXPORTER_FILES_ROOT) and the demo token. Relative to the working directory, so
    # ./var in the checkout by default; put it anywhere else to keep the checkout small.
    data_dir: Path = Path("var")
    # Set by `exporter serve` for its app when it made the local demo's token (the embedded
    # database): the page signed out says where it is kept.
    demo_token_file: Path | None = None
    # What `exporter serve` loads into an empty embedded database on its first start, and
    # the size of the large demo file it writes into the default files root (the local
    # demo's sizes; tests and the quick benchmark start from nothing with small ones).
    demo_rows: int = Field(default=1_000_000, ge=0)
    demo_file_size: str = Field(default="1G", pattern=r"(?i)^\d+(\.\d+)?([KMGT]i?)?B?$")
    # `schema` would shadow a pydantic attribute, hence the alias.
    dataset_schema: str = Field(default="exports", validation_alias="EXPORTER_SCHEMA")
    # A hot standby of that database: exports (their snapshot, value checks and COPY) read
    # there, everything that writes (audit, tokens, link keys) and the catalog stay on the
    # primary. Unset: exports read from the primary. Its pool has the primary's sizes.
    replica_url: str | None = None

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # The URL clients reach the server at, as a proxy in front publishes it
    # ("https://downloads.example.com"; the path prefix is `root_path`). Signed links, of
    # POST /links and of `exporter link` alike, start with it. Unset: POST /links uses the
    # host the client asked for, `exporter link` http://host:port of these settings.
    public_url: str = ""
    pool_size: int = Field(default=10, ge=1)
    pool_max_overflow: int = Field(default=20, ge=0)
    # Seconds a request waits for a pool connection before its 503. Exports are capped
    # below the pool's size (`max_exports`), so the app's own small queries (tokens,
    # audit, catalog) find one at once and a long wait only means trouble.
    pool_timeout: float = Field(default=5.0, gt=0)

    # Seconds an export (GET, HEAD, stored) may take from its admission to its first row:
    # its checks, counts and the wait for COPY's first row together; past it the answer
    # is 504 (a stored export fails). PostgreSQL enforces it too (statement_timeout in
    # the export's transaction). Only that is bounded: once rows flow, a 100 GB export
    # may stream for hours, cut only by `export_idle_timeout` and `export_max_duration`.
    statement_timeout: float = Field(default=60.0, gt=0)
    # Exports: PostgreSQL hands COPY output over in small pieces; they are coalesced
    # into chunks of this size, and at most `export_buffer_chunks` of them wait for
    # a slow client before the database is made to wait too.
    export_chunk_size: int = Field(default=64 * 1024, ge=1)
    export_buffer_chunks: int = Field(default=8, ge=1)
    # A chunk smaller than `export_chunk_size` is sent after this many seconds anyway,
    # so a query that trickles rows still shows progress.
    export_flush_interval: float = Field(default=0.05, gt=0)
    # `Prefer: count=estimated` (PostgREST's): an exact count(*) while the planner
    # expects at most this many rows, its estimate above (a count costs a full scan).
    count_estimated_above: int = Field(default=100_000, ge=0)
    # A whole-table export (a table or materialized view of at least
    # `export_parallel_min_pages` pages by the catalog's estimate, its plan a scan) is read
    # as this many ctid ranges, each by a PostgreSQL backend of its own, all in the export's
    # snapshot (exports/parallel.py). The extra backends take export slots only while half
    # of `max_exports` stays free, never more than a principal's download cap: under load
    # the export is one COPY, as with 1 here. The ranges ahead of the one being sent wait
    # in memory (`export_chunk_size` x `export_buffer_chunks` each), then in temporary
    # files of at most `export_parallel_spool` bytes per export, in the exports folder
    # (what lets them read ahead: with less, they wait for the range being sent).
    export_parallel: int = Field(default=4, ge=1, le=64)
    export_parallel_min_pages: int = Field(default=1024, ge=1)
    export_parallel_spool: int = Field(default=1024**3, ge=0)

    # Files: served from this folder (relative paths are taken from the working directory);
    # unset, `data_dir`/files, the demo's own folder. Or from object storage:
    # `s3://bucket/prefix` (the `s3_*` settings below; files_store/files_folder say which).
    files_root: Path | str = Path("var/files")
    # Bytes per file read, and so per body chunk. The downloads in progress (per process)
    # share `file_read_budget`, counted in bytes read and not yet taken by their sockets:
    # a read gets a fair share of it, at most `file_chunk_size_max` and no more than
    # what is left, but never less than `file_chunk_size`. Measured here (2 cores,
    # loopback, curl, one download): 256 KiB reads 1.2 GB/s, 1 MiB reads 2.1 GB/s (nginx
    # with sendfile: 2.6 GB/s). So one to 24 fast downloads read 1 MiB at a time, and
    # 1,000 slow ones hold about the budget plus 16 KiB each (server peak RSS, see
    # docs/benchmarks.md, "server memory against slow clients").
    file_chunk_size: int = Field(default=16 * 1024, ge=4096, le=16 * 1024 * 1024)
    file_chunk_size_max: int = Field(default=1024 * 1024, ge=4096, le=16 * 1024 * 1024)
    file_read_budget: int = Field(default=24 * 1024 * 1024, ge=4096)
    # Bytes a client's socket may hold not yet sent (Linux TCP_NOTSENT_LOWAT); 0 leaves the
    # kernel's default, which lets the send buffer grow to 4 MiB even for a client that
    # reads nothing. 131072 made 1,000 stalled clients cost the server far less work (their
    # answers all started after 23 s instead of 58 s) but looked 10-17% slower for one
    # fast download in every noisy comparison here, so it is off unless set.
    socket_notsent_lowat: int = Field(default=0, ge=0)
    # More ranges than this in one Range header: the whole file is sent (200), as nginx does.
    max_ranges: int = Field(default=16, ge=1)
    # Names starting with a dot (.git, .env) are neither served nor listed unless allowed.
    serve_hidden: bool = False

    # Content codings (gzip, zstd) for exports and compressible files, negotiated from
    # Accept-Encoding; false sends identity always (the explicit .gz/.zst export URLs
    # still work: they are files in that format, not a coding).
    compression: bool = True
    # Levels. Measured on the demo table's CSV (docs/benchmarks.md, "Compression"), one
    # core: zstd 1 432 MB/s at 5.8x, zstd 3 247 MB/s at 5.7x (slower and no smaller),
    # zstd 9 32 MB/s at 6.0x; gzip 1 107 MB/s at 4.6x, gzip 6 47 MB/s at 5.5x. Above the
    # fast ends compression, not the link or COPY, sets the pace.
    gzip_level: int = Field(default=1, ge=1, le=9)
    zstd_level: int = Field(default=1, ge=1, le=19)
    # Parquet exports (exporter/exports/renderers/parquet.py): a row group is written
    # once its rows hold this many bytes in memory (as Arrow), so an export's memory is
    # bounded by it, whatever the number of rows; and the codec of its pages.
    parquet_row_group_bytes: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024)
    parquet_compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = "zstd"
    # Files whose type matches one of these (a `type/*` or a full media type) are
    # compressed on the fly when the client accepts it and asks no Range; archives,
    # images and video are not (already compressed). JSON list.
    compress_types: list[str] = [
        "text/*", "application/json", "application/x-ndjson", "application/xml",
        "application/javascript", "application/x-yaml", "application/yaml",
        "application/sql", "application/geo+json", "application/ld+json",
        "image/svg+xml", "image/bmp", "application/x-tar", "application/wasm",
    ]
    # Files smaller than this many bytes are sent as they are: the coding's framing would
    # eat what it saves.
    compress_min_size: int = Field(default=1024, ge=0)

    # Access. Anonymous clients get nothing unless these name what is public: dataset
    # names and folder prefixes (JSON lists; "*" for all).
    public_datasets: list[str] = []
    public_files: list[str] = []
    # The key that signs links; unset, one is generated once and kept in the database.
    link_secret: str | None = None
    # Downloads in progress per principal (token, link, anonymous address), in the whole
    # deployment.
    max_downloads_per_principal: int = Field(default=4, ge=1)
    # Bytes per second per download; 0 means no cap.
    max_bytes_per_second: int = Field(default=0, ge=0)
    # Seconds a request over its principal's cap waits for one of its downloads to end
    # before its 429: `curl --parallel` and `aria2c -x 8` open more connections at once.
    # 0 answers 429 at once. A client that leaves stops waiting.
    limit_wait: float = Field(default=10.0, ge=0)
    # Exports at once in the whole deployment, whoever asks: each holds a pool connection
    # (and a snapshot) for as long as its client reads, so this stays below pool_size +
    # pool_max_overflow and leaves connections for the app's own queries (it is lowered
    # to that total minus 2 if set higher). Over it, a request waits up to
    # `max_exports_wait` seconds, then gets 503 with Retry-After.
    max_exports: int = Field(default=20, ge=1)
    max_exports_wait: float = Field(default=2.0, ge=0)
    # An export whose client has read nothing for this many seconds while data waits for
    # it is cut (the client sees a broken download, the audit says why) and its snapshot
    # and connection are released; 0 turns this off.
    export_idle_timeout: float = Field(default=60.0, ge=0)
    # Seconds an export may stream in all before it is cut the same way; 0 (the default)
    # means no limit: a 100 GB export may take hours.
    export_max_duration: float = Field(default=0.0, ge=0)
    # The audit rows of downloads are written in batches, by one task per process, this
    # many seconds after their event (and at most two batches a second).
    audit_flush_interval: float = Field(default=0.05, gt=0, le=60)
    # Audit rows waiting to be written (the database down or slow) beyond which new
    # downloads get 503 rather than go unrecorded; below it, downloads go on.
    audit_max_pending: int = Field(default=10_000, ge=1)
    # The caps above hold for the whole deployment (every worker and host on the same
    # database). Seconds the slots of a server process that died (kill -9, a lost host)
    # still count; a live process renews its lease every third of it.
    slot_lease: float = Field(default=15.0, ge=1)
    # Seconds a process keeps download slots it took beyond what its downloads use now
    # (its peak of the last this many seconds): a stream of downloads then takes none
    # from the database. Another process may wait this long for them at the cap; 0 gives
    # them back at once.
    slot_linger: float = Field(default=1.0, ge=0, le=60)
    # Seconds a token checked once is trusted from memory. Revocations and scope
    # changes reach every process at once through LISTEN/NOTIFY; this bounds what a
    # lost notification could cost. 0: every request reads the database.
    token_cache_ttl: float = Field(default=10.0, ge=0, le=3600)

    # Stored exports (POST /exports, `Prefer: respond-async`): their files go into this
    # folder (unset: `data_dir`/exports), or into an object store, `s3://bucket/prefix`
    # (the EXPORTER_S3_* settings below). Several hosts may share it (NFS, or the store):
    # any host then answers for any stored export (docs/deploy.md).
    exports_dir: str | None = None
    # Bytes all stored exports may take together, running ones included: a kick-off that
    # finds it full gets 507, a running export that crosses it fails. Copies of streamed
    # exports (for resuming) are removed, oldest first, whenever an export needs room.
    # 0: no quota (and no shares below).
    exports_max_bytes: int = Field(default=10 * 1024**3, ge=0)
    # The share of exports_max_bytes one principal's stored exports (POST /exports) may
    # hold together (a fraction: 0.25 of 10 GiB is 2.5 GiB), so that no principal fills
    # the quota for everyone. A principal is what the download caps count by: a token
    # with the links it made, an anonymous client's address. 1: no share of one's own.
    exports_quota_per_principal: float = Field(default=0.25, gt=0, le=1)
    # How long a finished stored export (and its file) is kept: 90s, 15m, 24h, 7d.
    exports_retention: str = "24h"
    # Seconds between two runs of the clean-up (expired exports, partial files, orphans,
    # exports whose runner stopped beating).
    exports_cleanup_interval: float = Field(default=60.0, gt=0)
    # Seconds between two progress updates of a running stored export (rows, bytes, its
    # heartbeat); one whose heartbeat is older than 5 of these is taken for dead.
    exports_progress_interval: float = Field(default=1.0, gt=0, le=60)
    # Streamed exports (identity bytes) keep a stored copy, so that a broken download can
    # be resumed with the same URL (`curl -C -`, `wget -c`); if the client leaves, the
    # copy is completed at COPY speed. Within the quota; kept this long.
    exports_resume: bool = True
    # How long the copy of a download that was cut is kept (for `curl -C -`, `wget -c`),
    # and that of a download sent whole (for a client that lost the end anyway).
    exports_resume_retention: str = "1h"
    exports_resume_complete_retention: str = "1m"
    # The share of exports_max_bytes the copies may hold together (a fraction): a copy
    # that needs more removes the oldest (those of downloads sent whole first), and goes
    # without a copy if that is not enough.
    exports_resume_share: float = Field(default=0.5, gt=0, le=1)
    # Seconds the rest of a copy may take once its client left; past it the copy is
    # dropped (a download given up early on a huge export is not worth finishing).
    exports_resume_finish: float = Field(default=300.0, ge=0)

    # Object storage (exporter/objects.py), for the `s3://bucket/prefix` settings. The
    # endpoint and credentials are the standard variables every S3 client reads
    # (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION); these are
    # ours. A plain-http endpoint (a store on the same host or network) must be allowed.
    s3_allow_http: bool = False
    # Buckets addressed as bucket.endpoint (AWS's own style) rather than endpoint/bucket
    # (the path style MinIO, SeaweedFS and most self-hosted stores expect).
    s3_virtual_hosted_style: bool = False
    # Seconds one request to the store may take, its retries included (a body streamed to
    # a client is bounded by its idle time instead).
    s3_timeout: float = Field(default=30.0, gt=0)
    # Objects written as they come (stored exports, resume copies) are uploaded in parts of
    # this many bytes (S3's smallest is 5 MiB); about two parts per upload are in memory.
    s3_part_size: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024,
                              le=5 * 1024 * 1024 * 1024)
    # Seconds a folder's listing from the store is kept in each process (the listings and
    # the page ask again within it without a LIST); what this process writes shows at
    # once, what others write within this time. 0: every listing asks the store.
    s3_list_cache: float = Field(default=3.0, ge=0, le=3600)

    # Web apps on these origins (JSON list, e.g. ["https://ui.example.com"]) may fetch
    # exports and files with a token; other origins get no CORS headers.
    cors_origins: list[str] = []

    # The HTTP server (per worker process). A reverse proxy in front is still advised.
    # Bytes of a request head (request line and headers) beyond which the answer is 431,
    # as nginx's large_client_header_buffers (4 x 8k) but with room for long cookies.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    # Seconds a request head may take to arrive (from the connection, or from its first
    # byte on a kept-alive one), as nginx's client_header_timeout; past it, 408 and close.
    header_timeout: float = Field(default=60.0, gt=0)
    # Connections served at once; a request on any connection beyond them gets 503.
    max_connections: int = Field(default=512, ge=1)
    # Seconds an idle kept-alive connection stays open (uvicorn's default).
    keep_alive_timeout: float = Field(default=5.0, gt=0)
    # Addresses of the proxies whose X-Forwarded-For / X-Forwarded-Proto are believed,
    # comma-separated, as uvicorn's --forwarded-allow-ips ("127.0.0.1", "10.0.0.0/8",
    # "*"). Empty: nobody's, so the audit and the limits see the connection's address.
    forwarded_allow_ips: str = ""
    # On SIGTERM the server stops accepting connections and lets the downloads in progress
    # run this many seconds more; those still running then are cut (the client sees a
    # broken download, the audit says aborted).
    shutdown_grace: int = Field(default=30, ge=0)
    # With --workers N, seconds a worker may take to answer the supervisor's health check
    # before it is killed and started again. uvicorn's 5 s was seen too short for a worker
    # still importing the app on a loaded 2-core host (only one worker came up).
    worker_healthcheck_timeout: int = Field(default=30, ge=1)
    # Logs on stderr, every line with its time and level: "plain" text or "json" (one
    # object a line). A line per finished download: principal, target, bytes, status, time.
    log_format: Literal["plain", "json"] = "plain"
    # The path prefix under which a reverse proxy publishes the server ("/exporter"):
    # every URL the server makes (listings, links, redirects, the page, the cookie) carries
    # it, and requests are served whether the proxy strips it or not. Empty: the root.
    root_path: str = ""
    # Set ("/internal/"), a file's GET and HEAD are answered, after the checks and the
    # audit row, with `X-Accel-Redirect: <this><real path>` and no body: nginx sends the
    # bytes from an `internal` location (with sendfile, Range and conditions of its own).
    files_accel_redirect: str = ""
    # With files in object storage: "presigned" answers a file's GET, after the checks and
    # the audit row, with a 302 to a pre-signed URL of the store, valid this many seconds
    # (the store sends the bytes, Range and all; for stores the clients can reach).
    files_redirect: Literal["", "presigned"] = ""
    files_redirect_expiry: int = Field(default=300, ge=1, le=7 * 24 * 3600)

    # Metrics for Prometheus (docs/deploy.md, "Metrics"): GET /metrics answers admins'
    # tokens; false turns it off (and the counting per request with it).
    metrics: bool = True
    # An address ("127.0.0.1:9100", "[::1]:9100") where `exporter serve` answers /metrics
    # without authentication, for a Prometheus that reaches it and no one else (as Caddy's
    # admin endpoint). With --workers N it gives every worker's values added up.
    metrics_bind: str = ""
    # Seconds between two readings of what the metrics sample (the pool, the audit queue,
    # the stored exports' states and bytes, one small query) in each server process.
    metrics_interval: float = Field(default=5.0, gt=0, le=3600)
    # Export counts and rows per dataset name (exporter_dataset_*): one series per
    # dataset, so only where the datasets are few and their names no secret.
    metrics_dataset_labels: bool = False
    # OpenTelemetry traces, one span per request (not one per chunk: a streamed download
    # has thousands): "otlp" sends them where OTEL_EXPORTER_OTLP_ENDPOINT says (the
    # `tracing` extra), "console" writes one JSON object per span and line to
    # `tracing_file` (unset: standard output). OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER
    # and the other OTEL_* variables apply.
    tracing: Literal["off", "otlp", "console"] = "off"
    tracing_file: Path | None = None

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value: str) -> str:
        value = value.strip()
        if value in ("", "/"):
            return ""
        # Unreserved characters only: the prefix then reads the same percent-encoded or
        # not, so it can be compared with the raw request path byte for byte.
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+/?", value) or "/../" in value + "/" \
                or "/./" in value + "/":
            raise ValueError("EXPORTER_ROOT_PATH is a path such as /exporter (letters, digits,"
                             " . _ ~ - between slashes)")
        value = value.rstrip("/")
        # A proxy that strips the prefix sends the routes' own paths: a prefix that starts
        # like one of them could not be told apart.
        if value.split("/")[1] in ROUTE_NAMES:
            raise ValueError(f"EXPORTER_ROOT_PATH may not start with a route's name ({value})")
        return value

    @field_validator("files_root", mode="before")
    @classmethod
    def _folder_or_store(cls, value: object) -> object:
        # A folder stays a Path; only an s3:// URL is kept as text (a Path would fold its
        # `//`).
        if isinstance(value, str) and value.strip().startswith("s3://"):
            # Imported here: obstore's client (about 0.1 s) only where a store is used.
            from exporter.objects import StoreUrl

            return str(StoreUrl.parse(value.strip()))  # its ValueError says what is wrong
        return Path(value) if isinstance(value, str) else value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # What a listening socket takes: a name or an address (IPv6 without brackets).
        if not re.fullmatch(r"[A-Za-z0-9._:%-]+", value.strip()):
            raise ValueError("not an address or host name to listen on (such as 127.0.0.1,"
                             " 0.0.0.0 or ::1)")
        return value.strip()

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        try:
            url = urlsplit(value)
            url.port  # noqa: B018 - raises ValueError for a port that is not one
        except ValueError:
            url = urlsplit("")
        if url.scheme not in ("http", "https") or not url.hostname or url.username \
                or url.password or url.query or url.fragment or "#" in value:
            raise ValueError("not the URL clients reach the server at (such as"
                             " https://downloads.example.com)")
        if url.path not in ("", "/"):
            raise ValueError("a scheme and a host (and port) only: a path prefix"
                             f" ({url.path}) goes into EXPORTER_ROOT_PATH")
        return f"{url.scheme}://{url.netloc}"

    @field_validator("files_accel_redirect")
    @classmethod
    def _accel(cls, value: str) -> str:
        value = value.strip()
        if value and not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+/", value):
            raise ValueError("EXPORTER_FILES_ACCEL_REDIRECT is nginx's internal location, such"
                             " as /internal/ (starting and ending with /)")
        return value

    @field_validator("exports_dir", mode="before")
    @classmethod
    def _exports_dir(cls, value: object) -> object:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, str) and value.startswith("s3://"):
            from exporter.objects import StoreUrl  # obstore, only for those who use it

            return str(StoreUrl.parse(value))  # ValueError says what is wrong
        return value

    @field_validator("metrics_bind")
    @classmethod
    def _metrics_bind(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        found = re.fullmatch(r"(\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9._-]*):([0-9]{1,5})", value)
        if not found or not 1 <= int(found[2]) <= 65535:
            raise ValueError("EXPORTER_METRICS_BIND is an address and a port, such as"
                             " 127.0.0.1:9100 or [::1]:9100")
        return value

    @field_validator("exports_retention", "exports_resume_retention",
                     "exports_resume_complete_retention")
    @classmethod
    def _retention(cls, value: str, info: ValidationInfo) -> str:
        # The form of exporter/access/durations.py (which the core may not import); that
        # module reads it.
        value = value.strip()
        if not re.fullmatch(r"[0-9]{1,6}[smhdw]", value) or int(value[:-1]) == 0:
            raise ValueError(f"EXPORTER_{str(info.field_name).upper()} is a duration such as"
                             " 90s, 15m, 24h, 7d or 2w")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, url: str | None) -> str | None:
        if url is not None:
            from exporter.db import connect_arguments

            connect_arguments(url)  # a ValueError names what is wrong, never the password
        return url

    @field_validator("dataset_schema")
    @classmethod
    def _not_our_schema(cls, schema: str) -> str:
        # The app's schema holds the tokens and the link signing key: published as a
        # dataset schema, they would be downloadable. The system schemas are no data.
        if schema == APP_SCHEMA:
            raise ValueError(f"{APP_SCHEMA!r} is the app's own schema (tokens, signing key);"
                             " datasets need another one")
        if not schema or schema.startswith("pg_") or schema == "information_schema":
            raise ValueError(f"{schema!r} is not a schema of datasets")
        return schema

    @model_validator(mode="after")
    def _files_root_under_data_dir(self) -> Settings:
        if "files_root" not in self.model_fields_set:
            # Past pydantic's __setattr__, which would count it as set.
            self.__dict__["files_root"] = self.data_dir / "files"
        return self

    @property
    def files_store(self) -> str | None:
        """The `s3://bucket/prefix` the files are served from, if not a folder."""
        return self.files_root if isinstance(self.files_root, str) else None

    @property
    def files_folder(self) -> Path:
        """The folder the files are served from; RuntimeError where they are in a store."""
        if isinstance(self.files_root, str):
            raise RuntimeError(f"the files are in object storage ({self.files_root})")
        return self.files_root

    @property
    def files_root_is_default(self) -> bool:
        """Unset: the demo's own folder under `data_dir`, where it may write its files."""
        return "files_root" not in self.model_fields_set

    @model_validator(mode="after")
    def _redirects_fit_the_root(self) -> Settings:
        if self.files_redirect and self.files_store is None:
            raise ValueError("EXPORTER_FILES_REDIRECT=presigned needs the files in object"
                             " storage (EXPORTER_FILES_ROOT=s3://bucket/prefix)")
        if self.files_accel_redirect and self.files_store is not None:
            raise ValueError("EXPORTER_FILES_ACCEL_REDIRECT serves files from a folder nginx"
                             " reads; with files in object storage, use"
                             " EXPORTER_FILES_REDIRECT=presigned")
        return self

    @model_validator(mode="after")
    def _chunk_sizes_in_order(self) -> Settings:
        if self.file_chunk_size > self.file_chunk_size_max:
            raise ValueError(
                f"EXPORTER_FILE_CHUNK_SIZE ({self.file_chunk_size}) is larger than"
                f" EXPORTER_FILE_CHUNK_SIZE_MAX ({self.file_chunk_size_max})")
        return self

    @property
    def public_base(self) -> str | None:
        """Where signed links start (`public_url` and the prefix), if configured."""
        return self.public_url + self.root_path if self.public_url else None

    @property
    def public_netloc(self) -> str | None:
        return urlsplit(self.public_url).netloc if self.public_url else None

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def export_cap(self) -> int:
        """`max_exports`, kept two connections below the pool's total."""
        return max(1, min(self.max_exports, self.pool_size + self.pool_max_overflow - 2))

    @property
    def exports_store(self) -> str | None:
        """EXPORTER_EXPORTS_DIR when it is an object store (`s3://bucket/prefix`)."""
        # str(): a copy of the settings (model_copy) may hold a Path, unvalidated.
        dir = None if self.exports_dir is None else str(self.exports_dir)
        return dir if dir is not None and dir.startswith("s3://") else None

    @property
    def exports_folder(self) -> Path:
        """The stored exports' folder (not used when they go to an object store)."""
        return Path(self.exports_dir) if self.exports_dir is not None \
            else self.data_dir / "exports"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"


@lru_cache
def get_settings() -> Settings:
    return Settings()
