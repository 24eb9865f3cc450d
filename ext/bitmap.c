#include "bitmap.h"

#include <errno.h>
#include <stdlib.h>

#include "common.h"

struct mrd_bitmap {
    uint64_t size;
    uint64_t nblocks;
    uint64_t nwords;
    uint32_t gran;
    unsigned shift;
    uint64_t count; /* atomic */
    uint64_t *words;
};

int mrd_bitmap_new(uint64_t size, uint32_t gran, struct mrd_bitmap **out)
{
    if (!out || gran < 512 || (gran & (gran - 1)))
        return -EINVAL;
    struct mrd_bitmap *bm = calloc(1, sizeof *bm);
    if (!bm)
        return -ENOMEM;
    bm->size = size;
    bm->gran = gran;
    bm->shift = (unsigned)__builtin_ctz(gran);
    bm->nblocks = (size + gran - 1) >> bm->shift;
    bm->nwords = (bm->nblocks + 63) / 64;
    bm->words = calloc(bm->nwords ? bm->nwords : 1, sizeof(uint64_t));
    if (!bm->words) {
        free(bm);
        return -ENOMEM;
    }
    *out = bm;
    return 0;
}

void mrd_bitmap_free(struct mrd_bitmap *bm)
{
    if (!bm)
        return;
    free(bm->words);
    free(bm);
}

uint64_t mrd_bitmap_size(const struct mrd_bitmap *bm) { return bm->size; }
uint32_t mrd_bitmap_granularity(const struct mrd_bitmap *bm) { return bm->gran; }
uint64_t mrd_bitmap_nblocks(const struct mrd_bitmap *bm) { return bm->nblocks; }
size_t mrd_bitmap_nbytes(const struct mrd_bitmap *bm) { return (size_t)((bm->nblocks + 7) / 8); }

uint64_t mrd_bitmap_count(const struct mrd_bitmap *bm)
{
    return __atomic_load_n(&bm->count, __ATOMIC_RELAXED);
}

/* Mask of bits [lo, hi) within one word, 0 <= lo < hi <= 64. */
static uint64_t mask(unsigned lo, unsigned hi)
{
    uint64_t m = hi == 64 ? ~0ull : (1ull << hi) - 1;
    return m & ~((1ull << lo) - 1);
}

/* Set or clear blocks [first, end) word by word; returns bits changed. */
static int64_t apply(struct mrd_bitmap *bm, uint64_t first, uint64_t end, int set)
{
    int64_t changed = 0;
    while (first < end) {
        uint64_t w = first / 64;
        unsigned lo = first % 64;
        unsigned hi = (end - w * 64) >= 64 ? 64 : (unsigned)(end - w * 64);
        uint64_t m = mask(lo, hi), old;
        if (set)
            old = __atomic_fetch_or(&bm->words[w], m, __ATOMIC_RELAXED), changed += __builtin_popcountll(~old & m);
        else
            old = __atomic_fetch_and(&bm->words[w], ~m, __ATOMIC_RELAXED), changed += __builtin_popcountll(old & m);
        first = w * 64 + hi;
    }
    if (set)
        __atomic_add_fetch(&bm->count, (uint64_t)changed, __ATOMIC_RELAXED);
    else
        __atomic_sub_fetch(&bm->count, (uint64_t)changed, __ATOMIC_RELAXED);
    return changed;
}

static int in_range(const struct mrd_bitmap *bm, uint64_t off, uint64_t len)
{
    return off <= bm->size && len <= bm->size - off;
}

int64_t mrd_bitmap_set_range(struct mrd_bitmap *bm, uint64_t off, uint64_t len)
{
    if (!in_range(bm, off, len))
        return MRD_ERANGE;
    if (len == 0)
        return 0;
    return apply(bm, off >> bm->shift, ((off + len - 1) >> bm->shift) + 1, 1);
}

int64_t mrd_bitmap_clear_range(struct mrd_bitmap *bm, uint64_t off, uint64_t len)
{
    if (!in_range(bm, off, len))
        return MRD_ERANGE;
    if (len == 0)
        return 0;
    uint64_t first = (off + bm->gran - 1) >> bm->shift;
    uint64_t end = off + len == bm->size ? bm->nblocks : (off + len) >> bm->shift;
    return first < end ? apply(bm, first, end, 0) : 0;
}

void mrd_bitmap_set_all(struct mrd_bitmap *bm) { apply(bm, 0, bm->nblocks, 1); }
void mrd_bitmap_clear_all(struct mrd_bitmap *bm) { apply(bm, 0, bm->nblocks, 0); }

int mrd_bitmap_test(const struct mrd_bitmap *bm, uint64_t block)
{
    if (block >= bm->nblocks)
        return 0;
    return (int)((__atomic_load_n(&bm->words[block / 64], __ATOMIC_RELAXED) >> (block % 64)) & 1);
}

/* The limit matters for speed, not only meaning: a sync asks "where does
 * this dirty run end?" once per chunk, and on a 1 TiB disk that is all dirty
 * an unbounded search would read the rest of a 32 MiB bitmap every time. */
static int64_t find_next(const struct mrd_bitmap *bm, uint64_t from, uint64_t limit, int want_set)
{
    if (limit > bm->nblocks)
        limit = bm->nblocks;
    while (from < limit) {
        uint64_t w = from / 64;
        uint64_t v = __atomic_load_n(&bm->words[w], __ATOMIC_RELAXED);
        if (!want_set)
            v = ~v;
        v &= ~0ull << (from % 64);
        if (v) {
            uint64_t b = w * 64 + (uint64_t)__builtin_ctzll(v);
            return b < limit ? (int64_t)b : -1;
        }
        from = (w + 1) * 64;
    }
    return -1;
}

int64_t mrd_bitmap_find_next_set(const struct mrd_bitmap *bm, uint64_t from, uint64_t limit)
{
    return find_next(bm, from, limit, 1);
}

int64_t mrd_bitmap_find_next_clear(const struct mrd_bitmap *bm, uint64_t from, uint64_t limit)
{
    return find_next(bm, from, limit, 0);
}

long mrd_bitmap_snapshot(const struct mrd_bitmap *bm, void *buf, size_t buflen)
{
    size_t n = mrd_bitmap_nbytes(bm);
    if (buflen < n)
        return -ENOSPC;
    uint8_t *p = buf;
    for (size_t i = 0; i < n; i++) {
        uint64_t v = __atomic_load_n(&bm->words[i / 8], __ATOMIC_RELAXED);
        p[i] = (uint8_t)(v >> (8 * (i % 8)));
    }
    return (long)n;
}

int mrd_bitmap_load(struct mrd_bitmap *bm, const void *buf, size_t buflen)
{
    size_t n = mrd_bitmap_nbytes(bm);
    if (buflen != n)
        return -EINVAL;
    const uint8_t *p = buf;
    unsigned tail = bm->nblocks % 8;
    if (tail && (p[n - 1] >> tail))
        return -EINVAL; /* bits past the disk: the buffer is from another disk or corrupt */
    uint64_t count = 0;
    for (uint64_t w = 0; w < bm->nwords; w++) {
        uint64_t v = 0;
        for (unsigned b = 0; b < 8 && w * 8 + b < n; b++)
            v |= (uint64_t)p[w * 8 + b] << (8 * b);
        __atomic_store_n(&bm->words[w], v, __ATOMIC_RELAXED);
        count += (uint64_t)__builtin_popcountll(v);
    }
    __atomic_store_n(&bm->count, count, __ATOMIC_RELAXED);
    return 0;
}
