/*
 * What every part of the addon shares: errors that name the function and the argument at
 * fault, and the parsers of its arguments (addon.c says why every argument is checked).
 */
#ifndef GANGWAY_ADDON_NAPI_UTIL_H
#define GANGWAY_ADDON_NAPI_UTIL_H

#define NAPI_VERSION 8

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <node_api.h>

#define PAGE_SIZE_MIN 512u
#define PAGE_SIZE_MAX (1u << 20)
#define MAX_SAFE_INTEGER 9007199254740991.0 /* 2^53 - 1 */

/* ------------------------------------------------------------------------------------ */
/* Errors                                                                               */
/* ------------------------------------------------------------------------------------ */

typedef enum { ERR_ERROR, ERR_TYPE, ERR_RANGE } err_kind;

void throw_fmt(napi_env env, err_kind kind, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void throw_errno(napi_env env, int err, const char *prefix, const char *text);
void throw_napi(napi_env env, const char *what);

#define NAPI_TRY(env, call)       \
  do {                            \
    if ((call) != napi_ok) {      \
      throw_napi((env), #call);   \
      return NULL;                \
    }                             \
  } while (0)

napi_value reject_pending(napi_env env, napi_deferred deferred, napi_value promise);

/* ------------------------------------------------------------------------------------ */
/* Argument validation helpers: each returns false with a pending exception.            */
/* ------------------------------------------------------------------------------------ */

bool get_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv);
bool arg_integer(napi_env env, napi_value v, const char *fn, const char *name, double min,
                 double max, uint64_t *out);
bool arg_fd(napi_env env, napi_value v, const char *fn, const char *name, int *out);
bool arg_bool(napi_env env, napi_value v, const char *fn, const char *name, bool *out);
bool arg_page_size(napi_env env, napi_value v, const char *fn, const char *name, uint32_t *out);
bool arg_page_length(napi_env env, napi_value v, const char *fn, const char *name,
                     uint32_t page_size, uint64_t *out);
bool arg_typed(napi_env env, napi_value v, const char *fn, const char *name,
               napi_typedarray_type want, void **data, size_t *len);
bool arg_typed_or_null(napi_env env, napi_value v, const char *fn, const char *name,
                       napi_typedarray_type want, void **data, size_t *len, bool *present);
bool arg_path(napi_env env, napi_value v, const char *fn, const char *name, char **out);
bool arg_is_absent(napi_env env, napi_value v);

#endif
