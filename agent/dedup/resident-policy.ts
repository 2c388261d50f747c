// Whose resident guests a peer's dedup group may see (dedup.resident), and how often
// (dedup.residentOffersPerMinute).
//
// A resident offer gives the peer the 128-bit fingerprint of every page offered: enough to
// confirm a guessed page's content offline. So by default a peer sees only the guests it
// migrated here itself (content it sent, and so knows), not the other guests of the host.
import type { DedupPolicy } from '../config.js';
import type { GuestRecord } from '../guest/registry.js';
import { ResidentFingerprintCache, type ResidentCacheOptions } from './resident-cache.js';
import { ResidentOfferLimiter } from './resident-limiter.js';

export interface ResidentCandidate {
  name: string;
  origin: GuestRecord['origin'];
  /** Being migrated away: its memory is the migration's. */
  migrating: boolean;
  alive: boolean;
}

/**
 * The guests a peer may be offered: none under 'none'; every one under 'all'; under
 * 'from-peer' those that peer (its verified identity under TLS) migrated here. Guests being
 * migrated away or no longer running are never offered. A peer without an identity (no
 * hello) sees nothing under 'from-peer'.
 */
export function selectResident<C extends ResidentCandidate>(policy: DedupPolicy['resident'], peerAgentId: string | undefined, candidates: readonly C[]): C[] {
  if (policy === 'none') return [];
  return candidates.filter((c) => {
    if (c.migrating || !c.alive) return false;
    if (policy === 'all') return true;
    // A record without an origin (written by an older agent) is nobody's to see.
    return peerAgentId !== undefined && c.origin?.kind === 'migrated' && c.origin.from === peerAgentId;
  });
}

export type ResidentOutcome = 'offered' | 'refused-policy' | 'rate-limited';

export interface ResidentDecision<C> {
  outcome: ResidentOutcome;
  /** What to offer (empty unless offered). */
  guests: C[];
  /** Rate-limited for the first time in this peer's window: log it. */
  warn: boolean;
}

/**
 * The agent's resident-offer state: the policy, one limiter for all peers and the shared
 * fingerprint cache.
 */
export class ResidentOffers {
  readonly limiter: ResidentOfferLimiter;
  readonly fingerprints: ResidentFingerprintCache;

  constructor(
    readonly policy: DedupPolicy,
    options: { now?: () => number } & Omit<ResidentCacheOptions, 'maxAgeMs' | 'now'> = {},
  ) {
    this.limiter = new ResidentOfferLimiter(policy.residentOffersPerMinute, options.now);
    this.fingerprints = new ResidentFingerprintCache({ ...options, maxAgeMs: policy.residentMaxAgeMs });
  }

  /**
   * What a peer's request for resident content gets. Only a request with something to offer
   * takes one of the peer's offers per minute: one the policy leaves empty (and no base
   * image, `baseImages` of them, is there to offer) costs no hashing and shows nothing.
   */
  decide<C extends ResidentCandidate>(peerAgentId: string | undefined, candidates: readonly C[], baseImages = 0): ResidentDecision<C> {
    const guests = selectResident(this.policy.resident, peerAgentId, candidates);
    if (guests.length === 0 && baseImages === 0) return { outcome: 'refused-policy', guests: [], warn: false };
    const verdict = this.limiter.take(peerAgentId ?? '');
    if (!verdict.allowed) return { outcome: 'rate-limited', guests: [], warn: verdict.warn };
    return { outcome: 'offered', guests, warn: false };
  }
}
