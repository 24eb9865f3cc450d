/* Replication frames: a fixed 32-byte little-endian header, then payload.
 *
 *   off  size  field
 *     0     4  magic   "MRD1" (0x3144524D as a little-endian u32)
 *     4     2  type    MRD_FRAME_*
 *     6     2  flags   MRD_FRAME_F_*; only WRITE and SYNC_DATA may carry
 *                       MRD_FRAME_F_SYNC, every other bit and type: 0
 *     8     8  seq     sender's sequence number; acks echo it
 *    16     8  offset  byte offset on the disk (WRITE/SYNC_DATA; echoed in acks)
 *    24     4  length  payload bytes that follow (0 for acks, FLUSH, PING)
 *    28     4  crc     CRC32C over the header with crc = 0, then the payload
 *
 * MRD_FRAME_F_SYNC (WRITE, SYNC_DATA): the sender needs this payload durable
 * on the receiver before the ack. The receiver writes it with
 * pwritev2(RWF_DSYNC) (or pwrite + fdatasync) and only then sends the
 * WRITE_ACK/SYNC_ACK, so that ack is also a durability point for this frame
 * (not for earlier frames: those still need a FLUSH). The primary sets it on
 * a WRITE when the FUSE write is O_DSYNC/O_SYNC (like DRBD's DP_FUA), which
 * lets it answer the fsync the kernel sends right after without a FLUSH
 * round trip. The flag is covered by the CRC like every header field. A
 * receiver that predates it rejects such a frame (MRD_EFLAGS): both ends
 * must speak the same protocol version.
 *
 * MRD_FRAME_SYNC_ZERO: a sync chunk that is a hole on the source (never
 * written; lseek SEEK_DATA skips it). Instead of the chunk's bytes it carries
 * an 8-byte payload, the little-endian length of the range starting at
 * `offset` that the receiver must make read as zeros (1 ..
 * MRD_FRAME_MAX_PAYLOAD bytes: one sync chunk at most; checked with the CRC by
 * mrd_frame_verify). Acked with SYNC_ACK like SYNC_DATA, and like it not
 * durable until a FLUSH. A sparse disk then syncs in seconds, not at link
 * speed (DRBD does the same with discards during resync).
 *
 * MRD_FRAME_VERIFY (online verify, DRBD's OV_REQUEST): the primary read a
 * range under its extent lock and sends a 12-byte payload, the range length
 * (u64 LE, 1 .. MRD_FRAME_MAX_PAYLOAD) and the CRC32C of its bytes (u32 LE).
 * The receiver, in stream order (so after every earlier write to that range),
 * reads its own copy and answers VERIFY_SAME or VERIFY_DIFF (header only). A
 * difference is marked dirty on the primary, and the next resync repairs it.
 */
#ifndef MIRRORD_FRAME_H
#define MIRRORD_FRAME_H
#include <stddef.h>
#include <stdint.h>

#define MRD_FRAME_MAGIC 0x3144524Du
#define MRD_FRAME_HEADER_SIZE 32
#define MRD_FRAME_MAX_PAYLOAD (1u << 20)
#define MRD_FRAME_F_SYNC 0x0001u /* WRITE/SYNC_DATA: durable on the receiver before the ack */

enum {
    MRD_FRAME_WRITE = 1,
    MRD_FRAME_WRITE_ACK = 2,
    MRD_FRAME_FLUSH = 3,
    MRD_FRAME_FLUSH_ACK = 4,
    MRD_FRAME_SYNC_DATA = 5,
    MRD_FRAME_SYNC_ACK = 6,
    MRD_FRAME_PING = 7,
    MRD_FRAME_PONG = 8,
    MRD_FRAME_SYNC_ZERO = 9,
    MRD_FRAME_VERIFY = 10,
    MRD_FRAME_VERIFY_SAME = 11,
    MRD_FRAME_VERIFY_DIFF = 12,
};
#define MRD_FRAME_ZERO_PAYLOAD 8    /* SYNC_ZERO: u64 LE range length */
#define MRD_FRAME_VERIFY_PAYLOAD 12 /* VERIFY: u64 LE range length, u32 LE CRC32C */

struct mrd_frame_header {
    uint32_t magic;
    uint16_t type;
    uint16_t flags;
    uint64_t seq;
    uint64_t offset;
    uint32_t length;
    uint32_t crc;
};

/* Serialise a header for `payload` (len bytes, may be NULL when len == 0) into
 * out[MRD_FRAME_HEADER_SIZE], computing the CRC. Returns 0 or MRD_ETYPE /
 * MRD_ELEN / MRD_EFLAGS when the frame would not pass decode. */
int mrd_frame_encode(uint8_t *out, uint16_t type, uint16_t flags, uint64_t seq,
                     uint64_t offset, const void *payload, uint32_t len);

/* Parse and bound-check a header (magic, type, flags allowed for the type,
 * length for the type).
 * Does not check the CRC: that needs the payload (mrd_frame_verify). */
int mrd_frame_decode(const uint8_t *buf, size_t buflen, struct mrd_frame_header *out);

/* Check the CRC of a decoded header against its raw bytes and payload.
 * Returns 0, MRD_ETRUNC if payload_len != hdr->length, or MRD_ECRC. */
int mrd_frame_verify(const uint8_t *raw_header, const struct mrd_frame_header *hdr,
                     const void *payload, size_t payload_len);

/* Decode + verify a whole frame at the start of buf. Returns the total frame
 * size (header + payload) consumed, or a negative code (MRD_ETRUNC when buf
 * holds less than one whole frame). */
long mrd_frame_parse(const void *buf, size_t buflen, struct mrd_frame_header *out);

/* CRC32C of the raw header with its crc field taken as 0: the starting value
 * for a verifier that checks the payload piece by piece as it arrives
 * (continue with mrd_crc32c over each piece, compare with hdr->crc). */
uint32_t mrd_frame_header_crc(const uint8_t *raw_header);

/* Does a frame of this type carry a payload? (WRITE, SYNC_DATA and
 * SYNC_ZERO do.) */
int mrd_frame_type_has_payload(uint16_t type);

/* SYNC_ZERO and VERIFY: the range length their (verified) payload carries. */
uint64_t mrd_frame_zero_length(const void *payload);
/* VERIFY: the CRC32C its payload carries; and the payload for a range. */
uint32_t mrd_frame_verify_crc(const void *payload);
void mrd_frame_verify_payload(uint8_t *out, uint64_t len, uint32_t crc);
/* SYNC_ZERO: write the payload for a range of len bytes into out[8]. */
void mrd_frame_zero_payload(uint8_t *out, uint64_t len);

#endif
