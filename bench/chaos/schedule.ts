// What one chaos run does, drawn from its seed alone: the guests and how they move, and the
// fault with its moment. Pure, so a violation's seed replays the same run (`--replay SEED`).
import { Rng } from '../fuzz/mutator.js';

export const FAULT_KINDS = [
  'none',
  'kill-source',
  'kill-destination',
  'term-source',
  'term-destination',
  'stall-source',
  'stall-destination',
  'cancel',
  'link-down',
  'drop',
  'memory-full',
] as const;
export type FaultKind = (typeof FAULT_KINDS)[number];

/** Faults that need the agents in network namespaces of their own (a link to cut). */
export const LINK_FAULTS: readonly FaultKind[] = ['link-down', 'drop'];

export interface GuestPlan {
  name: string;
  /** A gangway-guest process, or a QEMU VM on the test kernel (which checks its own pages and blocks). */
  kind: 'process' | 'vm';
  memoryBytes: number;
  /** A process guest's; a VM's kernel rewrites vmPagesPerSec pages a second instead. */
  dirtyRateBytesPerSec: number;
  /** VM: pages the kernel rewrites a second. */
  vmPagesPerSec?: number;
  /** VM: it has a raw disk it writes (moved with it). */
  disk?: boolean;
}

export interface RunPlan {
  seed: number;
  guests: GuestPlan[];
  technique: 'precopy' | 'postcopy' | 'hybrid';
  strategy: 'gang' | 'serial';
  fault: {
    kind: FaultKind;
    /** After the source lists the migration as running. */
    atMs: number;
    /** How long a link stays down, a rule stays, a process stays stopped; how long a killed agent stays dead. */
    forMs: number;
  };
}

export interface PlanOptions {
  quick: boolean;
  /** The fault kinds this campaign can inject (no link faults without namespaces, no memory-full without a tmpfs). */
  faults: readonly FaultKind[];
  /** QEMU and the test kernel are here: a third of the guests are VMs, half of those with a disk. */
  vms?: boolean;
}

/** A chaos VM: the test kernel in 64 MiB (TCG), its disk 16 MiB with 8 MiB of base content. */
export const VM_MEMORY_BYTES = 64 * 1024 * 1024;

const MiB = 1024 * 1024;

export function planRun(seed: number, options: PlanOptions): RunPlan {
  const rng = new Rng(seed);
  const count = 1 + rng.below(options.quick ? 2 : 3);
  const guests = Array.from({ length: count }, (_, i): GuestPlan => {
    const guest: GuestPlan = {
      name: `chaos${seed % 100000}-${i}`,
      kind: 'process',
      memoryBytes: (options.quick ? 32 + 16 * rng.below(3) : 64 + 32 * rng.below(4)) * MiB,
      dirtyRateBytesPerSec: rng.pick([0, 2, 8, 20]) * MiB,
    };
    // Drawn only when VMs can run, so that a campaign without them replays its seeds as before.
    if (options.vms && rng.below(3) === 0) {
      return { ...guest, kind: 'vm', memoryBytes: VM_MEMORY_BYTES, dirtyRateBytesPerSec: 0, vmPagesPerSec: rng.pick([0, 256, 1024]), disk: rng.below(2) === 0 };
    }
    return guest;
  });
  return {
    seed,
    guests,
    technique: rng.pick(['precopy', 'postcopy', 'hybrid'] as const),
    strategy: rng.pick(['gang', 'serial'] as const),
    fault: {
      kind: rng.pick(options.faults),
      // Early and late: during the rounds, around the switchover, during a post-copy. A
      // quick guest moves in 1-3 s on a quiet host: in a 200-run campaign drawn over 3 s, 143
      // faults came after the migration had ended. A full run's moment is drawn over how long
      // its guests take at ~256 MiB/s, at least 400 ms (drawn over 4 s, 120 of 200 came after
      // the end; over a 160 MiB/s estimate, 5 of the first 7).
      atMs: rng.below(options.quick ? 1500 : Math.max(400, Math.round((guests.reduce((sum, g) => sum + g.memoryBytes, 0) / (256 * MiB)) * 1000))),
      forMs: 200 + rng.below(3000),
    },
  };
}

/** One line: what the run does. */
export function describePlan(plan: RunPlan): string {
  const guests = plan.guests
    .map((g) => (g.kind === 'vm' ? `${g.name} VM ${g.memoryBytes / MiB} MiB @${g.vmPagesPerSec} pages/s${g.disk ? ' +disk' : ''}` : `${g.name} ${g.memoryBytes / MiB} MiB @${g.dirtyRateBytesPerSec / MiB} MiB/s`))
    .join(', ');
  return `seed ${plan.seed}: ${plan.technique} ${plan.guests.length > 1 ? plan.strategy : 'single'} [${guests}], fault ${plan.fault.kind} at ${plan.fault.atMs} ms for ${plan.fault.forMs} ms`;
}
