// An offer's admission at the destination (admission.ts): each refusal names its reason, and
// the guest's name is reserved only for an offer that may come.
import { describe, expect, it } from 'vitest';
import pino from 'pino';
import { GuestKind, RejectReason, Technique } from '../../protocol/codes.js';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { admitOffer, spaceShortfall } from '../../agent/migration/admission.js';
import type { DestinationContext } from '../../agent/migration/destination-types.js';
import type { OfferFrame } from '../../agent/peer/session.js';

const log = pino({ level: 'silent' });

function offerOf(over: Partial<OfferFrame> = {}): OfferFrame {
  return {
    type: 'offer',
    migrationId: 'm1',
    guest: { name: 'g1', kind: GuestKind.process, regions: [{ name: 'ram', lengthBytes: 1 << 20, pageSizeBytes: 4096 }], config: {} },
    technique: Technique.precopy,
    downtimeBudgetMs: 300,
    codecs: [0],
    ...over,
  } as OfferFrame;
}

function ctxOf(over: { accepting?: boolean; unfit?: string; reserveFails?: Error; unreadable?: boolean; groupClosed?: boolean } = {}) {
  const reserved: string[] = [];
  const ctx = {
    accepting: () => over.accepting ?? true,
    groups: new Map(over.groupClosed === undefined ? [] : [['grp', { isClosed: over.groupClosed }]]),
    launchers: { [GuestKind.process]: { kind: 'process', checkOffer: () => over.unfit } },
    registry: {
      reserve: (name: string) => {
        if (over.reserveFails) throw over.reserveFails;
        reserved.push(name);
      },
      unreadableRecords: () => (over.unreadable ? [{ name: 'g1' }] : []),
    },
  } as unknown as DestinationContext;
  return { ctx, reserved };
}

describe('admitOffer', () => {
  it('admits a plain pre-copy offer and reserves its name', () => {
    const { ctx, reserved } = ctxOf();
    const admission = admitOffer(offerOf(), ctx, log);
    expect(admission.admitted).toBe(true);
    expect(reserved).toEqual(['g1']);
  });

  const refusals: [string, Parameters<typeof ctxOf>[0], Partial<OfferFrame>, RejectReason, RegExp][] = [
    ['an agent shutting down', { accepting: false }, {}, RejectReason.shuttingDown, /shutting down/],
    ['a dedup group not open', {}, { dedup: { group: 'grp', slots: [0] } }, RejectReason.badSpec, /dedup group grp is not open/],
    ['a dedup group closed', { groupClosed: true }, { dedup: { group: 'grp', slots: [0] } }, RejectReason.badSpec, /dedup group grp is not open/],
    ['a kind this agent does not take', {}, { guest: { ...offerOf().guest, kind: GuestKind.qemu } }, RejectReason.unsupported, /takes no guests of kind/],
    ['post-copy in a dedup group', { groupClosed: false }, { technique: Technique.postcopy, dedup: { group: 'grp', slots: [0] } }, RejectReason.unsupported, /do not take part in dedup groups/],
    ['a guest its launcher finds unfit', { unfit: 'too many regions' }, {}, RejectReason.badSpec, /^too many regions$/],
    ['a name already here', { reserveFails: new GangwayError(ErrorCode.GUEST_EXISTS, 'exists') }, {}, RejectReason.guestExists, /already exists at the destination: stop it there/],
    ['a name whose record here is unreadable', { reserveFails: new Error('bad record /x: EACCES'), unreadable: true }, {}, RejectReason.guestExists, /needs its operator$/],
  ];
  for (const [what, ctxOver, offerOver, reason, message] of refusals) {
    it(`refuses ${what}, and reserves nothing`, () => {
      const { ctx, reserved } = ctxOf(ctxOver);
      const admission = admitOffer(offerOf(offerOver), ctx, log);
      expect(admission).toMatchObject({ admitted: false, reason });
      expect(!admission.admitted && admission.message).toMatch(message);
      expect(reserved).toEqual([]);
    });
  }

  it("keeps this host's own trouble with a record out of the peer's message", () => {
    const { ctx } = ctxOf({ reserveFails: new Error('cannot read /var/lib/gangway/guests/g1.json: EACCES'), unreadable: true });
    const admission = admitOffer(offerOf(), ctx, log);
    expect(!admission.admitted && admission.message).not.toMatch(/var\/lib|EACCES/);
  });
});

describe('spaceShortfall', () => {
  const space = { reservedBytes: 100, headroomBytes: 50 };
  it('is nothing while free space, less what is promised and kept, holds the guest', () => {
    expect(spaceShortfall(1150, 1000, space)).toBeUndefined();
  });
  it('says what is free, promised and kept, and what the guest needs, one byte short', () => {
    expect(spaceShortfall(1149, 1000, space)).toBe(
      'the memory directory has 1149 bytes free, of which 100 are promised to migrations under way and 50 are kept free (peers.memoryHeadroom); the guest needs 1000',
    );
  });
});
