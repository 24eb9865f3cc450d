#define _GNU_SOURCE
#define FUSE_USE_VERSION 312
#include "server.h"

#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "activity_log.h"
#include "bitmap.h"
#include "common.h"
#include "crc32c.h"
#include "frame.h"
#include "netio.h"

#define EXTENT_SHIFT 20 /* 1 MiB sync chunks */
#define LOCK_SHIFT 16   /* 64 KiB ordering locks (see extents_lock) */
#define NSTRIPES 1024
#define SYNC_CHUNK (1u << EXTENT_SHIFT)
#define SYNC_WINDOW 8     /* sync chunks in flight */
/* Resync pacing (see "Pacing" above sync_main). */
#define SYNC_CHUNK_BUSY (64u << 10)
#define APP_QUIET_NS (20ull * 1000 * 1000)
#define MAX_WRITE (1u << 20)
#define ACK_POLL_MS 250
#define FUSE_THREADS 16 /* FUSE workers: requests served at once */
#define ACK_RX_BATCH 64 /* acks the ack reader takes with one recv */
#define TX_BATCH 32     /* frames one sendmsg takes from the send queue */
/* A write may go out as several frames of this size, so that the peer
 * verifies and writes the first while the rest is still being sent. Kept at
 * MAX_WRITE (no split): 128-512 KiB frames measured slower for 1 MiB writes
 * (docs/performance.md, "Zero-copy sends"). */
#define FRAME_SPLIT (1024u << 10)
/* Writes at least this large are sent without copying (see "Zero-copy
 * sends"); below it a copy costs less than pinning pages and holding the
 * FUSE worker until the ack. */
#define ZC_MIN (256u << 10)
/* Default bounds on what the peer acked but has not made durable (see
 * "Unflushed ranges"); docs/decisions.md 32 says why these values. */
#define UNFLUSHED_MAX_BYTES (64ull << 20)
#define UNFLUSHED_MAX_MS 1000u

enum { PEER_NONE, PEER_CONNECTED, PEER_FAILED };
enum { P_WRITE, P_FLUSH, P_SYNC };
/* What FUSE replies may say (io_state). NORMAL: as the peer/local results
 * say. SUSPENDED (fencing, after a peer failure): successful replies are
 * held until mrd_server_resume. FAILED: every write/flush gets EIO. */
enum { IO_NORMAL, IO_SUSPENDED, IO_FAILED };
#define FH_RDONLY 1u /* fuse_file_info.fh: opened O_RDONLY */

/* One FUSE request (write or flush) waiting to be answered. It holds one
 * reference for the local I/O and one per frame sent for it; whoever drops
 * the last reference sends the reply. */
struct op {
    fuse_req_t req;
    int kind;
    int refs;      /* atomic */
    int local_err; /* positive errno the reply carries (local disk, or the write could not be sent), 0 if fine */
    uint64_t off;  /* writes: the range counted in flight in the activity log */
    uint32_t len;
    struct op *hnext; /* held list link (under pend_mu) */
};

/* One frame waiting for its ack (op is NULL for sync chunks). */
struct pending {
    struct pending *next, *prev;
    uint64_t seq;
    uint64_t off;
    uint32_t len;
    int kind;
    int zero;   /* P_SYNC sent as SYNC_ZERO: len bytes of hole, no data */
    int verify;   /* P_SYNC sent as VERIFY: answered SAME or DIFF, nothing written */
    int checksum; /* ... by a checksum sync: SAME means the peer holds the chunk */
    int sync_flush; /* P_FLUSH that ends a sync: counted in sync_inflight */
    int durable;    /* sent with MRD_FRAME_F_SYNC: its ack means durable */
    struct op *op;
    uint64_t t_sent;
    /* Payload sent zero-copy: the writer's count of such frames not yet
     * acked or failed, under pend_mu (NULL for a copied payload). */
    int *zc_out;
};

/* A range the peer acked but may still hold only in its page cache (see
 * "Unflushed ranges"). */
struct unflushed {
    uint64_t seq, off, t_acked;
    uint32_t len;
};

/* One frame on the send queue (see tx_drain); lives with its owner, who
 * waits for done before it goes away. */
struct tx {
    struct tx *next;
    uint8_t hdr[MRD_FRAME_HEADER_SIZE];
    struct iovec iov[2];
    int iovcnt;
    int done; /* set under send_mu (release); read by tx_wait */
    uint8_t *bad; /* corrupt_next's private copy of the payload */
    int zc;       /* splice the payload instead of copying it */
};

struct mrd_server {
    char *disk_path, *mountpoint;
    int disk_fd;
    uint64_t size;
    struct mrd_bitmap *bm;
    struct mrd_al *al; /* NULL: no activity log */
    uint64_t al_extent;
    pthread_mutex_t stripes[NSTRIPES];
    time_t start_time;

    /* FUSE */
    struct fuse_session *se;
    pthread_t loop_th;
    int loop_live;
    int loop_done; /* atomic */
    int abort_fd; /* this connection's fusectl abort file (see abort_connection), or -1 */

    /* Peer. send_mu orders the wire (seq assignment + socket write); pend_mu
     * guards the pending list and peer_state and is never held across I/O,
     * so the ack reader is never stuck behind a blocked send. Lock order:
     * extent stripe -> send_mu -> pend_mu. */
    pthread_mutex_t send_mu, pend_mu;
    pthread_cond_t pend_cv;
    /* Send queue, under send_mu: frames in seq order not yet handed to the
     * socket, and whether a thread is draining it (then it is the only one
     * using peer_fd for sending, with send_mu released). */
    struct tx *txq, **txq_tail;
    int tx_busy;
    pthread_cond_t tx_cv;
    /* Zero-copy sends: a pipe per connection (used by the drainer only),
     * zc_ok while it may be used (cleared by a failed splice, which may
     * leave bytes in it); zc_cv (with pend_mu) wakes writers waiting for
     * their zero-copy frames to be acked. */
    int zc_pipe[2];
    int zc_ok;
    pthread_cond_t zc_cv;
    int peer_state;
    int peer_fd;
    pthread_t ack_th;
    int ack_live;
    uint32_t peer_timeout_ms;
    struct pending head; /* sentinel of the seq-ordered pending list */
    uint64_t next_seq;
    uint64_t in_flight;
    /* Peer durability watermark (see "Durable writes" below), under pend_mu:
     * peer_dirty_seq is the seq of the last frame that left data on the peer
     * that is not durable yet (an unflagged WRITE or SYNC_DATA; at attach, a
     * marker so the first flush on a new connection always travels);
     * peer_durable_seq is the highest FLUSH whose FLUSH_ACK came back, which
     * covers every frame sent before it. A flush needs a FLUSH frame only
     * while peer_dirty_seq > peer_durable_seq. */
    uint64_t peer_dirty_seq, peer_durable_seq;
    /* Unflushed ranges of this connection, under pend_mu: unfl[unfl_head ..
     * unfl_head + unfl_n) in ack (= seq) order, unfl_bytes their total;
     * flush_sent_seq is the last FLUSH queued on it. The flusher thread
     * (flush_cv, a CLOCK_MONOTONIC condition) sends a FLUSH of its own when
     * they reach unfl_max_bytes or the oldest is unfl_max_ns old. */
    struct unflushed *unfl;
    size_t unfl_head, unfl_n, unfl_cap;
    uint64_t unfl_bytes, flush_sent_seq, unfl_max_bytes, unfl_max_ns;
    pthread_cond_t flush_cv;
    pthread_t flush_th;
    int flush_live;
    int sync_inflight;
    int corrupt_next; /* atomic */

    /* Local durability watermark, atomics: local_gen counts completed local
     * writes that were not durable on their own (bumped after the pwrite,
     * before the reply); local_synced is the highest local_gen value read
     * before an fdatasync that then succeeded. A flush needs an fdatasync
     * only while they differ. Starts 1/0: the first flush always syncs. */
    uint64_t local_gen, local_synced;
    /* Set (atomic) once a local fdatasync failed: see local_flush. */
    int local_flush_failed;

    /* Fencing, under pend_mu. io_state is also read without the lock (atomic
     * acquire) on the reply fast path; it is only written under pend_mu.
     * held_*: FUSE ops whose reply waits for mrd_server_resume. */
    int fencing;
    int io_state;
    struct op *held_head, *held_tail;
    uint64_t held_n;

    /* Sync */
    pthread_t sync_th;
    int sync_live;
    volatile int sync_stop;
    uint64_t sync_from;
    uint32_t sync_flags;
    uint8_t *sync_buf;
    uint64_t last_app_write_ns; /* atomic: when the application last wrote */
    uint64_t sync_rate_max;     /* atomic: bytes/s a sync may use, 0 = unlimited */

    /* Stats: counters bumped with atomics; the rest under pend_mu. */
    uint64_t writes, bytes_written, reads, bytes_read, flushes, write_errors, max_write_seen;
    uint64_t frames_sent, bytes_sent, acked, lat_total, lat_max, peer_failures;
    uint64_t dsync_writes, flush_frames, fdatasyncs, frames_spliced, bytes_spliced;
    int sync_active, sync_done;
    uint64_t sync_offset, sync_total, bytes_synced, bytes_zeroed, verify_diff_bytes, bytes_verified;
    char last_error[256];
};

#define ADD(field, v) __atomic_add_fetch(&(field), (v), __ATOMIC_RELAXED)

static void set_error_locked(struct mrd_server *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void set_error_locked(struct mrd_server *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->last_error, sizeof s->last_error, fmt, ap);
    va_end(ap);
}

/* ---- extent locks ------------------------------------------------------ */

/* Ordering locks: one striped mutex per LOCK_SHIFT-sized piece of the disk
 * (pieces NSTRIPES apart share a mutex). A write holds every piece it
 * touches from queueing its frame until its local write is done, so
 * overlapping writes reach both disks in the same order; writes to
 * different pieces go on together. Pieces are small (64 KiB) so that
 * concurrent 4 KiB writers close to each other (a filesystem's neighbouring
 * blocks) rarely wait for each other's disk flush; a 1 MiB write takes 17
 * mutexes at most. */
struct held {
    unsigned first, n; /* stripes first .. first + n - 1, modulo NSTRIPES */
};

static void stripes_range(const struct held *h, unsigned r[2][2])
{
    /* The stripes as at most two ascending runs [lo, hi), lower run first:
     * every locker takes them in index order, so none can deadlock. */
    if (h->first + h->n <= NSTRIPES) {
        r[0][0] = h->first, r[0][1] = h->first + h->n;
        r[1][0] = r[1][1] = 0;
    } else {
        r[0][0] = 0, r[0][1] = h->first + h->n - NSTRIPES;
        r[1][0] = h->first, r[1][1] = NSTRIPES;
    }
}

static void extents_lock(struct mrd_server *s, uint64_t off, uint64_t len, struct held *h)
{
    uint64_t first = off >> LOCK_SHIFT, last = (off + (len ? len - 1 : 0)) >> LOCK_SHIFT;
    h->first = (unsigned)(first % NSTRIPES);
    h->n = last - first + 1 >= NSTRIPES ? NSTRIPES : (unsigned)(last - first + 1);
    if (h->n == NSTRIPES)
        h->first = 0;
    unsigned r[2][2];
    stripes_range(h, r);
    for (int k = 0; k < 2; k++)
        for (unsigned i = r[k][0]; i < r[k][1]; i++)
            pthread_mutex_lock(&s->stripes[i]);
}

static void extents_unlock(struct mrd_server *s, const struct held *h)
{
    unsigned r[2][2];
    stripes_range(h, r);
    for (int k = 0; k < 2; k++)
        for (unsigned i = r[k][0]; i < r[k][1]; i++)
            pthread_mutex_unlock(&s->stripes[i]);
}

/* ---- pending completion ------------------------------------------------ */

/* Send o's reply and free it; fail turns a success into EIO. Never called
 * with pend_mu held. */
static void op_finish(struct mrd_server *s, struct op *o, int fail)
{
    int err = o->local_err;
    if (!err && fail) {
        err = EIO;
        if (o->kind == P_WRITE)
            __atomic_add_fetch(&s->write_errors, 1, __ATOMIC_RELAXED);
    }
    if (o->kind == P_WRITE && !err)
        fuse_reply_write(o->req, o->len);
    else
        fuse_reply_err(o->req, err);
    free(o);
}

/* Drop one reference; the last one replies, or parks the op on the held
 * list while the server is suspended (errors are never held: they
 * acknowledge nothing). Must not be called with pend_mu held.
 *
 * Why the unlocked io_state load is enough: an op that lost a frame to a
 * peer failure has that reference dropped by fail_peer after it set
 * SUSPENDED, and the acq_rel refcount orders that store before the final
 * put, wherever it runs; an op that found no peer did so under pend_mu,
 * after the same store. */
static void op_put(struct mrd_server *s, struct op *o)
{
    if (__atomic_sub_fetch(&o->refs, 1, __ATOMIC_ACQ_REL))
        return;
    /* A failed write may have reached the peer but not this disk (or the
     * reverse), and the peer's ack cleared its bits: dirty, so the resync
     * makes the peer equal to this disk again. After every ack, so nothing
     * clears it. */
    if (o->kind == P_WRITE && o->local_err)
        mrd_bitmap_set_range(s->bm, o->off, o->len);
    /* Local write done and the peer acked or is gone: the extent may cool
     * (a write the peer lost is the dirty bitmap's from here on). */
    if (o->kind == P_WRITE && s->al)
        mrd_al_end(s->al, o->off, o->len);
    int st = __atomic_load_n(&s->io_state, __ATOMIC_ACQUIRE);
    if (st == IO_SUSPENDED && !o->local_err) {
        pthread_mutex_lock(&s->pend_mu);
        st = s->io_state;
        if (st == IO_SUSPENDED) {
            o->hnext = NULL;
            if (s->held_tail)
                s->held_tail->hnext = o;
            else
                s->held_head = o;
            s->held_tail = o;
            s->held_n++;
            pthread_mutex_unlock(&s->pend_mu);
            return;
        }
        pthread_mutex_unlock(&s->pend_mu);
    }
    op_finish(s, o, st == IO_FAILED);
}

/* Set io_state to to (IO_NORMAL or IO_FAILED) and answer every held op:
 * success (per its local result) for NORMAL, EIO for FAILED. Going to
 * NORMAL only happens from SUSPENDED: otherwise returns the current state
 * and changes nothing. With link >= 0, going to NORMAL also needs the peer
 * connected on the connection the caller saw catch up (peer_failures ==
 * link): else returns -1 and changes nothing. */
static int release_held(struct mrd_server *s, int to, int64_t link)
{
    pthread_mutex_lock(&s->pend_mu);
    int was = s->io_state;
    if (to == IO_NORMAL && was != IO_SUSPENDED) {
        pthread_mutex_unlock(&s->pend_mu);
        return was;
    }
    if (to == IO_NORMAL && link >= 0 &&
        (s->peer_state != PEER_CONNECTED || s->peer_failures != (uint64_t)link)) {
        pthread_mutex_unlock(&s->pend_mu);
        return -1;
    }
    __atomic_store_n(&s->io_state, to, __ATOMIC_RELEASE);
    struct op *list = s->held_head;
    s->held_head = s->held_tail = NULL;
    s->held_n = 0;
    pthread_mutex_unlock(&s->pend_mu);
    for (struct op *o = list, *n; o; o = n) {
        n = o->hnext;
        op_finish(s, o, to == IO_FAILED);
    }
    return was;
}

/* ---- unflushed ranges -------------------------------------------------- */

/* Unflushed ranges (DRBD's transfer log, which keeps requests until the
 * barrier ack of their epoch). The receiver acks a WRITE or a sync chunk
 * once it is in its page cache; only the FLUSH_ACK of a later FLUSH means
 * it is on its disk. The dirty bit is still cleared at the ack, so that
 * HAstatus shows nothing dirty in normal operation, but the range is kept
 * here (seq, offset, length) until such a FLUSH_ACK. If the connection is
 * lost first, the secondary may lose the range as well (power loss,
 * reboot) and nothing would send it again: fail_peer marks every range
 * still kept dirty, and the next resync sends it. Frames sent with F_SYNC
 * are durable at their ack and are not kept.
 *
 * The list is bounded without making any write wait: the flusher thread
 * sends a FLUSH of its own once the kept ranges add up to unfl_max_bytes
 * or the oldest is unfl_max_ns old. Its frame is queued like any other and
 * no FUSE request waits for its ack. A clean stop sends one and waits for
 * it (stop_serving), so that it can report nothing dirty. */

/* Keep e's range, acked at now; under pend_mu. 0, or -ENOMEM: the caller
 * then leaves the range dirty. */
static int unflushed_add(struct mrd_server *s, const struct pending *e, uint64_t now)
{
    if (s->unfl_n == s->unfl_cap) {
        size_t cap = s->unfl_cap ? 2 * s->unfl_cap : 1024;
        struct unflushed *u = realloc(s->unfl, cap * sizeof *u);
        if (!u)
            return -ENOMEM;
        /* The ring was full: its wrapped part [0, head) moves past the old
         * end, so that indexes modulo the new capacity still run in order. */
        memcpy(u + s->unfl_cap, u, s->unfl_head * sizeof *u);
        s->unfl = u;
        s->unfl_cap = cap;
    }
    s->unfl[(s->unfl_head + s->unfl_n) & (s->unfl_cap - 1)] =
        (struct unflushed){.seq = e->seq, .off = e->off, .t_acked = now, .len = e->len};
    /* The age bound needs no wake-up here (the flusher looks at least every
     * unfl_max_ns): a signal per ring that fills again would cost the ack
     * reader a futex call and a thread switch per fsync cycle. */
    int crossed = s->unfl_bytes < s->unfl_max_bytes && s->unfl_bytes + e->len >= s->unfl_max_bytes;
    s->unfl_n++;
    s->unfl_bytes += e->len;
    if (crossed)
        pthread_cond_signal(&s->flush_cv);
    return 0;
}

/* A FLUSH with this seq was acked: forget what it made durable; under
 * pend_mu. The receiver acks data frames in seq order, so the ring is in
 * seq order and that is a prefix of it (acks of frames after the FLUSH may
 * come before its FLUSH_ACK: they stay). */
static void unflushed_flushed(struct mrd_server *s, uint64_t flush_seq)
{
    while (s->unfl_n && s->unfl[s->unfl_head].seq < flush_seq) {
        s->unfl_bytes -= s->unfl[s->unfl_head].len;
        s->unfl_head = (s->unfl_head + 1) & (s->unfl_cap - 1);
        s->unfl_n--;
    }
    if (s->unfl_n) /* what came after it: a fresh deadline */
        pthread_cond_signal(&s->flush_cv);
}

/* The connection is lost: everything kept may be lost on the peer too;
 * under pend_mu. */
static void unflushed_to_dirty(struct mrd_server *s)
{
    for (size_t i = 0; i < s->unfl_n; i++) {
        const struct unflushed *u = &s->unfl[(s->unfl_head + i) & (s->unfl_cap - 1)];
        mrd_bitmap_set_range(s->bm, u->off, u->len);
    }
    s->unfl_head = s->unfl_n = 0;
    s->unfl_bytes = 0;
    pthread_cond_broadcast(&s->flush_cv);
}

/* The peer side of e is over: acked (ok) or lost with the connection. */
static void complete_peer(struct mrd_server *s, struct pending *e, int ok)
{
    if (e->kind == P_WRITE && !ok)
        mrd_bitmap_set_range(s->bm, e->off, e->len);
    if (e->op)
        op_put(s, e->op);
    free(e);
}

/* Declare the peer gone. Safe from any thread, any number of times. With
 * fence set and fencing on, the server becomes SUSPENDED before any pending
 * op loses its peer reference, so none of them is acknowledged. */
static void fail_peer(struct mrd_server *s, int code, const char *why, int fence)
{
    struct pending list;
    pthread_mutex_lock(&s->pend_mu);
    if (s->peer_state != PEER_CONNECTED) {
        pthread_mutex_unlock(&s->pend_mu);
        return;
    }
    s->peer_state = PEER_FAILED;
    s->peer_failures++;
    if (fence && s->fencing && s->io_state == IO_NORMAL)
        __atomic_store_n(&s->io_state, IO_SUSPENDED, __ATOMIC_RELEASE);
    if (code)
        set_error_locked(s, "peer lost: %s: %s", why, mrd_strerror(code));
    else
        set_error_locked(s, "peer lost: %s", why);
    /* Wakes a blocked sendmsg and the ack reader; the fd itself is closed
     * later under send_mu, once no drainer is using it (reap_peer). */
    shutdown(s->peer_fd, SHUT_RDWR);
    list = s->head;
    if (list.next == &s->head) {
        list.next = list.prev = &list;
    } else {
        list.next->prev = &list;
        list.prev->next = &list;
    }
    s->head.next = s->head.prev = &s->head;
    s->in_flight = 0;
    s->sync_inflight = 0;
    unflushed_to_dirty(s);
    for (struct pending *e = list.next; e != &list; e = e->next)
        if (e->zc_out)
            --*e->zc_out;
    pthread_cond_broadcast(&s->pend_cv);
    pthread_cond_broadcast(&s->zc_cv);
    pthread_mutex_unlock(&s->pend_mu);
    for (struct pending *e = list.next, *n; e != &list; e = n) {
        n = e->next;
        complete_peer(s, e, 0);
    }
}

/* Zero-copy sends. sendmsg copies a frame's payload into the socket's
 * buffers; for a 1 MiB write that copy (plus allocating the pages it goes
 * into) was the largest piece of the time a mirrored write spends before its
 * local pwrite can start, and the local pwrite waits for it. A payload of
 * ZC_MIN bytes or more is instead vmspliced into a pipe and spliced from
 * there to the socket: the socket's buffers then hold references to the
 * FUSE request's own pages, and over 127.0.0.1 or a veth the receiver's recv
 * copies straight out of them (DRBD sends bio pages the same way, with
 * sendpage).
 *
 * The price is that those pages must not change until the peer has read
 * them, and "handed to the socket" (tx_wait) no longer means that. The ack
 * does: the receiver acks a frame only after its recv took every byte and
 * the CRC matched. So a writer whose frame went zero-copy keeps its FUSE
 * worker (whose buffer it is) until every such frame is acked or lost with
 * the connection (zc_out on its stack, zc_cv), not just sent. That costs the
 * writer nothing: the ack reader sends the reply as before, without waiting
 * for the worker to wake, and FUSE_THREADS workers take other requests
 * meanwhile.
 *
 * When the connection is lost, the writer goes on while a dead socket may
 * still reference the pages, and libfuse reuses the buffer for the next
 * request. That is safe because the CRC in the frame's header was computed
 * over the original bytes: a receiver that still gets the frame either sees
 * them unchanged or fails the check and applies nothing, and the range is
 * dirty on the primary either way (complete_peer), so resync sends it again.
 *
 * A failed splice may leave bytes in the pipe, which would prefix the next
 * connection's payloads: zc_ok is cleared and the pipe is replaced with the
 * connection (reap_peer, attach). Without a pipe, or with corrupt_next's
 * private copy, the payload is copied as before. */
static int tx_send(struct mrd_server *s, int fd, int zc, struct tx **batch, int n, int *pipe_bad)
{
    struct iovec iov[2 * TX_BATCH];
    int iovcnt = 0;
    for (int i = 0; i < n; i++) {
        struct tx *t = batch[i];
        iov[iovcnt++] = t->iov[0];
        if (t->iovcnt < 2)
            continue;
        if (!zc || !t->zc || t->bad) {
            iov[iovcnt++] = t->iov[1];
            continue;
        }
        /* What precedes the payload (its header at least) goes first, held
         * back by MSG_MORE to share a segment with the payload's start. */
        int rc = mrd_send_all_flags(fd, iov, iovcnt, MSG_MORE);
        iovcnt = 0;
        if (rc)
            return rc;
        rc = mrd_splice_send(s->zc_pipe, fd, t->iov[1].iov_base, t->iov[1].iov_len, i + 1 < n);
        if (rc) {
            *pipe_bad = 1;
            return rc;
        }
        ADD(s->frames_spliced, 1);
        ADD(s->bytes_spliced, t->iov[1].iov_len);
    }
    return iovcnt ? mrd_send_all(fd, iov, iovcnt) : 0;
}

/* Sending: frames are queued in seq order and one thread at a time (the
 * drainer) puts everything queued on the wire with one sendmsg (plus a
 * splice per zero-copy payload, see tx_send). A writer
 * whose frame finds another send under way does not wait for it: it goes on
 * with its local write, and the drainer takes its frame along with the
 * others queued meanwhile (sixteen concurrent O_DSYNC writers share sends:
 * fewer syscalls, TCP segments and wake-ups of the receiver). The frame's
 * owner must call tx_wait before its payload goes away. */
static void tx_drain(struct mrd_server *s)
{
    struct tx *batch[TX_BATCH];
    s->tx_busy = 1;
    while (s->txq) {
        int n = 0;
        uint64_t payload = 0;
        while (s->txq && n < TX_BATCH) {
            struct tx *t = s->txq;
            s->txq = t->next;
            batch[n++] = t;
            payload += t->iovcnt > 1 ? t->iov[1].iov_len : 0;
        }
        if (!s->txq)
            s->txq_tail = &s->txq;
        int fd = s->peer_fd, zc = s->zc_ok, pipe_bad = 0;
        pthread_mutex_unlock(&s->send_mu);
        int rc = tx_send(s, fd, zc, batch, n, &pipe_bad);
        if (rc) {
            fail_peer(s, rc, "send", 1);
        } else {
            ADD(s->frames_sent, (uint64_t)n);
            ADD(s->bytes_sent, payload);
        }
        pthread_mutex_lock(&s->send_mu);
        if (pipe_bad)
            s->zc_ok = 0;
        for (int i = 0; i < n; i++) /* the last touch: its owner may return */
            __atomic_store_n(&batch[i]->done, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&s->tx_cv);
    }
    s->tx_busy = 0;
}

/* Queue e's frame (header + payload) for the wire, as t, and send it now
 * unless a drainer is at work. Returns MRD_ENOPEER, with e and t untouched
 * (but a write's range marked dirty), when no peer is connected; otherwise
 * 0: e now belongs to the pending machinery (acked later or failed with the
 * peer) and the caller must tx_wait(t) before payload may change. */
static int peer_queue(struct mrd_server *s, struct pending *e, uint16_t type, uint16_t flags,
                      const void *payload, struct tx *t)
{
    pthread_mutex_lock(&s->send_mu);
    pthread_mutex_lock(&s->pend_mu);
    if (s->peer_state != PEER_CONNECTED) {
        /* Under pend_mu, before a peer can be attached: a resync started
         * after that attach sees the bit. */
        if (e->kind == P_WRITE)
            mrd_bitmap_set_range(s->bm, e->off, e->len);
        pthread_mutex_unlock(&s->pend_mu);
        pthread_mutex_unlock(&s->send_mu);
        return MRD_ENOPEER;
    }
    e->seq = ++s->next_seq;
    e->t_sent = mrd_now_ns();
    e->prev = s->head.prev;
    e->next = &s->head;
    s->head.prev->next = e;
    s->head.prev = e;
    s->in_flight++;
    if (e->kind == P_SYNC || e->sync_flush)
        s->sync_inflight++;
    if (e->zc_out)
        ++*e->zc_out;
    e->durable = (flags & MRD_FRAME_F_SYNC) != 0;
    if (e->kind != P_FLUSH && !e->durable) {
        s->peer_dirty_seq = e->seq; /* acked will not mean durable */
    } else if (e->kind == P_FLUSH) {
        s->flush_sent_seq = e->seq;
        ADD(s->flush_frames, 1); /* counted before it can be acked */
    }
    pthread_mutex_unlock(&s->pend_mu);

    uint32_t plen = e->kind == P_FLUSH ? 0
                    : e->zero   ? MRD_FRAME_ZERO_PAYLOAD
                    : e->verify ? MRD_FRAME_VERIFY_PAYLOAD
                                : e->len;
    mrd_frame_encode(t->hdr, type, flags, e->seq, e->off, payload, plen);
    t->iov[0] = (struct iovec){t->hdr, sizeof t->hdr};
    t->iov[1] = (struct iovec){(void *)payload, plen};
    t->iovcnt = plen ? 2 : 1;
    t->done = 0;
    t->bad = NULL;
    t->zc = e->zc_out != NULL;
    t->next = NULL;
    if (plen && __atomic_load_n(&s->corrupt_next, __ATOMIC_RELAXED) > 0 &&
        __atomic_sub_fetch(&s->corrupt_next, 1, __ATOMIC_RELAXED) >= 0) {
        /* Corrupt a private copy: the local disk must get the good data. */
        t->bad = malloc(plen);
        if (t->bad) {
            memcpy(t->bad, payload, plen);
            t->bad[plen / 2] ^= 0x5a;
            t->iov[1].iov_base = t->bad;
        }
    }
    *s->txq_tail = t;
    s->txq_tail = &t->next;
    if (!s->tx_busy)
        tx_drain(s);
    pthread_mutex_unlock(&s->send_mu);
    return 0;
}

/* Wait until t has been handed to the socket (or failed with the peer). */
static void tx_wait(struct mrd_server *s, struct tx *t)
{
    /* Nearly always sent already (the local write took longer): no lock. */
    if (!__atomic_load_n(&t->done, __ATOMIC_ACQUIRE)) {
        pthread_mutex_lock(&s->send_mu);
        while (!t->done)
            pthread_cond_wait(&s->tx_cv, &s->send_mu);
        pthread_mutex_unlock(&s->send_mu);
    }
    free(t->bad);
}

/* peer_queue + tx_wait: for callers that have nothing to do meanwhile. */
static int peer_send(struct mrd_server *s, struct pending *e, uint16_t type, uint16_t flags,
                     const void *payload)
{
    struct tx t;
    int rc = peer_queue(s, e, type, flags, payload, &t);
    if (!rc)
        tx_wait(s, &t);
    return rc;
}

/* Send a FLUSH that no FUSE request waits for; flush_sent_seq is then its
 * seq or a later FLUSH's. 0, MRD_ENOPEER or -ENOMEM. */
static int flush_frame(struct mrd_server *s)
{
    struct pending *e = calloc(1, sizeof *e);
    if (!e)
        return -ENOMEM;
    e->kind = P_FLUSH;
    int rc = peer_send(s, e, MRD_FRAME_FLUSH, 0, NULL);
    if (rc)
        free(e);
    return rc;
}

/* The flusher (see "Unflushed ranges"): one per connection, it only waits
 * and queues FLUSH frames, so no writer or ack ever waits for it. At most
 * one of its FLUSHes (or any other) is outstanding at a time. */
static void *flusher_main(void *arg)
{
    struct mrd_server *s = arg;
    pthread_mutex_lock(&s->pend_mu);
    while (s->peer_state == PEER_CONNECTED) {
        uint64_t now = mrd_now_ns(), due = now + s->unfl_max_ns;
        /* Ranges kept and no FLUSH outstanding (one would cover them). */
        int kept = s->unfl_n && s->flush_sent_seq <= s->peer_durable_seq;
        if (kept)
            due = s->unfl[s->unfl_head].t_acked + s->unfl_max_ns;
        if (!kept || (s->unfl_bytes < s->unfl_max_bytes && now < due)) {
            struct timespec ts = {(time_t)(due / 1000000000ull), (long)(due % 1000000000ull)};
            pthread_cond_timedwait(&s->flush_cv, &s->pend_mu, &ts);
            continue;
        }
        pthread_mutex_unlock(&s->pend_mu);
        int rc = flush_frame(s);
        pthread_mutex_lock(&s->pend_mu);
        if (rc == -ENOMEM && s->unfl_n) /* kept ranges stay kept; try again at the next deadline */
            s->unfl[s->unfl_head].t_acked = mrd_now_ns();
    }
    pthread_mutex_unlock(&s->pend_mu);
    return NULL;
}

/* Match one ack (decoded and verified) with its pending frame and retire
 * it under pend_mu. Returns the entry, for complete_peer once pend_mu is
 * released; NULL for a PONG; *err set (pend_mu still held) for an ack that
 * matches nothing. */
static struct pending *retire_acked(struct mrd_server *s, const struct mrd_frame_header *h, int *err)
{
    /* Acks come back in send order, so the match is nearly always the head
     * of the list. */
    struct pending *e = s->head.next;
    while (e != &s->head && e->seq != h->seq)
        e = e->next;
    int want = e == &s->head ? -1
               : e->kind == P_WRITE ? MRD_FRAME_WRITE_ACK
               : e->kind == P_FLUSH ? MRD_FRAME_FLUSH_ACK
               : e->verify          ? MRD_FRAME_VERIFY_SAME
                                    : MRD_FRAME_SYNC_ACK;
    int differs = e != &s->head && e->verify && h->type == MRD_FRAME_VERIFY_DIFF;
    if (want != h->type && !differs) {
        *err = MRD_EPROTO;
        return NULL;
    }
    e->prev->next = e->next;
    e->next->prev = e->prev;
    s->in_flight--;
    s->acked++;
    if (e->zc_out)
        --*e->zc_out; /* ack_main wakes the writer once the replies are out */
    uint64_t now = mrd_now_ns(), lat = now - e->t_sent;
    s->lat_total += lat;
    if (lat > s->lat_max)
        s->lat_max = lat;
    /* Clearing dirty bits under pend_mu, while the peer is still known
     * connected, orders it before any re-dirtying by a later failure. */
    if (differs) {
        /* The replica differs here: the next resync (or the checksum sync's
         * copy pass) sends it again. */
        mrd_bitmap_set_range(s->bm, e->off, e->len);
        s->verify_diff_bytes += e->len;
    } else if (e->kind == P_FLUSH) {
        /* Only a FLUSH_ACK means durable: the peer fdatasyncs before it. */
        if (e->seq > s->peer_durable_seq)
            s->peer_durable_seq = e->seq; /* the peer applies in order */
        unflushed_flushed(s, e->seq);
        pthread_cond_broadcast(&s->pend_cv); /* stop_serving may wait for it */
    } else if (!e->verify || e->checksum) {
        /* A checksum sync's SAME is kept too: the peer's copy it compared
         * may be in its page cache only. */
        if (e->durable || unflushed_add(s, e, now) == 0)
            mrd_bitmap_clear_range(s->bm, e->off, e->len);
    }
    if (e->kind == P_SYNC) {
        s->sync_inflight--;
        if (e->verify)
            s->bytes_verified += e->len;
        else
            s->bytes_synced += e->len;
        if (e->zero)
            s->bytes_zeroed += e->len;
        s->sync_offset = e->off + e->len;
        pthread_cond_broadcast(&s->pend_cv);
    } else if (e->sync_flush) {
        s->sync_inflight--;
        pthread_cond_broadcast(&s->pend_cv);
    } else if (!s->in_flight) {
        pthread_cond_broadcast(&s->pend_cv);
    }
    return e;
}

/* The ack reader. One recv takes every ack that has arrived (the receiver
 * sends them in batches); they are retired under one pend_mu hold and their
 * ops completed after it. */
static void *ack_main(void *arg)
{
    struct mrd_server *s = arg;
    uint8_t in[ACK_RX_BATCH * MRD_FRAME_HEADER_SIZE];
    size_t have = 0;
    int fd = s->peer_fd;
    for (;;) {
        ssize_t n = recv(fd, in + have, sizeof in - have, 0);
        if (n > 0) {
            have += (size_t)n;
            if (have < MRD_FRAME_HEADER_SIZE)
                continue;
        } else if (n == 0) {
            fail_peer(s, 0, "peer closed the connection", 1);
            break;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN) {
            /* Receive poll: notice a dead peer that keeps the TCP session
             * open but stops acknowledging. */
            pthread_mutex_lock(&s->pend_mu);
            int state = s->peer_state;
            uint64_t oldest = s->head.next != &s->head ? s->head.next->t_sent : 0;
            pthread_mutex_unlock(&s->pend_mu);
            if (state != PEER_CONNECTED)
                break;
            if (oldest && mrd_now_ns() - oldest > (uint64_t)s->peer_timeout_ms * 1000000ull) {
                fail_peer(s, -ETIMEDOUT, "no ack within the peer timeout", 1);
                break;
            }
            continue;
        } else {
            fail_peer(s, -errno, "receive", 1);
            break;
        }

        size_t whole = have / MRD_FRAME_HEADER_SIZE * MRD_FRAME_HEADER_SIZE;
        struct pending *done = NULL, **tail = &done;
        int err = 0;
        const char *why = NULL;
        pthread_mutex_lock(&s->pend_mu);
        if (s->peer_state != PEER_CONNECTED)
            err = MRD_ENOPEER;
        for (size_t at = 0; !err && at < whole; at += MRD_FRAME_HEADER_SIZE) {
            struct mrd_frame_header h;
            err = mrd_frame_decode(in + at, MRD_FRAME_HEADER_SIZE, &h);
            if (!err)
                err = mrd_frame_verify(in + at, &h, NULL, 0);
            if (err) {
                why = "bad frame from the peer";
                break;
            }
            if (h.type == MRD_FRAME_PONG)
                continue;
            struct pending *e = retire_acked(s, &h, &err);
            if (err) {
                why = "ack for no pending frame";
                break;
            }
            e->next = NULL;
            *tail = e;
            tail = &e->next;
        }
        pthread_mutex_unlock(&s->pend_mu);
        int zc = 0;
        for (struct pending *e = done, *next; e; e = next) {
            next = e->next;
            zc |= e->zc_out != NULL;
            complete_peer(s, e, 1);
        }
        /* After the replies: the writer they release needs the CPU more
         * than the FUSE worker that only waits to be given back. */
        if (zc)
            pthread_cond_broadcast(&s->zc_cv);
        if (err) {
            if (why)
                fail_peer(s, err, why, 1);
            break;
        }
        have -= whole;
        memmove(in, in + whole, have);
    }
    return NULL;
}

/* Join the ack reader and close a failed or detached connection. */
static void reap_peer(struct mrd_server *s)
{
    if (s->ack_live) {
        pthread_join(s->ack_th, NULL);
        s->ack_live = 0;
    }
    if (s->flush_live) {
        pthread_join(s->flush_th, NULL);
        s->flush_live = 0;
    }
    pthread_mutex_lock(&s->send_mu);
    /* A drainer sends with send_mu released: the fd is ours once it is
     * done (after a failure its sendmsg fails at once: shutdown). */
    while (s->tx_busy)
        pthread_cond_wait(&s->tx_cv, &s->send_mu);
    pthread_mutex_lock(&s->pend_mu);
    if (s->peer_state != PEER_CONNECTED && s->peer_fd >= 0) {
        close(s->peer_fd);
        s->peer_fd = -1;
        s->peer_state = PEER_NONE;
        if (s->zc_pipe[0] >= 0) {
            close(s->zc_pipe[0]);
            close(s->zc_pipe[1]);
            s->zc_pipe[0] = s->zc_pipe[1] = -1;
        }
        s->zc_ok = 0;
    }
    pthread_mutex_unlock(&s->pend_mu);
    pthread_mutex_unlock(&s->send_mu);
}

static void reap_sync(struct mrd_server *s)
{
    if (s->sync_live) {
        pthread_join(s->sync_th, NULL);
        s->sync_live = 0;
    }
}

/* ---- FUSE operations --------------------------------------------------- */

static struct mrd_server *srv(fuse_req_t req) { return fuse_req_userdata(req); }

static void fill_stat(struct mrd_server *s, struct stat *st)
{
    memset(st, 0, sizeof *st);
    st->st_ino = FUSE_ROOT_ID;
    st->st_mode = S_IFREG | 0600;
    st->st_nlink = 1;
    st->st_size = (off_t)s->size;
    st->st_blksize = 4096;
    st->st_blocks = (blkcnt_t)((s->size + 511) / 512);
    st->st_atime = st->st_mtime = st->st_ctime = s->start_time;
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    /* 1 MiB writes: libfuse derives max_pages (256) from max_write. */
    conn->max_write = MAX_WRITE;
    if (conn->capable & FUSE_CAP_ASYNC_DIO)
        conn->want |= FUSE_CAP_ASYNC_DIO; /* loop --direct-io keeps many requests in flight */
    conn->want &= ~(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
                    FUSE_CAP_SPLICE_MOVE);
    if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC)
        conn->want |= FUSE_CAP_ATOMIC_O_TRUNC; /* O_TRUNC is ignored: like a block device */
    conn->max_background = 64;
    conn->congestion_threshold = 48;
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)fi;
    struct stat st;
    if (ino != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill_stat(srv(req), &st);
    fuse_reply_attr(req, &st, 60.0);
}

/* The size is the disk's and never changes: truncation (dd without
 * conv=notrunc, O_TRUNC) is accepted and ignored, as on a block device; the
 * kernel takes the size from the attributes we return. */
static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    (void)attr, (void)to_set;
    op_getattr(req, ino, fi);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (ino != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fi->keep_cache = 0;
    fi->fh = (fi->flags & O_ACCMODE) == O_RDONLY ? FH_RDONLY : 0;
    if (!(fi->flags & O_DIRECT)) {
        /* Buffered and mmap users (and the loop device, which switches to
         * direct I/O after opening) get the ordinary page-cache file. */
        fuse_reply_open(req, fi);
        return;
    }
    /* An O_DIRECT opener gets FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES.
     *
     * Without them the kernel takes the inode lock around every O_DIRECT
     * write (fuse_cache_write_iter), and a synchronous writer holds it until
     * our reply, i.e. for a whole peer round trip: sixteen threads writing
     * O_DSYNC blocks then go one at a time. With them, writes inside the
     * file's fixed size share the lock and reach our worker threads
     * together; their ordering against each other is ours to keep, which
     * the extent locks do. The kernel then sends no FSYNC after an O_DSYNC
     * direct write: durability rests on the O_DSYNC flag the WRITE carries
     * (see "Durable writes" at op_write), which we already honour on both
     * disks before replying. libfuse 3.14 has no field for the parallel
     * flag, so the reply is built here; it is the same fuse_open_out that
     * fuse_reply_open() sends. */
    struct fuse_open_out out = {
        .fh = fi->fh,
        .open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES,
    };
    fuse_reply_buf(req, (const char *)&out, sizeof out);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)ino, (void)fi;
    struct mrd_server *s = srv(req);
    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if ((uint64_t)off >= s->size)
        size = 0;
    else if (size > s->size - (uint64_t)off)
        size = (size_t)(s->size - (uint64_t)off);
    struct fuse_bufvec bv = FUSE_BUFVEC_INIT(size);
    bv.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    bv.buf[0].fd = s->disk_fd;
    bv.buf[0].pos = off;
    ADD(s->reads, 1);
    ADD(s->bytes_read, size);
    fuse_reply_data(req, &bv, FUSE_BUF_SPLICE_MOVE);
}

/* Durable writes: one peer round trip for an O_DSYNC write.
 *
 * An O_DSYNC write on a file opened without O_DIRECT (or before op_open
 * set FOPEN_DIRECT_IO for O_DIRECT opens) reaches us as two FUSE requests:
 * the WRITE, then an FSYNC the kernel sends because of O_DSYNC. Done naively
 * that is two round trips to the peer (WRITE -> WRITE_ACK, then FLUSH ->
 * peer fdatasync -> FLUSH_ACK) plus a local pwrite and a local fdatasync,
 * i.e. a disk cache flush, in sequence. An O_DIRECT opener (FOPEN_DIRECT_IO)
 * gets no FSYNC at all: the WRITE alone must be durable, and is.
 *
 * The kernel tells us which writes must be durable: the WRITE request
 * carries the file's open flags plus O_DSYNC/O_SYNC for RWF_DSYNC/RWF_SYNC
 * writes (fuse_write_flags()), and libfuse hands them over in fi->flags.
 * For such a write (DRBD's DP_FUA):
 *   - the WRITE frame carries MRD_FRAME_F_SYNC, and the receiver applies it
 *     with pwritev2(RWF_DSYNC) before the WRITE_ACK: that ack means durable;
 *   - the local copy is written with RWF_DSYNC too, while the frame travels
 *     (frame first, then the local write, as for every write), so the
 *     peer's round trip hides behind the local disk's flush or vice versa;
 *   - the reply still waits for both (protocol C unchanged).
 * The FSYNC that follows then finds nothing to do on either side and is
 * answered without any I/O. Two watermarks decide that (struct mrd_server):
 * a FLUSH frame is sent only if some frame since the last acked FLUSH left
 * non-durable data on the peer (an unflagged WRITE, a SYNC_DATA chunk, or a
 * new connection), and the local fdatasync is done only if some local
 * write completed without RWF_DSYNC since the last successful fdatasync.
 *
 * Why that keeps fsync's promise (every write completed before the fsync is
 * durable on both disks) with concurrent writers: a write is completed only
 * after its frames were assigned their seq under pend_mu (where
 * peer_dirty_seq moves) and after its local pwrite (after which local_gen
 * moves); both happen before its reply, hence before the fsync's checks.
 * A FLUSH_ACK covers every frame sent before the FLUSH because the
 * receiver applies frames in order and fdatasyncs the whole replica. Writes
 * still in flight when the fsync arrives are not owed anything, and only
 * make the check more conservative. Skipping never acknowledges anything
 * the peer has not acknowledged: the flush still goes through op_put, so
 * fencing holds it while suspended and FAILED answers it with EIO, exactly
 * as a flush without a peer.
 *
 * Loop devices (--direct-io) do not pass O_DSYNC: they send plain writes
 * and ask for durability with separate FSYNC requests (the block layer's
 * flush/FUA emulation), so those keep paying the FLUSH round trip, which
 * overlaps with the local fdatasync (FLUSH frame first, then fdatasync).
 *
 * Write-behind. A buffered pwrite leaves the data in the disk's page cache
 * (the image file's, or the block device's), a second cache under the
 * filesystem that mirrord serves, and the kernel starts writing it out only
 * when it is old (30 s) or plentiful (10 % of memory). Until then nothing
 * goes to the disk, and the next flush pays for all of it: after 1 GiB of
 * 1 MiB writes the fsync took 0.3 s, longer than the writes before it. A
 * block device, DRBD included, has no such cache: a write goes to the disk
 * when it is issued. So a write of MRD_WRITE_BEHIND_MIN or more starts its own
 * writeback as soon as it is done (sync_file_range WRITE, no wait), and the
 * disk works while the application goes on; the flush then finds little
 * left. It changes no promise: durability still comes from the flush's
 * fdatasync (local_gen is bumped as before). Small writes are left alone,
 * so that the kernel can still merge random 4 KiB writes into larger I/O.
 * The receiver does the same with large applied frames, after their ack. */
static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    (void)ino;
    struct mrd_server *s = srv(req);
    /* O_SYNC includes the O_DSYNC bit. */
    int dsync = fi && (fi->flags & O_DSYNC);
    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if ((uint64_t)off >= s->size) {
        ADD(s->write_errors, 1);
        fuse_reply_err(req, size ? ENOSPC : 0);
        return;
    }
    /* A write straddling the end is cut short, as on a block device. */
    if (size > s->size - (uint64_t)off)
        size = (size_t)(s->size - (uint64_t)off);
    if (size == 0) {
        fuse_reply_write(req, 0);
        return;
    }
    /* Stepped down (resume FAIL): nothing more is written or acknowledged. */
    if (__atomic_load_n(&s->io_state, __ATOMIC_ACQUIRE) == IO_FAILED) {
        ADD(s->write_errors, 1);
        fuse_reply_err(req, EIO);
        return;
    }
    uint64_t seen = __atomic_load_n(&s->max_write_seen, __ATOMIC_RELAXED);
    while (size > seen && !__atomic_compare_exchange_n(&s->max_write_seen, &seen, size, 0,
                                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;

    struct op *o = calloc(1, sizeof *o);
    if (!o) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    __atomic_store_n(&s->last_app_write_ns, mrd_now_ns(), __ATOMIC_RELAXED);
    o->kind = P_WRITE;
    o->off = (uint64_t)off;
    o->len = (uint32_t)size;
    o->req = req;
    o->refs = 1; /* the local write's */

    /* Activity log before anything is issued (and before the extent lock,
     * so a wait for a free slot holds up no other extent). */
    if (s->al) {
        int rc = mrd_al_begin(s->al, o->off, size);
        if (rc) {
            /* A write that waited for a clean extent while suspended and
             * was then failed (stepping down) is no activity-log error. */
            pthread_mutex_lock(&s->pend_mu);
            if (s->io_state != IO_FAILED)
                set_error_locked(s, "activity log at %llu: %s", (unsigned long long)off, mrd_strerror(rc));
            pthread_mutex_unlock(&s->pend_mu);
            ADD(s->write_errors, 1);
            free(o);
            fuse_reply_err(req, EIO);
            return;
        }
    }

    struct held idx;
    extents_lock(s, (uint64_t)off, size, &idx);
    /* Frames first, then the local write: the peer works while we pwrite,
     * and both happen inside the extent lock, so order is the same on both. */
    struct tx tx[(MAX_WRITE + FRAME_SPLIT - 1) / FRAME_SPLIT];
    int ntx = 0, zc = size >= ZC_MIN, zc_out = 0, unsent = 0;
    for (size_t done = 0; done < size;) {
        size_t n = size - done > FRAME_SPLIT ? FRAME_SPLIT : size - done;
        struct pending *e = calloc(1, sizeof *e);
        if (!e) {
            /* Untracked, the frame cannot be sent, and a connected peer
             * would miss a write acknowledged from this disk alone: the
             * write fails instead (op_put marks it dirty). */
            unsent = ENOMEM;
            break;
        }
        e->kind = P_WRITE;
        e->off = (uint64_t)off + done;
        e->len = (uint32_t)n;
        e->op = o;
        e->zc_out = zc ? &zc_out : NULL;
        __atomic_add_fetch(&o->refs, 1, __ATOMIC_RELAXED);
        /* MRD_ENOPEER: peer_queue marked the range dirty. */
        if (peer_queue(s, e, MRD_FRAME_WRITE, dsync ? MRD_FRAME_F_SYNC : 0, buf + done, &tx[ntx]) == 0) {
            ntx++;
        } else {
            __atomic_sub_fetch(&o->refs, 1, __ATOMIC_RELAXED);
            free(e);
        }
        done += n;
    }
    int rc = dsync ? mrd_pwrite_all_dsync(s->disk_fd, buf, size, (uint64_t)off)
                   : mrd_pwrite_all(s->disk_fd, buf, size, (uint64_t)off);
    extents_unlock(s, &idx);
    /* buf is libfuse's and is reused once we return. */
    for (int i = 0; i < ntx; i++)
        tx_wait(s, &tx[i]);
    /* After the pwrite, before the reply (see "Durable writes"). */
    if (!rc && !dsync)
        __atomic_add_fetch(&s->local_gen, 1, __ATOMIC_SEQ_CST);

    if (rc || unsent) {
        pthread_mutex_lock(&s->pend_mu);
        set_error_locked(s, "%s at %llu: %s", rc ? "local pwrite" : "replicating a write",
                         (unsigned long long)off, strerror(rc ? -rc : unsent));
        pthread_mutex_unlock(&s->pend_mu);
        ADD(s->write_errors, 1);
    } else {
        ADD(s->writes, 1);
        ADD(s->bytes_written, size);
        if (dsync)
            ADD(s->dsync_writes, 1);
    }
    o->local_err = rc ? -rc : unsent;
    op_put(s, o);
    /* After op_put: the reply need not wait for this. */
    if (!rc && !dsync && size >= MRD_WRITE_BEHIND_MIN)
        mrd_start_writeback(s->disk_fd, (uint64_t)off, size);
    if (zc && ntx) {
        /* Spliced: the socket may read buf until the peer has it. The reply
         * does not wait for this: the ack reader sends it. */
        pthread_mutex_lock(&s->pend_mu);
        while (zc_out)
            pthread_cond_wait(&s->zc_cv, &s->pend_mu);
        pthread_mutex_unlock(&s->pend_mu);
    }
}

/* Does a flush need a FLUSH frame? Only if a connected peer may hold data
 * that an ack did not already make durable (see "Durable writes"). Checked
 * under pend_mu alone, so a flush never waits behind a large send. */
static int peer_flush_needed(struct mrd_server *s)
{
    pthread_mutex_lock(&s->pend_mu);
    int need = s->peer_state == PEER_CONNECTED && s->peer_dirty_seq > s->peer_durable_seq;
    pthread_mutex_unlock(&s->pend_mu);
    return need;
}

/* Local fdatasync unless every completed write is already durable. Returns
 * 0 or a positive errno.
 *
 * A failed fdatasync is final: the kernel may have dropped the pages it
 * could not write, and it reports a writeback error only once, so the next
 * fdatasync could succeed with those writes missing. Every later flush then
 * answers EIO (what PostgreSQL does since "fsyncgate"). */
static int local_flush(struct mrd_server *s)
{
    if (__atomic_load_n(&s->local_flush_failed, __ATOMIC_ACQUIRE))
        return EIO;
    uint64_t gen = __atomic_load_n(&s->local_gen, __ATOMIC_SEQ_CST);
    uint64_t done = __atomic_load_n(&s->local_synced, __ATOMIC_SEQ_CST);
    if (gen == done)
        return 0;
    ADD(s->fdatasyncs, 1);
    if (fdatasync(s->disk_fd) < 0) {
        int err = errno;
        __atomic_store_n(&s->local_flush_failed, 1, __ATOMIC_RELEASE);
        pthread_mutex_lock(&s->pend_mu);
        set_error_locked(s, "local fdatasync: %s (every later flush fails)", strerror(err));
        pthread_mutex_unlock(&s->pend_mu);
        return err;
    }
    /* Every write counted in gen completed before the fdatasync started. */
    while (done < gen && !__atomic_compare_exchange_n(&s->local_synced, &done, gen, 0,
                                                      __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        ;
    return 0;
}

/* Cold extents. The activity log lets an extent go cold only once every
 * write completed in it is durable wherever a crash could lose it
 * ("Cold only when clean" in activity_log.h), and calls this when it has
 * no clean idle extent left, from a FUSE worker that holds no lock.
 *
 * Locally that takes an fdatasync. On the peer it takes a FLUSH_ACK while
 * the pair counts as in sync: a crash of the primary, or of both, is then
 * recovered from the activity log alone (meta.py, recover). Once the
 * connection is lost, what the peer may lose is in the dirty bitmap, but
 * that bitmap survives a crash only once the daemon has persisted that
 * this node writes alone (a crash from then on means a full sync), which it
 * does before mrd_server_resume DEGRADED. Hence: SUSPENDED answers "later"
 * (MRD_ENOPEER; the writer waits, and its reply would be held anyway),
 * FAILED answers EIO, and a server with no peer and nothing held (resumed,
 * or fencing off) needs only the local fdatasync. A connection lost while
 * the FLUSH travels is "later" too: the next call sees the new state.
 *
 * Evictions are rare (the log holds 2 GiB of extents by default) and the
 * extents at the cold end of the log were usually covered by the flusher's
 * periodic FLUSH and the kernel's writeback long before: the fdatasync
 * finds little to write, and one call cleans every idle extent at once. */
static int al_flush(void *arg)
{
    struct mrd_server *s = arg;
    pthread_mutex_lock(&s->pend_mu);
    int state = s->io_state;
    int need = s->peer_state == PEER_CONNECTED && s->peer_dirty_seq > s->peer_durable_seq;
    uint64_t failures = s->peer_failures;
    pthread_mutex_unlock(&s->pend_mu);
    if (state == IO_FAILED)
        return -EIO;
    if (state == IO_SUSPENDED)
        return MRD_ENOPEER;
    int rc = need ? flush_frame(s) : 0;
    if (rc == -ENOMEM)
        return rc;
    int err = local_flush(s); /* while the FLUSH travels */
    if (err)
        return -err;
    if (rc)
        return MRD_ENOPEER;
    pthread_mutex_lock(&s->pend_mu);
    uint64_t target = s->flush_sent_seq;
    while (need && s->peer_durable_seq < target && s->peer_failures == failures)
        pthread_cond_wait(&s->pend_cv, &s->pend_mu);
    int lost = s->peer_failures != failures;
    pthread_mutex_unlock(&s->pend_mu);
    return lost ? MRD_ENOPEER : 0;
}

/* Kept extents ("Kept hot" in activity_log.h). While the pair is connected
 * and no sync runs, a dirty block is one this disk and the peer's differ on
 * although the pair counts as in sync: a local write that failed after its
 * frame went (op_put), or an unsent frame. Nothing resyncs it before the
 * next connection, and a crash of this node forgets the in-memory bitmap:
 * its extent stays in the activity log, which the restart replays. Without
 * a peer (or during a sync) the daemon has moved to a new bitmap identifier
 * before any write is acknowledged alone, and a crash then means a full
 * sync, so nothing needs keeping. Lock-free reads: the state may change
 * right after, and either answer is safe then (the next eviction asks
 * again). */
static int al_keep(void *arg, uint64_t ext)
{
    struct mrd_server *s = arg;
    if (!mrd_bitmap_count(s->bm) || __atomic_load_n(&s->peer_state, __ATOMIC_RELAXED) != PEER_CONNECTED ||
        __atomic_load_n(&s->sync_active, __ATOMIC_RELAXED))
        return 0;
    uint64_t gran = mrd_bitmap_granularity(s->bm), off = ext * s->al_extent;
    if (off >= s->size)
        return 0;
    return mrd_bitmap_find_next_set(s->bm, off / gran, (off + s->al_extent + gran - 1) / gran) >= 0;
}

/* flush (every close) and fsync: FLUSH frame (if needed), then the local
 * fdatasync (if needed) while it travels; the reply waits for the peer's
 * FLUSH_ACK, which it sends after its own fdatasync. */
static void do_flush(fuse_req_t req)
{
    struct mrd_server *s = srv(req);
    ADD(s->flushes, 1);
    if (__atomic_load_n(&s->io_state, __ATOMIC_ACQUIRE) == IO_FAILED) {
        fuse_reply_err(req, EIO);
        return;
    }
    struct op *o = calloc(1, sizeof *o);
    struct pending *e = calloc(1, sizeof *e);
    if (!o || !e) {
        free(o);
        free(e);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    o->kind = e->kind = P_FLUSH;
    o->req = req;
    o->refs = 2;
    e->op = o;
    if (!peer_flush_needed(s) || peer_send(s, e, MRD_FRAME_FLUSH, 0, NULL)) {
        free(e);
        o->refs = 1;
    }
    o->local_err = local_flush(s);
    op_put(s, o);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    /* The close of a read-only handle flushes nothing of its own: while
     * suspended or failed, answer it at once so readers are never stuck in
     * close() or see EIO there. */
    if ((fi->fh & FH_RDONLY) && __atomic_load_n(&srv(req)->io_state, __ATOMIC_ACQUIRE) != IO_NORMAL) {
        fuse_reply_err(req, 0);
        return;
    }
    do_flush(req);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    (void)ino, (void)datasync, (void)fi;
    do_flush(req);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino, (void)fi;
    fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    (void)ino;
    struct mrd_server *s = srv(req);
    struct statvfs sv = {0};
    sv.f_bsize = sv.f_frsize = 4096;
    sv.f_blocks = s->size / 4096;
    sv.f_files = 1;
    sv.f_namemax = 255;
    fuse_reply_statfs(req, &sv);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .fsync = op_fsync,
    .release = op_release,
    .statfs = op_statfs,
};

static void *loop_main(void *arg)
{
    struct mrd_server *s = arg;
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    if (cfg) {
        fuse_loop_cfg_set_clone_fd(cfg, 0);
        fuse_loop_cfg_set_max_threads(cfg, FUSE_THREADS);
        /* Keep every worker once started. With fewer idle threads allowed,
         * libfuse ends a worker whenever more than that many are idle and
         * starts a new one at the next burst: sixteen concurrent O_DSYNC
         * writers made it create and destroy threads constantly (clone,
         * stack mmap/munmap, exit: 13 % of all CPU in a profile). Idle
         * workers cost only their stacks. */
        fuse_loop_cfg_set_idle_threads(cfg, FUSE_THREADS);
    }
    fuse_session_loop_mt(s->se, cfg);
    if (cfg)
        fuse_loop_cfg_destroy(cfg);
    __atomic_store_n(&s->loop_done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* ---- public API -------------------------------------------------------- */

int mrd_server_new(const char *disk_path, const char *mountpoint, uint64_t size, struct mrd_server **out)
{
    if (!disk_path || !mountpoint || !out)
        return -EINVAL;
    struct mrd_server *s = calloc(1, sizeof *s);
    if (!s)
        return -ENOMEM;
    s->disk_fd = s->peer_fd = s->abort_fd = -1;
    s->peer_timeout_ms = 10000;
    s->local_gen = 1;
    s->unfl_max_bytes = UNFLUSHED_MAX_BYTES;
    s->unfl_max_ns = UNFLUSHED_MAX_MS * 1000000ull;
    s->head.next = s->head.prev = &s->head;
    for (int i = 0; i < NSTRIPES; i++)
        pthread_mutex_init(&s->stripes[i], NULL);
    pthread_mutex_init(&s->send_mu, NULL);
    pthread_mutex_init(&s->pend_mu, NULL);
    pthread_cond_init(&s->pend_cv, NULL);
    pthread_cond_init(&s->tx_cv, NULL);
    pthread_cond_init(&s->zc_cv, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* deadlines come from mrd_now_ns */
    pthread_cond_init(&s->flush_cv, &ca);
    pthread_condattr_destroy(&ca);
    s->zc_pipe[0] = s->zc_pipe[1] = -1;
    s->txq_tail = &s->txq;
    s->start_time = time(NULL);
    int rc = -ENOMEM;
    s->disk_path = strdup(disk_path);
    s->mountpoint = strdup(mountpoint);
    s->sync_buf = malloc(SYNC_CHUNK);
    if (!s->disk_path || !s->mountpoint || !s->sync_buf)
        goto fail;
    uint64_t disk_size;
    rc = mrd_open_disk(disk_path, &disk_size);
    if (rc < 0)
        goto fail;
    s->disk_fd = rc;
    if (size > disk_size) {
        rc = -ENOSPC;
        goto fail;
    }
    s->size = size ? size : disk_size;
    rc = mrd_bitmap_new(s->size, 4096, &s->bm);
    if (rc)
        goto fail;
    *out = s;
    return 0;
fail:
    mrd_server_free(s);
    return rc;
}

int mrd_server_set_peer_timeout(struct mrd_server *s, uint32_t timeout_ms)
{
    if (!s || timeout_ms < 100)
        return -EINVAL;
    s->peer_timeout_ms = timeout_ms;
    return 0;
}

int mrd_server_set_unflushed_limit(struct mrd_server *s, uint64_t max_bytes, uint32_t max_ms)
{
    if (!s || !max_bytes || !max_ms)
        return -EINVAL;
    pthread_mutex_lock(&s->pend_mu);
    s->unfl_max_bytes = max_bytes;
    s->unfl_max_ns = max_ms * 1000000ull;
    pthread_cond_broadcast(&s->flush_cv);
    pthread_mutex_unlock(&s->pend_mu);
    return 0;
}

int mrd_server_set_sync_rate(struct mrd_server *s, uint64_t bytes_per_s)
{
    if (!s)
        return -EINVAL;
    __atomic_store_n(&s->sync_rate_max, bytes_per_s, __ATOMIC_RELAXED);
    return 0;
}

int mrd_server_set_activity_log(struct mrd_server *s, const char *path, uint64_t extent_size,
                                uint32_t slots)
{
    if (!s || !path)
        return -EINVAL;
    if (s->se || s->al)
        return MRD_ESTATE;
    /* A write needs all its extents hot at once (at most 2 for extents of
     * at least MAX_WRITE). */
    if (extent_size && slots < (MAX_WRITE + extent_size - 2) / extent_size + 1)
        return -EINVAL;
    struct mrd_al *al;
    int rc = mrd_al_open(path, extent_size, slots, &al);
    if (rc)
        return rc;
    /* Extents a crash left hot may hold writes the peer never got: resync
     * them (DRBD replays its activity log into the bitmap the same way). */
    uint64_t hot[MRD_AL_MAX_SLOTS];
    long n = mrd_al_hot(al, hot, MRD_AL_MAX_SLOTS);
    for (long i = 0; i < n; i++) {
        uint64_t off = hot[i] * extent_size, len = extent_size;
        if (off >= s->size)
            continue;
        if (len > s->size - off)
            len = s->size - off;
        mrd_bitmap_set_range(s->bm, off, len);
    }
    mrd_al_set_callbacks(al, al_flush, al_keep, s);
    s->al_extent = extent_size;
    s->al = al;
    return 0;
}

/* Aborting the FUSE connection through fusectl is the only way to wake the
 * workers when the file is still open (e.g. a loop device on it), and what
 * makes libfuse's own unmount step quiet once we have unmounted ourselves.
 *
 * fusectl names a connection by the minor of its superblock's device, and
 * that number is freed when the superblock goes (lazy unmount, last file
 * closed) and handed to the next FUSE mount on the machine. Opening
 * .../<minor>/abort when stopping could therefore abort someone else's
 * connection: in the lab, where both appliances share one kernel, the old
 * primary stopping a volume aborted the new primary's volume mounted a
 * moment before with the recycled number, whose reads then failed with EIO
 * mid-failover. So the abort file is opened once, right after the mount,
 * while the number is surely ours, and kept: a write to that descriptor
 * reaches this connection or, once it is gone, nothing (fusectl drops the
 * file's link to its connection when it removes the directory). */
#define FUSECTL_SUPER_MAGIC 0x65735543
static int open_abort_file(dev_t fuse_dev)
{
    const char *dir = "/sys/fs/fuse/connections";
    struct statfs sf;
    if (statfs(dir, &sf) < 0 || sf.f_type != FUSECTL_SUPER_MAGIC)
        mount("fusectl", dir, "fusectl", 0, NULL); /* e.g. in a fresh mount namespace */
    char path[96];
    snprintf(path, sizeof path, "%s/%u/abort", dir, minor(fuse_dev));
    return open(path, O_WRONLY | O_CLOEXEC);
}

static void abort_connection(struct mrd_server *s)
{
    if (s->abort_fd >= 0 && write(s->abort_fd, "1", 1) < 0) {
        /* the connection is already gone */
    }
}

int mrd_server_start(struct mrd_server *s)
{
    if (!s)
        return -EINVAL;
    if (s->se)
        return MRD_ESTATE;
    /* libfuse takes rootmode from the mountpoint's own st_mode: a regular
     * file gives a regular-file root, i.e. the disk appears as that file. */
    int mfd = open(s->mountpoint, O_RDONLY | O_CREAT | O_CLOEXEC, 0600);
    if (mfd < 0)
        return -errno;
    struct stat st;
    int rc = fstat(mfd, &st) < 0 ? -errno : 0;
    close(mfd);
    if (rc)
        return rc;
    if (!S_ISREG(st.st_mode))
        return -EINVAL;

    char *argv[] = {"mirrord", "-o", "allow_other,default_permissions,fsname=mirrord,subtype=mirrord", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, argv);
    s->se = fuse_session_new(&args, &ops, sizeof ops, s);
    fuse_opt_free_args(&args);
    if (!s->se)
        return MRD_EFUSE;
    if (fuse_session_mount(s->se, s->mountpoint) != 0) {
        fuse_session_destroy(s->se);
        s->se = NULL;
        return MRD_EFUSE;
    }
    s->loop_done = 0;
    rc = mrd_thread_start(&s->loop_th, loop_main, s);
    if (rc) {
        fuse_session_unmount(s->se);
        fuse_session_destroy(s->se);
        s->se = NULL;
        return rc;
    }
    s->loop_live = 1;
    /* The connection number (for a forced abort in stop) is the minor of the
     * mounted file's st_dev; this stat is served by the loop just started. */
    if (stat(s->mountpoint, &st) == 0)
        s->abort_fd = open_abort_file(st.st_dev);
    return 0;
}

int mrd_server_attach_peer(struct mrd_server *s, int sock_fd)
{
    if (!s || sock_fd < 0)
        return -EINVAL;
    pthread_mutex_lock(&s->pend_mu);
    int state = s->peer_state, io = s->io_state;
    pthread_mutex_unlock(&s->pend_mu);
    if (state == PEER_CONNECTED || io == IO_FAILED)
        return MRD_ESTATE;
    reap_peer(s);
    reap_sync(s);
    int fd = fcntl(sock_fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    mrd_tune_socket(fd, s->peer_timeout_ms, ACK_POLL_MS);
    pthread_mutex_lock(&s->send_mu);
    /* Without a pipe every payload is copied: slower, nothing else. */
    s->zc_ok = mrd_pipe_for_splice(s->zc_pipe) == 0;
    pthread_mutex_lock(&s->pend_mu);
    s->peer_fd = fd;
    s->peer_state = PEER_CONNECTED;
    /* Nothing this peer holds is known durable yet: the next frame's seq
     * is the marker, so the first flush sends a FLUSH. */
    s->peer_dirty_seq = s->next_seq + 1;
    s->flush_sent_seq = s->peer_durable_seq; /* no FLUSH outstanding here yet */
    pthread_mutex_unlock(&s->pend_mu);
    pthread_mutex_unlock(&s->send_mu);
    int rc = mrd_thread_start(&s->ack_th, ack_main, s);
    if (rc) {
        fail_peer(s, rc, "cannot start the ack reader", 1);
        reap_peer(s);
        return rc;
    }
    s->ack_live = 1;
    rc = mrd_thread_start(&s->flush_th, flusher_main, s);
    if (rc) {
        fail_peer(s, rc, "cannot start the flusher", 1);
        reap_peer(s);
        return rc;
    }
    s->flush_live = 1;
    return 0;
}

int mrd_server_set_fencing(struct mrd_server *s, int on)
{
    if (!s)
        return -EINVAL;
    pthread_mutex_lock(&s->pend_mu);
    s->fencing = !!on;
    pthread_mutex_unlock(&s->pend_mu);
    return 0;
}

int mrd_server_resume(struct mrd_server *s, int how)
{
    if (!s || (how != MRD_RESUME_DEGRADED && how != MRD_RESUME_FAIL))
        return -EINVAL;
    if (how == MRD_RESUME_DEGRADED)
        return release_held(s, IO_NORMAL, -1) == IO_FAILED ? MRD_ESTATE : 0;
    release_held(s, IO_FAILED, -1);
    return 0;
}

int mrd_server_resume_caught_up(struct mrd_server *s, uint64_t peer_failures)
{
    if (!s || peer_failures > INT64_MAX)
        return -EINVAL;
    int was = release_held(s, IO_NORMAL, (int64_t)peer_failures);
    return was == IO_FAILED ? MRD_ESTATE : was < 0 ? MRD_ENOPEER : 0;
}

int mrd_server_detach_peer(struct mrd_server *s)
{
    if (!s)
        return -EINVAL;
    fail_peer(s, 0, "detached", 0);
    reap_sync(s);
    reap_peer(s);
    return 0;
}

/* Where the hole that starts at off ends (at most end, rounded down to the
 * bitmap granularity so a zero frame never half-covers a dirty block), or
 * off when off is data. A disk that cannot say (a block device: SEEK_DATA
 * is refused) is all data: holes are an optimisation, never a guess. */
static uint64_t hole_until(int fd, uint64_t off, uint64_t end, uint64_t gran)
{
    off_t data = lseek(fd, (off_t)off, SEEK_DATA);
    uint64_t stop;
    if (data < 0)
        stop = errno == ENXIO ? end : off; /* ENXIO: no data from off to EOF */
    else
        stop = (uint64_t)data < end ? (uint64_t)data : end;
    if (stop < end)
        stop = stop / gran * gran;
    return stop > off ? stop : off;
}

/* Where the data that starts at off ends: the next hole, rounded up to the
 * bitmap granularity, at most end; end when the disk cannot say. */
static uint64_t data_until(int fd, uint64_t off, uint64_t end, uint64_t gran)
{
    off_t hole = lseek(fd, (off_t)off, SEEK_HOLE);
    if (hole < 0 || (uint64_t)hole >= end)
        return end;
    uint64_t stop = ((uint64_t)hole + gran - 1) / gran * gran;
    return stop < end && stop > off ? stop : end;
}

/* Pacing: a resync must not starve the application.
 *
 * Frames share one TCP stream and the receiver applies them in order, so an
 * application write queued behind resync chunks waits for all of them to
 * be sent, received and written on the peer: with the full window that is
 * 8 MiB ahead of a 4 KiB O_DSYNC write, several milliseconds on any link.
 * DRBD's dynamic controller (c-plan-ahead, c-fill-target) keeps the resync
 * data in flight at a target; ours keys the target on what the application
 * is doing. While it is quiet (no write in the last APP_QUIET_NS) the sync
 * runs at full speed: 1 MiB chunks, SYNC_WINDOW of them in flight. While it
 * writes, the sync sends one SYNC_CHUNK_BUSY chunk at a time, so a write
 * never finds more than 64 KiB of resync data ahead of it, and it gets
 * every gap between chunks. The sync still progresses (an application
 * that writes continuously cannot stop it), only slower. On top, an
 * operator's ceiling (--resync-rate) spaces the chunks so the average stays
 * under it, e.g. to leave a shared link to others; sleeps are sliced so a
 * stop is noticed within 10 ms. */
static void pace(struct mrd_server *s, uint64_t t0, uint64_t sent)
{
    uint64_t rate = __atomic_load_n(&s->sync_rate_max, __ATOMIC_RELAXED);
    if (!rate)
        return;
    uint64_t due = t0 + (uint64_t)((double)sent * 1e9 / (double)rate);
    for (uint64_t now; !s->sync_stop && (now = mrd_now_ns()) < due;) {
        uint64_t ns = due - now < 10000000ull ? due - now : 10000000ull;
        struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
        nanosleep(&ts, NULL);
    }
}

/* One pass over the disk from `from`: every chunk (dirty = 0) or the dirty
 * runs (dirty = 1), copied (compare = 0: SYNC_DATA / SYNC_ZERO) or compared
 * (compare = 1: VERIFY). Returns 1 when it reached the end with the peer
 * still there, 0 when stopped or the peer went away. */
static int sync_pass(struct mrd_server *s, uint64_t from, int dirty, int compare, uint64_t t0, uint64_t *sent)
{
    uint64_t gran = mrd_bitmap_granularity(s->bm);
    uint64_t off = from / gran * gran;
    int finished = 0;
    for (;;) {
        if (s->sync_stop)
            break;
        if (off >= s->size) {
            finished = 1;
            break;
        }
        uint64_t end = ((off >> EXTENT_SHIFT) + 1) << EXTENT_SHIFT;
        if (end > s->size)
            end = s->size;
        if (dirty) {
            int64_t b = mrd_bitmap_find_next_set(s->bm, off / gran, UINT64_MAX);
            if (b < 0) {
                finished = 1;
                break;
            }
            off = (uint64_t)b * gran;
            end = ((off >> EXTENT_SHIFT) + 1) << EXTENT_SHIFT;
            if (end > s->size)
                end = s->size;
            int64_t c = mrd_bitmap_find_next_clear(s->bm, (uint64_t)b, (end + gran - 1) / gran);
            if (c >= 0 && (uint64_t)c * gran < end)
                end = (uint64_t)c * gran;
        }
        int busy = mrd_now_ns() - __atomic_load_n(&s->last_app_write_ns, __ATOMIC_RELAXED) < APP_QUIET_NS;
        uint64_t busy_chunk = gran > SYNC_CHUNK_BUSY ? gran : SYNC_CHUNK_BUSY;
        if (busy && end - off > busy_chunk)
            end = off + busy_chunk;
        int window = busy ? 1 : SYNC_WINDOW;
        pace(s, t0, *sent);
        pthread_mutex_lock(&s->pend_mu);
        while (s->sync_inflight >= window && s->peer_state == PEER_CONNECTED && !s->sync_stop)
            pthread_cond_wait(&s->pend_cv, &s->pend_mu);
        int state = s->peer_state;
        pthread_mutex_unlock(&s->pend_mu);
        if (state != PEER_CONNECTED || s->sync_stop)
            break;

        struct pending *e = calloc(1, sizeof *e);
        if (!e) {
            pthread_mutex_lock(&s->pend_mu);
            set_error_locked(s, "sync: out of memory");
            pthread_mutex_unlock(&s->pend_mu);
            break;
        }
        e->kind = P_SYNC;
        e->off = off;
        e->len = (uint32_t)(end - off);
        struct held idx;
        extents_lock(s, e->off, e->len, &idx);
        /* Under the extent lock, so no write to this range is half done:
         * a hole now is a hole the peer may be given as zeros. */
        uint64_t hole_end = compare ? e->off : hole_until(s->disk_fd, e->off, end, gran);
        int rc = 0;
        if (compare) {
            /* Read under the lock, so the replica (which applies frames in
             * order) is compared with exactly what this disk held. */
            uint8_t vp[MRD_FRAME_VERIFY_PAYLOAD];
            e->verify = 1;
            e->checksum = dirty; /* a checksum sync's compare: SAME clears the bits */
            rc = mrd_pread_all(s->disk_fd, s->sync_buf, e->len, e->off);
            if (!rc) {
                mrd_frame_verify_payload(vp, e->len, mrd_crc32c(0, s->sync_buf, e->len));
                rc = peer_send(s, e, MRD_FRAME_VERIFY, 0, vp);
            }
        } else if (hole_end > e->off) {
            uint8_t zp[MRD_FRAME_ZERO_PAYLOAD];
            e->len = (uint32_t)(hole_end - e->off);
            e->zero = 1;
            end = hole_end;
            mrd_frame_zero_payload(zp, e->len);
            rc = peer_send(s, e, MRD_FRAME_SYNC_ZERO, 0, zp);
        } else {
            /* Data up to the next hole only: the hole goes as zeros next, so
             * the replica is allocated where the primary is and nowhere else. */
            end = data_until(s->disk_fd, e->off, end, gran);
            e->len = (uint32_t)(end - e->off);
            rc = mrd_pread_all(s->disk_fd, s->sync_buf, e->len, e->off);
            if (!rc)
                rc = peer_send(s, e, MRD_FRAME_SYNC_DATA, 0, s->sync_buf);
        }
        extents_unlock(s, &idx);
        if (rc) {
            free(e);
            if (rc != MRD_ENOPEER) {
                pthread_mutex_lock(&s->pend_mu);
                set_error_locked(s, "sync: read at %llu: %s", (unsigned long long)off, mrd_strerror(rc));
                pthread_mutex_unlock(&s->pend_mu);
            }
            break;
        }
        *sent += end - off;
        off = end;
    }
    /* Every chunk answered before the caller looks at the bitmap (a checksum
     * pass's SAME answers clear bits; the copy pass reads them). */
    pthread_mutex_lock(&s->pend_mu);
    while (s->sync_inflight > 0 && s->peer_state == PEER_CONNECTED)
        pthread_cond_wait(&s->pend_cv, &s->pend_mu);
    if (s->peer_state != PEER_CONNECTED)
        finished = 0;
    pthread_mutex_unlock(&s->pend_mu);
    return finished;
}

/* A checksum sync (MRD_SYNC_CHECKSUM) is two passes over the dirty bitmap:
 * first every dirty chunk is compared (VERIFY) and a chunk the peer already
 * holds is cleared, then what is still dirty is copied. Interrupted at any
 * point, the bitmap still marks every chunk not known to be equal, so the
 * next connect resumes correctly with a plain bitmap resync. */
/* A sync ends with a FLUSH: "the secondary is UpToDate" must mean its
 * disk holds the synced data durably, as it does for writes after a flush.
 * SYNC_DATA chunks are not durable on their own, and the daemon may
 * acknowledge writes on the strength of a finished sync (a server that was
 * suspended and whose peer came back: their frames were lost with the old
 * connection and the resync sent their ranges again). 1 once it is acked,
 * 0 if the peer went away first. */
static int sync_flush(struct mrd_server *s)
{
    struct pending *e = calloc(1, sizeof *e);
    if (!e)
        return 0;
    e->kind = P_FLUSH;
    e->sync_flush = 1;
    if (peer_send(s, e, MRD_FRAME_FLUSH, 0, NULL)) {
        free(e);
        return 0;
    }
    pthread_mutex_lock(&s->pend_mu);
    while (s->sync_inflight > 0 && s->peer_state == PEER_CONNECTED)
        pthread_cond_wait(&s->pend_cv, &s->pend_mu);
    int ok = s->peer_state == PEER_CONNECTED;
    pthread_mutex_unlock(&s->pend_mu);
    return ok;
}

static void *sync_main(void *arg)
{
    struct mrd_server *s = arg;
    uint64_t t0 = mrd_now_ns(), sent = 0;
    uint32_t flags = s->sync_flags;
    int dirty_only = flags & (MRD_SYNC_DIRTY_ONLY | MRD_SYNC_CHECKSUM);
    int finished;
    if (flags & MRD_SYNC_VERIFY)
        finished = sync_pass(s, s->sync_from, 0, 1, t0, &sent);
    else if (flags & MRD_SYNC_CHECKSUM)
        finished = sync_pass(s, s->sync_from, 1, 1, t0, &sent) && sync_pass(s, s->sync_from, 1, 0, t0, &sent);
    else
        finished = sync_pass(s, s->sync_from, dirty_only, 0, t0, &sent);
    /* A bit set behind a pass's cursor while it ran (a write that failed
     * locally, op_put) would be missed: passes over what is still dirty
     * follow until one finds nothing, so that done means nothing dirty. */
    uint64_t gran = mrd_bitmap_granularity(s->bm);
    while (finished && !(flags & MRD_SYNC_VERIFY) &&
           mrd_bitmap_find_next_set(s->bm, s->sync_from / gran, UINT64_MAX) >= 0)
        finished = sync_pass(s, s->sync_from, 1, 0, t0, &sent);
    if (finished && !(flags & MRD_SYNC_VERIFY))
        finished = sync_flush(s);
    pthread_mutex_lock(&s->pend_mu);
    s->sync_done = finished && s->peer_state == PEER_CONNECTED;
    if (s->sync_done && !dirty_only)
        s->sync_offset = s->size;
    s->sync_active = 0;
    pthread_mutex_unlock(&s->pend_mu);
    return NULL;
}

int mrd_server_start_sync(struct mrd_server *s, uint64_t from_offset, uint32_t flags)
{
    /* One of: nothing (copy all), DIRTY_ONLY, VERIFY, CHECKSUM. */
    if (!s || (flags != 0 && flags != MRD_SYNC_DIRTY_ONLY && flags != MRD_SYNC_VERIFY && flags != MRD_SYNC_CHECKSUM))
        return -EINVAL;
    if (from_offset > s->size)
        return MRD_ERANGE;
    pthread_mutex_lock(&s->pend_mu);
    int state = s->peer_state, active = s->sync_active;
    pthread_mutex_unlock(&s->pend_mu);
    if (state != PEER_CONNECTED)
        return MRD_ENOPEER;
    if (active)
        return MRD_ESTATE;
    reap_sync(s);
    uint64_t gran = mrd_bitmap_granularity(s->bm);
    pthread_mutex_lock(&s->pend_mu);
    s->sync_from = from_offset / gran * gran;
    s->sync_flags = flags;
    s->sync_stop = 0;
    s->sync_active = 1;
    s->sync_done = 0;
    s->sync_offset = s->sync_from;
    s->bytes_synced = 0;
    s->bytes_zeroed = 0;
    /* Kept through a plain sync: the repair that follows a verify must not erase its count. */
    if (flags & (MRD_SYNC_VERIFY | MRD_SYNC_CHECKSUM)) {
        s->verify_diff_bytes = 0;
        s->bytes_verified = 0;
    }
    s->sync_total = (flags & (MRD_SYNC_DIRTY_ONLY | MRD_SYNC_CHECKSUM)) ? mrd_bitmap_count(s->bm) * gran
                                                                         : s->size - s->sync_from;
    pthread_mutex_unlock(&s->pend_mu);
    int rc = mrd_thread_start(&s->sync_th, sync_main, s);
    if (rc) {
        pthread_mutex_lock(&s->pend_mu);
        s->sync_active = 0;
        pthread_mutex_unlock(&s->pend_mu);
        return rc;
    }
    s->sync_live = 1;
    return 0;
}

int mrd_server_stop_sync(struct mrd_server *s)
{
    if (!s)
        return -EINVAL;
    pthread_mutex_lock(&s->pend_mu);
    s->sync_stop = 1;
    pthread_cond_broadcast(&s->pend_cv);
    pthread_mutex_unlock(&s->pend_mu);
    reap_sync(s);
    return 0;
}

int mrd_server_stats(struct mrd_server *s, struct mrd_server_stats *o)
{
    if (!s || !o)
        return -EINVAL;
    memset(o, 0, sizeof *o);
#define LD(f) __atomic_load_n(&s->f, __ATOMIC_RELAXED)
    o->size = s->size;
    o->writes = LD(writes);
    o->bytes_written = LD(bytes_written);
    o->reads = LD(reads);
    o->bytes_read = LD(bytes_read);
    o->flushes = LD(flushes);
    o->write_errors = LD(write_errors);
    o->max_write_seen = LD(max_write_seen);
    o->frames_sent = LD(frames_sent);
    o->bytes_sent = LD(bytes_sent);
    o->dsync_writes = LD(dsync_writes);
    o->flush_frames = LD(flush_frames);
    o->fdatasyncs = LD(fdatasyncs);
    o->frames_spliced = LD(frames_spliced);
    o->bytes_spliced = LD(bytes_spliced);
#undef LD
    o->dirty_blocks = mrd_bitmap_count(s->bm);
    o->dirty_granularity = mrd_bitmap_granularity(s->bm);
    o->fuse_running = s->se && !__atomic_load_n(&s->loop_done, __ATOMIC_ACQUIRE);
    pthread_mutex_lock(&s->pend_mu);
    o->acked = s->acked;
    o->in_flight = s->in_flight;
    o->ack_latency_ns_total = s->lat_total;
    o->ack_latency_ns_max = s->lat_max;
    o->peer_failures = s->peer_failures;
    o->peer_connected = s->peer_state == PEER_CONNECTED;
    o->sync_active = s->sync_active;
    o->sync_done = s->sync_done;
    o->sync_offset = s->sync_offset;
    o->sync_total = s->sync_total;
    o->bytes_synced = s->bytes_synced;
    o->bytes_zeroed = s->bytes_zeroed;
    o->verify_diff_bytes = s->verify_diff_bytes;
    o->bytes_verified = s->bytes_verified;
    o->verifying = s->sync_active && (s->sync_flags & MRD_SYNC_VERIFY);
    o->held = s->held_n;
    o->suspended = s->io_state == IO_SUSPENDED;
    o->failed_io = s->io_state == IO_FAILED;
    memcpy(o->last_error, s->last_error, sizeof o->last_error);
    pthread_mutex_unlock(&s->pend_mu);
    struct mrd_al_stats al;
    if (s->al && mrd_al_stats(s->al, &al) == 0) {
        o->al_updates = al.updates;
        o->al_waits = al.waits;
        o->al_flushes = al.flushes;
        o->al_hot = al.hot;
        o->al_slots = al.slots;
        o->al_extent_size = al.extent_size;
    }
    return 0;
}

long mrd_server_dirty_nbytes(struct mrd_server *s)
{
    return s ? (long)mrd_bitmap_nbytes(s->bm) : -EINVAL;
}

long mrd_server_dirty_snapshot(struct mrd_server *s, void *buf, long buflen)
{
    if (!s || !buf || buflen < 0)
        return -EINVAL;
    return mrd_bitmap_snapshot(s->bm, buf, (size_t)buflen);
}

int mrd_server_dirty_load(struct mrd_server *s, const void *buf, long buflen)
{
    if (!s || !buf || buflen < 0)
        return -EINVAL;
    if (s->se)
        return MRD_ESTATE;
    return mrd_bitmap_load(s->bm, buf, (size_t)buflen);
}

int64_t mrd_server_dirty_mark(struct mrd_server *s, uint64_t offset, uint64_t len)
{
    if (!s)
        return -EINVAL;
    return mrd_bitmap_set_range(s->bm, offset, len);
}

int mrd_server_debug_corrupt_next(struct mrd_server *s, uint32_t n)
{
    if (!s || n > INT32_MAX)
        return -EINVAL;
    __atomic_store_n(&s->corrupt_next, (int)n, __ATOMIC_RELAXED);
    return 0;
}

static int wait_loop_done(struct mrd_server *s, int ms)
{
    for (int i = 0; i < ms / 10; i++) {
        if (__atomic_load_n(&s->loop_done, __ATOMIC_ACQUIRE))
            return 1;
        usleep(10000);
    }
    return __atomic_load_n(&s->loop_done, __ATOMIC_ACQUIRE);
}

static int stop_serving(struct mrd_server *s)
{
    mrd_server_stop_sync(s);
    /* Give in-flight frames a moment to be acked so a clean stop does not
     * leave dirty blocks behind. */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 2;
    pthread_mutex_lock(&s->pend_mu);
    while (s->in_flight && s->peer_state == PEER_CONNECTED)
        if (pthread_cond_timedwait(&s->pend_cv, &s->pend_mu, &until) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&s->pend_mu);
    /* What the peer acked may still be in its page cache only: losing the
     * connection now would mark it dirty (see "Unflushed ranges"). A FLUSH,
     * and its ack within the peer timeout, make it durable and the stop
     * clean. */
    if (peer_flush_needed(s) && flush_frame(s) == 0) {
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += s->peer_timeout_ms / 1000;
        until.tv_nsec += (long)(s->peer_timeout_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_mutex_lock(&s->pend_mu);
        while (s->peer_durable_seq < s->flush_sent_seq && s->peer_state == PEER_CONNECTED)
            if (pthread_cond_timedwait(&s->pend_cv, &s->pend_mu, &until) == ETIMEDOUT)
                break;
        pthread_mutex_unlock(&s->pend_mu);
    }
    fail_peer(s, 0, "server stopped", 1);
    reap_peer(s);
    /* Never leave a FUSE request unanswered (unmount would wait for it):
     * held ops get EIO, and so does anything that would be held from now. */
    pthread_mutex_lock(&s->pend_mu);
    int suspended = s->io_state == IO_SUSPENDED || s->held_head;
    pthread_mutex_unlock(&s->pend_mu);
    if (suspended)
        release_held(s, IO_FAILED, -1);
    if (!s->se)
        return 0;
    if (s->loop_live) {
        fuse_session_exit(s->se);
        /* Lazy unmount: with no open file the connection goes away at once
         * and the workers see ENODEV. */
        umount2(s->mountpoint, MNT_DETACH);
        if (!wait_loop_done(s, 2000)) {
            abort_connection(s);
            if (!wait_loop_done(s, 3000))
                return -EBUSY;
        }
        pthread_join(s->loop_th, NULL);
        s->loop_live = 0;
        abort_connection(s);
    }
    fuse_session_unmount(s->se);
    fuse_session_destroy(s->se);
    s->se = NULL;
    if (s->abort_fd >= 0) {
        close(s->abort_fd);
        s->abort_fd = -1;
    }
    return 0;
}

int mrd_server_stop(struct mrd_server *s)
{
    if (!s)
        return -EINVAL;
    int rc = stop_serving(s);
    if (rc)
        return rc;
    /* After a clean stop the daemon clears its "crashed primary" flag, and
     * nothing would resync what a power loss then took from this disk's
     * page cache (the peer has it: its FLUSH_ACK came in stop_serving). */
    if (local_flush(s))
        return -EIO; /* last_error says which error */
    if (!s->al)
        return rc;
    /* Clean stop: every write is answered. If the peer also has every one
     * (nothing dirty), no extent can differ: persist an empty log. With
     * dirty blocks the log stays as it is, a superset of the latest hot
     * extents (the dirty bitmap, not the log, tracks writes the peer lost). */
    if (mrd_bitmap_count(s->bm) == 0) {
        rc = mrd_al_clear(s->al);
        if (rc) {
            pthread_mutex_lock(&s->pend_mu);
            set_error_locked(s, "clearing the activity log: %s", mrd_strerror(rc));
            pthread_mutex_unlock(&s->pend_mu);
        }
    }
    return rc;
}

void mrd_server_free(struct mrd_server *s)
{
    if (!s)
        return;
    if (mrd_server_stop(s) == -EBUSY)
        return; /* threads still use s: leaking is the only safe choice */
    if (s->disk_fd >= 0)
        close(s->disk_fd);
    mrd_bitmap_free(s->bm);
    mrd_al_close(s->al);
    free(s->sync_buf);
    free(s->disk_path);
    free(s->mountpoint);
    for (int i = 0; i < NSTRIPES; i++)
        pthread_mutex_destroy(&s->stripes[i]);
    pthread_mutex_destroy(&s->send_mu);
    pthread_mutex_destroy(&s->pend_mu);
    pthread_cond_destroy(&s->pend_cv);
    pthread_cond_destroy(&s->tx_cv);
    pthread_cond_destroy(&s->zc_cv);
    pthread_cond_destroy(&s->flush_cv);
    free(s->unfl);
    free(s);
}
