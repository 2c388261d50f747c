// Which parts of a READ the server's content chunks have covered. The spec forbids chunks
// that overlap and requires the whole range before a successful DONE; both are checked
// here. Touching ranges are merged, so a server that sends its chunks in order keeps this
// at one range.

export class Coverage {
  readonly #starts: number[] = [];
  readonly #ends: number[] = [];
  #coveredBytes = 0;

  get coveredBytes(): number {
    return this.#coveredBytes;
  }

  get rangeCount(): number {
    return this.#starts.length;
  }

  /** Adds [start, end); false (and nothing added) when it overlaps what is covered. */
  add(start: number, end: number): boolean {
    if (end <= start) return true;
    // i: the first range that starts at or after `start`.
    let lo = 0;
    let hi = this.#starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.#starts[mid]! < start) lo = mid + 1;
      else hi = mid;
    }
    const i = lo;
    if (i > 0 && this.#ends[i - 1]! > start) return false;
    if (i < this.#starts.length && this.#starts[i]! < end) return false;
    this.#coveredBytes += end - start;
    const joinsPrevious = i > 0 && this.#ends[i - 1] === start;
    const joinsNext = i < this.#starts.length && this.#starts[i] === end;
    if (joinsPrevious && joinsNext) {
      this.#ends[i - 1] = this.#ends[i]!;
      this.#starts.splice(i, 1);
      this.#ends.splice(i, 1);
    } else if (joinsPrevious) {
      this.#ends[i - 1] = end;
    } else if (joinsNext) {
      this.#starts[i] = start;
    } else {
      this.#starts.splice(i, 0, start);
      this.#ends.splice(i, 0, end);
    }
    return true;
  }
}
