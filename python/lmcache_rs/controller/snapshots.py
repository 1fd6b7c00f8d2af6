"""Snapshots of a log follower's indexes, each naming the log position it reflects.

A snapshot is every key space's index dumped at one applied sequence ``seq`` (the dumps run
back to back on the event loop, so no log message is applied between them), each file with
``log_seq=seq`` inside (snapshot format 3).

Local: a directory (``--snapshot PATH`` of a replica) with one file per key space and
``manifest.json`` ``{"seq", "stream", "spaces": {space: file}}`` (``stream``: the identity of
the stream ``seq`` is a position in), written last and renamed into place, so a crash leaves
the previous snapshot whole.

Shared: one replica at a time (the holder of key ``snapshots`` in KV bucket ``lmc_lease``,
whose entries expire after ``LEASE_TTL`` unless renewed) uploads a bundle of the files to
object store ``lmc_snaps`` as ``snap-<seq>-<random>``, points KV ``lmc_snapmeta/latest`` at it
(``{"seq", "stream", "object", "sha256"}``; only ever forward), and only then purges the
stream below ``seq + 1``. Older bundles are deleted after the pointer moved.

Bootstrap (a replica starting, an ingest rebuilding): take the local snapshot when it is a
position in this stream and the stream still holds what follows it, else the shared one, else
start from nothing; then follow from ``seq + 1``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import msgpack

from .jetstream import STREAM, stream_identity

log = logging.getLogger("lmcache_rs.controller")

SNAP_BUCKET = "lmc_snaps"
META_BUCKET = "lmc_snapmeta"
LEASE_BUCKET = "lmc_lease"
LEASE_KEY = "snapshots"
MANIFEST = "manifest.json"


# -- local -----------------------------------------------------------------------------------
def dump_local(directory: str, seq: int, indexes: Iterable[tuple[str, Any]], stream: str = "") -> None:
    """Dump every (space, index) at ``seq`` of the stream ``stream`` (its identity) into
    ``directory``, manifest last."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    spaces = {}
    for n, (space, index) in enumerate(indexes):
        if len(index) == 0 and not index.workers():
            continue  # nothing to restore; a controller that does not serve this key space can load the rest
        name = f"{seq}-{n}.idx"
        index.dump(root / name, log_seq=seq)
        spaces[space] = name
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"seq": seq, "stream": stream, "spaces": spaces}))
    os.replace(tmp, root / MANIFEST)
    for path in root.iterdir():  # files of older snapshots
        if path.name.endswith(".idx") and path.name not in spaces.values():
            path.unlink(missing_ok=True)


def local_seq(directory: str | None) -> int | None:
    """The sequence of the local snapshot, None when there is none."""
    got = local_position(directory)
    return None if got is None else got[0]


def local_position(directory: str | None) -> tuple[int, str] | None:
    """(sequence, stream identity) of the local snapshot, None when there is none."""
    if not directory:
        return None
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
        return int(manifest["seq"]), str(manifest.get("stream", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_local(directory: str, index_for: Callable[[str], Any]) -> int:
    manifest = json.loads((Path(directory) / MANIFEST).read_text())
    seq = int(manifest["seq"])
    for space, name in manifest["spaces"].items():
        got = index_for(space).load(Path(directory) / name)
        if got != seq:
            raise ValueError(f"{name} reflects log position {got}, the manifest says {seq}")
    return seq


# -- shared ----------------------------------------------------------------------------------
def bundle(directory: str) -> tuple[int, str, bytes]:
    """The local snapshot's sequence, stream identity and files as one msgpack blob."""
    root = Path(directory)
    manifest = json.loads((root / MANIFEST).read_text())
    files = {space: (root / name).read_bytes() for space, name in manifest["spaces"].items()}
    blob = msgpack.packb({"seq": manifest["seq"], "spaces": files}, use_bin_type=True)
    return int(manifest["seq"]), str(manifest.get("stream", "")), blob


def unbundle(data: bytes, index_for: Callable[[str], Any]) -> int:
    blob = msgpack.unpackb(data, raw=False)
    seq = int(blob["seq"])
    with tempfile.TemporaryDirectory() as tmp:
        for n, (space, content) in enumerate(blob["spaces"].items()):
            path = Path(tmp) / f"{n}.idx"
            path.write_bytes(content)
            got = index_for(space).load(path)
            if got != seq:
                raise ValueError(f"the shared snapshot's {space} reflects {got}, not {seq}")
    return seq


async def _bucket(js: Any, name: str, kind: str, ttl: float | None = None) -> Any:
    from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType
    from nats.js.errors import BucketNotFoundError, NotFoundError

    try:
        return await (js.key_value(name) if kind == "kv" else js.object_store(name))
    except (BucketNotFoundError, NotFoundError):
        if kind == "kv":
            return await js.create_key_value(config=KeyValueConfig(bucket=name, ttl=ttl, storage=StorageType.FILE))
        return await js.create_object_store(name, config=ObjectStoreConfig(storage=StorageType.FILE))


async def shared_meta(js: Any) -> dict | None:
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

    try:
        kv = await js.key_value(META_BUCKET)
        return json.loads((await kv.get("latest")).value)
    except (BucketNotFoundError, KeyNotFoundError, NotFoundError):
        return None


async def load_shared(js: Any, index_for: Callable[[str], Any]) -> int | None:
    """Load the newest shared snapshot; its sequence, or None when there is none."""
    meta = await shared_meta(js)
    if meta is None:
        return None
    store = await _bucket(js, SNAP_BUCKET, "obj")
    data = (await store.get(meta["object"])).data
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(f"shared snapshot {meta['object']} does not match its checksum")
    return unbundle(data, index_for)


async def bootstrap(js: Any, index_for: Callable[[str], Any], directory: str | None,
                    reset: Callable[[], None] = lambda: None) -> tuple[int, str]:
    """Load the best snapshot for following the stream; (its sequence, where it came from).

    ``reset`` empties every key space: a snapshot replaces only the spaces it lists (empty
    ones are left out), so what an earlier, failed load left must go before each load."""
    info = await js.stream_info(STREAM)
    first, last = info.state.first_seq, info.state.last_seq
    ident = stream_identity(info)

    def usable(seq: int, stream: str) -> bool:
        # the stream still holds everything after it, and it is a position in this stream,
        # not in one deleted before it was created again (whose messages up to seq would
        # never be read); snapshots that do not name their stream are checked by position
        return first - 1 <= seq <= last and (not stream or not ident or stream == ident)

    reset()
    position = local_position(directory)
    mine = None if position is None else position[0]
    if position is not None and usable(*position):
        try:
            return load_local(directory, index_for), "local"  # type: ignore[arg-type]
        except Exception as exc:  # a corrupt or foreign file: the shared one, or nothing
            log.warning("local snapshot %s not loaded (%s)", directory, exc)
            reset()
    if first > 1 or mine is not None:
        meta = await shared_meta(js)
        if meta is not None and usable(int(meta["seq"]), str(meta.get("stream", ""))):
            seq = await load_shared(js, index_for)
            if seq is not None:
                return seq, "shared"
    return 0, "none"


class SharedSnapshots:
    """The lease, the upload and the purge (one replica at a time does them)."""

    def __init__(self, js: Any, name: str, interval: float):
        self.js = js
        self.name = name
        self.lease_ttl = max(3 * interval, 5.0)
        self.revision: int | None = None  # of our lease entry, while we hold it
        self.uploaded = 0  # sequence of our last upload

    async def leader(self) -> bool:
        """Take or renew the lease; True while we hold it."""
        from nats.js.errors import KeyWrongLastSequenceError

        kv = await _bucket(self.js, LEASE_BUCKET, "kv", ttl=self.lease_ttl)
        value = json.dumps({"holder": self.name, "at": time.time()}).encode()
        try:
            if self.revision is None:
                self.revision = await kv.create(LEASE_KEY, value)
            else:
                self.revision = await kv.update(LEASE_KEY, value, last=self.revision)
        except KeyWrongLastSequenceError:  # someone else holds it (or took it over)
            self.revision = None
        return self.revision is not None

    async def publish(self, directory: str) -> int:
        """Upload the local snapshot, point the meta key at it, purge the stream below it.

        The pointer only moves forward: a replica behind the shared snapshot (restarted from
        it, or a second leader while the lease changes hands) must not point it back at a
        position the stream was already purged past, nor delete the newer snapshot."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        seq, stream, data = bundle(directory)
        if seq <= self.uploaded:
            return seq
        store = await _bucket(self.js, SNAP_BUCKET, "obj")
        meta_kv = await _bucket(self.js, META_BUCKET, "kv")
        try:
            entry = await meta_kv.get("latest")
            old, revision = json.loads(entry.value), entry.revision
        except KeyNotFoundError:
            old, revision = None, None
        if old is not None and int(old["seq"]) >= seq and old.get("stream", "") in ("", stream):
            self.uploaded = seq
            return seq
        # one name per upload: two publishers of one sequence must not replace (or delete,
        # losing the race) the object the other's pointer names
        name = f"snap-{seq}-{secrets.token_hex(6)}"
        await store.put(name, data)
        value = json.dumps({"seq": seq, "stream": stream, "object": name,
                            "sha256": hashlib.sha256(data).hexdigest()}).encode()
        try:  # compare-and-set: another publisher moving it meanwhile wins
            if revision is None:
                await meta_kv.create("latest", value)
            else:
                await meta_kv.update("latest", value, last=revision)
        except KeyWrongLastSequenceError:
            log.warning("shared snapshot pointer moved while %s was uploaded; left to the other publisher", name)
            await self._delete(store, name)
            return seq
        self.uploaded = seq
        # the lease may have lapsed during the upload: the purge is for its holder alone
        if await self.leader():
            await self.js.purge_stream(STREAM, seq=seq + 1)  # only after the snapshot is stored
        if old is not None and old["object"] != name:
            await self._delete(store, old["object"])
        log.info("shared snapshot %s uploaded (%d bytes); stream purged below %d", name, len(data), seq + 1)
        return seq

    async def _delete(self, store: Any, name: str) -> None:
        try:
            await store.delete(name)
        except Exception as exc:  # a leftover object costs space, nothing else
            log.warning("shared snapshot %s not deleted: %s", name, exc)

    async def release(self) -> None:
        """Give the lease up (a replica that stopped following must not publish)."""
        if self.revision is None:
            return
        try:
            kv = await _bucket(self.js, LEASE_BUCKET, "kv", ttl=self.lease_ttl)
            await kv.delete(LEASE_KEY, last=self.revision)
        except Exception as exc:  # it expires after lease_ttl anyway
            log.warning("snapshot lease not released: %s", exc)
        self.revision = None
