// Tests of the addon's content-deduplication primitives (native/src/addon/) against the
// NativeAddon contract in agent/native.ts: regionGather's fingerprints, regionCopyPages (the
// destination side of a copy-ref) and regionFingerprints. Regions live in unnamed O_TMPFILE
// files in /dev/shm, read back with pread; the oracles are plain JS over those bytes, with
// the addon's hash128 (checked against xxHash's vectors in addon.test.ts) for fingerprints.
import * as fs from 'node:fs';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { ENTRY_DATA, ENTRY_REF, ENTRY_ZERO, type RegionHandle } from '../../agent/native.js';
import { closeRegion, fillPseudoRandom, loose, mapFd, native, openFds, releaseNativeResources, writeAll } from '../helpers/native.js';

// ---------------------------------------------------------------------------------------
// Resources, all released in afterEach (also when a test fails)
// ---------------------------------------------------------------------------------------

afterEach(releaseNativeResources);

/** An unnamed /dev/shm file holding `content` (or that many zero bytes): gone with its fd. */
function tmpFile(content: Buffer | number): number {
  const length = typeof content === 'number' ? content : content.length;
  const fd = native.tmpfileCreate('/dev/shm', length);
  openFds.add(fd);
  if (typeof content !== 'number') writeAll(fd, content, 0);
  return fd;
}

/** Arguments a call must refuse, the error's class and what its message says. */
type Rejection = [unknown[], ErrorConstructor, RegExp];

/** Each case's arguments make the addon's `fn` throw that class of error with that message. */
function expectRejections(fn: string, cases: readonly Rejection[]): void {
  for (const [args, type, message] of cases) {
    let caught: unknown;
    try {
      loose[fn]!(...args);
    } catch (err) {
      caught = err;
    }
    expect(caught, String(message)).toBeInstanceOf(type);
    expect((caught as Error).message).toMatch(message);
  }
}

function readAll(fd: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, buf, done, length - done, done);
    if (n === 0) throw new Error(`short file: ${done} of ${length} bytes`);
    done += n;
  }
  return buf;
}

// ---------------------------------------------------------------------------------------
// Content builders and JS oracles
// ---------------------------------------------------------------------------------------


/** `pageCount` distinct data pages, except the pages `isZero` picks, left zero. */
function buildPages(pageCount: number, pageSize: number, seed: number, isZero: (page: number) => boolean = () => false): Buffer {
  const buf = Buffer.alloc(pageCount * pageSize);
  for (let p = 0; p < pageCount; p++) {
    if (isZero(p)) continue;
    const page = buf.subarray(p * pageSize, (p + 1) * pageSize);
    fillPseudoRandom(page, seed * 7919 + p + 1);
    page.writeUInt32BE(p, 0); // distinct, and never all-zero
    page[4] = 0xa5;
  }
  return buf;
}

function pageOf(content: Buffer, page: number, pageSize: number): Buffer {
  return content.subarray(page * pageSize, (page + 1) * pageSize);
}

function isZeroPage(content: Buffer, page: number, pageSize: number): boolean {
  return pageOf(content, page, pageSize).every((b) => b === 0);
}

/** The fingerprints of pages [first, first + count) per the contract, 16 bytes each. */
function oracleFingerprints(content: Buffer, first: number, count: number, pageSize: number): Buffer {
  const out: Buffer[] = [];
  for (let p = first; p < first + count; p++) out.push(native.hash128(pageOf(content, p, pageSize)));
  return Buffer.concat(out);
}

/** regionCopyPages' contract: single-page copies in order, skipping the pages in `skip`. */
function oracleCopy(content: Buffer, dstFirst: number, srcFirst: number, count: number, pageSize: number, skip: ReadonlySet<number> = new Set()): Buffer {
  const out = Buffer.from(content);
  for (let i = 0; i < count; i++) {
    if (skip.has(i)) continue;
    out.copy(out, (dstFirst + i) * pageSize, (srcFirst + i) * pageSize, (srcFirst + i + 1) * pageSize);
  }
  return out;
}

/** The tracked fingerprints of `region` agree with its bytes. */
async function expectTrackedMatchesFull(region: RegionHandle): Promise<void> {
  const [tracked, full] = await Promise.all([native.regionDigest(region, 'tracked'), native.regionDigest(region, 'full')]);
  expect(tracked.toString('hex')).toBe(full.toString('hex'));
}

function runsOf(pairs: ReadonlyArray<readonly [number, number]>): Uint32Array {
  return new Uint32Array(pairs.flatMap(([first, count]) => [first, count]));
}

// ---------------------------------------------------------------------------------------
// regionGather with fingerprints
// ---------------------------------------------------------------------------------------

describe('regionGather with fps', () => {
  const ps = 4096;
  const pageCount = 120;
  const zeroAt = (p: number) => p % 4 === 1 || (p >= 40 && p < 50);
  const runs = runsOf([
    [0, 17],
    [17, 20],
    [60, 33],
    [100, 1],
    [102, 18],
  ]);

  it('fingerprints every data page in payload order, skipping zero pages, across batches', () => {
    const content = buildPages(pageCount, ps, 3, zeroAt);
    const region = mapFd(tmpFile(content), content.length, ps);
    const payloadPages = 5;
    const withFps = { cursor: new Uint32Array(2), payload: Buffer.alloc(payloadPages * ps), entries: new Uint32Array(3 * 4) };
    const without = { cursor: new Uint32Array(2), payload: Buffer.alloc(payloadPages * ps), entries: new Uint32Array(3 * 4) };
    const fps = new Uint8Array(16 * payloadPages + 7);
    const allFps: Buffer[] = [];
    let batches = 0;
    for (;;) {
      expect(batches++).toBeLessThan(1000);
      fps.fill(0xee);
      const out = new Uint32Array(2);
      const done = native.regionGather(region, runs, withFps.cursor, withFps.payload, withFps.entries, out, fps);
      const plainOut = new Uint32Array(2);
      const plainDone = native.regionGather(region, runs, without.cursor, without.payload, without.entries, plainOut);

      // Fingerprinting changes nothing else about the batch.
      expect(done).toBe(plainDone);
      expect(Array.from(out)).toEqual(Array.from(plainOut));
      expect(Array.from(withFps.cursor)).toEqual(Array.from(without.cursor));
      expect(Array.from(withFps.entries.subarray(0, 3 * out[0]!))).toEqual(Array.from(without.entries.subarray(0, 3 * out[0]!)));
      expect(withFps.payload.subarray(0, out[1]!).equals(without.payload.subarray(0, out[1]!))).toBe(true);

      const dataPages = out[1]! / ps;
      for (let k = 0; k < dataPages; k++) {
        const fp = Buffer.from(fps.subarray(16 * k, 16 * k + 16));
        expect(fp.equals(native.hash128(withFps.payload.subarray(k * ps, (k + 1) * ps))), `batch ${batches} page ${k}`).toBe(true);
        allFps.push(fp);
      }
      expect(fps.subarray(16 * dataPages).every((b) => b === 0xee)).toBe(true);
      if (done) break;
    }
    expect(batches).toBeGreaterThan(5);

    // Across the batches: one fingerprint per data page of the runs, in run order.
    const dataPagesInOrder: number[] = [];
    for (let r = 0; r < runs.length / 2; r++) {
      for (let p = runs[2 * r]!; p < runs[2 * r]! + runs[2 * r + 1]!; p++) if (!isZeroPage(content, p, ps)) dataPagesInOrder.push(p);
    }
    const expected = dataPagesInOrder.map((p) => native.hash128(pageOf(content, p, ps)));
    expect(Buffer.concat(allFps).equals(Buffer.concat(expected))).toBe(true);
  });

  it('undefined and null mean no fingerprints; an all-zero batch writes none', () => {
    const content = buildPages(8, ps, 4, (p) => p < 4);
    const region = mapFd(tmpFile(content), content.length, ps);
    for (const fps of [undefined, null]) {
      const out = new Uint32Array(2);
      const payload = Buffer.alloc(8 * ps);
      const entries = new Uint32Array(6);
      expect(loose.regionGather!(region, runsOf([[0, 8]]), new Uint32Array(2), payload, entries, out, fps)).toBe(true);
      expect(Array.from(entries)).toEqual([ENTRY_ZERO, 0, 4, ENTRY_DATA, 4, 4]);
      expect(payload.equals(Buffer.concat([content.subarray(4 * ps), Buffer.alloc(4 * ps)]))).toBe(true);
    }
    const fps = new Uint8Array(16).fill(0xee);
    const out = new Uint32Array(2);
    native.regionGather(region, runsOf([[0, 4]]), new Uint32Array(2), Buffer.alloc(ps), new Uint32Array(3), out, fps);
    expect(Array.from(out)).toEqual([1, 0]);
    expect(fps.every((b) => b === 0xee)).toBe(true);
  });

  it('fps shorter than 16 bytes per payload page throws before gathering', () => {
    const content = buildPages(8, ps, 5);
    const region = mapFd(tmpFile(content), content.length, ps);
    const cursor = new Uint32Array(2);
    const out = new Uint32Array([7, 7]);
    const payload = Buffer.alloc(4 * ps);
    const gather = (fps: unknown) => () => loose.regionGather!(region, runsOf([[0, 8]]), cursor, payload, new Uint32Array(12), out, fps);
    // Short even though this batch would only need 4 fingerprints.
    expect(gather(new Uint8Array(16 * 4 - 1))).toThrow(RangeError);
    expect(gather(new Uint8Array(16 * 4 - 1))).toThrow(/fps is 63 bytes, too short for the payload's 4 pages/);
    expect(gather(new Uint8Array(0))).toThrow(RangeError);
    expect(gather(new Uint32Array(16))).toThrow(/fps must be a Uint8Array/);
    expect(gather([1, 2])).toThrow(TypeError);
    expect(Array.from(cursor)).toEqual([0, 0]);
    expect(Array.from(out)).toEqual([7, 7]);
    expect(gather(new Uint8Array(16 * 4))).not.toThrow();
  });
});

// ---------------------------------------------------------------------------------------
// regionCopyPages
// ---------------------------------------------------------------------------------------

describe('regionCopyPages', () => {
  const ps = 4096;

  // 600 pages of 4 KiB: more than one 1 MiB chunk.
  const srcVariants = [
    { name: 'writable tracked', writable: true, trackHashes: true },
    { name: 'writable untracked', writable: true, trackHashes: false },
    { name: 'read-only tracked', writable: false, trackHashes: true },
    { name: 'read-only untracked', writable: false, trackHashes: false },
  ] as const;
  for (const variant of srcVariants) {
    it(`copies from a ${variant.name} region into another file; the tracked fingerprints follow`, async () => {
      const pages = 600;
      const srcContent = buildPages(pages, ps, 11, (p) => p % 7 === 0);
      const dstContent = buildPages(pages, ps, 12);
      const src = mapFd(tmpFile(srcContent), srcContent.length, ps, variant);
      const dstFd = tmpFile(dstContent);
      const dst = mapFd(dstFd, dstContent.length, ps, { writable: true, trackHashes: true });
      expect(native.regionCopyPages(dst, 50, src, 80, 500, null, null)).toBe(0);
      const expected = Buffer.concat([dstContent.subarray(0, 50 * ps), srcContent.subarray(80 * ps, 580 * ps), dstContent.subarray(550 * ps)]);
      expect(readAll(dstFd, expected.length).equals(expected)).toBe(true);
      await expectTrackedMatchesFull(dst);

      // A single page, and an untracked destination.
      const plainFd = tmpFile(dstContent);
      const plain = mapFd(plainFd, dstContent.length, ps, { writable: true });
      expect(native.regionCopyPages(plain, pages - 1, src, 0, 1, null, null)).toBe(0);
      expect(readAll(plainFd, expected.length).equals(Buffer.concat([dstContent.subarray(0, (pages - 1) * ps), srcContent.subarray(0, ps)]))).toBe(true);
    });
  }

  it('overlapping copies within one region equal single-page copies in order (forwards and backwards)', async () => {
    const pages = 700;
    const content = buildPages(pages, ps, 21, (p) => p % 9 === 0);
    // [dstFirst, srcFirst, count]: gaps of 1, 3, 255, 256, 257 and 300 pages, either way,
    // around the 256 pages of a 1 MiB chunk, and a copy of a range onto itself.
    const cases: Array<[number, number, number]> = [
      [1, 0, 600],
      [0, 1, 600],
      [103, 100, 500],
      [100, 103, 500],
      [255, 0, 400],
      [256, 0, 400],
      [0, 257, 400],
      [300, 0, 400],
      [0, 300, 400],
      [10, 10, 500],
    ];
    for (const [dstFirst, srcFirst, count] of cases) {
      const fd = tmpFile(content);
      const region = mapFd(fd, content.length, ps, { writable: true, trackHashes: true });
      expect(native.regionCopyPages(region, dstFirst, region, srcFirst, count, null, null)).toBe(0);
      const expected = oracleCopy(content, dstFirst, srcFirst, count, ps);
      expect(readAll(fd, content.length).equals(expected), `dst ${dstFirst} src ${srcFirst} count ${count}`).toBe(true);
      await expectTrackedMatchesFull(region);
    }
  });

  it('two regions of one file are one file: an overlapping copy reads what it wrote', async () => {
    const pages = 64;
    const content = buildPages(pages, ps, 22);
    const fd = tmpFile(content);
    const dst = mapFd(fd, content.length, ps, { writable: true, trackHashes: true });
    const src = mapFd(fd, content.length, ps, { trackHashes: true });
    expect(native.regionCopyPages(dst, 3, src, 0, 60, null, null)).toBe(0);
    expect(readAll(fd, content.length).equals(oracleCopy(content, 3, 0, 60, ps))).toBe(true);
    // src's fingerprints are those of the bytes at regionMap: dst must not take them.
    await expectTrackedMatchesFull(dst);
  });

  it('property: copies within one region equal the single-page oracle', async () => {
    const pages = 24;
    const smallPs = 512;
    const fd = tmpFile(pages * smallPs);
    const region = mapFd(fd, pages * smallPs, smallPs, { writable: true, trackHashes: true, initiallyZero: true });
    const copy = fc
      .tuple(fc.nat(pages - 1), fc.nat(pages - 1), fc.integer({ min: 1, max: pages }))
      .map(([dstFirst, srcFirst, count]) => [dstFirst, srcFirst, Math.min(count, pages - dstFirst, pages - srcFirst)] as const);
    await fc.assert(
      fc.asyncProperty(fc.array(copy, { minLength: 1, maxLength: 4 }), fc.integer({ min: 1, max: 1000 }), async (copies, seed) => {
        let content = buildPages(pages, smallPs, seed, (p) => (p * seed) % 5 === 0);
        native.regionScatter(region, new Uint32Array([ENTRY_DATA, 0, pages]), 1, content);
        for (const [dstFirst, srcFirst, count] of copies) {
          native.regionCopyPages(region, dstFirst, region, srcFirst, count, null, null);
          content = oracleCopy(content, dstFirst, srcFirst, count, smallPs);
        }
        expect(readAll(fd, content.length).equals(content)).toBe(true);
        await expectTrackedMatchesFull(region);
      }),
      { numRuns: 150 },
    );
  });

  for (const srcWritable of [true, false]) {
    it(`expect: a src page changed since is reported and not copied, the others are (${srcWritable ? 'writable' : 'read-only'} src)`, async () => {
      const pages = 40;
      const srcContent = buildPages(pages, ps, 31);
      const dstContent = buildPages(pages, ps, 32);
      const srcFd = tmpFile(srcContent);
      const src = mapFd(srcFd, srcContent.length, ps, { writable: srcWritable, trackHashes: true });
      const dstFd = tmpFile(dstContent);
      const dst = mapFd(dstFd, dstContent.length, ps, { writable: true, trackHashes: true });
      const expectFps = new Uint8Array(16 * 30);
      native.regionFingerprints(src, 5, 30, expectFps);

      // Change src page 5 + 7 behind the region's back (its tracked fingerprint goes stale).
      writeAll(srcFd, Buffer.from([0x5a, 0x5b]), (5 + 7) * ps + 100);
      const changedSrc = readAll(srcFd, srcContent.length);
      const mismatches = new Uint32Array(35).fill(0xffffffff);
      expect(native.regionCopyPages(dst, 8, src, 5, 30, expectFps, mismatches)).toBe(1);
      expect(Array.from(mismatches)).toEqual([7, ...Array<number>(34).fill(0xffffffff)]);

      const expected = Buffer.from(dstContent);
      for (let i = 0; i < 30; i++) if (i !== 7) changedSrc.copy(expected, (8 + i) * ps, (5 + i) * ps, (6 + i) * ps);
      const got = readAll(dstFd, expected.length);
      expect(got.equals(expected)).toBe(true);
      expect(pageOf(got, 8 + 7, ps).equals(pageOf(dstContent, 8 + 7, ps))).toBe(true);
      await expectTrackedMatchesFull(dst);

      // Everything matches: nothing reported, all copied.
      const again = new Uint8Array(16 * 30);
      native.regionFingerprints(src, 5, 30, again);
      expect(native.regionCopyPages(dst, 8, src, 5, 30, again, new Uint32Array(30))).toBe(0);
      expect(readAll(dstFd, expected.length).subarray(8 * ps, 38 * ps).equals(changedSrc.subarray(5 * ps, 35 * ps))).toBe(true);
      await expectTrackedMatchesFull(dst);
    });
  }

  it('expect on an overlapping copy checks each page as it is when its turn comes', () => {
    const pages = 8;
    const content = buildPages(pages, ps, 33);
    const fd = tmpFile(content);
    const region = mapFd(fd, content.length, ps, { writable: true, trackHashes: true });
    // Step 0 copies page 0 onto page 1, so step 1 reads page 0's bytes from page 1.
    const expectFps = Buffer.concat([native.hash128(pageOf(content, 0, ps)), native.hash128(pageOf(content, 0, ps)), native.hash128(pageOf(content, 2, ps))]);
    const mismatches = new Uint32Array(3);
    expect(native.regionCopyPages(region, 1, region, 0, 3, expectFps, mismatches)).toBe(1);
    expect(mismatches[0]).toBe(2); // page 2 already holds page 0's bytes by step 2
    expect(readAll(fd, content.length).equals(oracleCopy(content, 1, 0, 3, ps, new Set([2])))).toBe(true);
  });

  it('the fingerprints gathered at the source verify a copy-ref at the destination', async () => {
    const pages = 16;
    const content = buildPages(pages, ps, 34, (p) => p === 3);
    const src = mapFd(tmpFile(content), content.length, ps);
    const dstFd = tmpFile(content.length);
    const dst = mapFd(dstFd, content.length, ps, { writable: true, trackHashes: true, initiallyZero: true });
    const payload = Buffer.alloc(pages * ps);
    const entries = new Uint32Array(3 * pages);
    const out = new Uint32Array(2);
    const fps = new Uint8Array(16 * pages);
    expect(native.regionGather(src, runsOf([[0, 8]]), new Uint32Array(2), payload, entries, out, fps)).toBe(true);
    native.regionScatter(dst, entries, out[0]!, payload.subarray(0, out[1]!));
    // Pages 0..7 arrived (page 3 as a zero entry); ref pages 0..2 into 10..12 by fingerprint.
    const mismatches = new Uint32Array(3);
    expect(native.regionCopyPages(dst, 10, dst, 0, 3, fps.subarray(0, 48), mismatches)).toBe(0);
    const got = readAll(dstFd, content.length);
    for (let i = 0; i < 3; i++) expect(pageOf(got, 10 + i, ps).equals(pageOf(content, i, ps))).toBe(true);
    await expectTrackedMatchesFull(dst);
  });

  it('rejects bad arguments, writing nothing', async () => {
    const pages = 16;
    const dstContent = buildPages(pages, ps, 41);
    const dstFd = tmpFile(dstContent);
    const dst = mapFd(dstFd, dstContent.length, ps, { writable: true, trackHashes: true });
    const src = mapFd(tmpFile(buildPages(pages, ps, 42)), pages * ps, ps, { writable: true });
    const readOnly = mapFd(tmpFile(dstContent), dstContent.length, ps);
    const smallPages = mapFd(tmpFile(pages * ps), pages * ps, 512, { writable: true });
    const trackedBefore = await native.regionDigest(dst, 'tracked');
    const fps = (n: number) => new Uint8Array(16 * n);

    const cases: Rejection[] = [
      [[readOnly, 0, src, 0, 1, null, null], Error, /dst is mapped read-only/],
      [[dst, 0, smallPages, 0, 1, null, null], RangeError, /dst has 4096-byte pages but src has 512-byte pages/],
      [[smallPages, 0, dst, 0, 1, null, null], RangeError, /dst has 512-byte pages but src has 4096-byte pages/],
      [[dst, 0, src, 0, 0, null, null], RangeError, /count must be an integer between 1/],
      [[dst, 10, src, 0, 7, null, null], RangeError, /dst pages \[10, 17\) are outside the region of 16 pages/],
      [[dst, 0, src, 15, 2, null, null], RangeError, /src pages \[15, 17\) are outside the region of 16 pages/],
      [[dst, 16, src, 0, 1, null, null], RangeError, /dst pages/],
      [[dst, 0xffffffff, src, 0, 0xffffffff, null, null], RangeError, /dst pages/],
      [[dst, 0, src, 0xffffffff, 2, null, null], RangeError, /src pages/],
      [[dst, -1, src, 0, 1, null, null], RangeError, /dstFirst/],
      [[dst, 0, src, 0.5, 1, null, null], RangeError, /srcFirst/],
      [[dst, 0, src, 0, '1', null, null], TypeError, /count must be a number/],
      [[dst, 0, src, 0, 4, fps(3), new Uint32Array(4)], RangeError, /expect is 48 bytes but 4 pages need 64/],
      [[dst, 0, src, 0, 4, fps(4), new Uint32Array(3)], RangeError, /mismatches must have room for all 4 pages/],
      [[dst, 0, src, 0, 4, fps(4), null], RangeError, /mismatches .* is null/],
      [[dst, 0, src, 0, 4, undefined, null], TypeError, /expect must be a Uint8Array or null/],
      [[dst, 0, src, 0, 4, new Uint32Array(16), null], TypeError, /expect must be a Uint8Array or null/],
      [[dst, 0, src, 0, 4, fps(4), new Int32Array(4)], TypeError, /mismatches must be a Uint32Array or null/],
      [[{}, 0, src, 0, 1, null, null], TypeError, /dst must be a RegionHandle/],
      [[dst, 0, 'src', 0, 1, null, null], TypeError, /src must be a RegionHandle/],
    ];
    expectRejections('regionCopyPages', cases);
    expect(readAll(dstFd, dstContent.length).equals(dstContent)).toBe(true);
    expect((await native.regionDigest(dst, 'tracked')).equals(trackedBefore)).toBe(true);

    // Closed regions, either side.
    const closedSrc = mapFd(tmpFile(pages * ps), pages * ps, ps);
    closeRegion(closedSrc);
    expect(() => native.regionCopyPages(dst, 0, closedSrc, 0, 1, null, null)).toThrow(/^region is closed$/);
    const closedDstFd = tmpFile(dstContent);
    const closedDst = mapFd(closedDstFd, dstContent.length, ps, { writable: true });
    closeRegion(closedDst);
    expect(() => native.regionCopyPages(closedDst, 0, src, 0, 1, null, null)).toThrow(/^region is closed$/);
    expect(readAll(closedDstFd, dstContent.length).equals(dstContent)).toBe(true);
    expect(readAll(dstFd, dstContent.length).equals(dstContent)).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------
// regionApplyRefs
// ---------------------------------------------------------------------------------------

describe('regionApplyRefs', () => {
  const ps = 4096;
  const pages = 64;

  /** A frame's entries (kind, first, count), its ref words ([sourceIndex, sourcePage] per ref entry) and its payload. */
  interface Frame {
    entries: Uint32Array;
    refs: Uint32Array;
    payload: Buffer;
  }

  /** The same frame applied entry by entry, as IncomingPages did before regionApplyRefs: scatter runs, one regionCopyPages per ref. */
  function applyOneByOne(dst: RegionHandle, frame: Frame, sources: RegionHandle[], expects: (Uint8Array | null)[]): number[] {
    const missed: number[] = [];
    const count = frame.entries.length / 3;
    let segment = 0;
    let offset = 0;
    let bytes = 0;
    const flush = (end: number) => {
      if (end > segment) native.regionScatter(dst, frame.entries.subarray(segment * 3, end * 3), end - segment, frame.payload.subarray(offset, offset + bytes));
      offset += bytes;
      bytes = 0;
    };
    for (let e = 0, r = 0; e < count; e++) {
      const [kind, first, n] = [frame.entries[e * 3]!, frame.entries[e * 3 + 1]!, frame.entries[e * 3 + 2]!];
      if (kind === ENTRY_DATA) bytes += n * ps;
      if (kind !== ENTRY_REF) continue;
      flush(e);
      segment = e + 1;
      const source = frame.refs[2 * r]!;
      const sourcePage = frame.refs[2 * r + 1]!;
      r++;
      const expect = expects[source]?.subarray(sourcePage * 16, (sourcePage + n) * 16) ?? null;
      const mismatches = new Uint32Array(n);
      const k = native.regionCopyPages(dst, first, sources[source]!, sourcePage, n, expect, expect ? mismatches : null);
      for (let i = 0; i < k; i++) missed.push(first + mismatches[i]!, source, sourcePage + mismatches[i]!);
    }
    flush(count);
    return missed;
  }

  /** A random frame over `pages` pages: each page at most once, as zero, data (distinct content) or a ref into one of `sourceCount` sources. */
  function randomFrame(seed: number, sourceCount: number): Frame {
    let x = seed >>> 0;
    const next = (n: number) => {
      x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
      return (x >>> 8) % n;
    };
    const entries: number[] = [];
    const refs: number[] = [];
    const data: Buffer[] = [];
    for (let p = next(3); p < pages; ) {
      const count = 1 + next(Math.min(6, pages - p));
      const kind = [ENTRY_ZERO, ENTRY_DATA, ENTRY_REF, ENTRY_REF][next(4)]!;
      entries.push(kind, p, count);
      if (kind === ENTRY_DATA) data.push(buildPages(count, ps, seed * 1000 + p));
      if (kind === ENTRY_REF) refs.push(next(sourceCount), next(pages - count + 1));
      p += count + next(3);
    }
    return { entries: Uint32Array.from(entries), refs: Uint32Array.from(refs), payload: Buffer.concat(data) };
  }

  it('property: a frame applied in one call equals its entries applied one by one (bytes, tracked fingerprints, pages asked for again)', async () => {
    const srcContent = [buildPages(pages, ps, 51, (p) => p % 11 === 0), buildPages(pages, ps, 52)];
    const dstContent = buildPages(pages, ps, 53);
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 1_000_000 }), fc.boolean(), async (seed, sameFileSource) => {
        const srcFds = srcContent.map((content) => tmpFile(content));
        // A resident source (read-only, with the fingerprints it offered) whose pages 5..9 changed since.
        const resident = mapFd(srcFds[0]!, pages * ps, ps);
        const offered = new Uint8Array(16 * pages);
        native.regionFingerprints(resident, 0, pages, offered);
        writeAll(srcFds[0]!, Buffer.alloc(5 * ps, 0x77), 5 * ps);
        const member = mapFd(srcFds[1]!, pages * ps, ps, { writable: true, trackHashes: true });
        const results = [];
        for (const apply of ['one call', 'one by one'] as const) {
          const dstFd = tmpFile(dstContent);
          const dst = mapFd(dstFd, dstContent.length, ps, { writable: true, trackHashes: true });
          // A ref may also come from the destination's own region (an intra-guest ref).
          const sources = sameFileSource ? [resident, member, dst] : [resident, member];
          const expects = sources.map((_, i) => (i === 0 ? offered : null));
          const frame = randomFrame(seed, sources.length);
          let missed: number[];
          if (apply === 'one call') {
            const refPages = Array.from({ length: frame.entries.length / 3 }, (_, e) => (frame.entries[e * 3] === ENTRY_REF ? frame.entries[e * 3 + 2]! : 0)).reduce((a, b) => a + b, 0);
            const mismatches = new Uint32Array(3 * refPages);
            const k = native.regionApplyRefs(dst, frame.entries, frame.entries.length / 3, frame.payload, frame.refs, sources, expects, mismatches);
            missed = Array.from(mismatches.subarray(0, 3 * k));
          } else {
            missed = applyOneByOne(dst, frame, sources, expects);
          }
          results.push({ bytes: readAll(dstFd, dstContent.length), tracked: await native.regionDigest(dst, 'tracked'), missed });
          await expectTrackedMatchesFull(dst);
        }
        expect(results[0]!.bytes.equals(results[1]!.bytes)).toBe(true);
        expect(results[0]!.tracked.equals(results[1]!.tracked)).toBe(true);
        expect(results[0]!.missed).toEqual(results[1]!.missed);
      }),
      { numRuns: 60 },
    );
  });

  it('reports a changed resident page as [dstPage, sourceIndex, sourcePage] and leaves it unwritten', () => {
    const content = buildPages(pages, ps, 61);
    const srcFd = tmpFile(content);
    const resident = mapFd(srcFd, content.length, ps);
    const offered = new Uint8Array(16 * pages);
    native.regionFingerprints(resident, 0, pages, offered);
    writeAll(srcFd, Buffer.from([1, 2, 3]), 12 * ps + 9);
    const dstContent = buildPages(pages, ps, 62);
    const dstFd = tmpFile(dstContent);
    const dst = mapFd(dstFd, dstContent.length, ps, { writable: true, trackHashes: true });
    // Data page 0, refs 1..3 <- 10..12, zero page 4.
    const entries = Uint32Array.of(ENTRY_DATA, 0, 1, ENTRY_REF, 1, 3, ENTRY_ZERO, 4, 1);
    const payload = buildPages(1, ps, 63);
    const mismatches = new Uint32Array(9).fill(0xffffffff);
    expect(native.regionApplyRefs(dst, entries, 3, payload, Uint32Array.of(0, 10), [resident], [offered], mismatches)).toBe(1);
    expect(Array.from(mismatches.subarray(0, 3))).toEqual([3, 0, 12]);
    const got = readAll(dstFd, dstContent.length);
    expect(pageOf(got, 0, ps).equals(payload)).toBe(true);
    expect(pageOf(got, 1, ps).equals(pageOf(content, 10, ps))).toBe(true);
    expect(pageOf(got, 2, ps).equals(pageOf(content, 11, ps))).toBe(true);
    expect(pageOf(got, 3, ps).equals(pageOf(dstContent, 3, ps))).toBe(true);
    expect(pageOf(got, 4, ps).equals(Buffer.alloc(ps))).toBe(true);
  });

  it('rejects a bad frame before writing anything', async () => {
    const dstContent = buildPages(pages, ps, 71);
    const dstFd = tmpFile(dstContent);
    const dst = mapFd(dstFd, dstContent.length, ps, { writable: true, trackHashes: true });
    const src = mapFd(tmpFile(buildPages(pages, ps, 72)), pages * ps, ps);
    const smallPages = mapFd(tmpFile(pages * ps), pages * ps, 512, { writable: true });
    const trackedBefore = await native.regionDigest(dst, 'tracked');
    // A data page first: a check that came after it would have written it.
    const data = buildPages(1, ps, 73);
    const frame = (...rest: number[]) => Uint32Array.of(ENTRY_DATA, 0, 1, ...rest);
    const room = new Uint32Array(3 * pages);
    const cases: Rejection[] = [
      [[dst, frame(9, 1, 1), 2, data, new Uint32Array(0), [], [], room], RangeError, /entry 1 has an unknown kind \(9\)/],
      [[dst, frame(ENTRY_REF, 1, 0), 2, data, Uint32Array.of(0, 0), [src], [null], room], RangeError, /entry 1 .* is empty or outside/],
      [[dst, frame(ENTRY_ZERO, pages - 1, 2), 2, data, new Uint32Array(0), [], [], room], RangeError, /outside dst's 64 pages/],
      [[dst, frame(ENTRY_REF, 1, 2), 2, data, Uint32Array.of(0), [src], [null], room], RangeError, /refs has 1 words/],
      [[dst, frame(ENTRY_REF, 1, 2), 2, data, Uint32Array.of(1, 0), [src], [null], room], RangeError, /ref entry 0 \(source 1, pages 0, \+2\) is outside/],
      [[dst, frame(ENTRY_REF, 1, 2), 2, data, Uint32Array.of(0, pages - 1), [src], [null], room], RangeError, /is outside its source/],
      [[dst, frame(ENTRY_REF, 1, 2), 2, data, Uint32Array.of(0, 4), [src], [new Uint8Array(16 * 5)], room], RangeError, /expected fingerprints/],
      [[dst, frame(ENTRY_REF, 1, 2), 2, Buffer.alloc(0), Uint32Array.of(0, 0), [src], [null], room], RangeError, /payload is 0 bytes but the entries' 1 data pages/],
      [[dst, frame(ENTRY_REF, 1, 2), 2, data, Uint32Array.of(0, 0), [src], [null], new Uint32Array(5)], RangeError, /mismatches has room for 1 pages, the refs hold 2/],
      [[dst, frame(ENTRY_REF, 1, 2), 2, data, Uint32Array.of(0, 0), [src], [], room], TypeError, /sources and expects must be arrays of one length/],
      [[dst, frame(ENTRY_REF, 1, 2), 2, data, Uint32Array.of(0, 0), [smallPages], [null], room], RangeError, /dst has 4096-byte pages but sources\[0\] has 512-byte pages/],
      [[dst, frame(ENTRY_REF, 1, 2), 2, data, Uint32Array.of(0, 0), [{}], [null], room], TypeError, /sources\[i\] must be a RegionHandle/],
      [[dst, frame(), 2, data, new Uint32Array(0), [], [], room], RangeError, /entryCount/],
      [[src, frame(), 1, data, new Uint32Array(0), [], [], room], Error, /dst is mapped read-only/],
    ];
    expectRejections('regionApplyRefs', cases);
    expect(readAll(dstFd, dstContent.length).equals(dstContent)).toBe(true);
    expect((await native.regionDigest(dst, 'tracked')).equals(trackedBefore)).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------
// regionFingerprints
// ---------------------------------------------------------------------------------------

describe('regionFingerprints', () => {
  const ps = 4096;
  const pages = 300; // more than the 256 pages of one 1 MiB read

  for (const writable of [false, true]) {
    it(`equals hash128 of each page (${writable ? 'writable, read with pread' : 'read-only, from the mapping'})`, () => {
      const content = buildPages(pages, ps, 51, (p) => p % 6 === 0);
      const fd = tmpFile(content);
      const region = mapFd(fd, content.length, ps, { writable });
      const all = new Uint8Array(16 * pages);
      native.regionFingerprints(region, 0, pages, all);
      expect(Buffer.from(all).equals(oracleFingerprints(content, 0, pages, ps))).toBe(true);

      const out = new Uint8Array(16 * 270 + 5).fill(0xee);
      native.regionFingerprints(region, 29, 270, out);
      expect(Buffer.from(out.subarray(0, 16 * 270)).equals(oracleFingerprints(content, 29, 270, ps))).toBe(true);
      expect(out.subarray(16 * 270).every((b) => b === 0xee)).toBe(true);

      // The bytes now, not what they were at regionMap.
      writeAll(fd, Buffer.from([1]), 6 * ps);
      const one = new Uint8Array(16);
      native.regionFingerprints(region, 6, 1, one);
      expect(Buffer.from(one).equals(native.hash128(readAll(fd, content.length).subarray(6 * ps, 7 * ps)))).toBe(true);

      native.regionFingerprints(region, pages, 0, new Uint8Array(0));
    });
  }

  it('rejects bad bounds and a short out, and closed regions', () => {
    const fd = tmpFile(16 * ps);
    const region = mapFd(fd, 16 * ps, ps, { writable: true });
    const out = new Uint8Array(16 * 16).fill(0xee);
    const cases: Rejection[] = [
      [[region, 10, 7, out], RangeError, /pages \[10, 17\) are outside the region of 16 pages/],
      [[region, 16, 1, out], RangeError, /outside the region/],
      [[region, 17, 0, out], RangeError, /outside the region/],
      [[region, 0xffffffff, 2, out], RangeError, /outside the region/],
      [[region, -1, 1, out], RangeError, /firstPage/],
      [[region, 0, 1.5, out], RangeError, /count/],
      [[region, 0, 4, out.subarray(0, 63)], RangeError, /out is 63 bytes but 4 pages need 64/],
      [[region, 0, 4, new Uint32Array(16)], TypeError, /out must be a Uint8Array/],
      [[{}, 0, 4, out], TypeError, /region must be a RegionHandle/],
    ];
    expectRejections('regionFingerprints', cases);
    expect(out.every((b) => b === 0xee)).toBe(true);
    closeRegion(region);
    expect(() => native.regionFingerprints(region, 0, 1, out)).toThrow(/^region is closed$/);
  });
});
