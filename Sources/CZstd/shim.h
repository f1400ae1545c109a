#ifndef OCICACHEFS_CZSTD_SHIM_H
#define OCICACHEFS_CZSTD_SHIM_H
#include <zstd.h>
// Expression macros the Swift importer cannot read.
static inline unsigned long long CZstd_contentSizeUnknown(void) { return ZSTD_CONTENTSIZE_UNKNOWN; }
static inline unsigned long long CZstd_contentSizeError(void) { return ZSTD_CONTENTSIZE_ERROR; }
#endif
