// Valid frames of every type: a typical one, and one at every size limit. Fixtures for the
// protocol's tests and for anyone checking a peer implementation against this one; not
// part of the runtime API (index.ts does not export them).
import { Codec, EntryKind, GuestKind, RejectReason, Technique, Whereabouts } from './codes.js';
import { ErrorCode } from './errors.js';
import { Frame, type RegionSpec } from './frames.js';
import {
  DEFAULT_MAX_PAYLOAD_BYTES,
  DIGEST_BYTES,
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
  MAX_REGIONS,
  MAX_REGION_BYTES,
  MAX_REGION_PAGES,
  MAX_FINGERPRINTS_PER_FRAME,
  MAX_TRAFFIC_BYTES_PER_SEC,
  MAX_ROUND,
  MAX_WANT_RUNS,
  MAX_FETCH_RUNS,
  MIGRATION_SECRET_BYTES,
  FINGERPRINT_BYTES,
  PAGE_SIZE_MAX,
  REF_WORDS,
  RESIDENT_SLOT_FLAG,
} from './limits.js';

const id = 'mig-0001';

/** Deterministic filler so fixtures compare by content. */
function bytes(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = (i * 31 + seed) & 0xff;
  return out;
}

/** One ordinary frame of every type (payloads of a few hundred bytes at most). */
export function exampleFrames(): Frame[] {
  return [
    Frame.hello({ agentId: 'host-a', agentVersion: '0.1.0', features: ['lz4', 'dedup'], maxPayloadBytes: DEFAULT_MAX_PAYLOAD_BYTES }),
    Frame.offer({
      migrationId: id,
      guest: {
        name: 'web-1',
        kind: GuestKind.process,
        regions: [{ name: 'ram', lengthBytes: 64 * 1024 * 1024, pageSizeBytes: 4096 }],
        config: { argv: 'gangway-guest --profile text', dirtyRatePagesPerSec: 1000, verbose: false },
      },
      technique: Technique.precopy,
      downtimeBudgetMs: 300,
      codecs: [Codec.raw, Codec.lz4],
      dedup: { group: 'gang-1', slots: [0] },
      priority: 'high',
    }),
    Frame.accept({ migrationId: id, creditBytes: 8 * 1024 * 1024, secret: bytes(MIGRATION_SECRET_BYTES, 11) }),
    Frame.reject({ migrationId: id, reason: RejectReason.noSpace, message: '/dev/shm has 1 GiB free' }),
    Frame.pages({
      migrationId: id,
      region: 0,
      round: 2,
      codec: Codec.raw,
      entries: Uint32Array.of(EntryKind.data, 10, 1, EntryKind.zero, 11, 5, EntryKind.data, 40, 1),
      rawBytes: 2 * 512,
      payload: bytes(2 * 512, 7),
    }),
    Frame.roundEnd({ migrationId: id, round: 2, pageCount: 1234, final: false }),
    Frame.pause({ migrationId: id }),
    Frame.deviceState({ migrationId: id, offsetBytes: 1000, totalBytes: 1300, state: bytes(300, 3) }),
    Frame.verify({ migrationId: id, digests: [bytes(DIGEST_BYTES, 1)] }),
    Frame.verified({ migrationId: id, match: true, digests: [bytes(DIGEST_BYTES, 1)] }),
    Frame.commit({ migrationId: id }),
    Frame.committed({ migrationId: id, resumeToSendMs: 1.25 }),
    Frame.abort({ migrationId: id, code: ErrorCode.NON_CONVERGENCE, message: 'dirty rate above link rate' }),
    Frame.credit({ migrationId: id, bytes: 1_048_576 }),
    Frame.error({ code: ErrorCode.PROTOCOL, message: 'pages.codec: unknown (9) is not one of raw (1), lz4 (2)' }),
    Frame.pages({
      migrationId: id,
      region: 0,
      round: 1,
      codec: Codec.raw,
      entries: Uint32Array.of(EntryKind.ref, 3, 2, EntryKind.data, 5, 1, EntryKind.ref, 9, 1),
      rawBytes: 512,
      payload: bytes(512, 11),
      refs: Uint32Array.of(1, 100, RESIDENT_SLOT_FLAG + 2, 7),
    }),
    Frame.dedupOpen({ group: 'gang-1', resident: true }),
    Frame.dedupResident({ group: 'gang-1', slot: RESIDENT_SLOT_FLAG + 2, pageCount: 100, pageSizeBytes: 4096, firstPage: 96, fingerprints: bytes(4 * FINGERPRINT_BYTES, 5) }),
    Frame.dedupReady({ group: 'gang-1', residentSlots: 1, residentPages: 100 }),
    Frame.dedupClose({ group: 'gang-1' }),
    Frame.want({ migrationId: id, region: 0, runs: Uint32Array.of(5, 1, 9, 3), stale: Uint32Array.of(RESIDENT_SLOT_FLAG + 2, 7) }),
    Frame.pageFingerprints({ migrationId: id, region: 0, firstPage: 64, fingerprints: bytes(3 * FINGERPRINT_BYTES, 8) }),
    Frame.trafficQuery({ requestId: 'plan-1' }),
    Frame.trafficReport({ requestId: 'plan-1', measured: true, rxBytesPerSec: 12_500_000.5, txBytesPerSec: 3_000_000, linkBytesPerSec: 125_000_000, reason: '' }),
    Frame.postcopy({ migrationId: id, region: 0, more: false, missing: Uint32Array.of(1, 99, 200, 3) }),
    Frame.fetch({ migrationId: id, region: 0, runs: Uint32Array.of(42, 1) }),
    Frame.reattach({ migrationId: id, secret: bytes(MIGRATION_SECRET_BYTES, 11) }),
    Frame.migrationQuery({ migrationId: id }),
    Frame.migrationAnswer({ migrationId: id, whereabouts: Whereabouts.running }),
    Frame.standbyReady({ migrationId: id }),
    Frame.verified({
      migrationId: id,
      match: true,
      digests: [bytes(DIGEST_BYTES, 2)],
      postcopy: { missingPages: 100, faults: 3, fetchedPages: 3, pushedPages: 97, faultP50Ms: 0.25, faultP99Ms: 1.5, faultMaxMs: 2 },
    }),
  ];
}

/** Every type with every field at its largest legal size (payloads up to 16 MiB). */
export function largestFrames(): Frame[] {
  const longId = 'i'.repeat(MAX_ID_LENGTH);
  const text = 'm'.repeat(MAX_MESSAGE_LENGTH);
  const code = `GANGWAY_ERR_${'X'.repeat(MAX_ERROR_CODE_LENGTH - 'GANGWAY_ERR_'.length)}`;
  const regions: RegionSpec[] = Array.from({ length: MAX_REGIONS }, (_, i) => ({
    name: `r${String(i).padStart(2, '0')}`.padEnd(MAX_NAME_LENGTH, 'x'),
    lengthBytes: MAX_REGION_BYTES,
    pageSizeBytes: MAX_REGION_BYTES / MAX_REGION_PAGES,
  }));
  const config: Record<string, string> = {};
  for (let i = 0; i < MAX_CONFIG_KEYS; i++) {
    config[`k${String(i).padStart(2, '0')}`.padEnd(MAX_CONFIG_KEY_LENGTH, 'k')] = 'v'.repeat(MAX_CONFIG_STRING_LENGTH);
  }
  // Alternating one-page data and zero entries: half the entries carry a 4 KiB page each,
  // which fills the largest payload exactly.
  const pageSizeBytes = 4096;
  const entries = new Uint32Array(MAX_ENTRIES_PER_BATCH * 3);
  for (let i = 0; i < MAX_ENTRIES_PER_BATCH; i++) {
    entries.set([i % 2 === 0 ? EntryKind.data : EntryKind.zero, 0xffffffff - MAX_ENTRIES_PER_BATCH + i, 1], i * 3);
  }
  const rawBytes = (MAX_ENTRIES_PER_BATCH / 2) * pageSizeBytes;
  const refEntries = new Uint32Array(MAX_ENTRIES_PER_BATCH * 3);
  for (let i = 0; i < MAX_ENTRIES_PER_BATCH; i++) refEntries.set([EntryKind.ref, 0xffffffff - MAX_ENTRIES_PER_BATCH + i, 1], i * 3);
  const digests = Array.from({ length: MAX_REGIONS }, (_, i) => bytes(DIGEST_BYTES, i));
  return [
    Frame.hello({
      agentId: `sha256:${'f'.repeat(MAX_AGENT_ID_LENGTH - 7)}`,
      agentVersion: `1.${'0'.repeat(62)}`,
      features: Array.from({ length: MAX_FEATURES }, (_, i) => `f${String(i).padStart(2, '0')}`.padEnd(MAX_FEATURE_LENGTH, 'f')),
      maxPayloadBytes: DEFAULT_MAX_PAYLOAD_BYTES,
    }),
    Frame.offer({
      migrationId: longId,
      guest: { name: 'g'.repeat(MAX_NAME_LENGTH), kind: GuestKind.qemu, regions, config },
      technique: Technique.hybrid,
      downtimeBudgetMs: MAX_DOWNTIME_BUDGET_MS,
      codecs: [Codec.lz4, Codec.raw],
    }),
    Frame.accept({ migrationId: longId, creditBytes: MAX_CREDIT_BYTES, secret: bytes(MIGRATION_SECRET_BYTES, 255) }),
    Frame.reject({ migrationId: longId, reason: RejectReason.versionMismatch, message: text }),
    Frame.pages({
      migrationId: longId,
      region: MAX_REGIONS - 1,
      round: MAX_ROUND,
      codec: Codec.raw,
      entries,
      rawBytes,
      payload: bytes(rawBytes, 9),
    }),
    Frame.roundEnd({ migrationId: longId, round: MAX_ROUND, pageCount: MAX_REGIONS * MAX_REGION_PAGES, final: true }),
    Frame.pause({ migrationId: longId }),
    Frame.deviceState({ migrationId: longId, offsetBytes: MAX_DEVICE_STATE_TOTAL_BYTES - MAX_DEVICE_STATE_BYTES, totalBytes: MAX_DEVICE_STATE_TOTAL_BYTES, state: bytes(MAX_DEVICE_STATE_BYTES, 5) }),
    Frame.verify({ migrationId: longId, digests }),
    Frame.verified({ migrationId: longId, match: false, digests }),
    Frame.commit({ migrationId: longId }),
    Frame.committed({ migrationId: longId, resumeToSendMs: 1e12 + 0.5 }),
    Frame.abort({ migrationId: longId, code, message: text }),
    Frame.credit({ migrationId: longId, bytes: MAX_CREDIT_BYTES }),
    Frame.error({ code, message: text }),
    Frame.pages({
      migrationId: longId,
      region: MAX_REGIONS - 1,
      round: MAX_ROUND,
      codec: Codec.raw,
      entries: refEntries,
      rawBytes: 0,
      payload: new Uint8Array(0),
      refs: Uint32Array.from({ length: MAX_ENTRIES_PER_BATCH * REF_WORDS }, (_, i) => (i % 2 === 0 ? 0xffff_ffff : 0xffff_ffff - i)),
    }),
    Frame.dedupOpen({ group: longId, resident: true }),
    Frame.dedupResident({
      group: longId,
      slot: 0xffff_ffff,
      pageCount: MAX_REGION_PAGES - 1,
      pageSizeBytes: PAGE_SIZE_MAX,
      firstPage: MAX_REGION_PAGES - 1 - MAX_FINGERPRINTS_PER_FRAME,
      fingerprints: bytes(MAX_FINGERPRINTS_PER_FRAME * FINGERPRINT_BYTES, 6),
    }),
    Frame.dedupReady({ group: longId, residentSlots: 0x7fff_ffff, residentPages: Number.MAX_SAFE_INTEGER }),
    Frame.dedupClose({ group: longId }),
    Frame.want({
      migrationId: longId,
      region: MAX_REGIONS - 1,
      runs: Uint32Array.from({ length: MAX_WANT_RUNS * 2 }, (_, i) => 0xffff_ffff - i),
      stale: Uint32Array.from({ length: MAX_WANT_RUNS * 2 }, () => 0xffff_ffff),
    }),
    Frame.pageFingerprints({
      migrationId: longId,
      region: MAX_REGIONS - 1,
      firstPage: MAX_REGION_PAGES - 1,
      fingerprints: bytes(MAX_FINGERPRINTS_PER_FRAME * FINGERPRINT_BYTES, 9),
    }),
    Frame.trafficQuery({ requestId: longId }),
    Frame.trafficReport({ requestId: longId, measured: false, rxBytesPerSec: MAX_TRAFFIC_BYTES_PER_SEC, txBytesPerSec: MAX_TRAFFIC_BYTES_PER_SEC, linkBytesPerSec: MAX_TRAFFIC_BYTES_PER_SEC, reason: text }),
    Frame.postcopy({
      migrationId: longId,
      region: MAX_REGIONS - 1,
      more: true,
      missing: new Uint32Array((16 * 1024 * 1024) / 4).fill(0xffff_ffff),
    }),
    Frame.fetch({ migrationId: longId, region: MAX_REGIONS - 1, runs: Uint32Array.from({ length: MAX_FETCH_RUNS * 2 }, () => 0xffff_ffff) }),
    Frame.reattach({ migrationId: longId, secret: bytes(MIGRATION_SECRET_BYTES, 255) }),
    Frame.migrationQuery({ migrationId: longId }),
    Frame.migrationAnswer({ migrationId: longId, whereabouts: Whereabouts.stranded }),
    Frame.standbyReady({ migrationId: longId }),
  ];
}
