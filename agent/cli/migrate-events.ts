// `gangway migrate --json-events`: the agent's events of the guests this command migrates,
// as NDJSON on stdout while they run. The summary follows as the last line, once the
// events of the migrations' ends are out (they travel on another connection than the
// result, and a script reads the result as the end).
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { ControlClient } from '../control/client.js';
import type { AgentEvent } from '../daemon/events.js';

/** How long the result waits for the events of the migrations' ends. */
const END_EVENTS_WAIT_MS = 3000;

export interface MigrationEvents {
  /** Waits (bounded) for the end events of `migrationIds`, then stops printing and closes the stream. */
  ended(migrationIds: readonly string[]): Promise<void>;
}

function concerns(event: AgentEvent, guests: readonly string[]): boolean {
  switch (event.type) {
    case 'migration-started':
      return event.direction === 'out' && guests.includes(event.guest);
    case 'round-ended':
    case 'switchover':
      return guests.includes(event.guest);
    case 'migration-ended':
      return event.entry.direction === 'out' && guests.includes(event.entry.guest);
    case 'error':
      return true;
    default:
      return false;
  }
}

/** Subscribes (returns once the agent confirmed it) and prints the events of `guests` from then on. */
export async function followMigrationEvents(client: ControlClient, guests: readonly string[]): Promise<MigrationEvents> {
  const abort = new AbortController();
  const stream = client.stream('GET', '/v1/events', undefined, abort.signal);
  const first = await stream.next();
  if (first.done || first.value.type !== 'subscribed') throw new GangwayError(ErrorCode.INTERNAL, 'the agent did not start its event stream with a subscribed event');
  const endedIds = new Set<string>();
  let printing = true;
  let onEnd: (() => void) | undefined;
  const reading = (async () => {
    for await (const raw of stream) {
      const event = raw as AgentEvent;
      if (!printing) return;
      if (!concerns(event, guests)) continue;
      console.log(JSON.stringify(event));
      if (event.type === 'migration-ended') {
        endedIds.add(event.entry.migrationId);
        onEnd?.();
      }
    }
  })().catch(() => {});
  return {
    async ended(migrationIds) {
      const all = () => migrationIds.every((id) => endedIds.has(id));
      if (!all()) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, END_EVENTS_WAIT_MS);
          onEnd = () => {
            if (!all()) return;
            clearTimeout(timer);
            resolve();
          };
        });
      }
      printing = false;
      abort.abort();
      await reading;
    },
  };
}
