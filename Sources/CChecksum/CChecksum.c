#include "CChecksum.h"

#include <string.h>

#if defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#endif

static uint32_t table[256];
static int tableReady;

static void makeTable(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0x82F63B78u ^ (c >> 1) : c >> 1;
        table[n] = c;
    }
    __atomic_store_n(&tableReady, 1, __ATOMIC_RELEASE);
}

uint32_t CChecksum_crc32cPortable(uint32_t crc, const void *data, size_t count) {
    if (!__atomic_load_n(&tableReady, __ATOMIC_ACQUIRE)) makeTable();  // idempotent: racing threads write the same table
    const unsigned char *p = data;
    crc = ~crc;
    while (count--) crc = table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t hardware(uint32_t crc, const void *data, size_t count) {
    const unsigned char *p = data;
    uint64_t c = ~crc;
    while (count >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        count -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (count--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return ~c32;
}

static int hasHardware(void) { return __builtin_cpu_supports("sse4.2"); }
#elif defined(__aarch64__)
__attribute__((target("+crc")))
static uint32_t hardware(uint32_t crc, const void *data, size_t count) {
    const unsigned char *p = data;
    uint32_t c = ~crc;
    while (count >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_arm_crc32cd(c, word);
        p += 8;
        count -= 8;
    }
    while (count--) c = __builtin_arm_crc32cb(c, *p++);
    return ~c;
}

static int hasHardware(void) { return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0; }
#else
static uint32_t hardware(uint32_t crc, const void *data, size_t count) { return CChecksum_crc32cPortable(crc, data, count); }
static int hasHardware(void) { return 0; }
#endif

int CChecksum_crc32cIsHardware(void) { return hasHardware(); }

uint32_t CChecksum_crc32c(uint32_t crc, const void *data, size_t count) {
    static int choice = -1;  // -1 unknown, 0 table, 1 hardware; racing threads compute the same value
    int chosen = __atomic_load_n(&choice, __ATOMIC_RELAXED);
    if (chosen < 0) {
        chosen = hasHardware();
        __atomic_store_n(&choice, chosen, __ATOMIC_RELAXED);
    }
    return chosen ? hardware(crc, data, count) : CChecksum_crc32cPortable(crc, data, count);
}
