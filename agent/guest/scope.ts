// Guests in systemd scopes of their own, as libvirt puts VMs in machine.slice: a guest the
// agent starts is not part of the agent's cgroup, so restarting or stopping the agent's
// service neither kills it nor accounts its CPU and memory as the agent's.
//
// `systemd-run --scope` asks systemd for a transient scope holding its own PID, waits for
// the job, then execs the guest: the PID the agent spawned is the guest's, and its stdio,
// its extra fds (the post-copy socket, QEMU's memory fds) and its environment pass through.
// The guest's own variables go through --setenv, so that systemd-run itself does not load
// the tracking shim (LD_PRELOAD) nor consume the standby fd the shim watches.
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { accessSync, constants, existsSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { GUEST_NAME_PATTERN } from './guest-name.js';

export const GUEST_SCOPE_MODES = ['auto', 'always', 'never'] as const;
export type GuestScopeMode = (typeof GUEST_SCOPE_MODES)[number];

export interface GuestScopeSettings {
  /**
   * auto: a scope for each guest when the agent runs as a systemd service (INVOCATION_ID set
   * on a host booted with systemd); always: a scope whenever systemd runs the host, else the
   * agent does not start; never: guests are the agent's children (the unit then needs
   * KillMode=process, or a restart kills them).
   */
  mode: GuestScopeMode;
  /** The slice the scopes go in. */
  slice: string;
}

export const GUEST_SCOPE_DEFAULTS: GuestScopeSettings = { mode: 'auto', slice: 'machine.slice' };

/** A slice's unit name: letters, digits, ':', '_', '.', '-', ending in .slice. */
export const SLICE_NAME_PATTERN = /^[A-Za-z0-9:_.-]{1,200}\.slice$/;

/** Where this agent starts its guests. */
export type GuestPlacement = { kind: 'child' } | { kind: 'scope'; slice: string; systemdRun: string };

/** Variables of the agent's own service that mean nothing to a guest (or worse: a guest would ping the agent's watchdog). */
const AGENT_ONLY_ENV = ['NOTIFY_SOCKET', 'WATCHDOG_PID', 'WATCHDOG_USEC', 'INVOCATION_ID', 'JOURNAL_STREAM', 'LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES'];

/** sd_booted(): systemd is the host's service manager. */
export const systemdBooted = (exists: (path: string) => boolean = existsSync) => exists('/run/systemd/system');

function onPath(command: string, env: NodeJS.ProcessEnv): string | undefined {
  for (const dir of (env.PATH ?? '/usr/bin:/bin').split(delimiter)) {
    if (!dir) continue;
    const candidate = join(dir, command);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

export interface PlacementProbe {
  env?: NodeJS.ProcessEnv;
  exists?: (path: string) => boolean;
  which?: (command: string) => string | undefined;
}

/** Where guests go with these settings on this host, or why the agent cannot start with them. */
export function guestPlacement(settings: GuestScopeSettings, probe: PlacementProbe = {}): { placement: GuestPlacement } | { problem: string } {
  const env = probe.env ?? process.env;
  const which = probe.which ?? ((command: string) => onPath(command, env));
  if (settings.mode === 'never') return { placement: { kind: 'child' } };
  const booted = systemdBooted(probe.exists);
  const service = Boolean(env.INVOCATION_ID);
  if (settings.mode === 'auto' && !(booted && service)) return { placement: { kind: 'child' } };
  if (!booted) {
    return { problem: 'guests.scope: always needs systemd as the service manager (no /run/systemd/system here): set guests.scope to auto or never' };
  }
  const systemdRun = which('systemd-run');
  if (systemdRun === undefined) {
    return { problem: `guests.scope: ${settings.mode} puts guests in scopes with systemd-run, which is not on PATH: install systemd's systemd-run, or set guests.scope: never (and KillMode=process in the unit)` };
  }
  return { placement: { kind: 'scope', slice: settings.slice, systemdRun } };
}

let placement: GuestPlacement = { kind: 'child' };

/** Set once at the agent's start: every guest launched after goes there. */
export function placeGuests(where: GuestPlacement): void {
  placement = where;
}

export function currentGuestPlacement(): GuestPlacement {
  return placement;
}

/** gangway-guest-NAME-XXXXXX.scope: the name says whose, the suffix keeps a second agent on this host (a local migration) from clashing. */
export function scopeUnitName(guestName: string): string {
  if (!GUEST_NAME_PATTERN.test(guestName)) throw new Error(`not a guest name: ${JSON.stringify(guestName)}`);
  return `gangway-guest-${guestName}-${randomBytes(3).toString('hex')}.scope`;
}

export interface SpawnedGuest {
  child: ChildProcess;
  /** The scope the guest runs in, when it has one. */
  scope: string | undefined;
}

/**
 * Starts a guest process: `command args` with the agent's environment (less its service's own
 * variables) plus `guestEnv`, detached, as a child or in a scope of its own.
 */
export function spawnGuest(guestName: string, command: string, args: readonly string[], options: Omit<SpawnOptions, 'env' | 'detached'>, guestEnv: Record<string, string>): SpawnedGuest {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const name of AGENT_ONLY_ENV) delete env[name];
  const where = placement;
  if (where.kind === 'child') {
    return { child: spawn(command, args, { ...options, detached: true, env: { ...env, ...guestEnv } }), scope: undefined };
  }
  const scope = scopeUnitName(guestName);
  const runArgs = [
    '--scope',
    '--quiet',
    // An empty scope goes at once, also when its guest failed.
    '--collect',
    `--slice=${where.slice}`,
    `--unit=${scope}`,
    `--description=gangway guest ${guestName}`,
    ...Object.entries(guestEnv).map(([name, value]) => `--setenv=${name}=${value}`),
    '--',
    command,
    ...args,
  ];
  return { child: spawn(where.systemdRun, runArgs, { ...options, detached: true, env }), scope };
}
