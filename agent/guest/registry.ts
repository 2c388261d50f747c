// The agent's guests, persisted under STATE/guests/NAME.json so that an agent restart finds
// the guests that kept running without it (they are detached processes).
import { chmodSync, lstatSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GangwayError, ErrorCode } from '../../protocol/errors.js';
import type { Logger } from '../log.js';
import type { HostedGuest } from './adapter.js';
import { fingerprintsPathOf, guestFilePaths, processState, ProcessGuest, type GuestFiles } from './process-guest.js';
import { QemuGuest } from './qemu-guest.js';
import { parseGuestRecord, type GuestRecord } from './record.js';
import { removeArrivalNote, sweepArrivalNotes, writeArrivalNote } from './arrival-note.js';

export type { GuestRecord } from './record.js';

export { GUEST_NAME_PATTERN } from './guest-name.js';
import { GUEST_NAME_PATTERN } from './guest-name.js';

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

/** A guest record load() could not read or validate: kept on disk, and reported. */
export interface UnreadableRecord {
  /** The record's path. */
  file: string;
  /** The guest's name, from the file's name. */
  name: string;
  /** What is wrong: the error reading it, or each field that does not validate. */
  problem: string;
}

/** What an operator does about an unreadable record (logs, errors and `gangway status` say it). */
export const UNREADABLE_RECORD_ADVICE =
  'inspect the file (and whether that guest still runs, here or at a migration peer), then remove it or fix it, and restart the agent';

export class GuestRegistry {
  private readonly dir: string;
  private readonly guests = new Map<string, { record: GuestRecord; guest: HostedGuest }>();
  /** Names being created or migrated in: not yet in the registry, but taken. */
  private readonly reserved = new Set<string>();
  /** Guests load() found dead (their logs stay: why they died). */
  private readonly dead = new Set<string>();
  /** Records load() could not read, by guest name: that name is refused until a restart. */
  private readonly unreadable = new Map<string, UnreadableRecord>();
  /** Every file a record load() read names, its guest alive or dead (see sweepArrivalNotes). */
  private readonly recordedPaths = new Set<string>();

  constructor(
    stateDir: string,
    private readonly log?: Logger,
  ) {
    this.dir = join(stateDir, 'guests');
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    // The mode above is filtered by the umask and ignored for a dir made by an older agent.
    chmodSync(this.dir, 0o700);
  }

  /**
   * Loads the records of guests still alive; returns the names of those found dead (their
   * records and memory files are removed: see removeDeadMemory). A record that cannot be read
   * or does not validate is kept on disk and listed by unreadableRecords(): its guest may still
   * run, here or elsewhere, and this agent does not act on that name until the operator has
   * fixed or removed the file.
   * NAME.json.tmp files are ignored: one is a write a crash cut short, whose NAME.json (if
   * any) is still the last complete record, and the next write of NAME removes it.
   */
  load(): string[] {
    const dead: string[] = [];
    for (const file of readdirSync(this.dir)) {
      if (!file.endsWith('.json')) continue;
      const path = join(this.dir, file);
      let text: string;
      try {
        text = readFileSync(path, 'utf8');
      } catch (err) {
        this.keepUnreadable(path, file, `cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
        continue;
      }
      const parsed = parseGuestRecord(text, file);
      if ('problem' in parsed) {
        this.keepUnreadable(path, file, parsed.problem);
        continue;
      }
      const { record } = parsed;
      for (const path of namedPaths(record)) this.recordedPaths.add(path);
      // A zombie is dead too: its parent (the agent that was killed) can no longer reap it,
      // and where PID 1 does not reap either (a container) it stays one.
      const state = processState(record.pid);
      if (state !== undefined && state !== 'Z') this.insert(record);
      else {
        dead.push(record.name);
        this.dead.add(record.name);
        // Its memory goes before its record: a crash in between leaves a record naming files
        // that are gone, never files that no record names (removeStrays does not look in the
        // memory directory, which other programs share).
        this.removeDeadMemory(record);
        rmSync(path, { force: true });
      }
    }
    return dead;
  }

  /**
   * A dead guest's memory files (and their fingerprints) go, as a stop would remove them:
   * nothing can run it again. Its files in the guests directory are removeStrays' (its log and
   * console stay: why it died). One exception: a source's paused copy that died while serving a
   * post-copy still holds the only copy of the pages the destination lacked; its memory stays,
   * and the log names the files.
   */
  private removeDeadMemory(record: GuestRecord): void {
    const paths = record.files.memoryPaths.flatMap((path) => [path, fingerprintsPathOf(path)]);
    if (record.outgoing?.phase === 'postcopy') {
      this.log?.warn(
        { guest: record.name, to: record.outgoing.to, migrationId: record.outgoing.migrationId, files: record.files.memoryPaths },
        'this paused copy died during a post-copy: its memory files stay, the only copy of the pages the destination lacked; remove them once the guest is dealt with there',
      );
      return;
    }
    for (const path of paths) rmSync(path, { force: true });
  }

  /**
   * Removes the files of the guests directory that no record names, once load() has run:
   * what a guest arriving here left when the previous run of this agent died before its
   * commit (its standby QEMU's sockets, console and log; its memory was an unnamed file and
   * went with it, unless the switchover had named it: then its arrival note names it, see
   * arrival-note.ts), and the files of guests found dead, but for their log and console (why
   * they died). Returns the files' names. Nothing is
   * removed while a record cannot be read (whose files are whose is not known then), nor
   * while a guest is being created or received (its files are no record's yet).
   */
  removeStrays(): string[] {
    if (this.unreadable.size > 0 || this.reserved.size > 0) return [];
    const named = new Set<string>();
    for (const { record } of this.guests.values()) for (const path of guestFilePaths(record.files)) named.add(path);
    // What an arrival named and never journaled (it may be in the memory directory or a
    // disks' directory: the note says which inode each was).
    const arrivals = sweepArrivalNotes(this.dir, new Set([...named, ...this.recordedPaths]));
    const removed: string[] = [...arrivals.removed, ...arrivals.unreadable.map((file) => `${file} (an unreadable arrival note)`)];
    for (const file of readdirSync(this.dir)) {
      const path = join(this.dir, file);
      // Records, and a record's write a crash cut short (see load()), are not strays.
      if (file.endsWith('.json') || file.endsWith('.json.tmp') || named.has(path)) continue;
      if ([...this.dead].some((name) => file === `${name}.log` || (file.startsWith(`${name}-`) && file.endsWith('.console')))) continue;
      try {
        if (!lstatSync(path).isDirectory()) {
          rmSync(path, { force: true });
          removed.push(file);
        }
      } catch {}
    }
    return removed;
  }

  private keepUnreadable(file: string, fileName: string, problem: string): void {
    const name = fileName.slice(0, -'.json'.length);
    this.unreadable.set(name, { file, name, problem });
  }

  /** The records load() kept because they could not be read (see UnreadableRecord). */
  unreadableRecords(): UnreadableRecord[] {
    return [...this.unreadable.values()];
  }

  /** Refuses to act on a guest whose record could not be read. */
  private refuseUnreadable(name: string): void {
    const unreadable = this.unreadable.get(name);
    if (!unreadable) return;
    throw new GangwayError(
      ErrorCode.GUEST_EXISTS,
      `guest "${name}" has a record this agent cannot read (${unreadable.file}: ${unreadable.problem}); ` +
        'it may be the only note of where that guest runs, so this agent does not act on that name until the record is dealt with: ' +
        `${UNREADABLE_RECORD_ADVICE}`,
    );
  }

  /**
   * Where a guest's files go: a memory file per region in `memoryDir`, the rest in the state
   * directory. A process guest saves its device state to a file; a VM has a QMP socket (named
   * by the suffix alone: a unix socket's path is short) and a serial console.
   */
  filesFor(name: string, memoryDir: string, suffix: string, regionCount = 1, kind: GuestRecord['kind'] = 'process'): GuestFiles {
    const common = {
      memoryPaths: Array.from({ length: regionCount }, (_, i) => join(memoryDir, `gangway-${name}-${suffix}${i === 0 ? '' : `.r${i}`}.mem`)),
      trackReportPath: join(this.dir, `${name}-${suffix}.track`),
      logPath: join(this.dir, `${name}.log`),
    };
    if (kind === 'qemu') return { ...common, qmpSocketPath: join(this.dir, `${suffix}.qmp`), consolePath: join(this.dir, `${name}-${suffix}.console`) };
    return { ...common, deviceStatePath: join(this.dir, `${name}-${suffix}.dev`) };
  }

  /**
   * A guest arriving here as `name` (reserved) will name these unnamed files at its
   * switchover: noted, so that an agent killed before the guest's record is journaled has
   * them removed at its next start (see arrival-note.ts). arrived() ends the note.
   */
  noteArrival(name: string, files: readonly { path: string; fd: number }[]): void {
    writeArrivalNote(this.dir, name, files);
  }

  arrived(name: string): void {
    removeArrivalNote(this.dir, name);
  }

  /** Takes a name for a guest about to exist here; throws GUEST_EXISTS if it is taken. */
  reserve(name: string): void {
    if (!GUEST_NAME_PATTERN.test(name)) {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `guest name "${name}" is not allowed: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'`,
      );
    }
    this.refuseUnreadable(name);
    if (this.guests.has(name) || this.reserved.has(name)) {
      throw new GangwayError(ErrorCode.GUEST_EXISTS, `a guest named "${name}" already exists on this host`);
    }
    this.reserved.add(name);
  }

  release(name: string): void {
    this.reserved.delete(name);
  }

  add(record: GuestRecord): HostedGuest {
    this.reserved.delete(record.name);
    const path = join(this.dir, `${record.name}.json`);
    writeRecord(path, record);
    // The same guest journaled again (a post-copy's end): its object stays, and with it its
    // connections (a VM's one QMP connection: a second object could not get one).
    const known = this.guests.get(record.name);
    if (known && known.guest.pid === record.pid && known.record.kind === record.kind) {
      known.record = record;
      return known.guest;
    }
    return this.insert(record);
  }

  private insert(record: GuestRecord): HostedGuest {
    const guest =
      record.kind === 'qemu'
        ? new QemuGuest(record.name, record.pid, record.files, record.spec, this.log, record.tapCreated ? record.tap : undefined)
        : new ProcessGuest(record.name, record.pid, record.memoryBytes, record.files, record.spec.regionBytes);
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
    // Only a guest of the registry gets here, never a name held by an unreadable record
    // (reserve and get refuse it): that file is the operator's to remove.
    this.refuseUnreadable(name);
    this.guests.delete(name);
    rmSync(join(this.dir, `${name}.json`), { force: true });
  }

  get(name: string): { record: GuestRecord; guest: HostedGuest } {
    this.refuseUnreadable(name);
    const entry = this.guests.get(name);
    if (!entry) throw new GangwayError(ErrorCode.GUEST_NOT_FOUND, `no guest named "${name}" on this host`);
    return entry;
  }

  has(name: string): boolean {
    return this.guests.has(name);
  }

  list(): { record: GuestRecord; guest: HostedGuest }[] {
    return [...this.guests.values()];
  }
}

/** Every file a record names: its guest's files, its memory's fingerprints, its disks. */
function namedPaths(record: GuestRecord): string[] {
  return [...guestFilePaths(record.files), ...record.files.memoryPaths.map(fingerprintsPathOf), ...(record.files.diskPaths ?? [])];
}
