// The dedup mirror against a naive oracle (Map<location, content> + Map<content, Set<location>>),
// on alphabets built so that contents collide in the table on purpose; then the backward-shift
// wrap-around, growth, and a 32M-location scale run that checks memory per location.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ContentIndex, FINGERPRINT_BYTES, fmix32 } from '../../agent/dedup/content-index.js';

const SEED = 0x5eed;

/** xorshift32 stream for building alphabets deterministically. */
function prng(seed: number): () => number {
  let state = seed | 0 || 1;
  return () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return state;
  };
}

function fpOf(w0: number, w1: number, w2: number, w3: number): Uint8Array {
  const fp = new Uint8Array(FINGERPRINT_BYTES);
  const view = new DataView(fp.buffer);
  view.setInt32(0, w0, true);
  view.setInt32(4, w1, true);
  view.setInt32(8, w2, true);
  view.setInt32(12, w3, true);
  return fp;
}

const hex = (fp: Uint8Array) => Buffer.from(fp).toString('hex');

/**
 * Fingerprints whose home slot (in a 64-slot table, hence in every smaller one) is `home`,
 * made by `make` from random words until one lands there.
 */
function findWithHome(probe: ContentIndex, home: number, make: () => Uint8Array, seen: Set<string>): Uint8Array {
  for (;;) {
    const fp = make();
    if (probe.homeSlotOf(fp) === home && !seen.has(hex(fp))) {
      seen.add(hex(fp));
      return fp;
    }
  }
}

/**
 * An alphabet where collisions are the rule: the zero page; contents sharing home slot AND tag
 * (same second word) that differ in other words; contents identical except for the high bits
 * of the last word; contents sharing the home but not the tag; and a few unrelated ones. Also
 * returns fingerprints that collide with the alphabet but are never set (absent).
 */
function collidingAlphabet(seed: number, sizes: { tagTwins: number; highBitTwins: number; homeOnly: number; random: number }) {
  const probe = new ContentIndex({ locationCapacity: 48, expectedContents: 48, hashSeed: SEED });
  expect(probe.tableSlotCount).toBe(64);
  const next = prng(seed);
  const seen = new Set<string>();
  const home = (next() >>> 0) % 64;
  const sharedW1 = next();
  const sharedW0 = next();
  const sharedW2 = next();
  const tagTwin = () => fpOf(next(), sharedW1, next(), next());
  const highBitTwin = () => fpOf(sharedW0, sharedW1, sharedW2, (next() & 0xffff0000) | 0x1234);
  const homeOnly = () => fpOf(next(), next(), next(), next());
  const zero = new Uint8Array(FINGERPRINT_BYTES);
  seen.add(hex(zero));
  const alphabet: Uint8Array[] = [zero];
  for (let i = 0; i < sizes.tagTwins; i++) alphabet.push(findWithHome(probe, home, tagTwin, seen));
  for (let i = 0; i < sizes.highBitTwins; i++) alphabet.push(findWithHome(probe, home, highBitTwin, seen));
  for (let i = 0; i < sizes.homeOnly; i++) alphabet.push(findWithHome(probe, home, homeOnly, seen));
  for (let i = 0; i < sizes.random; i++) {
    const fp = homeOnly();
    if (!seen.has(hex(fp))) alphabet.push(fp);
    seen.add(hex(fp));
  }
  const absent = [
    findWithHome(probe, home, tagTwin, seen),
    findWithHome(probe, home, highBitTwin, seen),
    findWithHome(probe, home, homeOnly, seen),
  ];
  return { alphabet, absent };
}

class Oracle {
  readonly contentOf = new Map<number, number>();
  readonly holders = new Map<number, Set<number>>();

  set(location: number, content: number): void {
    this.clear(location);
    this.contentOf.set(location, content);
    let set = this.holders.get(content);
    if (!set) this.holders.set(content, (set = new Set()));
    set.add(location);
  }

  clear(location: number): void {
    const old = this.contentOf.get(location);
    if (old === undefined) return;
    this.contentOf.delete(location);
    const set = this.holders.get(old)!;
    set.delete(location);
    if (set.size === 0) this.holders.delete(old);
  }

  reset(): void {
    this.contentOf.clear();
    this.holders.clear();
  }
}

type Op = { kind: 'set'; location: number; content: number } | { kind: 'clear'; location: number } | { kind: 'reset' };

function opArbitrary(locationCount: number, contentCount: number, resetWeight: number): fc.Arbitrary<Op> {
  return fc.oneof(
    { weight: 12, arbitrary: fc.record({ kind: fc.constant('set' as const), location: fc.nat(locationCount - 1), content: fc.nat(contentCount - 1) }) },
    { weight: 5, arbitrary: fc.record({ kind: fc.constant('clear' as const), location: fc.nat(locationCount - 1) }) },
    { weight: resetWeight, arbitrary: fc.constant({ kind: 'reset' as const }) },
  );
}

function apply(index: ContentIndex, oracle: Oracle, alphabet: Uint8Array[], op: Op): void {
  if (op.kind === 'set') {
    index.set(op.location, alphabet[op.content]!);
    oracle.set(op.location, op.content);
  } else if (op.kind === 'clear') {
    index.clear(op.location);
    oracle.clear(op.location);
  } else {
    index.reset();
    oracle.reset();
  }
}

// Plain comparisons rather than expect(): these run millions of times per test.
function check(ok: boolean, message: () => string): void {
  if (!ok) throw new Error(message());
}

function checkLookups(index: ContentIndex, oracle: Oracle, alphabet: Uint8Array[], absent: Uint8Array[]): void {
  for (let content = 0; content < alphabet.length; content++) {
    const found = index.lookup(alphabet[content]!);
    const holders = oracle.holders.get(content);
    if (holders === undefined) check(found === -1, () => `lookup(content ${content}) = ${found}, but nothing holds it`);
    else check(holders.has(found), () => `lookup(content ${content}) = ${found}, holders are ${[...holders]}`);
  }
  for (const fp of absent) check(index.lookup(fp) === -1, () => `absent ${hex(fp)} found at ${index.lookup(fp)}`);
  check(index.contentCount === oracle.holders.size, () => `contentCount ${index.contentCount}, oracle ${oracle.holders.size}`);
  check(
    index.knownLocationCount === oracle.contentOf.size,
    () => `knownLocationCount ${index.knownLocationCount}, oracle ${oracle.contentOf.size}`,
  );
}

function checkLocations(index: ContentIndex, oracle: Oracle, alphabet: Uint8Array[]): void {
  const out = new Uint8Array(FINGERPRINT_BYTES + 3);
  for (let location = 0; location < index.locationCapacity; location++) {
    const content = oracle.contentOf.get(location);
    out.fill(0xee);
    const known = index.contentOf(location, out, 3);
    check(known === (content !== undefined), () => `contentOf(${location}) says known=${known}, oracle ${content}`);
    check(index.isKnown(location) === known, () => `isKnown(${location}) disagrees with contentOf`);
    if (content === undefined) {
      check(
        out.every((byte) => byte === 0xee),
        () => `contentOf(${location}) wrote into the buffer for an unknown location`,
      );
      continue;
    }
    check(hex(out.subarray(3)) === hex(alphabet[content]!), () => `contentOf(${location}) = ${hex(out.subarray(3))}, oracle content ${content}`);
    for (let other = 0; other < alphabet.length; other++) {
      check(index.holds(location, alphabet[other]!) === (other === content), () => `holds(${location}, content ${other}) wrong`);
    }
  }
}

describe('ContentIndex against an oracle', () => {
  it('agrees on small location ranges with colliding contents (several thousand runs)', () => {
    const { alphabet, absent } = collidingAlphabet(1, { tagTwins: 4, highBitTwins: 3, homeOnly: 2, random: 2 });
    expect(alphabet.length).toBe(12);
    const locationCount = 10;
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 14 }),
        fc.array(opArbitrary(locationCount, alphabet.length, 1), { maxLength: 80, size: 'max' }),
        (expectedContents, ops) => {
          const index = new ContentIndex({ locationCapacity: locationCount, expectedContents, hashSeed: SEED });
          const oracle = new Oracle();
          for (const op of ops) {
            apply(index, oracle, alphabet, op);
            checkLookups(index, oracle, alphabet, absent);
            checkLocations(index, oracle, alphabet);
          }
        },
      ),
      { numRuns: 5000 },
    );
  });

  it('agrees through growth and long probe clusters', () => {
    const { alphabet, absent } = collidingAlphabet(2, { tagTwins: 12, highBitTwins: 8, homeOnly: 8, random: 30 });
    const locationCount = 200;
    fc.assert(
      fc.property(fc.array(opArbitrary(locationCount, alphabet.length, 0), { minLength: 50, maxLength: 600, size: 'max' }), (ops) => {
        const index = new ContentIndex({ locationCapacity: locationCount, expectedContents: 0, hashSeed: SEED });
        const oracle = new Oracle();
        ops.forEach((op, step) => {
          apply(index, oracle, alphabet, op);
          checkLookups(index, oracle, alphabet, absent);
          if (step % 25 === 0) checkLocations(index, oracle, alphabet);
        });
        checkLocations(index, oracle, alphabet);
      }),
      { numRuns: 500 },
    );
  });

  it('agrees with a random hash key', () => {
    // The alphabet's collisions were built for SEED; with another key they are ordinary
    // contents, which is the production case.
    const { alphabet, absent } = collidingAlphabet(3, { tagTwins: 3, highBitTwins: 3, homeOnly: 2, random: 4 });
    fc.assert(
      fc.property(fc.array(opArbitrary(12, alphabet.length, 1), { maxLength: 80, size: 'max' }), (ops) => {
        const index = new ContentIndex({ locationCapacity: 12, expectedContents: 2 });
        const oracle = new Oracle();
        for (const op of ops) {
          apply(index, oracle, alphabet, op);
          checkLookups(index, oracle, alphabet, absent);
        }
        checkLocations(index, oracle, alphabet);
      }),
      { numRuns: 1000 },
    );
  });
});

describe('ContentIndex batch operations', () => {
  const { alphabet, absent } = collidingAlphabet(4, { tagTwins: 4, highBitTwins: 3, homeOnly: 3, random: 20 });
  const locationCount = 40;
  // Batches longer than one touch chunk (256) too, with locations and contents repeating
  // inside a batch, at an offset inside a larger buffer.
  const batchArbitrary = fc.array(fc.tuple(fc.nat(locationCount - 1), fc.nat(alphabet.length - 1)), {
    minLength: 1,
    maxLength: 600,
    size: 'max',
  });
  const pack = (contents: number[], offsetFps: number) => {
    const fps = new Uint8Array((contents.length + offsetFps + 1) * FINGERPRINT_BYTES);
    contents.forEach((content, k) => fps.set(alphabet[content]!, (offsetFps + k) * FINGERPRINT_BYTES));
    return fps;
  };

  it('lookupThenSetBatch gives each page a location that holds its content at that point', () => {
    fc.assert(
      fc.property(fc.array(batchArbitrary, { minLength: 1, maxLength: 6 }), fc.nat(3), (batches, offsetFps) => {
        const index = new ContentIndex({ locationCapacity: locationCount, expectedContents: 1, hashSeed: SEED });
        const twin = new ContentIndex({ locationCapacity: locationCount, expectedContents: 1, hashSeed: SEED });
        const oracle = new Oracle();
        for (const pages of batches) {
          const locations = Uint32Array.from(pages.map(([location]) => location));
          const fps = pack(
            pages.map(([, content]) => content),
            offsetFps,
          );
          const found = new Int32Array(pages.length);
          index.lookupThenSetBatch(locations, fps, offsetFps * FINGERPRINT_BYTES, pages.length, found);
          pages.forEach(([location, content], k) => {
            const holders = oracle.holders.get(content);
            if (holders === undefined) check(found[k] === -1, () => `page ${k}: found ${found[k]} for a content nothing holds`);
            else check(holders.has(found[k]!), () => `page ${k}: found ${found[k]}, holders are ${[...holders]}`);
            // The single calls, in the same order, on a twin with the same key: same answers.
            check(twin.lookup(alphabet[content]!) === found[k], () => `page ${k}: batch and single lookups differ`);
            twin.set(location, alphabet[content]!);
            oracle.set(location, content);
          });
          checkLookups(index, oracle, alphabet, absent);
        }
        checkLocations(index, oracle, alphabet);
      }),
      { numRuns: 1000 },
    );
  });

  it('lookupBatch answers like lookup', () => {
    fc.assert(
      fc.property(batchArbitrary, fc.array(fc.nat(alphabet.length + absent.length - 1), { maxLength: 600, size: 'max' }), fc.nat(3), (pages, queries, offsetFps) => {
        const index = new ContentIndex({ locationCapacity: locationCount, expectedContents: 1, hashSeed: SEED });
        for (const [location, content] of pages) index.set(location, alphabet[content]!);
        const all = [...alphabet, ...absent];
        const fps = new Uint8Array((queries.length + offsetFps) * FINGERPRINT_BYTES);
        queries.forEach((query, k) => fps.set(all[query]!, (offsetFps + k) * FINGERPRINT_BYTES));
        const found = new Int32Array(queries.length + 2).fill(-7);
        index.lookupBatch(fps, offsetFps * FINGERPRINT_BYTES, queries.length, found, 1);
        check(found[0] === -7 && found[queries.length + 1] === -7, () => 'lookupBatch wrote outside its range');
        queries.forEach((query, k) => {
          check(found[k + 1] === index.lookup(all[query]!), () => `query ${k}: ${found[k + 1]} vs ${index.lookup(all[query]!)}`);
        });
      }),
      { numRuns: 300 },
    );
  });

  it('rejects a batch with a bad location before changing anything', () => {
    const index = new ContentIndex({ locationCapacity: 4, hashSeed: SEED });
    const fps = new Uint8Array(2 * FINGERPRINT_BYTES).fill(1);
    const found = new Int32Array(2);
    expect(() => index.lookupThenSetBatch(Int32Array.of(1, 4), fps, 0, 2, found)).toThrow(RangeError);
    expect(index.knownLocationCount).toBe(0);
    expect(() => index.lookupThenSetBatch(Int32Array.of(1), fps, 0, 2, found)).toThrow(RangeError);
    expect(() => index.lookupBatch(fps, FINGERPRINT_BYTES, 2, found)).toThrow(RangeError);
    expect(() => index.lookupBatch(fps, 0, 2, found, 1)).toThrow(RangeError);
  });
});

describe('ContentIndex', () => {
  it('never returns a location that a later write overwrote (copy-ref to stale content)', () => {
    const a = fpOf(1, 2, 3, 4);
    const b = fpOf(5, 6, 7, 8);
    const index = new ContentIndex({ locationCapacity: 4, hashSeed: SEED });
    index.set(1, a);
    index.set(2, a);
    index.set(1, b);
    expect(index.lookup(a)).toBe(2);
    expect(index.lookup(b)).toBe(1);
    index.clear(2);
    expect(index.lookup(a)).toBe(-1);
    expect(index.contentCount).toBe(1);
    expect(index.knownLocationCount).toBe(1);
  });

  it('hands the lookup over to another holder when the returned one leaves', () => {
    const a = fpOf(9, 9, 9, 9);
    const index = new ContentIndex({ locationCapacity: 8, hashSeed: SEED });
    for (const location of [3, 5, 7, 0]) index.set(location, a);
    const remaining = new Set([3, 5, 7, 0]);
    while (remaining.size > 0) {
      const found = index.lookup(a);
      expect(remaining.has(found)).toBe(true);
      index.clear(found);
      remaining.delete(found);
    }
    expect(index.lookup(a)).toBe(-1);
    expect(index.contentCount).toBe(0);
  });

  it('treats the all-zero fingerprint (the zero page) as an ordinary content', () => {
    const zero = new Uint8Array(FINGERPRINT_BYTES);
    const index = new ContentIndex({ locationCapacity: 4, hashSeed: SEED });
    expect(index.lookup(zero)).toBe(-1);
    expect(index.holds(0, zero)).toBe(false);
    index.set(2, zero);
    expect(index.lookup(zero)).toBe(2);
    expect(index.holds(2, zero)).toBe(true);
    expect(index.isKnown(0)).toBe(false);
  });

  it('setting a location to the content it already holds changes nothing', () => {
    const a = fpOf(1, 1, 1, 1);
    const index = new ContentIndex({ locationCapacity: 4, hashSeed: SEED });
    index.set(0, a);
    index.set(1, a);
    const before = index.lookup(a);
    index.set(0, a);
    index.set(1, a);
    expect(index.lookup(a)).toBe(before);
    expect(index.contentCount).toBe(1);
    expect(index.knownLocationCount).toBe(2);
  });

  it('reads fingerprints at an offset of a packed buffer, and agrees with the word API', () => {
    const packed = new Uint8Array(3 * FINGERPRINT_BYTES);
    const next = prng(7);
    for (let i = 0; i < packed.length; i++) packed[i] = next() & 0xff;
    const view = new DataView(packed.buffer);
    const index = new ContentIndex({ locationCapacity: 4, hashSeed: SEED });
    index.set(3, packed, 2 * FINGERPRINT_BYTES);
    const word = (k: number) => view.getInt32(2 * FINGERPRINT_BYTES + 4 * k, true);
    expect(index.lookupWords(word(0), word(1), word(2), word(3))).toBe(3);
    // Unsigned words are the same words.
    expect(index.lookupWords(word(0) >>> 0, word(1) >>> 0, word(2) >>> 0, word(3) >>> 0)).toBe(3);
    expect(index.lookup(packed, FINGERPRINT_BYTES)).toBe(-1);
    index.setWords(0, view.getUint32(0, true), view.getUint32(4, true), view.getUint32(8, true), view.getUint32(12, true));
    expect(index.lookup(packed, 0)).toBe(0);
  });

  it('rejects locations outside the capacity and fingerprints outside the buffer', () => {
    const index = new ContentIndex({ locationCapacity: 4 });
    const fp = new Uint8Array(FINGERPRINT_BYTES);
    for (const bad of [-1, 4, 1.5, Number.NaN, 2 ** 32]) {
      expect(() => index.set(bad, fp)).toThrow(RangeError);
      expect(() => index.clear(bad)).toThrow(RangeError);
      expect(() => index.contentOf(bad, fp)).toThrow(RangeError);
      expect(() => index.isKnown(bad)).toThrow(RangeError);
    }
    expect(() => index.set(0, fp, 1)).toThrow(RangeError);
    expect(() => index.lookup(new Uint8Array(15))).toThrow(RangeError);
    expect(() => index.lookup(fp, -1)).toThrow(RangeError);
    expect(() => new ContentIndex({ locationCapacity: 0 })).toThrow(RangeError);
    expect(() => new ContentIndex({ locationCapacity: ContentIndex.MAX_LOCATION_CAPACITY + 1 })).toThrow(RangeError);
    expect(() => new ContentIndex({ locationCapacity: 4, expectedContents: -1 })).toThrow(RangeError);
    expect(index.knownLocationCount).toBe(0);
  });

  it('deletes by backward shift across the end of the table, in every order', () => {
    // An 8-slot table: three contents whose home is the last slot (the second and third wrap
    // to slots 0 and 1), one whose home is slot 0 (pushed to slot 2), one at home in slot 6.
    const index = new ContentIndex({ locationCapacity: 8, expectedContents: 6, hashSeed: SEED });
    expect(index.tableSlotCount).toBe(8);
    const next = prng(11);
    const seen = new Set<string>();
    const random = () => fpOf(next(), next(), next(), next());
    const fps = [
      findWithHome(index, 7, random, seen),
      findWithHome(index, 7, random, seen),
      findWithHome(index, 7, random, seen),
      findWithHome(index, 0, random, seen),
      findWithHome(index, 6, random, seen),
    ];
    const absentAtEnd = findWithHome(index, 7, random, seen);
    const absentAtStart = findWithHome(index, 0, random, seen);
    const orders = permutations([0, 1, 2, 3, 4]);
    for (const insertOrder of orders) {
      for (const deleteOrder of orders) {
        index.reset();
        for (const k of insertOrder) index.set(k, fps[k]!);
        const present = new Set(insertOrder);
        for (const k of deleteOrder) {
          index.clear(k);
          present.delete(k);
          for (let other = 0; other < fps.length; other++) {
            expect(index.lookup(fps[other]!)).toBe(present.has(other) ? other : -1);
          }
          expect(index.lookup(absentAtEnd)).toBe(-1);
          expect(index.lookup(absentAtStart)).toBe(-1);
        }
        expect(index.contentCount).toBe(0);
      }
    }
    expect(index.tableSlotCount).toBe(8);
  });

  it('grows by doubling under load and keeps every content reachable', () => {
    const locationCount = 200_000;
    const contentCount = 60_000;
    const index = new ContentIndex({ locationCapacity: locationCount, expectedContents: 0, hashSeed: SEED });
    expect(index.tableSlotCount).toBe(4);
    const fp = new Uint8Array(FINGERPRINT_BYTES);
    const fpOfContent = (content: number) => {
      const view = new DataView(fp.buffer);
      for (let k = 0; k < 4; k++) view.setInt32(4 * k, fmix32(content * 4 + k + 1), true);
      return fp;
    };
    const contentOfLocation = new Int32Array(locationCount).fill(-1);
    const holderCount = new Int32Array(contentCount);
    const next = prng(5);
    const setLocation = (location: number, content: number) => {
      if (contentOfLocation[location]! >= 0) holderCount[contentOfLocation[location]!]!--;
      contentOfLocation[location] = content;
      if (content >= 0) {
        holderCount[content]!++;
        index.set(location, fpOfContent(content));
      } else {
        index.clear(location);
      }
    };
    for (let location = 0; location < locationCount; location++) setLocation(location, (next() >>> 0) % contentCount);
    const check = () => {
      let distinct = 0;
      for (let content = 0; content < contentCount; content++) {
        const found = index.lookup(fpOfContent(content));
        if (holderCount[content] === 0) expect(found).toBe(-1);
        else {
          distinct++;
          expect(contentOfLocation[found]).toBe(content);
        }
      }
      expect(index.contentCount).toBe(distinct);
      let slots = 4;
      while (Math.floor(slots * 0.75) < distinct) slots *= 2;
      return { distinct, slots };
    };
    const first = check();
    expect(index.tableSlotCount).toBe(first.slots);
    // Churn: clear a third, move a third to other contents; the table never shrinks.
    for (let location = 0; location < locationCount; location++) {
      const r = (next() >>> 0) % 3;
      if (r === 0) setLocation(location, -1);
      else if (r === 1) setLocation(location, (next() >>> 0) % contentCount);
    }
    check();
    expect(index.tableSlotCount).toBe(first.slots);
  });

  it('reports the memory it allocated', () => {
    const index = new ContentIndex({ locationCapacity: 1000, expectedContents: 100 });
    // 16 + 4 + 4 bytes per location, 256 slots (the smallest power of two at load <= 0.75),
    // and 2 KiB of scratch for the batch operations.
    expect(index.tableSlotCount).toBe(256);
    expect(index.memoryBytes).toBe(1000 * 24 + 256 * 4 + 2048);
  });
});

function permutations(items: number[]): number[][] {
  if (items.length <= 1) return [items];
  return items.flatMap((item, i) => permutations([...items.slice(0, i), ...items.slice(i + 1)]).map((rest) => [item, ...rest]));
}

describe('ContentIndex at scale', () => {
  const LOCATIONS = 32 * 2 ** 20; // 128 GiB of 4 KiB pages
  const BATCH = 256; // pages per 1 MiB batch
  const PROBES = 1 << 20;
  /** Lets vitest's worker answer its RPCs: this test computes for a minute. */
  const breathe = () => new Promise<void>((resolve) => setImmediate(resolve));
  const nsPerOp = (ms: number, ops: number) => `${((ms * 1e6) / ops).toFixed(0)} ns (${(ops / ms / 1e3).toFixed(2)} M/s)`;

  it(
    'holds 32M locations within 48 bytes each, with distinct and with duplicated contents',
    async () => {
      const index = new ContentIndex({ locationCapacity: LOCATIONS, hashSeed: SEED });
      const batch = new Uint8Array(BATCH * FINGERPRINT_BYTES);
      // Fingerprints are written as native-endian words and read back as bytes by the index;
      // set and lookup see the same bytes, which is all that matters.
      const words = new Int32Array(batch.buffer);
      /** Fingerprint of content `id` of `stream`: word 0 is a bijection of id, so ids never collide. */
      const writeFp = (k: number, id: number, stream: number) => {
        const at = 4 * k;
        words[at] = fmix32(id ^ Math.imul(stream, 0x3c6ef372));
        words[at + 1] = fmix32(id + Math.imul(stream + 1, 0x9e3779b9));
        words[at + 2] = fmix32(Math.imul(id, 0x27d4eb2f) ^ stream);
        words[at + 3] = fmix32((id ^ 0x55555555) + stream);
      };
      const next = prng(99);
      const found = new Int32Array(BATCH);
      const wanted = new Int32Array(BATCH);
      const locations = new Int32Array(BATCH);
      const bytesPerLocation = index.memoryBytes / LOCATIONS;
      const lines = [`${LOCATIONS} locations, ${(index.memoryBytes / 2 ** 20).toFixed(0)} MiB, ${bytesPerLocation.toFixed(2)} bytes/location`];
      expect(bytesPerLocation).toBeLessThanOrEqual(48);

      // 32M distinct contents, location i holding content i, one set at a time.
      let ms = 0;
      for (let first = 0; first < LOCATIONS; first += BATCH) {
        for (let k = 0; k < BATCH; k++) writeFp(k, first + k, 1);
        const start = performance.now();
        for (let k = 0; k < BATCH; k++) index.set(first + k, batch, k * FINGERPRINT_BYTES);
        ms += performance.now() - start;
        if ((first & 0xfffff) === 0) await breathe();
      }
      lines.push(`distinct contents: set ${nsPerOp(ms, LOCATIONS)}`);
      expect(index.contentCount).toBe(LOCATIONS);
      expect(index.knownLocationCount).toBe(LOCATIONS);
      expect(index.memoryBytes / LOCATIONS).toBe(bytesPerLocation); // no rehash happened

      // Lookups, half present (expect the location), half from another stream (expect -1);
      // one at a time and batched, each on fresh fingerprints.
      let misses = 0;
      for (const batched of [false, true]) {
        ms = 0;
        for (let done = 0; done < PROBES; done += BATCH) {
          for (let k = 0; k < BATCH; k++) {
            const id = next() >>> 7;
            const present = (k & 1) === 0;
            writeFp(k, id, present ? 1 : 2);
            wanted[k] = present ? id : -1;
          }
          const start = performance.now();
          if (batched) index.lookupBatch(batch, 0, BATCH, found);
          else for (let k = 0; k < BATCH; k++) found[k] = index.lookup(batch, k * FINGERPRINT_BYTES);
          ms += performance.now() - start;
          for (let k = 0; k < BATCH; k++) if (found[k] !== wanted[k]) misses++;
        }
        lines.push(`distinct contents: ${batched ? `lookupBatch of ${BATCH}` : 'lookup'}, half absent, ${nsPerOp(ms, PROBES)}`);
        await breathe();
      }
      expect(misses).toBe(0);

      // The same index again with ~16 holders per content, filled as the sender would: batches
      // of ascending locations through lookupThenSetBatch, every ref checked against an oracle.
      index.reset();
      const CONTENTS = 1 << 21;
      const contentOfLocation = new Int32Array(LOCATIONS).fill(-1);
      const holderCount = new Int32Array(2 * CONTENTS);
      ms = 0;
      let badRefs = 0;
      for (let first = 0; first < LOCATIONS; first += BATCH) {
        for (let k = 0; k < BATCH; k++) {
          locations[k] = first + k;
          wanted[k] = (fmix32(first + k) >>> 0) % CONTENTS;
          writeFp(k, wanted[k]!, 3);
        }
        const start = performance.now();
        index.lookupThenSetBatch(locations, batch, 0, BATCH, found);
        ms += performance.now() - start;
        for (let k = 0; k < BATCH; k++) {
          const content = wanted[k]!;
          const ref = found[k]!;
          if (holderCount[content] === 0 ? ref !== -1 : ref < 0 || contentOfLocation[ref] !== content) badRefs++;
          contentOfLocation[first + k] = content;
          holderCount[content]!++;
        }
        if ((first & 0xfffff) === 0) await breathe();
      }
      expect(badRefs).toBe(0);
      lines.push(`~16 holders per content: lookupThenSetBatch of ${BATCH}, ascending locations, ${nsPerOp(ms, LOCATIONS)}`);
      const distinctContents = () => holderCount.reduce((n, count) => n + (count > 0 ? 1 : 0), 0);
      expect(index.contentCount).toBe(distinctContents());

      // Churn, one call at a time: overwrite 4M random locations (half with contents never
      // seen before), then clear 1M.
      const CHURN = 5 * 2 ** 20;
      ms = 0;
      for (let done = 0; done < CHURN; done += BATCH) {
        const clearing = done >= 4 * 2 ** 20;
        for (let k = 0; k < BATCH; k++) {
          const location = next() >>> 7;
          const content = clearing ? -1 : (next() >>> 0) % (2 * CONTENTS);
          if (contentOfLocation[location]! >= 0) holderCount[contentOfLocation[location]!]!--;
          contentOfLocation[location] = content;
          if (content >= 0) holderCount[content]!++;
          locations[k] = location;
          wanted[k] = content;
          if (content >= 0) writeFp(k, content, 3);
        }
        const start = performance.now();
        for (let k = 0; k < BATCH; k++) {
          if (wanted[k]! >= 0) index.set(locations[k]!, batch, k * FINGERPRINT_BYTES);
          else index.clear(locations[k]!);
        }
        ms += performance.now() - start;
        if ((done & 0xfffff) === 0) await breathe();
      }
      lines.push(`~16 holders per content: churn (set/clear of random locations) ${nsPerOp(ms, CHURN)}`);
      expect(index.contentCount).toBe(distinctContents());
      expect(index.knownLocationCount).toBe(contentOfLocation.reduce((n, content) => n + (content >= 0 ? 1 : 0), 0));

      misses = 0;
      ms = 0;
      for (let done = 0; done < PROBES; done += BATCH) {
        for (let k = 0; k < BATCH; k++) {
          wanted[k] = (next() >>> 0) % (2 * CONTENTS);
          writeFp(k, wanted[k]!, 3);
        }
        const start = performance.now();
        index.lookupBatch(batch, 0, BATCH, found);
        ms += performance.now() - start;
        for (let k = 0; k < BATCH; k++) {
          const content = wanted[k]!;
          const ref = found[k]!;
          if (holderCount[content] === 0 ? ref !== -1 : ref < 0 || contentOfLocation[ref] !== content) misses++;
        }
      }
      expect(misses).toBe(0);
      lines.push(`~16 holders per content: lookupBatch of ${BATCH} ${nsPerOp(ms, PROBES)}`);
      console.log(`content index at scale:\n  ${lines.join('\n  ')}`);
    },
    300_000,
  );
});
