// The agent's events (`gangway events`, GET /v1/events): migrations starting, their rounds
// ending, switchovers, how they ended, guests starting and stopping. Each subscriber has a
// bounded queue: one that does not keep up is dropped with a last event that says so,
// rather than holding the agent's memory for a reader that went away.
import { ErrorCode } from '../../protocol/errors.js';
import type { HistoryEntry } from './outcome.js';

export type AgentEvent = { at: string } & (
  | { type: 'migration-started'; migrationId: string; direction: 'out' | 'in'; guest: string; peer: string }
  | {
      type: 'round-ended';
      migrationId: string;
      guest: string;
      round: number;
      pages: number;
      wireBytes: number;
      dirtyRateBytesPerSec?: number;
      predictedDowntimeMs?: number;
      converging?: boolean;
      totalEtaMs?: number;
    }
  | { type: 'switchover'; migrationId: string; guest: string; phase: string }
  | { type: 'migration-ended'; entry: HistoryEntry }
  | { type: 'guest-started'; guest: string; pid: number }
  | { type: 'guest-stopped'; guest: string }
  /** The first line of every stream (GET /v1/events): events from here on reach this subscriber. */
  | { type: 'subscribed'; agentId: string }
  /** The last event a dropped subscriber gets. */
  | { type: 'error'; error: { code: string; message: string } }
);

/** An event before the bus stamps its time. */
export type AgentEventInput = AgentEvent extends infer E ? (E extends unknown ? Omit<E, 'at'> : never) : never;

export const DEFAULT_SUBSCRIBER_QUEUE = 256;

export interface Subscriber {
  /** Takes an event; false when the subscriber's queue is full (it is then dropped). */
  push(event: AgentEvent): boolean;
  /** Called once when dropped, with the last event to give it. */
  drop(last: AgentEvent): void;
}

export class EventBus {
  private readonly subscribers = new Set<Subscriber>();

  get size(): number {
    return this.subscribers.size;
  }

  publish(input: AgentEventInput): void {
    const event = { ...input, at: new Date().toISOString() } as AgentEvent;
    for (const subscriber of this.subscribers) {
      if (subscriber.push(event)) continue;
      this.subscribers.delete(subscriber);
      subscriber.drop({
        type: 'error',
        at: event.at,
        error: { code: ErrorCode.LIMIT, message: 'this event stream fell too far behind the agent and was closed: read it faster, or run `gangway events` again' },
      });
    }
  }

  subscribe(subscriber: Subscriber): () => void {
    this.subscribers.add(subscriber);
    return () => this.subscribers.delete(subscriber);
  }
}

/**
 * A subscriber that writes NDJSON to a stream (an HTTP response): lines wait in the
 * stream's buffer while the reader is slow; past `maxQueued` events not yet flushed, it
 * is dropped.
 */
export function ndjsonSubscriber(out: { write(chunk: string, done?: () => void): boolean; end(chunk?: string): void }, maxQueued = DEFAULT_SUBSCRIBER_QUEUE): Subscriber {
  let queued = 0;
  return {
    push(event) {
      if (queued >= maxQueued) return false;
      queued++;
      out.write(`${JSON.stringify(event)}\n`, () => queued--);
      return true;
    },
    drop(last) {
      out.end(`${JSON.stringify(last)}\n`);
    },
  };
}
