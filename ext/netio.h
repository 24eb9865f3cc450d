/* Internal helpers shared by server.c and receiver.c (not exported to Python). */
#ifndef MIRRORD_NETIO_H
#define MIRRORD_NETIO_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <pthread.h>

/* Open a disk (image file or block device) O_RDWR|O_CLOEXEC and report its
 * size. Returns the fd or a negative errno. */
int mrd_open_disk(const char *path, uint64_t *size_out);

/* Full-length positional I/O, retrying short transfers and EINTR.
 * Return 0 or a negative errno (-EIO for an unexpected end of file). */
int mrd_pwrite_all(int fd, const void *buf, size_t len, uint64_t off);
int mrd_pread_all(int fd, void *buf, size_t len, uint64_t off);

/* mrd_pwrite_all, durable when it returns 0 (data and what is needed to
 * read it back): pwritev2(RWF_DSYNC), which syncs just this range, or
 * pwrite + fdatasync where the kernel or file refuses RWF_DSYNC. */
int mrd_pwrite_all_dsync(int fd, const void *buf, size_t len, uint64_t off);

/* Write-behind: start writing [off, off + len) of fd's page cache to the
 * disk now, without waiting for it (sync_file_range WRITE). A hint only:
 * nothing becomes durable before an fdatasync, and an error of that
 * writeback is reported by the next fdatasync, so none is returned here. */
void mrd_start_writeback(int fd, uint64_t off, uint64_t len);
/* Writes (primary) and applied data frames (receiver) at least this large
 * start their own writeback; smaller ones are left for the kernel to merge. */
#define MRD_WRITE_BEHIND_MIN (256u << 10)

/* Make [off, off + len) read as zeros: a punched hole (the replica stays as
 * sparse as the primary), else FALLOC_FL_ZERO_RANGE, else written zeros.
 * 0 or -errno. */
int mrd_zero_range(int fd, uint64_t off, uint64_t len);
/* sendmsg the whole iovec (MSG_NOSIGNAL: a dead peer must be an error code,
 * never a SIGPIPE into the Python process). Modifies iov. 0 or -errno. */
int mrd_send_all(int fd, struct iovec *iov, int iovcnt);
/* The same with extra send flags (MSG_MORE: more of this frame follows). */
int mrd_send_all_flags(int fd, struct iovec *iov, int iovcnt, int flags);

/* Zero-copy send (see "Zero-copy sends" in server.c). A pipe for
 * mrd_splice_send, sized for one frame's payload where allowed: 0 or
 * -errno. */
int mrd_pipe_for_splice(int fds[2]);
/* Put buf[0, len) on the socket without copying it: vmsplice into the pipe
 * (its buffers then reference buf's pages), splice from the pipe to the
 * socket (the socket's buffers take the same references). buf must not
 * change until the peer has received every byte: on 127.0.0.1 or a veth
 * the receiver copies straight out of these pages. more: the frame's next
 * bytes follow at once (SPLICE_F_MORE on the last piece too). 0 or -errno
 * (-ETIMEDOUT when SO_SNDTIMEO expires); after an error the pipe may still
 * hold bytes and must not be used again. */
int mrd_splice_send(const int pipe_fds[2], int sock, const void *buf, size_t len, int more);

/* Receive exactly len bytes. 0, -ECONNRESET on orderly EOF, or -errno
 * (-EAGAIN when SO_RCVTIMEO expires before any byte of this call arrived is
 * NOT returned: a timeout is retried while *stop is 0). */
int mrd_recv_all(int fd, void *buf, size_t len, const volatile int *stop);

/* Replication socket tuning: blocking, TCP_NODELAY, large buffers,
 * keepalive, send timeout / user timeout, receive timeout for polling. */
void mrd_tune_socket(int fd, unsigned timeout_ms, unsigned rcv_poll_ms);

uint64_t mrd_now_ns(void);

/* Run fn in a thread with every signal blocked, so that signals always reach
 * the Python main thread and never a C data-path thread. */
int mrd_thread_start(pthread_t *th, void *(*fn)(void *), void *arg);

#endif
