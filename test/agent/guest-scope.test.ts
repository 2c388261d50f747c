// Where guests start (agent/guest/scope.ts): the placement rules, and the systemd-run command
// a scoped guest is started with (the interop itself: test/integration/systemd-scope.test.ts).
import { chmodSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { makeTempDir } from '../../agent/local-agent.js';
import { ConfigFileSchema, configFromEnv } from '../../agent/config.js';
import { GUEST_SCOPE_DEFAULTS, guestPlacement, placeGuests, scopeUnitName, spawnGuest } from '../../agent/guest/scope.js';

const booted = (path: string) => path === '/run/systemd/system';
const bare = () => false;
const found = () => '/usr/bin/systemd-run';
const missing = () => undefined;

describe('guestPlacement', () => {
  it.each([
    ['auto, a systemd service', 'auto', { INVOCATION_ID: 'x' }, booted, found, 'scope'],
    ['auto, by hand on a systemd host', 'auto', {}, booted, found, 'child'],
    ['auto, no systemd', 'auto', { INVOCATION_ID: 'x' }, bare, found, 'child'],
    ['always, by hand on a systemd host', 'always', {}, booted, found, 'scope'],
    ['never, a systemd service', 'never', { INVOCATION_ID: 'x' }, booted, found, 'child'],
  ] as const)('%s: %s', (_, mode, env, exists, which, kind) => {
    const placed = guestPlacement({ mode, slice: 'machine.slice' }, { env, exists, which });
    expect('placement' in placed && placed.placement.kind).toBe(kind);
  });

  it('always without systemd, or without systemd-run, is a problem that says what to set', () => {
    const none = guestPlacement({ mode: 'always', slice: 'machine.slice' }, { env: {}, exists: bare, which: found });
    expect(none).toEqual({ problem: expect.stringContaining('set guests.scope to auto or never') });
    const noRun = guestPlacement({ mode: 'auto', slice: 'machine.slice' }, { env: { INVOCATION_ID: 'x' }, exists: booted, which: missing });
    expect(noRun).toEqual({ problem: expect.stringContaining('systemd-run, which is not on PATH') });
    expect('problem' in noRun && noRun.problem).toContain('KillMode=process');
  });

  it('scopes go in the configured slice', () => {
    const placed = guestPlacement({ mode: 'always', slice: 'guests.slice' }, { env: {}, exists: booted, which: found });
    expect(placed).toEqual({ placement: { kind: 'scope', slice: 'guests.slice', systemdRun: '/usr/bin/systemd-run' } });
  });
});

describe('guests settings', () => {
  it('take auto|always|never and a slice name, from the file and the environment', () => {
    expect(ConfigFileSchema.safeParse({ guests: { scope: 'always', slice: 'vms.slice' } }).success).toBe(true);
    expect(ConfigFileSchema.safeParse({ guests: { scope: 'sometimes' } }).success).toBe(false);
    expect(ConfigFileSchema.safeParse({ guests: { slice: 'machine' } }).success).toBe(false);
    expect(ConfigFileSchema.safeParse({ guests: { slice: '../x.slice' } }).success).toBe(false);
    expect(configFromEnv({ GANGWAY_GUESTS_SCOPE: 'never', GANGWAY_GUESTS_SLICE: 'vms.slice' }).guests).toEqual({ scope: 'never', slice: 'vms.slice' });
    expect(GUEST_SCOPE_DEFAULTS).toEqual({ mode: 'auto', slice: 'machine.slice' });
  });
});

describe('spawnGuest', () => {
  let dir: string | undefined;
  afterEach(() => {
    placeGuests({ kind: 'child' });
    if (dir) rmSync(dir, { recursive: true, force: true });
    dir = undefined;
  });

  /** Runs a guest through a stand-in for systemd-run that writes down its argv and environment. */
  async function spawnThrough(kind: 'child' | 'scope') {
    dir = makeTempDir('gangway-test-scope-unit-');
    const out = join(dir, 'seen');
    const fake = join(dir, 'systemd-run');
    writeFileSync(fake, `#!/bin/sh\nprintf '%s\\n' "$@" > ${out}.argv\nenv > ${out}.env\n`);
    chmodSync(fake, 0o700);
    placeGuests(kind === 'scope' ? { kind, slice: 'machine.slice', systemdRun: fake } : { kind });
    const previous = { NOTIFY_SOCKET: process.env.NOTIFY_SOCKET };
    process.env.NOTIFY_SOCKET = '/run/systemd/notify';
    try {
      const command = kind === 'scope' ? '/bin/true' : '/bin/sh';
      const args = kind === 'scope' ? ['--flag'] : ['-c', `printf '%s\\n' "$0" "$@" > ${out}.argv; env > ${out}.env`];
      const { child, scope } = spawnGuest('vm1', command, args, { stdio: 'ignore' }, { LD_PRELOAD: '/x/shim.so', GANGWAY_TRACK_PATH: '/dev/shm/a:/dev/shm/b' });
      await new Promise((resolve) => child.once('exit', resolve));
      return { scope, argv: readFileSync(`${out}.argv`, 'utf8').trim().split('\n'), env: readFileSync(`${out}.env`, 'utf8') };
    } finally {
      if (previous.NOTIFY_SOCKET === undefined) delete process.env.NOTIFY_SOCKET;
      else process.env.NOTIFY_SOCKET = previous.NOTIFY_SOCKET;
    }
  }

  it('in a scope: systemd-run --scope in the slice, the guest variables as --setenv (not in systemd-run\'s own environment), then the command', async () => {
    const { scope, argv, env } = await spawnThrough('scope');
    expect(scope).toMatch(/^gangway-guest-vm1-[0-9a-f]{6}\.scope$/);
    expect(argv).toEqual([
      '--scope',
      '--quiet',
      '--collect',
      '--slice=machine.slice',
      `--unit=${scope}`,
      '--description=gangway guest vm1',
      '--setenv=LD_PRELOAD=/x/shim.so',
      '--setenv=GANGWAY_TRACK_PATH=/dev/shm/a:/dev/shm/b',
      '--',
      '/bin/true',
      '--flag',
    ]);
    expect(env).not.toContain('LD_PRELOAD=');
    expect(env).not.toContain('NOTIFY_SOCKET=');
  });

  it('as a child: the guest variables in its environment, without the agent service\'s own', async () => {
    const { scope, env } = await spawnThrough('child');
    expect(scope).toBeUndefined();
    expect(env).toContain('LD_PRELOAD=/x/shim.so\n');
    expect(env).not.toContain('NOTIFY_SOCKET=');
  });

  it('names a scope only after a guest name', () => {
    expect(scopeUnitName('a.b_c-1')).toMatch(/^gangway-guest-a\.b_c-1-[0-9a-f]{6}\.scope$/);
    expect(() => scopeUnitName('../x')).toThrow('not a guest name');
  });
});
