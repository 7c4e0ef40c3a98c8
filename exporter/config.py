"""All settings, read once from `EXPORTER_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXPORTER_", extra="ignore")

    # No URL means: start the embedded PostgreSQL with its data under `data_dir`.
    database_url: str | None = None
    data_dir: Path = Path("var")
    # `schema` would shadow a pydantic attribute, hence the alias.
    dataset_schema: str = Field(default="exports", validation_alias="EXPORTER_SCHEMA")

    host: str = "127.0.0.1"
    port: int = 8000
    pool_size: int = 10
    pool_max_overflow: int = 20

    # Seconds an export may take before its first row; past it the answer is 504.
    # Only the wait for the first row is bounded: a 100 GB export may stream for hours.
    statement_timeout: float = 60.0
    # Exports: PostgreSQL hands COPY output over in small pieces; they are coalesced
    # into chunks of this size, and at most `export_buffer_chunks` of them wait for
    # a slow client before the database is made to wait too.
    export_chunk_size: int = 64 * 1024
    export_buffer_chunks: int = 8
    # A chunk smaller than `export_chunk_size` is sent after this many seconds anyway,
    # so a query that trickles rows still shows progress.
    export_flush_interval: float = 0.05

    # Files: served from this folder (relative paths are taken from the working directory).
    files_root: Path = Path("var/files")
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

    # Access. Anonymous clients get nothing unless these name what is public: dataset
    # names and folder prefixes (JSON lists; "*" for all).
    public_datasets: list[str] = []
    public_files: list[str] = []
    # The key that signs links; unset, one is generated once and kept in the database.
    link_secret: str | None = None
    # Downloads in progress per principal (token, link, anonymous address), per process.
    max_downloads_per_principal: int = Field(default=4, ge=1)
    # Bytes per second per download; 0 means no cap.
    max_bytes_per_second: int = Field(default=0, ge=0)

    # Web apps on these origins (JSON list, e.g. ["https://ui.example.com"]) may fetch
    # exports and files with a token; other origins get no CORS headers.
    cors_origins: list[str] = []

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"


@lru_cache
def get_settings() -> Settings:
    return Settings()
