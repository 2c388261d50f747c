// The semantic check of a pages frame against the region it targets, before anything is
// decompressed or written. The decoder has already checked the frame's structure; this
// checks what needs the region: bounds, and that entries, refs, rawBytes and payload agree.
// Where a ref copies from (its slot and source pages) is the dedup group's to check.
// Decompressed output is bounded here: an lz4 payload must announce exactly rawBytes, and
// rawBytes is bounded by the receiver's payload limit (ws permessage-deflate does the same).
import { Codec, EntryKind, describeCode } from './codes.js';
import { ErrorCode, ProtocolError } from './errors.js';
import { describeEntryKind } from './frame-schema.js';
import type { PagesFrame } from './frames.js';
import { ENTRY_WORDS, LZ4_SIZE_PREFIX_BYTES, MAX_ENTRIES_PER_BATCH, REF_WORDS, lz4CompressBound } from './limits.js';

export interface PagesSummary {
  /** Pages whose content is in the payload. */
  dataPages: number;
  /** Pages to be zeroed. */
  zeroPages: number;
  /** Pages to be copied from a slot (ref entries). */
  refPages: number;
}

/**
 * Throws ProtocolError GANGWAY_ERR_BAD_PAGES unless every entry lies inside a region of
 * `regionPageCount` pages, rawBytes is exactly the data pages' bytes and within
 * `maxPayloadBytes`, and the payload matches the codec: raw is exactly rawBytes; lz4 is an
 * lz4-napi block whose u32 LE size prefix equals rawBytes and whose length is within the
 * LZ4 worst case for rawBytes.
 */
export function validatePages(
  frame: PagesFrame,
  regionPageCount: number,
  pageSizeBytes: number,
  maxPayloadBytes: number,
): PagesSummary {
  const fail = (problem: string): never => {
    throw new ProtocolError(
      ErrorCode.BAD_PAGES,
      `pages (migration ${frame.migrationId}, region ${frame.region}, round ${frame.round}): ${problem}`,
    );
  };
  const { entries, rawBytes, payload } = frame;
  const entryCount = entries.length / ENTRY_WORDS;
  if (!Number.isInteger(entryCount) || entryCount < 1 || entryCount > MAX_ENTRIES_PER_BATCH) {
    fail(`${entries.length} entry words, expected 1..${MAX_ENTRIES_PER_BATCH} triples`);
  }

  let dataPages = 0;
  let zeroPages = 0;
  let refPages = 0;
  let refEntries = 0;
  for (let i = 0; i < entries.length; i += ENTRY_WORDS) {
    const kind = entries[i] ?? 0;
    const firstPage = entries[i + 1] ?? 0;
    const pageCount = entries[i + 2] ?? 0;
    const index = i / ENTRY_WORDS;
    if (pageCount < 1) fail(`entry ${index} has pageCount 0`);
    // u32 + u32 in a double cannot wrap, so a run past 2^32 is caught, not folded back.
    if (firstPage + pageCount > regionPageCount) {
      fail(`entry ${index} covers pages ${firstPage}..${firstPage + pageCount - 1}, past the region's ${regionPageCount} pages`);
    }
    if (kind === EntryKind.data) dataPages += pageCount;
    else if (kind === EntryKind.zero) zeroPages += pageCount;
    else if (kind === EntryKind.ref) {
      refPages += pageCount;
      refEntries++;
    } else fail(`entry ${index} has kind ${describeEntryKind(kind)}`);
  }
  const refWords = frame.refs?.length ?? 0;
  if (refWords !== refEntries * REF_WORDS) {
    fail(`${refEntries} ref entries but ${refWords / REF_WORDS} ref sources`);
  }

  if (!Number.isSafeInteger(rawBytes) || rawBytes < 0 || rawBytes > maxPayloadBytes) {
    fail(`rawBytes ${rawBytes} is out of range 0..${maxPayloadBytes}`);
  }
  if (rawBytes !== dataPages * pageSizeBytes) {
    fail(`rawBytes ${rawBytes} is not ${dataPages} data pages of ${pageSizeBytes} bytes`);
  }

  if (frame.codec === Codec.raw) {
    if (payload.length !== rawBytes) fail(`raw payload of ${payload.length} bytes, expected rawBytes ${rawBytes}`);
  } else if (frame.codec === Codec.lz4) {
    if (payload.length < LZ4_SIZE_PREFIX_BYTES) fail(`lz4 payload of ${payload.length} bytes has no size prefix`);
    const announced =
      ((payload[0] ?? 0) | ((payload[1] ?? 0) << 8) | ((payload[2] ?? 0) << 16) | ((payload[3] ?? 0) << 24)) >>> 0;
    if (announced !== rawBytes) fail(`lz4 size prefix ${announced} is not rawBytes ${rawBytes}`);
    const limit = LZ4_SIZE_PREFIX_BYTES + lz4CompressBound(rawBytes);
    if (payload.length > limit) fail(`lz4 payload of ${payload.length} bytes is over the worst case ${limit} for ${rawBytes} bytes`);
  } else {
    fail(`codec ${describeCode(Codec, frame.codec)} is not raw (1) or lz4 (2)`);
  }
  return { dataPages, zeroPages, refPages };
}
