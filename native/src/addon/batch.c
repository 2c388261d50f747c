/*
 * regionGather / regionScatter: page batches (ENTRY_ZERO / ENTRY_DATA entries), the source's
 * and the destination's side of a pages frame, optionally fingerprinting the gathered data
 * pages.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>

#include "napi-util.h"
#include "region.h"
#include "exports.h"

/*
 * The body of regionGather, also run by a channel's thread (channel.c): the pages of `runs`
 * from `cursor` on, zero pages as entries, data pages copied into `payload` (fingerprinted
 * into `fps` when given); or, with `iov` (room for an entry each), not copied but pointed
 * at in the mapping, an iovec per data entry (its pages are contiguous there). Arguments
 * are checked by the caller, except each run against the region: a run outside it sets
 * res->bad (and res->bad_run) and gathers nothing more.
 */
bool gather_batch(const region_t *r, const uint32_t *runs, size_t run_count, uint32_t *cursor,
                  uint8_t *payload, size_t payload_cap, uint32_t *entries, size_t entry_cap,
                  uint8_t *fps, struct iovec *iov, gather_result *res) {
  const size_t ps = r->page_size;
  size_t ri = cursor[0];
  uint64_t done_in_run = cursor[1];
  res->bad = false;
  size_t ne = 0, pb = 0, nd = 0;
  uint32_t last_kind = 0;
  uint64_t last_end = 0; /* page after the last entry's pages */
  bool stop = false;
  while (ri < run_count && !stop) {
    /* Read each run once into locals: the arrays may alias one another. */
    const uint64_t first = runs[2 * ri], count = runs[2 * ri + 1];
    if (first + count > r->page_count) {
      res->bad_run = ri;
      res->bad = true;
      return false;
    }
    while (done_in_run < count) {
      const uint64_t page = first + done_in_run;
      uint8_t *src = r->addr + page * ps;
      const uint32_t kind = page_is_zero(src, ps) ? ENTRY_ZERO : ENTRY_DATA;
      if (kind == ENTRY_DATA && pb + ps > payload_cap) {
        stop = true;
        break;
      }
      if (ne > 0 && last_kind == kind && last_end == page) {
        entries[3 * (ne - 1) + 2] += 1;
        if (iov && kind == ENTRY_DATA) iov[nd - 1].iov_len += ps;
      } else {
        if (ne == entry_cap) {
          stop = true;
          break;
        }
        entries[3 * ne] = kind;
        entries[3 * ne + 1] = (uint32_t)page;
        entries[3 * ne + 2] = 1;
        ne++;
        last_kind = kind;
        if (iov && kind == ENTRY_DATA) iov[nd++] = (struct iovec){.iov_base = src, .iov_len = ps};
      }
      last_end = page + 1;
      if (iov) {
        if (kind == ENTRY_DATA) pb += ps;
      } else if (kind == ENTRY_DATA) {
        memcpy(payload + pb, src, ps);
        /* From the copy, still in cache, and the very bytes sent: the guest may be
         * writing the source page meanwhile. */
        if (fps) page_hash((XXH128_canonical_t *)(void *)(fps + pb / ps * 16), payload + pb, ps);
        pb += ps;
      }
      done_in_run++;
    }
    if (!stop) {
      ri++;
      done_in_run = 0;
    }
  }
  cursor[0] = (uint32_t)ri;
  cursor[1] = (uint32_t)done_in_run;
  res->entries = ne;
  res->payload = pb;
  res->iovs = nd;
  return ri == run_count;
}

/* regionGather(region, runs, cursor, payload, entries, out, fps?) -> done */
napi_value RegionGather(napi_env env, napi_callback_info info) {
  static const char fn[] = "regionGather";
  napi_value argv[7];
  region_t *r;
  uint32_t *runs, *cursor, *entries, *out;
  uint8_t *payload, *fps = NULL;
  size_t runs_len, cursor_len, payload_len, entries_len, out_len, fps_len = 0;
  if (!get_args(env, info, 7, argv)) return NULL;
  if (!arg_region(env, argv[0], fn, false, &r)) return NULL;
  if (!arg_typed(env, argv[1], fn, "runs", napi_uint32_array, (void **)&runs, &runs_len) ||
      !arg_typed(env, argv[2], fn, "cursor", napi_uint32_array, (void **)&cursor, &cursor_len) ||
      !arg_typed(env, argv[3], fn, "payload", napi_uint8_array, (void **)&payload,
                 &payload_len) ||
      !arg_typed(env, argv[4], fn, "entries", napi_uint32_array, (void **)&entries,
                 &entries_len) ||
      !arg_typed(env, argv[5], fn, "out", napi_uint32_array, (void **)&out, &out_len))
    return NULL;
  const bool with_fps = !arg_is_absent(env, argv[6]);
  if (with_fps &&
      !arg_typed(env, argv[6], fn, "fps", napi_uint8_array, (void **)&fps, &fps_len))
    return NULL;
  if (!r->addr) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: the region is writable (a destination's): it is not mapped for reading", fn);
    return NULL;
  }
  const size_t ps = r->page_size;
  if (runs_len % 2 != 0) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: runs must hold [firstPage, pageCount] pairs (its length %zu is odd)", fn,
              runs_len);
    return NULL;
  }
  if (cursor_len != 2) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: cursor must have length 2 [runIndex, pagesDoneInRun]",
              fn);
    return NULL;
  }
  if (out_len != 2) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: out must have length 2 [entryCount, payloadBytes]", fn);
    return NULL;
  }
  if (payload_len == 0 || payload_len % ps != 0) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: payload length (%zu) must be a positive multiple of the page size (%zu)", fn,
              payload_len, ps);
    return NULL;
  }
  if (with_fps && fps_len / 16 < payload_len / ps) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: fps is %zu bytes, too short for the payload's %zu pages (16 bytes each: %zu)",
              fn, fps_len, payload_len / ps, payload_len / ps * 16);
    return NULL;
  }
  if (entries_len < 3 || entries_len % 3 != 0) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: entries must hold [kind, firstPage, pageCount] triples: its length (%zu) "
              "must be a positive multiple of 3",
              fn, entries_len);
    return NULL;
  }
  const size_t run_count = runs_len / 2;
  size_t ri = cursor[0];
  uint64_t done_in_run = cursor[1];
  if (ri > run_count) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: cursor[0] (%zu) is beyond the %zu runs", fn, ri,
              run_count);
    return NULL;
  }
  if (ri == run_count ? done_in_run != 0 : done_in_run > runs[2 * ri + 1]) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: cursor[1] (%llu) is beyond the length of run %zu", fn,
              (unsigned long long)done_in_run, ri);
    return NULL;
  }
  /* Byte counts are reported in a Uint32Array: cap the usable payload below 4 GiB. */
  size_t payload_cap = payload_len;
  if (payload_cap > UINT32_MAX) payload_cap = (UINT32_MAX / ps) * ps;
  const size_t entry_cap = entries_len / 3;

  gather_result res;
  const bool done = gather_batch(r, runs, run_count, cursor, payload, payload_cap, entries,
                                 entry_cap, fps, NULL, &res);
  if (res.bad) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: run %zu [%llu, %llu] is outside the region of %u pages", fn, res.bad_run,
              (unsigned long long)runs[2 * res.bad_run],
              (unsigned long long)runs[2 * res.bad_run + 1], r->page_count);
    return NULL;
  }
  out[0] = (uint32_t)res.entries;
  out[1] = (uint32_t)res.payload;
  napi_value result;
  NAPI_TRY(env, napi_get_boolean(env, done, &result));
  return result;
}

/*
 * Checks a batch's entries against region r and a payload of payload_len bytes before
 * anything is written: true when they fit, else false with the reason in msg.
 */
bool scatter_check(const region_t *r, const uint32_t *entries, size_t entry_count,
                   size_t payload_len, char *msg, size_t msg_len) {
  const size_t ps = r->page_size;
  uint64_t data_pages = 0;
  for (size_t i = 0; i < entry_count; i++) {
    const uint32_t kind = entries[3 * i], first = entries[3 * i + 1], count = entries[3 * i + 2];
    if (kind != ENTRY_ZERO && kind != ENTRY_DATA) {
      snprintf(msg, msg_len, "entry %zu has an unknown kind (%u)", i, kind);
      return false;
    }
    if (count == 0) {
      snprintf(msg, msg_len, "entry %zu has a zero page count", i);
      return false;
    }
    if ((uint64_t)first + count > r->page_count) {
      snprintf(msg, msg_len, "entry %zu (pages %u..%llu) is outside the region of %u pages", i,
               first, (unsigned long long)first + count - 1, r->page_count);
      return false;
    }
    if (kind == ENTRY_DATA) data_pages += count;
  }
  if (payload_len % ps != 0 || payload_len / ps != data_pages) {
    snprintf(msg, msg_len, "payload is %zu bytes but the entries' %llu data pages need exactly %llu",
             payload_len, (unsigned long long)data_pages, (unsigned long long)(data_pages * ps));
    return false;
  }
  return true;
}

/*
 * Writes a checked batch into writable region r (zero pages not known to be zero, data
 * pages fingerprinted when the region tracks them). Entries are re-read, so bounds are
 * checked again: memory safety must not depend on the arrays staying unchanged (they could
 * be shared memory). 0 when written; SCATTER_CHANGED when the entries changed meanwhile;
 * SCATTER_IO with errno set and *at the file offset when a write failed.
 */
int scatter_apply(region_t *r, const uint32_t *entries, size_t entry_count, const uint8_t *payload,
                  size_t payload_len, uint64_t *at_out) {
  const size_t ps = r->page_size;
  size_t off = 0;
  for (size_t i = 0; i < entry_count; i++) {
    const uint32_t kind = entries[3 * i], first = entries[3 * i + 1], count = entries[3 * i + 2];
    if ((uint64_t)first + count > r->page_count ||
        (kind == ENTRY_DATA && (uint64_t)count * ps > payload_len - off))
      return SCATTER_CHANGED;
    const uint64_t dst = (uint64_t)first * ps;
    if (kind == ENTRY_ZERO) {
      /* Zero only the pages not known to be zero, a contiguous stretch at a time. */
      uint32_t p = 0;
      while (p < count) {
        while (r->track && p < count && memcmp(&r->hashes[first + p], &r->zero_hash, 16) == 0) p++;
        const uint32_t from = p;
        while (p < count && (!r->track || memcmp(&r->hashes[first + p], &r->zero_hash, 16) != 0)) {
          if (r->track) r->hashes[first + p] = r->zero_hash;
          p++;
        }
        const uint64_t zero_from = dst + (uint64_t)from * ps, zero_end = dst + (uint64_t)p * ps;
        /* A sparse disk: the pages become holes (as the source's were, or were trimmed to);
         * a file system that cannot punch gets the zeros written. */
        if (r->zero_holes && zero_end > zero_from &&
            fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)zero_from, (off_t)(zero_end - zero_from)) == 0)
          continue;
        for (uint64_t at = zero_from; at < zero_end;) {
          const size_t n = zero_end - at < sizeof ZERO_CHUNK ? (size_t)(zero_end - at) : sizeof ZERO_CHUNK;
          if (!pwrite_all(r->fd, ZERO_CHUNK, n, at)) {
            *at_out = at;
            return SCATTER_IO;
          }
          at += n;
        }
      }
    } else if (kind == ENTRY_DATA) {
      const uint8_t *src = payload + off;
      if (r->track) {
        for (uint32_t p = 0; p < count; p++) page_hash(&r->hashes[first + p], src + (size_t)p * ps, ps);
      }
      if (!pwrite_all(r->fd, src, (size_t)count * ps, dst)) {
        *at_out = dst;
        return SCATTER_IO;
      }
      /* A disk: start writing the blocks back now, without waiting. Left to the kernel's
       * own writeback, a migration's gigabytes pile up dirty until a pwrite here blocks in
       * its throttling (the agent's event loop with it), and the commit's fdatasync has
       * them all to write. A failure only means the commit's fdatasync does the work. */
      if (r->zero_holes) (void)sync_file_range(r->fd, (off_t)dst, (off_t)count * ps, SYNC_FILE_RANGE_WRITE);
      off += (size_t)count * ps;
    }
    /* Any other kind can only appear if the array changed under us: ignored. */
  }
  return 0;
}

/* regionScatter(region, entries, entryCount, payload) */
napi_value RegionScatter(napi_env env, napi_callback_info info) {
  static const char fn[] = "regionScatter";
  napi_value argv[4];
  region_t *r;
  uint32_t *entries;
  uint8_t *payload;
  size_t entries_len, payload_len;
  uint64_t entry_count;
  if (!get_args(env, info, 4, argv)) return NULL;
  if (!arg_region(env, argv[0], fn, false, &r)) return NULL;
  if (!arg_typed(env, argv[1], fn, "entries", napi_uint32_array, (void **)&entries,
                 &entries_len))
    return NULL;
  if (!arg_integer(env, argv[2], fn, "entryCount", 0, (double)(entries_len / 3), &entry_count))
    return NULL;
  if (!arg_typed(env, argv[3], fn, "payload", napi_uint8_array, (void **)&payload, &payload_len))
    return NULL;
  if (!r->writable) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: region is mapped read-only", fn);
    return NULL;
  }
  char msg[160];
  if (!scatter_check(r, entries, entry_count, payload_len, msg, sizeof msg)) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s", fn, msg);
    return NULL;
  }
  uint64_t at = 0;
  switch (scatter_apply(r, entries, entry_count, payload, payload_len, &at)) {
    case SCATTER_CHANGED:
      throw_fmt(env, ERR_ERROR, NULL, "%s: entries changed while being applied", fn);
      return NULL;
    case SCATTER_IO:
      return scatter_io_error(env, fn, at);
    default:
      return NULL;
  }
}
