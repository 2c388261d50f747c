// The CLI's side of the control API: requests to the local agent's unix socket, or to its
// loopback TCP control port with the bearer token from a token file.
import { request, type IncomingMessage } from 'node:http';
import { lstatSync } from 'node:fs';
import { lookup } from 'node:dns/promises';
import { networkInterfaces } from 'node:os';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { controlSocketPath, type MigrateRequest } from '../daemon.js';
import { isLoopbackHost } from '../peer/tls.js';
import { readTokenFile } from './token.js';
import { groupNameOf } from './group.js';
import type { GroupSummary } from '../migration/group-summary.js';
import type { MigrationProgress } from '../migration/source.js';
import type { OptionSummary } from '../planner/choose.js';
import type { SettingsChange } from '../migration/mid-flight.js';
import type { PostcopyAnswer, SettingsAnswer } from '../daemon/outbound.js';

/** A migrate request with the CLI's defaults for what is not given. */
export type MigrateCall = Pick<MigrateRequest, 'guests' | 'to'> & Partial<MigrateRequest>;

export const MIGRATE_DEFAULTS = {
  strategy: 'gang',
  dedup: true,
  downtimeMs: 300,
  force: false,
  maxRounds: 30,
  maxBytesFactor: 3,
  codec: 'auto',
} as const satisfies Partial<MigrateRequest>;

/** Where the CLI reaches the agent: its state dir's unix socket, or a loopback TCP port with a token. */
export type ControlEndpoint =
  | { kind: 'socket'; stateDir: string }
  | { kind: 'tcp'; host: string; port: number; token: string; tokenFile: string };

/** A response is the agent's JSON; anything longer is not from a gangway agent. */
const MAX_RESPONSE_BYTES = 64 * 1024 * 1024;

/** HOST:PORT of a control port; loopback only, as the agent listens (a token never leaves the host). */
export function parseControlAddress(text: string): { host: string; port: number } {
  const match = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(text);
  const port = Number(match?.[2]);
  if (!match || port < 1 || port > 65535) throw new GangwayError(ErrorCode.BAD_REQUEST, `control address ${JSON.stringify(text.slice(0, 100))} must be HOST:PORT, e.g. 127.0.0.1:7400`);
  const host = match[1]!.replace(/^\[|\]$/g, '');
  if (!isLoopbackHost(host)) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `control address ${text} is not loopback: the control port listens on loopback only (remote control would need TLS and an allowlist, which it does not offer)`);
  }
  return { host, port };
}

/** An outgoing migration as the agent's status lists it while it runs. */
export interface OutgoingMigration {
  migrationId: string;
  guest: string;
  to: string;
  startedAt: string;
  /** As of its last progress event; undefined before the first. */
  phase: MigrationProgress['phase'] | undefined;
}

/** What the agent answered when asked to cancel one migration. */
export type CancelAnswer = { migrationId: string; guest: string } & ({ cancelled: true } | { cancelled: false; message: string });

/**
 * The migrations one `gangway migrate` started, and cancelling them (Ctrl-C). Their ids come
 * from the progress events and, for a migration that has sent none yet, from the agent's
 * status: a running outgoing migration of a named guest, started since the request (a guest
 * is in at most one outgoing migration at a time).
 */
export class StartedMigrations {
  /** migrationId → guest, in the order they became known. */
  readonly ids = new Map<string, string>();
  private readonly asked = new Set<string>();
  /** Taken before the request is sent, so that its migrations are never older. */
  private readonly since = new Date().toISOString();

  constructor(
    private readonly client: ControlClient,
    readonly guests: readonly string[],
  ) {}

  note(progress: Pick<MigrationProgress, 'migrationId' | 'guest'>): void {
    this.ids.set(progress.migrationId, progress.guest);
  }

  /** Adds the running migrations the agent lists (those that have not reported progress yet). */
  async refresh(): Promise<void> {
    for (const m of await this.client.runningOutgoing(this.guests, this.since)) this.ids.set(m.migrationId, m.guest);
  }

  /** Asks the agent to cancel each known migration not asked about yet; what it answered for each. */
  async cancelNew(): Promise<CancelAnswer[]> {
    const answers: CancelAnswer[] = [];
    for (const [migrationId, guest] of this.ids) {
      if (this.asked.has(migrationId)) continue;
      this.asked.add(migrationId);
      try {
        await this.client.cancel(migrationId);
        answers.push({ migrationId, guest, cancelled: true });
      } catch (err) {
        answers.push({ migrationId, guest, cancelled: false, message: err instanceof Error ? err.message : String(err) });
      }
    }
    return answers;
  }
}

/** HOST and PORT of an address as the agent writes it ("127.0.0.1:7401", "::1:7401", "[::1]:7401"). */
function splitAddress(address: string): { host: string; port: number } {
  const colon = address.lastIndexOf(':');
  return { host: address.slice(0, colon).replace(/^\[|\]$/g, ''), port: Number(address.slice(colon + 1)) };
}

async function addressesOf(host: string): Promise<string[]> {
  try {
    return (await lookup(host, { all: true })).map((a) => a.address);
  } catch {
    // A name that does not resolve is not this agent; dialling it reports why.
    return [];
  }
}

export class ControlClient {
  readonly endpoint: ControlEndpoint;
  /** The unix socket, for a socket endpoint. */
  readonly socketPath: string | undefined;

  /** A state dir (its control.sock) or an endpoint. */
  constructor(target: string | ControlEndpoint) {
    this.endpoint = typeof target === 'string' ? { kind: 'socket', stateDir: target } : target;
    this.socketPath = this.endpoint.kind === 'socket' ? controlSocketPath(this.endpoint.stateDir) : undefined;
  }

  /** The agent's TCP control port at `address`, with the token read from `tokenFile`. */
  static tcp(address: string, tokenFile: string): ControlClient {
    const { host, port } = parseControlAddress(address);
    return new ControlClient({ kind: 'tcp', host, port, token: readTokenFile(tokenFile), tokenFile });
  }

  private get where(): string {
    const e = this.endpoint;
    return e.kind === 'socket' ? this.socketPath! : `control port ${e.host.includes(':') ? `[${e.host}]` : e.host}:${e.port}`;
  }

  /**
   * The control group, as the socket (or, when this user cannot look inside, the state dir)
   * carries it. The agent gives both to control.group, or keeps its own group.
   */
  private controlGroup(): { gid: number; name: string | undefined } | undefined {
    for (const path of [this.socketPath!, (this.endpoint as { stateDir: string }).stateDir]) {
      try {
        const { gid } = lstatSync(path);
        return { gid, name: groupNameOf(gid) };
      } catch {}
    }
    return undefined;
  }

  /** What to do when this user may not use the control socket. */
  private permissionAdvice(): string {
    const group = this.controlGroup();
    const which = group === undefined ? 'the group the agent was given' : group.name === undefined ? `the group with gid ${group.gid}` : `group ${group.name} (gid ${group.gid})`;
    return (
      `permission denied: the agent's state dir and control socket are private to it and its control group. ` +
      `Run as the agent's user, join ${which} (the agent's control.group, --control-group; log in again after joining), ` +
      'or use the TCP control port with its token (--control, --token-file)'
    );
  }

  private open(method: string, path: string, body?: unknown, signal?: AbortSignal) {
    const e = this.endpoint;
    if (e.kind === 'socket') {
      // A state dir this user cannot enter hides the socket: that is not "no agent".
      let missing = false;
      try {
        missing = lstatSync(this.socketPath!, { throwIfNoEntry: false }) === undefined;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EACCES') throw new GangwayError(ErrorCode.PEER_UNREACHABLE, `cannot reach the agent at ${this.socketPath}: ${this.permissionAdvice()}`);
        throw err;
      }
      if (missing) {
        throw new GangwayError(
          ErrorCode.PEER_UNREACHABLE,
          `no agent is running with state dir ${e.stateDir} (${this.socketPath} does not exist): start one with \`gangway agent --state-dir ${e.stateDir}\`, or pass --state-dir`,
        );
      }
    }
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const headers: Record<string, string | number> = payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {};
    if (e.kind === 'tcp') headers.authorization = `Bearer ${e.token}`;
    const target = e.kind === 'socket' ? { socketPath: this.socketPath! } : { host: e.host, port: e.port };
    return new Promise<IncomingMessage>((resolve, reject) => {
      // A connection per request (agent: false): a kept-alive one that the agent closed while
      // this process was busy (its keepAliveTimeout is 5 s) fails the next request with EPIPE.
      const req = request({ ...target, agent: false, method, path, headers, ...(signal ? { signal } : {}) }, resolve);
      req.once('error', (err: NodeJS.ErrnoException) => {
        if (e.kind === 'socket' && err.code === 'EACCES') {
          reject(new GangwayError(ErrorCode.PEER_UNREACHABLE, `cannot talk to the agent at ${this.where}: ${this.permissionAdvice()}`));
          return;
        }
        const hint = e.kind === 'tcp' && err.code === 'ECONNREFUSED' ? ': no agent listens there (is its control.listen set to this address?)' : '';
        reject(new GangwayError(ErrorCode.PEER_UNREACHABLE, `cannot talk to the agent at ${this.where}: ${err.message}${hint}`));
      });
      req.end(payload);
    });
  }

  private async readAll(res: IncomingMessage): Promise<string> {
    let text = '';
    for await (const chunk of res) {
      text += chunk;
      if (text.length > MAX_RESPONSE_BYTES) {
        res.destroy();
        throw new GangwayError(ErrorCode.INTERNAL, `the answer from ${this.where} is over ${MAX_RESPONSE_BYTES} bytes: is a gangway agent listening there?`);
      }
    }
    return text;
  }

  private parse<T>(text: string, res: IncomingMessage): T & { error?: { code: string; message: string } } {
    try {
      return JSON.parse(text) as T & { error?: { code: string; message: string } };
    } catch {
      throw new GangwayError(ErrorCode.INTERNAL, `${this.where} answered ${res.statusCode} with something that is not JSON: is a gangway agent listening there?`);
    }
  }

  async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.open(method, path, body);
    const parsed = this.parse<T>(await this.readAll(res), res);
    if ((res.statusCode ?? 500) >= 400 || parsed.error) {
      throw new GangwayError((parsed.error?.code ?? ErrorCode.INTERNAL) as never, parsed.error?.message ?? `agent answered ${res.statusCode}`);
    }
    return parsed;
  }

  /** POST /v1/migrations: progress events to `onProgress`, then the summary (or the error, thrown). */
  async migrate(call: MigrateCall, onProgress?: (progress: MigrationProgress) => void, onForecast?: (forecast: OptionSummary) => void): Promise<GroupSummary> {
    let summary: GroupSummary | undefined;
    for await (const event of this.stream('POST', '/v1/migrations', { ...MIGRATE_DEFAULTS, ...call })) {
      if (event.type === 'forecast') onForecast?.(event.forecast as OptionSummary);
      if (event.type === 'progress') onProgress?.(event.progress as MigrationProgress);
      if (event.type === 'result') summary = event.summary as GroupSummary;
      if (event.type === 'error') {
        const error = event.error as { code: string; message: string };
        throw new GangwayError(error.code as never, error.message);
      }
    }
    if (!summary) throw new GangwayError(ErrorCode.INTERNAL, 'the agent ended the migration without a result');
    return summary;
  }

  /**
   * Refuses a --to that names this agent itself by another spelling (localhost:7401 for
   * 127.0.0.1:7401, or any local address when it listens on all of them): it would dial
   * itself and refuse its own offer as a duplicate migration id.
   */
  async refuseSelf(to: string): Promise<void> {
    const status = await this.call<{ agent: { listen: string } }>('GET', '/v1/status');
    const listen = splitAddress(status.agent.listen);
    const target = splitAddress(to);
    if (listen.port !== target.port) return;
    const wildcard = listen.host === '0.0.0.0' || listen.host === '::';
    const local = wildcard
      ? Object.values(networkInterfaces())
          .flat()
          .map((i) => i!.address)
      : await addressesOf(listen.host);
    const targets = await addressesOf(target.host);
    if (targets.some((address) => local.includes(address) || (wildcard && isLoopbackHost(address)))) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `--to ${to} is this agent itself (it listens on ${status.agent.listen}): give the destination agent's address`);
    }
  }

  /** The agent's running outgoing migrations of `guests` that started at `since` (ISO time) or later. */
  async runningOutgoing(guests: readonly string[], since: string): Promise<OutgoingMigration[]> {
    type Listed = Omit<OutgoingMigration, 'phase'> & { direction: string; state: string; queuedAt?: string; progress?: { phase: OutgoingMigration['phase'] } };
    const status = await this.call<{ migrations: Listed[] }>('GET', '/v1/status');
    // A queued one (waiting for a slot) is this command's too, and is cancelled like a running one.
    return status.migrations
      .filter((m) => m.direction === 'out' && (m.state === 'running' || m.state === 'queued') && guests.includes(m.guest) && (m.queuedAt ?? m.startedAt) >= since)
      .map(({ migrationId, guest, to, startedAt, progress }) => ({ migrationId, guest, to, startedAt, phase: progress?.phase }));
  }

  /** POST /v1/migrations/ID/cancel: the id cancelled, or the agent's refusal (thrown). */
  async cancel(idOrPrefix: string): Promise<string> {
    return (await this.call<{ cancelled: string }>('POST', `/v1/migrations/${encodeURIComponent(idOrPrefix)}/cancel`)).cancelled;
  }

  /** POST /v1/migrations/ID/settings (gangway migrate-set): the settings before and after, or the agent's refusal (thrown). */
  async changeSettings(idOrPrefix: string, change: SettingsChange): Promise<SettingsAnswer> {
    return this.call<SettingsAnswer>('POST', `/v1/migrations/${encodeURIComponent(idOrPrefix)}/settings`, change);
  }

  /** POST /v1/migrations/ID/postcopy (gangway postcopy): post-copy at the next round boundary, or the agent's refusal (thrown). */
  async startPostcopy(idOrPrefix: string): Promise<PostcopyAnswer> {
    return this.call<PostcopyAnswer>('POST', `/v1/migrations/${encodeURIComponent(idOrPrefix)}/postcopy`);
  }

  /** A streaming call: yields each NDJSON event (until `signal` aborts it, for a stream that never ends by itself). */
  async *stream(method: string, path: string, body?: unknown, signal?: AbortSignal): AsyncGenerator<Record<string, unknown>> {
    const res = await this.open(method, path, body, signal);
    if ((res.statusCode ?? 500) >= 400) {
      const parsed = this.parse<object>(await this.readAll(res), res);
      throw new GangwayError((parsed.error?.code ?? ErrorCode.INTERNAL) as never, parsed.error?.message ?? `agent answered ${res.statusCode}`);
    }
    let buffered = '';
    try {
      for await (const chunk of res) {
        buffered += chunk;
        if (buffered.length > MAX_RESPONSE_BYTES) {
          res.destroy();
          throw new GangwayError(ErrorCode.INTERNAL, `an event from ${this.where} is over ${MAX_RESPONSE_BYTES} bytes: is a gangway agent listening there?`);
        }
        let newline: number;
        while ((newline = buffered.indexOf('\n')) >= 0) {
          const line = buffered.slice(0, newline);
          buffered = buffered.slice(newline + 1);
          if (line.trim()) yield this.parse<Record<string, unknown>>(line, res);
        }
      }
    } catch (err) {
      if (err instanceof GangwayError || signal?.aborted) throw err;
      // The connection was cut mid-answer (Node says only "aborted"): the agent stopped or
      // restarted. What it did with the request is in its records, not in this stream.
      throw new GangwayError(
        ErrorCode.PEER_GONE,
        `the agent at ${this.where} closed the connection before it finished answering (${(err as Error).message}): it stopped or restarted. ` +
          'Once it answers again, `gangway status` and `gangway history` say what became of the request',
        { cause: err },
      );
    }
  }
}
