/* CRC32C (Castagnoli), the checksum on every replication frame. */
#ifndef MIRRORD_CRC32C_H
#define MIRRORD_CRC32C_H
#include <stddef.h>
#include <stdint.h>

/* Continue a CRC32C over buf; start with crc = 0. */
uint32_t mrd_crc32c(uint32_t crc, const void *buf, size_t len);
/* The table-driven path only: the reference the tests check the hardware
 * paths against. */
uint32_t mrd_crc32c_portable(uint32_t crc, const void *buf, size_t len);

#endif
