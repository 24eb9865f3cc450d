#define _GNU_SOURCE
#include "receiver.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"
#include "crc32c.h"
#include "frame.h"
#include "netio.h"

#define ACK_BATCH 32

struct mrd_receiver {
    int disk_fd, sock_fd;
    uint64_t size;
    pthread_t th;
    int th_live;
    volatile int stop;
    pthread_mutex_t mu; /* stats snapshot consistency + last_error */
    struct mrd_receiver_stats st;
    uint8_t *buf;
    uint8_t acks[ACK_BATCH * MRD_FRAME_HEADER_SIZE];
    int nacks;
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
    int rc = mrd_send_all(r->sock_fd, &iov, 1);
    pthread_mutex_lock(&r->mu);
    r->st.acks_sent += (uint64_t)r->nacks;
    pthread_mutex_unlock(&r->mu);
    r->nacks = 0;
    return rc;
}

static int queue_ack(struct mrd_receiver *r, uint16_t type, const struct mrd_frame_header *h)
{
    mrd_frame_encode(r->acks + r->nacks * MRD_FRAME_HEADER_SIZE, type, 0, h->seq, h->offset, NULL, 0);
    r->nacks++;
    return r->nacks == ACK_BATCH ? flush_acks(r) : 0;
}

/* Batch acks only while another whole header is already waiting: an ack
 * never waits for data that has not arrived yet. */
static int more_input_waiting(int fd)
{
    int n = 0;
    return ioctl(fd, FIONREAD, &n) == 0 && n >= MRD_FRAME_HEADER_SIZE;
}

/* SYNC_ZERO / VERIFY: the range their payload (in r->buf) names, checked
 * against the replica; on error it is recorded and returned. */
static int payload_range(struct mrd_receiver *r, const struct mrd_frame_header *h, uint64_t *n)
{
    *n = mrd_frame_zero_length(r->buf);
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

static void *rx_main(void *arg)
{
    struct mrd_receiver *r = arg;
    uint8_t raw[MRD_FRAME_HEADER_SIZE];
    struct mrd_frame_header h;
    int rc;
    for (;;) {
        rc = mrd_recv_all(r->sock_fd, raw, sizeof raw, &r->stop);
        if (rc) {
            set_error(r, rc, rc == -ECONNRESET ? "peer closed the connection" : "receive header");
            break;
        }
        rc = mrd_frame_decode(raw, sizeof raw, &h);
        if (rc) {
            set_error(r, rc, "bad frame header");
            break;
        }
        /* Check the CRC piece by piece as the payload arrives, while the
         * data is still in cache and the sender is still sending. */
        uint32_t crc = mrd_frame_header_crc(raw);
        size_t got = 0;
        while (got < h.length) {
            ssize_t n = recv(r->sock_fd, r->buf + got, h.length - got, 0);
            if (n > 0) {
                crc = mrd_crc32c(crc, r->buf + got, (size_t)n);
                got += (size_t)n;
            } else if (n == 0) {
                rc = -ECONNRESET;
                break;
            } else if (errno == EINTR || (errno == EAGAIN && !r->stop)) {
                continue;
            } else {
                rc = -errno;
                break;
            }
        }
        if (got < h.length) {
            set_error(r, rc, "receive payload");
            break;
        }
        if (crc != h.crc) {
            char what[96];
            snprintf(what, sizeof what, "frame seq %llu at offset %llu", (unsigned long long)h.seq,
                     (unsigned long long)h.offset);
            set_error(r, MRD_ECRC, what);
            break;
        }
        switch (h.type) {
        case MRD_FRAME_SYNC_ZERO: {
            uint64_t n;
            rc = payload_range(r, &h, &n);
            if (rc)
                goto out;
            rc = mrd_zero_range(r->disk_fd, h.offset, n);
            if (rc) {
                set_error(r, rc, "zeroing a range of the replica");
                goto out;
            }
            pthread_mutex_lock(&r->mu);
            r->st.bytes_zeroed += n;
            pthread_mutex_unlock(&r->mu);
            rc = queue_ack(r, MRD_FRAME_SYNC_ACK, &h);
            break;
        }
        case MRD_FRAME_VERIFY: {
            uint64_t n;
            uint32_t theirs = mrd_frame_verify_crc(r->buf);
            rc = payload_range(r, &h, &n);
            if (rc)
                goto out;
            rc = mrd_pread_all(r->disk_fd, r->buf, n, h.offset);
            if (rc) {
                set_error(r, rc, "reading the replica to verify it");
                goto out;
            }
            int same = mrd_crc32c(0, r->buf, n) == theirs;
            pthread_mutex_lock(&r->mu);
            r->st.bytes_verified += n;
            if (!same)
                r->st.verify_diffs++;
            pthread_mutex_unlock(&r->mu);
            rc = queue_ack(r, same ? MRD_FRAME_VERIFY_SAME : MRD_FRAME_VERIFY_DIFF, &h);
            break;
        }
        case MRD_FRAME_WRITE:
        case MRD_FRAME_SYNC_DATA:
            if (h.offset > r->size || h.length > r->size - h.offset) {
                rc = MRD_ERANGE;
                set_error(r, rc, "write past the end of the replica");
                goto out;
            }
            /* F_SYNC: durable before the ack (this frame only: earlier
             * frames still wait for a FLUSH). */
            rc = (h.flags & MRD_FRAME_F_SYNC)
                     ? mrd_pwrite_all_dsync(r->disk_fd, r->buf, h.length, h.offset)
                     : mrd_pwrite_all(r->disk_fd, r->buf, h.length, h.offset);
            if (rc) {
                set_error(r, rc, (h.flags & MRD_FRAME_F_SYNC) ? "durable write to the replica"
                                                              : "pwrite to the replica");
                goto out;
            }
            rc = queue_ack(r, h.type == MRD_FRAME_WRITE ? MRD_FRAME_WRITE_ACK : MRD_FRAME_SYNC_ACK, &h);
            break;
        case MRD_FRAME_FLUSH:
            if (fdatasync(r->disk_fd) < 0) {
                rc = -errno;
                set_error(r, rc, "fdatasync of the replica");
                goto out;
            }
            rc = queue_ack(r, MRD_FRAME_FLUSH_ACK, &h);
            break;
        case MRD_FRAME_PING:
            rc = queue_ack(r, MRD_FRAME_PONG, &h);
            break;
        default:
            rc = MRD_EPROTO;
            set_error(r, rc, "unexpected frame type from the primary");
            goto out;
        }
        pthread_mutex_lock(&r->mu);
        r->st.frames++;
        r->st.last_seq = h.seq;
        if (h.type == MRD_FRAME_WRITE)
            r->st.writes++;
        else if (h.type == MRD_FRAME_SYNC_DATA || h.type == MRD_FRAME_SYNC_ZERO)
            r->st.syncs++;
        else if (h.type == MRD_FRAME_FLUSH)
            r->st.flushes++;
        if (h.flags & MRD_FRAME_F_SYNC)
            r->st.durable_writes++;
        if (h.type != MRD_FRAME_SYNC_ZERO && h.type != MRD_FRAME_VERIFY)
            r->st.bytes_applied += h.length;
        pthread_mutex_unlock(&r->mu);
        if (!rc && (h.length >= 65536 || !more_input_waiting(r->sock_fd)))
            rc = flush_acks(r);
        if (rc) {
            set_error(r, rc, "send ack");
            break;
        }
    }
out:
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
    if (!r->buf) {
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
    rc = mrd_thread_start(&r->th, rx_main, r);
    if (rc)
        goto fail;
    r->th_live = 1;
    *out = r;
    return 0;
fail:
    if (r->sock_fd >= 0)
        close(r->sock_fd);
    if (r->disk_fd >= 0)
        close(r->disk_fd);
    free(r->buf);
    pthread_mutex_destroy(&r->mu);
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
    pthread_mutex_destroy(&r->mu);
    free(r);
}
