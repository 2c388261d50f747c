// The local control API: HTTP/1.1, JSON in and out, on a unix socket in the state dir (0660,
// the control group) and, when asked for, on a loopback TCP port that takes a bearer token.
// A migration answers with NDJSON: progress events, then one result or error; GET /v1/events
// streams the agent's events as NDJSON until the client goes.
//
// Every request is checked before it reaches the agent, in this order: the token (TCP only,
// so a caller without it learns nothing, not even which paths exist), URL length, path (404),
// method (405, with Allow), query string (none taken), path parameters, content type (415),
// body length (413) and body schema (400, naming the field).
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { rmSync } from 'node:fs';
import type { z } from 'zod';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { Agent } from '../daemon.js';
import { GUEST_NAME_PATTERN } from '../guest/registry.js';
import { listenUnixSocket } from './access.js';
import type { ControlGroup } from './group.js';
import { describeZodError, DrainRequestSchema, MigrateRequestSchema, MigrationSettingsRequest, PlanRequestSchema, StartGuestRequest, StartVmRequest } from './schema.js';
import { bearerRefusal } from './token.js';
import { ndjsonSubscriber } from '../daemon/events.js';

export const MAX_BODY_BYTES = 64 * 1024;
export const MAX_URL_BYTES = 1024;
/** Node's default is 16 KiB; the CLI sends a few short headers. */
const MAX_HEADER_BYTES = 8 * 1024;
const MAX_CONNECTIONS = 64;

/** A refused request: its HTTP status, and the headers that go with it (Allow, WWW-Authenticate). */
class RequestError extends GangwayError {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(status === 401 ? ErrorCode.UNAUTHORIZED : ErrorCode.BAD_REQUEST, message);
  }
}

function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  res.writeHead(status, { ...headers, 'content-type': 'application/json' }).end(`${JSON.stringify(body)}\n`);
}

function errorBody(err: unknown): { error: { code: string; message: string } } {
  if (err instanceof GangwayError) return { error: { code: err.code, message: err.message } };
  return { error: { code: ErrorCode.INTERNAL, message: err instanceof Error ? err.message : String(err) } };
}

function statusFor(err: unknown): number {
  if (err instanceof RequestError) return err.status;
  if (!(err instanceof GangwayError)) return 500;
  switch (err.code) {
    case ErrorCode.BAD_REQUEST:
      return 400;
    case ErrorCode.GUEST_NOT_FOUND:
      return 404;
    case ErrorCode.GUEST_EXISTS:
      return 409;
    case ErrorCode.SHUTTING_DOWN:
    case ErrorCode.DRAINING:
      return 503;
    default:
      return 500;
  }
}

/** Untrusted text in a message: quoted, and cut short. */
function shown(text: string): string {
  return JSON.stringify(text.length > 80 ? `${text.slice(0, 80)}...` : text);
}

const PARAMS = {
  name: { pattern: GUEST_NAME_PATTERN, what: "a guest name: 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'" },
  // A migration id is a UUID; cancel, settings and postcopy also take a unique prefix of one.
  id: { pattern: /^[0-9a-fA-F-]{1,36}$/, what: 'a migration id or a prefix of one (hex digits and -, at most 36)' },
} as const;
type ParamName = keyof typeof PARAMS;
type Params = Partial<Record<ParamName, string>>;

interface Route {
  method: 'GET' | 'POST' | 'DELETE';
  /** Segments; ':name' and ':id' are parameters. */
  path: string;
  body?: z.ZodType;
  handle(agent: Agent, params: Params, body: unknown, res: ServerResponse): Promise<void> | void;
}

const ROUTES: Route[] = [
  { method: 'GET', path: '/v1/status', handle: async (agent, _p, _b, res) => send(res, 200, await agent.status()) },
  {
    method: 'POST',
    path: '/v1/guests',
    body: StartGuestRequest,
    async handle(agent, _p, body, res) {
      const { name, tap, ...spec } = body as z.infer<typeof StartGuestRequest>;
      send(res, 201, await agent.startGuest(name, spec, tap));
    },
  },
  {
    method: 'POST',
    path: '/v1/vms',
    body: StartVmRequest,
    async handle(agent, _p, body, res) {
      const { name, tap, ...request } = body as z.infer<typeof StartVmRequest>;
      send(res, 201, await agent.startVm(name, request, tap));
    },
  },
  { method: 'GET', path: '/v1/traffic', handle: (agent, _p, _b, res) => send(res, 200, agent.traffic.status()) },
  {
    method: 'POST',
    path: '/v1/plan',
    body: PlanRequestSchema,
    async handle(agent, _p, body, res) {
      const { strategy, ...request } = body as z.infer<typeof PlanRequestSchema>;
      send(res, 200, await agent.planFor({ ...request, strategy: strategy ?? 'gang' }));
    },
  },
  {
    method: 'DELETE',
    path: '/v1/guests/:name',
    async handle(agent, { name }, _b, res) {
      await agent.stopGuest(name!);
      send(res, 200, { stopped: name });
    },
  },
  {
    method: 'POST',
    path: '/v1/guests/:name/resume',
    async handle(agent, { name }, _b, res) {
      await agent.resumeGuest(name!);
      send(res, 200, { resumed: name });
    },
  },
  {
    method: 'POST',
    path: '/v1/migrations',
    body: MigrateRequestSchema,
    async handle(agent, _p, body, res) {
      res.writeHead(200, { 'content-type': 'application/x-ndjson' });
      const write = (event: unknown) => res.write(`${JSON.stringify(event)}\n`);
      try {
        const summary = await agent.migrate(
          body as z.infer<typeof MigrateRequestSchema>,
          (progress) => write({ type: 'progress', progress }),
          (forecast) => write({ type: 'forecast', forecast }),
        );
        write({ type: 'result', summary });
      } catch (err) {
        write({ type: 'error', ...errorBody(err) });
      }
      res.end();
    },
  },
  { method: 'GET', path: '/v1/history', handle: (agent, _p, _b, res) => send(res, 200, agent.migrationHistory()) },
  {
    method: 'GET',
    path: '/v1/events',
    // Long-lived: the request is in, so requestTimeout no longer applies; the stream ends
    // when the client goes, or when it falls behind (events.ts).
    handle(agent, _p, _b, res) {
      res.writeHead(200, { 'content-type': 'application/x-ndjson' });
      const unsubscribe = agent.events.subscribe(ndjsonSubscriber(res));
      // The first line says the stream is on: a client that waits for it misses no later event.
      res.write(`${JSON.stringify({ type: 'subscribed', at: new Date().toISOString(), agentId: agent.id })}\n`);
      return new Promise<void>((resolve) => res.once('close', () => resolve(void unsubscribe())));
    },
  },
  {
    method: 'POST',
    path: '/v1/drain',
    body: DrainRequestSchema,
    async handle(agent, _p, body, res) {
      res.writeHead(200, { 'content-type': 'application/x-ndjson' });
      const write = (event: unknown) => res.write(`${JSON.stringify(event)}\n`);
      try {
        write({ type: 'result', summary: await agent.drainHost(body as z.infer<typeof DrainRequestSchema>, write) });
      } catch (err) {
        write({ type: 'error', ...errorBody(err) });
      }
      res.end();
    },
  },
  {
    method: 'POST',
    path: '/v1/drain/cancel',
    handle(agent, _p, _b, res) {
      if (!agent.cancelDrain()) throw new GangwayError(ErrorCode.BAD_REQUEST, 'no drain is running');
      send(res, 200, { cancelled: true });
    },
  },
  {
    method: 'POST',
    path: '/v1/migrations/:id/cancel',
    handle: (agent, { id }, _b, res) => send(res, 200, { cancelled: agent.cancelMigration(id!) }),
  },
  {
    method: 'POST',
    path: '/v1/migrations/:id/settings',
    body: MigrationSettingsRequest,
    handle: async (agent, { id }, body, res) => send(res, 200, await agent.changeMigrationSettings(id!, body as z.infer<typeof MigrationSettingsRequest>)),
  },
  {
    method: 'POST',
    path: '/v1/migrations/:id/postcopy',
    handle: (agent, { id }, _b, res) => send(res, 200, agent.startPostcopy(id!)),
  },
];

/** The route's raw parameters if `segments` fit its path (any method), else undefined. */
function matchPath(route: Route, segments: string[]): Record<string, string> | undefined {
  const parts = route.path.split('/');
  if (parts.length !== segments.length) return undefined;
  const params: Record<string, string> = {};
  for (const [i, part] of parts.entries()) {
    if (part.startsWith(':')) {
      if (segments[i] === '') return undefined;
      params[part.slice(1)] = segments[i]!;
    } else if (part !== segments[i]) return undefined;
  }
  return params;
}

function decodeParams(raw: Record<string, string>): Params {
  const params: Params = {};
  for (const [key, encoded] of Object.entries(raw) as [ParamName, string][]) {
    let value: string;
    try {
      value = decodeURIComponent(encoded);
    } catch {
      throw new RequestError(400, `path parameter ${shown(encoded)} is not valid percent-encoding`);
    }
    const { pattern, what } = PARAMS[key];
    if (!pattern.test(value)) throw new RequestError(400, `path parameter ${shown(value)} is not ${what}`);
    params[key] = value;
  }
  return params;
}

/**
 * The body, up to MAX_BODY_BYTES. Not `for await`: leaving that loop early destroys the
 * socket, and the client would get a reset instead of the 413 that says why.
 */
function readBody(req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) return void chunks.push(chunk);
      req.off('data', onData).pause();
      reject(new RequestError(413, `request body is over the limit of ${MAX_BODY_BYTES} bytes`, { connection: 'close' }));
    };
    req.on('data', onData);
    req.once('end', () => resolve(Buffer.concat(chunks)));
    req.once('error', reject);
  });
}

async function readJson(req: IncomingMessage, where: string): Promise<unknown> {
  const type = req.headers['content-type'];
  if (!type || !/^application\/json\s*(;|$)/i.test(type)) {
    throw new RequestError(415, `${where} takes a JSON body: send content-type application/json (got ${type === undefined ? 'none' : shown(type)})`);
  }
  const declared = req.headers['content-length'];
  if (declared !== undefined && Number(declared) > MAX_BODY_BYTES) {
    throw new RequestError(413, `request body of ${declared} bytes is over the limit of ${MAX_BODY_BYTES} bytes`, { connection: 'close' });
  }
  const body = await readBody(req);
  if (body.length === 0) throw new RequestError(400, `${where} takes a JSON object; the body is empty`);
  try {
    return JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw new RequestError(400, `request body is not JSON: ${(err as Error).message.slice(0, 120)}`);
  }
}

function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return (length !== undefined && length !== '0') || req.headers['transfer-encoding'] !== undefined;
}

async function route(agent: Agent, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const target = req.url ?? '/';
  if (Buffer.byteLength(target) > MAX_URL_BYTES) throw new RequestError(414, `request target is over ${MAX_URL_BYTES} bytes`);
  const url = new URL(target, 'http://agent');
  const method = req.method ?? 'GET';
  const segments = url.pathname.split('/');
  const candidates = ROUTES.map((r) => ({ route: r, raw: matchPath(r, segments) })).filter((c) => c.raw !== undefined);
  if (candidates.length === 0) throw new RequestError(404, `no such endpoint: ${shown(url.pathname)} (the API is /v1/status, /v1/guests, /v1/migrations, /v1/traffic, /v1/plan, /v1/history, /v1/events, /v1/drain)`);
  const chosen = candidates.find((c) => c.route.method === method);
  if (!chosen) {
    const allow = candidates.map((c) => c.route.method).join(', ');
    throw new RequestError(405, `${url.pathname} takes ${allow}, not ${shown(method)}`, { allow });
  }
  const where = `${method} ${chosen.route.path}`;
  if (url.search !== '') throw new RequestError(400, `${where} takes no query parameters (got ${shown(url.search)})`);
  const params = decodeParams(chosen.raw!);
  let body: unknown;
  if (chosen.route.body) {
    const result = chosen.route.body.safeParse(await readJson(req, where));
    if (!result.success) throw new RequestError(400, describeZodError(result.error));
    body = result.data;
  } else if (hasBody(req)) {
    throw new RequestError(400, `${where} takes no request body`);
  }
  await chosen.route.handle(agent, params, body, res);
}

interface ListenerOptions {
  /** The TCP port's token; the unix socket has none (its mode and group are the check). */
  token?: string;
}

export function createControlServer(agent: Agent, options: ListenerOptions): Server {
  const server = createServer({ maxHeaderSize: MAX_HEADER_BYTES, headersTimeout: 10_000, requestTimeout: 30_000 }, (req, res) => {
    const fail = (err: unknown) => {
      agent.log.debug({ err: (err as Error).message, method: req.method, url: req.url?.slice(0, 200) }, 'control request refused');
      if (!res.headersSent) send(res, statusFor(err), errorBody(err), err instanceof RequestError ? err.headers : {});
      else res.end();
    };
    if (options.token !== undefined) {
      const refusal = bearerRefusal(req.headers.authorization, options.token);
      if (refusal) {
        agent.metrics.controlUnauthorized.inc({ reason: refusal });
        const message =
          refusal === 'missing'
            ? 'this control port needs Authorization: Bearer TOKEN, the token in the agent\'s control.tokenFile (gangway ... --control HOST:PORT --token-file FILE)'
            : 'the bearer token does not match the agent\'s control.tokenFile';
        return fail(new RequestError(401, message, { 'www-authenticate': 'Bearer realm="gangway"', connection: 'close' }));
      }
    }
    route(agent, req, res).catch(fail);
  });
  server.maxConnections = MAX_CONNECTIONS;
  return server;
}

/** The control API on `socketPath` (replacing a stale socket), 0660, owned by the control group. */
export async function startControlServer(agent: Agent, socketPath: string, group?: ControlGroup): Promise<Server> {
  rmSync(socketPath, { force: true });
  const server = createControlServer(agent, {});
  await listenUnixSocket(server, socketPath, group);
  return server;
}

/** The control API on a loopback TCP port (the config allows nothing else); every request needs `token`. */
export function startControlPort(agent: Agent, host: string, port: number, token: string): Promise<Server> {
  const server = createControlServer(agent, { token });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve(server);
    });
  });
}
