#ifndef OCICACHEFS_CMALLOC_SHIM_H
#define OCICACHEFS_CMALLOC_SHIM_H
#include <malloc.h>
// glibc's mallopt and its M_* parameters are not visible through Swift's Glibc module.
static inline int CMalloc_limitArenas(int count) {
    return mallopt(M_ARENA_MAX, count);
}
#endif
