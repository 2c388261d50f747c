// The local control API: HTTP/1.1 on a unix socket in the state dir (mode 0660), JSON in
// and out. A migration answers with NDJSON: progress events, then one result or error.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { chmodSync, rmSync } from 'node:fs';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { Agent } from '../daemon.js';
import { describeZodError, MigrateRequestSchema, PlanRequestSchema, StartGuestRequest } from './schema.js';

const MAX_BODY_BYTES = 64 * 1024;

function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(`${JSON.stringify(body)}\n`);
}

function errorBody(err: unknown): { error: { code: string; message: string } } {
  if (err instanceof GangwayError) return { error: { code: err.code, message: err.message } };
  return { error: { code: ErrorCode.INTERNAL, message: err instanceof Error ? err.message : String(err) } };
}

function statusFor(err: unknown): number {
  if (!(err instanceof GangwayError)) return 500;
  switch (err.code) {
    case ErrorCode.BAD_REQUEST:
      return 400;
    case ErrorCode.GUEST_NOT_FOUND:
      return 404;
    case ErrorCode.GUEST_EXISTS:
      return 409;
    case ErrorCode.SHUTTING_DOWN:
      return 503;
    default:
      return 500;
  }
}

async function readJson(req: IncomingMessage): Promise<unknown> {
  let size = 0;
  const chunks: Buffer[] = [];
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY_BYTES) throw new GangwayError(ErrorCode.BAD_REQUEST, `request body over ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk as Buffer);
  }
  if (size === 0) return {};
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new GangwayError(ErrorCode.BAD_REQUEST, 'request body is not JSON');
  }
}

function parse<T>(schema: { safeParse(input: unknown): { success: true; data: T } | { success: false; error: import('zod').ZodError } }, input: unknown): T {
  const result = schema.safeParse(input);
  if (!result.success) throw new GangwayError(ErrorCode.BAD_REQUEST, describeZodError(result.error));
  return result.data;
}

async function route(agent: Agent, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://agent');
  const path = url.pathname;
  const method = req.method ?? 'GET';
  const guestMatch = /^\/v1\/guests\/([^/]+)(\/resume)?$/.exec(path);

  if (method === 'GET' && path === '/v1/status') return send(res, 200, agent.status());
  if (method === 'POST' && path === '/v1/guests') {
    const body = parse(StartGuestRequest, await readJson(req));
    const { name, tap, ...spec } = body;
    return send(res, 201, await agent.startGuest(name, spec, tap));
  }
  if (method === 'GET' && path === '/v1/traffic') return send(res, 200, agent.traffic.status());
  if (method === 'POST' && path === '/v1/plan') {
    const { guests, to, priority } = parse(PlanRequestSchema, await readJson(req));
    return send(res, 200, await agent.planFor(guests, priority, to));
  }
  if (guestMatch && method === 'DELETE' && !guestMatch[2]) {
    await agent.stopGuest(decodeURIComponent(guestMatch[1]!));
    return send(res, 200, { stopped: decodeURIComponent(guestMatch[1]!) });
  }
  if (guestMatch && method === 'POST' && guestMatch[2]) {
    agent.resumeGuest(decodeURIComponent(guestMatch[1]!));
    return send(res, 200, { resumed: decodeURIComponent(guestMatch[1]!) });
  }
  const cancelMatch = /^\/v1\/migrations\/([^/]+)\/cancel$/.exec(path);
  if (method === 'POST' && cancelMatch) {
    return send(res, 200, { cancelled: agent.cancelMigration(decodeURIComponent(cancelMatch[1]!)) });
  }
  if (method === 'POST' && path === '/v1/migrations') {
    const request = parse(MigrateRequestSchema, await readJson(req));
    res.writeHead(200, { 'content-type': 'application/x-ndjson' });
    const write = (event: unknown) => res.write(`${JSON.stringify(event)}\n`);
    try {
      const summary = await agent.migrate(request, (progress) => write({ type: 'progress', progress }));
      write({ type: 'result', summary });
    } catch (err) {
      write({ type: 'error', ...errorBody(err) });
    }
    res.end();
    return;
  }
  send(res, 404, { error: { code: ErrorCode.BAD_REQUEST, message: `no such endpoint: ${method} ${path}` } });
}

export function startControlServer(agent: Agent, socketPath: string): Promise<Server> {
  rmSync(socketPath, { force: true });
  const server = createServer((req, res) => {
    route(agent, req, res).catch((err) => {
      agent.log.debug({ err: (err as Error).message }, 'control request failed');
      if (!res.headersSent) send(res, statusFor(err), errorBody(err));
      else res.end();
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => {
      chmodSync(socketPath, 0o660);
      resolve(server);
    });
  });
}
