// The agent's event bus: every subscriber gets each event in order, stamped; one that does
// not keep up is dropped with a last error event instead of holding memory for it.
import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { EventBus, ndjsonSubscriber, type AgentEvent, type Subscriber } from '../../agent/daemon/events.js';

function collecting(limit = Infinity): Subscriber & { events: AgentEvent[]; dropped: AgentEvent | undefined } {
  const s = {
    events: [] as AgentEvent[],
    dropped: undefined as AgentEvent | undefined,
    push(event: AgentEvent) {
      if (s.events.length >= limit) return false;
      s.events.push(event);
      return true;
    },
    drop(last: AgentEvent) {
      s.dropped = last;
    },
  };
  return s;
}

describe('EventBus', () => {
  it('gives every subscriber each event in order, with its time, until it unsubscribes', () => {
    const bus = new EventBus();
    const a = collecting();
    const b = collecting();
    bus.subscribe(a);
    const unsubscribe = bus.subscribe(b);
    bus.publish({ type: 'guest-started', guest: 'vm1', pid: 42 });
    unsubscribe();
    bus.publish({ type: 'guest-stopped', guest: 'vm1' });
    expect(a.events.map((e) => e.type)).toEqual(['guest-started', 'guest-stopped']);
    expect(b.events.map((e) => e.type)).toEqual(['guest-started']);
    expect(Date.parse(a.events[0]!.at)).not.toBeNaN();
    expect(bus.size).toBe(1);
  });

  it('drops a subscriber whose queue is full with a last error event, and the others go on', () => {
    const bus = new EventBus();
    const slow = collecting(2);
    const fast = collecting();
    bus.subscribe(slow);
    bus.subscribe(fast);
    for (let i = 0; i < 5; i++) bus.publish({ type: 'guest-stopped', guest: `vm${i}` });
    expect(slow.events).toHaveLength(2);
    expect(slow.dropped).toMatchObject({ type: 'error', error: { code: 'GANGWAY_ERR_LIMIT', message: expect.stringMatching(/fell too far behind/) } });
    expect(fast.events).toHaveLength(5);
    expect(bus.size).toBe(1);
  });

  it('an NDJSON stream nobody reads is dropped after its queue of unflushed lines, and ends with the error line', async () => {
    const bus = new EventBus();
    // highWaterMark 1 and never read: no write completes, as with a reader that stopped.
    const out = new PassThrough({ highWaterMark: 1 });
    bus.subscribe(ndjsonSubscriber(out, 3));
    for (let i = 0; i < 10; i++) bus.publish({ type: 'guest-stopped', guest: `vm${i}` });
    expect(bus.size).toBe(0);
    const text = await new Promise<string>((resolve) => {
      let all = '';
      out.on('data', (chunk: Buffer) => (all += chunk));
      out.on('end', () => resolve(all));
    });
    const lines = text.trim().split('\n').map((line) => JSON.parse(line) as AgentEvent);
    expect(lines.map((e) => (e.type === 'guest-stopped' ? e.guest : e.type))).toEqual(['vm0', 'vm1', 'vm2', 'error']);
  });

  it('a reader that keeps up is never dropped', async () => {
    const bus = new EventBus();
    const out = new PassThrough();
    const lines: string[] = [];
    out.on('data', (chunk: Buffer) => lines.push(...chunk.toString().trim().split('\n')));
    bus.subscribe(ndjsonSubscriber(out, 3));
    for (let i = 0; i < 20; i++) {
      bus.publish({ type: 'guest-stopped', guest: `vm${i}` });
      await new Promise((resolve) => setImmediate(resolve));
    }
    expect(bus.size).toBe(1);
    expect(lines).toHaveLength(20);
  });
});
