"""Where every file of a run lives: a local path or a URI (``s3://``, ``gs://``, ``file://``), read and written
through ``pyarrow.fs``. This is the only module that opens a filesystem.

Three rules make object stores safe to share between jobs:

- **One name for a place.** :class:`Location` is a local path or a URI; jobs take either for every argument.
  S3-compatible stores (MinIO, Ceph, moto) are reached with the standard AWS variables (``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), which pyarrow honours.
- **Publishing.** Object stores have no atomic rename, so a folder readers must never see half-written is
  published by :func:`publish_dir`: its marker file (a manifest or ``result.json``) is removed first and
  written last, and readers trust a folder only when its marker is there. A folder a killed writer left
  without its marker is replaced by the next writer, never read. Single files are written whole (a temporary
  file renamed on local disk; one PUT on an object store).
- **Local copies of models.** Hugging Face and torch loaders read local files, so :func:`local_dir` copies a
  folder from a store once into ``<cache>/remote/<key>``, the key being the hash of its marker's bytes when
  it has one (a bundle's manifest) or of its listing (names, sizes, times). A second load copies nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from mavilt.errors import InputError, StorageError

log = logging.getLogger(__name__)

# Stores whose pyarrow paths are "bucket/key" (the form Location keeps).
REMOTE_SCHEMES = ("s3", "gs", "gcs")
# What a Ray worker needs to reach the same store as the driver (handed to a local Ray instance's workers).
CREDENTIAL_VARIABLES = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
COPY_COMPLETE = ".mavilt-copy-complete"


def credentials_env() -> dict[str, str]:
    return {k: os.environ[k] for k in CREDENTIAL_VARIABLES if os.environ.get(k)}


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, bucket: str, query: str):
    """One filesystem per (scheme, bucket, options) and process: opening one may cost a request (S3 region)."""
    import pyarrow.fs as pafs

    uri = f"{scheme}://{bucket}" + (f"?{query}" if query else "")
    try:
        fs, _ = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot open {scheme}://{bucket}: {e}. For an S3-compatible store set AWS_ENDPOINT_URL, "
                           "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION") from None
    return fs


@functools.lru_cache(maxsize=1)
def _local_filesystem():
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()


@dataclass(frozen=True)
class Location:
    """A file or folder on local disk (``scheme == ""``, ``path`` absolute) or on a store (``path`` is the
    store's own path, ``bucket/key`` on S3). Picklable: a Ray worker reopens the filesystem from the URI."""

    scheme: str
    path: str
    query: str = ""

    @classmethod
    def of(cls, where: "str | os.PathLike[str] | Location") -> "Location":
        if isinstance(where, Location):
            return where
        s = os.fspath(where) if isinstance(where, os.PathLike) else str(where)
        if not s.strip():
            raise InputError("an empty path was given; pass a local folder or a URI such as s3://bucket/prefix")
        if "://" not in s:
            return cls("", str(Path(s).expanduser().resolve()))
        scheme, rest = s.split("://", 1)
        scheme = scheme.lower()
        if scheme == "file":
            return cls("", str(Path("/" + rest.lstrip("/")).resolve()))
        if scheme not in REMOTE_SCHEMES:
            raise InputError(f"{s}: unknown storage scheme '{scheme}://'; use a local path, file://, s3:// or gs://")
        rest, _, query = rest.partition("?")
        rest = posixpath.normpath("/" + rest).strip("/")
        if not rest:
            raise InputError(f"{s} names no bucket; use {scheme}://BUCKET/PREFIX")
        return cls(scheme, rest, query)

    # ---- naming ---------------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return self.scheme == ""

    @property
    def uri(self) -> str:
        """What is recorded and shown: the absolute local path, or ``scheme://path``."""
        if self.is_local:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        # Lets local code keep using open()/torch.load(); a store must go through local_dir() or this class.
        if not self.is_local:
            raise StorageError(f"{self.uri} is on an object store; it must be copied locally first (local_dir)")
        return self.path

    @property
    def local_path(self) -> Path:
        return Path(os.fspath(self))

    @property
    def fs(self):
        return _local_filesystem() if self.is_local else _filesystem(self.scheme, self.path.split("/")[0], self.query)

    def __truediv__(self, name: str) -> "Location":
        return Location(self.scheme, posixpath.join(self.path, str(name)) if not self.is_local
                        else os.path.join(self.path, str(name)), self.query)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "Location":
        return Location(self.scheme, posixpath.dirname(self.path) or self.path, self.query)

    # ---- reading --------------------------------------------------------------------------------------
    def _info(self):
        try:
            return self.fs.get_file_info(self.path).type
        except OSError as e:
            raise StorageError(f"cannot read {self.uri}: {e}") from None

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info() == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info() == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if not self.exists():
                raise FileNotFoundError(f"{self.uri} does not exist") from None
            raise StorageError(f"cannot read {self.uri}: {e}") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def _listing(self, recursive: bool = False) -> list:
        """pyarrow's FileInfo of what is in this folder (nothing when it does not exist)."""
        import pyarrow.fs as pafs

        return self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))

    def iterdir(self) -> list["Location"]:
        """The entries of this folder (none when it does not exist), sorted by name."""
        return sorted((Location(self.scheme, i.path, self.query) for i in self._listing()), key=lambda x: x.path)

    def files(self, suffix: str = "") -> list["Location"]:
        """The files directly in this folder whose names end with ``suffix`` (hidden ones left out), sorted."""
        import pyarrow.fs as pafs

        return sorted((Location(self.scheme, i.path, self.query) for i in self._listing()
                       if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                       and not i.base_name.startswith(".")), key=lambda x: x.path)

    def walk(self) -> list[tuple[str, int, int]]:
        """(relative path, size, modification time in ns) of every file below this folder, sorted."""
        import pyarrow.fs as pafs

        infos = self._listing(recursive=True)
        base = self.path.rstrip("/") + "/"
        return sorted((i.path[len(base):], int(i.size or 0), int(i.mtime_ns or 0))
                      for i in infos if i.type == pafs.FileType.File and i.path.startswith(base))

    # ---- writing --------------------------------------------------------------------------------------
    def mkdir(self) -> "Location":
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            return self
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as e:
            raise StorageError(f"cannot create {self.uri}: {e}. The bucket must exist and be writable with the "
                               "credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the node's role)") from None
        return self

    def write_bytes(self, data: bytes) -> "Location":
        """Write the whole file at once: readers see the old file or the new one, never a part."""
        if self.is_local:
            p = Path(self.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, p)
            return self
        try:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        except OSError as e:
            raise StorageError(f"cannot write {self.uri}: {e}. The bucket must exist and be writable") from None
        return self

    def write_text(self, text: str) -> "Location":
        return self.write_bytes(text.encode())

    def write_json(self, obj: Any) -> "Location":
        return self.write_text(json.dumps(obj, indent=2) + "\n")

    def append_text(self, text: str) -> None:
        """Append to a log file. An object store cannot append: the object is rewritten whole (logs are small)."""
        if self.is_local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(text)
            return
        old = self.read_bytes() if self.is_file() else b""
        self.write_bytes(old + text.encode())

    def remove(self) -> None:
        """Delete this file or folder (with everything in it); nothing when it is not there."""
        import pyarrow.fs as pafs

        kind = self._info()
        if kind == pafs.FileType.NotFound:
            return
        if self.is_local:
            if kind == pafs.FileType.Directory:
                shutil.rmtree(self.path, ignore_errors=True)
            else:
                Path(self.path).unlink(missing_ok=True)
        elif kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        else:
            self.fs.delete_file(self.path)

    def upload(self, local: str | Path, skip: Iterable[str] = ()) -> "Location":
        """Copy a local file or folder tree here (into this folder, merging); ``skip``: top-level names left out."""
        src = Path(local)
        skip = set(skip)
        if src.is_file():
            self.write_bytes(src.read_bytes())
            return self
        self.mkdir()
        for entry in sorted(src.iterdir()):
            if entry.name in skip:
                continue
            if self.is_local:
                dest = Path(self.path) / entry.name
                if entry.is_dir():
                    shutil.copytree(entry, dest, dirs_exist_ok=True)
                else:
                    shutil.copy2(entry, dest)
            else:
                import pyarrow.fs as pafs

                pafs.copy_files(str(entry), posixpath.join(self.path, entry.name),
                                source_filesystem=_local_filesystem(), destination_filesystem=self.fs)
        return self

    def download(self, dest: str | Path, include: Iterable[str] | None = None) -> Path:
        """Copy this folder (or only its top-level entries named in ``include``) into local ``dest``."""
        import pyarrow.fs as pafs

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        wanted = set(include) if include is not None else None
        for rel, _, _ in self.walk():
            if wanted is not None and rel.split("/")[0] not in wanted:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files((self / rel).path, str(target), source_filesystem=self.fs,
                            destination_filesystem=_local_filesystem())
        return dest


def is_remote(where: object) -> bool:
    """Whether ``where`` names a place on a store (a URI other than ``file://``)."""
    if isinstance(where, Location):
        return not where.is_local
    s = str(where)
    return "://" in s and not s.lower().startswith("file://")


# ---- publishing -----------------------------------------------------------------------------------------


def is_published(folder: Location | str | Path, marker: str) -> bool:
    return (Location.of(folder) / marker).is_file()


def publish_dir(src: str | Path, dest: Location | str | Path, marker: str) -> Location:
    """Publish the finished local folder ``src`` at ``dest``: the old marker goes first (from then on readers
    refuse ``dest``), then the old contents, then the new files, and the marker (a file in ``src``) last."""
    src, dest = Path(src), Location.of(dest)
    if not (src / marker).is_file():
        raise ValueError(f"{src} has no {marker}: nothing to publish it by")
    (dest / marker).remove()
    dest.remove()
    dest.upload(src, skip={marker})
    (dest / marker).write_bytes((src / marker).read_bytes())
    return dest


# ---- local copies -------------------------------------------------------------------------------------


def local_dir(where: Location | str | Path, include: Iterable[str] | None = None, key_file: str | None = None) -> Path:
    """A local folder with the contents of ``where``: itself on local disk, else a copy in the cache, made once.

    ``include`` copies only those top-level entries (a checkpoint's models, not its optimizer state);
    ``key_file`` keys the copy by that file's bytes (a manifest written last), else by the folder's listing."""
    from mavilt.hashing import config_hash
    from mavilt.paths import cache_dir

    loc = Location.of(where)
    if loc.is_local:
        return loc.local_path
    include = sorted(include) if include is not None else None
    if key_file is not None:
        key = config_hash(["manifest", (loc / key_file).read_bytes().hex(), include])
    else:
        listing = loc.walk()
        if not listing:
            raise FileNotFoundError(f"{loc.uri} holds no files")
        key = config_hash(["listing", loc.uri, listing, include])
    dest = cache_dir() / "remote" / key
    if (dest / COPY_COMPLETE).is_file():
        return dest
    tmp = dest.with_name(f".{key}.{uuid.uuid4().hex[:8]}")
    log.info("copying %s to the local cache %s", loc.uri, dest)
    try:
        loc.download(tmp, include)
        (tmp / COPY_COMPLETE).write_text(loc.uri + "\n")
        try:
            os.rename(tmp, dest)  # atomic on local disk; fails if a concurrent copy got there first
        except OSError:
            if not (dest / COPY_COMPLETE).is_file():
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def local_path(where: Location | str | Path | None, **kwargs) -> str | None:
    """:func:`local_dir` as a string, passing ``None`` through (optional model folders)."""
    return None if where is None else str(local_dir(where, **kwargs))


# ---- Parquet and Ray ----------------------------------------------------------------------------------


def write_parquet(table, where: Location | str | Path) -> Location:
    """Write one Parquet file whole (readers never see a part of it): encoded in memory, then written at once
    like any other file. A shard is a few hundred images, so the buffer stays small."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return Location.of(where).write_bytes(buf.getvalue().to_pybytes())


def read_parquet(where: Location | str | Path, **kwargs):
    import pyarrow.parquet as pq

    loc = Location.of(where)
    return pq.read_table(loc.path, filesystem=loc.fs, **kwargs)


def ray_read_parquet(files: list[Location], **kwargs):
    """A Ray dataset over Parquet files that share one filesystem."""
    import ray.data

    if not files:
        raise ValueError("no Parquet files to read")
    return ray.data.read_parquet([f.path for f in files], filesystem=files[0].fs, **kwargs)


def ray_train_storage(storage: Location) -> dict[str, Any]:
    """``RunConfig`` arguments that put a Ray Train run under ``storage``."""
    if storage.is_local:
        return {"storage_path": storage.path}
    return {"storage_path": storage.path, "storage_filesystem": storage.fs}
