/* Errors and argument parsing shared by every part of the addon (napi-util.h). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "napi-util.h"

/* ------------------------------------------------------------------------------------ */
/* Errors                                                                               */
/* ------------------------------------------------------------------------------------ */

void throw_fmt(napi_env env, err_kind kind, const char *code, const char *fmt, ...) {
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending) return;
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  switch (kind) {
    case ERR_TYPE: napi_throw_type_error(env, code, msg); break;
    case ERR_RANGE: napi_throw_range_error(env, code, msg); break;
    default: napi_throw_error(env, code, msg); break;
  }
}

/* "EPERM" (glibc >= 2.32), or the number when unknown. */
static const char *errno_name(int err, char *buf, size_t len) {
  const char *name = strerrorname_np(err);
  if (name) return name;
  snprintf(buf, len, "errno %d", err);
  return buf;
}

/* Throws Error(`${prefix}: ${ENAME} (${text})`) with err.code = ENAME. */
void throw_errno(napi_env env, int err, const char *prefix, const char *text) {
  char nb[32];
  const char *name = errno_name(err, nb, sizeof nb);
  throw_fmt(env, ERR_ERROR, strerrorname_np(err), "%s: %s (%s)", prefix, name,
            text ? text : strerror(err));
}

/* A failed napi_* call: throw a generic error unless one is already pending. */
void throw_napi(napi_env env, const char *what) {
  const napi_extended_error_info *info = NULL;
  napi_get_last_error_info(env, &info);
  throw_fmt(env, ERR_ERROR, NULL, "gangway: %s failed: %s", what,
            info && info->error_message ? info->error_message : "unknown N-API error");
}


/* ------------------------------------------------------------------------------------ */
/* Argument validation helpers: each returns false with a pending exception.            */
/* ------------------------------------------------------------------------------------ */

bool get_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    throw_napi(env, "napi_get_cb_info");
    return false;
  }
  /* Missing arguments are `undefined` and fail their own validation, by name. */
  return true;
}

/* A JS number that is an integer in [min, max]. */
bool arg_integer(napi_env env, napi_value v, const char *fn, const char *name, double min,
                 double max, uint64_t *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be a number", fn, name);
    return false;
  }
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok) {
    throw_napi(env, "napi_get_value_double");
    return false;
  }
  if (!(d >= min && d <= max) || d != (double)(uint64_t)d) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s must be an integer between %.0f and %.0f (got %g)", fn,
              name, min, max, d);
    return false;
  }
  *out = (uint64_t)d;
  return true;
}

bool arg_fd(napi_env env, napi_value v, const char *fn, const char *name, int *out) {
  uint64_t u;
  if (!arg_integer(env, v, fn, name, 0, (double)INT_MAX, &u)) return false;
  *out = (int)u;
  return true;
}

bool arg_bool(napi_env env, napi_value v, const char *fn, const char *name, bool *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_boolean) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be a boolean", fn, name);
    return false;
  }
  if (napi_get_value_bool(env, v, out) != napi_ok) {
    throw_napi(env, "napi_get_value_bool");
    return false;
  }
  return true;
}

bool arg_page_size(napi_env env, napi_value v, const char *fn, const char *name,
                   uint32_t *out) {
  uint64_t u;
  if (!arg_integer(env, v, fn, name, 0, MAX_SAFE_INTEGER, &u)) return false;
  if (u < PAGE_SIZE_MIN || u > PAGE_SIZE_MAX || (u & (u - 1)) != 0) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s must be a power of two between %u and %u (got %llu)",
              fn, name, PAGE_SIZE_MIN, PAGE_SIZE_MAX, (unsigned long long)u);
    return false;
  }
  *out = (uint32_t)u;
  return true;
}

/* A positive length, a multiple of page_size, at most 2^32-1 pages. */
bool arg_page_length(napi_env env, napi_value v, const char *fn, const char *name,
                     uint32_t page_size, uint64_t *out) {
  uint64_t u;
  if (!arg_integer(env, v, fn, name, 1, MAX_SAFE_INTEGER, &u)) return false;
  if (u % page_size != 0) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s (%llu) must be a multiple of the page size (%u)", fn,
              name, (unsigned long long)u, page_size);
    return false;
  }
  if (u / page_size > UINT32_MAX) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s (%llu) is more than 2^32-1 pages of %u bytes", fn,
              name, (unsigned long long)u, page_size);
    return false;
  }
  *out = u;
  return true;
}

static const char *typedarray_name(napi_typedarray_type t) {
  switch (t) {
    case napi_uint8_array: return "a Uint8Array";
    case napi_uint32_array: return "a Uint32Array";
    default: return "a typed array";
  }
}

/* A typed array of exactly type `want`; data may be NULL when len == 0. */
bool arg_typed(napi_env env, napi_value v, const char *fn, const char *name,
               napi_typedarray_type want, void **data, size_t *len) {
  bool is = false;
  napi_typedarray_type type;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, v, &type, len, data, NULL, NULL) != napi_ok || type != want) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be %s", fn, name, typedarray_name(want));
    return false;
  }
  if (*len == 0) *data = NULL;
  return true;
}

/* arg_typed, or null: then *data = NULL, *len = 0 and *present = false. */
bool arg_typed_or_null(napi_env env, napi_value v, const char *fn, const char *name,
                       napi_typedarray_type want, void **data, size_t *len,
                       bool *present) {
  napi_valuetype t;
  bool is = false;
  napi_typedarray_type type;
  *present = !(napi_typeof(env, v, &t) == napi_ok && t == napi_null);
  if (!*present) {
    *data = NULL, *len = 0;
    return true;
  }
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, v, &type, len, data, NULL, NULL) != napi_ok || type != want) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be %s or null", fn, name, typedarray_name(want));
    return false;
  }
  if (*len == 0) *data = NULL;
  return true;
}

/* A path string without NUL characters, malloc'd into *out. */
bool arg_path(napi_env env, napi_value v, const char *fn, const char *name, char **out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_string) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be a string", fn, name);
    return false;
  }
  size_t len = 0;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) {
    throw_napi(env, "napi_get_value_string_utf8");
    return false;
  }
  if (len == 0 || len >= PATH_MAX) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s must be a non-empty path shorter than %d bytes", fn,
              name, PATH_MAX);
    return false;
  }
  char *s = malloc(len + 1);
  if (!s) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return false;
  }
  size_t got = 0;
  if (napi_get_value_string_utf8(env, v, s, len + 1, &got) != napi_ok) {
    free(s);
    throw_napi(env, "napi_get_value_string_utf8");
    return false;
  }
  if (strlen(s) != got) {
    free(s);
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must not contain NUL characters", fn, name);
    return false;
  }
  *out = s;
  return true;
}

/* An optional argument: `undefined` or `null` means absent. */
bool arg_is_absent(napi_env env, napi_value v) {
  napi_valuetype t;
  return napi_typeof(env, v, &t) == napi_ok && (t == napi_undefined || t == napi_null);
}

/* Rejects `deferred` with the pending exception (validation errors reject, not throw). */
napi_value reject_pending(napi_env env, napi_deferred deferred, napi_value promise) {
  napi_value err;
  if (napi_get_and_clear_last_exception(env, &err) != napi_ok) return NULL;
  napi_reject_deferred(env, deferred, err);
  return promise;
}
