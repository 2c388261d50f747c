// Content index: the source's mirror of what every destination page holds, for dedup. Per
// destination, `set(location, fp)` records that destination page `location` now holds the
// content whose 128-bit fingerprint is `fp`; `lookup(fp)` answers "which destination page
// holds this content right now?", so a page can travel as a copy-ref instead of 4 KiB.
//
// The invariant dedup correctness rests on: lookup(fp) only ever returns a location whose
// CURRENT content is fp. A ref to a page that a later write overwrote would copy the wrong
// bytes and nothing downstream would notice until the digest check at switchover. So a
// location leaves its old content's set the moment it is set to something else or cleared,
// and when the location a lookup would return leaves, another holder of fp (if any) takes
// its place.
//
// Why not a Map: a JavaScript Map holds at most 2^24 (~16.7M) entries, and a gang of 128 GiB
// is 32M pages; a Map<hex string, location> also costs ~76 bytes per entry for one direction
// alone (bench/index-memory.ts). Instead, a few big typed arrays and no per-entry objects:
//
//   fingerprints  Int32Array[4 * capacity]  16 B/location  the content of each location, as
//                                                          four little-endian u32 words of the
//                                                          fingerprint's bytes
//   nextLink      Int32Array[capacity]       4 B/location  doubly linked list of the locations
//   prevLink      Int32Array[capacity]       4 B/location  holding one content (O(1) removal)
//   slots         Int32Array[2^k]            4 B/slot      open-addressing hash table (linear
//                                                          probing), one slot per distinct
//                                                          content: the list head
//
// Link encoding, chosen so that freshly allocated (zeroed) memory means "nothing known" and
// needs no fill pass: nextLink holds location + 1, or 0 at the end of a list; prevLink holds
// location + 1, HEAD (-1) for the first location of a list, or 0 if the location's content is
// unknown. The location's fingerprint words are meaningful only while prevLink is non-zero,
// which is why the all-zero fingerprint is an ordinary content.
//
// A slot holds (location + 1) in its low `locationBits` bits (0 means empty) and, in the bits
// above, the same bits of the fingerprint's second word as a tag. The tag lets a probe skip
// non-matching slots without reading their fingerprint (a cache miss into a 512 MiB array):
// at 32M locations the tag has 6 bits, so 63 in 64 foreign slots are rejected from the slot
// alone. The slot's home is a keyed mix of all four words (see `mixFingerprint`), not the raw
// low bits: guest memory is tenant-controlled, and a guest that can brute-force pages whose
// fingerprints share their low bits could otherwise build long probe clusters on the source.
// Deletion is backward-shift (no tombstones), so the table never degrades under churn.
//
// Memory math at 32M locations (2^25) with 32M distinct contents:
//   fingerprints 512 MiB + links 2 x 128 MiB + slots 2^26 x 4 B = 256 MiB = 1 GiB,
//   i.e. 32 bytes per location; the table is sized for load <= 0.75 to a power of two, so it
//   costs between 5.3 and 10.7 bytes per expected content, and the total stays within
//   16 + 8 + 10.7 = 34.7 bytes per location in the worst case. Every array stays under 2 GiB:
//   the largest is the fingerprint array, 16 B x capacity, hence MAX_LOCATION_CAPACITY
//   (2^27 - 1 locations, 512 GiB of 4 KiB pages).
//
// The table is sized up front from `expectedContents` (default: one per location) so that a
// rehash never stalls a migration round; with a smaller estimate it doubles when the load
// passes 0.75, and the old and new tables briefly coexist.
//
// Speed is memory latency: at 32M locations every lookup is a random read into a 256 MiB
// table and another into the 512 MiB fingerprint array, and on this host (KVM, 4 KiB pages) a
// dependent random read over 1 GiB costs 200-300 ns while independent ones overlap to ~40 ns
// each. The batch operations therefore first run tight loops that only touch what the exact
// pass will need (compute all the hashes, then read all the home slots, then all the heads),
// so the CPU keeps many misses in flight, and the exact pass, which is the single-call code,
// finds most of its lines in cache. The touch loops must stay tiny: a pending miss blocks
// retirement, so the misses in flight are about the reorder buffer over the loop body.
// Measured (bench/index-memory.ts): lookupBatch 2-3x faster than lookup, lookupThenSetBatch
// about 1.5x faster than lookup + set.
import { getRandomValues } from 'node:crypto';

export const FINGERPRINT_BYTES = 16;

/** prevLink value of a location that heads its content's list (the one in the table). */
const HEAD = -1;
const MAX_LOAD = 0.75;
const MIN_TABLE_SLOTS = 4;
/** Fingerprints per touch pass of the batch operations (1 MiB of 4 KiB pages). */
const TOUCH_CHUNK = 256;

export interface ContentIndexOptions {
  /** Locations are dense ids in [0, locationCapacity). */
  locationCapacity: number;
  /**
   * Distinct contents to size the table for, so it never rehashes below that. Default: one per
   * location (no rehash ever, at most 10.7 bytes per location for the table).
   */
  expectedContents?: number;
  /**
   * Key of the slot hash, a u32. Default: random per index, so that nobody outside this
   * process can aim fingerprints at one cluster of the table. Fix it only in tests.
   */
  hashSeed?: number;
}

export class ContentIndex {
  /** The fingerprint array (16 bytes per location) must stay under 2 GiB. */
  static readonly MAX_LOCATION_CAPACITY = 2 ** 27 - 1;

  readonly locationCapacity: number;
  private readonly fingerprints: Int32Array;
  private readonly nextLink: Int32Array;
  private readonly prevLink: Int32Array;
  private slots: Int32Array;
  private slotMask: number;
  /** Grow before the distinct-content count exceeds this. */
  private growAt: number;
  /** Low bits of a slot: location + 1. */
  private readonly locationMask: number;
  /** High bits of a slot: tag bits of the fingerprint's second word. */
  private readonly tagMask: number;
  private readonly key0: number;
  private readonly key1: number;
  private readonly key2: number;
  private readonly key3: number;
  private contents = 0;
  private knownLocations = 0;
  /** The batch operations' touch passes: the chunk's hashes (reused by the exact pass), and scratch. */
  private readonly touchHashes = new Int32Array(TOUCH_CHUNK);
  private readonly touchScratch = new Int32Array(TOUCH_CHUNK);
  /** Where the touch passes leave what they read, so the reads are not optimized away. */
  private sink = 0;

  constructor(options: ContentIndexOptions) {
    const { locationCapacity } = options;
    if (!Number.isInteger(locationCapacity) || locationCapacity < 1 || locationCapacity > ContentIndex.MAX_LOCATION_CAPACITY) {
      throw new RangeError(
        `locationCapacity must be an integer in [1, ${ContentIndex.MAX_LOCATION_CAPACITY}], got ${locationCapacity}`,
      );
    }
    const expectedContents = options.expectedContents ?? locationCapacity;
    if (!Number.isInteger(expectedContents) || expectedContents < 0) {
      throw new RangeError(`expectedContents must be a non-negative integer, got ${expectedContents}`);
    }
    this.locationCapacity = locationCapacity;
    this.fingerprints = new Int32Array(4 * locationCapacity);
    this.nextLink = new Int32Array(locationCapacity);
    this.prevLink = new Int32Array(locationCapacity);

    // location + 1 ranges over [1, capacity]; it needs bitLength(capacity) bits (at most 27).
    const locationBits = 32 - Math.clz32(locationCapacity);
    this.locationMask = (1 << locationBits) - 1;
    this.tagMask = ~this.locationMask;

    let slotCount = MIN_TABLE_SLOTS;
    // Contents never outnumber locations, so the table never needs more than that.
    const sizedFor = Math.min(expectedContents, locationCapacity);
    while (slotCount * MAX_LOAD < sizedFor) slotCount *= 2;
    this.slots = new Int32Array(slotCount);
    this.slotMask = slotCount - 1;
    this.growAt = Math.floor(slotCount * MAX_LOAD);

    const key = hashKey(options.hashSeed ?? getRandomValues(new Uint32Array(1))[0]!);
    this.key0 = key[0]!;
    this.key1 = key[1]!;
    this.key2 = key[2]!;
    this.key3 = key[3]!;
  }

  /** Distinct contents currently held by at least one location. */
  get contentCount(): number {
    return this.contents;
  }

  /** Locations whose content is known. */
  get knownLocationCount(): number {
    return this.knownLocations;
  }

  /** Bytes of the typed arrays this index holds. */
  get memoryBytes(): number {
    return (
      this.fingerprints.byteLength +
      this.nextLink.byteLength +
      this.prevLink.byteLength +
      this.slots.byteLength +
      this.touchHashes.byteLength +
      this.touchScratch.byteLength
    );
  }

  /** Slots in the hash table (a power of two); for diagnostics and tests. */
  get tableSlotCount(): number {
    return this.slots.length;
  }

  /** The table slot where a probe for `fp` starts; for diagnostics and tests. */
  homeSlotOf(fp: Uint8Array, offset = 0): number {
    checkFingerprint(fp, offset);
    return this.hashAt(fp, offset) & this.slotMask;
  }

  /** Destination page `location` now holds the content `fp` (16 bytes at `offset`). */
  set(location: number, fp: Uint8Array, offset = 0): void {
    this.checkLocation(location);
    checkFingerprint(fp, offset);
    const w0 = readWord(fp, offset);
    const w1 = readWord(fp, offset + 4);
    const w2 = readWord(fp, offset + 8);
    const w3 = readWord(fp, offset + 12);
    this.store(location, this.hashWords(w0, w1, w2, w3), w0, w1, w2, w3);
  }

  /**
   * `set` with the fingerprint as four words: word i is bytes 4i..4i+3 of the fingerprint read
   * as a little-endian u32 (or i32; the sign does not matter).
   */
  setWords(location: number, w0: number, w1: number, w2: number, w3: number): void {
    this.checkLocation(location);
    w0 |= 0;
    w1 |= 0;
    w2 |= 0;
    w3 |= 0;
    this.store(location, this.hashWords(w0, w1, w2, w3), w0, w1, w2, w3);
  }

  /** The content of destination page `location` is no longer known (e.g. being rewritten). */
  clear(location: number): void {
    this.checkLocation(location);
    if (this.prevLink[location] !== 0) this.unlink(location);
  }

  /** A location whose current content is `fp` (16 bytes at `offset`), or -1. */
  lookup(fp: Uint8Array, offset = 0): number {
    checkFingerprint(fp, offset);
    const w0 = readWord(fp, offset);
    const w1 = readWord(fp, offset + 4);
    const w2 = readWord(fp, offset + 8);
    const w3 = readWord(fp, offset + 12);
    return this.find(this.hashWords(w0, w1, w2, w3), w0, w1, w2, w3);
  }

  /** `lookup` with the fingerprint as four words (see `setWords`). */
  lookupWords(w0: number, w1: number, w2: number, w3: number): number {
    w0 |= 0;
    w1 |= 0;
    w2 |= 0;
    w3 |= 0;
    return this.find(this.hashWords(w0, w1, w2, w3), w0, w1, w2, w3);
  }

  /**
   * `lookup` for `count` fingerprints packed from `fpOffset`, 16 bytes apart, into `found`
   * from `foundOffset`: the same answers as one `lookup` each, faster at scale (see the
   * header on touch passes).
   */
  lookupBatch(fps: Uint8Array, fpOffset: number, count: number, found: Int32Array, foundOffset = 0): void {
    checkBatch(fps, fpOffset, count);
    if (foundOffset >>> 0 !== foundOffset || foundOffset + count > found.length) {
      throw new RangeError(`no room for ${count} results at offset ${foundOffset} of ${found.length}`);
    }
    const hashes = this.touchHashes;
    for (let first = 0; first < count; first += TOUCH_CHUNK) {
      const chunk = Math.min(TOUCH_CHUNK, count - first);
      const chunkOffset = fpOffset + first * FINGERPRINT_BYTES;
      this.touchContents(fps, chunkOffset, chunk, false);
      for (let k = 0; k < chunk; k++) {
        const at = chunkOffset + k * FINGERPRINT_BYTES;
        found[foundOffset + first + k] = this.find(
          hashes[k]!,
          readWord(fps, at),
          readWord(fps, at + 4),
          readWord(fps, at + 8),
          readWord(fps, at + 12),
        );
      }
    }
  }

  /**
   * The sender's step for a batch of pages, in order: for each k, `found[k] = lookup(fp k)`,
   * then `set(locations[k], fp k)`. Both per page and in order is what keeps refs valid inside
   * a batch: a page that overwrites location X is recorded before a later page of the same
   * batch could be given X. `found[k] === locations[k]` means that destination page already
   * holds the content. The same results as the single calls, faster at scale (see the header
   * on touch passes). Checks every location before changing anything.
   */
  lookupThenSetBatch(
    locations: Int32Array | Uint32Array,
    fps: Uint8Array,
    fpOffset: number,
    count: number,
    found: Int32Array,
  ): void {
    checkBatch(fps, fpOffset, count);
    if (count > locations.length || count > found.length) {
      throw new RangeError(`batch of ${count} with ${locations.length} locations and room for ${found.length} results`);
    }
    for (let k = 0; k < count; k++) this.checkLocation(locations[k]!);
    const hashes = this.touchHashes;
    for (let first = 0; first < count; first += TOUCH_CHUNK) {
      const chunk = Math.min(TOUCH_CHUNK, count - first);
      const chunkOffset = fpOffset + first * FINGERPRINT_BYTES;
      this.touchLocations(locations, first, chunk);
      this.touchContents(fps, chunkOffset, chunk, true);
      for (let k = 0; k < chunk; k++) {
        const at = chunkOffset + k * FINGERPRINT_BYTES;
        const w0 = readWord(fps, at);
        const w1 = readWord(fps, at + 4);
        const w2 = readWord(fps, at + 8);
        const w3 = readWord(fps, at + 12);
        const hash = hashes[k]!;
        found[first + k] = this.find(hash, w0, w1, w2, w3);
        this.store(locations[first + k]!, hash, w0, w1, w2, w3);
      }
    }
  }

  /** Whether `location`'s content is known. */
  isKnown(location: number): boolean {
    this.checkLocation(location);
    return this.prevLink[location] !== 0;
  }

  /**
   * Writes `location`'s fingerprint into `out` at `outOffset` (16 bytes) and returns true, or
   * returns false, writing nothing, if its content is unknown.
   */
  contentOf(location: number, out: Uint8Array, outOffset = 0): boolean {
    this.checkLocation(location);
    checkFingerprint(out, outOffset);
    if (this.prevLink[location] === 0) return false;
    const fingerprints = this.fingerprints;
    const base = location << 2;
    for (let word = 0; word < 4; word++) {
      const value = fingerprints[base + word]!;
      const at = outOffset + 4 * word;
      out[at] = value;
      out[at + 1] = value >>> 8;
      out[at + 2] = value >>> 16;
      out[at + 3] = value >>> 24;
    }
    return true;
  }

  /** Whether `location` is known to hold exactly `fp` (then the page need not travel at all). */
  holds(location: number, fp: Uint8Array, offset = 0): boolean {
    this.checkLocation(location);
    checkFingerprint(fp, offset);
    if (this.prevLink[location] === 0) return false;
    const fingerprints = this.fingerprints;
    const base = location << 2;
    return (
      fingerprints[base] === readWord(fp, offset) &&
      fingerprints[base + 1] === readWord(fp, offset + 4) &&
      fingerprints[base + 2] === readWord(fp, offset + 8) &&
      fingerprints[base + 3] === readWord(fp, offset + 12)
    );
  }

  /** Forgets everything (e.g. the destination was restarted); keeps the allocated memory. */
  reset(): void {
    this.fingerprints.fill(0);
    this.nextLink.fill(0);
    this.prevLink.fill(0);
    this.slots.fill(0);
    this.contents = 0;
    this.knownLocations = 0;
  }

  private checkLocation(location: number): void {
    // `>>> 0` rejects negatives, fractions, NaN and non-numbers in one comparison.
    if (location >>> 0 !== location || location >= this.locationCapacity) {
      throw new RangeError(`location ${location} is outside [0, ${this.locationCapacity})`);
    }
  }

  private hashWords(w0: number, w1: number, w2: number, w3: number): number {
    return mixFingerprint(w0, w1, w2, w3, this.key0, this.key1, this.key2, this.key3);
  }

  private hashAt(fps: Uint8Array, at: number): number {
    return this.hashWords(readWord(fps, at), readWord(fps, at + 4), readWord(fps, at + 8), readWord(fps, at + 12));
  }

  private hashOfLocation(location: number): number {
    const fingerprints = this.fingerprints;
    const base = location << 2;
    return this.hashWords(fingerprints[base]!, fingerprints[base + 1]!, fingerprints[base + 2]!, fingerprints[base + 3]!);
  }

  /** The head of the list of locations holding the content, or -1. Words are int32. */
  private find(hash: number, w0: number, w1: number, w2: number, w3: number): number {
    const i = this.findSlot(hash, w0, w1, w2, w3);
    return i < 0 ? -1 : (this.slots[i]! & this.locationMask) - 1;
  }

  /**
   * The slot of the content, or, if it is absent, ~(the empty slot that ends its probe
   * sequence: where it would be inserted).
   */
  private findSlot(hash: number, w0: number, w1: number, w2: number, w3: number): number {
    const fingerprints = this.fingerprints;
    const slots = this.slots;
    const mask = this.slotMask;
    const tagMask = this.tagMask;
    const locationMask = this.locationMask;
    const tag = w1 & tagMask;
    for (let i = hash & mask; ; i = (i + 1) & mask) {
      const slot = slots[i]!;
      if (slot === 0) return ~i;
      if ((slot & tagMask) === tag) {
        const headBase = ((slot & locationMask) - 1) << 2;
        if (
          fingerprints[headBase] === w0 &&
          fingerprints[headBase + 1] === w1 &&
          fingerprints[headBase + 2] === w2 &&
          fingerprints[headBase + 3] === w3
        ) {
          return i;
        }
      }
    }
  }

  /** `set` of a checked location; `hash` is the words' hash, the words are int32. */
  private store(location: number, hash: number, w0: number, w1: number, w2: number, w3: number): void {
    const fingerprints = this.fingerprints;
    const base = location << 2;
    if (this.prevLink[location] !== 0) {
      if (
        fingerprints[base] === w0 &&
        fingerprints[base + 1] === w1 &&
        fingerprints[base + 2] === w2 &&
        fingerprints[base + 3] === w3
      ) {
        return;
      }
      this.unlink(location);
    }
    fingerprints[base] = w0;
    fingerprints[base + 1] = w1;
    fingerprints[base + 2] = w2;
    fingerprints[base + 3] = w3;
    this.knownLocations++;

    const next = this.nextLink;
    const prev = this.prevLink;
    let i = this.findSlot(hash, w0, w1, w2, w3);
    if (i >= 0) {
      // A duplicate: it becomes the head. Linking in at the head touches one other location
      // (the old head's prevLink); linking in after it would touch two.
      const slots = this.slots;
      const slot = slots[i]!;
      const oldHead = (slot & this.locationMask) - 1;
      prev[oldHead] = location + 1;
      next[location] = oldHead + 1;
      prev[location] = HEAD;
      slots[i] = (slot & this.tagMask) | (location + 1);
      return;
    }

    // A new content: it heads its own list, in the empty slot that ended the probe.
    i = ~i;
    if (this.contents >= this.growAt) {
      this.grow();
      const mask = this.slotMask;
      i = hash & mask;
      while (this.slots[i] !== 0) i = (i + 1) & mask;
    }
    this.slots[i] = (w1 & this.tagMask) | (location + 1);
    prev[location] = HEAD;
    next[location] = 0;
    this.contents++;
  }

  /** Removes a known location from its content's list (and the content, if it was the last). */
  private unlink(location: number): void {
    const next = this.nextLink;
    const prev = this.prevLink;
    const before = prev[location]!;
    const after = next[location]!;
    if (before !== HEAD) {
      next[before - 1] = after;
      if (after !== 0) prev[after - 1] = before;
    } else {
      const i = this.slotOfHead(location);
      if (after !== 0) {
        // The next holder takes over the slot; it has the same fingerprint, hence the same tag.
        prev[after - 1] = HEAD;
        this.slots[i] = (this.slots[i]! & this.tagMask) | after;
      } else {
        this.deleteSlot(i);
        this.contents--;
      }
    }
    prev[location] = 0;
    next[location] = 0;
    this.knownLocations--;
  }

  /** The slot whose list `location` heads. */
  private slotOfHead(location: number): number {
    const slots = this.slots;
    const mask = this.slotMask;
    const wanted = location + 1;
    const locationMask = this.locationMask;
    let i = this.hashOfLocation(location) & mask;
    while ((slots[i]! & locationMask) !== wanted) i = (i + 1) & mask;
    return i;
  }

  /**
   * Empties slot `hole` by backward shift: every later entry of the cluster that may live
   * closer to its home moves back, so no probe ever crosses a gap to find its entry and no
   * tombstones are needed.
   */
  private deleteSlot(hole: number): void {
    const slots = this.slots;
    const mask = this.slotMask;
    const locationMask = this.locationMask;
    let j = hole;
    for (;;) {
      j = (j + 1) & mask;
      const slot = slots[j]!;
      if (slot === 0) break;
      const home = this.hashOfLocation((slot & locationMask) - 1) & mask;
      // The entry at j may move to the hole iff the hole lies cyclically in [home, j):
      // its distance from home is at least the hole's distance from j.
      if (((j - home) & mask) >= ((j - hole) & mask)) {
        slots[hole] = slot;
        hole = j;
      }
    }
    slots[hole] = 0;
  }

  private grow(): void {
    const old = this.slots;
    const slotCount = old.length * 2;
    const slots = new Int32Array(slotCount);
    const mask = slotCount - 1;
    const locationMask = this.locationMask;
    for (let k = 0; k < old.length; k++) {
      const slot = old[k]!;
      if (slot === 0) continue;
      let i = this.hashOfLocation((slot & locationMask) - 1) & mask;
      while (slots[i] !== 0) i = (i + 1) & mask;
      slots[i] = slot;
    }
    this.slots = slots;
    this.slotMask = mask;
    this.growAt = Math.floor(slotCount * MAX_LOAD);
  }

  /**
   * Touch pass for up to TOUCH_CHUNK fingerprints: their hashes into touchHashes (compute
   * only), then their home slots, then the heads those point to (and, with `forLinking`, the
   * heads' prevLink, which linking a duplicate writes). Each loop body is a handful of
   * instructions around one independent load, and branch-free (a mispredicted branch on a
   * missing load would serialize the misses again). An empty slot reads location 0's words.
   */
  private touchContents(fps: Uint8Array, fpOffset: number, count: number, forLinking: boolean): void {
    const hashes = this.touchHashes;
    const heads = this.touchScratch;
    for (let k = 0; k < count; k++) hashes[k] = this.hashAt(fps, fpOffset + k * FINGERPRINT_BYTES);
    const slots = this.slots;
    const mask = this.slotMask;
    const locationMask = this.locationMask;
    for (let k = 0; k < count; k++) {
      const head = (slots[hashes[k]! & mask]! & locationMask) - 1;
      heads[k] = head & ~(head >> 31);
    }
    const fingerprints = this.fingerprints;
    let sink = 0;
    for (let k = 0; k < count; k++) sink ^= fingerprints[heads[k]! << 2]!;
    if (forLinking) {
      const prev = this.prevLink;
      for (let k = 0; k < count; k++) sink ^= prev[heads[k]!]!;
    }
    this.sink ^= sink;
  }

  /**
   * Touch pass for the locations a batch will set: their links and old words, then the slot
   * of each old content (unlinking a head rewrites or deletes it) and the neighbours' links.
   * (Touching the entries after that slot too, which a backward shift reads, measured no
   * better.)
   */
  private touchLocations(locations: Int32Array | Uint32Array, first: number, count: number): void {
    const fingerprints = this.fingerprints;
    const next = this.nextLink;
    const prev = this.prevLink;
    let sink = 0;
    for (let k = 0; k < count; k++) {
      const location = locations[first + k]!;
      sink ^= prev[location]! ^ next[location]! ^ fingerprints[location << 2]!;
    }
    // Not touchHashes: that holds the hashes the exact pass uses.
    const hashes = this.touchScratch;
    for (let k = 0; k < count; k++) hashes[k] = this.hashOfLocation(locations[first + k]!);
    const slots = this.slots;
    const mask = this.slotMask;
    for (let k = 0; k < count; k++) sink ^= slots[hashes[k]! & mask]!;
    for (let k = 0; k < count; k++) {
      const location = locations[first + k]!;
      // Links hold location + 1 (0: none); HEAD is -1. Clamp both to a valid index.
      const before = prev[location]! - 1;
      const after = next[location]! - 1;
      sink ^= next[before & ~(before >> 31)]! ^ prev[after & ~(after >> 31)]!;
    }
    this.sink ^= sink;
  }
}

/**
 * The slot hash: each word XORed with a key word and multiplied by an odd constant (a
 * bijection per word, so fingerprints differing in one word never collide before the
 * finalizer), combined, then the murmur3 finalizer so the low bits depend on every bit. Not a
 * PRF, but without the key nobody can aim fingerprints at a cluster; for honest
 * (XXH3-uniform) input it costs a few multiplies beside a cache miss.
 */
function mixFingerprint(
  w0: number,
  w1: number,
  w2: number,
  w3: number,
  k0: number,
  k1: number,
  k2: number,
  k3: number,
): number {
  let h =
    Math.imul(w0 ^ k0, 0x9e3779b1) ^
    Math.imul(w1 ^ k1, 0x85ebca77) ^
    Math.imul(w2 ^ k2, 0xc2b2ae3d) ^
    Math.imul(w3 ^ k3, 0x27d4eb2f);
  return fmix32(h);
}

/** The murmur3 finalizer: a bijection on u32 (also a counter-based PRNG for tests and benches). */
export function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h;
}

/** Four key words from a u32 seed (splitmix32). */
function hashKey(seed: number): Int32Array {
  const key = new Int32Array(4);
  let state = seed | 0;
  for (let i = 0; i < 4; i++) {
    state = (state + 0x9e3779b9) | 0;
    let z = state;
    z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
    z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
    key[i] = z ^ (z >>> 15);
  }
  return key;
}

function readWord(bytes: Uint8Array, at: number): number {
  return bytes[at]! | (bytes[at + 1]! << 8) | (bytes[at + 2]! << 16) | (bytes[at + 3]! << 24);
}

function checkFingerprint(bytes: Uint8Array, offset: number): void {
  if (offset >>> 0 !== offset || offset + FINGERPRINT_BYTES > bytes.length) {
    throw new RangeError(`no ${FINGERPRINT_BYTES}-byte fingerprint at offset ${offset} of ${bytes.length} bytes`);
  }
}

function checkBatch(fps: Uint8Array, fpOffset: number, count: number): void {
  if (count >>> 0 !== count || fpOffset >>> 0 !== fpOffset || fpOffset + count * FINGERPRINT_BYTES > fps.length) {
    throw new RangeError(`no ${count} fingerprints at offset ${fpOffset} of ${fps.length} bytes`);
  }
}
