/* Typed entry points into libcurl for Swift.
 *
 * curl_easy_setopt and curl_easy_getinfo are variadic (and redefined as macros by
 * curl/typecheck-gcc.h), so Swift cannot call them. Each wrapper below fixes the type of
 * the trailing argument; the caller picks the one that matches the option's documented
 * type. Expression macros the importer cannot read are exported through getters.
 */
#ifndef OCICACHEFS_CCURL_SHIM_H_7F3A91
#define OCICACHEFS_CCURL_SHIM_H_7F3A91

/* The wrappers pass non-constant options, which the gcc type checker cannot check anyway. */
#ifndef CURL_DISABLE_TYPECHECK
#define CURL_DISABLE_TYPECHECK 1
#endif
#include <curl/curl.h>

/* --- curl_easy_setopt, one wrapper per argument kind ------------------------------------- */

static inline CURLcode CCurl_easy_setopt_long(CURL *handle, CURLoption option, long value) {
    return curl_easy_setopt(handle, option, value);
}

static inline CURLcode CCurl_easy_setopt_off_t(CURL *handle, CURLoption option, curl_off_t value) {
    return curl_easy_setopt(handle, option, value);
}

/* libcurl copies string options (except CURLOPT_POSTFIELDS, which must use the pointer
 * wrapper and stay valid for the whole transfer). */
static inline CURLcode CCurl_easy_setopt_string(CURL *handle, CURLoption option, const char *value) {
    return curl_easy_setopt(handle, option, value);
}

static inline CURLcode CCurl_easy_setopt_pointer(CURL *handle, CURLoption option, void *value) {
    return curl_easy_setopt(handle, option, value);
}

static inline CURLcode CCurl_easy_setopt_const_pointer(CURL *handle, CURLoption option, const void *value) {
    return curl_easy_setopt(handle, option, value);
}

static inline CURLcode CCurl_easy_setopt_slist(CURL *handle, CURLoption option, struct curl_slist *value) {
    return curl_easy_setopt(handle, option, value);
}

/* CURLOPT_WRITEFUNCTION and CURLOPT_HEADERFUNCTION share this signature. */
static inline CURLcode CCurl_easy_setopt_write_callback(CURL *handle, CURLoption option,
                                                        curl_write_callback value) {
    return curl_easy_setopt(handle, option, value);
}

static inline CURLcode CCurl_easy_setopt_read_callback(CURL *handle, CURLoption option,
                                                       curl_read_callback value) {
    return curl_easy_setopt(handle, option, value);
}

static inline CURLcode CCurl_easy_setopt_xferinfo_callback(CURL *handle, CURLoption option,
                                                           curl_xferinfo_callback value) {
    return curl_easy_setopt(handle, option, value);
}

/* A request body of zero bytes ("Content-Length: 0"). POSTFIELDS is not copied by libcurl,
 * so it must point at storage that outlives the transfer: a C string literal is static. */
static inline CURLcode CCurl_easy_set_empty_postfields(CURL *handle) {
    CURLcode rc = curl_easy_setopt(handle, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
    if (rc != CURLE_OK) return rc;
    return curl_easy_setopt(handle, CURLOPT_POSTFIELDS, "");
}

/* --- curl_easy_getinfo ------------------------------------------------------------------- */

static inline CURLcode CCurl_easy_getinfo_long(CURL *handle, CURLINFO info, long *value) {
    return curl_easy_getinfo(handle, info, value);
}

static inline CURLcode CCurl_easy_getinfo_off_t(CURL *handle, CURLINFO info, curl_off_t *value) {
    return curl_easy_getinfo(handle, info, value);
}

static inline CURLcode CCurl_easy_getinfo_string(CURL *handle, CURLINFO info, char **value) {
    return curl_easy_getinfo(handle, info, value);
}

/* --- constants the importer cannot read --------------------------------------------------- */

static inline long CCurl_GLOBAL_ALL(void) { return CURL_GLOBAL_ALL; }
static inline long CCurl_ERROR_SIZE(void) { return CURL_ERROR_SIZE; }
static inline long CCurl_HTTP_VERSION_2TLS(void) { return CURL_HTTP_VERSION_2TLS; }
static inline size_t CCurl_READFUNC_ABORT(void) { return CURL_READFUNC_ABORT; }

#endif /* OCICACHEFS_CCURL_SHIM_H_7F3A91 */
