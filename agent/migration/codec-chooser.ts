// "LZ4 where it pays": compression helps only while the link is slower than the
// compressor. Rather than model both, measure what matters, guest bytes delivered per
// second (between the receiver's credits for consecutive batches), in windows of batches
// sent raw and sent compressed, and keep the faster; re-probe the other mode now and then
// because the link and the content change.

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

type Phase = 'explore' | 'exploit' | 'probe';

export class CodecChooser {
  private readonly windowBatches: number;
  private readonly exploitWindows: number;
  private readonly now: () => number;
  private readonly rate: Record<BatchCodec, number | undefined> = { lz4: undefined, raw: undefined };
  private current: BatchCodec;
  /**
   * Which mode is sent is decided by batches sent; what each mode achieves is learned from
   * deliveries, which lag by whatever is in flight. So a probe is one window of batches
   * sent, however long its measurement takes to come back.
   */
  private phase: Phase = 'explore';
  private sentInPhase = 0;
  /** Batches sent and not yet delivered, oldest first: the mode tried for each (none: no data to compress). */
  private readonly inflight: { guestBytes: number; mode: BatchCodec | 'none' }[] = [];
  /** Consecutive deliveries of one mode: the first one starts the clock. */
  private window: { mode: BatchCodec | undefined; count: number; guestBytes: number; start: number } = {
    mode: undefined,
    count: 0,
    guestBytes: 0,
    start: 0,
  };

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

  /**
   * A batch covering `guestBytes` of guest memory went out, compressed or not as `mode`
   * said ('none': it held no data to compress, e.g. only zero runs).
   */
  sent(guestBytes: number, mode: BatchCodec | 'none'): void {
    if (this.options.mode !== 'auto') return;
    this.inflight.push({ guestBytes, mode });
    if (mode !== this.current) return;
    this.sentInPhase++;
    const other: BatchCodec = this.current === 'lz4' ? 'raw' : 'lz4';
    if (this.phase === 'explore') {
      // lz4 for a window, then raw for a window, then the better (once measured).
      if (this.sentInPhase < this.windowBatches) return;
      this.sentInPhase = 0;
      if (this.current === 'lz4') this.current = 'raw';
      else this.enter('exploit');
    } else if (this.phase === 'exploit') {
      if (this.sentInPhase < this.exploitWindows * this.windowBatches) return;
      this.phase = 'probe';
      this.sentInPhase = 0;
      this.current = other;
    } else if (this.sentInPhase >= this.windowBatches) {
      this.enter('exploit');
    }
  }

  /**
   * The receiver applied the oldest batch sent (its credit came back). Rates are taken
   * between deliveries, not hand-offs to the socket: queues in front of the link (socket
   * buffers, a shaper's queue) take the first batches at any speed and would make the
   * mode tried first look fast.
   */
  delivered(): void {
    const batch = this.inflight.shift();
    if (!batch || batch.mode === 'none') return;
    const now = this.now();
    const window = this.window;
    if (window.mode !== batch.mode) {
      this.window = { mode: batch.mode, count: 1, guestBytes: 0, start: now };
      return;
    }
    window.count++;
    window.guestBytes += batch.guestBytes;
    if (window.count < this.windowBatches) return;
    const elapsedMs = now - window.start;
    // This delivery also starts the next window.
    this.window = { mode: batch.mode, count: 1, guestBytes: 0, start: now };
    if (elapsedMs <= 0) return;
    const sample = (window.guestBytes * 1000) / elapsedMs;
    const previous = this.rate[batch.mode];
    this.rate[batch.mode] = previous === undefined ? sample : previous * 0.5 + sample * 0.5;
    if (this.phase === 'exploit') this.current = this.best();
  }

  private enter(phase: Phase): void {
    this.phase = phase;
    this.sentInPhase = 0;
    this.current = this.best();
  }

  /** The faster mode measured so far (lz4 until both are known). */
  private best(): BatchCodec {
    const { lz4, raw } = this.rate;
    if (lz4 === undefined || raw === undefined) return 'lz4';
    return lz4 >= raw ? 'lz4' : 'raw';
  }
}
