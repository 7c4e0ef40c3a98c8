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

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"


@lru_cache
def get_settings() -> Settings:
    return Settings()
