#include "CChecksum.h"

#include <pthread.h>
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

// The CRC instruction takes three cycles to give its result and can start one every cycle, so a
// single chain of it runs at a third of its speed. Long inputs are taken three lanes at a time,
// each lane its own chain, and the lanes' CRCs joined: the register's state carried past n zero
// bytes is linear in the state, so `shifted` applies it with four table lookups.
enum { LANE = 4096 };
static uint32_t pastOneLane[4][256], pastTwoLanes[4][256];
static pthread_once_t shiftsOnce = PTHREAD_ONCE_INIT;

static uint32_t shifted(uint32_t (*past)[256], uint32_t state) {
    return past[0][state & 0xFF] ^ past[1][(state >> 8) & 0xFF] ^ past[2][(state >> 16) & 0xFF] ^ past[3][state >> 24];
}

#if defined(__x86_64__)
#define CRC_TARGET __attribute__((target("sse4.2")))
#define CRC_STEP64(c, word) __builtin_ia32_crc32di((c), (word))
#define CRC_STEP8(c, byte) __builtin_ia32_crc32qi((c), (byte))
static int hasHardware(void) { return __builtin_cpu_supports("sse4.2"); }
#elif defined(__aarch64__)
#define CRC_TARGET __attribute__((target("+crc")))
#define CRC_STEP64(c, word) __builtin_arm_crc32cd((uint32_t)(c), (word))
#define CRC_STEP8(c, byte) __builtin_arm_crc32cb((c), (byte))
static int hasHardware(void) { return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0; }
#endif

#ifdef CRC_TARGET
// One chain over `count` bytes from register state `state` (no inversions).
CRC_TARGET static uint32_t chain(uint32_t state, const unsigned char *p, size_t count) {
    uint64_t c = state;
    while (count >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = CRC_STEP64(c, word);
        p += 8;
        count -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (count--) c32 = CRC_STEP8(c32, *p++);
    return c32;
}

static void makeShifts(void) {
    static const unsigned char zeros[2 * LANE];
    uint32_t one[32], two[32];
    for (int bit = 0; bit < 32; bit++) {
        one[bit] = chain(1u << bit, zeros, LANE);
        two[bit] = chain(1u << bit, zeros, 2 * LANE);
    }
    for (int k = 0; k < 4; k++) {
        for (int byte = 0; byte < 256; byte++) {
            uint32_t a = 0, b = 0;
            for (int j = 0; j < 8; j++) {
                if (byte & (1 << j)) {
                    a ^= one[8 * k + j];
                    b ^= two[8 * k + j];
                }
            }
            pastOneLane[k][byte] = a;
            pastTwoLanes[k][byte] = b;
        }
    }
}

CRC_TARGET static uint32_t hardware(uint32_t crc, const void *data, size_t count) {
    const unsigned char *p = data;
    uint32_t state = ~crc;
    if (count >= 3 * LANE) {
        pthread_once(&shiftsOnce, makeShifts);
        do {
            uint64_t a = state, b = 0, c = 0;
            for (size_t i = 0; i < LANE; i += 8) {
                uint64_t wa, wb, wc;
                memcpy(&wa, p + i, 8);
                memcpy(&wb, p + LANE + i, 8);
                memcpy(&wc, p + 2 * LANE + i, 8);
                a = CRC_STEP64(a, wa);
                b = CRC_STEP64(b, wb);
                c = CRC_STEP64(c, wc);
            }
            state = shifted(pastTwoLanes, (uint32_t)a) ^ shifted(pastOneLane, (uint32_t)b) ^ (uint32_t)c;
            p += 3 * LANE;
            count -= 3 * LANE;
        } while (count >= 3 * LANE);
    }
    return ~chain(state, p, count);
}
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
