#ifndef OCICACHEFS_CZLIB_SHIM_H
#define OCICACHEFS_CZLIB_SHIM_H
#include <zlib.h>
// inflateInit2 is a macro over inflateInit2_; Swift cannot call macros.
static inline int CZlib_inflateInit2(z_streamp stream, int windowBits) {
    return inflateInit2(stream, windowBits);
}
#endif
