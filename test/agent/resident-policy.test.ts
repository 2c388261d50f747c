// Resident dedup without sockets: whose guests a peer is offered (dedup.resident), how often
// (the per-peer limiter, on a fake clock), and the shared fingerprint cache (one hashing pass
// per guest for concurrent requests, reuse up to the max age, guests gone forgotten, the
// byte budget), with a fake hashing function; and the real hashing against the addon.
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { DEDUP_POLICY_DEFAULTS, type DedupPolicy } from '../../agent/config.js';
import { baseImageContent, MAX_BASE_IMAGES } from '../../agent/dedup/base-images.js';
import { hashGuestMemory, ResidentFingerprintCache, type ResidentGuest } from '../../agent/dedup/resident-cache.js';
import { ResidentOfferLimiter } from '../../agent/dedup/resident-limiter.js';
import { ResidentOffers, selectResident, type ResidentCandidate } from '../../agent/dedup/resident-policy.js';
import { loadNative } from '../../agent/native.js';

const PEER = 'agent-source';
const OTHER = 'agent-other';

const started = (name: string, extra: Partial<ResidentCandidate> = {}): ResidentCandidate => ({ name, origin: { kind: 'started' }, migrating: false, alive: true, ...extra });
const migrated = (name: string, from: string, extra: Partial<ResidentCandidate> = {}): ResidentCandidate => ({
  name,
  origin: { kind: 'migrated', migrationId: `m-${name}`, from },
  migrating: false,
  alive: true,
  ...extra,
});

const host = [started('local'), migrated('from-peer', PEER), migrated('from-other', OTHER), migrated('leaving', PEER, { migrating: true }), migrated('dead', PEER, { alive: false })];
const names = (list: ResidentCandidate[]) => list.map((c) => c.name);

describe('selectResident', () => {
  test("from-peer: only the guests that peer migrated here, never a locally started one or another peer's", () => {
    expect(names(selectResident('from-peer', PEER, host))).toEqual(['from-peer']);
    expect(names(selectResident('from-peer', OTHER, host))).toEqual(['from-other']);
    expect(names(selectResident('from-peer', 'agent-stranger', host))).toEqual([]);
  });

  test('from-peer: a peer without an identity sees nothing, even guests recorded as from an unknown peer', () => {
    expect(selectResident('from-peer', undefined, [...host, migrated('unknown-origin', 'unknown')])).toEqual([]);
  });

  test('all: every guest running here; none: nothing', () => {
    expect(names(selectResident('all', OTHER, host))).toEqual(['local', 'from-peer', 'from-other']);
    expect(names(selectResident('all', undefined, host))).toEqual(['local', 'from-peer', 'from-other']);
    expect(selectResident('none', PEER, host)).toEqual([]);
  });

  test('guests being migrated away or dead are never offered, whatever the policy', () => {
    for (const policy of ['from-peer', 'all', 'none'] as const) {
      const chosen = names(selectResident(policy, PEER, host));
      expect(chosen).not.toContain('leaving');
      expect(chosen).not.toContain('dead');
    }
  });

  test('a record without an origin (an older agent wrote it) is offered under all only', () => {
    const old = { name: 'old', migrating: false, alive: true } as unknown as ResidentCandidate;
    expect(selectResident('from-peer', PEER, [old])).toEqual([]);
    expect(selectResident('all', PEER, [old])).toEqual([old]);
  });
});

describe('ResidentOfferLimiter', () => {
  test('at most N offers per peer in any 60 s window, counted apart per peer', () => {
    let now = 1_000;
    const limiter = new ResidentOfferLimiter(2, () => now);
    expect(limiter.take(PEER).allowed).toBe(true);
    now += 10_000;
    expect(limiter.take(PEER).allowed).toBe(true);
    expect(limiter.take(PEER)).toEqual({ allowed: false, warn: true });
    // Another peer has its own allowance.
    expect(limiter.take(OTHER).allowed).toBe(true);
    // The first offer ages out 60 s after it was granted, not 60 s after the refusal.
    now = 1_000 + 59_999;
    expect(limiter.take(PEER).allowed).toBe(false);
    now = 1_000 + 60_000;
    expect(limiter.take(PEER).allowed).toBe(true);
    expect(limiter.take(PEER).allowed).toBe(false);
  });

  test('warns once per peer per window, again in the next one', () => {
    let now = 0;
    const limiter = new ResidentOfferLimiter(1, () => now);
    expect(limiter.take(PEER).allowed).toBe(true);
    const refusals = [];
    for (let i = 0; i < 5; i++) {
      now += 1_000;
      refusals.push(limiter.take(PEER));
    }
    expect(refusals.map((r) => r.allowed)).toEqual([false, false, false, false, false]);
    expect(refusals.map((r) => r.warn)).toEqual([true, false, false, false, false]);
    // An offer granted in between does not reset the warning window.
    now = 60_000;
    expect(limiter.take(PEER).allowed).toBe(true);
    now = 61_000;
    expect(limiter.take(PEER)).toEqual({ allowed: false, warn: true });
  });

  test('a limit of 0 refuses every offer', () => {
    const limiter = new ResidentOfferLimiter(0, () => 0);
    expect(limiter.take(PEER)).toEqual({ allowed: false, warn: true });
  });

  test('forgets peers idle for a window, so claimed identities do not pile up', () => {
    let now = 0;
    const limiter = new ResidentOfferLimiter(1, () => now);
    for (let i = 0; i < 100; i++) limiter.take(`claimed-${i}`);
    expect(limiter.trackedPeers).toBe(100);
    now = 60_000;
    limiter.take(PEER);
    expect(limiter.trackedPeers).toBe(1);
  });
});

describe('ResidentOffers.decide', () => {
  const policy = (overrides: Partial<DedupPolicy>): DedupPolicy => ({ ...DEDUP_POLICY_DEFAULTS, ...overrides });
  const noHashing = async (): Promise<Uint8Array> => {
    throw new Error('decide does not hash');
  };

  test('offered, refused-policy, then rate-limited: only requests with something to offer take an offer', () => {
    let now = 0;
    const offers = new ResidentOffers(policy({ residentOffersPerMinute: 2 }), { now: () => now, hash: noHashing });
    expect(offers.decide(OTHER, [started('local')])).toEqual({ outcome: 'refused-policy', guests: [], warn: false });
    expect(offers.decide(PEER, host).outcome).toBe('offered');
    expect(names(offers.decide(PEER, host).guests)).toEqual(['from-peer']);
    // A refused-policy request of the same peer does not use up its offers...
    expect(offers.decide(PEER, [started('local')]).outcome).toBe('refused-policy');
    // ... but it has had its two.
    expect(offers.decide(PEER, host)).toEqual({ outcome: 'rate-limited', guests: [], warn: true });
    expect(offers.decide(PEER, host)).toEqual({ outcome: 'rate-limited', guests: [], warn: false });
    now = 60_000;
    expect(offers.decide(PEER, host).outcome).toBe('offered');
  });

  test("under 'none' every request is refused by the policy", () => {
    const offers = new ResidentOffers(policy({ resident: 'none' }), { hash: noHashing });
    expect(offers.decide(PEER, host).outcome).toBe('refused-policy');
  });

  test("base images are offered whatever the policy says of guests, and count against the peer's offers", () => {
    const offers = new ResidentOffers(policy({ resident: 'none', residentOffersPerMinute: 1 }), { hash: noHashing });
    expect(offers.decide(OTHER, host, 2)).toEqual({ outcome: 'offered', guests: [], warn: false });
    expect(offers.decide(OTHER, host, 2)).toEqual({ outcome: 'rate-limited', guests: [], warn: true });
  });
});

describe('base images (dedup.baseImages)', () => {
  test('regular files of whole 4 KiB blocks, in name order, sparse; the others left out with the reason; at most 16', () => {
    const dir = mkdtempSync(join(tmpdir(), 'gangway-base-'));
    try {
      writeFileSync(join(dir, 'b.raw'), Buffer.alloc(8192));
      writeFileSync(join(dir, 'a.raw'), Buffer.alloc(4096));
      writeFileSync(join(dir, 'odd.raw'), Buffer.alloc(4097));
      writeFileSync(join(dir, 'empty.raw'), '');
      symlinkSync(join(dir, 'a.raw'), join(dir, 'link.raw'));
      mkdirSync(join(dir, 'sub'));
      const { images, skipped, problem } = baseImageContent(dir);
      expect(problem).toBeUndefined();
      expect(images).toEqual([
        { name: 'base:a.raw', pid: 0, memoryPath: join(dir, 'a.raw'), memoryBytes: 4096, pageSizeBytes: 4096, sparse: true },
        { name: 'base:b.raw', pid: 0, memoryPath: join(dir, 'b.raw'), memoryBytes: 8192, pageSizeBytes: 4096, sparse: true },
      ]);
      expect(skipped).toEqual([expect.stringMatching(/^empty.raw: 0 bytes/), expect.stringMatching(/^link.raw: not a regular file/), expect.stringMatching(/^odd.raw: 4097 bytes/), expect.stringMatching(/^sub: not a regular file/)]);
      for (let i = 0; i < 20; i++) writeFileSync(join(dir, `m${String(i).padStart(2, '0')}.raw`), Buffer.alloc(4096));
      const many = baseImageContent(dir);
      expect(many.images).toHaveLength(MAX_BASE_IMAGES);
      expect(many.skipped.filter((line) => /more than 16 base images/.test(line))).toHaveLength(22 - MAX_BASE_IMAGES);
      expect(baseImageContent(join(dir, 'gone')).problem).toMatch(/dedup.baseImages .*gone cannot be read/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('ResidentFingerprintCache', () => {
  const guest = (name: string, pages = 4, pid = 100): ResidentGuest => ({ name, pid, memoryPath: `/dev/shm/gangway-${name}.mem`, memoryBytes: pages * 4096, pageSizeBytes: 4096 });

  /** A fake hash: each pass fills the fingerprints with its pass number; passes finish when released. */
  function fakeHash() {
    const calls: { guest: ResidentGuest; release: () => void; fail: (err: Error) => void }[] = [];
    let pass = 0;
    const hash = (g: ResidentGuest) =>
      new Promise<Uint8Array>((resolve, reject) => {
        const n = ++pass;
        calls.push({ guest: g, release: () => resolve(new Uint8Array((g.memoryBytes / g.pageSizeBytes) * 16).fill(n)), fail: reject });
      });
    return { hash, calls };
  }

  test('concurrent requests for one guest share one hashing pass', async () => {
    const { hash, calls } = fakeHash();
    const cache = new ResidentFingerprintCache({ maxAgeMs: 30_000, now: () => 0, hash });
    const requests = [cache.get(guest('a')), cache.get(guest('a')), cache.get(guest('a'))];
    expect(calls).toHaveLength(1);
    calls[0]!.release();
    const results = await Promise.all(requests);
    expect(results[1]!.fingerprints).toBe(results[0]!.fingerprints);
    expect(results[2]!.fingerprints).toBe(results[0]!.fingerprints);
    expect(cache.computations).toBe(1);
  });

  test('fingerprints are reused while younger than the max age, then taken again', async () => {
    let now = 0;
    const { hash, calls } = fakeHash();
    const cache = new ResidentFingerprintCache({ maxAgeMs: 30_000, now: () => now, hash });
    const first = cache.get(guest('a'));
    now = 500;
    calls[0]!.release();
    const taken = await first;
    // The age counts from the start of the pass: every page was read after it.
    expect(taken.takenAt).toBe(0);
    now = 29_999;
    expect((await cache.get(guest('a'))).fingerprints).toBe(taken.fingerprints);
    expect(calls).toHaveLength(1);
    now = 30_000;
    const again = cache.get(guest('a'));
    expect(calls).toHaveLength(2);
    calls[1]!.release();
    expect((await again).fingerprints[0]).toBe(2);
    expect(cache.bytes).toBe(4 * 16);
  });

  test('a max age of 0 hashes for each request, but concurrent ones still share the pass', async () => {
    const { hash, calls } = fakeHash();
    const cache = new ResidentFingerprintCache({ maxAgeMs: 0, now: () => 0, hash });
    const a = [cache.get(guest('a')), cache.get(guest('a'))];
    calls[0]!.release();
    await Promise.all(a);
    const b = cache.get(guest('a'));
    expect(calls).toHaveLength(2);
    calls[1]!.release();
    await b;
  });

  test('a guest is one incarnation: another pid or memory file is hashed on its own', async () => {
    const { hash, calls } = fakeHash();
    const cache = new ResidentFingerprintCache({ maxAgeMs: 30_000, now: () => 0, hash });
    void cache.get(guest('a', 4, 100));
    void cache.get(guest('a', 4, 101));
    void cache.get({ ...guest('a', 4, 100), memoryPath: '/dev/shm/gangway-a-other.mem' });
    expect(calls).toHaveLength(3);
    for (const call of calls) call.release();
  });

  test('a failed pass is not kept: every waiter sees the error, the next request hashes again', async () => {
    const { hash, calls } = fakeHash();
    const cache = new ResidentFingerprintCache({ maxAgeMs: 30_000, now: () => 0, hash });
    const waiting = [cache.get(guest('a')), cache.get(guest('a'))];
    calls[0]!.fail(new Error('ENOENT: the guest is gone'));
    for (const request of waiting) await expect(request).rejects.toThrow('ENOENT');
    expect(cache.size).toBe(0);
    const retry = cache.get(guest('a'));
    expect(calls).toHaveLength(2);
    calls[1]!.release();
    await retry;
    expect(cache.size).toBe(1);
  });

  test('retain forgets the guests that are gone, also a pass still under way', async () => {
    const { hash, calls } = fakeHash();
    const cache = new ResidentFingerprintCache({ maxAgeMs: 30_000, now: () => 0, hash });
    const [a, b, c] = [cache.get(guest('a')), cache.get(guest('b')), cache.get(guest('c'))];
    calls[0]!.release();
    calls[1]!.release();
    await Promise.all([a, b]);
    expect(cache.bytes).toBe(2 * 4 * 16);
    cache.retain([guest('b')]);
    expect(cache.size).toBe(1);
    expect(cache.bytes).toBe(4 * 16);
    // c's pass ends after c was dropped: its waiter gets the fingerprints, the cache keeps nothing.
    calls[2]!.release();
    expect((await c).fingerprints).toHaveLength(4 * 16);
    expect(cache.size).toBe(1);
    expect(cache.bytes).toBe(4 * 16);
  });

  test('beyond the byte budget the oldest fingerprints go; a guest larger than the budget is not kept', async () => {
    let now = 0;
    const { hash, calls } = fakeHash();
    // Room for three guests of 4 pages (64 bytes each).
    const cache = new ResidentFingerprintCache({ maxAgeMs: 60_000, budgetBytes: 3 * 64, now: () => now, hash });
    for (const name of ['a', 'b', 'c', 'd']) {
      const request = cache.get(guest(name));
      calls[calls.length - 1]!.release();
      await request;
      now += 1_000;
    }
    expect(cache.bytes).toBe(3 * 64);
    expect(cache.size).toBe(3);
    // a went (the oldest): asked again, it is hashed again; b is still there.
    void cache.get(guest('b'));
    expect(calls).toHaveLength(4);
    const a = cache.get(guest('a'));
    expect(calls).toHaveLength(5);
    calls[4]!.release();
    await a;
    // Taking a again pushed out b, now the oldest.
    expect(cache.size).toBe(3);
    void cache.get(guest('b'));
    expect(calls).toHaveLength(6);
    calls[5]!.release();

    const huge = cache.get(guest('huge', 100));
    calls[6]!.release();
    expect((await huge).fingerprints).toHaveLength(100 * 16);
    expect(cache.bytes).toBeLessThanOrEqual(3 * 64);
  });
});

describe('hashGuestMemory', () => {
  test("gives each page's XXH3-128 fingerprint, as regionFingerprints does", async () => {
    const native = loadNative();
    const dir = mkdtempSync(join(tmpdir(), 'gangway-resident-'));
    try {
      const pageSizeBytes = 4096;
      const pages = 5;
      const content = Buffer.alloc(pages * pageSizeBytes);
      for (let p = 0; p < pages; p++) content.fill(p * 37 + 1, p * pageSizeBytes, (p + 1) * pageSizeBytes);
      const memoryPath = join(dir, 'guest.mem');
      writeFileSync(memoryPath, content);
      const fingerprints = await hashGuestMemory(native)({ name: 'g', pid: 1, memoryPath, memoryBytes: content.length, pageSizeBytes });
      expect(fingerprints).toHaveLength(pages * 16);
      for (let p = 0; p < pages; p++) {
        expect(Buffer.from(fingerprints.subarray(p * 16, (p + 1) * 16)).equals(native.hash128(content.subarray(p * pageSizeBytes, (p + 1) * pageSizeBytes))), `page ${p}`).toBe(true);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
