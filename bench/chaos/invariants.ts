// What must hold after every chaos run, whatever the fault did (issue "Nothing lost, ever"):
// - each guest runs in exactly one place; where it runs nowhere, the destination reports it
//   stranded (post-copy whose pages never came) and keeps its state: never silently;
// - the guest's own check finds 0 stale pages where it runs;
// - once the agents have settled, no second copy is left anywhere (a paused source copy after
//   the destination took over, a destination copy after the source resumed);
// - once the run's guests are stopped, nothing of them is left: processes, memory files, records.
// Pure functions over what the agents and the host report, so each rule is table-tested.
import type { AgentStatus } from '../../agent/local-agent.js';

export type GuestView = AgentStatus['guests'][number];

export type Outcome = 'moved' | 'stayed' | 'stranded';

export interface Placement {
  name: string;
  source: GuestView | undefined;
  destination: GuestView | undefined;
}

export interface PlacementVerdict {
  outcome?: Outcome;
  violations: string[];
}

/** Where a guest runs after the run has settled, and what is wrong with that. */
export function judgePlacement({ name, source, destination }: Placement): PlacementVerdict {
  const violations: string[] = [];
  const views = [
    ['source', source],
    ['destination', destination],
  ] as const;
  for (const [side, view] of views) {
    if (view?.state === 'dead') violations.push(`${name}: its process at the ${side} is dead`);
  }
  const running = views.filter(([, view]) => view?.state === 'running');
  if (running.length === 2) {
    violations.push(`${name}: runs in two places (split brain)`);
    return { violations };
  }
  if (running.length === 0) {
    const stranded = views.find(([, view]) => view?.incoming?.stranded !== undefined);
    if (stranded) return { outcome: 'stranded', violations };
    const where = views.filter(([, view]) => view !== undefined).map(([side, view]) => `${view!.state} at the ${side}`);
    violations.push(`${name}: runs nowhere${where.length > 0 ? ` (${where.join(', ')})` : ' (no agent lists it)'}, and no agent reports it stranded`);
    return { violations };
  }
  const [side, found] = running[0]!;
  const view = found!;
  const other = side === 'source' ? destination : source;
  if (other !== undefined) violations.push(`${name}: runs at the ${side}, and the ${side === 'source' ? 'destination' : 'source'} still holds a ${other.state} copy`);
  if (view.incoming !== undefined) violations.push(`${name}: runs at the ${side} while it still waits for ${view.incoming.missingPages} pages`);
  if (typeof view.stalePages === 'number' && view.stalePages > 0) violations.push(`${name}: its own check found ${view.stalePages} stale pages at the ${side}`);
  if (typeof view.metaErrors === 'number' && view.metaErrors > 0) violations.push(`${name}: its own check found ${view.metaErrors} errors in its version table at the ${side}`);
  if (typeof view.deviceErrors === 'number' && view.deviceErrors > 0) violations.push(`${name}: its device state was lost or corrupt on ${view.deviceErrors} resumes at the ${side}`);
  return { outcome: side === 'source' ? 'stayed' : 'moved', violations };
}

/**
 * Whether an agent is done with the run's guests: no migration running, no guest between two
 * places. A stranded post-copy is done on both sides: the destination reports it stranded, and
 * the source's paused copy is marked interrupted (it keeps the pages the destination lacks).
 */
export function settled(status: AgentStatus, names: readonly string[]): boolean {
  if (status.migrations.some((m) => m.state === 'running' && names.includes(m.guest))) return false;
  return status.guests
    .filter((g) => names.includes(g.name))
    .every((g) => (g.outgoing === undefined || g.outgoing.interrupted !== undefined) && (g.incoming === undefined || g.incoming.stranded !== undefined));
}

export interface Leftovers {
  /** Processes whose command line names one of the run's guests: "PID cmdline". */
  processes: string[];
  /** Files of the run's guests in the memory directories. */
  memoryFiles: string[];
  /** Guest records of the run's guests in the state directories. */
  records: string[];
}

export function leftoverViolations(leftovers: Leftovers): string[] {
  return [
    ...leftovers.processes.map((p) => `left behind after the guests were stopped: process ${p}`),
    ...leftovers.memoryFiles.map((f) => `left behind after the guests were stopped: memory file ${f}`),
    ...leftovers.records.map((r) => `left behind after the guests were stopped: guest record ${r}`),
  ];
}
