"""OpenTelemetry traces of requests (EXPORTER_TRACING, off by default).

FastAPI's instrumentation makes a server span per request, and by default a span per
ASGI `receive` and `send` message under it: a streamed download of 1 GB in 64 KiB
chunks would make 16,000 spans. Those are left out (`exclude_spans`): a download is one
span, whatever its size. The packages are the `tracing` extra; imported only when on.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import IO, Any

from fastapi import FastAPI

from exporter import __version__
from exporter.config import Settings

log = logging.getLogger(__name__)


def _console_exporter(settings: Settings) -> tuple[Any, Callable[[], None]]:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    out: IO[str] = sys.stdout
    close: Callable[[], None] = lambda: None  # noqa: E731
    if settings.tracing_file is not None:
        # Appended to, one line per span: several workers may share the file.
        out = open(settings.tracing_file, "a", encoding="utf-8")  # noqa: SIM115
        close = out.close

    def one_line(span: Any) -> str:
        return json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n"

    return ConsoleSpanExporter(out=out, formatter=one_line), close


def instrument(app: FastAPI, settings: Settings) -> Callable[[], None] | None:
    """Trace `app`'s requests if EXPORTER_TRACING says so; what ends it (flushes the
    spans not sent yet), at shutdown. RuntimeError if the `tracing` extra is missing."""
    if settings.tracing == "off":
        return None
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise RuntimeError(f"EXPORTER_TRACING={settings.tracing} needs the `tracing` extra"
                           f" (pip install 'exporter[tracing]'): {error}") from error
    close: Callable[[], None] = lambda: None  # noqa: E731
    if settings.tracing == "console":
        exporter, close = _console_exporter(settings)
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as error:
            raise RuntimeError("EXPORTER_TRACING=otlp needs opentelemetry-exporter-otlp-proto-"
                               f"http (the `tracing` extra): {error}") from error
        exporter = OTLPSpanExporter()
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, if set, win over these.
    resource = Resource.create({"service.name": "exporter", "service.version": __version__})
    provider = TracerProvider(resource=resource)
    # Spans leave in batches from a thread of the SDK's, never on the event loop.
    provider.add_span_processor(BatchSpanProcessor(exporter))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider,
                                       exclude_spans=["receive", "send"])
    log.info("tracing requests (EXPORTER_TRACING=%s)", settings.tracing)

    def shutdown() -> None:
        provider.shutdown()
        close()

    return shutdown
