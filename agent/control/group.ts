// Which group may use the control socket: a group name (looked up in the host's group
// database, NSS included, through getent) or a numeric gid. Node has no getgrnam.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

/** A POSIX-portable group name (plus the trailing '$' of machine accounts); checked before any lookup. */
const GROUP_NAME = /^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$/;
const MAX_GID = 2 ** 32 - 2;

export interface ControlGroup {
  gid: number;
  /** The name, when the group database has one. */
  name?: string;
}

function parseGroupLine(line: string): ControlGroup | undefined {
  const [name, , gid] = line.trim().split(':');
  const value = Number(gid);
  return name && gid !== undefined && /^\d+$/.test(gid) && value <= MAX_GID ? { name, gid: value } : undefined;
}

function lookupByName(name: string): ControlGroup | undefined {
  try {
    return parseGroupLine(execFileSync('getent', ['group', name], { encoding: 'utf8', timeout: 5_000, stdio: ['ignore', 'pipe', 'ignore'] }));
  } catch (err) {
    // getent exits 2 for "not found"; without getent, /etc/group is the database.
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') return undefined;
    for (const line of readFileSync('/etc/group', 'utf8').split('\n')) {
      const group = parseGroupLine(line);
      if (group?.name === name) return group;
    }
    return undefined;
  }
}

/**
 * The group for a `control.group` value, or the reason it is not one. A gid needs no entry
 * in the group database (chown takes any gid); a name must have one.
 */
export function resolveControlGroup(value: string | number): ControlGroup | { problem: string } {
  const text = String(value);
  if (/^\d+$/.test(text)) {
    const gid = Number(text);
    return gid <= MAX_GID ? { gid } : { problem: `must be a group name or a gid from 0 to ${MAX_GID}` };
  }
  if (!GROUP_NAME.test(text)) return { problem: "must be a group name (letters, digits, '_', '.', '-', at most 32) or a numeric gid" };
  return lookupByName(text) ?? { problem: 'is not a group on this host (create it with groupadd, or give a numeric gid)' };
}

/** The group database's name for `gid`, when it has one (the CLI names the group a user should join). */
export function groupNameOf(gid: number): string | undefined {
  try {
    return parseGroupLine(execFileSync('getent', ['group', String(gid)], { encoding: 'utf8', timeout: 5_000, stdio: ['ignore', 'pipe', 'ignore'] }))?.name;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') return undefined;
    for (const line of readFileSync('/etc/group', 'utf8').split('\n')) {
      const group = parseGroupLine(line);
      if (group?.gid === gid) return group.name;
    }
    return undefined;
  }
}
