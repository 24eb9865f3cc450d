/* Return codes shared by every area of mirrord's C data path.
 *
 * Functions return 0 (or a non-negative count) on success, a negative errno
 * for OS failures, or one of the mirrord-specific codes below, which live far
 * outside the errno range so Python can tell the two apart. */
#ifndef MIRRORD_COMMON_H
#define MIRRORD_COMMON_H

#define MRD_E_BASE 10000
#define MRD_ETRUNC (-(MRD_E_BASE + 1))  /* buffer shorter than the frame says */
#define MRD_EMAGIC (-(MRD_E_BASE + 2))  /* not a mirrord frame */
#define MRD_ETYPE (-(MRD_E_BASE + 3))   /* unknown frame type */
#define MRD_ELEN (-(MRD_E_BASE + 4))    /* payload length out of bounds for the type */
#define MRD_ECRC (-(MRD_E_BASE + 5))    /* CRC32C mismatch */
#define MRD_EFLAGS (-(MRD_E_BASE + 6))  /* reserved flag bits set */
#define MRD_EPROTO (-(MRD_E_BASE + 7))  /* valid frame, wrong in this context */
#define MRD_ESTATE (-(MRD_E_BASE + 8))  /* call not allowed in the current state */
#define MRD_EFUSE (-(MRD_E_BASE + 9))   /* libfuse refused (session/mount) */
#define MRD_ERANGE (-(MRD_E_BASE + 10)) /* offset/length outside the disk */
#define MRD_ENOPEER (-(MRD_E_BASE + 11))/* operation needs a connected peer */
#define MRD_EALBAD (-(MRD_E_BASE + 12)) /* activity log file holds no valid record */
#define MRD_EALGEOM (-(MRD_E_BASE + 13))/* activity log written with another extent size/more extents */

/* Readable text for any return code (errno or mirrord-specific). */
const char *mrd_strerror(int code);

#endif
