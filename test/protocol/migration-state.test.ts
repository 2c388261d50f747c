// The destination's receive state machine: the legal paths, and the full (state, event)
// table against an independent oracle.
import { describe, expect, test } from 'vitest';
import {
  Codec,
  EntryKind,
  ErrorCode,
  Frame,
  type MigrationEvent,
  MigrationEventType,
  MigrationPhase,
  type MigrationState,
  ProtocolError,
  initialMigrationState,
  isTerminal,
  transition,
} from '../../protocol/index.js';

const id = 'm';

/** An event of each kind, carrying the state's current round where a round is needed. */
const eventKinds = [
  ...MigrationEventType.filter((t) => t !== 'roundEnd' && t !== 'postcopy'),
  'roundEnd',
  'roundEnd(final)',
  'postcopy',
  'postcopy(more)',
] as const;
type EventKind = (typeof eventKinds)[number];

function eventOf(kind: EventKind, round: number): MigrationEvent {
  switch (kind) {
    case 'pages':
      return { type: 'pages', round };
    case 'roundEnd':
      return { type: 'roundEnd', round, final: false };
    case 'roundEnd(final)':
      return { type: 'roundEnd', round, final: true };
    case 'postcopy':
      return { type: 'postcopy', more: false };
    case 'postcopy(more)':
      return { type: 'postcopy', more: true };
    default:
      return { type: kind } as MigrationEvent;
  }
}

// The oracle: what each phase accepts, written out by hand from the diagram in
// protocol/migration-state.ts. [next phase, round advances].
const legal: Record<MigrationPhase, Partial<Record<EventKind, [MigrationPhase, boolean]>>> = {
  offered: { sentAccept: ['accepted', false], sentReject: ['rejected', false] },
  accepted: { pages: ['receiving', false], roundEnd: ['receiving', true], pause: ['paused', false] },
  receiving: { pages: ['receiving', false], roundEnd: ['receiving', true], pause: ['paused', false] },
  paused: {
    pages: ['paused', false],
    'roundEnd(final)': ['finalRoundDone', true],
    postcopy: ['postcopyStarting', false],
    'postcopy(more)': ['paused', false],
    deviceState: ['paused', false],
  },
  finalRoundDone: { deviceState: ['deviceStateReceived', false], verify: ['verifying', false] },
  deviceStateReceived: { deviceState: ['deviceStateReceived', false], verify: ['verifying', false] },
  verifying: { sentVerified: ['verified', false], sentVerifiedMismatch: ['aborted', false], sentVerifiedMismatchRepair: ['paused', false] },
  verified: { commit: ['committing', false] },
  committing: { sentCommitted: ['committed', false] },
  postcopyStarting: { pages: ['postcopyStarting', false], sentPostcopyRunning: ['postcopyRunning', false] },
  postcopyRunning: { pages: ['postcopyRunning', false], verify: ['postcopyVerifying', false], reattached: ['postcopyRunning', false] },
  postcopyVerifying: {
    pages: ['postcopyVerifying', false],
    sentVerified: ['committed', false],
    sentVerifiedMismatch: ['aborted', false],
    reattached: ['postcopyRunning', false],
  },
  committed: {},
  aborted: {},
  rejected: {},
};
const terminalPhases: MigrationPhase[] = ['committed', 'aborted', 'rejected'];
for (const phase of MigrationPhase) {
  if (!terminalPhases.includes(phase)) {
    legal[phase].abort = ['aborted', false];
    legal[phase].sentAbort = ['aborted', false];
  }
}

function expectOutOfOrder(state: MigrationState, event: MigrationEvent, ...messageParts: string[]): void {
  let error: unknown;
  try {
    transition(state, event);
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(ProtocolError);
  expect((error as ProtocolError).code).toBe(ErrorCode.UNEXPECTED_FRAME);
  for (const part of messageParts) expect((error as ProtocolError).message).toContain(part);
}

function run(events: MigrationEvent[], from = initialMigrationState()): MigrationState {
  return events.reduce(transition, from);
}

describe('legal paths', () => {
  test('a digest mismatch repaired: one more final round, verify again, commit', () => {
    const verify = Frame.verify({ migrationId: id, digests: [new Uint8Array(16)] });
    const state = run([
      { type: 'sentAccept' },
      Frame.pause({ migrationId: id }),
      { type: 'roundEnd', round: 0, final: true },
      verify,
      { type: 'sentVerifiedMismatchRepair' },
      { type: 'pages', round: 1 },
      { type: 'roundEnd', round: 1, final: true },
      verify,
      { type: 'sentVerified' },
      Frame.commit({ migrationId: id }),
      { type: 'sentCommitted' },
    ]);
    expect(state).toEqual({ phase: 'committed', round: 2 });
  });

  test('pre-copy rounds, pause, final round, device state, verify, commit', () => {
    const pages = (round: number) =>
      Frame.pages({
        migrationId: id,
        region: 0,
        round,
        codec: Codec.raw,
        entries: Uint32Array.of(EntryKind.zero, 0, 1),
        rawBytes: 0,
        payload: new Uint8Array(0),
      });
    const roundEnd = (round: number, final = false) => Frame.roundEnd({ migrationId: id, round, pageCount: 1, final });
    const states: MigrationState[] = [];
    let state = initialMigrationState();
    const events: MigrationEvent[] = [
      { type: 'sentAccept' },
      pages(0),
      pages(0),
      roundEnd(0),
      pages(1),
      roundEnd(1),
      roundEnd(2), // a round without pages
      Frame.pause({ migrationId: id }),
      pages(3),
      pages(3),
      roundEnd(3, true),
      Frame.deviceState({ migrationId: id, offsetBytes: 0, totalBytes: 4, state: new Uint8Array(4) }),
      Frame.verify({ migrationId: id, digests: [new Uint8Array(16)] }),
      { type: 'sentVerified' },
      Frame.commit({ migrationId: id }),
      { type: 'sentCommitted' },
    ];
    for (const event of events) {
      state = transition(state, event);
      states.push(state);
    }
    expect(states.map((s) => `${s.phase}@${s.round}`)).toEqual([
      'accepted@0',
      'receiving@0',
      'receiving@0',
      'receiving@1',
      'receiving@1',
      'receiving@2',
      'receiving@3',
      'paused@3',
      'paused@3',
      'paused@3',
      'finalRoundDone@4',
      'deviceStateReceived@4',
      'verifying@4',
      'verified@4',
      'committing@4',
      'committed@4',
    ]);
    expect(isTerminal(state)).toBe(true);
  });

  test('a process guest: verify straight after the final round (no device state)', () => {
    const state = run([
      { type: 'sentAccept' },
      { type: 'pages', round: 0 },
      { type: 'roundEnd', round: 0, final: false },
      { type: 'pause' },
      { type: 'roundEnd', round: 1, final: true },
      { type: 'verify' },
      { type: 'sentVerified' },
      { type: 'commit' },
      { type: 'sentCommitted' },
    ]);
    expect(state.phase).toBe('committed');
  });

  test('stop-and-copy: pause right after accept', () => {
    const state = run([
      { type: 'sentAccept' },
      { type: 'pause' },
      { type: 'pages', round: 0 },
      { type: 'roundEnd', round: 0, final: true },
      { type: 'verify' },
    ]);
    expect(state).toEqual({ phase: 'verifying', round: 1 });
  });

  test('a digest mismatch aborts', () => {
    const state = run([
      { type: 'sentAccept' },
      { type: 'pause' },
      { type: 'roundEnd', round: 0, final: true },
      { type: 'verify' },
      { type: 'sentVerifiedMismatch' },
    ]);
    expect(state.phase).toBe('aborted');
    expect(isTerminal(state)).toBe(true);
  });

  test('a rejected offer is over', () => {
    const state = run([{ type: 'sentReject' }]);
    expect(state.phase).toBe('rejected');
    expectOutOfOrder(state, { type: 'sentAccept' }, 'the migration is over');
  });

  test('transition is pure: the old state is untouched', () => {
    const before = Object.freeze(initialMigrationState());
    const after = transition(before, { type: 'sentAccept' });
    expect(before).toEqual({ phase: 'offered', round: 0 });
    expect(after).not.toBe(before);
  });
});

describe('rounds never go backwards or skip', () => {
  const receivingRound1 = run([{ type: 'sentAccept' }, { type: 'pages', round: 0 }, { type: 'roundEnd', round: 0, final: false }]);

  test('pages of an ended round', () => {
    expectOutOfOrder(receivingRound1, { type: 'pages', round: 0 }, 'round 0 while round 1 is in progress');
  });
  test('pages of a round ahead of the current one', () => {
    expectOutOfOrder(receivingRound1, { type: 'pages', round: 2 }, 'round 2 while round 1');
  });
  test('pages of the next round without a roundEnd in between', () => {
    const state = transition(receivingRound1, { type: 'pages', round: 1 });
    expectOutOfOrder(state, { type: 'pages', round: 2 }, 'round 2 while round 1');
  });
  test('the first pages must be of round 0', () => {
    expectOutOfOrder(run([{ type: 'sentAccept' }]), { type: 'pages', round: 1 }, 'round 1 while round 0');
  });
  test('a roundEnd for another round', () => {
    expectOutOfOrder(receivingRound1, { type: 'roundEnd', round: 0, final: false }, 'round 0 while round 1');
    expectOutOfOrder(receivingRound1, { type: 'roundEnd', round: 5, final: false }, 'round 5 while round 1');
  });
  test('after pause, pages and the final roundEnd carry the round in progress', () => {
    const paused = transition(receivingRound1, { type: 'pause' });
    expectOutOfOrder(paused, { type: 'pages', round: 0 }, 'round 0 while round 1');
    expectOutOfOrder(paused, { type: 'roundEnd', round: 2, final: true }, 'round 2 while round 1');
    expect(transition(paused, { type: 'roundEnd', round: 1, final: true })).toEqual({ phase: 'finalRoundDone', round: 2 });
  });
  test('a final roundEnd before pause, and a non-final one after', () => {
    expectOutOfOrder(receivingRound1, { type: 'roundEnd', round: 1, final: true }, 'only after pause');
    expectOutOfOrder(transition(receivingRound1, { type: 'pause' }), { type: 'roundEnd', round: 1, final: false }, 'only the final round');
  });
});

describe('the full (state, event) table', () => {
  const pairs = MigrationPhase.flatMap((phase) => eventKinds.map((kind) => [phase, kind] as const));

  test('covers every phase and every event type', () => {
    expect(pairs).toHaveLength(MigrationPhase.length * eventKinds.length);
  });

  test.each(pairs)('%s + %s', (phase, kind) => {
    const state: MigrationState = { phase, round: 3 };
    const event = eventOf(kind, state.round);
    const expected = legal[phase][kind];
    if (expected === undefined) {
      expectOutOfOrder(state, event, `state ${phase}`, `take ${event.type}`);
    } else {
      const [next, advances] = expected;
      expect(transition(state, event)).toEqual({ phase: next, round: advances ? 4 : 3 });
    }
  });
});
