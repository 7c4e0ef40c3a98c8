"""Object storage: one S3 bucket and prefix (`s3://bucket/prefix`) as the features use it.

A thin async layer over obstore (Rust's object_store): head, a streamed ranged get with
bounded memory, listings, put, a multipart writer that completes atomically or not at all,
delete and pre-signed GET URLs, and the multipart uploads left incomplete (listed and
aborted with requests signed here: obstore has no call for them). Endpoint and
credentials come from the standard variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, which obstore reads itself), what is ours from
`EXPORTER_S3_*` (config.py).

Every key is checked before it reaches the client (`check_key`): no empty, `.` or `..`
segment, no leading slash, no backslash (SeaweedFS takes it for a separator), no control
character; so nothing names an object outside the prefix. Errors come out as three kinds:
`ObjectMissing`, `ObjectChanged` (an ETag precondition failed) and `StoreUnavailable`
(everything else: the network, the server, the credentials), never obstore's own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

import httpx
import obstore
from obstore.exceptions import NotFoundError, PreconditionError
from obstore.store import S3Store

if TYPE_CHECKING:
    from obstore import GetOptions, ObjectMeta

    from exporter.config import Settings

log = logging.getLogger(__name__)

SCHEME = "s3://"
# S3's limit on a key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
# S3's smallest part but the last.
MIN_PART_SIZE = 5 * 1024 * 1024
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What a health check asks for when it cannot list one key (ObjectStore.ping).
_PING_KEY = ".exporter-health"


class BadKey(ValueError):
    """A key or prefix that could name something outside the store's prefix."""


class ObjectMissing(LookupError):
    pass


class ObjectChanged(Exception):
    """The object is no longer the one asked for (its ETag differs)."""


class StoreUnavailable(Exception):
    """The store failed: unreachable, an error of its own, credentials refused."""


def is_store_url(value: str) -> bool:
    return value.startswith(SCHEME)


def check_key(key: str) -> str:
    """`key` if it names an object under the prefix and nothing else, else BadKey."""
    if not key:
        raise BadKey("an empty key")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadKey(f"a key longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise BadKey("a key starting with /")
    if "\\" in key:
        raise BadKey("a backslash in a key")
    if _CONTROL.search(key):
        raise BadKey("a control character in a key")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise BadKey(f"a key with a segment {segment!r}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise BadKey("a key that is not UTF-8") from None
    return key


def check_folder(folder: str) -> str:
    """A folder as a listing prefix: "" for the top, else its key ending with "/"."""
    if folder == "":
        return ""
    return check_key(folder.removesuffix("/")) + "/"


@dataclass(frozen=True)
class StoreUrl:
    bucket: str
    prefix: str  # "" or a valid key, without its trailing "/"

    @classmethod
    def parse(cls, url: str) -> StoreUrl:
        """`s3://bucket` or `s3://bucket/prefix`; ValueError says what is wrong."""
        if not is_store_url(url):
            raise ValueError(f"not an s3:// URL: {url!r}")
        parts = urlsplit(url)
        if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError("an s3:// URL is s3://bucket/prefix (no user, port, query)")
        if not _BUCKET.fullmatch(parts.netloc):
            raise ValueError(f"not a bucket name: {parts.netloc!r}")
        prefix = parts.path.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except BadKey as e:
                raise ValueError(f"not a prefix: {e}") from None
        return cls(parts.netloc, prefix)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")


@dataclass(frozen=True)
class StoreOptions:
    """What is ours to set (EXPORTER_S3_*); the rest is the standard AWS variables."""

    allow_http: bool = False
    virtual_hosted_style: bool = False
    # Seconds one request (a head, a listing page, a part) may take, its retries included.
    timeout: float = 30.0
    part_size: int = 8 * 1024 * 1024
    # Seconds a folder's listing is kept (`listings`); 0: every listing asks the store.
    list_cache: float = 3.0

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreOptions:
        return cls(allow_http=settings.s3_allow_http,
                   virtual_hosted_style=settings.s3_virtual_hosted_style,
                   timeout=settings.s3_timeout, part_size=settings.s3_part_size,
                   list_cache=settings.s3_list_cache)


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's prefix
    size: int
    etag: str | None  # as S3 gives it, quoted
    modified: datetime

    @classmethod
    def of(cls, meta: ObjectMeta) -> ObjectInfo:
        return cls(meta["path"], meta["size"], meta["e_tag"], meta["last_modified"])


@dataclass(frozen=True)
class Listing:
    """A folder's direct content: its objects and its sub-folders (keys ending in "/")."""

    objects: list[ObjectInfo]
    folders: list[str]


class ListingCache:
    """The folders' listings of every store in this process, each kept for its store's
    `list_cache` seconds: a folder's listing (and the page) asked again and again costs
    one LIST per folder per period, not one per request.

    Bounded: at most `max_items` objects and folders in all, the oldest listings dropped
    first (a larger listing is not kept). A write through any store of this process (a
    stored export, a resume copy, a put, a delete) drops the listings it changes at
    once, so this process sees its own writes; other writers' show within the period.
    """

    def __init__(self, max_items: int = 50_000) -> None:
        self.max_items = max_items
        self.items = 0
        # (bucket, the store's prefix, the folder) -> when listed, the listing
        self._kept: collections.OrderedDict[tuple[str, str, str], tuple[float, Listing]] = \
            collections.OrderedDict()
        # Moves on every write: a listing asked before a write and answered after it may
        # not show it, and is not kept.
        self.generation = 0
        # Apps on loops of their own in one process (the tests' in-process servers).
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str], ttl: float) -> Listing | None:
        with self._lock:
            kept = self._kept.get(key)
            if kept is None:
                return None
            if time.monotonic() - kept[0] >= ttl:
                self._drop(key)
                return None
            return kept[1]

    def put(self, key: tuple[str, str, str], listing: Listing, generation: int) -> None:
        size = len(listing.objects) + len(listing.folders) + 1
        with self._lock:
            if generation != self.generation or size > self.max_items:
                return
            self._drop(key)
            self._kept[key] = (time.monotonic(), listing)
            self.items += size
            while self.items > self.max_items:
                self._drop(next(iter(self._kept)))

    def wrote(self, bucket: str, full_key: str) -> None:
        """An object was written or deleted at `full_key` (with its store's prefix)."""
        with self._lock:
            self.generation += 1
            for key in [k for k in self._kept if k[0] == bucket
                        and full_key.startswith("/".join(p for p in k[1:] if p))]:
                self._drop(key)

    def _drop(self, key: tuple[str, str, str]) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self.items -= len(kept[1].objects) + len(kept[1].folders) + 1


# One for the process: the files' store and the stored exports' may share a bucket.
listings = ListingCache()


@dataclass(frozen=True)
class Upload:
    """A multipart upload begun and neither completed nor aborted (its parts take room)."""

    key: str  # relative to the store's prefix
    upload_id: str
    initiated: datetime


@contextlib.contextmanager
def _errors(key: str, *, listing: bool = False) -> Iterator[None]:
    try:
        yield
    except (FileNotFoundError, NotFoundError) as e:
        if listing:  # a prefix is never missing, only its bucket
            raise StoreUnavailable(f"no such bucket: {str(e).splitlines()[0][:300]}") from e
        raise ObjectMissing(key) from None
    except PreconditionError:
        raise ObjectChanged(key) from None
    except (BadKey, ObjectMissing, ObjectChanged, StoreUnavailable):
        raise
    except Exception as e:  # obstore's errors, the network's: the store failed
        raise StoreUnavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e


class ObjectStore:
    """One bucket and prefix. Two clients: one with a deadline for every request, one
    for bodies, which may stream for hours to a slow client (object_store's default
    deadline of 30 s covers a whole response, its body included)."""

    def __init__(self, url: str | StoreUrl, options: StoreOptions | None = None) -> None:
        self.url = url if isinstance(url, StoreUrl) else StoreUrl.parse(url)
        self.options = options or StoreOptions()
        self.lists = 0  # LIST requests made for folders (list_folder, folder_exists)
        config: dict[str, Any] = {
            "virtual_hosted_style_request": self.options.virtual_hosted_style}
        deadline = timedelta(seconds=self.options.timeout)
        retry: dict[str, Any] = {"max_retries": 3, "retry_timeout": deadline}
        prefix = self.url.prefix or None
        self._store = S3Store(
            self.url.bucket, prefix=prefix, config=config, retry_config=retry,  # type: ignore[arg-type]
            client_options={"allow_http": self.options.allow_http, "timeout": deadline,
                            "connect_timeout": deadline})
        self._bodies = S3Store(
            self.url.bucket, prefix=prefix, config=config, retry_config=retry,  # type: ignore[arg-type]
            client_options={"allow_http": self.options.allow_http,
                            "timeout": timedelta(days=7), "connect_timeout": deadline,
                            # A body that stops coming (not one the client is slow to
                            # take: nothing is read then) is cut.
                            "read_timeout": deadline})

    def __repr__(self) -> str:
        return f"ObjectStore({str(self.url)!r})"

    async def ping(self) -> None:
        """One cheap request, for a health check: a one-key listing of the prefix (a
        missing bucket, refused credentials or a store that fails it: StoreUnavailable).
        Without static credentials, a HEAD of a key that need not exist (obstore lists
        no fewer than a page)."""
        credentials = _Credentials.from_environ(self)
        if credentials is None:
            try:
                with _errors(_PING_KEY):
                    await obstore.head_async(self._store, _PING_KEY)
            except ObjectMissing:
                pass  # the store answered
            return
        prefix = f"{self.url.prefix}/" if self.url.prefix else ""
        await _signed(self, "GET", "", {"list-type": "2", "max-keys": "1", "prefix": prefix})

    async def head(self, key: str) -> ObjectInfo:
        with _errors(key):
            return ObjectInfo.of(await obstore.head_async(self._store, check_key(key)))

    async def read(self, key: str, start: int = 0, end: int | None = None, *,
                   chunk_size: int = 1024 * 1024, etag: str | None = None
                   ) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) of the object (to its end if None), in chunks of about
        `chunk_size`, read from the network only as they are taken (memory stays about one
        chunk). With `etag`, ObjectChanged if the object is another one by now."""
        chunks = await self.open_read(key, start, end, chunk_size=chunk_size, etag=etag)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def open_read(self, key: str, start: int = 0, end: int | None = None, *,
                        chunk_size: int = 1024 * 1024, etag: str | None = None
                        ) -> AsyncGenerator[bytes, None]:
        """`read`, with its GET made now: ObjectMissing, ObjectChanged or StoreUnavailable
        come from here, before anything was promised to a client."""
        check_key(key)
        if end is not None and end <= start:
            return _nothing()
        options: GetOptions = {"range": (start, end) if end is not None else {"offset": start}}
        if etag is not None:
            options["if_match"] = etag
        with _errors(key):
            result = await obstore.get_async(self._bodies, key, options=options)
        return _chunks(key, result.stream(min_chunk_size=chunk_size))

    async def get(self, key: str) -> bytes:
        """A small object whole (a marker, a manifest): never a file to serve."""
        with _errors(key):
            result = await obstore.get_async(self._store, check_key(key))
            return bytes(await result.bytes_async())

    async def list_folder(self, folder: str = "") -> Listing:
        """What is directly in `folder` ("" the top, or a key): its objects and folders;
        as listed up to `list_cache` seconds ago (`ListingCache`)."""
        prefix = check_folder(folder)
        cache_key = (self.url.bucket, self.url.prefix, prefix)
        if (kept := listings.get(cache_key, self.options.list_cache)) is not None:
            return kept
        generation = listings.generation
        self.lists += 1
        with _errors(folder, listing=True):
            result = await obstore.list_with_delimiter_async(self._store, prefix or None)
        folders = [p.rstrip("/") + "/" for p in result["common_prefixes"]]
        found = Listing([ObjectInfo.of(m) for m in result["objects"]], folders)
        if self.options.list_cache > 0:
            listings.put(cache_key, found, generation)
        return found

    async def walk(self, folder: str = "", page: int = 1000
                   ) -> AsyncGenerator[list[ObjectInfo], None]:
        """Every object under `folder`, at any depth, a page at a time."""
        prefix = check_folder(folder)
        stream = obstore.list(self._store, prefix or None, chunk_size=page)
        while True:
            with _errors(folder, listing=True):
                try:
                    metas = await stream.__anext__()
                except StopAsyncIteration:
                    return
            yield [ObjectInfo.of(m) for m in metas]

    async def folder_exists(self, folder: str) -> bool:
        """Whether any object lies under `folder` (S3 has no folders, only keys)."""
        prefix = check_folder(folder)
        kept = listings.get((self.url.bucket, self.url.prefix, prefix), self.options.list_cache)
        if kept is not None:
            return bool(kept.objects or kept.folders)
        self.lists += 1
        stream = obstore.list(self._store, prefix or None, chunk_size=1)
        with _errors(folder, listing=True):
            try:
                return bool(await stream.__anext__())
            except StopAsyncIteration:
                return False

    async def put(self, key: str, data: bytes) -> str | None:
        """One request, for what fits in memory; the new ETag."""
        with _errors(key):
            result = await obstore.put_async(self._store, check_key(key), data,
                                             use_multipart=False)
        self.wrote(key)
        return result["e_tag"]

    def writer(self, key: str) -> ObjectWriter:
        return ObjectWriter(self._bodies, check_key(key), self.options.part_size,
                            self.wrote)

    async def delete(self, key: str) -> None:
        """Gone, or was never there (S3 answers both alike)."""
        with _errors(key):
            await obstore.delete_async(self._store, check_key(key))
        self.wrote(key)

    def wrote(self, key: str) -> None:
        """`key` was written or deleted: the listings it changes are not kept."""
        listings.wrote(self.url.bucket, f"{self.url.prefix}/{key}" if self.url.prefix
                       else key)

    async def presigned_get(self, key: str, expires: timedelta,
                            headers: Mapping[str, str] | None = None,
                            method: Literal["GET", "HEAD"] = "GET") -> str:
        """A URL anyone may GET the object with until `expires` from now (no request);
        HEAD with `method` (the method is signed: a GET's URL answers a HEAD 403).

        `headers`: what the store's answer should carry instead of the object's own
        (Content-Disposition, Content-Type, ...: S3's `response-*` parameters, signed into
        the URL). obstore signs no query parameters, so such a URL is signed here, from
        static credentials; without them (an instance role), obstore's URL, without them.
        """
        check_key(key)
        overrides = {_OVERRIDES[name.lower()]: value
                     for name, value in (headers or {}).items()}
        if overrides and (credentials := _Credentials.from_environ(self)) is not None:
            return credentials.presign(key, expires, overrides, method)
        if overrides:
            _log_unsigned_overrides()
        with _errors(key):
            return await obstore.sign_async(self._store, method, key, expires)

    async def uploads(self, folder: str = "", *, key: str | None = None) -> list[Upload]:
        """The incomplete multipart uploads under `folder`, or of `key` only (a writer
        that was aborted leaves none; one whose process died leaves its parts)."""
        prefix = check_folder(folder) if key is None else check_key(key)
        full = f"{self.url.prefix}/{prefix}" if self.url.prefix else prefix
        found: list[Upload] = []
        query = {"uploads": "", "prefix": full}
        while True:
            answer = await _signed(self, "GET", "", query)
            root = ElementTree.fromstring(answer.content)
            for upload in root.iter(f"{_XMLNS}Upload"):
                name = upload.findtext(f"{_XMLNS}Key") or ""
                relative = name.removeprefix(f"{self.url.prefix}/") if self.url.prefix else name
                initiated = upload.findtext(f"{_XMLNS}Initiated") or ""
                found.append(Upload(relative, upload.findtext(f"{_XMLNS}UploadId") or "",
                                    datetime.fromisoformat(initiated.replace("Z", "+00:00"))))
            if root.findtext(f"{_XMLNS}IsTruncated") != "true":
                return [u for u in found if key is None or u.key == key]
            query = {"uploads": "", "prefix": full,
                     "key-marker": root.findtext(f"{_XMLNS}NextKeyMarker") or "",
                     "upload-id-marker": root.findtext(f"{_XMLNS}NextUploadIdMarker") or ""}

    async def abort_upload(self, upload: Upload) -> None:
        """Its parts gone; gone already is fine."""
        await _signed(self, "DELETE", check_key(upload.key), {"uploadId": upload.upload_id},
                      missing_ok=True)


_XMLNS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _quote(value: str) -> str:
    return quote(value, safe="-_.~")


# The headers of a GET's answer that a request may set (S3's `response-*` parameters).
_OVERRIDES = {name: f"response-{name}" for name in (
    "content-type", "content-disposition", "content-language", "content-encoding",
    "cache-control", "expires")}


@functools.cache
def _log_unsigned_overrides() -> None:
    log.warning("pre-signed URLs carry no file name or type without static credentials"
                " (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY): obstore signs none")


@dataclass(frozen=True)
class _Credentials:
    """AWS Signature Version 4 for the requests obstore does not make, from the same
    standard variables obstore reads (static credentials only: instance roles are not
    looked up here), for one store's bucket."""

    access: str
    secret: str
    token: str | None
    region: str
    scheme: str
    host: str
    base: str  # the path before the key: the endpoint's, and the bucket in path style
    prefix: str

    @classmethod
    def from_environ(cls, store: ObjectStore) -> _Credentials | None:
        environ = os.environ
        access = environ.get("AWS_ACCESS_KEY_ID")
        secret = environ.get("AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            return None
        region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        endpoint = (environ.get("AWS_ENDPOINT_URL") or environ.get("AWS_ENDPOINT")
                    or f"https://s3.{region}.amazonaws.com").rstrip("/")
        parts = urlsplit(endpoint)
        if parts.scheme != "https" and not store.options.allow_http:
            raise StoreUnavailable("a plain-http endpoint needs EXPORTER_S3_ALLOW_HTTP")
        bucket = store.url.bucket
        if store.options.virtual_hosted_style:
            host, base = f"{bucket}.{parts.netloc}", parts.path
        else:
            host, base = parts.netloc, f"{parts.path}/{bucket}"
        return cls(access, secret, environ.get("AWS_SESSION_TOKEN"), region, parts.scheme,
                   host, base, store.url.prefix)

    def path(self, key: str) -> str:
        full = f"{self.prefix}/{key}" if self.prefix and key else key
        return self.base + (f"/{_quote(full).replace('%2F', '/')}" if full else "")

    def _signature(self, now: str, canonical: str) -> tuple[str, str]:
        """The scope and the signature of a canonical request made at `now`."""
        scope = f"{now[:8]}/{self.region}/s3/aws4_request"
        signing = f"AWS4{self.secret}".encode()
        for part in (now[:8], self.region, "s3", "aws4_request"):
            signing = hmac.new(signing, part.encode(), hashlib.sha256).digest()
        text = "\n".join(["AWS4-HMAC-SHA256", now, scope,
                          hashlib.sha256(canonical.encode()).hexdigest()])
        return scope, hmac.new(signing, text.encode(), hashlib.sha256).hexdigest()

    def authorization(self, method: str, key: str, query: dict[str, str]
                      ) -> tuple[str, dict[str, str]]:
        """The URL and headers of a request signed in its Authorization header."""
        path = self.path(key)
        canonical_query = _canonical_query(query)
        now = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        payload = hashlib.sha256(b"").hexdigest()
        headers = {"host": self.host, "x-amz-content-sha256": payload, "x-amz-date": now}
        if self.token:
            headers["x-amz-security-token"] = self.token
        names = ";".join(sorted(headers))
        canonical = "\n".join([method, path, canonical_query,
                               "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                               names, payload])
        scope, signature = self._signature(now, canonical)
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access}/{scope}, "
                                    f"SignedHeaders={names}, Signature={signature}")
        return f"{self.scheme}://{self.host}{path}?{canonical_query}", headers

    def presign(self, key: str, expires: timedelta, query: dict[str, str],
                method: str = "GET") -> str:
        """A URL signed in its query (S3's pre-signed URL), `query` signed with it."""
        now = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        scope = f"{now[:8]}/{self.region}/s3/aws4_request"
        query = {**query, "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
                 "X-Amz-Credential": f"{self.access}/{scope}", "X-Amz-Date": now,
                 "X-Amz-Expires": str(int(expires.total_seconds())),
                 "X-Amz-SignedHeaders": "host"}
        if self.token:
            query["X-Amz-Security-Token"] = self.token
        path = self.path(key)
        canonical_query = _canonical_query(query)
        canonical = "\n".join([method, path, canonical_query, f"host:{self.host}\n", "host",
                               "UNSIGNED-PAYLOAD"])
        _, signature = self._signature(now, canonical)
        return (f"{self.scheme}://{self.host}{path}?{canonical_query}"
                f"&X-Amz-Signature={signature}")


def _canonical_query(query: dict[str, str]) -> str:
    # A header's value reaches us as ASGI spells it (latin-1 for its bytes): its bytes are
    # what the store is to send.
    pairs = sorted((_quote(k), quote(v.encode("latin-1", "replace"), safe="-_.~"))
                   for k, v in query.items())
    return "&".join(f"{k}={v}" for k, v in pairs)


async def _signed(store: ObjectStore, method: str, key: str, query: dict[str, str],
                  missing_ok: bool = False) -> httpx.Response:
    """One request of S3's API that obstore does not make (`_Credentials`)."""
    credentials = _Credentials.from_environ(store)
    if credentials is None:
        raise StoreUnavailable("listing incomplete uploads needs AWS_ACCESS_KEY_ID and"
                               " AWS_SECRET_ACCESS_KEY")
    url, headers = credentials.authorization(method, key, query)
    try:
        async with httpx.AsyncClient(timeout=store.options.timeout) as client:
            answer = await client.request(method, url, headers=headers)
    except httpx.HTTPError as error:
        raise StoreUnavailable(f"{type(error).__name__}: {error}") from error
    if answer.status_code == 404 and missing_ok:
        return answer
    if answer.status_code >= 300:
        raise StoreUnavailable(f"{method} ?{next(iter(query))}: {answer.status_code}"
                               f" {answer.text[:300]}")
    return answer


async def _nothing() -> AsyncGenerator[bytes, None]:
    return
    yield


async def _chunks(key: str, stream: Any) -> AsyncGenerator[bytes, None]:
    while True:
        with _errors(key):
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                return
        yield bytes(chunk)


class ObjectWriter:
    """An object written as it comes, in bounded memory, seen whole or not at all.

    Up to one part is kept here; an object that ends within it is one plain put. A larger
    one becomes a multipart upload (obstore's, fed from a small queue): about two parts in
    memory, and visible only once `complete` returns. `abort` (or an error) leaves no
    object; S3 keeps the parts of an upload never completed until the bucket's lifecycle
    rule (AbortIncompleteMultipartUpload) removes them, as obstore advises.

    Used as `async with store.writer(key) as w:`, leaving the block without `complete`
    (an error, a cancellation) aborts; otherwise call `abort` in a `finally`.
    """

    def __init__(self, store: S3Store, key: str, part_size: int,
                 completed: Callable[[str], None] = lambda key: None) -> None:
        self.key = key
        self._on_complete = completed
        self.size = 0
        self._store = store
        self._part_size = max(part_size, MIN_PART_SIZE)
        self._head: list[bytes] = []
        self._head_size = 0
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=2)
        self._upload: asyncio.Task[Any] | None = None
        self._done = False
        self._completed = False

    async def __aenter__(self) -> ObjectWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._completed:
            await asyncio.shield(self.abort())

    async def write(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("write after complete or abort")
        if not data:
            return
        self.size += len(data)
        if self._upload is None:
            self._head.append(data)
            self._head_size += len(data)
            if self._head_size < self._part_size:
                return
            self._upload = asyncio.create_task(self._multipart())
            data, self._head, self._head_size = b"".join(self._head), [], 0
        await self._send(data)

    async def _send(self, item: bytes | BaseException | None) -> None:
        """Into the upload's queue; if the upload failed meanwhile, its error."""
        assert self._upload is not None
        put = asyncio.ensure_future(self._queue.put(item))
        try:
            await asyncio.wait({put, self._upload}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            put.cancel()
            raise
        if not put.done():
            put.cancel()
            with _errors(self.key):
                self._upload.result()
            raise StoreUnavailable("the upload ended early")

    async def _multipart(self) -> Any:
        async def parts() -> AsyncIterator[bytes]:
            while (item := await self._queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item

        return await obstore.put_async(self._store, self.key, parts(), use_multipart=True,
                                       chunk_size=self._part_size, max_concurrency=2)

    async def complete(self) -> str | None:
        """The object is there, whole; its ETag."""
        if self._done:
            raise RuntimeError("complete after complete or abort")
        self._done = True
        with _errors(self.key):
            if self._upload is None:
                data, self._head = b"".join(self._head), []
                result = await obstore.put_async(self._store, self.key, data,
                                                 use_multipart=False)
            else:
                await self._send(None)
                result = await self._upload
        self._completed = True
        self._on_complete(self.key)
        return result["e_tag"]

    async def abort(self) -> None:
        """No object is made; safe to call at any time, and again."""
        self._done = True
        self._head = []
        upload, self._upload = self._upload, None
        if upload is None or upload.done():
            return
        put = asyncio.ensure_future(self._queue.put(_Aborted()))
        await asyncio.wait({put, upload}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await upload


class _Aborted(Exception):
    pass
