/* Secondary side: apply the primary's frames to the local replica.
 *
 * One C thread reads frames in order, checks each (magic, type, length bound,
 * CRC32C, range) before touching the disk, applies WRITE/SYNC_DATA with pwrite
 * in arrival order (SYNC_ZERO: the range made to read as zeros; VERIFY:
 * the range read and its CRC32C compared with the primary's), and
 * acknowledges by sequence number; FLUSH is answered
 * after fdatasync, so its ack covers every frame before it. That fdatasync
 * runs on a second thread, so the frames behind a FLUSH are applied and
 * acked meanwhile (their acks may overtake its FLUSH_ACK). A data frame
 * flagged MRD_FRAME_F_SYNC is written durably (RWF_DSYNC) before its ack. Any bad frame
 * drops the connection: bad data is never written. */
#ifndef MIRRORD_RECEIVER_H
#define MIRRORD_RECEIVER_H
#include <stdint.h>

struct mrd_receiver;

struct mrd_receiver_stats {
    uint64_t frames;        /* frames received and accepted */
    uint64_t writes;        /* WRITE frames applied */
    uint64_t syncs;         /* SYNC_DATA frames applied */
    uint64_t flushes;       /* FLUSH frames answered */
    uint64_t bytes_applied; /* payload bytes pwritten */
    uint64_t acks_sent;
    uint64_t crc_errors;
    uint64_t protocol_errors;
    uint64_t last_seq;
    uint64_t durable_writes; /* data frames flagged F_SYNC, applied durably */
    uint64_t bytes_zeroed;   /* bytes made zero by SYNC_ZERO frames */
    uint64_t bytes_verified; /* bytes compared for VERIFY frames */
    uint64_t verify_diffs;   /* VERIFY frames answered VERIFY_DIFF */
    int32_t connected;      /* 1 while the thread is reading */
    int32_t error_code;     /* the code that ended the connection, 0 if none */
    char last_error[256];
};

/* Open disk_path (O_RDWR), dup sock_fd and start the thread. size is the
 * replica size to accept writes into (0: the whole disk; larger than the
 * disk: -ENOSPC). The caller keeps its own sock_fd and may close it, but must
 * not read from or write to the socket afterwards. */
int mrd_receiver_start(const char *disk_path, uint64_t size, int sock_fd,
                       struct mrd_receiver **out);
int mrd_receiver_stats(struct mrd_receiver *r, struct mrd_receiver_stats *out);
/* Close the connection, join the thread (idempotent). */
int mrd_receiver_stop(struct mrd_receiver *r);
/* stop + release everything. */
void mrd_receiver_free(struct mrd_receiver *r);

#endif
