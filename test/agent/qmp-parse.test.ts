// QMP parsing and the client's bookkeeping, without QEMU: the line decoder fed every split
// of real QEMU 7.2 output, and the client over a fake socket that answers as the test says
// (out of order, late, with garbage), which a real QEMU cannot be made to do.
import { Duplex } from 'node:stream';
import { describe, expect, test } from 'vitest';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { QmpClient, QmpCommandError, QmpConnectionError, type QmpClientOptions } from '../../agent/guest/qmp.js';
import { QmpDecoder, QmpWireError, type QmpMessage } from '../../agent/guest/qmp-wire.js';

// As qemu-system-x86_64 7.2.22 sent them.
const GREETING = '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n';
const RESUME = '{"timestamp": {"seconds": 1796464886, "microseconds": 162339}, "event": "RESUME"}\r\n';
const SHUTDOWN = '{"timestamp": {"seconds": 1796464886, "microseconds": 163671}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}\r\n';
const STATUS = '{"return": {"status": "prelaunch", "singlestep": false, "running": false}, "id": 3}\r\n';
const NOT_FOUND = '{"id": 4, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}\r\n';

const STREAM = GREETING + RESUME + STATUS + SHUTDOWN + NOT_FOUND;
const EXPECTED: QmpMessage[] = [
  {
    kind: 'greeting',
    greeting: { version: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'Debian 1:7.2+dfsg-7+deb12u18+b3' }, capabilities: ['oob'] },
  },
  { kind: 'event', event: 'RESUME', data: {}, timestamp: { seconds: 1796464886, microseconds: 162339 } },
  { kind: 'return', id: 3, value: { status: 'prelaunch', singlestep: false, running: false } },
  { kind: 'event', event: 'SHUTDOWN', data: { guest: false, reason: 'host-qmp-quit' }, timestamp: { seconds: 1796464886, microseconds: 163671 } },
  { kind: 'error', id: 4, errorClass: 'CommandNotFound', desc: 'The command nope has not been found' },
];

function decodeAll(decoder: QmpDecoder, chunks: Buffer[]): QmpMessage[] {
  return chunks.flatMap((chunk) => decoder.push(chunk));
}

describe('QmpDecoder', () => {
  test('several messages in one chunk', () => {
    const decoder = new QmpDecoder();
    expect(decoder.push(Buffer.from(STREAM))).toEqual(EXPECTED);
    expect(decoder.pendingBytes).toBe(0);
  });

  test('the stream cut at every byte offset, and twice', () => {
    const bytes = Buffer.from(STREAM);
    for (let cut = 0; cut <= bytes.length; cut++) {
      expect(decodeAll(new QmpDecoder(), [bytes.subarray(0, cut), bytes.subarray(cut)])).toEqual(EXPECTED);
    }
    for (let cut = 1; cut < bytes.length; cut += 7) {
      const second = Math.min(bytes.length, cut + 13);
      expect(decodeAll(new QmpDecoder(), [bytes.subarray(0, cut), bytes.subarray(cut, second), bytes.subarray(second)])).toEqual(EXPECTED);
    }
  });

  test('a byte at a time, a multi-byte character cut in two included', () => {
    const text = '{"return": "déjà vu ✓"}\n';
    const bytes = Buffer.from(text);
    const chunks = [...bytes].map((b) => Buffer.from([b]));
    expect(decodeAll(new QmpDecoder(), chunks)).toEqual([{ kind: 'return', id: undefined, value: 'déjà vu ✓' }]);
  });

  test('blank lines and bare \\n line ends are accepted', () => {
    expect(new QmpDecoder().push(Buffer.from('\r\n\n{"return": {}, "id": 1}\n  \r\n'))).toEqual([{ kind: 'return', id: 1, value: {} }]);
  });

  test('a line of exactly the limit is accepted; one byte more is refused', () => {
    const line = '{"return": "' + 'x'.repeat(100) + '"}';
    expect(new QmpDecoder(line.length).push(Buffer.from(`${line}\n`))).toHaveLength(1);
    expect(() => new QmpDecoder(line.length - 1).push(Buffer.from(`${line}\n`))).toThrow(
      new QmpWireError(`a line of more than ${line.length - 1} bytes (the limit) without a newline`),
    );
  });

  test('an over-long line is refused as it arrives, before its newline, holding no more than the limit', () => {
    const decoder = new QmpDecoder(1024);
    const chunk = Buffer.alloc(100, 0x20);
    let pushed = 0;
    expect(() => {
      for (;;) {
        decoder.push(chunk);
        pushed += chunk.length;
        expect(decoder.pendingBytes).toBeLessThanOrEqual(1024);
      }
    }).toThrow(QmpWireError);
    expect(pushed).toBe(1000);
  });

  test.each([
    ['invalid JSON', '{"return": {}, "id": 1\n', /^not JSON \(.*\): "\{\\"return\\": \{\}, \\"id\\": 1"$/],
    ['a pretty-printed monitor (-mon pretty=on)', '{\n', /^not JSON/],
    ['JSON that is not an object', '[1, 2]\n', /^not a JSON object: "\[1, 2\]"$/],
    ['an object that is no QMP message', '{"hello": "world"}\n', /^neither a greeting, an event nor a reply/],
    ['an event without a timestamp', '{"event": "STOP"}\n', /^an event without a name, a timestamp/],
    ['an event whose data is not an object', '{"event": "STOP", "data": 5, "timestamp": {"seconds": 1, "microseconds": 2}}\n', /^an event without/],
    ['an error without its class', '{"error": {"desc": "x"}, "id": 1}\n', /^an error reply without class and desc/],
    ['a greeting without a version', '{"QMP": {"capabilities": []}}\n', /^a greeting without version/],
  ])('refuses %s, quoting it', (_, text, message) => {
    const decoder = new QmpDecoder();
    let error: unknown;
    try {
      decoder.push(Buffer.from(text));
    } catch (err) {
      error = err;
    }
    expect(error).toBeInstanceOf(QmpWireError);
    expect((error as Error).message).toMatch(message);
  });

  test('a quote of garbage is cut at 200 characters', () => {
    const garbage = 'z'.repeat(5000);
    expect(() => new QmpDecoder().push(Buffer.from(`${garbage}\n`))).toThrow(/"z{200}\.\.\."$/);
  });
});

/** A fake QEMU end of a QMP socket: records the commands the client writes, sends what the test says. */
class FakeQemu {
  readonly commands: Array<{ execute: string; arguments?: unknown; id: number }> = [];
  private waiting: Array<() => void> = [];
  readonly stream: Duplex;

  constructor() {
    this.stream = new Duplex({
      read() {},
      write: (chunk: Buffer, _encoding, callback) => {
        // The client writes one command per write, without a separator.
        this.commands.push(JSON.parse(chunk.toString()) as FakeQemu['commands'][number]);
        for (const wake of this.waiting.splice(0)) wake();
        callback();
      },
    });
  }

  send(text: string | Buffer): void {
    this.stream.push(typeof text === 'string' ? Buffer.from(text) : text);
  }

  reply(id: number, value: unknown = {}): void {
    this.send(`${JSON.stringify({ return: value, id })}\r\n`);
  }

  /** The n-th command the client wrote (0-based), once it has. */
  async command(n: number): Promise<FakeQemu['commands'][number]> {
    while (this.commands.length <= n) await new Promise<void>((resolve) => this.waiting.push(resolve));
    return this.commands[n]!;
  }
}

/** A client over a fake QEMU, greeted and negotiated. */
async function openClient(options: QmpClientOptions = {}): Promise<{ qemu: FakeQemu; client: QmpClient }> {
  const qemu = new FakeQemu();
  const opening = QmpClient.open(qemu.stream, 'fake.sock', options);
  qemu.send(GREETING);
  const capabilities = await qemu.command(0);
  expect(capabilities.execute).toBe('qmp_capabilities');
  qemu.reply(capabilities.id);
  return { qemu, client: await opening };
}

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

describe('QmpClient over a fake socket', () => {
  test('the greeting is read even when it comes a byte at a time; the version is kept', async () => {
    const qemu = new FakeQemu();
    const opening = QmpClient.open(qemu.stream, 'fake.sock');
    for (const byte of Buffer.from(GREETING)) qemu.send(Buffer.from([byte]));
    qemu.reply((await qemu.command(0)).id);
    const client = await opening;
    expect(client.version).toEqual({ qemu: { major: 7, minor: 2, micro: 22 }, package: 'Debian 1:7.2+dfsg-7+deb12u18+b3' });
    expect(client.greeting.capabilities).toEqual(['oob']);
    await client.close();
  });

  test('answers are matched by id, not by order', async () => {
    const { qemu, client } = await openClient();
    const status = client.queryStatus();
    const version = client.exec('query-version');
    const migrate = client.queryMigrate();
    const [a, b, c] = await Promise.all([qemu.command(1), qemu.command(2), qemu.command(3)]);
    expect(new Set([a.id, b.id, c.id]).size).toBe(3);
    // Several in one chunk, in reverse order.
    qemu.send(
      `{"return": {}, "id": ${c.id}}\r\n{"return": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": ""}, "id": ${b.id}}\r\n` +
        `{"return": {"status": "running", "singlestep": false, "running": true}, "id": ${a.id}}\r\n`,
    );
    expect(await status).toEqual({ status: 'running', singlestep: false, running: true });
    expect(await version).toEqual({ qemu: { major: 7, minor: 2, micro: 22 }, package: '' });
    expect(await migrate).toEqual({});
    await client.close();
  });

  test('a QMP error keeps its class and desc, and the connection stays usable', async () => {
    const { qemu, client } = await openClient();
    const refused = client.exec('nope');
    const { id } = await qemu.command(1);
    qemu.send(`{"id": ${id}, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}\r\n`);
    const error = await rejection(refused);
    expect(error).toBeInstanceOf(QmpCommandError);
    expect(error).toMatchObject({ code: ErrorCode.QMP_COMMAND, command: 'nope', errorClass: 'CommandNotFound', desc: 'The command nope has not been found' });
    expect(error.message).toBe('QEMU at fake.sock refused `nope`: CommandNotFound: The command nope has not been found');
    const status = client.queryStatus();
    qemu.reply((await qemu.command(2)).id, { status: 'paused', singlestep: false, running: false });
    expect((await status).status).toBe('paused');
    await client.close();
  });

  test('a timed-out command is abandoned: its late answer is dropped, the next command gets its own', async () => {
    const { qemu, client } = await openClient();
    const error = await rejection(client.stop({ timeoutMs: 20 }));
    expect(error).toBeInstanceOf(GangwayError);
    expect((error as GangwayError).code).toBe(ErrorCode.TIMEOUT);
    expect(error.message).toMatch(/^QEMU at fake.sock did not answer `stop` \(id \d+\) within 20 ms; it may still run it/);
    const late = await qemu.command(1);
    const status = client.queryStatus();
    const next = await qemu.command(2);
    qemu.reply(late.id);
    qemu.reply(next.id, { status: 'paused', singlestep: false, running: false });
    expect((await status).status).toBe('paused');
    expect(client.isOpen).toBe(true);
    await client.close();
  });

  test('an aborted command is abandoned like a timed-out one', async () => {
    const { qemu, client } = await openClient();
    const controller = new AbortController();
    const pending = client.cont({ signal: controller.signal });
    const { id } = await qemu.command(1);
    controller.abort(new Error('the migration was cancelled'));
    const error = await rejection(pending);
    expect(error).toMatchObject({ code: ErrorCode.ABORTED });
    expect(error.message).toMatch(/`cont` \(id \d+\), which QEMU may still run.*: the migration was cancelled$/);
    qemu.reply(id);
    const status = client.queryStatus();
    qemu.reply((await qemu.command(2)).id, { status: 'running', singlestep: false, running: true });
    expect((await status).running).toBe(true);
    await client.close();
  });

  test.each([
    ['invalid JSON', '{"return": \r\n', /sent something that is not QMP: not JSON/],
    ['an answer to an id nobody waits for', '{"return": {}, "id": 999}\r\n', /an answer to id 999, which no command waiting for an answer carries/],
    ['an answer without an id', '{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n', /an answer without an id \(GenericError: JSON parse error\)/],
    ['a second greeting', GREETING, /a second greeting/],
  ])('%s fails the connection, rejecting the pending command and naming the socket', async (_, garbage, message) => {
    const { qemu, client } = await openClient();
    const closed: GangwayError[] = [];
    client.on('close', (reason) => closed.push(reason));
    const pending = client.queryStatus();
    await qemu.command(1);
    qemu.send(garbage);
    const error = await rejection(pending);
    expect(error).toBeInstanceOf(QmpConnectionError);
    expect(error.message).toMatch(/^`query-status` \(id \d+\) got no answer, so it may or may not have run: QEMU at fake.sock sent something that is not QMP: /);
    expect(error.message).toMatch(message);
    expect(closed).toHaveLength(1);
    expect(await client.closed).toBe(closed[0]);
    expect(client.isOpen).toBe(false);
    expect(qemu.stream.destroyed).toBe(true);
    const after = await rejection(client.queryStatus());
    expect(after.message).toMatch(/^`query-status` was not sent: QEMU at fake.sock sent something that is not QMP/);
  });

  test('an over-long line fails the connection, also before its newline', async () => {
    const { qemu, client } = await openClient({ maxLineBytes: 4096 });
    const pending = client.queryMigrate();
    await qemu.command(1);
    qemu.send('{"return": "' + 'a'.repeat(3000));
    await new Promise((resolve) => setImmediate(resolve));
    expect(client.isOpen).toBe(true);
    qemu.send('a'.repeat(3000));
    const error = await rejection(pending);
    expect(error.message).toMatch(/fake.sock sent something that is not QMP: a line of more than 4096 bytes \(the limit\) without a newline$/);
  });

  test('anything before the greeting is refused, and connecting fails with it', async () => {
    const qemu = new FakeQemu();
    const opening = QmpClient.open(qemu.stream, 'fake.sock');
    qemu.send(RESUME);
    const error = await rejection(opening);
    expect(error).toBeInstanceOf(QmpConnectionError);
    expect(error.message).toBe('QEMU at fake.sock sent something that is not QMP: an event before the greeting');
  });

  test('no greeting in time: connecting times out, naming the likely reason', async () => {
    const qemu = new FakeQemu();
    const error = await rejection(QmpClient.open(qemu.stream, 'fake.sock', { connectTimeoutMs: 30 }));
    expect(error).toMatchObject({ code: ErrorCode.TIMEOUT });
    expect(error.message).toMatch(/^no QMP greeting \(is another client connected\? QEMU serves one at a time\) from fake.sock within 30 ms$/);
    expect(qemu.stream.destroyed).toBe(true);
  });

  test('a refused qmp_capabilities fails connecting with QMP\'s error', async () => {
    const qemu = new FakeQemu();
    const opening = QmpClient.open(qemu.stream, 'fake.sock');
    qemu.send(GREETING);
    const { id } = await qemu.command(0);
    qemu.send(`{"id": ${id}, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}\r\n`);
    const error = await rejection(opening);
    expect(error).toMatchObject({ errorClass: 'CommandNotFound', command: 'qmp_capabilities' });
  });

  test('an event that comes before the answer of the command that caused it is found since a mark taken before', async () => {
    const { qemu, client } = await openClient();
    const seen: string[] = [];
    client.on('event', (event) => seen.push(event.event));
    const mark = client.eventMark();
    const cont = client.cont();
    const { id } = await qemu.command(1);
    // As QEMU does: the event first, then the answer, in one chunk.
    qemu.send(`${RESUME}{"return": {}, "id": ${id}}\r\n`);
    await cont;
    const resumed = await client.waitForEvent('RESUME', { since: mark, timeoutMs: 1000 });
    expect(resumed).toMatchObject({ seq: mark, event: 'RESUME', data: {} });
    expect(seen).toEqual(['RESUME']);
    // Without a mark, only events after the call count: the old RESUME is not taken.
    const error = await rejection(client.waitForEvent('RESUME', { timeoutMs: 30 }));
    expect(error).toMatchObject({ code: ErrorCode.TIMEOUT });
    expect(error.message).toBe('no event RESUME from QEMU at fake.sock within 30 ms');
    await client.close();
  });

  test('waitForEvent with a predicate skips events that do not match, kept or new', async () => {
    const { qemu, client } = await openClient();
    const mark = client.eventMark();
    const migration = (status: string, us: number) => `{"timestamp": {"seconds": 1, "microseconds": ${us}}, "event": "MIGRATION", "data": {"status": "${status}"}}\r\n`;
    qemu.send(migration('setup', 1) + migration('active', 2));
    await new Promise((resolve) => setImmediate(resolve));
    const completed = client.waitForEvent('MIGRATION', { since: mark, predicate: (data) => data.status === 'completed', timeoutMs: 1000 });
    qemu.send(migration('completed', 3));
    expect(await completed).toMatchObject({ seq: mark + 2, data: { status: 'completed' } });
    await client.close();
  });

  test('events dropped from the buffer since the mark are reported, not waited for in vain', async () => {
    const { qemu, client } = await openClient({ recentEventCount: 2 });
    const mark = client.eventMark();
    qemu.send(RESUME + RESUME + RESUME);
    await new Promise((resolve) => setImmediate(resolve));
    expect(client.recentEvents().map((e) => e.seq)).toEqual([mark + 1, mark + 2]);
    const error = await rejection(client.waitForEvent('STOP', { since: mark, timeoutMs: 1000 }));
    expect(error.message).toBe(`event STOP since mark ${mark} on fake.sock: events ${mark}..${mark} were dropped (only the last 2 are kept)`);
    // A match among those kept is still found.
    expect((await client.waitForEvent('RESUME', { since: mark, timeoutMs: 1000 })).seq).toBe(mark + 1);
    await client.close();
  });

  test('close() rejects every pending command and waiter, naming each', async () => {
    const { qemu, client } = await openClient();
    const status = client.queryStatus();
    const migrate = client.migrate('tcp:127.0.0.1:4444');
    const stopped = client.waitForEvent('STOP', { timeoutMs: 5000 });
    await qemu.command(2);
    expect(qemu.commands[2]).toMatchObject({ execute: 'migrate', arguments: { uri: 'tcp:127.0.0.1:4444' } });
    await client.close();
    const [e1, e2, e3] = await Promise.all([rejection(status), rejection(migrate), rejection(stopped)]);
    expect(e1.message).toMatch(/^`query-status` \(id \d+\) got no answer, so it may or may not have run: the QMP connection to fake.sock was closed by the agent$/);
    expect(e2.message).toMatch(/^`migrate` \(id \d+\) got no answer/);
    expect(e3.message).toBe('no event STOP came: the QMP connection to fake.sock was closed by the agent');
    for (const error of [e1, e2, e3]) expect(error).toMatchObject({ code: ErrorCode.QMP_CONNECTION, socketPath: 'fake.sock' });
  });

  test('QEMU closing the socket rejects the pending commands, listing them all', async () => {
    const { qemu, client } = await openClient();
    const a = client.queryStatus();
    const b = client.stop();
    await qemu.command(2);
    qemu.stream.push(null);
    const error = await rejection(a);
    expect(error.message).toMatch(/the QMP connection to fake.sock ended: QEMU closed it, with `query-status` \(id \d+\), `stop` \(id \d+\) unanswered$/);
    expect((await rejection(b)).message).toMatch(/^`stop` \(id \d+\) got no answer/);
  });

  test('the helpers send what QEMU 7.2 takes', async () => {
    const { qemu, client } = await openClient();
    const calls = [
      client.migrateSetCapabilities({ events: true, 'postcopy-ram': false }),
      client.migrateSetParameters({ 'max-bandwidth': 1 << 30, 'downtime-limit': 300, 'tls-creds': null }),
      client.migrate('unix:/tmp/m.sock', { resume: true }),
      client.migrateIncoming('tcp:0:4444'),
    ];
    for (let n = 1; n <= calls.length; n++) qemu.reply((await qemu.command(n)).id);
    await Promise.all(calls);
    expect(qemu.commands.slice(1).map(({ execute, arguments: args }) => ({ execute, arguments: args }))).toEqual([
      { execute: 'migrate-set-capabilities', arguments: { capabilities: [{ capability: 'events', state: true }, { capability: 'postcopy-ram', state: false }] } },
      { execute: 'migrate-set-parameters', arguments: { 'max-bandwidth': 1 << 30, 'downtime-limit': 300, 'tls-creds': null } },
      { execute: 'migrate', arguments: { uri: 'unix:/tmp/m.sock', resume: true } },
      { execute: 'migrate-incoming', arguments: { uri: 'tcp:0:4444' } },
    ]);
    await client.close();
  });
});
