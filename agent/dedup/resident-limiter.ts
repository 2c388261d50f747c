// How often one peer may have this agent offer resident content. An offer hands the peer
// fingerprints of guest memory and may cost a pass over that memory, so a peer gets a few
// a minute (dedup.residentOffersPerMinute); a group opened beyond that still works, without
// resident slots.
//
// A sliding window (the times of the offers granted in the last minute, per peer), not a
// token bucket: "at most N in any 60 s" is what the setting promises, and N is small.

export const RESIDENT_WINDOW_MS = 60_000;

export interface ResidentLimiterVerdict {
  allowed: boolean;
  /** Refused, and the first refusal of this peer in the current window: worth a warning. */
  warn: boolean;
}

export class ResidentOfferLimiter {
  /** Per peer identity: when its granted offers were (ascending), and when it was last warned about. */
  private readonly peers = new Map<string, { grantedAt: number[]; warnedAt: number | undefined }>();

  constructor(
    private readonly offersPerWindow: number,
    /** Monotonic milliseconds; injected so tests drive time. */
    private readonly now: () => number = () => performance.now(),
    private readonly windowMs = RESIDENT_WINDOW_MS,
  ) {}

  /** Takes one offer for `peer` when it has fewer than the limit in the window. */
  take(peer: string): ResidentLimiterVerdict {
    const now = this.now();
    this.forgetIdle(now);
    let state = this.peers.get(peer);
    if (!state) {
      state = { grantedAt: [], warnedAt: undefined };
      this.peers.set(peer, state);
    }
    while (state.grantedAt.length > 0 && now - state.grantedAt[0]! >= this.windowMs) state.grantedAt.shift();
    if (state.grantedAt.length < this.offersPerWindow) {
      state.grantedAt.push(now);
      return { allowed: true, warn: false };
    }
    const warn = state.warnedAt === undefined || now - state.warnedAt >= this.windowMs;
    if (warn) state.warnedAt = now;
    return { allowed: false, warn };
  }

  /** Peers tracked now (for tests: idle ones are forgotten). */
  get trackedPeers(): number {
    return this.peers.size;
  }

  /**
   * Drops peers with nothing in the window, so that identities that came and went (a
   * plaintext peer may claim any) do not accumulate.
   */
  private forgetIdle(now: number): void {
    for (const [peer, state] of this.peers) {
      const lastGrant = state.grantedAt[state.grantedAt.length - 1];
      const idle = (lastGrant === undefined || now - lastGrant >= this.windowMs) && (state.warnedAt === undefined || now - state.warnedAt >= this.windowMs);
      if (idle) this.peers.delete(peer);
    }
  }
}
