// The agent's guests, persisted under STATE/guests/NAME.json so that an agent restart finds
// the guests that kept running without it (they are detached processes).
import { chmodSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GangwayError, ErrorCode } from '../../protocol/errors.js';
import { isAlive, ProcessGuest, type GuestFiles, type ProcessGuestSpec } from './process-guest.js';

export const GUEST_NAME_PATTERN = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/;

/**
 * A record is the agent user's alone (0600), as is all of guests/. The .tmp is made afresh
 * ('wx' after removing a stale one), so the write never lands in a file or follows a symlink
 * that was left at that name.
 */
function writeRecord(path: string, record: GuestRecord): void {
  const tmp = `${path}.tmp`;
  rmSync(tmp, { force: true });
  writeFileSync(tmp, JSON.stringify(record, null, 2), { mode: 0o600, flag: 'wx' });
  renameSync(tmp, path);
}

export interface GuestRecord {
  name: string;
  kind: 'process';
  pid: number;
  memoryBytes: number;
  pageSizeBytes: number;
  files: GuestFiles;
  spec: ProcessGuestSpec;
  /** How the guest got here: started on this host, or migrated in (with the migration id). */
  origin: { kind: 'started' } | { kind: 'migrated'; migrationId: string; from: string };
  startedAt: string;
  /** The guest's TAP device, where its network traffic is measured. */
  tap?: string;
  /**
   * Post-copy: the guest runs here while pages are still coming from `from`. With
   * `stranded`, they stopped coming (the reason): the guest is paused on them.
   */
  incoming?: { migrationId: string; from: string; missingPages: number; stranded?: string };
  /**
   * Post-copy from here: the guest runs at `to` since the switchover, and this paused copy
   * holds the pages `to` still lacks. It must never resume here.
   */
  outgoing?: {
    migrationId: string;
    to: string;
    since: string;
    /** commit: pre-copy's commit was sent; postcopy: the guest may run there, its missing pages are here. */
    phase: 'commit' | 'postcopy';
    interrupted?: string;
    /** The destination's secret for this migration (hex): a restarted agent needs it to reattach. */
    secret?: string;
  };
}

export class GuestRegistry {
  private readonly dir: string;
  private readonly guests = new Map<string, { record: GuestRecord; guest: ProcessGuest }>();
  /** Names being created or migrated in: not yet in the registry, but taken. */
  private readonly reserved = new Set<string>();

  constructor(stateDir: string) {
    this.dir = join(stateDir, 'guests');
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    // The mode above is filtered by the umask and ignored for a dir made by an older agent.
    chmodSync(this.dir, 0o700);
  }

  /** Loads the records of guests still alive; returns the names of those found dead. */
  load(): string[] {
    const dead: string[] = [];
    for (const file of readdirSync(this.dir)) {
      if (!file.endsWith('.json')) continue;
      let record: GuestRecord;
      try {
        record = JSON.parse(readFileSync(join(this.dir, file), 'utf8')) as GuestRecord;
      } catch {
        continue;
      }
      if (isAlive(record.pid)) this.insert(record);
      else {
        dead.push(record.name);
        rmSync(join(this.dir, file), { force: true });
      }
    }
    return dead;
  }

  filesFor(name: string, memoryDir: string, suffix: string): GuestFiles {
    return {
      memoryPath: join(memoryDir, `gangway-${name}-${suffix}.mem`),
      trackReportPath: join(this.dir, `${name}-${suffix}.track`),
      logPath: join(this.dir, `${name}.log`),
    };
  }

  /** Takes a name for a guest about to exist here; throws GUEST_EXISTS if it is taken. */
  reserve(name: string): void {
    if (!GUEST_NAME_PATTERN.test(name)) {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `guest name "${name}" is not allowed: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'`,
      );
    }
    if (this.guests.has(name) || this.reserved.has(name)) {
      throw new GangwayError(ErrorCode.GUEST_EXISTS, `a guest named "${name}" already exists on this host`);
    }
    this.reserved.add(name);
  }

  release(name: string): void {
    this.reserved.delete(name);
  }

  add(record: GuestRecord): ProcessGuest {
    this.reserved.delete(record.name);
    const path = join(this.dir, `${record.name}.json`);
    writeRecord(path, record);
    return this.insert(record);
  }

  private insert(record: GuestRecord): ProcessGuest {
    const guest = new ProcessGuest(record.name, record.pid, record.memoryBytes, record.files);
    this.guests.set(record.name, { record, guest });
    return guest;
  }

  /** Rewrites a guest's record with `patch` (undefined fields are dropped). */
  update(name: string, patch: Partial<GuestRecord>): void {
    const entry = this.get(name);
    const record = { ...entry.record, ...patch } as GuestRecord;
    for (const key of Object.keys(patch) as (keyof GuestRecord)[]) if (patch[key] === undefined) delete record[key];
    const path = join(this.dir, `${name}.json`);
    writeRecord(path, record);
    entry.record = record;
  }

  remove(name: string): void {
    this.guests.delete(name);
    rmSync(join(this.dir, `${name}.json`), { force: true });
  }

  get(name: string): { record: GuestRecord; guest: ProcessGuest } {
    const entry = this.guests.get(name);
    if (!entry) throw new GangwayError(ErrorCode.GUEST_NOT_FOUND, `no guest named "${name}" on this host`);
    return entry;
  }

  has(name: string): boolean {
    return this.guests.has(name);
  }

  list(): { record: GuestRecord; guest: ProcessGuest }[] {
    return [...this.guests.values()];
  }
}
