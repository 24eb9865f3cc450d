#define _GNU_SOURCE
#include "receiver.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"
#include "crc32c.h"
#include "frame.h"
#include "netio.h"

#define ACK_BATCH 32
/* Input is read in bulk: one recv brings every frame already on the socket
 * (sixteen concurrent 4 KiB writers cost one recv, not two per frame). A
 * frame larger than the buffer goes to buf piece by piece instead. */
#define RX_BUF (256u << 10)
/* How long an applied frame's ack may wait for others to share its send
 * while more input is still being applied. */
#define ACK_DELAY_NS 50000ull
/* FLUSHes the flusher thread may have waiting (see flush_main); the primary
 * has at most one of its own outstanding, plus one per fsync in progress. */
#define FLUSH_QUEUE 64

struct mrd_receiver {
    int disk_fd, sock_fd;
    uint64_t size;
    pthread_t th;
    int th_live;
    volatile int stop;
    pthread_mutex_t mu; /* stats snapshot consistency + last_error */
    struct mrd_receiver_stats st;
    uint8_t *buf; /* a large frame's payload; VERIFY's read of the replica */
    uint8_t *in;  /* bytes received, not yet consumed: in[pos, end) */
    size_t pos, end;
    uint8_t acks[ACK_BATCH * MRD_FRAME_HEADER_SIZE];
    int nacks;
    uint64_t first_ack_ns; /* when the oldest queued ack was queued */
    /* The reader's ack batches and the flusher's FLUSH_ACKs share the
     * socket: send_mu makes each send whole. */
    pthread_mutex_t send_mu;
    /* FLUSHes handed to the flusher thread, under fmu: fq[fq_head ..
     * fq_head + fq_n) in arrival order. f_stop ends it (set by the reader
     * when it ends, or by the flusher itself after a failed fdatasync,
     * with f_err). */
    pthread_mutex_t fmu;
    pthread_cond_t fcv;
    struct mrd_frame_header fq[FLUSH_QUEUE];
    int fq_head, fq_n, f_stop, f_err;
    pthread_t fth;
    int fth_live;
};

static void set_error(struct mrd_receiver *r, int code, const char *what)
{
    pthread_mutex_lock(&r->mu);
    if (code == MRD_ECRC)
        r->st.crc_errors++;
    else if (code <= -MRD_E_BASE)
        r->st.protocol_errors++;
    r->st.error_code = code;
    snprintf(r->st.last_error, sizeof r->st.last_error, "%s: %s", what, mrd_strerror(code));
    pthread_mutex_unlock(&r->mu);
}

static int flush_acks(struct mrd_receiver *r)
{
    if (!r->nacks)
        return 0;
    struct iovec iov = {r->acks, (size_t)r->nacks * MRD_FRAME_HEADER_SIZE};
    pthread_mutex_lock(&r->send_mu);
    int rc = mrd_send_all(r->sock_fd, &iov, 1);
    pthread_mutex_unlock(&r->send_mu);
    pthread_mutex_lock(&r->mu);
    r->st.acks_sent += (uint64_t)r->nacks;
    pthread_mutex_unlock(&r->mu);
    r->nacks = 0;
    if (rc)
        set_error(r, rc, "send ack");
    return rc;
}

static void queue_ack(struct mrd_receiver *r, uint16_t type, const struct mrd_frame_header *h)
{
    if (!r->nacks)
        r->first_ack_ns = mrd_now_ns();
    mrd_frame_encode(r->acks + r->nacks * MRD_FRAME_HEADER_SIZE, type, 0, h->seq, h->offset, NULL, 0);
    r->nacks++;
}

/* One recv into in[end, RX_BUF): > 0 bytes added, or an error (recorded),
 * -ECONNRESET at the end of the stream. */
static ssize_t rx_recv(struct mrd_receiver *r, const char *what)
{
    for (;;) {
        ssize_t n = recv(r->sock_fd, r->in + r->end, RX_BUF - r->end, 0);
        if (n > 0) {
            r->end += (size_t)n;
            return n;
        }
        int rc = n == 0 ? -ECONNRESET : -errno;
        if (rc == -EINTR || (rc == -EAGAIN && !r->stop))
            continue;
        set_error(r, rc, rc == -ECONNRESET && r->pos == r->end ? "peer closed the connection" : what);
        return rc;
    }
}

/* Make n bytes (n <= RX_BUF) available at in + pos. What has already
 * arrived is taken without waiting; before anything that would wait (or
 * end the stream), every queued ack goes out: an ack never waits for data
 * that is not there yet. 0 or an error (recorded). */
static int rx_need(struct mrd_receiver *r, size_t n, const char *what)
{
    while (r->end - r->pos < n) {
        if (r->pos == r->end) {
            r->pos = r->end = 0;
        } else if (RX_BUF - r->pos < n) {
            memmove(r->in, r->in + r->pos, r->end - r->pos);
            r->end -= r->pos;
            r->pos = 0;
        }
        ssize_t got = recv(r->sock_fd, r->in + r->end, RX_BUF - r->end, MSG_DONTWAIT);
        if (got > 0) {
            r->end += (size_t)got;
            continue;
        }
        int rc = flush_acks(r);
        if (rc)
            return rc;
        got = rx_recv(r, what);
        if (got < 0)
            return (int)got;
    }
    return 0;
}

/* The payload of the frame whose header was just consumed: in the input
 * buffer when it fits there, else gathered into r->buf (what is buffered,
 * then straight from the socket), its CRC computed piece by piece while the
 * data is still in cache. Sets *payload; 0 or an error (recorded). */
static int rx_payload(struct mrd_receiver *r, const struct mrd_frame_header *h, const uint8_t *raw,
                      const uint8_t **payload)
{
    uint32_t crc = mrd_frame_header_crc(raw);
    if (h->length <= RX_BUF) {
        int rc = rx_need(r, h->length, "receive payload");
        if (rc)
            return rc;
        *payload = r->in + r->pos;
        crc = mrd_crc32c(crc, *payload, h->length);
        r->pos += h->length;
    } else {
        size_t got = r->end - r->pos;
        memcpy(r->buf, r->in + r->pos, got);
        crc = mrd_crc32c(crc, r->buf, got);
        r->pos = r->end = 0;
        while (got < h->length) {
            ssize_t n = recv(r->sock_fd, r->buf + got, h->length - got, 0);
            if (n > 0) {
                crc = mrd_crc32c(crc, r->buf + got, (size_t)n);
                got += (size_t)n;
                continue;
            }
            int rc = n == 0 ? -ECONNRESET : -errno;
            if (rc == -EINTR || (rc == -EAGAIN && !r->stop))
                continue;
            set_error(r, rc, "receive payload");
            return rc;
        }
        *payload = r->buf;
    }
    if (crc != h->crc) {
        char what[96];
        snprintf(what, sizeof what, "frame seq %llu at offset %llu", (unsigned long long)h->seq,
                 (unsigned long long)h->offset);
        set_error(r, MRD_ECRC, what);
        return MRD_ECRC;
    }
    return 0;
}

/* SYNC_ZERO / VERIFY: the range their payload names, checked against the
 * replica; on error it is recorded and returned. */
static int payload_range(struct mrd_receiver *r, const struct mrd_frame_header *h, const uint8_t *payload,
                         uint64_t *n)
{
    *n = mrd_frame_zero_length(payload);
    if (*n == 0 || *n > MRD_FRAME_MAX_PAYLOAD) {
        set_error(r, MRD_ELEN, "bad range length");
        return MRD_ELEN;
    }
    if (h->offset > r->size || *n > r->size - h->offset) {
        set_error(r, MRD_ERANGE, "range past the end of the replica");
        return MRD_ERANGE;
    }
    return 0;
}

/* Check, apply and queue the ack for one frame whose payload has arrived
 * and passed its CRC. 0 or an error (recorded): nothing of it was applied
 * unless the error is the disk's own. */
static int apply_frame(struct mrd_receiver *r, const struct mrd_frame_header *h, const uint8_t *payload)
{
    int rc;
    uint64_t n;
    switch (h->type) {
    case MRD_FRAME_SYNC_ZERO:
        rc = payload_range(r, h, payload, &n);
        if (rc)
            return rc;
        rc = mrd_zero_range(r->disk_fd, h->offset, n);
        if (rc) {
            set_error(r, rc, "zeroing a range of the replica");
            return rc;
        }
        pthread_mutex_lock(&r->mu);
        r->st.bytes_zeroed += n;
        pthread_mutex_unlock(&r->mu);
        queue_ack(r, MRD_FRAME_SYNC_ACK, h);
        return 0;
    case MRD_FRAME_VERIFY: {
        uint32_t theirs = mrd_frame_verify_crc(payload);
        rc = payload_range(r, h, payload, &n);
        if (rc)
            return rc;
        rc = mrd_pread_all(r->disk_fd, r->buf, n, h->offset);
        if (rc) {
            set_error(r, rc, "reading the replica to verify it");
            return rc;
        }
        int same = mrd_crc32c(0, r->buf, n) == theirs;
        pthread_mutex_lock(&r->mu);
        r->st.bytes_verified += n;
        if (!same)
            r->st.verify_diffs++;
        pthread_mutex_unlock(&r->mu);
        queue_ack(r, same ? MRD_FRAME_VERIFY_SAME : MRD_FRAME_VERIFY_DIFF, h);
        return 0;
    }
    case MRD_FRAME_WRITE:
    case MRD_FRAME_SYNC_DATA:
        if (h->offset > r->size || h->length > r->size - h->offset) {
            set_error(r, MRD_ERANGE, "write past the end of the replica");
            return MRD_ERANGE;
        }
        /* F_SYNC: durable before the ack (this frame only: earlier frames
         * still wait for a FLUSH). */
        rc = (h->flags & MRD_FRAME_F_SYNC) ? mrd_pwrite_all_dsync(r->disk_fd, payload, h->length, h->offset)
                                           : mrd_pwrite_all(r->disk_fd, payload, h->length, h->offset);
        if (rc) {
            set_error(r, rc, (h->flags & MRD_FRAME_F_SYNC) ? "durable write to the replica" : "pwrite to the replica");
            return rc;
        }
        queue_ack(r, h->type == MRD_FRAME_WRITE ? MRD_FRAME_WRITE_ACK : MRD_FRAME_SYNC_ACK, h);
        return 0;
    case MRD_FRAME_FLUSH:
        /* Answered by the flusher (flush_main), so that frames behind it
         * are applied and acked while it runs; the acks of the frames
         * before it go out first, so its FLUSH_ACK never overtakes them. */
        rc = flush_acks(r);
        if (rc)
            return rc;
        pthread_mutex_lock(&r->fmu);
        while (r->fq_n == FLUSH_QUEUE && !r->f_stop)
            pthread_cond_wait(&r->fcv, &r->fmu);
        rc = r->f_err;
        if (!r->f_stop) {
            r->fq[(r->fq_head + r->fq_n) % FLUSH_QUEUE] = *h;
            r->fq_n++;
            pthread_cond_broadcast(&r->fcv);
        }
        pthread_mutex_unlock(&r->fmu);
        return rc;
    case MRD_FRAME_PING:
        queue_ack(r, MRD_FRAME_PONG, h);
        return 0;
    default:
        set_error(r, MRD_EPROTO, "unexpected frame type from the primary");
        return MRD_EPROTO;
    }
}

/* The flusher. An fdatasync in the reader would hold up every frame
 * behind the FLUSH: the writes queued after a FLUSH the primary sends on its
 * own (ext/server.c, "Unflushed ranges") waited 100+ ms for a second's
 * random 4 KiB writes to reach the disk. Here it runs beside the reader.
 * A FLUSH_ACK still covers every frame before its FLUSH: the reader hands
 * a FLUSH over only after it pwrote every earlier frame, and the fdatasync
 * that answers it starts after the hand-over. Later frames' acks may now
 * overtake it; the primary matches acks by seq. One fdatasync answers
 * every FLUSH handed over before it started. */
static void *flush_main(void *arg)
{
    struct mrd_receiver *r = arg;
    uint8_t acks[FLUSH_QUEUE * MRD_FRAME_HEADER_SIZE];
    pthread_mutex_lock(&r->fmu);
    for (;;) {
        while (!r->fq_n && !r->f_stop)
            pthread_cond_wait(&r->fcv, &r->fmu);
        if (!r->fq_n || r->f_err) /* stopping: what was handed over is answered first */
            break;
        int n = r->fq_n;
        pthread_mutex_unlock(&r->fmu);
        int rc = fdatasync(r->disk_fd) < 0 ? -errno : 0;
        if (rc)
            set_error(r, rc, "fdatasync of the replica");
        pthread_mutex_lock(&r->fmu);
        if (rc) {
            r->f_err = rc;
            r->f_stop = 1;
            pthread_cond_broadcast(&r->fcv);
            shutdown(r->sock_fd, SHUT_RDWR); /* the reader ends, the primary sees the loss */
            break;
        }
        for (int i = 0; i < n; i++) {
            const struct mrd_frame_header *h = &r->fq[r->fq_head];
            mrd_frame_encode(acks + i * MRD_FRAME_HEADER_SIZE, MRD_FRAME_FLUSH_ACK, 0, h->seq, h->offset, NULL, 0);
            r->fq_head = (r->fq_head + 1) % FLUSH_QUEUE;
        }
        r->fq_n -= n;
        pthread_cond_broadcast(&r->fcv); /* room for a reader waiting to hand one over */
        pthread_mutex_unlock(&r->fmu);
        pthread_mutex_lock(&r->mu);
        r->st.flushes += (uint64_t)n;
        r->st.acks_sent += (uint64_t)n;
        pthread_mutex_unlock(&r->mu);
        struct iovec iov = {acks, (size_t)n * MRD_FRAME_HEADER_SIZE};
        pthread_mutex_lock(&r->send_mu);
        rc = mrd_send_all(r->sock_fd, &iov, 1);
        pthread_mutex_unlock(&r->send_mu);
        pthread_mutex_lock(&r->fmu);
        if (rc) {
            if (!r->f_stop) /* else the reader's end already says why */
                set_error(r, rc, "send ack");
            r->f_err = rc;
            r->f_stop = 1;
            pthread_cond_broadcast(&r->fcv);
            shutdown(r->sock_fd, SHUT_RDWR);
            break;
        }
    }
    pthread_mutex_unlock(&r->fmu);
    return NULL;
}

static void *rx_main(void *arg)
{
    struct mrd_receiver *r = arg;
    uint8_t raw[MRD_FRAME_HEADER_SIZE];
    struct mrd_frame_header h;
    const uint8_t *payload = NULL;
    for (;;) {
        if (rx_need(r, sizeof raw, "receive header"))
            break;
        memcpy(raw, r->in + r->pos, sizeof raw);
        r->pos += sizeof raw;
        int rc = mrd_frame_decode(raw, sizeof raw, &h);
        if (rc) {
            set_error(r, rc, "bad frame header");
            break;
        }
        if (rx_payload(r, &h, raw, &payload))
            break;
        /* Stopped: apply nothing more. Nothing unapplied has been acked, and
         * the primary resends what was not; a frame applied after the next
         * session began could overwrite what that session's resync sent
         * (mirrord/replication/secondary.py, "Sessions"). */
        if (r->stop || apply_frame(r, &h, payload))
            break;
        pthread_mutex_lock(&r->mu);
        r->st.frames++;
        r->st.last_seq = h.seq;
        if (h.type == MRD_FRAME_WRITE)
            r->st.writes++;
        else if (h.type == MRD_FRAME_SYNC_DATA || h.type == MRD_FRAME_SYNC_ZERO)
            r->st.syncs++;
        if (h.flags & MRD_FRAME_F_SYNC)
            r->st.durable_writes++;
        if (h.type != MRD_FRAME_SYNC_ZERO && h.type != MRD_FRAME_VERIFY)
            r->st.bytes_applied += h.length;
        pthread_mutex_unlock(&r->mu);
        /* Acks wait for more input to share one send (rx_need sends them
         * before it waits), but not past a large frame, a full batch or
         * ACK_DELAY_NS. */
        if ((h.length >= 65536 || r->nacks == ACK_BATCH || mrd_now_ns() - r->first_ack_ns > ACK_DELAY_NS) &&
            flush_acks(r))
            break;
        /* Write-behind, as on the primary (ext/server.c), once the ack is
         * out: the FLUSH that follows a large write or a full sync then finds
         * little left to write. */
        if ((h.type == MRD_FRAME_WRITE || h.type == MRD_FRAME_SYNC_DATA) && !(h.flags & MRD_FRAME_F_SYNC) &&
            h.length >= MRD_WRITE_BEHIND_MIN)
            mrd_start_writeback(r->disk_fd, h.offset, h.length);
    }
    /* FLUSHes already handed over are answered before the connection goes
     * (a FLUSH the reader applied is acked, as before the flusher). */
    pthread_mutex_lock(&r->fmu);
    r->f_stop = 1;
    pthread_cond_broadcast(&r->fcv);
    pthread_mutex_unlock(&r->fmu);
    pthread_join(r->fth, NULL);
    r->fth_live = 0;
    /* Everything applied so far has been written; acks not sent are simply
     * lost with the connection (the primary marks those blocks dirty). */
    shutdown(r->sock_fd, SHUT_RDWR);
    pthread_mutex_lock(&r->mu);
    r->st.connected = 0;
    if (r->stop && r->st.error_code != MRD_ECRC) {
        r->st.error_code = 0; /* a requested stop is not an error */
        snprintf(r->st.last_error, sizeof r->st.last_error, "stopped");
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

int mrd_receiver_start(const char *disk_path, uint64_t size, int sock_fd, struct mrd_receiver **out)
{
    if (!disk_path || !out || sock_fd < 0)
        return -EINVAL;
    struct mrd_receiver *r = calloc(1, sizeof *r);
    if (!r)
        return -ENOMEM;
    r->disk_fd = r->sock_fd = -1;
    pthread_mutex_init(&r->mu, NULL);
    pthread_mutex_init(&r->send_mu, NULL);
    pthread_mutex_init(&r->fmu, NULL);
    pthread_cond_init(&r->fcv, NULL);
    uint64_t disk_size;
    int rc = mrd_open_disk(disk_path, &disk_size);
    if (rc < 0)
        goto fail;
    r->disk_fd = rc;
    if (size > disk_size) {
        rc = -ENOSPC;
        goto fail;
    }
    r->size = size ? size : disk_size;
    r->buf = malloc(MRD_FRAME_MAX_PAYLOAD);
    r->in = malloc(RX_BUF);
    if (!r->buf || !r->in) {
        rc = -ENOMEM;
        goto fail;
    }
    r->sock_fd = fcntl(sock_fd, F_DUPFD_CLOEXEC, 0);
    if (r->sock_fd < 0) {
        rc = -errno;
        goto fail;
    }
    /* No send timeout beyond TCP's own: acks are small; a receive poll lets
     * stop() be noticed even if shutdown() raced with a blocked recv. */
    mrd_tune_socket(r->sock_fd, 30000, 500);
    r->st.connected = 1;
    rc = mrd_thread_start(&r->fth, flush_main, r);
    if (rc)
        goto fail;
    r->fth_live = 1;
    rc = mrd_thread_start(&r->th, rx_main, r);
    if (rc)
        goto fail;
    r->th_live = 1;
    *out = r;
    return 0;
fail:
    if (r->fth_live) {
        pthread_mutex_lock(&r->fmu);
        r->f_stop = 1;
        pthread_cond_broadcast(&r->fcv);
        pthread_mutex_unlock(&r->fmu);
        pthread_join(r->fth, NULL);
    }
    if (r->sock_fd >= 0)
        close(r->sock_fd);
    if (r->disk_fd >= 0)
        close(r->disk_fd);
    free(r->buf);
    free(r->in);
    pthread_mutex_destroy(&r->mu);
    pthread_mutex_destroy(&r->send_mu);
    pthread_mutex_destroy(&r->fmu);
    pthread_cond_destroy(&r->fcv);
    free(r);
    return rc;
}

int mrd_receiver_stats(struct mrd_receiver *r, struct mrd_receiver_stats *out)
{
    if (!r || !out)
        return -EINVAL;
    pthread_mutex_lock(&r->mu);
    *out = r->st;
    pthread_mutex_unlock(&r->mu);
    return 0;
}

int mrd_receiver_stop(struct mrd_receiver *r)
{
    if (!r)
        return -EINVAL;
    if (r->th_live) {
        r->stop = 1;
        shutdown(r->sock_fd, SHUT_RDWR);
        pthread_join(r->th, NULL);
        r->th_live = 0;
    }
    if (r->sock_fd >= 0) {
        close(r->sock_fd);
        r->sock_fd = -1;
    }
    return 0;
}

void mrd_receiver_free(struct mrd_receiver *r)
{
    if (!r)
        return;
    mrd_receiver_stop(r);
    if (r->disk_fd >= 0)
        close(r->disk_fd);
    free(r->buf);
    free(r->in);
    pthread_mutex_destroy(&r->mu);
    pthread_mutex_destroy(&r->send_mu);
    pthread_mutex_destroy(&r->fmu);
    pthread_cond_destroy(&r->fcv);
    free(r);
}
