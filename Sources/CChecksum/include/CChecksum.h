#ifndef OCICACHEFS_CCHECKSUM_H
#define OCICACHEFS_CCHECKSUM_H
// CRC-32C (Castagnoli) with the processor's CRC instructions where it has them (SSE 4.2 on
// x86-64, the CRC32 extension on arm64) and a table otherwise. Swift cannot name these
// instructions; zlib's CRC-32 is a table walk that cost a tenth of the daemon's CPU in a cold
// read. Its one Swift owner is ContentCache's BlockJournal.
#include <stddef.h>
#include <stdint.h>

/// The CRC-32C of `count` bytes at `data`, continued from `crc` (0 to start).
uint32_t CChecksum_crc32c(uint32_t crc, const void *data, size_t count);

/// Whether `CChecksum_crc32c` uses the processor's instructions (for tests and benchmarks).
int CChecksum_crc32cIsHardware(void);

/// The table version, whatever the processor has: tests compare the two.
uint32_t CChecksum_crc32cPortable(uint32_t crc, const void *data, size_t count);
#endif
