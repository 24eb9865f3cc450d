"""Typed wrapper around mirrord's C data path (``mirrord._native``, cffi API mode).

Everything per request runs in C threads; Python only starts and stops them,
hands over sockets and reads counters. Each negative return code from C
becomes a typed exception:

* frame codes (bad magic, type, length, flags, CRC, truncation) -> ``FrameError``
* libfuse refusing to create or mount the session -> ``FuseError``
* an activity log with no valid record, or of another geometry -> ``ActivityLogError``
* everything else (errno values and other mirrord codes) -> ``NativeError``

Every exception carries ``code`` (the raw negative code) and ``errno`` (the
positive errno, or ``None`` for mirrord-specific codes).

Socket hand-over: ``PrimaryServer.attach_peer`` and ``Receiver`` take
ownership of the fd they are given (pass ``sock.detach()``): C works on its own
duplicate and the wrapper closes the one it was given.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any

from mirrord._native import ffi, lib
from mirrord.errors import ActivityLogError, BadInput, FrameError, FuseError, NativeError

HEADER_SIZE: int = lib.MRD_FRAME_HEADER_SIZE
MAX_PAYLOAD: int = lib.MRD_FRAME_MAX_PAYLOAD
MAGIC: int = lib.MRD_FRAME_MAGIC
# Header flag (WRITE/SYNC_DATA only): durable on the receiver before its ack.
F_SYNC: int = lib.MRD_FRAME_F_SYNC

WRITE: int = lib.MRD_FRAME_WRITE
WRITE_ACK: int = lib.MRD_FRAME_WRITE_ACK
FLUSH: int = lib.MRD_FRAME_FLUSH
FLUSH_ACK: int = lib.MRD_FRAME_FLUSH_ACK
SYNC_DATA: int = lib.MRD_FRAME_SYNC_DATA
SYNC_ACK: int = lib.MRD_FRAME_SYNC_ACK
PING: int = lib.MRD_FRAME_PING
PONG: int = lib.MRD_FRAME_PONG
SYNC_ZERO: int = lib.MRD_FRAME_SYNC_ZERO
ZERO_PAYLOAD: int = lib.MRD_FRAME_ZERO_PAYLOAD
VERIFY: int = lib.MRD_FRAME_VERIFY
VERIFY_SAME: int = lib.MRD_FRAME_VERIFY_SAME
VERIFY_DIFF: int = lib.MRD_FRAME_VERIFY_DIFF
VERIFY_PAYLOAD: int = lib.MRD_FRAME_VERIFY_PAYLOAD
FRAME_TYPES: dict[int, str] = {
    WRITE: "WRITE", WRITE_ACK: "WRITE_ACK", FLUSH: "FLUSH", FLUSH_ACK: "FLUSH_ACK",
    SYNC_DATA: "SYNC_DATA", SYNC_ACK: "SYNC_ACK", PING: "PING", PONG: "PONG", SYNC_ZERO: "SYNC_ZERO",
    VERIFY: "VERIFY", VERIFY_SAME: "VERIFY_SAME", VERIFY_DIFF: "VERIFY_DIFF",
}

# mirrord-specific codes (ext/common.h); they sit far outside the errno range.
_BASE = lib.MRD_E_BASE
E_TRUNC = -(_BASE + 1)
E_MAGIC = -(_BASE + 2)
E_TYPE = -(_BASE + 3)
E_LEN = -(_BASE + 4)
E_CRC = -(_BASE + 5)
E_FLAGS = -(_BASE + 6)
E_PROTO = -(_BASE + 7)
E_STATE = -(_BASE + 8)
E_FUSE = -(_BASE + 9)
E_RANGE = -(_BASE + 10)
E_NOPEER = -(_BASE + 11)
E_ALBAD = -(_BASE + 12)
E_ALGEOM = -(_BASE + 13)
_FRAME_CODES = frozenset({E_TRUNC, E_MAGIC, E_TYPE, E_LEN, E_CRC, E_FLAGS})

SYNC_DIRTY_ONLY: int = lib.MRD_SYNC_DIRTY_ONLY
SYNC_VERIFY: int = lib.MRD_SYNC_VERIFY
SYNC_CHECKSUM: int = lib.MRD_SYNC_CHECKSUM
RESUME_DEGRADED: int = lib.MRD_RESUME_DEGRADED
RESUME_FAIL: int = lib.MRD_RESUME_FAIL


def strerror(code: int) -> str:
    """Readable text for a C return code (negative errno or mirrord code)."""
    return ffi.string(lib.mrd_strerror(code)).decode()


def _error(code: int, what: str) -> NativeError:
    cls: type[NativeError] = NativeError
    if code in _FRAME_CODES:
        cls = FrameError
    elif code == E_FUSE:
        cls = FuseError
    elif code in (E_ALBAD, E_ALGEOM):
        cls = ActivityLogError
    exc = cls(f"{what}: {strerror(code)}")
    exc.code = code  # type: ignore[attr-defined]
    exc.errno = -code if -_BASE < code < 0 else None  # type: ignore[attr-defined]
    return exc


def _check(code: int, what: str) -> int:
    if code < 0:
        raise _error(code, what)
    return code


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of data, continuing from crc (chainable)."""
    return int(lib.mrd_crc32c(crc, ffi.from_buffer(data), len(data)))


# ---- frames ---------------------------------------------------------------

@dataclass(frozen=True)
class FrameHeader:
    type: int
    seq: int
    offset: int
    length: int
    crc: int = 0
    flags: int = 0
    magic: int = MAGIC

    @property
    def type_name(self) -> str:
        return FRAME_TYPES.get(self.type, f"type {self.type}")

    @property
    def sync(self) -> bool:
        """F_SYNC: the receiver makes this payload durable before acking it."""
        return bool(self.flags & F_SYNC)


def zero_payload(length: int) -> bytes:
    """The payload of a SYNC_ZERO frame for a range of length bytes."""
    out = ffi.new("uint8_t[]", ZERO_PAYLOAD)
    lib.mrd_frame_zero_payload(out, length)
    return bytes(ffi.buffer(out, ZERO_PAYLOAD))


def verify_payload(length: int, crc: int) -> bytes:
    """The payload of a VERIFY frame: a range of length bytes whose CRC32C is crc."""
    out = ffi.new("uint8_t[]", VERIFY_PAYLOAD)
    lib.mrd_frame_verify_payload(out, length, crc)
    return bytes(ffi.buffer(out, VERIFY_PAYLOAD))


def _header(c: Any) -> FrameHeader:
    return FrameHeader(type=c.type, seq=c.seq, offset=c.offset, length=c.length,
                       crc=c.crc, flags=c.flags, magic=c.magic)


def encode_frame(type: int, seq: int, offset: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    """Header (CRC computed) followed by the payload."""
    out = ffi.new("uint8_t[]", HEADER_SIZE)
    _check(lib.mrd_frame_encode(out, type, flags, seq, offset,
                                ffi.from_buffer(payload) if payload else ffi.NULL, len(payload)),
           "encode frame")
    return bytes(ffi.buffer(out, HEADER_SIZE)) + bytes(payload)


def decode_header(raw: bytes) -> FrameHeader:
    """Parse and bound-check the first HEADER_SIZE bytes (the CRC is not checked)."""
    h = ffi.new("struct mrd_frame_header *")
    _check(lib.mrd_frame_decode(ffi.from_buffer(raw), len(raw), h), "decode frame header")
    return _header(h)


def verify_frame(raw_header: bytes, payload: bytes = b"") -> FrameHeader:
    """Decode raw_header and check its CRC against payload; raise FrameError if bad."""
    header = ffi.new("struct mrd_frame_header *")
    _check(lib.mrd_frame_decode(ffi.from_buffer(raw_header), len(raw_header), header),
           "decode frame header")
    _check(lib.mrd_frame_verify(ffi.from_buffer(raw_header), header,
                                ffi.from_buffer(payload) if payload else ffi.NULL, len(payload)),
           "verify frame")
    return _header(header)


def parse_frame(buf: bytes) -> tuple[FrameHeader, bytes, int]:
    """Decode and verify one whole frame at the start of buf.

    Returns (header, payload, bytes consumed); FrameError (code E_TRUNC) when
    buf does not yet hold a whole frame.
    """
    h = ffi.new("struct mrd_frame_header *")
    n = _check(lib.mrd_frame_parse(ffi.from_buffer(buf), len(buf), h), "parse frame")
    return _header(h), bytes(buf[HEADER_SIZE:n]), n


# ---- bitmap ---------------------------------------------------------------

class Bitmap:
    """Dirty bitmap, one bit per ``granularity`` bytes (see ext/bitmap.h for rounding)."""

    def __init__(self, size: int, granularity: int = 4096) -> None:
        out = ffi.new("struct mrd_bitmap **")
        _check(lib.mrd_bitmap_new(size, granularity, out), "create bitmap")
        self._bm = ffi.gc(out[0], lib.mrd_bitmap_free)

    @property
    def size(self) -> int:
        return int(lib.mrd_bitmap_size(self._bm))

    @property
    def granularity(self) -> int:
        return int(lib.mrd_bitmap_granularity(self._bm))

    @property
    def nblocks(self) -> int:
        return int(lib.mrd_bitmap_nblocks(self._bm))

    @property
    def nbytes(self) -> int:
        return int(lib.mrd_bitmap_nbytes(self._bm))

    def count(self) -> int:
        return int(lib.mrd_bitmap_count(self._bm))

    def set_range(self, offset: int, length: int) -> int:
        """Mark every block the byte range touches; returns bits newly set."""
        return _check(lib.mrd_bitmap_set_range(self._bm, offset, length), "bitmap set_range")

    def clear_range(self, offset: int, length: int) -> int:
        """Clear the blocks the byte range fully covers; returns bits cleared."""
        return _check(lib.mrd_bitmap_clear_range(self._bm, offset, length), "bitmap clear_range")

    def set_all(self) -> None:
        lib.mrd_bitmap_set_all(self._bm)

    def clear_all(self) -> None:
        lib.mrd_bitmap_clear_all(self._bm)

    def test(self, block: int) -> bool:
        return bool(lib.mrd_bitmap_test(self._bm, block))

    def find_next_set(self, from_block: int = 0, limit_block: int | None = None) -> int | None:
        """First set block in [from_block, limit_block) (to the end by default), or None."""
        b = lib.mrd_bitmap_find_next_set(self._bm, from_block, self.nblocks if limit_block is None else limit_block)
        return None if b < 0 else int(b)

    def find_next_clear(self, from_block: int = 0, limit_block: int | None = None) -> int | None:
        """First clear block in [from_block, limit_block) (to the end by default), or None."""
        b = lib.mrd_bitmap_find_next_clear(self._bm, from_block,
                                           self.nblocks if limit_block is None else limit_block)
        return None if b < 0 else int(b)

    def snapshot(self) -> bytes:
        buf = ffi.new("uint8_t[]", max(1, self.nbytes))
        n = _check(lib.mrd_bitmap_snapshot(self._bm, buf, self.nbytes), "bitmap snapshot")
        return bytes(ffi.buffer(buf, n))

    def load(self, data: bytes) -> None:
        _check(lib.mrd_bitmap_load(self._bm, ffi.from_buffer(data), len(data)), "bitmap load")


# ---- activity log -----------------------------------------------------------

AL_DEFAULT_EXTENT_SIZE: int = lib.MRD_AL_DEFAULT_EXTENT
AL_DEFAULT_SLOTS: int = lib.MRD_AL_DEFAULT_SLOTS
AL_MAX_SLOTS: int = lib.MRD_AL_MAX_SLOTS


def read_activity_log(path: str) -> list[tuple[int, int]]:
    """(offset, length) of each extent the activity log at path lists as hot.

    Least recently used first, as persisted (ext/activity_log.h). Empty for a
    missing or empty file; ActivityLogError when neither record is valid.
    """
    rec = ffi.new("struct mrd_al_record *")
    if _check(lib.mrd_al_read(path.encode(), rec, ffi.NULL), f"read activity log {path}") == 0:
        return []
    size = int(rec.extent_size)
    return [(int(rec.extents[i]) * size, size) for i in range(rec.count)]


# ---- stats ----------------------------------------------------------------

class _Stats:
    """Counters snapshot; ``as_dict`` is what status endpoints serialise."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload,no-any-return]


@dataclass(frozen=True)
class ServerStats(_Stats):
    size: int
    writes: int
    bytes_written: int
    reads: int
    bytes_read: int
    flushes: int
    write_errors: int
    max_write_seen: int
    frames_sent: int
    bytes_sent: int
    acked: int
    in_flight: int
    ack_latency_ns_total: int
    ack_latency_ns_max: int
    peer_failures: int
    dirty_blocks: int
    dirty_granularity: int
    peer_connected: bool
    fuse_running: bool
    sync_active: bool
    sync_done: bool
    sync_offset: int
    sync_total: int
    bytes_synced: int
    last_error: str
    # Fencing (ext/server.h, "Peer failure"): suspended after a peer loss,
    # failed after resume(degraded=False), held = FUSE replies waiting now.
    suspended: bool = False
    failed_io: bool = False
    held: int = 0
    bytes_zeroed: int = 0  # of bytes_synced: holes sent as SYNC_ZERO (no data on the wire)
    verify_diff_bytes: int = 0  # online verify: bytes found different, marked dirty
    verifying: bool = False  # the running sync is an online verify
    bytes_verified: int = 0  # compared with the peer (verify, checksum sync)

    @property
    def dirty_bytes(self) -> int:
        return self.dirty_blocks * self.dirty_granularity

    @property
    def ack_latency_avg_us(self) -> float:
        return self.ack_latency_ns_total / self.acked / 1000 if self.acked else 0.0


@dataclass(frozen=True)
class DurabilityStats(_Stats):
    """How flushes were served ("Durable writes" in ext/server.c).

    dsync_writes: O_DSYNC/O_SYNC writes made durable on both sides before
    their reply (F_SYNC frame + local RWF_DSYNC); flush_frames: FLUSH frames
    actually sent; fdatasyncs: local fdatasyncs actually done. A flush with
    nothing left to make durable needs neither. Kept apart from ServerStats,
    whose field order is a compatibility contract.
    """

    flushes: int
    dsync_writes: int
    flush_frames: int
    fdatasyncs: int


@dataclass(frozen=True)
class ActivityLogStats(_Stats):
    """The primary's activity log (all zero without one).

    al_updates: records written (each a pwrite + fdatasync before a write to
    a cold extent); al_waits: writes that waited for a slot with nothing in
    flight; al_flushes: flushes (local fdatasync, and a FLUSH the peer acked
    while connected) made so that idle extents could go cold; al_hot:
    extents hot now, of al_slots.
    """

    al_updates: int
    al_waits: int
    al_flushes: int
    al_hot: int
    al_slots: int
    al_extent_size: int


@dataclass(frozen=True)
class ZeroCopyStats(_Stats):
    """Data frames whose payload was spliced to the socket, not copied
    ("Zero-copy sends" in ext/server.c): writes of at least 256 KiB while a
    peer is connected."""

    frames_spliced: int
    bytes_spliced: int


@dataclass(frozen=True)
class ReceiverStats(_Stats):
    frames: int
    writes: int
    syncs: int
    flushes: int
    bytes_applied: int
    acks_sent: int
    crc_errors: int
    protocol_errors: int
    last_seq: int
    connected: bool
    error_code: int
    last_error: str
    durable_writes: int = 0  # data frames flagged F_SYNC, applied with RWF_DSYNC
    bytes_zeroed: int = 0  # SYNC_ZERO ranges made to read as zeros
    bytes_verified: int = 0  # VERIFY ranges compared
    verify_diffs: int = 0  # VERIFY frames answered VERIFY_DIFF


def _stats(cls: type[_Stats], c: Any) -> Any:
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        v = getattr(c, f.name)
        if f.type == "str":
            v = ffi.string(v).decode(errors="replace")
        elif f.type == "bool":
            v = bool(v)
        values[f.name] = v
    return cls(**values)


def _take_fd(sock_fd: int) -> None:
    """Close the caller's fd once C holds its own duplicate (ownership contract)."""
    try:
        os.close(sock_fd)
    except OSError:
        pass


# ---- primary server -------------------------------------------------------

_MAX_WRITE = 1 << 20  # the largest FUSE write (MAX_WRITE in ext/server.c)


def _check_al_geometry(extent_size: int, slots: int) -> None:
    """One sentence for each way the activity log settings can be wrong (C says only EINVAL)."""
    lo, hi = lib.MRD_AL_MIN_EXTENT, lib.MRD_AL_MAX_EXTENT
    if not lo <= extent_size <= hi or extent_size & (extent_size - 1):
        raise BadInput(f"The activity log extent size must be a power of two from {lo} to {hi} bytes, "
                       f"not {extent_size}.")
    # A write needs every extent it touches hot at once.
    need = (_MAX_WRITE + extent_size - 2) // extent_size + 1
    if not need <= slots <= AL_MAX_SLOTS:
        raise BadInput(f"The activity log needs {need} to {AL_MAX_SLOTS} slots with {extent_size}-byte "
                       f"extents, not {slots}.")


class PrimaryServer:
    """The disk at disk_path served as the regular file mountpoint, replicated to a peer.

    Control calls are serialised by a lock; none of them is on the I/O path.

    activity_log: path of the activity log file (ext/activity_log.h); the
    product always passes one. Without it nothing records which extents may
    hold writes the peer never got, so a crash of this primary could leave
    blocks that no resync overwrites: only for tests and benches.
    """

    def __init__(self, disk_path: str, mountpoint: str, size: int = 0, peer_timeout_ms: int = 10000,
                 activity_log: str | None = None, al_extent_size: int = AL_DEFAULT_EXTENT_SIZE,
                 al_slots: int = AL_DEFAULT_SLOTS) -> None:
        if activity_log is not None:
            _check_al_geometry(al_extent_size, al_slots)
        out = ffi.new("struct mrd_server **")
        _check(lib.mrd_server_new(disk_path.encode(), mountpoint.encode(), size, out),
               f"open {disk_path}")
        self._s: Any = out[0]
        self._lock = threading.Lock()
        self.disk_path = disk_path
        self.mountpoint = mountpoint
        self.activity_log = activity_log
        try:
            _check(lib.mrd_server_set_peer_timeout(self._s, peer_timeout_ms), "set peer timeout")
            if activity_log is not None:
                _check(lib.mrd_server_set_activity_log(self._s, activity_log.encode(), al_extent_size, al_slots),
                       f"open activity log {activity_log}")
        except NativeError:
            lib.mrd_server_free(self._s)
            self._s = None
            raise

    def _ptr(self) -> Any:
        if self._s is None:
            raise NativeError("the server has been closed")
        return self._s

    def start(self) -> None:
        with self._lock:
            _check(lib.mrd_server_start(self._ptr()), f"serve {self.disk_path} at {self.mountpoint}")

    def attach_peer(self, sock_fd: int) -> None:
        """Replicate to the peer on this connected, handshaken socket (takes the fd)."""
        with self._lock:
            try:
                _check(lib.mrd_server_attach_peer(self._ptr(), sock_fd), "attach peer")
            finally:
                _take_fd(sock_fd)

    def detach_peer(self) -> None:
        with self._lock:
            _check(lib.mrd_server_detach_peer(self._ptr()), "detach peer")

    def set_fencing(self, on: bool) -> None:
        """With fencing on, a lost peer suspends acknowledgements until resume().

        Any peer failure except detach_peer() holds every pending and later
        write/flush reply (the data still reaches the local disk, marked
        dirty); reads keep working. Off (the default): such writes complete
        locally with success, marked dirty.
        """
        with self._lock:
            _check(lib.mrd_server_set_fencing(self._ptr(), 1 if on else 0), "set fencing")

    def resume(self, degraded: bool) -> None:
        """End a fencing suspension.

        degraded=True: answer every held op with success (blocks stay dirty)
        and go on local-only; a no-op when not suspended; NativeError
        (code E_STATE) after resume(degraded=False). degraded=False: answer
        held ops with EIO and fail every later write/flush with EIO (step
        down); allowed in any state.
        """
        with self._lock:
            _check(lib.mrd_server_resume(self._ptr(), RESUME_DEGRADED if degraded else RESUME_FAIL),
                   "resume I/O")

    def resume_caught_up(self, peer_failures: int) -> bool:
        """End a suspension because the peer's resync brought it the held writes, only if that
        connection is still up (peer_failures as read when the resync finished): True when
        released or not suspended, False when the link went since (nothing changed)."""
        with self._lock:
            rc = lib.mrd_server_resume_caught_up(self._ptr(), peer_failures)
        if rc == E_NOPEER:
            return False
        _check(rc, "resume I/O")
        return True

    def start_sync(self, from_offset: int = 0, dirty_only: bool = False, checksum: bool = False) -> None:
        """Copy the disk (or only its dirty blocks) to the peer in the background.

        ``checksum``: compare the dirty chunks with the peer's first and copy
        only those that differ (ext/server.h, MRD_SYNC_CHECKSUM).
        """
        flags = SYNC_CHECKSUM if checksum else SYNC_DIRTY_ONLY if dirty_only else 0
        with self._lock:
            _check(lib.mrd_server_start_sync(self._ptr(), from_offset, flags), "start sync")

    def set_sync_rate(self, bytes_per_s: int) -> None:
        """Ceiling on a sync's average rate (0: none); a sync also yields to application writes."""
        with self._lock:
            _check(lib.mrd_server_set_sync_rate(self._ptr(), bytes_per_s), "set sync rate")

    def set_unflushed_limit(self, max_bytes: int, max_ms: int) -> None:
        """When the server sends a FLUSH of its own: once the peer holds max_bytes
        acked but not yet flushed, or the oldest such range is max_ms old."""
        with self._lock:
            _check(lib.mrd_server_set_unflushed_limit(self._ptr(), max_bytes, max_ms), "set unflushed limit")

    def start_verify(self, from_offset: int = 0) -> None:
        """Compare the disk with the peer's, chunk by chunk, in the background (online verify).

        Chunks that differ are marked dirty (``stats().verify_diff_bytes``);
        a dirty-only sync afterwards repairs them. Runs in place of a sync.
        """
        with self._lock:
            _check(lib.mrd_server_start_sync(self._ptr(), from_offset, SYNC_VERIFY), "start verify")

    def stop_sync(self) -> None:
        with self._lock:
            _check(lib.mrd_server_stop_sync(self._ptr()), "stop sync")

    def _read_stats(self, cls: type[_Stats]) -> Any:
        c = ffi.new("struct mrd_server_stats *")
        with self._lock:
            _check(lib.mrd_server_stats(self._ptr(), c), "server stats")
        return _stats(cls, c)

    def stats(self) -> ServerStats:
        result: ServerStats = self._read_stats(ServerStats)
        return result

    def durability_stats(self) -> DurabilityStats:
        result: DurabilityStats = self._read_stats(DurabilityStats)
        return result

    def activity_log_stats(self) -> ActivityLogStats:
        result: ActivityLogStats = self._read_stats(ActivityLogStats)
        return result

    def zero_copy_stats(self) -> ZeroCopyStats:
        result: ZeroCopyStats = self._read_stats(ZeroCopyStats)
        return result

    def dirty_bitmap(self) -> bytes:
        """The live dirty bitmap, serialised as in ext/bitmap.h."""
        with self._lock:
            n = _check(lib.mrd_server_dirty_nbytes(self._ptr()), "dirty bitmap size")
            buf = ffi.new("uint8_t[]", max(1, n))
            n = _check(lib.mrd_server_dirty_snapshot(self._ptr(), buf, n), "dirty bitmap snapshot")
        return bytes(ffi.buffer(buf, n))

    def load_dirty_bitmap(self, data: bytes) -> None:
        """Restore a persisted bitmap (before start)."""
        with self._lock:
            _check(lib.mrd_server_dirty_load(self._ptr(), ffi.from_buffer(data), len(data)), "load dirty bitmap")

    def mark_dirty(self, offset: int, length: int) -> int:
        with self._lock:
            return _check(lib.mrd_server_dirty_mark(self._ptr(), offset, length), "mark dirty")

    def debug_corrupt_next(self, n: int) -> None:
        """Test hook: corrupt the payload of the next n frames after their CRC."""
        with self._lock:
            _check(lib.mrd_server_debug_corrupt_next(self._ptr(), n), "debug corrupt")

    def stop(self) -> None:
        """Stop sync, drain briefly, flush and drop the peer, unmount, join all C threads,
        then make this disk durable.

        NativeError with errno EBUSY: the FUSE loop could not be stopped (call
        again). With errno EIO: everything stopped, but this disk failed an
        fdatasync (now or earlier), so the stop is not clean.
        """
        with self._lock:
            if self._s is not None:
                _check(lib.mrd_server_stop(self._s), f"stop serving {self.mountpoint}")

    def close(self) -> None:
        """stop() and free the C object (the server cannot be used afterwards), also
        when the stop was not clean; stop()'s error is raised after that."""
        with self._lock:
            if self._s is None:
                return
            rc = lib.mrd_server_stop(self._s)
            if rc != -errno.EBUSY:  # else threads still use it: leak rather than free
                lib.mrd_server_free(self._s)
                self._s = None
            _check(rc, f"stop serving {self.mountpoint}")

    def __enter__(self) -> PrimaryServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- receiver -------------------------------------------------------------

class Receiver:
    """Applies the primary's frames to disk_path from a connected socket (takes the fd)."""

    def __init__(self, disk_path: str, size: int, sock_fd: int) -> None:
        out = ffi.new("struct mrd_receiver **")
        try:
            _check(lib.mrd_receiver_start(disk_path.encode(), size, sock_fd, out), f"receive into {disk_path}")
        finally:
            _take_fd(sock_fd)
        self._r: Any = out[0]
        self._lock = threading.Lock()
        self.disk_path = disk_path

    def stats(self) -> ReceiverStats:
        with self._lock:
            if self._r is None:
                raise NativeError("the receiver has been closed")
            c = ffi.new("struct mrd_receiver_stats *")
            _check(lib.mrd_receiver_stats(self._r, c), "receiver stats")
        result: ReceiverStats = _stats(ReceiverStats, c)
        return result

    def stop(self) -> None:
        """Close the connection and join the thread; stats stay readable."""
        with self._lock:
            if self._r is not None:
                _check(lib.mrd_receiver_stop(self._r), "stop receiver")

    def close(self) -> None:
        with self._lock:
            if self._r is not None:
                lib.mrd_receiver_free(self._r)
                self._r = None

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
