// Tests of the N-API addon (native/src/addon.c) against the NativeAddon contract in
// agent/native.ts. Every region lives in a /dev/shm file so the tests can compare the
// mapped memory with the file's bytes (oracles below are plain JS over those bytes).
import { execFileSync, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import fc from 'fast-check';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ENTRY_DATA, ENTRY_ZERO, nativeDir, type RegionHandle } from '../../agent/native.js';
import { closeRegion, fillPseudoRandom, loose, mapFd, native, openFds, openRegions, releaseNativeResources, track, writeAll } from '../helpers/native.js';

// ---------------------------------------------------------------------------------------
// Resources, all released in afterEach (also when a test fails)
// ---------------------------------------------------------------------------------------

const tempFiles = new Set<string>();
const tempDirs = new Set<string>();
const childPids = new Set<number>();

afterEach(() => {
  releaseNativeResources();
  for (const pid of childPids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }
  childPids.clear();
  for (const file of tempFiles) fs.rmSync(file, { force: true });
  tempFiles.clear();
  for (const dir of tempDirs) fs.rmSync(dir, { recursive: true, force: true });
  tempDirs.clear();
});

let fileSeq = 0;
/** A fresh /dev/shm path, removed after the test. */
function shmPath(tag: string): string {
  const p = `/dev/shm/gangway-addon-test-${process.pid}-${tag}-${++fileSeq}`;
  tempFiles.add(p);
  return p;
}

function openFile(p: string, flags: string): number {
  const fd = fs.openSync(p, flags);
  openFds.add(fd);
  return fd;
}

function closeFd(fd: number): void {
  fs.closeSync(fd);
  openFds.delete(fd);
}

/** A /dev/shm file holding `content` (or `content` zero bytes); returns its path and an fd. */
function shmFile(tag: string, content: Buffer | number): { path: string; fd: number } {
  const p = shmPath(tag);
  const fd = openFile(p, 'w+');
  if (typeof content === 'number') {
    fs.ftruncateSync(fd, content);
  } else {
    writeAll(fd, content, 0);
  }
  return { path: p, fd };
}

/** Whether /proc/self/maps still has a mapping of `file`. */
function isMapped(file: string): boolean {
  return fs.readFileSync('/proc/self/maps', 'utf8').includes(file);
}

/** Whether the mapping of `file` is gone within 10 s (a large one is unmapped on a thread of its own). */
async function unmappedSoon(file: string): Promise<boolean> {
  const deadline = Date.now() + 10_000;
  while (isMapped(file) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
  return !isMapped(file);
}

// ---------------------------------------------------------------------------------------
// Content builders and JS oracles
// ---------------------------------------------------------------------------------------

type PageKind = 'zero' | 'data' | 'first' | 'mid' | 'last';
const PAGE_KINDS: readonly PageKind[] = ['zero', 'data', 'first', 'mid', 'last'];

/** Pages of the given kinds: 'first'/'mid'/'last' have a single non-zero byte there. */
function buildContent(kinds: readonly PageKind[], pageSize: number, seed = 1): Buffer {
  const buf = Buffer.alloc(kinds.length * pageSize);
  kinds.forEach((kind, i) => {
    const page = buf.subarray(i * pageSize, (i + 1) * pageSize);
    switch (kind) {
      case 'zero':
        break;
      case 'data':
        fillPseudoRandom(page, seed * 7919 + i);
        page[0] = 0xa5; // never all-zero by chance
        break;
      case 'first':
        page[0] = 1;
        break;
      case 'mid':
        page[pageSize >> 1] = 0x80;
        break;
      case 'last':
        page[pageSize - 1] = 0xff;
        break;
    }
  });
  return buf;
}

function isZeroPage(content: Buffer, page: number, pageSize: number): boolean {
  const slice = content.subarray(page * pageSize, (page + 1) * pageSize);
  for (const b of slice) if (b !== 0) return false;
  return true;
}

interface Batch {
  done: boolean;
  cursor: [number, number];
  entries: number[];
  payload: Buffer;
}

/** JS reimplementation of regionGather's contract over the file's bytes. */
function oracleGather(
  content: Buffer,
  pageSize: number,
  runs: Uint32Array,
  cursor: readonly [number, number],
  payloadCap: number,
  entryCap: number,
): Batch {
  let [ri, doneInRun] = cursor;
  const runCount = runs.length / 2;
  const entries: number[] = [];
  const payload: Buffer[] = [];
  let payloadBytes = 0;
  outer: while (ri < runCount) {
    const first = runs[2 * ri]!;
    const count = runs[2 * ri + 1]!;
    while (doneInRun < count) {
      const page = first + doneInRun;
      const kind = isZeroPage(content, page, pageSize) ? ENTRY_ZERO : ENTRY_DATA;
      if (kind === ENTRY_DATA && payloadBytes + pageSize > payloadCap) break outer;
      const n = entries.length / 3;
      if (n > 0 && entries[3 * n - 3] === kind && entries[3 * n - 2]! + entries[3 * n - 1]! === page) {
        entries[3 * n - 1] = entries[3 * n - 1]! + 1;
      } else {
        if (n === entryCap) break outer;
        entries.push(kind, page, 1);
      }
      if (kind === ENTRY_DATA) {
        payload.push(content.subarray(page * pageSize, (page + 1) * pageSize));
        payloadBytes += pageSize;
      }
      doneInRun++;
    }
    ri++;
    doneInRun = 0;
  }
  return { done: ri === runCount, cursor: [ri, doneInRun], entries, payload: Buffer.concat(payload) };
}

/** One native gather call, copied out into a Batch. */
function nativeGather(
  region: RegionHandle,
  runs: Uint32Array,
  cursor: Uint32Array,
  payload: Buffer,
  entries: Uint32Array,
): Batch {
  const out = new Uint32Array(2);
  const done = native.regionGather(region, runs, cursor, payload, entries, out);
  return {
    done,
    cursor: [cursor[0]!, cursor[1]!],
    entries: Array.from(entries.subarray(0, out[0]! * 3)),
    payload: Buffer.from(payload.subarray(0, out[1]!)),
  };
}

function runsOf(pairs: ReadonlyArray<readonly [number, number]>): Uint32Array {
  return new Uint32Array(pairs.flatMap(([first, count]) => [first, count]));
}

/** Region digest per the contract, from the addon's hash128 over the file's bytes. */
function oracleDigest(content: Buffer, pageSize: number): Buffer {
  const fingerprints: Buffer[] = [];
  for (let off = 0; off < content.length; off += pageSize) {
    fingerprints.push(native.hash128(content.subarray(off, off + pageSize)));
  }
  return native.hash128(Buffer.concat(fingerprints));
}

/** Gathers every page of `runs` from src in batches and scatters each into dst. */
function copyRegion(
  src: RegionHandle,
  dst: RegionHandle,
  runs: Uint32Array,
  payloadBytes: number,
  entryCap: number,
): number {
  const cursor = new Uint32Array(2);
  const payload = Buffer.alloc(payloadBytes);
  const entries = new Uint32Array(entryCap * 3);
  const out = new Uint32Array(2);
  let batches = 0;
  for (;;) {
    const done = native.regionGather(src, runs, cursor, payload, entries, out);
    native.regionScatter(dst, entries, out[0]!, payload.subarray(0, out[1]!));
    batches++;
    if (done) return batches;
  }
}

// ---------------------------------------------------------------------------------------
// hash128
// ---------------------------------------------------------------------------------------

/** xxHash's sanity-test input (tests/sanity_test_vectors.h). */
function sanityBuffer(length: number): Buffer {
  const PRIME32 = 2654435761n;
  const PRIME64 = 11400714785074694797n;
  const MASK = (1n << 64n) - 1n;
  const buf = Buffer.alloc(length);
  let gen = PRIME32;
  for (let i = 0; i < length; i++) {
    buf[i] = Number(gen >> 56n);
    gen = (gen * PRIME64) & MASK;
  }
  return buf;
}

describe('hash128', () => {
  // XSUM_XXH128_testdata, seed 0: { low64, high64 } -> canonical = high64 ‖ low64, big-endian.
  const vectors: Array<[number, string]> = [
    [0, '99aa06d3014798d8' + '6001c324468d497f'],
    [1, 'a6cd5e9392000f6a' + 'c44bdff4074eecdb'],
    [81, '4952f58181ab0042' + '5e8bafb9f95fb803'],
    [2240, 'ccb134fbfa7ce49d' + '6e73a90539cf2948'],
    [2367, 'e89c0f6ff369b427' + 'cb37aeb9e5d361ed'],
  ];
  it.each(vectors)('matches the xxHash 0.8 test vector for %i bytes', (length, hex) => {
    const out = native.hash128(sanityBuffer(length));
    expect(Buffer.isBuffer(out)).toBe(true);
    expect(out.toString('hex')).toBe(hex);
  });

  it('hashes exactly the view it is given', () => {
    const big = Buffer.concat([Buffer.from('xx'), sanityBuffer(81), Buffer.from('yy')]);
    expect(native.hash128(big.subarray(2, 83)).toString('hex')).toBe(vectors[2]![1]);
    expect(native.hash128(new Uint8Array(sanityBuffer(81))).toString('hex')).toBe(vectors[2]![1]);
  });

  it('rejects non-Uint8Array input', () => {
    expect(() => loose.hash128!('text')).toThrow(TypeError);
    expect(() => loose.hash128!(new Uint32Array(4))).toThrow(/data must be a Uint8Array/);
    expect(() => loose.hash128!()).toThrow(TypeError);
  });
});

// ---------------------------------------------------------------------------------------
// testvmDiskBlocks: the test kernel's disk content
// ---------------------------------------------------------------------------------------

describe('testvmDiskBlocks', () => {
  const BLOCK = 4096;
  function blocks(seed: bigint, imageSeed: bigint, base: number, first: number, versions: number[]) {
    const out = Buffer.alloc(versions.length * BLOCK);
    const zero = new Uint8Array(versions.length);
    native.testvmDiskBlocks(seed, imageSeed, base, first, Uint32Array.from(versions), out, zero);
    return { out, zero };
  }

  it('is a pure function of each block and version, whatever the batch; beyond the base, version 0 is zeros', () => {
    const batch = blocks(5n, 7n, 8, 4, [0, 0, 0, 0, 0, 1, 2, 0]);
    for (let i = 0; i < 8; i++) {
      const one = blocks(5n, 7n, 8, 4 + i, [[0, 0, 0, 0, 0, 1, 2, 0][i]!]);
      expect(one.out.equals(batch.out.subarray(i * BLOCK, (i + 1) * BLOCK)), `block ${4 + i}`).toBe(true);
      expect(one.zero[0]).toBe(batch.zero[i]);
    }
    for (let i = 0; i < 8; i++) {
      const isZero = batch.out.subarray(i * BLOCK, (i + 1) * BLOCK).equals(Buffer.alloc(BLOCK));
      expect(batch.zero[i] === 1, `block ${4 + i}`).toBe(isZero);
    }
    expect(batch.zero[4]).toBe(1); // block 8, the first beyond the base
    expect(batch.zero[7]).toBe(1);
    expect(batch.zero[5]).toBe(0); // written versions are never zero
    // The base depends on the image seed only; written versions on the seed.
    expect(blocks(6n, 7n, 8, 0, [0]).out.equals(blocks(5n, 7n, 8, 0, [0]).out)).toBe(true);
    expect(blocks(6n, 7n, 8, 9, [1]).out.equals(blocks(5n, 7n, 8, 9, [1]).out)).toBe(false);
    expect(blocks(5n, 7n, 8, 9, [1]).out.equals(blocks(5n, 7n, 8, 9, [2]).out)).toBe(false);
  });

  it('validates its arguments by name, writing nothing when one is wrong', () => {
    const out = Buffer.alloc(BLOCK, 0xee);
    const zero = new Uint8Array(1);
    expect(() => loose.testvmDiskBlocks!(5, 7n, 0, 0, new Uint32Array(1), out, zero)).toThrow(/seed must be a bigint/);
    expect(() => loose.testvmDiskBlocks!(5n, -7n, 0, 0, new Uint32Array(1), out, zero)).toThrow(RangeError);
    expect(() => loose.testvmDiskBlocks!(5n, 7n, -1, 0, new Uint32Array(1), out, zero)).toThrow(/baseBlocks/);
    expect(() => loose.testvmDiskBlocks!(5n, 7n, 0, 0, [0], out, zero)).toThrow(/versions must be a Uint32Array/);
    expect(() => native.testvmDiskBlocks(5n, 7n, 0, 0, new Uint32Array(2), out, new Uint8Array(2))).toThrow(/out has 4096 bytes/);
    expect(() => native.testvmDiskBlocks(5n, 7n, 0, 0, new Uint32Array(1), out, new Uint8Array(0))).toThrow(/zero has 0 entries/);
    expect(out.equals(Buffer.alloc(BLOCK, 0xee))).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------
// regionMap / regionClose
// ---------------------------------------------------------------------------------------

describe('regionMap argument validation', () => {
  it('names the bad argument', () => {
    const { fd } = shmFile('validate', 8192);
    const opts = { writable: false, trackHashes: false, initiallyZero: false };
    const cases: Array<[unknown[], RegExp, ErrorConstructor]> = [
      [['3', 8192, 4096, opts], /fd must be a number/, TypeError],
      [[-1, 8192, 4096, opts], /fd must be an integer/, RangeError],
      [[fd, 0, 4096, opts], /lengthBytes/, RangeError],
      [[fd, 4097, 4096, opts], /lengthBytes .* multiple of the page size/, RangeError],
      [[fd, 8192.5, 4096, opts], /lengthBytes/, RangeError],
      [[fd, 8192, 3000, opts], /pageSizeBytes must be a power of two/, RangeError],
      [[fd, 8192, 256, opts], /pageSizeBytes/, RangeError],
      [[fd, 4 << 20, 2 << 20, opts], /pageSizeBytes/, RangeError],
      [[fd, 8192, 4096], /options must be an object/, TypeError],
      [[fd, 8192, 4096, null], /options must be an object/, TypeError],
      [[fd, 8192, 4096, { ...opts, writable: 1 }], /options\.writable must be a boolean/, TypeError],
      [[fd, 8192, 4096, { writable: false, trackHashes: false }], /options\.initiallyZero/, TypeError],
      [[fd, 16384, 4096, opts], /shorter than lengthBytes/, RangeError],
    ];
    for (const [args, message, type] of cases) {
      let caught: unknown;
      try {
        track(loose.regionMap!(...args) as RegionHandle);
      } catch (err) {
        caught = err;
      }
      expect(caught, `regionMap(${String(args.slice(1))})`).toBeInstanceOf(type);
      expect((caught as Error).message).toMatch(message);
    }
  });

  it('reports mmap and fstat failures with errno text', () => {
    const { path: p } = shmFile('ro', 8192);
    const roFd = openFile(p, 'r');
    expect(() => mapFd(roFd, 8192, 4096, { writable: true })).toThrow(/not open for writing/);
    const dirFd = openFile('/dev/shm', 'r');
    expect(() => mapFd(dirFd, 8192, 4096)).toThrow(/not a regular file/);
    const closed = fs.openSync(p, 'r');
    fs.closeSync(closed);
    expect(() => mapFd(closed, 8192, 4096)).toThrow(/EBADF/);
  });

  it('maps, survives closing the fd, and unmaps on regionClose (idempotent)', () => {
    const content = buildContent(['data', 'zero', 'last'], 4096);
    const { path: p, fd } = shmFile('lifecycle', content);
    const region = mapFd(fd, content.length, 4096);
    closeFd(fd);
    expect(isMapped(p)).toBe(true);
    const batch = nativeGather(region, runsOf([[0, 3]]), new Uint32Array(2), Buffer.alloc(3 * 4096), new Uint32Array(9));
    expect(batch.payload.equals(Buffer.concat([content.subarray(0, 4096), content.subarray(8192)]))).toBe(true);
    native.regionClose(region);
    expect(isMapped(p)).toBe(false);
    expect(() => native.regionClose(region)).not.toThrow();
  });

  it('a large mapping (>= 64 MiB) is unmapped on a thread of its own: regionClose returns at once and the mapping goes soon after', async () => {
    const length = 128 * 1024 * 1024;
    const { path: p, fd } = shmFile('large', length);
    const region = mapFd(fd, length, 4096);
    closeFd(fd);
    // Every page faulted in: the teardown then has a page table to walk.
    await native.regionDigest(region, 'full');
    expect(isMapped(p)).toBe(true);
    native.regionClose(region);
    expect(() => native.regionGather(region, runsOf([[0, 1]]), new Uint32Array(2), Buffer.alloc(4096), new Uint32Array(3), new Uint32Array(2))).toThrow(/closed/);
    expect(await unmappedSoon(p)).toBe(true);
  });

  it('closed handles throw on every call', async () => {
    const { fd } = shmFile('closed', 8192);
    const region = mapFd(fd, 8192, 4096, { writable: true, trackHashes: true, initiallyZero: true });
    closeRegion(region);
    const runs = runsOf([[0, 2]]);
    expect(() =>
      native.regionGather(region, runs, new Uint32Array(2), Buffer.alloc(4096), new Uint32Array(3), new Uint32Array(2)),
    ).toThrow(/^region is closed$/);
    expect(() => native.regionScatter(region, new Uint32Array([ENTRY_ZERO, 0, 1]), 1, Buffer.alloc(0))).toThrow(
      /^region is closed$/,
    );
    await expect(native.regionDigest(region, 'full')).rejects.toThrow(/^region is closed$/);
    await expect(native.regionDigest(region, 'tracked')).rejects.toThrow(/^region is closed$/);
    native.regionClose(region);
  });

  it('rejects things that are not region handles', async () => {
    const args = [runsOf([[0, 1]]), new Uint32Array(2), Buffer.alloc(4096), new Uint32Array(3), new Uint32Array(2)];
    for (const fake of [{}, null, 1, 'region', Buffer.alloc(8)]) {
      expect(() => loose.regionGather!(fake, ...args)).toThrow(/region must be a RegionHandle/);
      expect(() => loose.regionClose!(fake)).toThrow(TypeError);
      await expect(loose.regionDigest!(fake, 'full') as Promise<Buffer>).rejects.toThrow(TypeError);
    }
  });

  it('a region dropped without regionClose is unmapped by the garbage collector', async () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    const { path: p, fd } = shmFile('gc', 64 * 1024);
    (() => {
      native.regionMap(fd, 64 * 1024, 4096, { writable: false, trackHashes: true, initiallyZero: true });
    })();
    expect(isMapped(p)).toBe(true);
    for (let i = 0; i < 50 && isMapped(p); i++) {
      gc();
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    expect(isMapped(p)).toBe(false);
  });
});

// ---------------------------------------------------------------------------------------
// regionGather
// ---------------------------------------------------------------------------------------

describe('regionGather', () => {
  it('produces coalesced zero/data entries and the data pages (hand-written expectation)', () => {
    const ps = 4096;
    //             0       1       2       3       4       5       6       7      8       9
    const kinds: PageKind[] = ['zero', 'zero', 'zero', 'data', 'last', 'zero', 'mid', 'zero', 'zero', 'first'];
    const content = buildContent(kinds, ps);
    const { fd } = shmFile('gather', content);
    const region = mapFd(fd, content.length, ps);
    const cursor = new Uint32Array(2);
    const batch = nativeGather(region, runsOf([[0, 10]]), cursor, Buffer.alloc(16 * ps), new Uint32Array(30));
    expect(batch.done).toBe(true);
    expect(batch.cursor).toEqual([1, 0]);
    expect(batch.entries).toEqual([
      ENTRY_ZERO, 0, 3,
      ENTRY_DATA, 3, 2,
      ENTRY_ZERO, 5, 1,
      ENTRY_DATA, 6, 1,
      ENTRY_ZERO, 7, 2,
      ENTRY_DATA, 9, 1,
    ]); // prettier-ignore
    const page = (i: number) => content.subarray(i * ps, (i + 1) * ps);
    expect(batch.payload.equals(Buffer.concat([page(3), page(4), page(6), page(9)]))).toBe(true);
  });

  it('coalesces across adjacent runs but not across gaps, and one zero entry spans many pages', () => {
    const ps = 512;
    const kinds: PageKind[] = Array.from({ length: 4096 }, (_, i) => (i >= 100 && i < 104 ? 'data' : 'zero'));
    const content = buildContent(kinds, ps);
    const { fd } = shmFile('coalesce', content);
    const region = mapFd(fd, content.length, ps);
    const runs = runsOf([
      [0, 50],
      [50, 52],
      [102, 1],
      [103, 3000],
      [3200, 10],
    ]);
    const batch = nativeGather(region, runs, new Uint32Array(2), Buffer.alloc(8 * ps), new Uint32Array(12));
    expect(batch.done).toBe(true);
    expect(batch.entries).toEqual([
      ENTRY_ZERO, 0, 100,
      ENTRY_DATA, 100, 4,
      ENTRY_ZERO, 104, 2999,
      ENTRY_ZERO, 3200, 10,
    ]); // prettier-ignore
    expect(batch.payload.equals(content.subarray(100 * ps, 104 * ps))).toBe(true);
  });

  it('matches the JS oracle batch by batch and honours both capacities', () => {
    const ps = 4096;
    const kinds = Array.from({ length: 200 }, (_, i) => PAGE_KINDS[(i * 7 + (i >> 3)) % PAGE_KINDS.length]!);
    const content = buildContent(kinds, ps, 42);
    const { fd } = shmFile('oracle', content);
    const region = mapFd(fd, content.length, ps);
    const runs = runsOf([
      [0, 17],
      [17, 40],
      [90, 30],
      [150, 1],
      [151, 49],
    ]);
    for (const [payloadPages, entryCap] of [
      [1, 1],
      [2, 3],
      [5, 2],
      [64, 64],
    ] as const) {
      const cursor = new Uint32Array(2);
      let oracleCursor: [number, number] = [0, 0];
      const payload = Buffer.alloc(payloadPages * ps);
      const entries = new Uint32Array(entryCap * 3);
      for (let i = 0; ; i++) {
        expect(i).toBeLessThan(1000);
        const expected = oracleGather(content, ps, runs, oracleCursor, payloadPages * ps, entryCap);
        const got = nativeGather(region, runs, cursor, payload, entries);
        expect(got).toEqual(expected);
        expect(got.entries.length / 3).toBeLessThanOrEqual(entryCap);
        expect(got.payload.length).toBeLessThanOrEqual(payloadPages * ps);
        oracleCursor = expected.cursor;
        if (got.done) break;
      }
    }
  });

  it('property: batches concatenate to the requested pages exactly once, in order', () => {
    const ps = 512;
    const pageCount = 48;
    const { fd } = shmFile('property', pageCount * ps);
    const region = mapFd(fd, pageCount * ps, ps);
    const run = fc
      .tuple(fc.nat(pageCount - 1), fc.nat(10))
      .map(([first, count]) => [first, Math.min(count, pageCount - first)] as const);
    fc.assert(
      fc.property(
        fc.array(fc.constantFrom(...PAGE_KINDS), { minLength: pageCount, maxLength: pageCount }),
        fc.array(run, { maxLength: 12 }),
        fc.integer({ min: 1, max: 4 }),
        fc.integer({ min: 1, max: 4 }),
        fc.integer({ min: 1, max: 1000 }),
        (kinds, runPairs, payloadPages, entryCap, seed) => {
          const content = buildContent(kinds, ps, seed);
          writeAll(fd, content, 0); // MAP_SHARED: the region sees the new bytes
          const runs = runsOf(runPairs);
          const wanted = runPairs.flatMap(([first, count]) => Array.from({ length: count }, (_, k) => first + k));
          const cursor = new Uint32Array(2);
          const payload = Buffer.alloc(payloadPages * ps);
          const entries = new Uint32Array(entryCap * 3);
          const seenPages: number[] = [];
          let oracleCursor: [number, number] = [0, 0];
          for (let calls = 0; ; calls++) {
            if (calls > wanted.length + 1) throw new Error('regionGather makes no progress');
            const batch = nativeGather(region, runs, cursor, payload, entries);
            expect(batch).toEqual(oracleGather(content, ps, runs, oracleCursor, payloadPages * ps, entryCap));
            oracleCursor = batch.cursor;
            const n = batch.entries.length / 3;
            expect(n).toBeLessThanOrEqual(entryCap);
            let payloadOffset = 0;
            for (let e = 0; e < n; e++) {
              const [kind, first, count] = batch.entries.slice(3 * e, 3 * e + 3) as [number, number, number];
              expect(count).toBeGreaterThan(0);
              if (e > 0) {
                // maximal coalescing: the previous entry could not have absorbed this one
                const [prevKind, prevFirst, prevCount] = batch.entries.slice(3 * e - 3, 3 * e) as [number, number, number];
                expect(prevKind === kind && prevFirst + prevCount === first).toBe(false);
              }
              for (let page = first; page < first + count; page++) {
                seenPages.push(page);
                const zero = isZeroPage(content, page, ps);
                expect(kind).toBe(zero ? ENTRY_ZERO : ENTRY_DATA);
                if (kind === ENTRY_DATA) {
                  const bytes = batch.payload.subarray(payloadOffset, payloadOffset + ps);
                  expect(bytes.equals(content.subarray(page * ps, (page + 1) * ps))).toBe(true);
                  payloadOffset += ps;
                }
              }
            }
            expect(payloadOffset).toBe(batch.payload.length);
            if (batch.done) break;
            // A batch only stops early when full: no entry slot, or no room for a data page.
            expect(n === entryCap || batch.payload.length + ps > payloadPages * ps).toBe(true);
            expect(n).toBeGreaterThan(0);
          }
          expect(seenPages).toEqual(wanted);
          expect(Array.from(cursor)).toEqual([runPairs.length, 0]);
        },
      ),
      { numRuns: 200 },
    );
  });

  it('validates its arguments by name', () => {
    const ps = 4096;
    const { fd } = shmFile('gather-args', 8 * ps);
    const region = mapFd(fd, 8 * ps, ps);
    const ok = {
      runs: runsOf([[0, 8]]),
      cursor: new Uint32Array(2),
      payload: Buffer.alloc(2 * ps),
      entries: new Uint32Array(6),
      out: new Uint32Array(2),
    };
    const call = (over: Partial<Record<keyof typeof ok, unknown>>) => () =>
      loose.regionGather!(
        region,
        'runs' in over ? over.runs : ok.runs,
        'cursor' in over ? over.cursor : new Uint32Array(2),
        'payload' in over ? over.payload : ok.payload,
        'entries' in over ? over.entries : ok.entries,
        'out' in over ? over.out : ok.out,
      );
    expect(call({})).not.toThrow();
    expect(call({ runs: [0, 8] })).toThrow(/runs must be a Uint32Array/);
    expect(call({ runs: new Int32Array([0, 8]) })).toThrow(TypeError);
    expect(call({ runs: new Uint32Array([0, 8, 1]) })).toThrow(/runs .* odd/);
    expect(call({ runs: runsOf([[0, 9]]) })).toThrow(/run 0 .* outside the region of 8 pages/);
    expect(call({ runs: runsOf([[8, 1]]) })).toThrow(RangeError);
    expect(call({ runs: runsOf([[0xffffffff, 2]]) })).toThrow(RangeError);
    expect(call({ cursor: new Uint32Array(3) })).toThrow(/cursor must have length 2/);
    expect(call({ cursor: new Uint32Array([2, 0]) })).toThrow(/cursor\[0\]/);
    expect(call({ cursor: new Uint32Array([0, 9]) })).toThrow(/cursor\[1\]/);
    expect(call({ cursor: new Uint32Array([1, 1]) })).toThrow(/cursor\[1\]/);
    expect(call({ payload: Buffer.alloc(ps + 1) })).toThrow(/payload length .* multiple of the page size/);
    expect(call({ payload: Buffer.alloc(0) })).toThrow(/payload/);
    expect(call({ payload: new Uint32Array(ps) })).toThrow(/payload must be a Uint8Array/);
    expect(call({ entries: new Uint32Array(4) })).toThrow(/entries .* multiple of 3/);
    expect(call({ entries: new Uint32Array(0) })).toThrow(/entries/);
    expect(call({ out: new Uint32Array(1) })).toThrow(/out must have length 2/);
    expect(call({ out: undefined })).toThrow(/out must be a Uint32Array/);
  });

  it('a zero-count run is skipped and an all-consumed cursor returns true with an empty batch', () => {
    const ps = 4096;
    const content = buildContent(['data', 'data'], ps);
    const { fd } = shmFile('empty-runs', content);
    const region = mapFd(fd, content.length, ps);
    const runs = runsOf([
      [0, 0],
      [1, 1],
      [2, 0],
    ]);
    const batch = nativeGather(region, runs, new Uint32Array(2), Buffer.alloc(ps), new Uint32Array(3));
    expect(batch).toEqual({ done: true, cursor: [3, 0], entries: [ENTRY_DATA, 1, 1], payload: content.subarray(ps) });
    const again = nativeGather(region, runs, new Uint32Array([3, 0]), Buffer.alloc(ps), new Uint32Array(3));
    expect(again).toEqual({ done: true, cursor: [3, 0], entries: [], payload: Buffer.alloc(0) });
  });
});

// ---------------------------------------------------------------------------------------
// regionScatter and regionDigest
// ---------------------------------------------------------------------------------------

describe('regionScatter and regionDigest', () => {
  const ps = 4096;
  const pages = 300;
  const kinds = Array.from({ length: pages }, (_, i) => (i % 5 === 0 || (i > 100 && i < 140) ? 'zero' : PAGE_KINDS[i % 5]!));

  for (const variant of ['fresh tracked', 'dirty tracked', 'dirty untracked'] as const) {
    it(`scatter reproduces the source exactly (${variant} destination)`, async () => {
      const content = buildContent(kinds, ps, 7);
      const src = shmFile('src', content);
      const srcRegion = mapFd(src.fd, content.length, ps, { trackHashes: true });
      const dirty = variant !== 'fresh tracked';
      const dst = shmFile('dst', dirty ? buildContent(Array<PageKind>(pages).fill('data'), ps, 99) : content.length);
      const tracked = variant !== 'dirty untracked';
      const dstRegion = mapFd(dst.fd, content.length, ps, { writable: true, trackHashes: tracked, initiallyZero: !dirty });

      const batches = copyRegion(srcRegion, dstRegion, runsOf([[0, pages]]), 16 * ps, 8);
      expect(batches).toBeGreaterThan(5);
      expect(fs.readFileSync(dst.path).equals(content)).toBe(true);

      const expected = oracleDigest(content, ps);
      expect((await native.regionDigest(srcRegion, 'full')).equals(expected)).toBe(true);
      expect((await native.regionDigest(srcRegion, 'tracked')).equals(expected)).toBe(true);
      expect((await native.regionDigest(dstRegion, 'full')).equals(expected)).toBe(true);
      if (tracked) expect((await native.regionDigest(dstRegion, 'tracked')).equals(expected)).toBe(true);
      else await expect(native.regionDigest(dstRegion, 'tracked')).rejects.toThrow(/trackHashes/);
    });
  }

  it('a full digest of a large writable region (read on several threads through preads) equals the mapped one and the oracle, and sees one byte', async () => {
    // Two slices' worth at least (digest.c splits from 2 x 16384 pages on).
    const big = 2 * 16384 + 77;
    const content = buildContent(Array.from({ length: big }, (_, i) => (i % 7 === 0 ? 'zero' : PAGE_KINDS[i % 5]!)), ps, 11);
    const file = shmFile('big', content);
    const mapped = mapFd(file.fd, content.length, ps);
    const writable = mapFd(file.fd, content.length, ps, { writable: true });
    const expected = oracleDigest(content, ps);
    expect((await native.regionDigest(writable, 'full')).equals(expected)).toBe(true);
    expect((await native.regionDigest(mapped, 'full')).equals(expected)).toBe(true);
    // A byte in the last slice's last page.
    writeAll(file.fd, Buffer.from([0x5a]), (big - 1) * ps + 9);
    const changed = await native.regionDigest(writable, 'full');
    expect(changed.equals(expected)).toBe(false);
    expect(changed.equals(await native.regionDigest(mapped, 'full'))).toBe(true);
    // A file cut short under the region: the read fails, and the digest says so.
    fs.ftruncateSync(file.fd, 4 * ps);
    await expect(native.regionDigest(writable, 'full')).rejects.toThrow(/regionDigest: reading the region failed/);
  });

  it('a one-byte difference changes the digest; tracked follows scatter', async () => {
    const content = buildContent(kinds, ps, 3);
    const src = shmFile('one-src', content);
    const dst = shmFile('one-dst', content.length);
    const srcRegion = mapFd(src.fd, content.length, ps);
    const dstRegion = mapFd(dst.fd, content.length, ps, { writable: true, trackHashes: true, initiallyZero: true });
    copyRegion(srcRegion, dstRegion, runsOf([[0, pages]]), 64 * ps, 64);
    const before = await native.regionDigest(srcRegion, 'full');
    expect((await native.regionDigest(dstRegion, 'tracked')).equals(before)).toBe(true);

    // Flip one byte of a zero page (through the file) in the source.
    writeAll(src.fd, Buffer.from([1]), 120 * ps + 17);
    const after = await native.regionDigest(srcRegion, 'full');
    expect(after.equals(before)).toBe(false);
    expect(after.equals(oracleDigest(fs.readFileSync(src.path), ps))).toBe(true);

    // Sending that one page over updates the destination's tracked digest to match.
    const runs = runsOf([[120, 1]]);
    copyRegion(srcRegion, dstRegion, runs, ps, 1);
    expect((await native.regionDigest(dstRegion, 'tracked')).equals(after)).toBe(true);
    expect((await native.regionDigest(dstRegion, 'full')).equals(after)).toBe(true);

    // And zeroing it again restores the original digest on both sides.
    writeAll(src.fd, Buffer.from([0]), 120 * ps + 17);
    copyRegion(srcRegion, dstRegion, runs, ps, 1);
    expect((await native.regionDigest(dstRegion, 'tracked')).equals(before)).toBe(true);
    expect(fs.readFileSync(dst.path).equals(content)).toBe(true);
  });

  it("ENTRY_ZERO skips pages whose fingerprint is already the zero page's, only when tracking", () => {
    // A destination that claims (initiallyZero) to be zero but is not: tracked zeroing
    // trusts the fingerprints, untracked zeroing always writes.
    const content = buildContent(['data', 'data', 'data'], ps);
    const a = shmFile('skip-tracked', content);
    const b = shmFile('skip-untracked', content);
    const trackedRegion = mapFd(a.fd, content.length, ps, { writable: true, trackHashes: true, initiallyZero: true });
    const plainRegion = mapFd(b.fd, content.length, ps, { writable: true, trackHashes: false, initiallyZero: true });
    const zeroAll = new Uint32Array([ENTRY_ZERO, 0, 3]);
    native.regionScatter(trackedRegion, zeroAll, 1, Buffer.alloc(0));
    native.regionScatter(plainRegion, zeroAll, 1, Buffer.alloc(0));
    expect(fs.readFileSync(a.path).equals(content)).toBe(true);
    expect(fs.readFileSync(b.path).equals(Buffer.alloc(content.length))).toBe(true);
    // Once a data page is scattered, its fingerprint is no longer zero: zeroing writes.
    native.regionScatter(trackedRegion, new Uint32Array([ENTRY_DATA, 1, 1]), 1, content.subarray(ps, 2 * ps));
    native.regionScatter(trackedRegion, new Uint32Array([ENTRY_ZERO, 1, 1]), 1, Buffer.alloc(0));
    const now = fs.readFileSync(a.path);
    expect(now.subarray(ps, 2 * ps).equals(Buffer.alloc(ps))).toBe(true);
    expect(now.subarray(0, ps).equals(content.subarray(0, ps))).toBe(true);
  });

  it('rejects bad entries and payloads, writing nothing', async () => {
    const n = 16;
    const content = buildContent(Array<PageKind>(n).fill('data'), ps, 5);
    const dst = shmFile('reject', content);
    const region = mapFd(dst.fd, content.length, ps, { writable: true, trackHashes: true });
    const trackedBefore = await native.regionDigest(region, 'tracked');
    const page = Buffer.alloc(ps, 0x11);
    const pagesOf = (k: number) => Buffer.alloc(k * ps, 0x22);
    // Each case starts with a valid entry so a non-atomic implementation would write it.
    const cases: Array<[number[], number, Uint8Array, RegExp]> = [
      [[ENTRY_DATA, 0, 1, ENTRY_DATA, n - 1, 2], 2, pagesOf(3), /entry 1 .* outside the region of 16 pages/],
      [[ENTRY_DATA, 0, 1, ENTRY_ZERO, n, 1], 2, page, /entry 1 .* outside/],
      [[ENTRY_DATA, 0, 1, ENTRY_ZERO, 0xffffffff, 2], 2, page, /entry 1 .* outside/],
      [[ENTRY_DATA, 0, 1, ENTRY_DATA, 0xfffffff0, 0x20], 2, pagesOf(0x21), /entry 1 .* outside/],
      [[ENTRY_ZERO, 0, 1, 0, 3, 1], 2, Buffer.alloc(0), /entry 1 has an unknown kind \(0\)/],
      [[ENTRY_ZERO, 0, 1, 3, 3, 1], 2, Buffer.alloc(0), /unknown kind \(3\)/],
      [[ENTRY_ZERO, 0, 1, ENTRY_DATA, 3, 0], 2, page, /entry 1 has a zero page count/],
      [[ENTRY_DATA, 0, 2], 1, page, /payload is 4096 bytes but .* need exactly 8192/],
      [[ENTRY_DATA, 0, 2], 1, pagesOf(3), /payload/],
      [[ENTRY_DATA, 0, 1], 1, pagesOf(2).subarray(1), /payload/],
      [[ENTRY_ZERO, 0, 4], 1, page, /payload is 4096 bytes/],
    ];
    for (const [entries, count, payload, message] of cases) {
      expect(() => native.regionScatter(region, new Uint32Array(entries), count, payload), String(entries)).toThrow(RangeError);
      expect(() => native.regionScatter(region, new Uint32Array(entries), count, payload)).toThrow(message);
    }
    expect(() => native.regionScatter(region, new Uint32Array([ENTRY_DATA, 0, 1]), 2, page)).toThrow(/entryCount/);
    expect(() => native.regionScatter(region, new Uint32Array([ENTRY_DATA, 0, 1]), 0.5, page)).toThrow(/entryCount/);
    expect(() => loose.regionScatter!(region, new Uint32Array([ENTRY_DATA, 0, 1]), '1', page)).toThrow(TypeError);
    expect(() => loose.regionScatter!(region, [ENTRY_DATA, 0, 1], 1, page)).toThrow(/entries must be a Uint32Array/);
    expect(() => loose.regionScatter!(region, new Uint32Array([ENTRY_DATA, 0, 1]), 1, new Uint32Array(1024))).toThrow(
      /payload must be a Uint8Array/,
    );
    expect(fs.readFileSync(dst.path).equals(content)).toBe(true);
    expect((await native.regionDigest(region, 'tracked')).equals(trackedBefore)).toBe(true);

    // entryCount limits what is read: trailing garbage beyond it is ignored.
    native.regionScatter(region, new Uint32Array([ENTRY_DATA, 2, 1, 0xdead, 0, 0]), 1, page);
    expect(fs.readFileSync(dst.path).subarray(2 * ps, 3 * ps).equals(page)).toBe(true);
    native.regionScatter(region, new Uint32Array(0), 0, Buffer.alloc(0));
  });

  it('refuses to scatter into a read-only region', () => {
    const { fd } = shmFile('readonly', 2 * ps);
    const region = mapFd(fd, 2 * ps, ps);
    expect(() => native.regionScatter(region, new Uint32Array([ENTRY_ZERO, 0, 1]), 1, Buffer.alloc(0))).toThrow(
      /read-only/,
    );
  });

  it('digest mode validation', async () => {
    const { fd } = shmFile('mode', 2 * ps);
    const region = mapFd(fd, 2 * ps, ps);
    await expect(native.regionDigest(region, 'tracked')).rejects.toThrow(/'tracked' needs a region mapped with trackHashes/);
    await expect(loose.regionDigest!(region, 'fast') as Promise<Buffer>).rejects.toThrow(TypeError);
    await expect(loose.regionDigest!(region) as Promise<Buffer>).rejects.toThrow(/mode must be 'full' or 'tracked'/);
    // A fresh all-zero region: tracked (initiallyZero) and full agree with the oracle.
    const z = shmFile('zero', 64 * ps);
    const zeroRegion = mapFd(z.fd, 64 * ps, ps, { writable: true, trackHashes: true, initiallyZero: true });
    const expected = oracleDigest(Buffer.alloc(64 * ps), ps);
    expect((await native.regionDigest(zeroRegion, 'tracked')).equals(expected)).toBe(true);
    expect((await native.regionDigest(zeroRegion, 'full')).equals(expected)).toBe(true);
  });

  it('regionClose while a digest is pending defers the unmap until the digest completes', async () => {
    const size = 64 << 20;
    const content = Buffer.alloc(size);
    fillPseudoRandom(content.subarray(0, 1 << 20), 11);
    for (let off = 1 << 20; off < size; off += 1 << 20) content.copy(content, off, 0, 1 << 20);
    const { path: p, fd } = shmFile('pending', content);
    const region = mapFd(fd, size, ps, { trackHashes: true });
    const expected = await native.regionDigest(region, 'full');
    expect(expected.equals(await native.regionDigest(region, 'tracked'))).toBe(true);

    const pending = [native.regionDigest(region, 'full'), native.regionDigest(region, 'tracked'), native.regionDigest(region, 'full')];
    native.regionClose(region);
    // Closed for callers at once...
    expect(() =>
      native.regionGather(region, runsOf([[0, 1]]), new Uint32Array(2), Buffer.alloc(ps), new Uint32Array(3), new Uint32Array(2)),
    ).toThrow(/region is closed/);
    await expect(native.regionDigest(region, 'full')).rejects.toThrow(/region is closed/);
    // ...but still mapped until the digests finish (completion runs on this thread).
    expect(isMapped(p)).toBe(true);
    const results = await Promise.all(pending);
    for (const r of results) expect(r.equals(expected)).toBe(true);
    expect(await unmappedSoon(p)).toBe(true);
    native.regionClose(region);
    openRegions.delete(region);
  });
});

// ---------------------------------------------------------------------------------------
// tmpfileCreate / tmpfileLink
// ---------------------------------------------------------------------------------------

describe('tmpfile', () => {
  it('creates an unnamed 0600 file of the given length, then names it', () => {
    const fd = native.tmpfileCreate('/dev/shm', 3 * 4096);
    openFds.add(fd);
    expect(fs.fstatSync(fd).size).toBe(3 * 4096);
    expect(fs.fstatSync(fd).nlink).toBe(0);
    const data = buildContent(['data', 'zero', 'last'], 4096);
    writeAll(fd, data, 0);
    const p = shmPath('linked');
    native.tmpfileLink(fd, p);
    expect(fs.readFileSync(p).equals(data)).toBe(true);
    expect(fs.statSync(p).mode & 0o777).toBe(0o600);
    expect(fs.fstatSync(fd).nlink).toBe(1);
  });

  it('the unnamed file can back a region before it is named', () => {
    const fd = native.tmpfileCreate('/dev/shm', 8 * 4096);
    openFds.add(fd);
    const region = mapFd(fd, 8 * 4096, 4096, { writable: true, trackHashes: true, initiallyZero: true });
    const page = Buffer.alloc(4096, 0x5a);
    native.regionScatter(region, new Uint32Array([ENTRY_DATA, 6, 1]), 1, page);
    const p = shmPath('region-linked');
    native.tmpfileLink(fd, p);
    const bytes = fs.readFileSync(p);
    expect(bytes.subarray(6 * 4096, 7 * 4096).equals(page)).toBe(true);
    expect(bytes.subarray(0, 6 * 4096).equals(Buffer.alloc(6 * 4096))).toBe(true);
  });

  it('linking onto an existing path throws and leaves it alone', () => {
    const existing = shmFile('existing', Buffer.from('keep me'));
    const fd = native.tmpfileCreate('/dev/shm', 10);
    openFds.add(fd);
    expect(() => native.tmpfileLink(fd, existing.path)).toThrow(/already exists/);
    try {
      native.tmpfileLink(fd, existing.path);
    } catch (err) {
      expect((err as NodeJS.ErrnoException).code).toBe('EEXIST');
      expect((err as Error).message).toContain(existing.path);
    }
    expect(fs.readFileSync(existing.path, 'utf8')).toBe('keep me');
  });

  it('errors name the directory, the path and errno', () => {
    expect(() => native.tmpfileCreate('/nonexistent-gangway-dir', 10)).toThrow(
      /'\/nonexistent-gangway-dir'.*ENOENT/,
    );
    expect(() => native.tmpfileCreate('', 10)).toThrow(/dir/);
    expect(() => loose.tmpfileCreate!(7, 10)).toThrow(/dir must be a string/);
    expect(() => native.tmpfileCreate('/dev/shm', -1)).toThrow(/lengthBytes/);
    expect(() => native.tmpfileCreate('/dev/shm\0x', 1)).toThrow(/NUL/);
    const fd = native.tmpfileCreate('/dev/shm', 1);
    openFds.add(fd);
    expect(() => native.tmpfileLink(fd, '/nonexistent-gangway-dir/file')).toThrow(
      /'\/nonexistent-gangway-dir\/file'.*ENOENT/,
    );
    expect(() => native.tmpfileLink(2 ** 30, shmPath('badfd'))).toThrow(/tmpfileLink/);
    expect(() => loose.tmpfileLink!(fd, undefined)).toThrow(/path must be a string/);
  });
});

// ---------------------------------------------------------------------------------------
// pagemapScan, against a helper process that registered userfaultfd WP_ASYNC
// ---------------------------------------------------------------------------------------

const UFFD_HELPER_C = String.raw`
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "uapi-compat.h"

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

/* Maps FILE (LENGTH bytes) MAP_SHARED, registers userfaultfd WP_ASYNC on it, prints
 * "ready <addr> <unregistered addr> <page size>", then obeys stdin lines:
 * "w N" writes page N, "r N" reads page N, "W A B S" writes pages A..B-1 step S.
 * Each answer is "ok". "unavailable <why>" (exit 3) when userfaultfd cannot be used. */
int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: %s FILE LENGTH\n", argv[0]); return 2; }
  size_t len = strtoull(argv[2], NULL, 10);
  size_t ps = (size_t)sysconf(_SC_PAGESIZE);
  int fd = open(argv[1], O_RDWR);
  if (fd < 0) { perror("open"); return 2; }
  volatile unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) { perror("mmap"); return 2; }
  int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (uffd < 0) uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
  if (uffd < 0) { printf("unavailable userfaultfd(2): %s\n", strerror(errno)); return 3; }
  struct uffdio_api api = { .api = UFFD_API,
    .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM };
  if (ioctl(uffd, UFFDIO_API, &api) != 0) { printf("unavailable UFFDIO_API with WP_ASYNC: %s\n", strerror(errno)); return 3; }
  struct uffdio_register reg = { .range = { (uintptr_t)p, len }, .mode = UFFDIO_REGISTER_MODE_WP };
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) { printf("unavailable UFFDIO_REGISTER WP on shmem: %s\n", strerror(errno)); return 3; }
  struct uffdio_writeprotect wp = { .range = { (uintptr_t)p, len }, .mode = UFFDIO_WRITEPROTECT_MODE_WP };
  if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0) { printf("error UFFDIO_WRITEPROTECT: %s\n", strerror(errno)); return 2; }
  size_t olen = 1 << 20;
  volatile unsigned char *other = mmap(NULL, olen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (other == MAP_FAILED) { perror("mmap"); return 2; }
  for (size_t i = 0; i < olen; i += ps) other[i] = 1;
  printf("ready 0x%llx 0x%llx %zu\n", (unsigned long long)(uintptr_t)p, (unsigned long long)(uintptr_t)other, ps);
  fflush(stdout);
  char line[256];
  unsigned sum = 0;
  while (fgets(line, sizeof line, stdin)) {
    char op = 0;
    unsigned long a = 0, b = 0, s = 0;
    int n = sscanf(line, " %c %lu %lu %lu", &op, &a, &b, &s);
    if (n == 2 && op == 'w' && a < len / ps) p[a * ps + 1] = (unsigned char)(a + 1);
    else if (n == 2 && op == 'r' && a < len / ps) sum += p[a * ps];
    else if (n == 4 && op == 'W' && s > 0) { for (unsigned long i = a; i < b && i < len / ps; i += s) p[i * ps + 1] = (unsigned char)(i + 1); }
    else { printf("bad command: %s", line); fflush(stdout); continue; }
    printf(sum == 0xffffffffu ? "ok \n" : "ok\n");
    fflush(stdout);
  }
  return 0;
}
`;

interface Helper {
  pid: number;
  addr: bigint;
  unregistered: bigint;
  pageSize: number;
  send(command: string): Promise<void>;
}

/** Starts the helper on `file`; resolves null with the reason when uffd is unavailable. */
async function startHelper(bin: string, file: string, length: number): Promise<Helper | string> {
  const child = spawn(bin, [file, String(length)], { stdio: ['pipe', 'pipe', 'pipe'] });
  if (child.pid === undefined) throw new Error('cannot start the uffd helper');
  childPids.add(child.pid);
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const lines: string[] = [];
  let waiter: ((line: string | null) => void) | null = null;
  let closed = false;
  const rl = createInterface({ input: child.stdout });
  rl.on('line', (line) => {
    if (waiter) {
      const w = waiter;
      waiter = null;
      w(line);
    } else lines.push(line);
  });
  rl.on('close', () => {
    closed = true;
    if (waiter) {
      const w = waiter;
      waiter = null;
      w(null);
    }
  });
  const next = () =>
    new Promise<string | null>((resolve) => {
      if (lines.length > 0) resolve(lines.shift()!);
      else if (closed) resolve(null);
      else waiter = resolve;
    });
  const first = await next();
  if (first?.startsWith('unavailable ')) return first.slice('unavailable '.length);
  const m = /^ready (0x[0-9a-f]+) (0x[0-9a-f]+) (\d+)$/.exec(first ?? '');
  if (!m) throw new Error(`uffd helper failed: ${first} ${stderr}`);
  return {
    pid: child.pid,
    addr: BigInt(m[1]!),
    unregistered: BigInt(m[2]!),
    pageSize: Number(m[3]),
    async send(command: string) {
      child.stdin.write(`${command}\n`);
      const answer = await next();
      if (answer !== 'ok') throw new Error(`uffd helper answered ${answer} to ${command}: ${stderr}`);
    },
  };
}

describe('pagemapScan', () => {
  let helperBin: string | null = null;
  let unavailable: string | null = null;
  let buildDir: string | null = null;

  beforeAll(() => {
    buildDir = fs.mkdtempSync(path.join(os.tmpdir(), 'gangway-uffd-helper-'));
    const source = path.join(buildDir, 'uffd-helper.c');
    fs.writeFileSync(source, UFFD_HELPER_C);
    const bin = path.join(buildDir, 'uffd-helper');
    try {
      execFileSync('cc', ['-O2', '-Wall', '-I', path.join(nativeDir, 'src'), '-o', bin, source], { stdio: 'pipe' });
      helperBin = bin;
    } catch (err) {
      const e = err as { code?: string; stderr?: Buffer };
      if (e.code === 'ENOENT') unavailable = 'no C compiler (cc) to build the userfaultfd helper';
      else throw new Error(`building the uffd helper failed: ${e.stderr?.toString() ?? String(err)}`);
    }
  });
  afterAll(() => {
    if (buildDir) fs.rmSync(buildDir, { recursive: true, force: true });
  });

  const PAGES = 4096;

  /** The helper on a fresh /dev/shm file, and `scan(...)` over its region as plain arrays. */
  async function setup(skip: (note: string) => never) {
    if (!helperBin) skip(`userfaultfd test skipped: ${unavailable}`);
    const ps = 4096;
    const file = shmFile('uffd', PAGES * ps);
    const helper = await startHelper(helperBin!, file.path, PAGES * ps);
    if (typeof helper === 'string') skip(`userfaultfd test skipped: ${helper}`);
    const h = helper as Helper;
    expect(h.pageSize).toBe(ps);
    const pagemapFd = openFile(`/proc/${h.pid}/pagemap`, 'r');
    const scan = (reprotect = true, start = h.addr, length = PAGES * ps, pageSize = ps) =>
      Array.from(native.pagemapScan(pagemapFd, start, length, pageSize, reprotect));
    return { helper: h, pagemapFd, scan, ps };
  }

  it('reports exactly the written pages once, coalesced; reads are not reported', async (ctx) => {
    const { helper, scan } = await setup(ctx.skip);
    const first = native.pagemapScan(
      openFile(`/proc/${helper.pid}/pagemap`, 'r'),
      helper.addr,
      PAGES * 4096,
      4096,
      true,
    );
    expect(first).toBeInstanceOf(Uint32Array);
    expect(Array.from(first)).toEqual([]);
    for (const c of ['w 3', 'w 7', 'w 8', 'w 40', 'r 20', 'r 41']) await helper.send(c);
    expect(scan()).toEqual([3, 1, 7, 2, 40, 1]);
    expect(scan()).toEqual([]);
    for (const c of ['w 7', 'r 3', 'w 50', 'r 60']) await helper.send(c);
    expect(scan()).toEqual([7, 1, 50, 1]);
    expect(scan()).toEqual([]);
    await helper.send(`w ${PAGES - 1}`);
    await helper.send('w 0');
    expect(scan()).toEqual([0, 1, PAGES - 1, 1]);
  });

  it('reprotect=false reports without resetting', async (ctx) => {
    const { helper, scan } = await setup(ctx.skip);
    await helper.send('w 12');
    await helper.send('w 13');
    expect(scan(false)).toEqual([12, 2]);
    expect(scan(false)).toEqual([12, 2]);
    await helper.send('w 30');
    expect(scan(true)).toEqual([12, 2, 30, 1]);
    expect(scan(true)).toEqual([]);
    expect(scan(false)).toEqual([]);
  });

  it('loops over walk_end when there are more regions than one ioctl returns', async (ctx) => {
    const { helper, scan } = await setup(ctx.skip);
    await helper.send('W 0 3000 2'); // 1500 separate pages, more than the 1024-entry vector
    const expected = Array.from({ length: 1500 }, (_, i) => [2 * i, 1]).flat();
    expect(scan()).toEqual(expected);
    expect(scan()).toEqual([]);
    await helper.send('W 1000 1100 1');
    await helper.send('W 2000 2600 2');
    await helper.send('W 2001 2600 2'); // together: one contiguous range 2000..2599
    expect(scan()).toEqual([1000, 100, 2000, 600]);
  });

  it('indices are relative to startAddress, in pageSizeBytes units, for sub-ranges', async (ctx) => {
    const { helper, scan, ps } = await setup(ctx.skip);
    for (const c of ['w 99', 'w 120', 'w 149', 'w 150']) await helper.send(c);
    const sub = helper.addr + BigInt(100 * ps);
    expect(scan(true, sub, 50 * ps)).toEqual([20, 1, 49, 1]);
    expect(scan()).toEqual([99, 1, 150, 1]);
    // 16 KiB units: 4 KiB pages 5 and 6 are unit 1, page 9 is unit 2.
    for (const c of ['w 5', 'w 6', 'w 9']) await helper.send(c);
    expect(scan(true, helper.addr, PAGES * ps, 16384)).toEqual([1, 2]);
    expect(scan()).toEqual([]);
  });

  it('throws EPERM on a range not registered for async write-protect, and validates arguments', async (ctx) => {
    const { helper, pagemapFd, ps } = await setup(ctx.skip);
    for (const reprotect of [true, false]) {
      expect(() => native.pagemapScan(pagemapFd, helper.unregistered, 1 << 20, ps, reprotect)).toThrow(
        /PAGEMAP_SCAN failed: EPERM \(range not registered/,
      );
    }
    try {
      native.pagemapScan(pagemapFd, helper.unregistered, 1 << 20, ps, true);
    } catch (err) {
      expect((err as NodeJS.ErrnoException).code).toBe('EPERM');
    }
    const regular = shmFile('not-pagemap', 4096);
    expect(() => native.pagemapScan(regular.fd, helper.addr, ps, ps, true)).toThrow(/PAGEMAP_SCAN failed: ENOTTY/);
    expect(() => loose.pagemapScan!(pagemapFd, Number(helper.addr), ps, ps, true)).toThrow(/startAddress must be a bigint/);
    expect(() => native.pagemapScan(pagemapFd, -4096n, ps, ps, true)).toThrow(/startAddress/);
    expect(() => native.pagemapScan(pagemapFd, 2n ** 64n, ps, ps, true)).toThrow(/startAddress/);
    expect(() => native.pagemapScan(pagemapFd, helper.addr + 512n, ps, 512, true)).toThrow(/not aligned/);
    expect(() => native.pagemapScan(pagemapFd, helper.addr, ps + 1, ps, true)).toThrow(/lengthBytes/);
    expect(() => native.pagemapScan(pagemapFd, helper.addr, 0, ps, true)).toThrow(/lengthBytes/);
    expect(() => native.pagemapScan(pagemapFd, helper.addr, ps, 1000, true)).toThrow(/pageSizeBytes/);
    expect(() => loose.pagemapScan!(pagemapFd, helper.addr, ps, ps, 1)).toThrow(/reprotect must be a boolean/);
    expect(() => loose.pagemapScan!('x', helper.addr, ps, ps, true)).toThrow(/pagemapFd/);
    expect(() => native.pagemapScan(pagemapFd, 2n ** 64n - 4096n, 8192, 4096, true)).toThrow(/overflows/);
  });
});

// ---------------------------------------------------------------------------------------
// Throughput (printed, not asserted)
// ---------------------------------------------------------------------------------------

describe('throughput', () => {
  it('gather+scatter and full digest over 256 MiB', async () => {
    const ps = 4096;
    const size = 256 << 20;
    const pages = size / ps;
    const src = shmFile('bench-src', size);
    const chunk = Buffer.alloc(1 << 20);
    for (let off = 0; off < size; off += chunk.length) {
      randomFillSync(chunk);
      for (let p = 0; p < chunk.length / ps; p += 8) chunk.fill(0, p * ps, (p + 1) * ps); // 1/8 zero pages
      writeAll(src.fd, chunk, off);
    }
    const dst = shmFile('bench-dst', size);
    const srcRegion = mapFd(src.fd, size, ps);
    const dstRegion = mapFd(dst.fd, size, ps, { writable: true, trackHashes: true, initiallyZero: true });
    const runs = runsOf([[0, pages]]);
    const payload = Buffer.alloc(1 << 20);
    const entries = new Uint32Array(3 * 1024);
    const out = new Uint32Array(2);
    const gb = size / 1e9;

    const pass = () => {
      const cursor = new Uint32Array(2);
      let gatherNs = 0n;
      let scatterNs = 0n;
      for (;;) {
        const t0 = process.hrtime.bigint();
        const done = native.regionGather(srcRegion, runs, cursor, payload, entries, out);
        const t1 = process.hrtime.bigint();
        native.regionScatter(dstRegion, entries, out[0]!, payload.subarray(0, out[1]!));
        scatterNs += process.hrtime.bigint() - t1;
        gatherNs += t1 - t0;
        if (done) break;
      }
      return { gather: gb / (Number(gatherNs) / 1e9), scatter: gb / (Number(scatterNs) / 1e9), both: gb / (Number(gatherNs + scatterNs) / 1e9) };
    };
    const cold = pass();
    const warm = pass();

    const t0 = process.hrtime.bigint();
    const full = await native.regionDigest(srcRegion, 'full');
    const fullSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const t1 = process.hrtime.bigint();
    const tracked = await native.regionDigest(dstRegion, 'tracked');
    const trackedSeconds = Number(process.hrtime.bigint() - t1) / 1e9;
    expect(tracked.equals(full)).toBe(true);
    expect((await native.regionDigest(dstRegion, 'full')).equals(full)).toBe(true);
    expect(fs.readFileSync(dst.path).equals(fs.readFileSync(src.path))).toBe(true);

    const f = (x: number) => x.toFixed(2);
    console.log(
      `[gangway addon throughput, 256 MiB, 4 KiB pages, 1/8 zero, 1 MiB batches]\n` +
        `  gather ${f(warm.gather)} GB/s, scatter (tracked) ${f(warm.scatter)} GB/s, gather+scatter ${f(warm.both)} GB/s` +
        ` (first pass, destination pages faulted in: ${f(cold.gather)} / ${f(cold.scatter)} / ${f(cold.both)} GB/s)\n` +
        `  regionDigest full ${f(gb / fullSeconds)} GB/s (${(fullSeconds * 1e3).toFixed(1)} ms), tracked ${(trackedSeconds * 1e3).toFixed(1)} ms`,
    );
  });
});
