// The source's link to the destination for one migration: frames out, frames in. Incoming
// frames are sorted by type (a `switch` narrows each one): credits go to the credit window,
// the destination's requests (want, fetch, pageFingerprints, postcopy) to the handler the
// current phase installed, and answers (accept, verified, committed, ...) to whoever is
// waiting for them. A failure (abort, reject, a broken session, a bad frame, cancel) fails
// every waiter at once, and every later send. Post-copy replaces the session when it breaks
// (reattach) and carries on with the same link.
import { ErrorCode, GangwayError, PeerError } from '../../protocol/errors.js';
import type { FrameOf } from '../../protocol/index.js';
import type { AnyFrame, PeerSession } from '../peer/session.js';
import type { CodecChooser } from './codec-chooser.js';
import type { Clock, CreditWindow } from './flow.js';
import type { WindowTuner } from './postcopy.js';

/** What the source engine needs of a peer session (a unit test gives it an in-memory destination). */
export type SourceSession = Pick<
  PeerSession,
  'send' | 'sendMessage' | 'writable' | 'register' | 'unregister' | 'measureRttMs' | 'rttFloorMs' | 'peer' | 'peerMaxPayloadBytes' | 'isOpen'
> &
  Partial<Pick<PeerSession, 'codecMemory' | 'peerCertificateSha256'>>;

/** Frames the destination sends on its own, each handled by the phase that expects it. */
export interface RequestHandlers {
  want?: (frame: FrameOf<'want'>) => void;
  fetch?: (frame: FrameOf<'fetch'>) => void;
  pageFingerprints?: (frame: FrameOf<'pageFingerprints'>) => void;
  postcopy?: (frame: FrameOf<'postcopy'>) => void;
  /** A reattach's answer when the destination already holds every page. */
  verified?: (frame: FrameOf<'verified'>) => void;
}

type Waiter = { resolve: (frame: AnyFrame) => void; reject: (err: Error) => void };

export class SourceLink {
  private failure: GangwayError | undefined;
  private readonly waiters = new Map<AnyFrame['type'], Waiter>();
  private readonly failListeners = new Set<(err: GangwayError) => void>();
  readonly handlers: RequestHandlers = {};
  /** The window of bytes the destination granted; replaced for post-copy and on a reattach. */
  credits: CreditWindow | undefined;
  /** Post-copy: sizes the credit window to the link as credits come back. */
  windowTuner: WindowTuner | undefined;
  /** Told of every credit: the batch was applied at the destination. */
  chooser: CodecChooser | undefined;

  constructor(
    public session: SourceSession,
    private readonly clock: Clock,
    /** For messages: the migration's phase now. */
    private readonly phase: () => string,
  ) {}

  get failed(): GangwayError | undefined {
    return this.failure;
  }

  onFrame(frame: AnyFrame): void {
    try {
      this.dispatch(frame);
    } catch (err) {
      this.fail(err instanceof GangwayError ? err : new GangwayError(ErrorCode.INTERNAL, err instanceof Error ? err.message : String(err)));
    }
  }

  private dispatch(frame: AnyFrame): void {
    switch (frame.type) {
      case 'credit': {
        // One credit per pages frame, in order: the batch was applied at the destination.
        this.chooser?.delivered();
        this.credits?.grant(frame.bytes);
        if (this.windowTuner && this.credits) {
          const window = this.windowTuner.delivered(frame.bytes, this.clock.now());
          if (window !== this.credits.windowBytes) this.credits.resize(window);
        }
        return;
      }
      case 'want':
        return this.request(this.handlers.want, frame, `want for region ${frame.region} of a migration that sent no refs there`);
      case 'fetch':
        return this.request(this.handlers.fetch, frame, `fetch for region ${frame.region} outside post-copy (phase ${this.phase()})`);
      case 'pageFingerprints':
        return this.request(this.handlers.pageFingerprints, frame, `pageFingerprints (region ${frame.region}, from page ${frame.firstPage}) that were not asked for`);
      case 'postcopy':
        return this.request(this.handlers.postcopy, frame, `postcopy from the destination outside a reattach (phase ${this.phase()})`);
      case 'abort':
        this.fail(new PeerError(frame.code, `the destination aborted: ${frame.message}`));
        return;
      case 'reject':
        this.fail(new GangwayError(ErrorCode.REJECTED, `the destination refused the migration: ${frame.message}`));
        return;
      case 'verified':
        if (this.handlers.verified) return this.handlers.verified(frame);
        return this.answer(frame);
      default:
        return this.answer(frame);
    }
  }

  private request<F extends AnyFrame>(handler: ((frame: F) => void) | undefined, frame: F, unexpected: string): void {
    if (!handler) throw new GangwayError(ErrorCode.UNEXPECTED_FRAME, unexpected);
    handler(frame);
  }

  private answer(frame: AnyFrame): void {
    const waiter = this.waiters.get(frame.type);
    if (!waiter) throw new GangwayError(ErrorCode.UNEXPECTED_FRAME, `unexpected frame type ${frame.type} in phase ${this.phase()}`);
    this.waiters.delete(frame.type);
    waiter.resolve(frame);
  }

  /**
   * The destination's next frame of `type`, within `timeoutMs` (`what` names it in the
   * timeout's message). Callers take the promise before they send what it answers, and that
   * send may throw (the link failed meanwhile): the promise is marked handled here, so its
   * rejection cannot become an unhandled one that ends the agent before anyone awaits it.
   */
  expect<T extends AnyFrame['type']>(type: T, timeoutMs: number, what: string): Promise<FrameOf<T>> {
    const answer = this.wait(type, timeoutMs, what);
    answer.catch(() => {});
    return answer;
  }

  private wait<T extends AnyFrame['type']>(type: T, timeoutMs: number, what: string): Promise<FrameOf<T>> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<FrameOf<T>>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(type);
        reject(new GangwayError(ErrorCode.TIMEOUT, `no ${what} from the destination within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.set(type, {
        resolve: (frame) => {
          clearTimeout(timer);
          resolve(frame as FrameOf<T>);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      });
    });
  }

  /** Calls `listener` with the failure when the link fails (at once if it has). Returns its removal. */
  onFail(listener: (err: GangwayError) => void): () => void {
    if (this.failure) {
      listener(this.failure);
      return () => {};
    }
    this.failListeners.add(listener);
    return () => this.failListeners.delete(listener);
  }

  /** `promise`, or this link's failure if that comes first (the listener goes when either does). */
  async unlessFailed<T>(promise: Promise<T>): Promise<T> {
    let unlisten = () => {};
    try {
      return await Promise.race([promise, new Promise<never>((_, reject) => (unlisten = this.onFail(reject)))]);
    } finally {
      unlisten();
    }
  }

  fail(err: GangwayError): void {
    if (this.failure) return;
    this.failure = err;
    this.credits?.fail(err);
    for (const waiter of this.waiters.values()) waiter.reject(err);
    this.waiters.clear();
    for (const listener of [...this.failListeners]) listener(err);
    this.failListeners.clear();
  }

  check(): void {
    if (this.failure) throw this.failure;
  }

  send(frame: AnyFrame): void {
    this.check();
    this.session.send(frame);
  }

  /**
   * Post-copy, after the session broke: carries on over `session`. Nothing of the old one
   * counts any more: its failure, and whoever waited on it (they get `cause`).
   */
  replaceSession(session: SourceSession, cause: Error): void {
    this.failure = undefined;
    for (const waiter of this.waiters.values()) waiter.reject(cause);
    this.waiters.clear();
    this.session = session;
  }
}
