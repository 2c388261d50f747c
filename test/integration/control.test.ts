// The control API's access and validation: the socket is 0660 and owned by the control group
// from the moment it exists, the state dir is not open to others, the loopback TCP port takes
// only requests with the token, and every malformed request gets a bounded, clear refusal
// (right status, a message that says what is wrong) while the agent carries on.
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { execa } from 'execa';
import { listenUnixSocket } from '../../agent/control/access.js';
import { resolveControlGroup } from '../../agent/control/group.js';
import { bearerRefusal } from '../../agent/control/token.js';
import { makeTempDir, type LocalAgent } from '../../agent/local-agent.js';
import { builtAgent, Cluster, mainJs, uniqueName } from '../helpers/cluster.js';

const isRoot = process.getuid?.() === 0;
const dir = makeTempDir('gangway-control-');
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const gangway = (args: string[], env: Record<string, string> = {}) =>
  execa(process.execPath, [mainJs, ...args], { reject: false, timeout: 60_000, env: { GANGWAY_LISTEN: '', GANGWAY_CONTROL: '', GANGWAY_TOKEN_FILE: '', ...env } });
const checkConfig = (args: string[], env: Record<string, string> = {}) => gangway(['agent', '--check-config', '--insecure-plaintext-loopback', ...args], env);

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  json: { error?: { code: string; message: string } } & Record<string, unknown>;
}

type Target = { socketPath: string } | { host: string; port: number };

interface Raw {
  method?: string;
  path: string;
  headers?: Record<string, string | number>;
  /** One body, or pieces written one after another (chunked, no content-length). */
  body?: string | Buffer;
  pieces?: Buffer[];
}

/** One request on a fresh connection; the answer even if the agent closes while we still write. */
function send(target: Target, raw: Raw): Promise<Answer> {
  return new Promise((resolve, reject) => {
    let answered = false;
    const req = request({ ...target, agent: false, method: raw.method ?? 'GET', path: raw.path, headers: raw.headers ?? {} }, (res) => {
      answered = true;
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (text += chunk));
      res.on('end', () => {
        let json = {};
        try {
          json = JSON.parse(text);
        } catch {}
        resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json });
      });
      res.on('error', reject);
    });
    req.on('error', (err) => {
      if (!answered) reject(err);
    });
    if (raw.pieces) {
      (async () => {
        for (const piece of raw.pieces!) {
          if (answered || req.destroyed) return;
          req.write(piece);
          await new Promise((r) => setTimeout(r, 20));
        }
        if (!answered && !req.destroyed) req.end();
      })();
    } else req.end(raw.body);
  });
}

const json = (value: unknown) => ({ body: JSON.stringify(value), headers: { 'content-type': 'application/json' } });
const GUEST = { name: 'vm-x', memoryBytes: 8 * 1024 * 1024, profile: 'zero', dirtyRateBytesPerSec: 0, seed: 1, imageSeed: 0, sharedFraction: 0, hotFraction: 0.25 };

/** Each malformed request, the status it must get and what its message must say. */
const MALFORMED: [string, Raw, number, RegExp][] = [
  ['an unknown path', { path: '/v1/nothing' }, 404, /no such endpoint: "\/v1\/nothing"/],
  ['a known path with the wrong method', { method: 'PUT', path: '/v1/status' }, 405, /\/v1\/status takes GET, not "PUT"/],
  ['GET on a POST-only path', { path: '/v1/guests' }, 405, /takes POST, not "GET"/],
  ['a query string', { path: '/v1/status?verbose=1' }, 400, /GET \/v1\/status takes no query parameters \(got "\?verbose=1"\)/],
  ['an over-long request target', { path: `/v1/guests/${'a'.repeat(2000)}` }, 414, /request target is over 1024 bytes/],
  ['a guest name that is too long', { method: 'DELETE', path: `/v1/guests/${'a'.repeat(65)}` }, 400, /path parameter "a{65}" is not a guest name: 1-64 letters/],
  ['a guest name with a slash in it', { method: 'DELETE', path: '/v1/guests/..%2Fetc' }, 400, /path parameter "..\/etc" is not a guest name/],
  ['broken percent-encoding', { method: 'POST', path: '/v1/guests/vm%ZZ/resume' }, 400, /path parameter "vm%ZZ" is not valid percent-encoding/],
  ['a migration id that is not one', { method: 'POST', path: '/v1/migrations/not-an-id!/cancel' }, 400, /is not a migration id or a prefix of one/],
  ['a body where none is taken', { method: 'POST', path: '/v1/guests/vm-x/resume', ...json({}) }, 400, /POST \/v1\/guests\/:name\/resume takes no request body/],
  ['no content type', { method: 'POST', path: '/v1/guests', body: JSON.stringify(GUEST) }, 415, /takes a JSON body: send content-type application\/json \(got none\)/],
  ['the wrong content type', { method: 'POST', path: '/v1/guests', body: 'name=vm', headers: { 'content-type': 'application/x-www-form-urlencoded' } }, 415, /got "application\/x-www-form-urlencoded"/],
  ['an empty body', { method: 'POST', path: '/v1/guests', headers: { 'content-type': 'application/json' } }, 400, /POST \/v1\/guests takes a JSON object; the body is empty/],
  ['bad JSON', { method: 'POST', path: '/v1/guests', body: '{"name": "vm-x",', headers: { 'content-type': 'application/json' } }, 400, /request body is not JSON/],
  ['JSON that is not an object', { method: 'POST', path: '/v1/guests', ...json([GUEST]) }, 400, /request: .*expected object/],
  ['a field of the wrong type', { method: 'POST', path: '/v1/guests', ...json({ ...GUEST, memoryBytes: '8MiB' }) }, 400, /memoryBytes: .*expected number/],
  ['a missing field', { method: 'POST', path: '/v1/migrations', ...json({ guests: ['vm-x'] }) }, 400, /(^|; )to: .*expected string, received undefined/],
  ['an unknown field', { method: 'POST', path: '/v1/guests', ...json({ ...GUEST, colour: 'blue' }) }, 400, /request: unknown field "colour"/],
  ['a bad guest name in a body', { method: 'POST', path: '/v1/migrations', ...json({ guests: ['-rf'], to: '127.0.0.1:1', strategy: 'gang', dedup: true, downtimeMs: 300, force: false, maxRounds: 30, maxBytesFactor: 3, codec: 'auto' }) }, 400, /guests.0: 1-64 letters/],
  ['GET on the plan endpoint', { path: '/v1/plan' }, 405, /\/v1\/plan takes POST, not "GET"/],
  ['a body to the traffic endpoint', { method: 'GET', path: '/v1/traffic', body: '{}', headers: { 'content-type': 'application/json', 'content-length': 2 } }, 400, /GET \/v1\/traffic takes no request body/],
  ['a plan without a content type', { method: 'POST', path: '/v1/plan', body: JSON.stringify({ guests: ['vm-x'], to: '127.0.0.1:1' }) }, 415, /POST \/v1\/plan takes a JSON body/],
  ['an unknown field in a plan', { method: 'POST', path: '/v1/plan', ...json({ guests: ['vm-x'], to: '127.0.0.1:1', colour: 'blue' }) }, 400, /request: unknown field "colour"/],
  ['an unknown field in a drain', { method: 'POST', path: '/v1/drain', ...json({ to: ['127.0.0.1:1'], colour: 'blue' }) }, 400, /request: unknown field "colour"/],
  ['a drain naming a peer twice', { method: 'POST', path: '/v1/drain', ...json({ to: ['127.0.0.1:1', '127.0.0.1:1'] }) }, 400, /^to: names a peer twice$/],
  ['a drain without peers', { method: 'POST', path: '/v1/drain', ...json({ to: [] }) }, 400, /to: .*>=1|to: Too small/],
  ['a drain with a bad maxParallel', { method: 'POST', path: '/v1/drain', ...json({ to: ['127.0.0.1:1'], maxParallel: 0 }) }, 400, /maxParallel: /],
  ['cancelling a drain that is not running', { method: 'POST', path: '/v1/drain/cancel' }, 400, /no drain is running/],
  ['a plan with a bad guest name', { method: 'POST', path: '/v1/plan', ...json({ guests: ['-rf'], to: '127.0.0.1:1' }) }, 400, /guests.0: 1-64 letters/],
  ['an oversize body, declared', { method: 'POST', path: '/v1/guests', headers: { 'content-type': 'application/json', 'content-length': 10 * 1024 * 1024 } }, 413, /request body of 10485760 bytes is over the limit of 65536 bytes/],
  ['an oversize body, streamed', { method: 'POST', path: '/v1/guests', headers: { 'content-type': 'application/json' }, pieces: Array.from({ length: 8 }, () => Buffer.alloc(16 * 1024, 0x20)) }, 413, /request body is over the limit of 65536 bytes/],
];

describe.skipIf(!builtAgent)('control API requests', () => {
  let cluster: Cluster;
  let agent: LocalAgent;
  let token: string;
  let port: number;
  beforeAll(async () => {
    cluster = new Cluster();
    agent = await cluster.agent('a', ['--control-listen', '127.0.0.1:0', '--metrics-listen', '127.0.0.1:0']);
    token = readFileSync(join(agent.stateDir, 'control.token'), 'utf8').trim();
    port = Number((await agent.status()).agent.controlPort!.split(':')[1]);
  });
  afterAll(async () => cluster?.cleanup());

  const targets = () => ({
    socket: { target: { socketPath: join(agent.stateDir, 'control.sock') }, auth: {} },
    tcp: { target: { host: '127.0.0.1', port }, auth: { authorization: `Bearer ${token}` } },
  });

  describe.each(['socket', 'tcp'] as const)('on the %s', (listener) => {
    it.each(MALFORMED)('refuses %s', async (_what, raw, status, message) => {
      const { target, auth } = targets()[listener];
      const answer = await send(target, { ...raw, headers: { ...auth, ...raw.headers } });
      expect(answer.status, answer.text).toBe(status);
      expect(answer.json.error?.code).toBe('GANGWAY_ERR_BAD_REQUEST');
      expect(answer.json.error?.message).toMatch(message);
      expect(answer.text.length).toBeLessThan(2048);
      if (status === 405) expect(answer.headers.allow).toMatch(/^(GET|POST|DELETE)/);
    });

    it('still answers, and started no guest from a refused request', async () => {
      const { target, auth } = targets()[listener];
      const answer = await send(target, { path: '/v1/status', headers: auth });
      expect(answer.status).toBe(200);
      expect((answer.json as { guests: unknown[] }).guests).toEqual([]);
    });
  });

  it('refuses a missing or wrong token with 401, counts it, and takes the right one', async () => {
    const tcp = { host: '127.0.0.1', port };
    const refusals = async () => {
      const text = await (await fetch(`http://${(await agent.status()).agent.metrics}/metrics`)).text();
      const count = (reason: string) => Number(new RegExp(`^gangway_control_unauthorized_total\\{reason="${reason}"\\} (\\d+)$`, 'm').exec(text)?.[1] ?? 0);
      return { missing: count('missing'), wrong: count('wrong') };
    };
    const before = await refusals();
    const missing = await send(tcp, { path: '/v1/status' });
    expect(missing.status).toBe(401);
    expect(missing.headers['www-authenticate']).toMatch(/^Bearer/);
    expect(missing.json.error?.message).toMatch(/needs Authorization: Bearer TOKEN.*--token-file/);
    // Refused before routing: without the token even an unknown path is a 401, not a 404.
    expect((await send(tcp, { path: '/v1/nothing' })).status).toBe(401);
    const wrong = await send(tcp, { path: '/v1/status', headers: { authorization: `Bearer ${token.slice(0, -1)}${token.endsWith('A') ? 'B' : 'A'}` } });
    expect(wrong.status).toBe(401);
    expect(wrong.json.error?.message).toMatch(/does not match the agent's control.tokenFile/);
    const basic = await send(tcp, { path: '/v1/status', headers: { authorization: `Basic ${Buffer.from(`root:${token}`).toString('base64')}` } });
    expect(basic.status).toBe(401);
    const right = await send(tcp, { path: '/v1/status', headers: { authorization: `Bearer ${token}` } });
    expect(right.status).toBe(200);
    expect((right.json as { agent: { id: string } }).agent.id).toBe((await agent.status()).agent.id);
    expect(await refusals()).toEqual({ missing: before.missing + 2, wrong: before.wrong + 2 });
  });
});

describe('bearer check', () => {
  it('takes exactly the token, whatever the case of the scheme', () => {
    const token = 'a'.repeat(43);
    expect(bearerRefusal(`Bearer ${token}`, token)).toBeUndefined();
    expect(bearerRefusal(`bearer ${token}`, token)).toBeUndefined();
    expect(bearerRefusal(undefined, token)).toBe('missing');
    expect(bearerRefusal(`Bearer ${token}a`, token)).toBe('wrong');
    expect(bearerRefusal(`Bearer ${token.slice(1)}`, token)).toBe('wrong');
    expect(bearerRefusal(`Bearer  `, token)).toBe('wrong');
    expect(bearerRefusal(`Bearer ${token} extra`, token)).toBe('wrong');
    expect(bearerRefusal(`Bearer ${'x'.repeat(100_000)}`, token)).toBe('wrong');
  });
});

describe('the control socket', () => {
  it('is 0600 from the moment it is bound, then 0660, and the umask is restored', async () => {
    const socketPath = join(dir, 'bind.sock');
    const server = createServer();
    let modeAtBind = -1;
    // Registered first, so it runs before listenUnixSocket opens the socket to the group.
    server.once('listening', () => (modeAtBind = statSync(socketPath).mode & 0o777));
    const umask = process.umask();
    await listenUnixSocket(server, socketPath, undefined);
    expect(modeAtBind).toBe(0o600);
    expect(statSync(socketPath).mode & 0o777).toBe(0o660);
    expect(process.umask()).toBe(umask);
    await new Promise((r) => server.close(r));
  });

  it('names the control group it cannot find, and takes a gid as it is', () => {
    expect(resolveControlGroup('root')).toEqual({ name: 'root', gid: 0 });
    expect(resolveControlGroup(4242)).toEqual({ gid: 4242 });
    expect(resolveControlGroup('gangway-no-such-group')).toEqual({ problem: expect.stringMatching(/not a group on this host/) });
    expect(resolveControlGroup('--help')).toEqual({ problem: expect.stringMatching(/must be a group name/) });
  });
});

describe.skipIf(!builtAgent)('control access of a running agent', () => {
  let cluster: Cluster | undefined;
  afterEach(async () => {
    await cluster?.cleanup();
    cluster = undefined;
  });

  // chown to a group this process is not in needs root (CI runs as root).
  it.skipIf(!isRoot)('gives the socket and the state dir to the control group, and tightens a world-writable state dir', async () => {
    cluster = new Cluster();
    const stateDir = join(cluster.dir, 'a');
    mkdirSync(stateDir);
    chmodSync(stateDir, 0o777);
    const group = resolveControlGroup('daemon');
    if ('problem' in group) throw new Error('the daemon group is missing');
    const agent = await cluster.agent('a', ['--control-group', 'daemon']);
    const socket = statSync(join(stateDir, 'control.sock'));
    expect(socket.isSocket()).toBe(true);
    expect(socket.mode & 0o777).toBe(0o660);
    expect(socket.gid).toBe(group.gid);
    expect(socket.uid).toBe(process.getuid!());
    const state = statSync(stateDir);
    expect(state.mode & 0o777).toBe(0o750);
    expect(state.gid).toBe(group.gid);
    expect(readFileSync(agent.logPath, 'utf8')).toMatch(/"modeBefore":"0777".*tightened/);
  });

  it('keeps a private state dir private and the socket 0660 without a control group', async () => {
    cluster = new Cluster();
    const stateDir = join(cluster.dir, 'a');
    mkdirSync(stateDir, { mode: 0o700 });
    chmodSync(stateDir, 0o700);
    await cluster.agent('a');
    expect(statSync(stateDir).mode & 0o777).toBe(0o700);
    expect(statSync(join(stateDir, 'control.sock')).mode & 0o777).toBe(0o660);
  });

  it('creates the token 0600 once, keeps it across restarts, and the CLI uses it with --control or GANGWAY_CONTROL', async () => {
    cluster = new Cluster();
    const tokenFile = join(cluster.dir, 'token');
    const agent = await cluster.agent('a', ['--control-listen', '127.0.0.1:0', '--control-token-file', tokenFile]);
    const stat = statSync(tokenFile);
    expect(stat.mode & 0o777).toBe(0o600);
    const token = readFileSync(tokenFile, 'utf8').trim();
    expect(token).toMatch(/^[A-Za-z0-9_-]{43}$/); // 32 random bytes, base64url
    const address = (await agent.status()).agent.controlPort!;
    expect(address).toMatch(/^127\.0\.0\.1:\d+$/);

    // No --state-dir pointing at the agent: the TCP port is the only way in.
    const elsewhere = join(cluster.dir, 'elsewhere');
    const status = await gangway(['status', '--json', '--state-dir', elsewhere, '--control', address, '--token-file', tokenFile]);
    expect(status.exitCode, status.stderr).toBe(0);
    expect(JSON.parse(status.stdout).agent.stateDir).toBe(agent.stateDir);
    const name = uniqueName('vm');
    const started = await gangway(['guest', 'start', name, '--memory', '8MiB', '--json', '--state-dir', elsewhere], { GANGWAY_CONTROL: address, GANGWAY_TOKEN_FILE: tokenFile });
    expect(started.exitCode, started.stderr).toBe(0);
    expect((await agent.status()).guests.map((g) => g.name)).toEqual([name]);
    const stopped = await gangway(['guest', 'stop', name, '--state-dir', elsewhere, '--control', address, '--token-file', tokenFile]);
    expect(stopped.exitCode, stopped.stderr).toBe(0);

    const wrongFile = join(cluster.dir, 'wrong-token');
    writeFileSync(wrongFile, `${'x'.repeat(43)}\n`);
    const wrong = await gangway(['status', '--json', '--control', address, '--token-file', wrongFile]);
    expect(wrong.exitCode).toBe(1);
    expect(wrong.stderr).toMatch(/bearer token does not match/);

    await agent.stop();
    const again = await cluster.agent('a', ['--control-listen', '127.0.0.1:0', '--control-token-file', tokenFile]);
    expect(readFileSync(tokenFile, 'utf8').trim()).toBe(token);
    const after = await gangway(['status', '--json', '--control', (await again.status()).agent.controlPort!, '--token-file', tokenFile]);
    expect(after.exitCode, after.stderr).toBe(0);
  });

  it('refuses to start with a token file others can read', async () => {
    cluster = new Cluster();
    const tokenFile = join(cluster.dir, 'open-token');
    writeFileSync(tokenFile, `${'t'.repeat(43)}\n`, { mode: 0o644 });
    chmodSync(tokenFile, 0o644);
    const stateDir = join(cluster.dir, 'a');
    const run = await gangway(['agent', '--listen', '127.0.0.1:0', '--insecure-plaintext-loopback', '--state-dir', stateDir, '--control-listen', '127.0.0.1:0', '--control-token-file', tokenFile]);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toMatch(/token file .*open-token: is open to other users \(mode 0644\): chmod 600/);
    expect(existsSync(join(stateDir, 'control.sock'))).toBe(false);
  });
});

describe.skipIf(!builtAgent)('control settings', () => {
  it.each([
    ['an unknown group in the file', ['--config', 'FILE'], 'control:\n  group: gangway-no-such-group\n', {}, /'control.group' is not a group on this host .*\(got "gangway-no-such-group"\)/],
    ['an unknown group in the environment', [], '', { GANGWAY_CONTROL_GROUP: 'gangway-no-such-group' }, /GANGWAY_CONTROL_GROUP is not a group on this host .*\(got "gangway-no-such-group"\)/],
    ['an unknown group as a flag', ['--control-group', 'gangway-no-such-group'], '', {}, /--control-group: is not a group on this host .*\(got "gangway-no-such-group"\)/],
    ['a group name that could be an option', ['--control-group=--all'], '', {}, /--control-group: must be a group name .*\(got "--all"\)/],
    ['a gid out of range', ['--config', 'FILE'], 'control:\n  group: 99999999999\n', {}, /'control.group' must be a group name or a gid from 0 to 4294967294 \(got 99999999999\)/],
    ['a remote control address', ['--config', 'FILE'], 'control:\n  listen: 10.0.0.1:7400\n', {}, /'control.listen' must be a loopback address .*remote control would need TLS and an allowlist.*\(got "10.0.0.1:7400"\)/],
    ['a wildcard control address', ['--control-listen', '0.0.0.0:7400'], '', {}, /--control-listen: must be a loopback address/],
    ['a control address without a port', [], '', { GANGWAY_CONTROL_LISTEN: 'localhost' }, /GANGWAY_CONTROL_LISTEN must be HOST:PORT/],
    ['a relative token file', ['--config', 'FILE'], 'control:\n  listen: 127.0.0.1:7400\n  tokenFile: token\n', {}, /'control.tokenFile' must be an absolute path \(got "token"\)/],
    ['a token file without the port', [], '', { GANGWAY_CONTROL_TOKEN_FILE: '/etc/gangway/token' }, /'control.tokenFile' is for the TCP control port .*set 'control.listen' too/],
    ['an unknown control key', ['--config', 'FILE'], 'control:\n  mode: 0666\n', {}, /'control.mode' is not a setting.*control takes group, listen, tokenFile/],
  ])('rejects %s', async (_what, args, file, env, message) => {
    const path = join(dir, `${Math.random()}.yaml`);
    writeFileSync(path, file);
    const run = await checkConfig(args.map((a) => (a === 'FILE' ? path : a)), env);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toMatch(message);
    expect(run.stderr).toMatch(/GANGWAY_ERR_BAD_REQUEST/);
  });

  it('resolves the group and defaults the token file into the state dir', async () => {
    const run = await checkConfig(['--control-group', 'root', '--control-listen', '127.0.0.1:7400', '--state-dir', '/var/lib/gw-test']);
    expect(run.exitCode, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout).control).toEqual({
      socket: '/var/lib/gw-test/control.sock',
      group: { name: 'root', gid: 0 },
      listen: '127.0.0.1:7400',
      tokenFile: '/var/lib/gw-test/control.token',
    });
    const byGid = await checkConfig([], { GANGWAY_CONTROL_GROUP: '4242' });
    expect(JSON.parse(byGid.stdout).control.group).toEqual({ gid: 4242 });
  });

  it.each([
    [['status', '--control', '10.0.0.1:7400', '--token-file', '/dev/null'], /control address 10.0.0.1:7400 is not loopback/],
    [['status', '--control', 'nowhere'], /control address "nowhere" must be HOST:PORT/],
    [['status', '--token-file', '/etc/hostname'], /--token-file is for --control HOST:PORT/],
    [['status', '--control', '127.0.0.1:9', '--token-file', '/nonexistent/token'], /token file \/nonexistent\/token: cannot be read \(ENOENT\)/],
  ])('the CLI refuses %j', async (args, message) => {
    const run = await gangway(args);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toMatch(message);
  });
});
