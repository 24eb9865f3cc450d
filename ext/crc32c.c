#include "crc32c.h"

#include <pthread.h>

/* Slicing-by-8 tables, built once: portable and ~1.5 GB/s; the SSE4.2
 * instruction path is chosen at run time when the CPU has it. */
static uint32_t table[8][256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void build_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
}

static uint32_t crc32c_sw(uint32_t crc, const unsigned char *p, size_t len)
{
    pthread_once(&table_once, build_table);
    while (len && ((uintptr_t)p & 7)) {
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
        len--;
    }
    while (len >= 8) {
        uint64_t v = *(const uint64_t *)p ^ crc;
        crc = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^
              table[5][(v >> 16) & 0xff] ^ table[4][(v >> 24) & 0xff] ^
              table[3][(v >> 32) & 0xff] ^ table[2][(v >> 40) & 0xff] ^
              table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>
#include <wmmintrin.h>
__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const unsigned char *p, size_t len)
{
    uint64_t c = crc;
    while (len && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        c = _mm_crc32_u64(c, *(const uint64_t *)p);
        p += 8;
        len -= 8;
    }
    while (len--)
        c = _mm_crc32_u8((uint32_t)c, *p++);
    return (uint32_t)c;
}

/* Three interleaved streams: the crc32 instruction has a latency of 3 cycles
 * but a throughput of 1, so one dependency chain uses a third of the unit.
 * Each round computes A, B, C (STRIDE bytes each) independently and joins
 * them: crc(A|B|C) = A * x^(16*STRIDE) + B * x^(8*STRIDE) + C (mod P). The
 * multiply by a fixed power of x is one carry-less multiply by
 * K = x^(8n - 33) mod P followed by a crc32 of the 64-bit product, which
 * contributes the remaining x^33 (x^32 from the CRC, x^1 from the
 * reflected carry-less product). */
#define STRIDE 4096
static uint32_t k_stride1, k_stride2; /* x^(8*STRIDE-33), x^(16*STRIDE-33) */
static pthread_once_t k_once = PTHREAD_ONCE_INIT;

/* x^n mod P in the reflected representation (bit 31 is x^0). */
static uint32_t xpow_mod(uint64_t n)
{
    uint32_t v = 0x80000000u;
    while (n--)
        v = (v & 1) ? (v >> 1) ^ 0x82F63B78u : v >> 1;
    return v;
}

static void build_k(void)
{
    k_stride1 = xpow_mod(8ull * STRIDE - 33);
    k_stride2 = xpow_mod(16ull * STRIDE - 33);
}

__attribute__((target("sse4.2,pclmul")))
static uint64_t shift_crc(uint32_t crc, uint32_t k)
{
    __m128i prod = _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)crc), _mm_cvtsi32_si128((int)k), 0);
    return _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(prod));
}

__attribute__((target("sse4.2,pclmul")))
static uint32_t crc32c_hw3(uint32_t crc, const unsigned char *p, size_t len)
{
    pthread_once(&k_once, build_k);
    while (len && ((uintptr_t)p & 7)) {
        crc = _mm_crc32_u8(crc, *p++);
        len--;
    }
    while (len >= 3 * STRIDE) {
        uint64_t a = crc, b = 0, c = 0;
        const uint64_t *pa = (const uint64_t *)p, *pb = pa + STRIDE / 8, *pc = pb + STRIDE / 8;
        for (size_t i = 0; i < STRIDE / 8; i++) {
            a = _mm_crc32_u64(a, pa[i]);
            b = _mm_crc32_u64(b, pb[i]);
            c = _mm_crc32_u64(c, pc[i]);
        }
        crc = (uint32_t)(shift_crc((uint32_t)a, k_stride2) ^ shift_crc((uint32_t)b, k_stride1) ^ c);
        p += 3 * STRIDE;
        len -= 3 * STRIDE;
    }
    return crc32c_hw(crc, p, len);
}
#endif

uint32_t mrd_crc32c(uint32_t crc, const void *buf, size_t len)
{
    crc = ~crc;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2")) {
        if (len >= 3 * STRIDE && __builtin_cpu_supports("pclmul"))
            return ~crc32c_hw3(crc, buf, len);
        return ~crc32c_hw(crc, buf, len);
    }
#endif
    return ~crc32c_sw(crc, buf, len);
}

uint32_t mrd_crc32c_portable(uint32_t crc, const void *buf, size_t len)
{
    return ~crc32c_sw(~crc, buf, len);
}
