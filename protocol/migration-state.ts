// The destination's receive state machine for one migration (Cloud Hypervisor context.rs:
// an out-of-order transition is an error, never ignored).
//
//                     offer received
//                           |
//                        offered ----sentReject----> rejected
//                           | sentAccept
//                           v
//            +---------- accepted
//            |              | pages(r), roundEnd(r, final: false)
//            |              v
//            |          receiving <-+ pages(r), roundEnd(r, final: false)
//            |              |-------+
//            | pause        | pause
//            |              v
//            +---------->  paused <-+ pages(r)          (the final round)
//                           |-------+
//                           | roundEnd(r, final: true)
//                           v
//                    finalRoundDone ----deviceState----> deviceStateReceived <-+ deviceState
//                           |                                   |--------------------+
//                           | verify                            | verify
//                           v                                   |
//                       verifying <-----------------------------+
//                           | sentVerified (match)      sentVerifiedMismatch -> aborted
//                           |                           sentVerifiedMismatchRepair -> paused
//                           v
//                        verified
//                           | commit
//                           v
//                       committing
//                           | sentCommitted
//                           v
//                       committed
//
// Post-copy (offer.technique postcopy or hybrid), after pause and any pages of the final
// round (the pages the guest needs before it runs):
//
//                        paused <-+ postcopy(more: true)
//                           |-----+
//                           | postcopy(more: false)
//                           v
//                   postcopyStarting <-+ pages(any r)   (fetched and pushed pages)
//                           |----------+
//                           | sentPostcopyRunning (committed sent: the guest runs here)
//                           v
//                    postcopyRunning <-+ pages(r)
//                           |----------+
//                           | verify
//                           v
//                   postcopyVerifying <-+ pages(r)
//                           |-----------+
//                           | sentVerified              sentVerifiedMismatch -> aborted
//                           v
//                       committed
//
//   reattached (the source came back on a new session): postcopyRunning or
//   postcopyVerifying -> postcopyRunning.
//
//   abort (received) or sentAbort: from every non-terminal state -> aborted
//   committed, aborted and rejected are terminal: they take nothing.
//
// deviceState is optional (a process guest has none): verify may follow the final roundEnd
// directly. It comes in chunks (each names its offset and the total). A post-copy sends it
// while paused, before its postcopy frames (paused -> paused): the guest needs it to run.
// Pause may follow accept directly (stop-and-copy without pre-copy rounds).
//
// Rounds are numbered 0, 1, 2, ... without gaps; `round` is the round in progress. Every
// pages and roundEnd frame must carry it; roundEnd(r) closes round r, so the next round is
// r + 1. A round without pages is a bare roundEnd. After pause the round in progress is the
// final one. A round going backwards or skipping ahead is out of order.
//
// The function is pure: the caller keeps the state and replaces it with the result.
import { ErrorCode, ProtocolError } from './errors.js';

export const MigrationPhase = [
  'offered',
  'accepted',
  'receiving',
  'paused',
  'finalRoundDone',
  'deviceStateReceived',
  'verifying',
  'verified',
  'committing',
  'postcopyStarting',
  'postcopyRunning',
  'postcopyVerifying',
  'committed',
  'aborted',
  'rejected',
] as const;
export type MigrationPhase = (typeof MigrationPhase)[number];

export interface MigrationState {
  readonly phase: MigrationPhase;
  /** The round in progress. */
  readonly round: number;
}

/**
 * A frame received for this migration. Every Frame is one, so a decoded frame is passed
 * as it is; hello, error and the frames only a destination sends are always out of order.
 */
export type ReceivedEvent =
  | { type: 'pages'; round: number }
  | { type: 'roundEnd'; round: number; final: boolean }
  | { type: 'postcopy'; more: boolean }
  | {
      type:
        | 'hello'
        | 'offer'
        | 'accept'
        | 'reject'
        | 'pause'
        | 'deviceState'
        | 'verify'
        | 'verified'
        | 'commit'
        | 'committed'
        | 'abort'
        | 'credit'
        | 'error'
        | 'dedupOpen'
        | 'dedupResident'
        | 'dedupReady'
        | 'dedupClose'
        | 'want'
        | 'pageFingerprints'
        | 'fetch'
        | 'reattach'
        | 'migrationQuery'
        | 'migrationAnswer'
        | 'standbyReady'
        | 'trafficQuery'
        | 'trafficReport';
    };

/** Frames this destination sent. */
export type SentEvent = {
  type:
    | 'sentAccept'
    | 'sentReject'
    | 'sentVerified'
    | 'sentVerifiedMismatch'
    | 'sentVerifiedMismatchRepair'
    | 'sentCommitted'
    | 'sentPostcopyRunning'
    | 'reattached'
    | 'sentAbort';
};

export type MigrationEvent = ReceivedEvent | SentEvent;

/** Every event type, for exhaustive tests and tables. */
export const MigrationEventType = [
  'hello',
  'offer',
  'accept',
  'reject',
  'pages',
  'roundEnd',
  'pause',
  'deviceState',
  'verify',
  'verified',
  'commit',
  'committed',
  'abort',
  'credit',
  'error',
  'dedupOpen',
  'dedupResident',
  'dedupReady',
  'dedupClose',
  'want',
  'pageFingerprints',
  'postcopy',
  'fetch',
  'reattach',
  'migrationQuery',
  'migrationAnswer',
  'standbyReady',
  'trafficQuery',
  'trafficReport',
  'sentAccept',
  'sentReject',
  'sentVerified',
  'sentVerifiedMismatch',
  'sentVerifiedMismatchRepair',
  'sentCommitted',
  'sentPostcopyRunning',
  'reattached',
  'sentAbort',
] as const satisfies readonly MigrationEvent['type'][];

const terminal: ReadonlySet<MigrationPhase> = new Set(['committed', 'aborted', 'rejected']);

/** The state a migration starts in when its offer arrives. */
export function initialMigrationState(): MigrationState {
  return { phase: 'offered', round: 0 };
}

export function isTerminal(state: MigrationState): boolean {
  return terminal.has(state.phase);
}

/** The state after `event`; throws ProtocolError GANGWAY_ERR_UNEXPECTED_FRAME when it is out of order. */
export function transition(state: MigrationState, event: MigrationEvent): MigrationState {
  const { phase, round } = state;
  const outOfOrder = (why?: string): never => {
    throw new ProtocolError(
      ErrorCode.UNEXPECTED_FRAME,
      `migration in state ${phase} (round ${round}) cannot take ${String(event.type)}${why === undefined ? '' : `: ${why}`}`,
    );
  };
  const to = (next: MigrationPhase, nextRound = round): MigrationState => ({ phase: next, round: nextRound });
  const checkRound = (eventRound: number): void => {
    if (eventRound !== round) outOfOrder(`round ${eventRound} while round ${round} is in progress`);
  };

  if (terminal.has(phase)) return outOfOrder('the migration is over');
  switch (event.type) {
    case 'abort':
    case 'sentAbort':
      return to('aborted');
    case 'sentAccept':
      return phase === 'offered' ? to('accepted') : outOfOrder();
    case 'sentReject':
      return phase === 'offered' ? to('rejected') : outOfOrder();
    case 'pages':
      // Post-copy pages belong to no round: a source that restarted mid post-copy does not
      // know the switchover's round any more.
      if (phase === 'postcopyStarting' || phase === 'postcopyRunning' || phase === 'postcopyVerifying') return state;
      if (phase !== 'accepted' && phase !== 'receiving' && phase !== 'paused') return outOfOrder();
      checkRound(event.round);
      return to(phase === 'paused' ? 'paused' : 'receiving');
    case 'postcopy':
      if (phase !== 'paused') return outOfOrder('post-copy starts only after pause');
      return event.more ? state : to('postcopyStarting');
    case 'sentPostcopyRunning':
      return phase === 'postcopyStarting' ? to('postcopyRunning') : outOfOrder();
    case 'reattached':
      // The source came back on a new session: it sends verify again once it has pushed.
      return phase === 'postcopyRunning' || phase === 'postcopyVerifying' ? to('postcopyRunning') : outOfOrder();
    case 'roundEnd':
      if (event.final) {
        if (phase !== 'paused') return outOfOrder('a final round ends only after pause');
        checkRound(event.round);
        return to('finalRoundDone', round + 1);
      }
      if (phase === 'paused') return outOfOrder('after pause only the final round may end');
      if (phase !== 'accepted' && phase !== 'receiving') return outOfOrder();
      checkRound(event.round);
      return to('receiving', round + 1);
    case 'pause':
      return phase === 'accepted' || phase === 'receiving' ? to('paused') : outOfOrder();
    case 'deviceState':
      if (phase === 'paused') return to('paused');
      return phase === 'finalRoundDone' || phase === 'deviceStateReceived' ? to('deviceStateReceived') : outOfOrder();
    case 'verify':
      if (phase === 'postcopyRunning') return to('postcopyVerifying');
      return phase === 'finalRoundDone' || phase === 'deviceStateReceived' ? to('verifying') : outOfOrder();
    case 'sentVerified':
      if (phase === 'postcopyVerifying') return to('committed');
      return phase === 'verifying' ? to('verified') : outOfOrder();
    case 'sentVerifiedMismatch':
      return phase === 'verifying' || phase === 'postcopyVerifying' ? to('aborted') : outOfOrder();
    case 'sentVerifiedMismatchRepair':
      // The source sends the pages that differ as one more final round, then verify again.
      return phase === 'verifying' ? to('paused') : outOfOrder();
    case 'commit':
      return phase === 'verified' ? to('committing') : outOfOrder();
    case 'sentCommitted':
      return phase === 'committing' ? to('committed') : outOfOrder();
    default:
      // A second offer for the same id, session and group frames (hello, error, dedup*, traffic*),
      // and frames only a destination sends (accept, reject, verified, committed, credit, want,
      // standbyReady).
      return outOfOrder();
  }
}
