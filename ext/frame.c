#include "frame.h"

#include <errno.h>
#include <string.h>

#include "common.h"
#include "crc32c.h"

/* Explicit little-endian (de)serialisation: the wire format must not depend
 * on the host's byte order or struct padding. */
static void put16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

int mrd_frame_type_has_payload(uint16_t type)
{
    return type == MRD_FRAME_WRITE || type == MRD_FRAME_SYNC_DATA || type == MRD_FRAME_SYNC_ZERO ||
           type == MRD_FRAME_VERIFY;
}

uint32_t mrd_frame_verify_crc(const void *payload)
{
    return get32((const uint8_t *)payload + 8);
}

void mrd_frame_verify_payload(uint8_t *out, uint64_t len, uint32_t crc)
{
    put64(out, len);
    put32(out + 8, crc);
}

/* SYNC_ZERO and VERIFY name a range in their payload: one chunk at most. */
static int range_payload_ok(uint16_t type, const void *payload)
{
    if (type != MRD_FRAME_SYNC_ZERO && type != MRD_FRAME_VERIFY)
        return 1;
    uint64_t n = mrd_frame_zero_length(payload);
    return n > 0 && n <= MRD_FRAME_MAX_PAYLOAD;
}

uint64_t mrd_frame_zero_length(const void *payload)
{
    return get64(payload);
}

void mrd_frame_zero_payload(uint8_t *out, uint64_t len)
{
    put64(out, len);
}

static int check_fields(uint16_t type, uint16_t flags, uint32_t len)
{
    if (type < MRD_FRAME_WRITE || type > MRD_FRAME_VERIFY_DIFF)
        return MRD_ETYPE;
    /* Only data frames may ask for a durable apply; acks, FLUSH, PING and
     * SYNC_ZERO, VERIFY and its answers carry no flags at all. Unknown bits are refused everywhere. */
    uint16_t allowed = type == MRD_FRAME_WRITE || type == MRD_FRAME_SYNC_DATA ? MRD_FRAME_F_SYNC : 0;
    if (flags & ~allowed)
        return MRD_EFLAGS;
    if (type == MRD_FRAME_SYNC_ZERO || type == MRD_FRAME_VERIFY) {
        if (len != (type == MRD_FRAME_VERIFY ? MRD_FRAME_VERIFY_PAYLOAD : MRD_FRAME_ZERO_PAYLOAD))
            return MRD_ELEN;
    } else if (mrd_frame_type_has_payload(type)) {
        /* An empty WRITE is legal for the kernel but never useful on the wire;
         * refusing it keeps "length 0" meaning "no payload" everywhere. */
        if (len == 0 || len > MRD_FRAME_MAX_PAYLOAD)
            return MRD_ELEN;
    } else if (len != 0) {
        return MRD_ELEN;
    }
    return 0;
}

uint32_t mrd_frame_header_crc(const uint8_t *hdr)
{
    uint8_t tmp[MRD_FRAME_HEADER_SIZE];
    memcpy(tmp, hdr, sizeof tmp);
    memset(tmp + 28, 0, 4);
    return mrd_crc32c(0, tmp, sizeof tmp);
}

static uint32_t frame_crc(const uint8_t *hdr, const void *payload, size_t len)
{
    uint32_t crc = mrd_frame_header_crc(hdr);
    if (len)
        crc = mrd_crc32c(crc, payload, len);
    return crc;
}

int mrd_frame_encode(uint8_t *out, uint16_t type, uint16_t flags, uint64_t seq,
                     uint64_t offset, const void *payload, uint32_t len)
{
    int rc = check_fields(type, flags, len);
    if (rc)
        return rc;
    if (len && !payload)
        return -EINVAL;
    if (!range_payload_ok(type, payload))
        return MRD_ELEN;
    put32(out, MRD_FRAME_MAGIC);
    put16(out + 4, type);
    put16(out + 6, flags);
    put64(out + 8, seq);
    put64(out + 16, offset);
    put32(out + 24, len);
    put32(out + 28, 0);
    put32(out + 28, frame_crc(out, payload, len));
    return 0;
}

int mrd_frame_decode(const uint8_t *buf, size_t buflen, struct mrd_frame_header *out)
{
    if (buflen < MRD_FRAME_HEADER_SIZE)
        return MRD_ETRUNC;
    struct mrd_frame_header h = {
        .magic = get32(buf),
        .type = get16(buf + 4),
        .flags = get16(buf + 6),
        .seq = get64(buf + 8),
        .offset = get64(buf + 16),
        .length = get32(buf + 24),
        .crc = get32(buf + 28),
    };
    if (h.magic != MRD_FRAME_MAGIC)
        return MRD_EMAGIC;
    int rc = check_fields(h.type, h.flags, h.length);
    if (rc)
        return rc;
    if (out)
        *out = h;
    return 0;
}

int mrd_frame_verify(const uint8_t *raw_header, const struct mrd_frame_header *hdr,
                     const void *payload, size_t payload_len)
{
    if (payload_len != hdr->length)
        return MRD_ETRUNC;
    if (frame_crc(raw_header, payload, payload_len) != hdr->crc)
        return MRD_ECRC;
    return range_payload_ok(hdr->type, payload) ? 0 : MRD_ELEN;
}

long mrd_frame_parse(const void *buf, size_t buflen, struct mrd_frame_header *out)
{
    struct mrd_frame_header h;
    int rc = mrd_frame_decode(buf, buflen, &h);
    if (rc)
        return rc;
    if (buflen - MRD_FRAME_HEADER_SIZE < h.length)
        return MRD_ETRUNC;
    const uint8_t *p = buf;
    rc = mrd_frame_verify(p, &h, p + MRD_FRAME_HEADER_SIZE, h.length);
    if (rc)
        return rc;
    if (out)
        *out = h;
    return (long)(MRD_FRAME_HEADER_SIZE + h.length);
}
