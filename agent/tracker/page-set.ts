// A set of page indices over one region, as a bitmap, with run (pair) input and output:
// [firstPage, pageCount, firstPage, pageCount, ...] in a Uint32Array, ascending.

function popcount8(value: number): number {
  let v = value - ((value >>> 1) & 0x55);
  v = (v & 0x33) + ((v >>> 2) & 0x33);
  return (v + (v >>> 4)) & 0x0f;
}

/** toRuns passes over blocks of this many bitmap bytes (4096 pages) that are all clear or all set. */
const UNIFORM_BLOCK_BYTES = 512;
const ALL_CLEAR = new Uint8Array(UNIFORM_BLOCK_BYTES);
const ALL_SET = new Uint8Array(UNIFORM_BLOCK_BYTES).fill(0xff);

export class PageSet {
  private readonly bits: Uint8Array;
  private count = 0;

  constructor(readonly pageCount: number) {
    this.bits = new Uint8Array(Math.ceil(pageCount / 8));
  }

  get size(): number {
    return this.count;
  }

  addRuns(runs: Uint32Array): void {
    for (let i = 0; i + 1 < runs.length; i += 2) this.addRange(runs[i]!, runs[i + 1]!);
  }

  addRange(firstPage: number, pageCount: number): void {
    const end = Math.min(firstPage + pageCount, this.pageCount);
    // An empty set has nothing to count in the bytes filled below (the leading pages added
    // first are in the byte before them): the count of a run of the whole guest then costs
    // no pass over the bitmap, which cold took 3 ms for 1 GiB inside a post-copy switchover.
    const wasEmpty = this.count === 0;
    let page = firstPage;
    for (; page < end && (page & 7) !== 0; page++) this.add(page);
    // Whole bytes at a time in the middle (a post-copy set is one run of the whole guest).
    const firstByte = page >>> 3;
    const endByte = (end - (end - page) % 8) >>> 3;
    if (endByte > firstByte) {
      if (!wasEmpty) for (let byte = firstByte; byte < endByte; byte++) this.count -= popcount8(this.bits[byte]!);
      this.count += (endByte - firstByte) * 8;
      this.bits.fill(0xff, firstByte, endByte);
      page = endByte * 8;
    }
    for (; page < end; page++) this.add(page);
  }

  add(page: number): void {
    const byte = page >>> 3;
    const mask = 1 << (page & 7);
    if ((this.bits[byte]! & mask) === 0) {
      this.bits[byte]! |= mask;
      this.count++;
    }
  }

  has(page: number): boolean {
    return (this.bits[page >>> 3]! & (1 << (page & 7))) !== 0;
  }

  /** Removes `page`; true if it was in the set. */
  delete(page: number): boolean {
    const byte = page >>> 3;
    const mask = 1 << (page & 7);
    if (page >= this.pageCount || (this.bits[byte]! & mask) === 0) return false;
    this.bits[byte]! &= ~mask;
    this.count--;
    return true;
  }

  /** The smallest page in the set that is at least `from`, if any. */
  nextFrom(from: number): number | undefined {
    if (this.count === 0 || from >= this.pageCount) return undefined;
    let byte = from >>> 3;
    let value = this.bits[byte]! & (0xff << (from & 7));
    while (value === 0) {
      if (++byte >= this.bits.length) return undefined;
      value = this.bits[byte]!;
    }
    const page = byte * 8 + (31 - Math.clz32(value & -value));
    return page < this.pageCount ? page : undefined;
  }

  clear(): void {
    this.bits.fill(0);
    this.count = 0;
  }

  /**
   * The pages as ascending runs. A block of the bitmap that only goes on with what is open
   * (all clear outside a run, all set inside one) is passed over by one native compare: a
   * byte at a time, the 32 Ki bytes of a 1 GiB region took 2-3 ms cold, inside a switchover.
   */
  toRuns(): Uint32Array {
    const out: number[] = [];
    const bits = this.bits;
    let runStart = -1;
    for (let byte = 0; byte < bits.length; byte++) {
      if ((byte & (UNIFORM_BLOCK_BYTES - 1)) === 0 && byte + UNIFORM_BLOCK_BYTES <= bits.length) {
        const block = bits.subarray(byte, byte + UNIFORM_BLOCK_BYTES);
        if (Buffer.compare(block, runStart < 0 ? ALL_CLEAR : ALL_SET) === 0) {
          byte += UNIFORM_BLOCK_BYTES - 1;
          continue;
        }
      }
      const value = bits[byte]!;
      if (value === 0 && runStart < 0) continue;
      if (value === 0xff && runStart >= 0) continue;
      for (let bit = 0; bit < 8; bit++) {
        const page = byte * 8 + bit;
        if (page >= this.pageCount) break;
        const set = (value & (1 << bit)) !== 0;
        if (set && runStart < 0) runStart = page;
        else if (!set && runStart >= 0) {
          out.push(runStart, page - runStart);
          runStart = -1;
        }
      }
    }
    if (runStart >= 0) out.push(runStart, this.pageCount - runStart);
    return Uint32Array.from(out);
  }
}

/**
 * The pages of `runs` that are not in `minus`, as ascending runs. Both are ascending,
 * non-overlapping runs (as PageSet.toRuns gives them): a sweep over the runs, so a whole
 * guest minus a page costs nothing (the post-copy switchover does this while paused).
 */
export function subtractRuns(runs: Uint32Array, minus: Uint32Array, pageCount: number): Uint32Array {
  const out: number[] = [];
  let j = 0;
  for (let i = 0; i + 1 < runs.length; i += 2) {
    let from = runs[i]!;
    const end = Math.min(runs[i]! + runs[i + 1]!, pageCount);
    while (from < end) {
      while (j + 1 < minus.length && minus[j]! + minus[j + 1]! <= from) j += 2;
      if (j + 1 >= minus.length || minus[j]! >= end) {
        out.push(from, end - from);
        break;
      }
      if (minus[j]! > from) out.push(from, minus[j]! - from);
      from = minus[j]! + minus[j + 1]!;
    }
  }
  return Uint32Array.from(out);
}

/** The pages of a file of `pageCount` pages that are not in `dataRuns` ([first, count] pairs, ascending): its holes. */
export function holesOf(dataRuns: Uint32Array, pageCount: number): Uint32Array {
  return pageCount === 0 ? new Uint32Array(0) : subtractRuns(Uint32Array.of(0, pageCount), dataRuns, pageCount);
}

export function runsPageCount(runs: Uint32Array): number {
  let total = 0;
  for (let i = 1; i < runs.length; i += 2) total += runs[i]!;
  return total;
}

/** Union of two run lists (each ascending), as ascending coalesced runs. */
export function mergeRuns(a: Uint32Array, b: Uint32Array, pageCount: number): Uint32Array {
  if (b.length === 0) return a;
  if (a.length === 0) return b;
  const set = new PageSet(pageCount);
  set.addRuns(a);
  set.addRuns(b);
  return set.toRuns();
}
