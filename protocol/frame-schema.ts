// The header of every frame type: how a frame becomes a msgpack header plus payload, and how
// a decoded header is checked field by field back into a frame. Both directions go through
// the same readers, so the encoder refuses exactly what the decoder would reject.
import {
  Codec,
  EntryKind,
  FrameType,
  type FrameTypeName,
  GuestKind,
  RejectReason,
  Technique,
  Whereabouts,
  describeCode,
  frameTypeName,
} from './codes.js';
import { ErrorCode, ProtocolError } from './errors.js';
import { FieldReader, checkCode, checkString, describeValue, isPlainMap } from './fields.js';
import type { Frame, FrameOf, GuestConfigValue, GuestSpec, OfferDedup, RegionSpec } from './frames.js';
import {
  DEFAULT_MAX_PAYLOAD_BYTES,
  DIGEST_BYTES,
  ENTRY_BYTES,
  ENTRY_WORDS,
  ERROR_CODE_PATTERN,
  FEATURE_PATTERN,
  FINGERPRINT_BYTES,
  ID_PATTERN,
  MAGIC,
  MAX_CONFIG_KEYS,
  MAX_CONFIG_KEY_LENGTH,
  MAX_CONFIG_STRING_LENGTH,
  MAX_CREDIT_BYTES,
  MAX_DEVICE_STATE_BYTES,
  MAX_DEVICE_STATE_TOTAL_BYTES,
  MAX_DOWNTIME_BUDGET_MS,
  MAX_ENTRIES_PER_BATCH,
  MAX_ERROR_CODE_LENGTH,
  MAX_FEATURES,
  MAX_FEATURE_LENGTH,
  MAX_ID_LENGTH,
  MAX_AGENT_ID_LENGTH,
  MAX_MESSAGE_LENGTH,
  MAX_NAME_LENGTH,
  MAX_OFFER_CODECS,
  MAX_REGIONS,
  MAX_REGION_BYTES,
  MAX_REGION_PAGES,
  MAX_FINGERPRINTS_PER_FRAME,
  MAX_ROUND,
  MAX_TRAFFIC_BYTES_PER_SEC,
  MAX_WANT_RUNS,
  MAX_FETCH_RUNS,
  MIN_DOWNTIME_BUDGET_MS,
  MIN_MAX_PAYLOAD_BYTES,
  MIGRATION_SECRET_BYTES,
  NAME_PATTERN,
  PAGE_SIZE_MAX,
  PAGE_SIZE_MIN,
  PROTOCOL_VERSION,
  AGENT_VERSION_PATTERN,
  REF_WORDS,
  RESIDENT_SLOT_FLAG,
} from './limits.js';

/** What the reader knows beyond the header: the payload length from the frame prefix. */
export interface HeaderContext {
  payloadLength: number;
  /** The receiver's payload limit; pages.rawBytes may not exceed it either. */
  maxPayloadBytes: number;
}

export const EMPTY_PAYLOAD = new Uint8Array(0);

/** Frame types that carry a payload; every other type must arrive with none. */
export function carriesPayload(type: FrameTypeName): boolean {
  return type === 'pages' || type === 'deviceState' || type === 'dedupResident' || type === 'pageFingerprints' || type === 'postcopy';
}

// ---------------------------------------------------------------------------------------
// frame -> wire

/** The msgpack header fields (key 't' = FrameType) and the payload of a frame. */
export function frameToWire(frame: Frame): { header: Record<string, unknown>; payload: Uint8Array } {
  switch (frame.type) {
    case 'pages': {
      const { type, payload, entries, refs, ...fields } = frame;
      const wireEntries = entries instanceof Uint32Array ? entriesToBytes(entries) : entries;
      const header: Record<string, unknown> = { t: FrameType[type], ...fields, entries: wireEntries };
      if (refs !== undefined) header['refs'] = refs instanceof Uint32Array ? entriesToBytes(refs) : refs;
      return { header, payload };
    }
    case 'want': {
      const { type, runs, stale, ...fields } = frame;
      const bytes = (words: Uint32Array) => (words instanceof Uint32Array ? entriesToBytes(words) : words);
      return { header: { t: FrameType[type], ...fields, runs: bytes(runs), stale: bytes(stale) }, payload: EMPTY_PAYLOAD };
    }
    case 'fetch': {
      const { type, runs, ...fields } = frame;
      return { header: { t: FrameType[type], ...fields, runs: runs instanceof Uint32Array ? entriesToBytes(runs) : runs }, payload: EMPTY_PAYLOAD };
    }
    case 'postcopy': {
      const { type, missing, ...fields } = frame;
      return { header: { t: FrameType[type], ...fields }, payload: missing instanceof Uint32Array ? entriesToBytes(missing) : missing };
    }
    case 'dedupResident':
    case 'pageFingerprints': {
      const { type, fingerprints, ...fields } = frame;
      return { header: { t: FrameType[type], ...fields }, payload: fingerprints };
    }
    case 'deviceState': {
      const { type, state, ...fields } = frame;
      return { header: { t: FrameType[type], ...fields }, payload: state };
    }
    default: {
      const { type, ...fields } = frame;
      // An unknown name gives t: undefined, which the header check refuses.
      return { header: { t: FrameType[type], ...fields }, payload: EMPTY_PAYLOAD };
    }
  }
}

// ---------------------------------------------------------------------------------------
// wire -> frame

/**
 * Checks a decoded header and returns its frame. A frame with a payload comes back with an
 * empty one: the caller attaches the payload bytes with withPayload() once they arrive, so
 * a bad header is rejected before its payload is buffered.
 */
export function readFrameHeader(header: unknown, context: HeaderContext): Frame {
  if (!isPlainMap(header)) {
    throw new ProtocolError(ErrorCode.PROTOCOL, `frame header: expected a map, got ${describeValue(header)}`);
  }
  if (!Object.hasOwn(header, 't')) {
    throw new ProtocolError(ErrorCode.PROTOCOL, "frame header: missing the frame type 't'");
  }
  const t = header['t'];
  if (typeof t !== 'number' || !Number.isInteger(t)) {
    throw new ProtocolError(ErrorCode.PROTOCOL, `frame header.t: expected a frame type code, got ${describeValue(t)}`);
  }
  const type = frameTypeName(t);
  if (type === undefined) {
    throw new ProtocolError(ErrorCode.UNKNOWN_FRAME, `frame header.t: ${describeCode(FrameType, t)} is not a frame type`);
  }
  if (context.payloadLength > 0 && !carriesPayload(type)) {
    throw new ProtocolError(
      ErrorCode.PROTOCOL,
      `${type}: unexpected payload of ${context.payloadLength} bytes (this frame type carries none)`,
    );
  }
  if (type === 'deviceState' && context.payloadLength > MAX_DEVICE_STATE_BYTES) {
    throw new ProtocolError(
      ErrorCode.FRAME_TOO_LARGE,
      `deviceState: state of ${context.payloadLength} bytes is over the limit of ${MAX_DEVICE_STATE_BYTES}`,
    );
  }
  const reader = new FieldReader(type, header);
  reader.skip('t');
  const frame = readers[type](reader, context);
  reader.done();
  return frame;
}

/** Puts the payload bytes into a frame from readFrameHeader. */
export function withPayload(frame: Frame, payload: Uint8Array): Frame {
  if (frame.type === 'pages') frame.payload = payload;
  else if (frame.type === 'deviceState') frame.state = payload;
  else if (frame.type === 'dedupResident' || frame.type === 'pageFingerprints') frame.fingerprints = payload;
  else if (frame.type === 'postcopy') frame.missing = runsFromPayload(payload);
  return frame;
}

type Readers = { [K in FrameTypeName]: (r: FieldReader, context: HeaderContext) => FrameOf<K> };

const readers: Readers = {
  hello(r) {
    // Magic and version first: a stranger or another version gets that answer, not a
    // complaint about some field it lays out differently.
    const magic = r.optional('magic');
    if (magic !== MAGIC) {
      const got = magic === undefined ? 'missing' : `${describeValue(magic)} is not '${MAGIC}'`;
      r.fail('magic', `${got}: the peer is not a gangway agent`, ErrorCode.PROTOCOL_MAGIC);
    }
    const version = r.optional('version');
    if (version !== PROTOCOL_VERSION) {
      // Named when the peer says it (protocol 3 on): which build to upgrade.
      const peerVersion = r.optional('agentVersion');
      const named = typeof peerVersion === 'string' && AGENT_VERSION_PATTERN.test(peerVersion) ? ` (gangway ${peerVersion})` : '';
      const got = version === undefined ? 'missing' : `the peer${named} speaks protocol version ${describeValue(version)}`;
      r.fail('version', `${got}, this agent speaks ${PROTOCOL_VERSION}: run the same gangway release on both hosts`, ErrorCode.PROTOCOL_VERSION);
    }
    const agentId = r.string('agentId', 1, MAX_AGENT_ID_LENGTH, ID_PATTERN);
    const agentVersion = r.string('agentVersion', 1, 64, AGENT_VERSION_PATTERN);
    const features = r.list('features', 0, MAX_FEATURES, (v, fail) =>
      checkString(v, 1, MAX_FEATURE_LENGTH, FEATURE_PATTERN, fail),
    );
    if (new Set(features).size !== features.length) r.fail('features', 'lists a feature twice');
    const maxPayloadBytes = r.integer('maxPayloadBytes', MIN_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PAYLOAD_BYTES);
    return { type: 'hello', magic: MAGIC, version: PROTOCOL_VERSION, agentId, agentVersion, features, maxPayloadBytes };
  },

  offer(r) {
    const migrationId = readMigrationId(r);
    const guestReader = r.map('guest');
    const guest = readGuest(guestReader);
    guestReader.done();
    const technique = r.code('technique', Technique);
    const downtimeBudgetMs = r.number('downtimeBudgetMs', MIN_DOWNTIME_BUDGET_MS, MAX_DOWNTIME_BUDGET_MS);
    const codecs = r.list('codecs', 1, MAX_OFFER_CODECS, (v, fail) => checkCode(v, Codec, fail));
    if (new Set(codecs).size !== codecs.length) r.fail('codecs', 'lists a codec twice');
    const offer: FrameOf<'offer'> = { type: 'offer', migrationId, guest, technique, downtimeBudgetMs, codecs };
    if (r.optional('dedup') !== undefined) {
      const dedupReader = r.map('dedup');
      offer.dedup = readOfferDedup(dedupReader, guest.regions.length);
      dedupReader.done();
    }
    const priority = r.optional('priority');
    if (priority !== undefined) {
      if (priority !== 'high' && priority !== 'medium' && priority !== 'low') r.fail('priority', `expected high, medium or low, got ${describeValue(priority)}`);
      offer.priority = priority as 'high' | 'medium' | 'low';
    }
    return offer;
  },

  accept(r) {
    const migrationId = readMigrationId(r);
    const creditBytes = r.integer('creditBytes', 1, MAX_CREDIT_BYTES);
    const secret = r.bytes('secret', MIGRATION_SECRET_BYTES, MIGRATION_SECRET_BYTES);
    return { type: 'accept', migrationId, creditBytes, secret };
  },

  reject(r) {
    const migrationId = readMigrationId(r);
    const reason = r.code('reason', RejectReason);
    const message = r.string('message', 0, MAX_MESSAGE_LENGTH);
    return { type: 'reject', migrationId, reason, message };
  },

  pages(r, context) {
    const migrationId = readMigrationId(r);
    const region = r.integer('region', 0, MAX_REGIONS - 1);
    const round = r.integer('round', 0, MAX_ROUND);
    const codec = r.code('codec', Codec);
    const entries = readEntries(r);
    const rawBytes = r.integer('rawBytes', 0, context.maxPayloadBytes, ErrorCode.BAD_PAGES);
    const frame: FrameOf<'pages'> = { type: 'pages', migrationId, region, round, codec, entries, rawBytes, payload: EMPTY_PAYLOAD };
    let refEntries = 0;
    for (let i = 0; i < entries.length; i += ENTRY_WORDS) if (entries[i] === EntryKind.ref) refEntries++;
    if (r.optional('refs') !== undefined) {
      const bytes = r.bytes('refs', 0, MAX_ENTRIES_PER_BATCH * REF_WORDS * 4, ErrorCode.BAD_PAGES);
      if (bytes.length !== refEntries * REF_WORDS * 4) {
        r.fail('refs', `${bytes.length} bytes for ${refEntries} ref entries, expected ${refEntries * REF_WORDS * 4}`, ErrorCode.BAD_PAGES);
      }
      frame.refs = entriesFromBytes(bytes);
    } else if (refEntries > 0) {
      r.fail('refs', `missing, and ${refEntries} entries are refs`, ErrorCode.BAD_PAGES);
    }
    return frame;
  },

  roundEnd(r) {
    const migrationId = readMigrationId(r);
    const round = r.integer('round', 0, MAX_ROUND);
    const pageCount = r.integer('pageCount', 0, MAX_REGIONS * MAX_REGION_PAGES);
    const final = r.boolean('final');
    return { type: 'roundEnd', migrationId, round, pageCount, final };
  },

  pause: (r) => ({ type: 'pause', migrationId: readMigrationId(r) }),

  standbyReady: (r) => ({ type: 'standbyReady', migrationId: readMigrationId(r) }),

  deviceState(r, context) {
    const migrationId = readMigrationId(r);
    const offsetBytes = r.integer('offsetBytes', 0, MAX_DEVICE_STATE_TOTAL_BYTES);
    const totalBytes = r.integer('totalBytes', 1, MAX_DEVICE_STATE_TOTAL_BYTES);
    if (offsetBytes + context.payloadLength > totalBytes) {
      r.fail('offsetBytes', `a chunk of ${context.payloadLength} bytes at ${offsetBytes} runs past the state's ${totalBytes} bytes`);
    }
    if (context.payloadLength === 0) r.fail('state', 'a chunk carries at least one byte (a guest without device state sends no deviceState)');
    return { type: 'deviceState', migrationId, offsetBytes, totalBytes, state: EMPTY_PAYLOAD };
  },

  verify(r) {
    const migrationId = readMigrationId(r);
    const digests = readDigests(r);
    return { type: 'verify', migrationId, digests };
  },

  verified(r) {
    const migrationId = readMigrationId(r);
    const match = r.boolean('match');
    const digests = readDigests(r);
    const frame: FrameOf<'verified'> = { type: 'verified', migrationId, match, digests };
    if (r.optional('postcopy') !== undefined) {
      const p = r.map('postcopy');
      const count = (field: string) => p.integer(field, 0, Number.MAX_SAFE_INTEGER);
      const ms = (field: string) => p.number(field, 0, 1e12);
      frame.postcopy = {
        missingPages: count('missingPages'),
        faults: count('faults'),
        fetchedPages: count('fetchedPages'),
        pushedPages: count('pushedPages'),
        faultP50Ms: ms('faultP50Ms'),
        faultP99Ms: ms('faultP99Ms'),
        faultMaxMs: ms('faultMaxMs'),
      };
      p.done();
    }
    return frame;
  },

  commit: (r) => ({ type: 'commit', migrationId: readMigrationId(r) }),

  committed(r) {
    const migrationId = readMigrationId(r);
    const resumeToSendMs = r.number('resumeToSendMs', 0, Number.MAX_VALUE);
    return { type: 'committed', migrationId, resumeToSendMs };
  },

  abort(r) {
    const migrationId = readMigrationId(r);
    const code = r.string('code', 1, MAX_ERROR_CODE_LENGTH, ERROR_CODE_PATTERN);
    const message = r.string('message', 0, MAX_MESSAGE_LENGTH);
    return { type: 'abort', migrationId, code, message };
  },

  credit(r) {
    const migrationId = readMigrationId(r);
    const bytes = r.integer('bytes', 1, MAX_CREDIT_BYTES);
    return { type: 'credit', migrationId, bytes };
  },

  error(r) {
    const code = r.string('code', 1, MAX_ERROR_CODE_LENGTH, ERROR_CODE_PATTERN);
    const message = r.string('message', 0, MAX_MESSAGE_LENGTH);
    return { type: 'error', code, message };
  },

  dedupOpen(r) {
    const group = readGroup(r);
    const resident = r.boolean('resident');
    return { type: 'dedupOpen', group, resident };
  },

  dedupResident(r, context) {
    const group = readGroup(r);
    const slot = r.integer('slot', RESIDENT_SLOT_FLAG, 0xffff_ffff);
    const pageCount = r.integer('pageCount', 1, MAX_REGION_PAGES - 1);
    const pageSizeBytes = r.integer('pageSizeBytes', PAGE_SIZE_MIN, PAGE_SIZE_MAX);
    if ((pageSizeBytes & (pageSizeBytes - 1)) !== 0) r.fail('pageSizeBytes', `${pageSizeBytes} is not a power of two`);
    const firstPage = r.integer('firstPage', 0, pageCount - 1);
    const count = fingerprintCount(r, context);
    if (firstPage + count > pageCount) {
      r.fail('firstPage', `${count} fingerprints from page ${firstPage} run past the slot's ${pageCount} pages`);
    }
    return { type: 'dedupResident', group, slot, pageCount, pageSizeBytes, firstPage, fingerprints: EMPTY_PAYLOAD };
  },

  dedupReady(r) {
    const group = readGroup(r);
    const residentSlots = r.integer('residentSlots', 0, 0x7fff_ffff);
    const residentPages = r.integer('residentPages', 0, Number.MAX_SAFE_INTEGER);
    return { type: 'dedupReady', group, residentSlots, residentPages };
  },

  dedupClose: (r) => ({ type: 'dedupClose', group: readGroup(r) }),

  pageFingerprints(r, context) {
    const migrationId = readMigrationId(r);
    const region = r.integer('region', 0, MAX_REGIONS - 1);
    const firstPage = r.integer('firstPage', 0, MAX_REGION_PAGES - 1);
    fingerprintCount(r, context);
    return { type: 'pageFingerprints', migrationId, region, firstPage, fingerprints: EMPTY_PAYLOAD };
  },

  trafficQuery: (r) => ({ type: 'trafficQuery', requestId: readRequestId(r) }),

  trafficReport(r) {
    const requestId = readRequestId(r);
    const measured = r.boolean('measured');
    const rxBytesPerSec = r.number('rxBytesPerSec', 0, MAX_TRAFFIC_BYTES_PER_SEC);
    const txBytesPerSec = r.number('txBytesPerSec', 0, MAX_TRAFFIC_BYTES_PER_SEC);
    const linkBytesPerSec = r.number('linkBytesPerSec', 0, MAX_TRAFFIC_BYTES_PER_SEC);
    const reason = r.string('reason', 0, MAX_MESSAGE_LENGTH);
    return { type: 'trafficReport', requestId, measured, rxBytesPerSec, txBytesPerSec, linkBytesPerSec, reason };
  },

  want(r) {
    const migrationId = readMigrationId(r);
    const region = r.integer('region', 0, MAX_REGIONS - 1);
    const bytes = r.bytes('runs', 8, MAX_WANT_RUNS * 8, ErrorCode.BAD_PAGES);
    if (bytes.length % 8 !== 0) r.fail('runs', `${bytes.length} bytes is not a whole number of 8-byte runs`, ErrorCode.BAD_PAGES);
    const runs = entriesFromBytes(bytes);
    for (let i = 0; i < runs.length; i += 2) {
      if (runs[i + 1] === 0) r.fail('runs', `run ${i / 2} has pageCount 0`, ErrorCode.BAD_PAGES);
    }
    const staleBytes = r.bytes('stale', 0, MAX_WANT_RUNS * 8, ErrorCode.BAD_PAGES);
    if (staleBytes.length % 8 !== 0) r.fail('stale', `${staleBytes.length} bytes is not a whole number of 8-byte pairs`, ErrorCode.BAD_PAGES);
    // A slot without the resident flag is a committed member's (dedup-committed); the source
    // forgets what it knows of any pair's page, and ignores a pair that names no resident slot.
    const stale = entriesFromBytes(staleBytes);
    return { type: 'want', migrationId, region, runs, stale };
  },

  postcopy(r, context) {
    const migrationId = readMigrationId(r);
    const region = r.integer('region', 0, MAX_REGIONS - 1);
    const more = r.boolean('more');
    if (context.payloadLength % 8 !== 0) {
      r.fail('missing', `payload of ${context.payloadLength} bytes is not a whole number of 8-byte runs`, ErrorCode.BAD_PAGES);
    }
    return { type: 'postcopy', migrationId, region, more, missing: new Uint32Array(0) };
  },

  reattach: (r) => ({ type: 'reattach', migrationId: readMigrationId(r), secret: r.bytes('secret', MIGRATION_SECRET_BYTES, MIGRATION_SECRET_BYTES) }),

  migrationQuery: (r) => ({ type: 'migrationQuery', migrationId: readMigrationId(r) }),

  migrationAnswer(r) {
    const migrationId = readMigrationId(r);
    const whereabouts = r.code('whereabouts', Whereabouts);
    return { type: 'migrationAnswer', migrationId, whereabouts };
  },

  fetch(r) {
    const migrationId = readMigrationId(r);
    const region = r.integer('region', 0, MAX_REGIONS - 1);
    const runs = readRuns(r, 'runs', MAX_FETCH_RUNS);
    return { type: 'fetch', migrationId, region, runs };
  },
};

/** A postcopy payload's runs (its length was checked with the header). */
function runsFromPayload(payload: Uint8Array): Uint32Array {
  const runs = entriesFromBytes(payload);
  for (let i = 0; i < runs.length; i += 2) {
    if (runs[i + 1] === 0) throw new ProtocolError(ErrorCode.BAD_PAGES, `postcopy.missing: run ${i / 2} has pageCount 0`);
  }
  return runs;
}

/** Pairs [firstPage, pageCount] with no empty run, in 8..maxRuns*8 bytes of `field`. */
function readRuns(r: FieldReader, field: string, maxRuns: number): Uint32Array {
  const bytes = r.bytes(field, 8, maxRuns * 8, ErrorCode.BAD_PAGES);
  if (bytes.length % 8 !== 0) r.fail(field, `${bytes.length} bytes is not a whole number of 8-byte runs`, ErrorCode.BAD_PAGES);
  const runs = entriesFromBytes(bytes);
  for (let i = 0; i < runs.length; i += 2) {
    if (runs[i + 1] === 0) r.fail(field, `run ${i / 2} has pageCount 0`, ErrorCode.BAD_PAGES);
  }
  return runs;
}

/** The fingerprints a dedupResident or pageFingerprints payload holds: 1..MAX_FINGERPRINTS_PER_FRAME whole ones. */
function fingerprintCount(r: FieldReader, { payloadLength }: HeaderContext): number {
  if (payloadLength === 0 || payloadLength % FINGERPRINT_BYTES !== 0 || payloadLength / FINGERPRINT_BYTES > MAX_FINGERPRINTS_PER_FRAME) {
    r.fail('fingerprints', `payload of ${payloadLength} bytes, expected 1..${MAX_FINGERPRINTS_PER_FRAME} fingerprints of ${FINGERPRINT_BYTES} bytes`);
  }
  return payloadLength / FINGERPRINT_BYTES;
}

function readGroup(r: FieldReader): string {
  return r.string('group', 1, MAX_ID_LENGTH, ID_PATTERN);
}

function readOfferDedup(r: FieldReader, regionCount: number): OfferDedup {
  const group = readGroup(r);
  const slots = r.list('slots', regionCount, regionCount, (v, fail) => {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v >= RESIDENT_SLOT_FLAG) {
      return fail(`expected an integer slot in 0..${RESIDENT_SLOT_FLAG - 1}, got ${describeValue(v)}`);
    }
    return v;
  });
  if (new Set(slots).size !== slots.length) r.fail('slots', 'lists a slot twice');
  return { group, slots };
}

function readRequestId(r: FieldReader): string {
  return r.string('requestId', 1, MAX_ID_LENGTH, ID_PATTERN);
}

function readMigrationId(r: FieldReader): string {
  return r.string('migrationId', 1, MAX_ID_LENGTH, ID_PATTERN);
}

function readGuest(r: FieldReader): GuestSpec {
  const name = r.string('name', 1, MAX_NAME_LENGTH, NAME_PATTERN);
  const kind = r.code('kind', GuestKind);
  const regions = r.list('regions', 1, MAX_REGIONS, (v, fail, index) => {
    if (!isPlainMap(v)) return fail(`expected a map, got ${describeValue(v)}`);
    const regionReader = new FieldReader(`${r.path}.regions[${index}]`, v);
    const region = readRegion(regionReader);
    regionReader.done();
    return region;
  });
  if (new Set(regions.map((region) => region.name)).size !== regions.length) {
    r.fail('regions', 'two regions have the same name');
  }
  const config: Record<string, GuestConfigValue> = {};
  for (const [key, value] of r.entries('config', MAX_CONFIG_KEYS)) {
    config[key] = checkConfigEntry(key, value, (problem) => r.fail(`config[${JSON.stringify(key.slice(0, 64))}]`, problem));
  }
  return { name, kind, regions, config };
}

function checkConfigEntry(key: string, value: unknown, fail: (problem: string) => never): GuestConfigValue {
  if (key.length < 1 || key.length > MAX_CONFIG_KEY_LENGTH) {
    fail(`key of ${key.length} chars, expected 1..${MAX_CONFIG_KEY_LENGTH}`);
  }
  // Assigning it would replace the config object's prototype instead of adding a key.
  if (key === '__proto__') fail('the key __proto__ is not allowed');
  if (typeof value === 'string') {
    if (value.length > MAX_CONFIG_STRING_LENGTH) {
      fail(`string of ${value.length} chars, expected at most ${MAX_CONFIG_STRING_LENGTH}`);
    }
    return value;
  }
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) fail(`expected a finite number, got ${value}`);
    return value;
  }
  if (typeof value === 'boolean') return value;
  return fail(`expected a string, number or boolean, got ${describeValue(value)}`);
}

function readRegion(r: FieldReader): RegionSpec {
  const name = r.string('name', 1, MAX_NAME_LENGTH, NAME_PATTERN);
  const pageSizeBytes = r.integer('pageSizeBytes', PAGE_SIZE_MIN, PAGE_SIZE_MAX);
  if ((pageSizeBytes & (pageSizeBytes - 1)) !== 0) r.fail('pageSizeBytes', `${pageSizeBytes} is not a power of two`);
  const lengthBytes = r.integer('lengthBytes', 1, MAX_REGION_BYTES);
  if (lengthBytes % pageSizeBytes !== 0) {
    r.fail('lengthBytes', `${lengthBytes} is not a multiple of the page size ${pageSizeBytes}`);
  }
  if (lengthBytes / pageSizeBytes > MAX_REGION_PAGES) {
    r.fail('lengthBytes', `${lengthBytes / pageSizeBytes} pages, more than page indices (u32) can address`);
  }
  return { name, lengthBytes, pageSizeBytes };
}

function readDigests(r: FieldReader): Uint8Array[] {
  return r.list('digests', 1, MAX_REGIONS, (v, fail) => {
    if (!(v instanceof Uint8Array)) return fail(`expected binary, got ${describeValue(v)}`);
    if (v.length !== DIGEST_BYTES) return fail(`${v.length} bytes, expected ${DIGEST_BYTES}`);
    return v;
  });
}

/** Structural checks only; bounds against the region are validatePages' job. */
function readEntries(r: FieldReader): Uint32Array {
  const bytes = r.bytes('entries', ENTRY_BYTES, MAX_ENTRIES_PER_BATCH * ENTRY_BYTES, ErrorCode.BAD_PAGES);
  if (bytes.length % ENTRY_BYTES !== 0) {
    r.fail('entries', `${bytes.length} bytes is not a whole number of ${ENTRY_BYTES}-byte entries`, ErrorCode.BAD_PAGES);
  }
  const entries = entriesFromBytes(bytes);
  for (let i = 0; i < entries.length; i += ENTRY_WORDS) {
    const kind = entries[i] ?? 0;
    if (kind !== EntryKind.zero && kind !== EntryKind.data && kind !== EntryKind.ref) {
      r.fail('entries', `entry ${i / ENTRY_WORDS} has kind ${describeEntryKind(kind)}`, ErrorCode.BAD_PAGES);
    }
    if (entries[i + 2] === 0) r.fail('entries', `entry ${i / ENTRY_WORDS} has pageCount 0`, ErrorCode.BAD_PAGES);
  }
  return entries;
}

export function describeEntryKind(kind: number): string {
  return `${describeCode(EntryKind, kind)}, expected zero (1), data (2) or ref (3)`;
}

// ---------------------------------------------------------------------------------------
// entries: u32 triples, little-endian on the wire

const littleEndianHost = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** A view of `entries` as little-endian bytes (a copy only on a big-endian host). */
export function entriesToBytes(entries: Uint32Array): Uint8Array {
  if (littleEndianHost) return new Uint8Array(entries.buffer, entries.byteOffset, entries.byteLength);
  const out = new Uint8Array(entries.byteLength);
  const view = new DataView(out.buffer);
  entries.forEach((word, i) => view.setUint32(i * 4, word, true));
  return out;
}

/**
 * Entries from little-endian bytes: a view when the bytes are 4-aligned (little-endian
 * host), else an aligned copy. `bytes.length` must be a multiple of 4.
 */
export function entriesFromBytes(bytes: Uint8Array): Uint32Array {
  const words = bytes.length / 4;
  if (littleEndianHost && bytes.byteOffset % 4 === 0) return new Uint32Array(bytes.buffer, bytes.byteOffset, words);
  const out = new Uint32Array(words);
  if (littleEndianHost) {
    new Uint8Array(out.buffer).set(bytes);
  } else {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    for (let i = 0; i < words; i++) out[i] = view.getUint32(i * 4, true);
  }
  return out;
}
