/* Primary side: serve one disk as one regular file through FUSE (libfuse3
 * low-level API, multi-threaded loop in C threads) and replicate every write
 * to the peer with protocol C: the FUSE reply for a write is sent only when
 * the local pwrite is done AND the peer's WRITE_ACK arrived. An O_DSYNC or
 * O_SYNC write is made durable on both sides before that reply (frame
 * flagged MRD_FRAME_F_SYNC, local RWF_DSYNC), so the fsync the kernel sends
 * after it needs neither a FLUSH round trip nor a local fdatasync; a
 * flush/fsync does each only if some completed write is not yet durable
 * there ("Durable writes" in server.c).
 *
 * Threads: the FUSE loop (+ its workers), an ack reader and a flusher while
 * a peer is attached, a sync thread while a full/dirty sync runs. None of them ever
 * calls into Python.
 *
 * Ordering: writes, sync reads and frame enqueueing take striped locks per
 * 64 KiB of the disk, so overlapping writes reach the peer in the order they
 * reached the local disk, and a sync chunk is either sent before a racing
 * write's frame or already contains its data. Frames go on the wire in the
 * order they were queued; concurrent writers share sendmsg calls.
 *
 * Peer failure (send/recv error, timeout, bad frame, detach), fencing off
 * (the default): every pending write completes locally with success and its
 * blocks are marked in the dirty bitmap, as is every range the peer acked
 * but no FLUSH_ACK has covered yet ("Unflushed ranges" in server.c: the
 * peer may have it in its page cache only); later writes are local-only
 * and dirty, until attach_peer.
 *
 * Peer failure with fencing on (mrd_server_set_fencing), except an explicit
 * detach_peer, which behaves as above: the server is SUSPENDED. Pending
 * writes and flushes are not answered: their blocks are marked dirty and
 * they go on a held list. While suspended, new writes still reach the local
 * disk (under the extent lock; dirty unless a peer attached meanwhile got
 * and acked them) and new flushes still fdatasync, but no successful reply
 * is sent: they are held too (an op that completes while suspended is held
 * even if the peer had acked it). Local I/O errors are answered at once.
 * Reads keep working. mrd_server_resume ends it: DEGRADED answers every held
 * op with its local result (success; the blocks stay dirty) and goes back to
 * the behaviour above; FAIL answers every held write/flush with EIO and
 * enters the FAILED state, where every later write/flush gets EIO at once
 * (nothing is written or acknowledged any more; reads still work) until the
 * server is freed. mrd_server_stop answers anything held with EIO. */
#ifndef MIRRORD_SERVER_H
#define MIRRORD_SERVER_H
#include <stdint.h>

struct mrd_server;

#define MRD_SYNC_DIRTY_ONLY 1u /* start_sync flag: send only dirty blocks */
#define MRD_SYNC_VERIFY 2u     /* start_sync flag: compare, send nothing (see frame.h VERIFY) */
#define MRD_SYNC_CHECKSUM 4u   /* start_sync flag: compare the dirty chunks, copy only those that differ */
#define MRD_RESUME_DEGRADED 1  /* resume: acknowledge held ops, go on local-only */
#define MRD_RESUME_FAIL 2      /* resume: EIO to held ops and every later write/flush */

struct mrd_server_stats {
    uint64_t size;
    uint64_t writes, bytes_written;   /* FUSE writes completed */
    uint64_t reads, bytes_read;
    uint64_t flushes;                 /* flush + fsync requests */
    uint64_t write_errors;            /* writes answered with an error */
    uint64_t max_write_seen;          /* largest single FUSE write, bytes */
    uint64_t frames_sent, bytes_sent; /* to the peer, payload bytes */
    uint64_t acked;                   /* acks received */
    uint64_t in_flight;               /* frames sent, not yet acked */
    uint64_t ack_latency_ns_total;    /* sum over acks of send -> ack time */
    uint64_t ack_latency_ns_max;
    uint64_t peer_failures;           /* connections lost (incl. detach) */
    uint64_t dirty_blocks;
    uint32_t dirty_granularity;
    int32_t peer_connected;
    int32_t fuse_running;
    int32_t sync_active;
    int32_t sync_done;                /* last sync finished completely */
    int32_t pad0;
    uint64_t sync_offset;             /* everything below it is acked */
    uint64_t sync_total;              /* bytes the sync covers */
    uint64_t bytes_synced;            /* disk bytes the sync brought to the peer, acked
                                         (SYNC_DATA payloads + SYNC_ZERO ranges; not compares) */
    uint64_t held;                    /* FUSE ops whose reply is held now */
    int32_t suspended;                /* fenced after a peer failure */
    int32_t failed_io;                /* resumed with FAIL: writes get EIO */
    uint64_t dsync_writes;            /* O_DSYNC/O_SYNC writes: durable on both sides
                                         before the reply (F_SYNC frame, RWF_DSYNC) */
    uint64_t flush_frames;            /* FLUSH frames put on the wire (flushes that needed one) */
    uint64_t fdatasyncs;              /* local fdatasyncs done by flushes */
    uint64_t bytes_zeroed;            /* of bytes_synced: holes sent as SYNC_ZERO */
    uint64_t verify_diff_bytes;       /* verify: bytes found different (marked dirty) */
    int32_t verifying;                /* the running "sync" is a verify */
    int32_t pad1;
    uint64_t bytes_verified;          /* compared with the peer (verify, checksum sync), acked */
    char last_error[256];
    /* Activity log (zero without one): records written, writes that waited
     * for a free slot, extents hot now, slots, extent size. */
    uint64_t al_updates, al_waits;
    uint32_t al_hot, al_slots;
    uint64_t al_extent_size;
    /* Zero-copy sends: data frames whose payload was spliced, not copied. */
    uint64_t frames_spliced, bytes_spliced;
    /* Activity log: flushes that let idle extents go cold (server.c, "Cold
     * extents"). */
    uint64_t al_flushes;
};

/* Prepare a server for disk_path (opened O_RDWR) exposed at mountpoint (a
 * regular file, created if missing). size 0 means the disk's size; a size
 * larger than the disk is -ENOSPC. Nothing is mounted yet. */
int mrd_server_new(const char *disk_path, const char *mountpoint, uint64_t size,
                   struct mrd_server **out);
/* How long a peer may leave a frame unacknowledged (and a send may block)
 * before it is declared gone; default 10000 ms. Takes effect on attach. */
int mrd_server_set_peer_timeout(struct mrd_server *s, uint32_t timeout_ms);
/* Keep an activity log (activity_log.h) at path, before start; MRD_ESTATE
 * after start or when one is set. Every write makes its extents hot (record
 * persisted first) before it is sent or written locally, and they count it
 * in flight until it is complete: local write done and the peer acked it or
 * is gone. Sync reads need none: a sync only copies what this disk already
 * holds to the peer, it never makes this disk differ. Extents a previous run
 * left hot are marked dirty here (they may hold writes the peer never got)
 * and stay in the log. -EINVAL when slots cannot hold the extents of one
 * largest write (2 for extents >= 1 MiB). An extent goes cold only once its
 * completed writes are durable on both disks (server.c, "Cold extents"). A
 * clean mrd_server_stop with no dirty block persists an empty log. */
int mrd_server_set_activity_log(struct mrd_server *s, const char *path, uint64_t extent_size,
                                uint32_t slots);
/* Mount and start serving (returns once the mount is live). */
int mrd_server_start(struct mrd_server *s);
/* Hand over a connected, handshaken TCP socket (dup'ed; the caller must not
 * use its socket afterwards). MRD_ESTATE if a peer is already connected or
 * the server is FAILED; allowed while suspended (held ops stay held). */
int mrd_server_attach_peer(struct mrd_server *s, int sock_fd);
/* Drop the peer on purpose (pending writes complete locally, marked dirty,
 * fencing or not). */
int mrd_server_detach_peer(struct mrd_server *s);
/* Fencing on (1) or off (0, the default), see "Peer failure" above. Turning
 * it off does not end a suspension: only resume does. */
int mrd_server_set_fencing(struct mrd_server *s, int on);
/* End a suspension. MRD_RESUME_DEGRADED: held ops are answered with success,
 * later writes are local-only and dirty (or replicated, if a peer was
 * attached meanwhile); a no-op returning 0 when not suspended; MRD_ESTATE
 * when FAILED. MRD_RESUME_FAIL: held ops get EIO and the server is FAILED
 * (from any state: used to step down, an attached peer is left alone but
 * nothing more is acknowledged); idempotent. -EINVAL for another how. */
int mrd_server_resume(struct mrd_server *s, int how);
/* End a suspension because the peer caught up (its resync brought the held
 * writes to its disk): like RESUME_DEGRADED, but only while the connection
 * whose resync the caller saw finish is still up, i.e. the peer is
 * connected and peer_failures (stats) is still the value the caller read
 * then. Otherwise MRD_ENOPEER and nothing changes: released now, the held
 * writes would be acknowledged from this disk alone. 0 when not suspended,
 * MRD_ESTATE when FAILED. */
int mrd_server_resume_caught_up(struct mrd_server *s, uint64_t peer_failures);
/* Copy the disk to the peer from from_offset (rounded down to a block) in the
 * background; with MRD_SYNC_DIRTY_ONLY only blocks set in the dirty bitmap.
 * Acked chunks clear their dirty bits. With MRD_SYNC_VERIFY nothing is
 * copied: each chunk is compared with the peer's (frame.h, VERIFY) and a
 * chunk that differs is marked dirty (verify_diff_bytes counts it); progress
 * (bytes_verified) and completion are reported like a sync's. With
 * MRD_SYNC_CHECKSUM the dirty chunks are compared first and those the peer
 * already holds are cleared, then the rest is copied (a full sync of two
 * disks that are mostly equal moves only what differs). MRD_ENOPEER without a peer,
 * MRD_ESTATE if a sync or verify is running. */
int mrd_server_start_sync(struct mrd_server *s, uint64_t from_offset, uint32_t flags);
/* Bounds on what the peer acked but may hold in its page cache only (ext/
 * server.c, "Unflushed ranges"): past max_bytes of such ranges, or when the
 * oldest is max_ms old, the server sends a FLUSH of its own; 64 MiB and
 * 1000 ms by default. Both > 0, else -EINVAL. Takes effect at once. */
int mrd_server_set_unflushed_limit(struct mrd_server *s, uint64_t max_bytes, uint32_t max_ms);
/* Ceiling on a sync's (or verify's) average rate, bytes/s; 0 = none (the
 * default). Takes effect at once, also on a running sync. Whatever the
 * ceiling, a sync yields to application writes (ext/server.c, "Pacing"). */
int mrd_server_set_sync_rate(struct mrd_server *s, uint64_t bytes_per_s);
/* Stop a running sync and wait for it (its offset is kept). */
int mrd_server_stop_sync(struct mrd_server *s);
int mrd_server_stats(struct mrd_server *s, struct mrd_server_stats *out);
/* Dirty bitmap (format of bitmap.h): size in bytes, copy out, load (load
 * only before start: it replaces the whole bitmap), mark a range. */
long mrd_server_dirty_nbytes(struct mrd_server *s);
long mrd_server_dirty_snapshot(struct mrd_server *s, void *buf, long buflen);
int mrd_server_dirty_load(struct mrd_server *s, const void *buf, long buflen);
int64_t mrd_server_dirty_mark(struct mrd_server *s, uint64_t offset, uint64_t len);
/* Test hook: flip one payload byte of each of the next n frames that carry a
 * payload, after their CRC was computed (the local disk gets good data). */
int mrd_server_debug_corrupt_next(struct mrd_server *s, uint32_t n);
/* Stop sync, wait briefly for in-flight frames, send a FLUSH and wait for its
 * ack (at most the peer timeout) so that nothing the peer acked stays
 * unflushed, detach the peer, unmount and join every thread, then fdatasync
 * this disk. -EBUSY if the FUSE loop could not be stopped; -EIO if the
 * fdatasync fails (now or any earlier one: the stop is not clean). With
 * fencing on, frames still unacked are not acknowledged: like everything
 * held, they get EIO, and a suspended server ends FAILED. */
int mrd_server_stop(struct mrd_server *s);
void mrd_server_free(struct mrd_server *s);

#endif
