"""The storage EXPORTER_EXPORTS_DIR names: a folder (storage.py) or, for `s3://bucket/
prefix`, an object store (bucket.py). The app and `exporter exports` take it from here."""

from __future__ import annotations

from exporter.config import Settings
from exporter.objects import ObjectStore, StoreOptions
from exporter.stored.bucket import BucketStorage
from exporter.stored.storage import LocalStorage, Storage


def storage_for(settings: Settings) -> Storage:
    if (url := settings.exports_store) is not None:
        return BucketStorage(ObjectStore(url, StoreOptions.from_settings(settings)))
    return LocalStorage(settings.exports_folder)
