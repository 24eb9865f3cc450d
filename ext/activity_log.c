#define _GNU_SOURCE
#include "activity_log.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "crc32c.h"

#define CRC_OFFSET (MRD_AL_RECORD_SIZE - 4)
#define HEADER_BYTES 32

/* ---- record format ------------------------------------------------------ */

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)v), put16(p + 2, (uint16_t)(v >> 16)); }
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)v), put32(p + 4, (uint32_t)(v >> 32)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }
static uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }

int mrd_al_seq_newer(uint64_t a, uint64_t b) { return (int64_t)(a - b) > 0; }

static int extent_size_ok(uint64_t size)
{
    return size >= MRD_AL_MIN_EXTENT && size <= MRD_AL_MAX_EXTENT && !(size & (size - 1));
}

/* The rules both encode and decode enforce. */
static int record_ok(const struct mrd_al_record *r)
{
    if (!extent_size_ok(r->extent_size) || r->slots < 1 || r->slots > MRD_AL_MAX_SLOTS || r->count > r->slots)
        return 0;
    uint64_t max_extent = UINT64_MAX >> __builtin_ctzll(r->extent_size);
    for (uint32_t i = 0; i < r->count; i++)
        if (r->extents[i] > max_extent)
            return 0;
    return 1;
}

int mrd_al_encode(const struct mrd_al_record *r, uint8_t *out)
{
    if (!r || !out || !record_ok(r))
        return -EINVAL;
    memset(out, 0, MRD_AL_RECORD_SIZE);
    put32(out, MRD_AL_MAGIC);
    put16(out + 4, MRD_AL_VERSION);
    put64(out + 8, r->seq);
    put64(out + 16, r->extent_size);
    put32(out + 24, r->slots);
    put32(out + 28, r->count);
    for (uint32_t i = 0; i < r->count; i++)
        put64(out + HEADER_BYTES + 8 * i, r->extents[i]);
    put32(out + CRC_OFFSET, mrd_crc32c(0, out, CRC_OFFSET));
    return 0;
}

int mrd_al_decode(const uint8_t *buf, size_t buflen, struct mrd_al_record *out)
{
    if (!buf || !out)
        return -EINVAL;
    if (buflen < MRD_AL_RECORD_SIZE || get32(buf) != MRD_AL_MAGIC || get16(buf + 4) != MRD_AL_VERSION ||
        get16(buf + 6) != 0 || get32(buf + CRC_OFFSET) != mrd_crc32c(0, buf, CRC_OFFSET))
        return MRD_EALBAD;
    struct mrd_al_record r = {0};
    r.seq = get64(buf + 8);
    r.extent_size = get64(buf + 16);
    r.slots = get32(buf + 24);
    r.count = get32(buf + 28);
    if (r.count > MRD_AL_MAX_SLOTS)
        return MRD_EALBAD;
    for (uint32_t i = 0; i < r.count; i++)
        r.extents[i] = get64(buf + HEADER_BYTES + 8 * i);
    if (!record_ok(&r))
        return MRD_EALBAD;
    *out = r;
    return 0;
}

/* The newest valid record in fd: 1 (which = its index), 0 for an empty
 * file, MRD_EALBAD when neither record is valid, or -errno. */
static int read_newest(int fd, struct mrd_al_record *out, int *which)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (st.st_size == 0)
        return 0;
    uint8_t *buf = malloc(MRD_AL_FILE_SIZE);
    struct mrd_al_record *rec = malloc(2 * sizeof *rec);
    int rc = -ENOMEM;
    if (!buf || !rec)
        goto out;
    memset(buf, 0, MRD_AL_FILE_SIZE);
    for (size_t got = 0; got < MRD_AL_FILE_SIZE;) {
        ssize_t n = pread(fd, buf + got, MRD_AL_FILE_SIZE - got, (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = -errno;
            goto out;
        }
        if (n == 0)
            break; /* a short file: the missing part reads as zeros, i.e. invalid */
        got += (size_t)n;
    }
    int ok0 = mrd_al_decode(buf, MRD_AL_RECORD_SIZE, &rec[0]) == 0;
    int ok1 = mrd_al_decode(buf + MRD_AL_RECORD_SIZE, MRD_AL_RECORD_SIZE, &rec[1]) == 0;
    if (!ok0 && !ok1) {
        rc = MRD_EALBAD;
        goto out;
    }
    int w = ok0 && (!ok1 || mrd_al_seq_newer(rec[0].seq, rec[1].seq)) ? 0 : 1;
    *out = rec[w];
    if (which)
        *which = w;
    rc = 1;
out:
    free(buf);
    free(rec);
    return rc;
}

int mrd_al_read(const char *path, struct mrd_al_record *out, int *which)
{
    if (!path || !out)
        return -EINVAL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : -errno;
    int rc = read_newest(fd, out, which);
    close(fd);
    return rc;
}

/* ---- the live log --------------------------------------------------------- */

struct slot {
    uint64_t ext;
    uint64_t last_use; /* LRU clock */
    uint64_t gen;      /* set_gen when installed: usable once durable_gen >= gen */
    uint64_t last_end; /* end_gen at its latest completed write: may go cold once clean_gen >= it */
    uint32_t in_flight;
    int used;
};

/* Everything below is under mu. set_gen counts changes of the in-memory set;
 * durable_gen is the set_gen a successful record write captured. One thread
 * at a time (writing) writes a record, without mu, so hot extents stay
 * usable meanwhile; threads needing the same or a later change wait for it
 * or write the next record themselves (group commit). end_gen counts
 * completed writes; clean_gen is the end_gen a successful flush callback
 * covered, called by one thread at a time (flushing), also without mu. */
struct mrd_al {
    int fd;
    unsigned shift;
    uint32_t nslots;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct slot *slots;
    uint64_t tick;
    uint64_t set_gen, durable_gen;
    int writing;
    int err;      /* sticky record-write error */
    int cur_rec;  /* index of the newest valid record on disk */
    uint64_t seq; /* its sequence number */
    uint8_t *buf; /* record being written (owner: the writing thread) */
    struct mrd_al_record *rec;
    uint32_t waiting;
    uint64_t updates, waits, flushes;
    uint64_t end_gen, clean_gen;
    mrd_al_flush_fn flush;
    mrd_al_keep_fn keep;
    void *cb_ctx;
    int flushing;
};

static int slot_of(const struct mrd_al *al, uint64_t ext)
{
    for (uint32_t i = 0; i < al->nslots; i++)
        if (al->slots[i].used && al->slots[i].ext == ext)
            return (int)i;
    return -1;
}

/* May this idle slot go cold? See "Cold only when clean". */
static int clean_locked(const struct mrd_al *al, const struct slot *sl)
{
    return !al->flush || sl->last_end <= al->clean_gen;
}

/* See "Kept hot". */
static int kept_locked(const struct mrd_al *al, const struct slot *sl)
{
    return al->keep && al->keep(al->cb_ctx, sl->ext);
}

static int by_last_use(const void *a, const void *b)
{
    const struct slot *x = *(const struct slot *const *)a, *y = *(const struct slot *const *)b;
    return x->last_use < y->last_use ? -1 : x->last_use > y->last_use;
}

/* Fill r with the in-memory set, least recently used first, as the next
 * record to write. */
static void snapshot_locked(const struct mrd_al *al, struct mrd_al_record *r)
{
    const struct slot *order[MRD_AL_MAX_SLOTS];
    uint32_t n = 0;
    for (uint32_t i = 0; i < al->nslots; i++)
        if (al->slots[i].used)
            order[n++] = &al->slots[i];
    qsort(order, n, sizeof order[0], by_last_use);
    r->seq = al->seq + 1;
    r->extent_size = 1ull << al->shift;
    r->slots = al->nslots;
    r->count = n;
    for (uint32_t i = 0; i < n; i++)
        r->extents[i] = order[i]->ext;
}

/* Write al->rec into the record that does not hold the newest valid one,
 * and make it durable. Needs exclusive use of buf/rec (writing, or mu with
 * nobody writing). */
static int write_record(struct mrd_al *al)
{
    int rc = mrd_al_encode(al->rec, al->buf);
    if (rc)
        return rc;
    off_t at = (off_t)(1 - al->cur_rec) * MRD_AL_RECORD_SIZE;
    for (size_t done = 0; done < MRD_AL_RECORD_SIZE;) {
        ssize_t n = pwrite(al->fd, al->buf + done, MRD_AL_RECORD_SIZE - done, at + (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        done += (size_t)n;
    }
    if (fdatasync(al->fd) < 0)
        return -errno;
    return 0;
}

/* Record the write's outcome (under mu). */
static void record_written_locked(struct mrd_al *al, int rc, uint64_t gen)
{
    if (rc) {
        al->err = rc;
        return;
    }
    al->cur_rec = 1 - al->cur_rec;
    al->seq = al->rec->seq;
    al->updates++;
    if (gen > al->durable_gen)
        al->durable_gen = gen;
}

static int fsync_parent(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        return -ENOMEM;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(copy);
    if (fd < 0)
        return -errno;
    int rc = fsync(fd) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

void mrd_al_close(struct mrd_al *al)
{
    if (!al)
        return;
    if (al->fd >= 0)
        close(al->fd);
    pthread_mutex_destroy(&al->mu);
    pthread_cond_destroy(&al->cv);
    free(al->slots);
    free(al->buf);
    free(al->rec);
    free(al);
}

int mrd_al_open(const char *path, uint64_t extent_size, uint32_t slots, struct mrd_al **out)
{
    if (!path || !out || !extent_size_ok(extent_size) || slots < 1 || slots > MRD_AL_MAX_SLOTS)
        return -EINVAL;
    struct mrd_al *al = calloc(1, sizeof *al);
    if (!al)
        return -ENOMEM;
    al->fd = -1;
    pthread_mutex_init(&al->mu, NULL);
    pthread_cond_init(&al->cv, NULL);
    al->shift = (unsigned)__builtin_ctzll(extent_size);
    al->nslots = slots;
    al->slots = calloc(slots, sizeof *al->slots);
    al->rec = calloc(1, sizeof *al->rec);
    int rc = -ENOMEM;
    if (!al->slots || !al->rec || posix_memalign((void **)&al->buf, 4096, MRD_AL_RECORD_SIZE))
        goto fail;
    al->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (al->fd < 0) {
        rc = -errno;
        goto fail;
    }
    int which = 0;
    rc = read_newest(al->fd, al->rec, &which);
    if (rc < 0)
        goto fail;
    if (rc == 1) {
        if (al->rec->extent_size != extent_size || al->rec->count > slots) {
            rc = MRD_EALGEOM;
            goto fail;
        }
        /* Keep what a crash may have left: those extents stay hot (and
         * listed) until newer writes push them out. */
        for (uint32_t i = 0; i < al->rec->count; i++) {
            al->slots[i].used = 1;
            al->slots[i].ext = al->rec->extents[i];
            al->slots[i].last_use = ++al->tick;
        }
        al->cur_rec = which;
        al->seq = al->rec->seq;
        *out = al;
        return 0;
    }
    /* A new (or never written) file: one empty record, and the directory
     * entry made durable, before any write can depend on the file. */
    al->cur_rec = 1;
    snapshot_locked(al, al->rec);
    rc = write_record(al);
    if (!rc)
        rc = fsync_parent(path);
    if (rc)
        goto fail;
    record_written_locked(al, 0, 0);
    al->updates = 0; /* creating the file is not an update caused by a write */
    *out = al;
    return 0;
fail:
    mrd_al_close(al);
    return rc;
}

/* Drop one in-flight count from each extent of [first, last]. */
static void release_locked(struct mrd_al *al, uint64_t first, uint64_t last)
{
    int freed = 0;
    uint64_t gen = ++al->end_gen;
    for (uint64_t e = first; e <= last; e++) {
        int i = slot_of(al, e);
        if (i < 0)
            continue;
        al->slots[i].last_end = gen;
        if (al->slots[i].in_flight && !--al->slots[i].in_flight)
            freed = 1;
    }
    if (freed && al->waiting)
        pthread_cond_broadcast(&al->cv);
}

/* Reserve [first, last] if enough slots are free: extents already hot get
 * one more in-flight count, missing ones replace the least recently used
 * clean slots with nothing in flight. Returns 1 with *need = the set_gen
 * that must be durable before the write may be issued, or 0 when it must
 * wait (nothing was changed then), with *flush set when a flush callback
 * would make enough idle slots clean. */
static int reserve_locked(struct mrd_al *al, uint64_t first, uint64_t last, uint64_t *need, int *flush)
{
    uint32_t n = (uint32_t)(last - first + 1), missing = 0, free_slots = 0, unclean = 0;
    int found[n];
    for (uint32_t k = 0; k < n; k++) {
        found[k] = slot_of(al, first + k);
        missing += found[k] < 0;
    }
    for (uint32_t i = 0; missing && i < al->nslots; i++)
        free_slots += !al->slots[i].used;
    if (free_slots < missing) {
        /* Unused slots are not enough: count the idle ones that may be evicted. */
        for (uint32_t i = 0; i < al->nslots; i++) {
            const struct slot *sl = &al->slots[i];
            if (sl->used && !sl->in_flight && (sl->ext < first || sl->ext > last) && !kept_locked(al, sl))
                clean_locked(al, sl) ? free_slots++ : unclean++;
        }
        if (free_slots < missing) {
            *flush = free_slots + unclean >= missing;
            return 0;
        }
    }
    *need = 0;
    for (uint32_t k = 0; k < n; k++) {
        struct slot *sl;
        if (found[k] >= 0) {
            sl = &al->slots[found[k]];
        } else {
            /* An unused slot first, else the least recently used idle one
             * that may be evicted (the keep callback asked last: it is the
             * dearest test). */
            sl = NULL;
            for (uint32_t i = 0; !sl && i < al->nslots; i++)
                if (!al->slots[i].used)
                    sl = &al->slots[i];
            for (uint32_t i = 0; !(sl && !sl->used) && i < al->nslots; i++) {
                struct slot *c = &al->slots[i];
                if (c->in_flight || (c->ext >= first && c->ext <= last) || !clean_locked(al, c) ||
                    (sl && c->last_use >= sl->last_use) || kept_locked(al, c))
                    continue;
                sl = c;
            }
            sl->used = 1;
            sl->ext = first + k;
            sl->gen = ++al->set_gen;
            sl->last_end = 0;
        }
        sl->in_flight++;
        sl->last_use = ++al->tick;
        if (sl->gen > *need)
            *need = sl->gen;
    }
    return 1;
}

void mrd_al_set_callbacks(struct mrd_al *al, mrd_al_flush_fn flush, mrd_al_keep_fn keep, void *ctx)
{
    if (!al)
        return;
    pthread_mutex_lock(&al->mu);
    al->flush = flush;
    al->keep = keep;
    al->cb_ctx = ctx;
    pthread_mutex_unlock(&al->mu);
}

/* Run the flush callback (without mu) for every write completed so far;
 * under mu, flushing clear. Its result, as "Cold only when clean" says. */
static int flush_locked(struct mrd_al *al)
{
    al->flushing = 1;
    uint64_t upto = al->end_gen;
    pthread_mutex_unlock(&al->mu);
    int rc = al->flush(al->cb_ctx);
    pthread_mutex_lock(&al->mu);
    al->flushing = 0;
    if (!rc) {
        if (upto > al->clean_gen)
            al->clean_gen = upto;
        al->flushes++;
    }
    pthread_cond_broadcast(&al->cv);
    return rc;
}

/* Wait on cv for at most ms (mu held). */
static void wait_ms_locked(struct mrd_al *al, long ms)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += ms * 1000000L;
    until.tv_sec += until.tv_nsec / 1000000000L;
    until.tv_nsec %= 1000000000L;
    pthread_cond_timedwait(&al->cv, &al->mu, &until);
}

int mrd_al_begin(struct mrd_al *al, uint64_t off, uint64_t len)
{
    if (!al || !len || off + len < off)
        return -EINVAL;
    uint64_t first = off >> al->shift, last = (off + len - 1) >> al->shift;
    if (last - first >= al->nslots)
        return -E2BIG;
    pthread_mutex_lock(&al->mu);
    uint64_t need;
    int counted = 0, flush = 0;
    while (!reserve_locked(al, first, last, &need, &flush)) {
        if (al->err) {
            int rc = al->err;
            pthread_mutex_unlock(&al->mu);
            return rc;
        }
        al->waiting++;
        if (flush && !al->flushing) {
            /* Idle extents, but none clean: make them clean. */
            int rc = flush_locked(al);
            if (rc && rc != MRD_ENOPEER) {
                al->waiting--;
                pthread_mutex_unlock(&al->mu);
                return rc;
            }
            if (rc)
                wait_ms_locked(al, MRD_AL_FLUSH_RETRY_MS);
        } else {
            /* Every slot is busy, or another thread flushes: wait for it. */
            if (!counted && !flush)
                al->waits++, counted = 1;
            pthread_cond_wait(&al->cv, &al->mu);
        }
        al->waiting--;
    }
    /* The hot path ends here: everything was already durable. */
    while (need > al->durable_gen) {
        if (al->err) {
            int rc = al->err;
            release_locked(al, first, last);
            pthread_mutex_unlock(&al->mu);
            return rc;
        }
        if (al->writing) {
            al->waiting++;
            pthread_cond_wait(&al->cv, &al->mu);
            al->waiting--;
            continue;
        }
        al->writing = 1;
        uint64_t gen = al->set_gen;
        snapshot_locked(al, al->rec);
        pthread_mutex_unlock(&al->mu);
        int rc = write_record(al);
        pthread_mutex_lock(&al->mu);
        record_written_locked(al, rc, gen);
        al->writing = 0;
        pthread_cond_broadcast(&al->cv);
    }
    pthread_mutex_unlock(&al->mu);
    return 0;
}

void mrd_al_end(struct mrd_al *al, uint64_t off, uint64_t len)
{
    if (!al || !len)
        return;
    pthread_mutex_lock(&al->mu);
    release_locked(al, off >> al->shift, (off + len - 1) >> al->shift);
    pthread_mutex_unlock(&al->mu);
}

int mrd_al_clear(struct mrd_al *al)
{
    if (!al)
        return -EINVAL;
    pthread_mutex_lock(&al->mu);
    int busy = al->writing || al->waiting, hot = 0;
    for (uint32_t i = 0; i < al->nslots; i++) {
        busy |= al->slots[i].in_flight != 0;
        hot |= al->slots[i].used;
    }
    if (busy || (!hot && al->durable_gen == al->set_gen)) {
        pthread_mutex_unlock(&al->mu);
        return busy ? MRD_ESTATE : 0; /* already empty on disk */
    }
    for (uint32_t i = 0; i < al->nslots; i++)
        al->slots[i].used = 0;
    uint64_t gen = ++al->set_gen;
    snapshot_locked(al, al->rec);
    /* Under mu: a begin arriving now waits until the empty log is on disk. */
    int rc = write_record(al);
    record_written_locked(al, rc, gen);
    pthread_mutex_unlock(&al->mu);
    return rc;
}

long mrd_al_hot(struct mrd_al *al, uint64_t *out, long max)
{
    if (!al || (max && !out) || max < 0)
        return -EINVAL;
    /* Not al->rec: a record write may be using it without mu. */
    struct mrd_al_record *r = malloc(sizeof *r);
    if (!r)
        return -ENOMEM;
    pthread_mutex_lock(&al->mu);
    snapshot_locked(al, r);
    pthread_mutex_unlock(&al->mu);
    long n = r->count;
    for (long i = 0; i < n && i < max; i++)
        out[i] = r->extents[i];
    free(r);
    return n;
}

int mrd_al_stats(struct mrd_al *al, struct mrd_al_stats *o)
{
    if (!al || !o)
        return -EINVAL;
    memset(o, 0, sizeof *o);
    pthread_mutex_lock(&al->mu);
    o->updates = al->updates;
    o->waits = al->waits;
    o->flushes = al->flushes;
    o->waiting = al->waiting;
    o->slots = al->nslots;
    o->extent_size = 1ull << al->shift;
    for (uint32_t i = 0; i < al->nslots; i++) {
        o->hot += al->slots[i].used != 0;
        o->busy += al->slots[i].used && al->slots[i].in_flight;
    }
    pthread_mutex_unlock(&al->mu);
    return 0;
}
