#define _GNU_SOURCE
#include <pthread.h>

#include "netio.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

int mrd_open_disk(const char *path, uint64_t *size_out)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) < 0)
        goto fail;
    uint64_t size;
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &size) < 0)
            goto fail;
    } else if (S_ISREG(st.st_mode)) {
        size = (uint64_t)st.st_size;
    } else {
        close(fd);
        return -EINVAL;
    }
    if (size_out)
        *size_out = size;
    return fd;
fail:;
    int e = errno;
    close(fd);
    return -e;
}

int mrd_pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
    const char *p = buf;
    while (len) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        p += n, len -= (size_t)n, off += (uint64_t)n;
    }
    return 0;
}

int mrd_pwrite_all_dsync(int fd, const void *buf, size_t len, uint64_t off)
{
    static int no_rwf_dsync; /* atomic: this kernel refused RWF_DSYNC once */
    const char *p = buf;
    while (len && !__atomic_load_n(&no_rwf_dsync, __ATOMIC_RELAXED)) {
        struct iovec iov = {(void *)p, len};
        ssize_t n = pwritev2(fd, &iov, 1, (off_t)off, RWF_DSYNC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EOPNOTSUPP || errno == ENOSYS) {
                __atomic_store_n(&no_rwf_dsync, 1, __ATOMIC_RELAXED);
                break;
            }
            return -errno;
        }
        if (n == 0)
            return -EIO;
        /* Each successful piece was synced on its own. */
        p += n, len -= (size_t)n, off += (uint64_t)n;
    }
    if (!len)
        return 0;
    int rc = mrd_pwrite_all(fd, p, len, off);
    if (!rc && fdatasync(fd) < 0)
        rc = -errno;
    return rc;
}

int mrd_zero_range(int fd, uint64_t off, uint64_t len)
{
    /* A hole first: the replica stays as sparse as the primary (zeroing a
     * range of a sparse image with ZERO_RANGE would allocate it, and a 1 TiB
     * sparse replica would not fit). On a block device a punched hole is a
     * discard that the kernel only allows where it reads back as zeros. */
    static const int modes[] = {FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE};
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        int rc;
        do
            rc = fallocate(fd, modes[i], (off_t)off, (off_t)len);
        while (rc < 0 && errno == EINTR);
        if (rc == 0)
            return 0;
        if (errno != EOPNOTSUPP && errno != EINVAL && errno != ENOSYS)
            return -errno;
    }
    static const char zeros[64 << 10];
    while (len) {
        size_t n = len < sizeof zeros ? (size_t)len : sizeof zeros;
        int rc = mrd_pwrite_all(fd, zeros, n, off);
        if (rc)
            return rc;
        off += n, len -= n;
    }
    return 0;
}

void mrd_start_writeback(int fd, uint64_t off, uint64_t len)
{
    (void)sync_file_range(fd, (off_t)off, (off_t)len, SYNC_FILE_RANGE_WRITE);
}

int mrd_pread_all(int fd, void *buf, size_t len, uint64_t off)
{
    char *p = buf;
    while (len) {
        ssize_t n = pread(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        p += n, len -= (size_t)n, off += (uint64_t)n;
    }
    return 0;
}

int mrd_send_all(int fd, struct iovec *iov, int iovcnt)
{
    return mrd_send_all_flags(fd, iov, iovcnt, 0);
}

int mrd_send_all_flags(int fd, struct iovec *iov, int iovcnt, int flags)
{
    while (iovcnt > 0) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)iovcnt};
        ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL | flags);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* SO_SNDTIMEO expiring shows as EAGAIN: the peer stopped reading. */
            return errno == EAGAIN ? -ETIMEDOUT : -errno;
        }
        while (iovcnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++, iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

int mrd_pipe_for_splice(int fds[2])
{
    if (pipe2(fds, O_CLOEXEC) < 0)
        return -errno;
    /* As large as one frame's payload, so one vmsplice takes it whole;
     * where pipe-max-size forbids that, the default size just means more
     * rounds. */
    (void)fcntl(fds[1], F_SETPIPE_SZ, 1 << 20);
    return 0;
}

int mrd_splice_send(const int pipe_fds[2], int sock, const void *buf, size_t len, int more)
{
    struct iovec v = {(void *)buf, len};
    while (v.iov_len) {
        /* The pipe is empty here (everything put in it went out below), so
         * this does not block. */
        ssize_t in = vmsplice(pipe_fds[1], &v, 1, 0);
        if (in < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        v.iov_base = (char *)v.iov_base + in;
        v.iov_len -= (size_t)in;
        unsigned flags = v.iov_len || more ? SPLICE_F_MORE : 0;
        while (in > 0) {
            ssize_t out = splice(pipe_fds[0], NULL, sock, NULL, (size_t)in, flags);
            if (out < 0) {
                if (errno == EINTR)
                    continue;
                /* SO_SNDTIMEO expiring shows as EAGAIN, as for sendmsg. */
                return errno == EAGAIN ? -ETIMEDOUT : -errno;
            }
            if (out == 0)
                return -EPIPE;
            in -= out;
        }
    }
    return 0;
}

int mrd_recv_all(int fd, void *buf, size_t len, const volatile int *stop)
{
    char *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, 0);
        if (n > 0) {
            p += n, len -= (size_t)n;
            continue;
        }
        if (n == 0)
            return -ECONNRESET;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN && !(stop && *stop))
            continue;
        return -errno;
    }
    return 0;
}

void mrd_tune_socket(int fd, unsigned timeout_ms, unsigned rcv_poll_ms)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && (fl & O_NONBLOCK))
        fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    int one = 1, buf = 8 << 20;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* FORCE variants ignore net.core.[rw]mem_max (we run as root); fall back
     * to the capped ones otherwise. */
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof buf) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    /* Congestion control: cubic, whatever the system default. This is a
     * point-to-point link carrying bursts that a writer waits for, and a
     * pacing algorithm spreads each burst over time: with bbr (the default
     * on the lab VMs) splicing a 1 MiB frame took 220-300 us against
     * 130-160 us with cubic, and mirrored 1 MiB writes were 20 % slower
     * (docs/decisions.md). Reno, built into every kernel, if cubic is not
     * there; the default if neither can be set. */
    static const char cubic[] = "cubic", reno[] = "reno";
    if (setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, cubic, sizeof cubic - 1) < 0)
        setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, reno, sizeof reno - 1);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    int idle = 5, intvl = 2, cnt = 3;
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
    if (timeout_ms) {
        unsigned ut = timeout_ms;
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ut, sizeof ut);
        struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    if (rcv_poll_ms) {
        struct timeval tv = {.tv_sec = rcv_poll_ms / 1000, .tv_usec = (rcv_poll_ms % 1000) * 1000};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    }
}

uint64_t mrd_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int mrd_thread_start(pthread_t *th, void *(*fn)(void *), void *arg)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(th, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return -rc;
}
