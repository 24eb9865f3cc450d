/* Dirty bitmap: one bit per `granularity` bytes of the disk (4 KiB default),
 * set for every block the peer has not got.
 *
 * Thread-safe: set/clear/count may be called concurrently from FUSE worker
 * threads and the replication threads (word-level atomics, exact count).
 *
 * Rounding: set_range marks every block the byte range touches (a partial
 * write dirties its whole block); clear_range clears only blocks the range
 * covers completely (a partial copy does not make a block clean), except that
 * the last, possibly short, block of the disk counts as covered when the range
 * reaches the end of the disk.
 *
 * Serialised form (snapshot/load): ceil(nblocks / 8) bytes, block i is bit
 * (i % 8) of byte (i / 8), bits past the last block are zero. */
#ifndef MIRRORD_BITMAP_H
#define MIRRORD_BITMAP_H
#include <stddef.h>
#include <stdint.h>

struct mrd_bitmap;

/* granularity: power of two >= 512. Returns 0 or -EINVAL / -ENOMEM. */
int mrd_bitmap_new(uint64_t size_bytes, uint32_t granularity, struct mrd_bitmap **out);
void mrd_bitmap_free(struct mrd_bitmap *bm);

uint64_t mrd_bitmap_size(const struct mrd_bitmap *bm);
uint32_t mrd_bitmap_granularity(const struct mrd_bitmap *bm);
uint64_t mrd_bitmap_nblocks(const struct mrd_bitmap *bm);
size_t mrd_bitmap_nbytes(const struct mrd_bitmap *bm);
uint64_t mrd_bitmap_count(const struct mrd_bitmap *bm);

/* Return the number of bits that changed, or MRD_ERANGE when the byte range
 * goes past the end of the disk (nothing is changed then). */
int64_t mrd_bitmap_set_range(struct mrd_bitmap *bm, uint64_t offset, uint64_t len);
int64_t mrd_bitmap_clear_range(struct mrd_bitmap *bm, uint64_t offset, uint64_t len);
void mrd_bitmap_set_all(struct mrd_bitmap *bm);
void mrd_bitmap_clear_all(struct mrd_bitmap *bm);
int mrd_bitmap_test(const struct mrd_bitmap *bm, uint64_t block);

/* First set (clear) block index in [from_block, limit_block), or -1 when
 * there is none (limit_block beyond the last block means "to the end"). */
int64_t mrd_bitmap_find_next_set(const struct mrd_bitmap *bm, uint64_t from_block, uint64_t limit_block);
int64_t mrd_bitmap_find_next_clear(const struct mrd_bitmap *bm, uint64_t from_block, uint64_t limit_block);

/* Copy out / in the serialised form. snapshot returns the bytes written
 * (-ENOSPC if buf is too small); load needs exactly nbytes and rejects set
 * bits past the last block (-EINVAL), leaving the bitmap unchanged. */
long mrd_bitmap_snapshot(const struct mrd_bitmap *bm, void *buf, size_t buflen);
int mrd_bitmap_load(struct mrd_bitmap *bm, const void *buf, size_t buflen);

#endif
