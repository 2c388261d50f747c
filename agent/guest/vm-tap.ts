// The TAP devices behind VMs' NICs. A VM started here by an operator uses the operator's TAP
// (`vm start --tap`); a VM that arrives gets one this agent makes (gw + the migration's file
// suffix), attached to vm.bridge when that is set, and removed with the VM. The commands are
// built from this agent's own names only: a TAP name is never taken from a peer.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { basename } from 'node:path';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { GuestFiles } from './process-guest.js';

const IFNAME = /^[A-Za-z0-9_.-]{1,15}$/;

/** Is `name` a TAP (or TUN) device of this host? */
export function isTapDevice(name: string): boolean {
  return IFNAME.test(name) && existsSync(`/sys/class/net/${name}/tun_flags`);
}

/** The TAP device this agent makes for an arriving VM: gw + the 8 hex digits naming its files. */
export function tapNameFor(files: Pick<GuestFiles, 'qmpSocketPath'>): string {
  const suffix = basename(files.qmpSocketPath ?? '', '.qmp');
  if (!/^[0-9a-f]{8}$/.test(suffix)) throw new GangwayError(ErrorCode.INTERNAL, `no TAP name from ${files.qmpSocketPath}`);
  return `gw${suffix}`;
}

function ip(args: string[]): void {
  try {
    execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 });
  } catch (err) {
    const stderr = (err as { stderr?: Buffer }).stderr?.toString().trim();
    throw new GangwayError(ErrorCode.GUEST_FAILED, `\`ip ${args.join(' ')}\` failed: ${stderr || (err as Error).message}`);
  }
}

/** Makes TAP `name`, up, and on `bridge` when given; nothing is left of it when a step fails. */
export function createVmTap(name: string, bridge: string | undefined): void {
  if (!IFNAME.test(name) || (bridge !== undefined && !IFNAME.test(bridge))) throw new GangwayError(ErrorCode.INTERNAL, `TAP ${name} on bridge ${bridge}: not interface names`);
  ip(['tuntap', 'add', 'dev', name, 'mode', 'tap']);
  try {
    if (bridge !== undefined) ip(['link', 'set', 'dev', name, 'master', bridge]);
    ip(['link', 'set', 'dev', name, 'up']);
  } catch (err) {
    removeVmTap(name);
    throw err;
  }
}

/** Removes TAP `name` if it is there (a VM's that this agent made). */
export function removeVmTap(name: string): void {
  if (!isTapDevice(name)) return;
  try {
    ip(['link', 'del', 'dev', name]);
  } catch {}
}
