// "LZ4 where it pays": compression helps only while the link is slower than the
// compressor. Rather than model both, measure what matters, guest bytes moved per second,
// in windows of batches sent raw and sent compressed, and keep the faster; re-probe the
// other mode now and then because the link and the content change.

export type CodecMode = 'auto' | 'lz4' | 'raw';
export type BatchCodec = 'lz4' | 'raw';

export interface CodecChooserOptions {
  mode: CodecMode;
  /** Batches per measurement window. */
  windowBatches?: number;
  /** Windows spent on the winner between probes of the loser. */
  exploitWindows?: number;
  now?: () => number;
}

export class CodecChooser {
  private readonly windowBatches: number;
  private readonly exploitWindows: number;
  private readonly now: () => number;
  private readonly rate: Record<BatchCodec, number | undefined> = { lz4: undefined, raw: undefined };
  private current: BatchCodec;
  private windowStart = 0;
  private windowGuestBytes = 0;
  private windowCount = 0;
  private exploitLeft = 0;

  constructor(private readonly options: CodecChooserOptions) {
    this.windowBatches = options.windowBatches ?? 8;
    this.exploitWindows = options.exploitWindows ?? 16;
    this.now = options.now ?? (() => performance.now());
    this.current = options.mode === 'raw' ? 'raw' : 'lz4';
  }

  /** The codec to try for the next batch. */
  next(): BatchCodec {
    return this.current;
  }

  /** Measured guest-bytes-per-second of each codec, for reports. */
  rates(): Readonly<Record<BatchCodec, number | undefined>> {
    return this.rate;
  }

  /** A batch of `guestBytes` (pages it covers, zero pages included) was handed to the link. */
  sent(guestBytes: number): void {
    if (this.options.mode !== 'auto') return;
    const now = this.now();
    if (this.windowCount === 0) this.windowStart = now;
    this.windowGuestBytes += guestBytes;
    this.windowCount++;
    if (this.windowCount < this.windowBatches) return;
    const elapsedMs = now - this.windowStart;
    this.windowCount = 0;
    // The window's first batch starts the clock, so it covers windowBatches - 1 intervals.
    const bytes = (this.windowGuestBytes * (this.windowBatches - 1)) / this.windowBatches;
    this.windowGuestBytes = 0;
    if (elapsedMs <= 0) return;
    const sample = (bytes * 1000) / elapsedMs;
    const previous = this.rate[this.current];
    this.rate[this.current] = previous === undefined ? sample : previous * 0.5 + sample * 0.5;
    this.decide();
  }

  private decide(): void {
    const other: BatchCodec = this.current === 'lz4' ? 'raw' : 'lz4';
    if (this.rate[other] === undefined) {
      this.current = other; // still exploring: measure both once
      return;
    }
    if (this.exploitLeft > 0) {
      this.exploitLeft--;
      return;
    }
    if (this.probing || !this.chosen) {
      // A probe (or the exploration) just ended: keep the faster for a while.
      this.current = (this.rate.lz4 ?? 0) >= (this.rate.raw ?? 0) ? 'lz4' : 'raw';
      this.exploitLeft = this.exploitWindows;
      this.probing = false;
      this.chosen = true;
      return;
    }
    this.current = other;
    this.probing = true;
  }

  private probing = false;
  private chosen = false;
}
