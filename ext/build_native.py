"""cffi builder (out-of-line API mode) for mirrord's C data path: ``mirrord._native``.

Each area has its own header in ext/; this file lists them once for cdef and
once for compilation, so adding an area means adding its header here.

Build in place (from the project root)::

    .venv/bin/pip install -q --no-build-isolation -e .
"""

from __future__ import annotations

import pathlib
import subprocess

from cffi import FFI

# setuptools wants paths relative to the project root, where setup.py runs.
HERE = pathlib.Path("ext")

# The cdef mirrors the public headers (cffi cannot parse them directly because
# of their includes and macros); keep the two in step.
CDEF = """
/* crc32c.h */
uint32_t mrd_crc32c(uint32_t crc, const void *buf, size_t len);
uint32_t mrd_crc32c_portable(uint32_t crc, const void *buf, size_t len);

/* common.h */
#define MRD_E_BASE 10000
const char *mrd_strerror(int code);

/* frame.h */
#define MRD_FRAME_MAGIC 0x3144524D
#define MRD_FRAME_HEADER_SIZE 32
#define MRD_FRAME_MAX_PAYLOAD 1048576
#define MRD_FRAME_F_SYNC 1
enum {
    MRD_FRAME_WRITE = 1, MRD_FRAME_WRITE_ACK = 2, MRD_FRAME_FLUSH = 3,
    MRD_FRAME_FLUSH_ACK = 4, MRD_FRAME_SYNC_DATA = 5, MRD_FRAME_SYNC_ACK = 6,
    MRD_FRAME_PING = 7, MRD_FRAME_PONG = 8, MRD_FRAME_SYNC_ZERO = 9,
    MRD_FRAME_VERIFY = 10, MRD_FRAME_VERIFY_SAME = 11, MRD_FRAME_VERIFY_DIFF = 12,
};
#define MRD_FRAME_ZERO_PAYLOAD 8
#define MRD_FRAME_VERIFY_PAYLOAD 12
struct mrd_frame_header {
    uint32_t magic; uint16_t type; uint16_t flags;
    uint64_t seq; uint64_t offset; uint32_t length; uint32_t crc;
};
int mrd_frame_encode(uint8_t *out, uint16_t type, uint16_t flags, uint64_t seq,
                     uint64_t offset, const void *payload, uint32_t len);
int mrd_frame_decode(const uint8_t *buf, size_t buflen, struct mrd_frame_header *out);
int mrd_frame_verify(const uint8_t *raw_header, const struct mrd_frame_header *hdr,
                     const void *payload, size_t payload_len);
long mrd_frame_parse(const void *buf, size_t buflen, struct mrd_frame_header *out);
int mrd_frame_type_has_payload(uint16_t type);
uint64_t mrd_frame_zero_length(const void *payload);
void mrd_frame_zero_payload(uint8_t *out, uint64_t len);
uint32_t mrd_frame_verify_crc(const void *payload);
void mrd_frame_verify_payload(uint8_t *out, uint64_t len, uint32_t crc);
uint32_t mrd_frame_header_crc(const uint8_t *raw_header);

/* bitmap.h */
struct mrd_bitmap;
int mrd_bitmap_new(uint64_t size_bytes, uint32_t granularity, struct mrd_bitmap **out);
void mrd_bitmap_free(struct mrd_bitmap *bm);
uint64_t mrd_bitmap_size(const struct mrd_bitmap *bm);
uint32_t mrd_bitmap_granularity(const struct mrd_bitmap *bm);
uint64_t mrd_bitmap_nblocks(const struct mrd_bitmap *bm);
size_t mrd_bitmap_nbytes(const struct mrd_bitmap *bm);
uint64_t mrd_bitmap_count(const struct mrd_bitmap *bm);
int64_t mrd_bitmap_set_range(struct mrd_bitmap *bm, uint64_t offset, uint64_t len);
int64_t mrd_bitmap_clear_range(struct mrd_bitmap *bm, uint64_t offset, uint64_t len);
void mrd_bitmap_set_all(struct mrd_bitmap *bm);
void mrd_bitmap_clear_all(struct mrd_bitmap *bm);
int mrd_bitmap_test(const struct mrd_bitmap *bm, uint64_t block);
int64_t mrd_bitmap_find_next_set(const struct mrd_bitmap *bm, uint64_t from_block, uint64_t limit_block);
int64_t mrd_bitmap_find_next_clear(const struct mrd_bitmap *bm, uint64_t from_block, uint64_t limit_block);
long mrd_bitmap_snapshot(const struct mrd_bitmap *bm, void *buf, size_t buflen);
int mrd_bitmap_load(struct mrd_bitmap *bm, const void *buf, size_t buflen);

/* activity_log.h */
#define MRD_AL_MAGIC 0x4C41524D
#define MRD_AL_RECORD_SIZE 4096
#define MRD_AL_FILE_SIZE 8192
#define MRD_AL_MAX_SLOTS 507
#define MRD_AL_MIN_EXTENT 65536
#define MRD_AL_MAX_EXTENT 1073741824
#define MRD_AL_DEFAULT_EXTENT 4194304
#define MRD_AL_DEFAULT_SLOTS 507
struct mrd_al_record {
    uint64_t seq;
    uint64_t extent_size;
    uint32_t slots;
    uint32_t count;
    uint64_t extents[507];
};
struct mrd_al_stats {
    uint64_t updates;
    uint64_t waits;
    uint64_t flushes;
    uint32_t hot;
    uint32_t busy;
    uint32_t waiting;
    uint32_t slots;
    uint64_t extent_size;
};
struct mrd_al;
int mrd_al_seq_newer(uint64_t a, uint64_t b);
int mrd_al_encode(const struct mrd_al_record *r, uint8_t *out);
int mrd_al_decode(const uint8_t *buf, size_t buflen, struct mrd_al_record *out);
int mrd_al_read(const char *path, struct mrd_al_record *out, int *which);
int mrd_al_open(const char *path, uint64_t extent_size, uint32_t slots, struct mrd_al **out);
int mrd_al_begin(struct mrd_al *al, uint64_t off, uint64_t len);
void mrd_al_end(struct mrd_al *al, uint64_t off, uint64_t len);
typedef int (*mrd_al_flush_fn)(void *ctx);
#define MRD_AL_FLUSH_RETRY_MS 50
typedef int (*mrd_al_keep_fn)(void *ctx, uint64_t ext);
void mrd_al_set_callbacks(struct mrd_al *al, mrd_al_flush_fn flush, mrd_al_keep_fn keep, void *ctx);
int mrd_al_clear(struct mrd_al *al);
long mrd_al_hot(struct mrd_al *al, uint64_t *out, long max);
int mrd_al_stats(struct mrd_al *al, struct mrd_al_stats *out);
void mrd_al_close(struct mrd_al *al);

/* server.h */
#define MRD_SYNC_DIRTY_ONLY 1
#define MRD_SYNC_VERIFY 2
#define MRD_SYNC_CHECKSUM 4
#define MRD_RESUME_DEGRADED 1
#define MRD_RESUME_FAIL 2
struct mrd_server;
struct mrd_server_stats {
    uint64_t size;
    uint64_t writes, bytes_written;
    uint64_t reads, bytes_read;
    uint64_t flushes;
    uint64_t write_errors;
    uint64_t max_write_seen;
    uint64_t frames_sent, bytes_sent;
    uint64_t acked;
    uint64_t in_flight;
    uint64_t ack_latency_ns_total;
    uint64_t ack_latency_ns_max;
    uint64_t peer_failures;
    uint64_t dirty_blocks;
    uint32_t dirty_granularity;
    int32_t peer_connected;
    int32_t fuse_running;
    int32_t sync_active;
    int32_t sync_done;
    int32_t pad0;
    uint64_t sync_offset;
    uint64_t sync_total;
    uint64_t bytes_synced;
    uint64_t held;
    int32_t suspended;
    int32_t failed_io;
    uint64_t dsync_writes;
    uint64_t flush_frames;
    uint64_t fdatasyncs;
    uint64_t bytes_zeroed;
    uint64_t verify_diff_bytes;
    int32_t verifying;
    int32_t pad1;
    uint64_t bytes_verified;
    char last_error[256];
    uint64_t al_updates, al_waits;
    uint32_t al_hot, al_slots;
    uint64_t al_extent_size;
    uint64_t frames_spliced, bytes_spliced;
    uint64_t al_flushes;
};
int mrd_server_new(const char *disk_path, const char *mountpoint, uint64_t size,
                   struct mrd_server **out);
int mrd_server_set_peer_timeout(struct mrd_server *s, uint32_t timeout_ms);
int mrd_server_set_activity_log(struct mrd_server *s, const char *path, uint64_t extent_size,
                                uint32_t slots);
int mrd_server_start(struct mrd_server *s);
int mrd_server_attach_peer(struct mrd_server *s, int sock_fd);
int mrd_server_detach_peer(struct mrd_server *s);
int mrd_server_set_fencing(struct mrd_server *s, int on);
int mrd_server_resume(struct mrd_server *s, int how);
int mrd_server_resume_caught_up(struct mrd_server *s, uint64_t peer_failures);
int mrd_server_start_sync(struct mrd_server *s, uint64_t from_offset, uint32_t flags);
int mrd_server_set_sync_rate(struct mrd_server *s, uint64_t bytes_per_s);
int mrd_server_set_unflushed_limit(struct mrd_server *s, uint64_t max_bytes, uint32_t max_ms);
int mrd_server_stop_sync(struct mrd_server *s);
int mrd_server_stats(struct mrd_server *s, struct mrd_server_stats *out);
long mrd_server_dirty_nbytes(struct mrd_server *s);
long mrd_server_dirty_snapshot(struct mrd_server *s, void *buf, long buflen);
int mrd_server_dirty_load(struct mrd_server *s, const void *buf, long buflen);
int64_t mrd_server_dirty_mark(struct mrd_server *s, uint64_t offset, uint64_t len);
int mrd_server_debug_corrupt_next(struct mrd_server *s, uint32_t n);
int mrd_server_stop(struct mrd_server *s);
void mrd_server_free(struct mrd_server *s);

/* receiver.h */
struct mrd_receiver;
struct mrd_receiver_stats {
    uint64_t frames;
    uint64_t writes;
    uint64_t syncs;
    uint64_t flushes;
    uint64_t bytes_applied;
    uint64_t acks_sent;
    uint64_t crc_errors;
    uint64_t protocol_errors;
    uint64_t last_seq;
    uint64_t durable_writes;
    uint64_t bytes_zeroed;
    uint64_t bytes_verified;
    uint64_t verify_diffs;
    int32_t connected;
    int32_t error_code;
    char last_error[256];
};
int mrd_receiver_start(const char *disk_path, uint64_t size, int sock_fd,
                       struct mrd_receiver **out);
int mrd_receiver_stats(struct mrd_receiver *r, struct mrd_receiver_stats *out);
int mrd_receiver_stop(struct mrd_receiver *r);
void mrd_receiver_free(struct mrd_receiver *r);
"""

HEADERS = ["crc32c.h", "common.h", "frame.h", "bitmap.h", "activity_log.h", "server.h", "receiver.h"]
SOURCES = ["crc32c.c", "common.c", "frame.c", "bitmap.c", "activity_log.c", "netio.c", "server.c", "receiver.c"]


def _pkg_config(*args: str) -> list[str]:
    out = subprocess.run(["pkg-config", *args, "fuse3"], capture_output=True, text=True, check=True)
    return out.stdout.split()


_fuse_cflags = _pkg_config("--cflags")
_fuse_libs = _pkg_config("--libs")

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "mirrord._native",
    "".join(f'#include "{h}"\n' for h in HEADERS),
    sources=[str(HERE / s) for s in SOURCES],
    depends=[str(HERE / h) for h in [*HEADERS, "netio.h"]],
    include_dirs=[str(HERE)] + [f[2:] for f in _fuse_cflags if f.startswith("-I")],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_FILE_OFFSET_BITS=64"]
    + [f for f in _fuse_cflags if not f.startswith("-I")],
    libraries=sorted({f[2:] for f in _fuse_libs if f.startswith("-l")} | {"pthread"}),
    library_dirs=[f[2:] for f in _fuse_libs if f.startswith("-L")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
