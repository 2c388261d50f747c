// A QMP client: the agent's connection to the monitor of a QEMU it drives (stop, cont,
// migrate, query-migrate, ...), over the unix socket QEMU serves with
// `-qmp unix:PATH,server=on,wait=off`.
//
// connect() reads the greeting and sends qmp_capabilities before it hands the client
// out, so a client is always in command mode. OOB is not enabled: every command gangway
// sends is an ordinary one, and without OOB QEMU answers strictly in order.
//
// Every command carries an id and its answer is matched by that id, not by order: after a
// command timed out, its late answer still arrives, and matching by id drops it instead of
// handing it to the next command.
//
// A command that times out (or is aborted) stays sent: QEMU has read it and may still run
// it, and closing the connection would not undo that. So the connection stays open, the
// late answer is dropped when it comes, and the caller can ask QEMU what happened
// (query-status, query-migrate) on the same connection, whose events it also keeps. A QEMU
// whose main loop is stuck answers nothing, and the next commands time out in their turn.
//
// Events: the client keeps the last `recentEventCount` events, each numbered. Events that
// a command causes can come before its answer (QEMU sends RESUME before `cont` returns),
// so a caller takes a mark first and waits for events since the mark:
//
//     const mark = qmp.eventMark();
//     await qmp.migrate(uri);
//     await qmp.waitForEvent('MIGRATION', { since: mark, predicate: (d) => d.status === 'completed', timeoutMs });
//
// Without `since`, waitForEvent waits for events after the call only, so that an old event
// (a STOP of an earlier pause, the 'completed' of an earlier migration) is never taken for
// the one the caller is after.
//
// The connection fails as a whole, never partly: QEMU closing it, a socket error, or
// anything that is not QMP (qmp-wire.ts) rejects every unanswered command and every
// waiter with a QmpConnectionError that names the socket and the command.
import { EventEmitter } from 'node:events';
import { createConnection } from 'node:net';
import type { Duplex } from 'node:stream';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type {
  MigrateOptions,
  MigrateSetParameters,
  MigrationCapability,
  MigrationInfo,
  QmpEventData,
  QmpEventName,
  StatusInfo,
} from './qmp-schema.js';
import { DEFAULT_MAX_LINE_BYTES, QmpDecoder, type QmpGreeting, type QmpMessage, type QmpTimestamp, type QmpVersion } from './qmp-wire.js';

export type { QmpGreeting, QmpVersion } from './qmp-wire.js';

/** For the greeting and qmp_capabilities (and, before them, for connecting). */
export const DEFAULT_CONNECT_TIMEOUT_MS = 5_000;
/** QMP commands answer in milliseconds (`migrate` returns once the migration started, not when it ends). */
export const DEFAULT_COMMAND_TIMEOUT_MS = 10_000;
/** Events kept for waitForEvent({ since }): a migration sends about a dozen; 256 covers many commands between mark and wait. */
export const DEFAULT_RECENT_EVENT_COUNT = 256;

/** QEMU answered a command with an error. `errorClass` and `desc` are QMP's, verbatim. */
export class QmpCommandError extends GangwayError {
  constructor(
    readonly socketPath: string,
    readonly command: string,
    /** QMP's error class: GenericError, CommandNotFound, DeviceNotActive, DeviceNotFound, KVMMissingCap. */
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(ErrorCode.QMP_COMMAND, `QEMU at ${socketPath} refused \`${command}\`: ${errorClass}: ${desc}`);
    this.name = 'QmpCommandError';
  }
}

/** The QMP connection could not be made, was lost or closed, or carried something that is not QMP. */
export class QmpConnectionError extends GangwayError {
  constructor(
    readonly socketPath: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(ErrorCode.QMP_CONNECTION, message, options);
    this.name = 'QmpConnectionError';
  }
}

export interface QmpEvent<Data = Record<string, unknown>> {
  /** The event's number on this connection, from 0: compare with eventMark(). */
  seq: number;
  event: string;
  data: Data;
  /** QEMU's clock when it sent the event. */
  timestamp: QmpTimestamp;
}

/** A known event, its data typed from qmp-schema.ts. */
export type KnownQmpEvent<N extends QmpEventName> = QmpEvent<QmpEventData[N]> & { event: N };

export interface QmpClientOptions {
  /**
   * For the socket to connect (a unix socket connects at once or fails), then again for the
   * greeting and qmp_capabilities.
   */
  connectTimeoutMs?: number;
  /** The default for commands given no timeoutMs. */
  commandTimeoutMs?: number;
  maxLineBytes?: number;
  recentEventCount?: number;
}

export interface CommandOptions {
  timeoutMs?: number;
  /** Abandons the command as a timeout would (it stays sent). */
  signal?: AbortSignal;
}

export interface WaitForEventOptions<Data> {
  timeoutMs: number;
  /** A mark from eventMark(): events since it count, also those already received. Default: only events after this call. */
  since?: number;
  predicate?: (data: Data) => boolean;
  signal?: AbortSignal;
}

interface PendingCommand {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  /** Clears its timer and abort listener. */
  done: () => void;
}

interface EventWaiter {
  name: string;
  since: number;
  matches: (event: QmpEvent) => boolean;
  resolve: (event: QmpEvent) => void;
  reject: (err: Error) => void;
  done: () => void;
}

type ClientEvents = {
  /** Every event QEMU sends, after the waiters it satisfies were told. */
  event: [QmpEvent];
  /** The connection ended; the reason says how. */
  close: [GangwayError];
};

export class QmpClient extends EventEmitter<ClientEvents> {
  /** Resolves (never rejects) with the reason once the connection has ended. */
  readonly closed: Promise<GangwayError>;
  private resolveClosed!: (reason: GangwayError) => void;
  private closedWith: GangwayError | undefined;
  private greetingReceived: QmpGreeting | undefined;
  private onGreeting: ((greeting: QmpGreeting) => void) | undefined;
  private readonly decoder: QmpDecoder;
  private readonly pending = new Map<number, PendingCommand>();
  /** Ids of commands that timed out or were aborted: their late answers are dropped. */
  private readonly abandoned = new Set<number>();
  private nextId = 1;
  private readonly events: QmpEvent[] = [];
  private nextEventSeq = 0;
  private readonly waiters = new Set<EventWaiter>();
  private quitSent = false;
  private readonly commandTimeoutMs: number;
  private readonly recentEventCount: number;

  /** Connects to QEMU's QMP socket at `socketPath` and negotiates; rejects with TIMEOUT or QMP_CONNECTION. */
  static async connect(socketPath: string, options: QmpClientOptions = {}): Promise<QmpClient> {
    const timeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const socket = createConnection({ path: socketPath });
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new GangwayError(ErrorCode.TIMEOUT, `could not connect to the QMP socket ${socketPath} within ${timeoutMs} ms`));
      }, timeoutMs);
      const onError = (err: Error) => {
        clearTimeout(timer);
        reject(new QmpConnectionError(socketPath, `cannot connect to the QMP socket ${socketPath}: ${err.message}`, { cause: err }));
      };
      socket.once('error', onError);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.off('error', onError);
        resolve();
      });
    });
    return QmpClient.open(socket, socketPath, options);
  }

  /**
   * Speaks QMP over a stream that is already connected (connect() uses it; tests pass a
   * fake). `socketPath` names the stream in errors.
   */
  static async open(stream: Duplex, socketPath: string, options: QmpClientOptions = {}): Promise<QmpClient> {
    const client = new QmpClient(stream, socketPath, options);
    const timeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const timer = setTimeout(() => {
      // One client at a time: QEMU accepts a second connection but greets it only when the first has gone.
      const stage = client.greetingReceived ? 'no answer to qmp_capabilities' : 'no QMP greeting (is another client connected? QEMU serves one at a time)';
      client.fail(new GangwayError(ErrorCode.TIMEOUT, `${stage} from ${socketPath} within ${timeoutMs} ms`));
    }, timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        client.onGreeting = () => resolve();
        void client.closed.then(reject);
      });
      await client.execute('qmp_capabilities', undefined, { timeoutMs: Infinity });
      return client;
    } catch (err) {
      client.fail(err instanceof GangwayError ? err : new QmpConnectionError(socketPath, String(err), { cause: err }));
      throw client.closedWith ?? err;
    } finally {
      clearTimeout(timer);
    }
  }

  private constructor(
    private readonly stream: Duplex,
    /** The socket this client talks to, as named in every error. */
    readonly socketPath: string,
    options: QmpClientOptions,
  ) {
    super();
    this.decoder = new QmpDecoder(options.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES);
    this.commandTimeoutMs = options.commandTimeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
    this.recentEventCount = options.recentEventCount ?? DEFAULT_RECENT_EVENT_COUNT;
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    stream.on('data', (chunk: Buffer | string) => this.receive(typeof chunk === 'string' ? Buffer.from(chunk) : chunk));
    stream.on('end', () => this.fail(this.lost(this.quitSent ? 'QEMU closed it after `quit`' : 'QEMU closed it')));
    stream.on('close', () => this.fail(this.lost('the socket closed')));
    stream.on('error', (err: NodeJS.ErrnoException) => {
      // QEMU's end resets the connection when it exits with our commands unread in its buffer.
      const reset = err.code === 'ECONNRESET' || err.code === 'EPIPE';
      const how = !reset ? err.message : this.quitSent ? `QEMU reset it (${err.code}) after \`quit\`` : `QEMU reset it (${err.code}): it exited or was killed`;
      this.fail(this.lost(how, err));
    });
  }

  /** The greeting QEMU sent (its version and the capabilities it offered). */
  get greeting(): QmpGreeting {
    // open() hands a client out only after the greeting.
    return this.greetingReceived!;
  }

  get version(): QmpVersion {
    return this.greeting.version;
  }

  get isOpen(): boolean {
    return this.closedWith === undefined;
  }

  /**
   * Runs `command` and resolves with QEMU's `return` value, typed T on the caller's word
   * (the helpers below give the types QEMU 7.2 returns). Rejects with QmpCommandError when
   * QEMU refuses it, TIMEOUT after timeoutMs (the connection stays open: see the top of
   * this file), ABORTED on the signal, or QmpConnectionError when the connection ends first.
   */
  execute<T = unknown>(command: string, args?: object, options: CommandOptions = {}): Promise<T> {
    if (this.closedWith) {
      return Promise.reject(new QmpConnectionError(this.socketPath, `\`${command}\` was not sent: ${this.closedWith.message}`, { cause: this.closedWith }));
    }
    if (options.signal?.aborted) return Promise.reject(this.abortError(`\`${command}\``, options.signal));
    const id = this.nextId++;
    // Serialized before anything is registered, so arguments JSON cannot carry (a BigInt) fail alone.
    // No newline after it: QEMU's JSON parser ends a command at its closing brace, and a
    // newline it has not read yet when it exits on `quit` makes the kernel reset the
    // connection (ECONNRESET) instead of closing it cleanly.
    const line = JSON.stringify({ execute: command, arguments: args, id });
    const timeoutMs = options.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const abandon = (err: GangwayError) => {
        this.pending.delete(id);
        this.abandoned.add(id);
        done();
        reject(err);
      };
      const timer = Number.isFinite(timeoutMs)
        ? setTimeout(
            () =>
              abandon(
                new GangwayError(
                  ErrorCode.TIMEOUT,
                  `QEMU at ${this.socketPath} did not answer \`${command}\` (id ${id}) within ${timeoutMs} ms; it may still run it, and its late answer will be dropped`,
                ),
              ),
            timeoutMs,
          )
        : undefined;
      const onAbort = () => abandon(this.abortError(`\`${command}\` (id ${id}), which QEMU may still run`, options.signal!));
      options.signal?.addEventListener('abort', onAbort, { once: true });
      const done = () => {
        clearTimeout(timer);
        options.signal?.removeEventListener('abort', onAbort);
      };
      this.pending.set(id, { command, resolve: resolve as (value: unknown) => void, reject, done });
      if (command === 'quit') this.quitSent = true;
      this.stream.write(line);
    });
  }

  /** A command without a helper below; its answer is unknown until the caller checks it. */
  exec(command: string, args?: object, options?: CommandOptions): Promise<unknown> {
    return this.execute<unknown>(command, args, options);
  }

  /** The number the next event will get: pass it as `since` to waitForEvent. */
  eventMark(): number {
    return this.nextEventSeq;
  }

  /** The events kept, oldest first. */
  recentEvents(): QmpEvent[] {
    return [...this.events];
  }

  /**
   * Resolves with the first event named `name` (and matching `predicate`) since the mark
   * `since`, or after this call without it. Rejects with TIMEOUT, ABORTED, QmpConnectionError
   * when the connection ends first, or when events since the mark were already dropped
   * from the buffer without one matching (the event may have been among them).
   */
  waitForEvent<N extends QmpEventName>(name: N, options: WaitForEventOptions<QmpEventData[N]>): Promise<KnownQmpEvent<N>>;
  waitForEvent(name: string, options: WaitForEventOptions<Record<string, unknown>>): Promise<QmpEvent>;
  waitForEvent(name: string, options: WaitForEventOptions<never>): Promise<QmpEvent> {
    const predicate = options.predicate as ((data: unknown) => boolean) | undefined;
    const since = options.since ?? this.nextEventSeq;
    const what = `event ${name}${predicate ? ' (matching the predicate)' : ''}`;
    const matches = (event: QmpEvent) => event.seq >= since && event.event === name && (predicate === undefined || predicate(event.data));
    try {
      const kept = this.events.find(matches);
      if (kept) return Promise.resolve(kept);
    } catch (err) {
      return Promise.reject(err);
    }
    const oldestKept = this.events[0]?.seq ?? this.nextEventSeq;
    // The caller waited past the buffer (a bug of the caller's, or a flood of events): the
    // event may have been among those dropped, so waiting on could hang until the timeout.
    if (since < oldestKept) {
      return Promise.reject(
        new GangwayError(
          ErrorCode.INTERNAL,
          `${what} since mark ${since} on ${this.socketPath}: events ${since}..${oldestKept - 1} were dropped (only the last ${this.recentEventCount} are kept)`,
        ),
      );
    }
    if (this.closedWith) return Promise.reject(this.noEvent(what, this.closedWith));
    if (options.signal?.aborted) return Promise.reject(this.abortError(what, options.signal));
    return new Promise<QmpEvent>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        done();
        reject(new GangwayError(ErrorCode.TIMEOUT, `no ${what} from QEMU at ${this.socketPath} within ${options.timeoutMs} ms`));
      }, options.timeoutMs);
      const onAbort = () => {
        this.waiters.delete(waiter);
        done();
        reject(this.abortError(what, options.signal!));
      };
      options.signal?.addEventListener('abort', onAbort, { once: true });
      const done = () => {
        clearTimeout(timer);
        options.signal?.removeEventListener('abort', onAbort);
      };
      const waiter: EventWaiter = { name: what, since, matches, resolve, reject, done };
      this.waiters.add(waiter);
    });
  }

  /** Closes the connection; unanswered commands and waiters are rejected. Resolves once the socket is closed. */
  async close(): Promise<void> {
    if (this.closedWith === undefined) {
      this.fail(new QmpConnectionError(this.socketPath, `the QMP connection to ${this.socketPath} was closed by the agent`));
    }
    if (!this.stream.closed) await new Promise((resolve) => this.stream.once('close', resolve));
  }

  // Helpers for the commands gangway uses, typed as QEMU 7.2 answers (qmp-schema.ts).

  queryStatus(options?: CommandOptions): Promise<StatusInfo> {
    return this.execute<StatusInfo>('query-status', undefined, options);
  }

  /** Pauses the vCPUs. QEMU answers once they are stopped (STOP comes before the answer). */
  async stop(options?: CommandOptions): Promise<void> {
    await this.execute('stop', undefined, options);
  }

  /** Lets the vCPUs run (RESUME comes before the answer). From 'inmigrate' it is refused until the incoming migration is done. */
  async cont(options?: CommandOptions): Promise<void> {
    await this.execute('cont', undefined, options);
  }

  /**
   * Makes QEMU exit; resolves once it closed the connection. A connection lost before the
   * answer came counts as done: QEMU answers `quit` and closes at once, and the two may
   * reach the agent in either order. Whether the process exited is for its owner to see.
   */
  async quit(options: CommandOptions = {}): Promise<void> {
    const started = performance.now();
    try {
      await this.execute('quit', undefined, options);
    } catch (err) {
      if (!(err instanceof QmpConnectionError) || !this.quitSent) throw err;
    }
    const timeoutMs = (options.timeoutMs ?? this.commandTimeoutMs) - (performance.now() - started);
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new GangwayError(ErrorCode.TIMEOUT, `QEMU at ${this.socketPath} answered \`quit\` but kept the connection open`)),
        Math.max(0, timeoutMs),
      );
    });
    try {
      await Promise.race([this.closed, timedOut]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Turns migration capabilities on or off: `{ events: true, 'postcopy-ram': true }`. Only allowed while no migration runs. */
  async migrateSetCapabilities(capabilities: Partial<Record<MigrationCapability, boolean>>, options?: CommandOptions): Promise<void> {
    const list = Object.entries(capabilities).map(([capability, state]) => ({ capability, state }));
    await this.execute('migrate-set-capabilities', { capabilities: list }, options);
  }

  async migrateSetParameters(parameters: MigrateSetParameters, options?: CommandOptions): Promise<void> {
    await this.execute('migrate-set-parameters', parameters, options);
  }

  /**
   * Starts an outgoing migration to `uri` ('tcp:HOST:PORT', 'unix:PATH', 'exec:CMD', 'fd:NAME').
   * Resolves once it started; follow it with query-migrate or MIGRATION events.
   */
  async migrate(uri: string, migrateOptions: MigrateOptions = {}, options?: CommandOptions): Promise<void> {
    await this.execute('migrate', { uri, ...migrateOptions }, options);
  }

  /** Makes a QEMU started with `-incoming defer` listen for a migration at `uri`. */
  async migrateIncoming(uri: string, options?: CommandOptions): Promise<void> {
    await this.execute('migrate-incoming', { uri }, options);
  }

  /** The migration's status and counters; `{}` before any migration. */
  queryMigrate(options?: CommandOptions): Promise<MigrationInfo> {
    return this.execute<MigrationInfo>('query-migrate', undefined, options);
  }

  private receive(chunk: Buffer): void {
    if (this.closedWith) return;
    let messages: QmpMessage[];
    try {
      messages = this.decoder.push(chunk);
    } catch (err) {
      this.fail(new QmpConnectionError(this.socketPath, `QEMU at ${this.socketPath} sent something that is not QMP: ${(err as Error).message}`, { cause: err }));
      return;
    }
    for (const message of messages) {
      this.dispatch(message);
      if (this.closedWith) return;
    }
  }

  private dispatch(message: QmpMessage): void {
    if (!this.greetingReceived && message.kind !== 'greeting') {
      return this.failNotQmp(`${message.kind === 'event' ? 'an event' : 'an answer'} before the greeting`);
    }
    switch (message.kind) {
      case 'greeting':
        if (this.greetingReceived) return this.failNotQmp('a second greeting');
        this.greetingReceived = message.greeting;
        this.onGreeting?.(message.greeting);
        return;
      case 'event':
        return this.deliver({ seq: this.nextEventSeq++, event: message.event, data: message.data, timestamp: message.timestamp });
      case 'return':
      case 'error':
        return this.answer(message);
    }
  }

  private answer(message: Extract<QmpMessage, { kind: 'return' | 'error' }>): void {
    const id = message.id;
    if (typeof id !== 'number') {
      // QEMU answers without an id only a command it could not read at all; which one is unknown.
      const what = message.kind === 'error' ? `${message.errorClass}: ${message.desc}` : JSON.stringify(message.value);
      return this.failNotQmp(`an answer without an id (${what}); this client sends an id with every command`);
    }
    if (this.abandoned.delete(id)) return;
    const command = this.pending.get(id);
    if (!command) return this.failNotQmp(`an answer to id ${id}, which no command waiting for an answer carries`);
    this.pending.delete(id);
    command.done();
    if (message.kind === 'return') command.resolve(message.value);
    else command.reject(new QmpCommandError(this.socketPath, command.command, message.errorClass, message.desc));
  }

  private deliver(event: QmpEvent): void {
    this.events.push(event);
    if (this.events.length > this.recentEventCount) this.events.shift();
    for (const waiter of this.waiters) {
      let matched: boolean;
      try {
        matched = waiter.matches(event);
      } catch (err) {
        this.waiters.delete(waiter);
        waiter.done();
        waiter.reject(err as Error);
        continue;
      }
      if (!matched) continue;
      this.waiters.delete(waiter);
      waiter.done();
      waiter.resolve(event);
    }
    this.emit('event', event);
  }

  private failNotQmp(problem: string): void {
    this.fail(new QmpConnectionError(this.socketPath, `QEMU at ${this.socketPath} sent something that is not QMP: ${problem}`));
  }

  private lost(how: string, cause?: Error): QmpConnectionError {
    const unanswered = [...this.pending.entries()].map(([id, p]) => `\`${p.command}\` (id ${id})`);
    const pending = unanswered.length ? `, with ${unanswered.join(', ')} unanswered` : '';
    return new QmpConnectionError(this.socketPath, `the QMP connection to ${this.socketPath} ended: ${how}${pending}`, { cause });
  }

  /** The rejection of a command the connection ended under: QEMU may or may not have run it. */
  private unanswered(command: string, id: number, reason: GangwayError): GangwayError {
    return new QmpConnectionError(this.socketPath, `\`${command}\` (id ${id}) got no answer, so it may or may not have run: ${reason.message}`, { cause: reason });
  }

  private noEvent(what: string, reason: GangwayError): GangwayError {
    return new QmpConnectionError(this.socketPath, `no ${what} came: ${reason.message}`, { cause: reason });
  }

  private abortError(what: string, signal: AbortSignal): GangwayError {
    const reason = signal.reason instanceof Error ? signal.reason.message : String(signal.reason);
    return new GangwayError(ErrorCode.ABORTED, `gave up waiting for ${what} from QEMU at ${this.socketPath}: ${reason}`, { cause: signal.reason });
  }

  /** Ends the connection once, with `reason`: every unanswered command and waiter is rejected. */
  private fail(reason: GangwayError): void {
    if (this.closedWith) return;
    this.closedWith = reason;
    for (const [id, command] of this.pending) {
      command.done();
      command.reject(this.unanswered(command.command, id, reason));
    }
    this.pending.clear();
    for (const waiter of this.waiters) {
      waiter.done();
      waiter.reject(this.noEvent(waiter.name, reason));
    }
    this.waiters.clear();
    this.stream.destroy();
    this.resolveClosed(reason);
    this.emit('close', reason);
  }
}
