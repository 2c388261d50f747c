/*
 * testvmDiskBlocks: the disk content of gangway-testvm, the multiboot test kernel, on the
 * host (its base image, or what a block must hold at a version). The bytes come from
 * guest-content.h's gw_disk_block, the function the kernel itself checks against, so the
 * two cannot drift apart.
 */
#include <string.h>

#include "guest-content.h"
#include "napi-util.h"
#include "exports.h"

/* The addon's one token table (guest-content.h says why it is not static); filled on first use. */
struct gw_token_table gw_tokens;
static bool tokens_ready;

static bool arg_u64_bigint(napi_env env, napi_value v, const char *fn, const char *name, uint64_t *out) {
  napi_valuetype t;
  bool lossless = false;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_bigint) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be a bigint", fn, name);
    return false;
  }
  if (napi_get_value_bigint_uint64(env, v, out, &lossless) != napi_ok) {
    throw_napi(env, "napi_get_value_bigint_uint64");
    return false;
  }
  if (!lossless) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s must be between 0 and 2^64-1", fn, name);
    return false;
  }
  return true;
}

/* testvmDiskBlocks(seed, imageSeed, baseBlocks, firstBlock, versions, out, zero) -> undefined */
napi_value TestvmDiskBlocks(napi_env env, napi_callback_info info) {
  static const char fn[] = "testvmDiskBlocks";
  napi_value argv[7];
  uint64_t seed, image_seed, base_blocks, first_block;
  void *versions_data, *out_data, *zero_data;
  size_t count, out_len, zero_len;
  if (!get_args(env, info, 7, argv)) return NULL;
  if (!arg_u64_bigint(env, argv[0], fn, "seed", &seed)) return NULL;
  if (!arg_u64_bigint(env, argv[1], fn, "imageSeed", &image_seed)) return NULL;
  if (!arg_integer(env, argv[2], fn, "baseBlocks", 0, MAX_SAFE_INTEGER, &base_blocks)) return NULL;
  if (!arg_integer(env, argv[3], fn, "firstBlock", 0, MAX_SAFE_INTEGER, &first_block)) return NULL;
  if (!arg_typed(env, argv[4], fn, "versions", napi_uint32_array, &versions_data, &count)) return NULL;
  if (!arg_typed(env, argv[5], fn, "out", napi_uint8_array, &out_data, &out_len)) return NULL;
  if (!arg_typed(env, argv[6], fn, "zero", napi_uint8_array, &zero_data, &zero_len)) return NULL;
  if (out_len / GUEST_PAGE_SIZE < count) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: out has %zu bytes, %zu blocks need %zu", fn, out_len, count,
              count * GUEST_PAGE_SIZE);
    return NULL;
  }
  if (zero_len < count) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: zero has %zu entries, %zu blocks need as many", fn, zero_len, count);
    return NULL;
  }
  if (!tokens_ready) {
    gw_tokens_init();
    tokens_ready = true;
  }
  const uint32_t *versions = versions_data;
  uint8_t *out = out_data, *zero = zero_data;
  for (size_t i = 0; i < count; i++) {
    uint8_t *block = out + i * GUEST_PAGE_SIZE;
    const uint8_t *content = gw_disk_block(seed, image_seed, base_blocks, first_block + i, versions[i], block);
    zero[i] = content == NULL;
    if (!content) memset(block, 0, GUEST_PAGE_SIZE);
    else if (content != block) memcpy(block, content, GUEST_PAGE_SIZE);
  }
  return NULL;
}
