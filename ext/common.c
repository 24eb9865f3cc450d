#include "common.h"

#include <string.h>

const char *mrd_strerror(int code)
{
    switch (code) {
    case 0: return "success";
    case MRD_ETRUNC: return "frame truncated";
    case MRD_EMAGIC: return "bad frame magic";
    case MRD_ETYPE: return "unknown frame type";
    case MRD_ELEN: return "frame length out of bounds";
    case MRD_ECRC: return "frame CRC32C mismatch";
    case MRD_EFLAGS: return "reserved frame flags set";
    case MRD_EPROTO: return "protocol violation";
    case MRD_ESTATE: return "not allowed in the current state";
    case MRD_EFUSE: return "libfuse failed";
    case MRD_ERANGE: return "range outside the disk";
    case MRD_ENOPEER: return "no peer connected";
    case MRD_EALBAD: return "activity log holds no valid record";
    case MRD_EALGEOM: return "activity log was written with another extent size or more extents than slots";
    }
    if (code < 0 && code > -MRD_E_BASE)
        return strerror(-code); /* glibc's strerror is thread-safe for known codes */
    return "unknown error";
}
