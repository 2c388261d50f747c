// The history of ended migrations (STATE/history.json): the last MAX_HISTORY_ENTRIES in both
// directions, so that `gangway history` still knows them after the agent restarts. Written
// whole and renamed into place (a crash leaves the old file or the new one, never half of
// one), 0600 like the guest records. Read back with a schema; a file that does not pass is
// kept under another name and reported, never dropped in silence or overwritten.
import { existsSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { describeZodError } from '../control/schema.js';
import { CANCELLERS, OUTCOMES, type HistoryEntry } from './outcome.js';

export const MAX_HISTORY_ENTRIES = 500;
export const HISTORY_FILE = 'history.json';

const text = z.string().min(1).max(4096);
const count = z.number().min(0);
const share = z.number().min(0).max(1);
const EntrySchema = z.strictObject({
  migrationId: text,
  direction: z.enum(['out', 'in']),
  guest: text,
  peer: text,
  startedAt: text,
  endedAt: text,
  outcome: z.enum(OUTCOMES),
  cancelledBy: z.enum(CANCELLERS).optional(),
  error: z.strictObject({ code: text, message: z.string().max(4096) }).optional(),
  technique: z.enum(['precopy', 'postcopy', 'hybrid']).optional(),
  totalMs: count.optional(),
  downtimeMs: count.optional(),
  wireBytes: count.optional(),
  memoryBytes: count.optional(),
  rounds: count.optional(),
  wentPostcopy: z.boolean().optional(),
  dirtyRateBytesPerSec: count.optional(),
  content: z
    .strictObject({ zeroShare: share, duplicateShare: share.optional(), sharedShare: share.optional() })
    .optional(),
  forecast: z
    .strictObject({
      technique: z.enum(['precopy', 'postcopy', 'hybrid']),
      strategy: z.enum(['gang', 'serial']),
      totalMs: count,
      downtimeMs: count,
      wireBytes: count,
      nominalBytesPerSec: count,
      faults: count,
      rounds: count,
    })
    .optional(),
});
const FileSchema = z.strictObject({ version: z.literal(1), entries: z.array(EntrySchema).max(MAX_HISTORY_ENTRIES) });

/** A history file that could not be read: where it was moved, and why. */
export interface UnreadableHistory {
  file: string;
  problem: string;
}

/** Parses a history file's text: the entries, or what is wrong with it. */
export function parseHistory(textOfFile: string): { entries: HistoryEntry[] } | { problem: string } {
  let json: unknown;
  try {
    json = JSON.parse(textOfFile);
  } catch (err) {
    return { problem: `not valid JSON: ${(err as Error).message.slice(0, 200)}` };
  }
  const parsed = FileSchema.safeParse(json);
  if (!parsed.success) return { problem: describeZodError(parsed.error) };
  return { entries: parsed.data.entries as HistoryEntry[] };
}

export class MigrationHistory {
  readonly path: string;
  private entries: HistoryEntry[] = [];
  private writable = true;
  /** Set by load() when the file on disk could not be read. */
  unreadable: UnreadableHistory | undefined;

  constructor(
    stateDir: string,
    private readonly maxEntries = MAX_HISTORY_ENTRIES,
  ) {
    this.path = join(stateDir, HISTORY_FILE);
  }

  /**
   * Reads the file, if there is one. One that cannot be read is renamed aside (kept for the
   * operator, who may want what it holds) and a new history starts.
   */
  load(): void {
    if (!existsSync(this.path)) return;
    let parsed: ReturnType<typeof parseHistory>;
    try {
      parsed = parseHistory(readFileSync(this.path, 'utf8'));
    } catch (err) {
      parsed = { problem: `cannot be read: ${(err as Error).message}` };
    }
    if ('entries' in parsed) {
      this.entries = parsed.entries.slice(-this.maxEntries);
      return;
    }
    const aside = `${this.path}.unreadable-${new Date().toISOString().replace(/[:.]/g, '-')}`;
    try {
      renameSync(this.path, aside);
      this.unreadable = { file: aside, problem: parsed.problem };
    } catch (err) {
      // Left where it is, it must not be overwritten: this run's history stays in memory.
      this.writable = false;
      this.unreadable = { file: this.path, problem: `${parsed.problem}; could not be moved aside (${(err as Error).message}), so this agent does not write its history until the file is dealt with` };
    }
  }

  /** Oldest first. */
  list(): readonly HistoryEntry[] {
    return this.entries;
  }

  /** Adds an entry (replacing one of the same migration and direction) and writes the file. */
  add(entry: HistoryEntry): void {
    this.entries = this.entries.filter((e) => e.migrationId !== entry.migrationId || e.direction !== entry.direction);
    this.entries.push(entry);
    if (this.entries.length > this.maxEntries) this.entries = this.entries.slice(-this.maxEntries);
    if (this.writable) this.write();
  }

  private write(): void {
    const tmp = `${this.path}.tmp`;
    rmSync(tmp, { force: true });
    writeFileSync(tmp, `${JSON.stringify({ version: 1, entries: this.entries })}\n`, { mode: 0o600, flag: 'wx' });
    renameSync(tmp, this.path);
  }
}
