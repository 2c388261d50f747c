// The CLI's side of the control API: requests to the local agent's unix socket.
import { request } from 'node:http';
import { existsSync } from 'node:fs';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { controlSocketPath, type MigrateRequest } from '../daemon.js';
import type { GroupSummary } from '../migration/group-summary.js';
import type { MigrationProgress } from '../migration/source.js';

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

export class ControlClient {
  readonly socketPath: string;

  constructor(readonly stateDir: string) {
    this.socketPath = controlSocketPath(stateDir);
  }

  private open(method: string, path: string, body?: unknown) {
    if (!existsSync(this.socketPath)) {
      throw new GangwayError(
        ErrorCode.PEER_UNREACHABLE,
        `no agent is running with state dir ${this.stateDir} (${this.socketPath} does not exist): start one with \`gangway agent --state-dir ${this.stateDir}\`, or pass --state-dir`,
      );
    }
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise<import('node:http').IncomingMessage>((resolve, reject) => {
      const req = request(
        {
          socketPath: this.socketPath,
          method,
          path,
          headers: payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {},
        },
        resolve,
      );
      req.once('error', (err) =>
        reject(new GangwayError(ErrorCode.PEER_UNREACHABLE, `cannot talk to the agent at ${this.socketPath}: ${err.message}`)),
      );
      req.end(payload);
    });
  }

  async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.open(method, path, body);
    let text = '';
    for await (const chunk of res) text += chunk;
    const parsed = JSON.parse(text) as T & { error?: { code: string; message: string } };
    if ((res.statusCode ?? 500) >= 400 || parsed.error) {
      throw new GangwayError((parsed.error?.code ?? ErrorCode.INTERNAL) as never, parsed.error?.message ?? `agent answered ${res.statusCode}`);
    }
    return parsed;
  }

  /** POST /v1/migrations: progress events to `onProgress`, then the summary (or the error, thrown). */
  async migrate(call: MigrateCall, onProgress?: (progress: MigrationProgress) => void): Promise<GroupSummary> {
    let summary: GroupSummary | undefined;
    for await (const event of this.stream('POST', '/v1/migrations', { ...MIGRATE_DEFAULTS, ...call })) {
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

  /** A streaming call: yields each NDJSON event. */
  async *stream(method: string, path: string, body?: unknown): AsyncGenerator<Record<string, unknown>> {
    const res = await this.open(method, path, body);
    if ((res.statusCode ?? 500) >= 400) {
      let text = '';
      for await (const chunk of res) text += chunk;
      const parsed = JSON.parse(text) as { error?: { code: string; message: string } };
      throw new GangwayError((parsed.error?.code ?? ErrorCode.INTERNAL) as never, parsed.error?.message ?? `agent answered ${res.statusCode}`);
    }
    let buffered = '';
    for await (const chunk of res) {
      buffered += chunk;
      let newline: number;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        if (line.trim()) yield JSON.parse(line) as Record<string, unknown>;
      }
    }
  }
}
