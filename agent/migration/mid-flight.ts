// What an operator changes on an outgoing migration while it runs (gangway migrate-set,
// gangway postcopy; virsh migrate-setspeed / migrate-setmaxdowntime and QEMU's
// migrate-start-postcopy): which phase allows which change, and the record of the changes
// the summary carries. The engine reads the settings where it would anyway: the pacer's rate
// at every batch, the downtime budget at every round's decision, the post-copy request at
// the next round boundary.
import type { SourcePhase } from './source-state.js';

export interface SettingsChange {
  bandwidthBytesPerSec?: number;
  downtimeMs?: number;
}

/** The settings a migration runs with now; bandwidth null: not paced. */
export interface LiveSettings {
  bandwidthBytesPerSec: number | null;
  downtimeMs: number;
}

/** One operator change, `afterMs` after the migration started. */
export interface OperatorChange {
  afterMs: number;
  bandwidthBytesPerSec?: number;
  downtimeMs?: number;
  postcopy?: true;
}

const SWITCHOVER: readonly SourcePhase[] = ['stopping', 'verifying', 'committing', 'postcopy-switch'];

/** Why a phase takes no changes of settings now, or undefined. */
export function settingsRefusal(phase: SourcePhase, change: SettingsChange, paced: boolean): string | undefined {
  if (phase === 'offering' || phase === 'precopy') return undefined;
  if (SWITCHOVER.includes(phase)) return `is at its switchover (${phase}): nothing it could change is left to do`;
  if (phase === 'postcopy') {
    if (change.downtimeMs !== undefined) return 'is in post-copy: the guest already runs at the destination, so there is no downtime left to budget';
    // The push took its pacer when it started: a rate changes it, a first cap would not be read.
    if (!paced) return 'is in post-copy and its push runs without a --bandwidth cap: a cap can only be set during pre-copy';
    return undefined;
  }
  return `is over (${phase})`;
}

/** Why the migration cannot go post-copy at the next round boundary, or undefined. */
export function postcopyRefusal(input: {
  phase: SourcePhase;
  technique: 'precopy' | 'postcopy' | 'hybrid';
  /** The destination's hello offered the 'postcopy' feature. */
  peerCanPostcopy: boolean;
  peerAddress: string;
}): string | undefined {
  const { phase, technique } = input;
  if (technique === 'postcopy' || phase === 'postcopy' || phase === 'postcopy-switch') return 'is already in post-copy';
  if (SWITCHOVER.includes(phase)) return `is at its switchover (${phase}): it completes by stop-and-copy in a moment`;
  if (phase !== 'offering' && phase !== 'precopy') return `is over (${phase})`;
  if (!input.peerCanPostcopy) return `cannot go post-copy: the destination ${input.peerAddress} cannot run post-copy (it offers no 'postcopy' feature: it needs root and userfaultfd)`;
  if (technique === 'precopy') {
    // The destination prepares post-copy at the offer: its standby guest is started with the
    // socket it hands its userfaultfd over, and a VM's disks behind the agent's NBD export.
    // A pre-copy offer prepared neither, as QEMU needs postcopy-ram set before `migrate`.
    return (
      `was offered to ${input.peerAddress} as pre-copy, so the destination prepared no post-copy for it (its guest waits there without the userfaultfd hand-off). ` +
      'Migrate with --technique hybrid to be able to switch it with `gangway postcopy` (it also goes post-copy by itself when pre-copy does not converge)'
    );
  }
  return undefined;
}

/** The operator's requests to the engine, and their record. */
export class MidFlightControls {
  /** `gangway postcopy`: the pre-copy ends at the next round boundary and post-copy starts. */
  postcopyRequested = false;
  readonly changes: OperatorChange[] = [];
}
