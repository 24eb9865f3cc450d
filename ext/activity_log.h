/* Activity log (DRBD's "al"): the set of "hot" extents of the disk in which
 * this node's writes may be in flight, persisted BEFORE a write to a cold
 * extent is issued. After a crash of the primary, the extents it lists are
 * the only places where its disk may hold data the peer never got; resyncing
 * them (instead of the whole disk) makes the two copies equal again.
 *
 * On disk: a file of two fixed 4 KiB records, written alternately (never the
 * one holding the newest valid record), each with pwrite + fdatasync. No
 * rename: a torn or corrupt record fails its CRC and the reader takes the
 * other one. Record layout, little-endian:
 *
 *    0  u32  magic MRD_AL_MAGIC ("MRAL")
 *    4  u16  version (1)          6  u16  reserved, 0
 *    8  u64  sequence number (serial arithmetic: newer wins, wraps at 2^64)
 *   16  u64  extent size in bytes (a power of two)
 *   24  u32  slots (capacity of the log that wrote it)
 *   28  u32  count of hot extents listed (<= slots)
 *   32  u64  extent numbers [count], least recently used first
 *        ... zero
 * 4092  u32  CRC32C of bytes 0..4091
 *
 * In memory: `slots` entries, each with an in-flight count. mrd_al_begin
 * makes every extent of a byte range hot (evicting the least recently used
 * extent with nothing in flight; waiting while every slot is busy) and
 * counts the range in flight; mrd_al_end drops it. An extent already hot
 * costs one short critical section, no system call. Threads that need new
 * extents at the same time share one record write (group commit).
 *
 * A record write that fails (pwrite/fdatasync) is sticky: every later
 * mrd_al_begin that needs a cold extent returns that error, since its write
 * could no longer be covered.
 *
 * Cold only when clean. "Complete" (mrd_al_end) is not "durable": the
 * server's local pwrite may sit in its page cache, the peer's ack may come
 * from the peer's page cache. An extent that left the log while such a
 * write was only cached is named nowhere after a power loss of the primary
 * (or of both appliances), and the resync that follows would skip it: the
 * two disks would differ there for good, silently. DRBD avoids this by
 * writing every activity-log transaction with a cache flush before it. So
 * with a flush callback set (mrd_al_set_callbacks), an extent with writes
 * completed since the last successful flush is not evicted: when no clean
 * idle slot is left, one waiting thread calls the callback (nobody else
 * flushes meanwhile) and the extents whose writes ended before the call
 * become clean. The callback returns 0, MRD_ENOPEER to be called again in
 * MRD_AL_FLUSH_RETRY_MS (the writer waits), or another error, which
 * mrd_al_begin returns.
 *
 * Kept hot. An extent can also hold blocks that differ from the peer's
 * while the pair counts as in sync (a local write that failed after its
 * frame went): only the in-memory dirty bitmap knows them, and after a
 * crash of the primary only the log would. With a keep callback set
 * (mrd_al_set_callbacks), an idle extent it names is never evicted; if every
 * idle extent is kept, a write to a cold one waits like one that finds
 * every slot busy. */
#ifndef MIRRORD_ACTIVITY_LOG_H
#define MIRRORD_ACTIVITY_LOG_H
#include <stddef.h>
#include <stdint.h>

#define MRD_AL_MAGIC 0x4C41524Du /* "MRAL" little-endian */
#define MRD_AL_VERSION 1
#define MRD_AL_RECORD_SIZE 4096
#define MRD_AL_FILE_SIZE (2 * MRD_AL_RECORD_SIZE)
#define MRD_AL_MAX_SLOTS 507 /* (4092 - 32) / 8 */
#define MRD_AL_MIN_EXTENT (64u << 10)
#define MRD_AL_MAX_EXTENT (1u << 30)
#define MRD_AL_DEFAULT_EXTENT (4u << 20)
#define MRD_AL_DEFAULT_SLOTS 507 /* 2 GiB hot at 4 MiB (DRBD: 1237 x 4 MiB) */

struct mrd_al_record {
    uint64_t seq;
    uint64_t extent_size;
    uint32_t slots;
    uint32_t count;
    uint64_t extents[MRD_AL_MAX_SLOTS];
};

/* Is sequence a newer than b (serial arithmetic over 2^64)? */
int mrd_al_seq_newer(uint64_t a, uint64_t b);
/* Serialise r into out (MRD_AL_RECORD_SIZE bytes, CRC included); -EINVAL if
 * r breaks a rule the decoder checks. */
int mrd_al_encode(const struct mrd_al_record *r, uint8_t *out);
/* Parse and check one record (buflen >= MRD_AL_RECORD_SIZE): 0, or
 * MRD_EALBAD when magic, version, CRC or a field is wrong. */
int mrd_al_decode(const uint8_t *buf, size_t buflen, struct mrd_al_record *out);
/* The newest valid record of the file at path. 1 when found (which = its
 * record index 0/1, may be NULL); 0 when the file is missing or empty (no
 * record was ever written: nothing can have been issued); MRD_EALBAD when
 * neither record is valid; a negative errno when it cannot be read. */
int mrd_al_read(const char *path, struct mrd_al_record *out, int *which);

struct mrd_al;

struct mrd_al_stats {
    uint64_t updates;  /* records written (each pwrite + fdatasync) */
    uint64_t waits;    /* begins that waited for a slot with nothing in flight */
    uint64_t flushes;  /* successful flush callbacks (see "Cold only when clean") */
    uint32_t hot;      /* extents in the log now */
    uint32_t busy;     /* of them, with writes in flight */
    uint32_t waiting;  /* threads waiting in begin now */
    uint32_t slots;
    uint64_t extent_size;
};

/* Open (create) the log at path. An existing valid record is kept: its
 * extents start hot (least recently used first, nothing in flight) so the
 * file never forgets them on its own; MRD_EALGEOM if it was written with
 * another extent size or holds more extents than slots, MRD_EALBAD if the
 * file has no valid record. extent_size: power of two in
 * [MRD_AL_MIN_EXTENT, MRD_AL_MAX_EXTENT]; slots in [1, MRD_AL_MAX_SLOTS]. */
int mrd_al_open(const char *path, uint64_t extent_size, uint32_t slots, struct mrd_al **out);
/* Make every extent of [off, off+len) hot (persisted) and count the range in
 * flight; blocks while too few slots are free. -E2BIG if the range needs
 * more extents than there are slots (it could never proceed), -EINVAL for
 * len 0, the sticky record-write error otherwise. */
int mrd_al_begin(struct mrd_al *al, uint64_t off, uint64_t len);
/* The write over [off, off+len) begun earlier is complete (not necessarily
 * durable: see "Cold only when clean"). */
void mrd_al_end(struct mrd_al *al, uint64_t off, uint64_t len);
/* Makes every write completed before the call durable wherever a crash
 * could lose it (see "Cold only when clean"). */
typedef int (*mrd_al_flush_fn)(void *ctx);
#define MRD_AL_FLUSH_RETRY_MS 50
/* Must extent ext stay hot (see "Kept hot")? Called under the log's mutex,
 * only while a victim is chosen: it must not block or call into the log. */
typedef int (*mrd_al_keep_fn)(void *ctx, uint64_t ext);
/* Set both callbacks (each may be NULL, the default: an idle extent goes
 * cold at once, none is kept), before the log is used. */
void mrd_al_set_callbacks(struct mrd_al *al, mrd_al_flush_fn flush, mrd_al_keep_fn keep, void *ctx);
/* Persist an empty log (nothing hot; no write when it already is):
 * MRD_ESTATE while anything is in flight or waiting. */
int mrd_al_clear(struct mrd_al *al);
/* The extent numbers hot now, least recently used first; returns how many
 * (at most max are copied). */
long mrd_al_hot(struct mrd_al *al, uint64_t *out, long max);
int mrd_al_stats(struct mrd_al *al, struct mrd_al_stats *out);
void mrd_al_close(struct mrd_al *al);

#endif
