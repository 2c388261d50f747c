// The migration history file (STATE/history.json): bounded, private, read back with a
// schema; a file that cannot be read is kept aside and reported, never dropped or overwritten.
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { HISTORY_FILE, MigrationHistory, parseHistory } from '../../agent/daemon/history.js';
import type { HistoryEntry } from '../../agent/daemon/outcome.js';

const entry = (n: number, over: Partial<HistoryEntry> = {}): HistoryEntry => ({
  migrationId: `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`,
  direction: 'out',
  guest: `vm${n}`,
  peer: '127.0.0.1:7401',
  startedAt: '2026-12-05T21:00:00.000Z',
  endedAt: '2026-12-05T21:00:01.000Z',
  outcome: 'completed',
  totalMs: 1000 + n,
  ...over,
});

describe('MigrationHistory', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'gangway-history-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('keeps the last entries up to its bound, across a reload, in a 0600 file', () => {
    const history = new MigrationHistory(dir, 5);
    for (let n = 0; n < 8; n++) history.add(entry(n));
    expect(history.list().map((e) => e.guest)).toEqual(['vm3', 'vm4', 'vm5', 'vm6', 'vm7']);
    expect(statSync(join(dir, HISTORY_FILE)).mode & 0o777).toBe(0o600);
    const again = new MigrationHistory(dir, 5);
    again.load();
    expect(again.unreadable).toBeUndefined();
    expect(again.list()).toEqual(history.list());
    expect(readdirSync(dir)).toEqual([HISTORY_FILE]);
  });

  it('replaces an entry of the same migration and direction, and keeps both directions of one id', () => {
    const history = new MigrationHistory(dir);
    history.add(entry(1, { outcome: 'in-doubt', error: { code: 'GANGWAY_ERR_SWITCHOVER_IN_DOUBT', message: 'no answer' } }));
    history.add(entry(1, { direction: 'in', peer: 'agent-a' }));
    history.add(entry(1));
    expect(history.list().map((e) => [e.direction, e.outcome])).toEqual([
      ['in', 'completed'],
      ['out', 'completed'],
    ]);
  });

  it.each([
    ['not JSON', '{"version": 1, "entries": [', /^not valid JSON: /],
    ['an unknown outcome', JSON.stringify({ version: 1, entries: [{ ...entry(1), outcome: 'aborted' }] }), /^entries\.0\.outcome: /],
    ['a missing field', JSON.stringify({ version: 1, entries: [{ ...entry(1), guest: undefined }] }), /^entries\.0\.guest: /],
    ['another version', JSON.stringify({ version: 2, entries: [] }), /^version: /],
  ])('keeps a file with %s aside, reports it, and starts a new history', (_, text, problem) => {
    writeFileSync(join(dir, HISTORY_FILE), text, { mode: 0o600 });
    const history = new MigrationHistory(dir);
    history.load();
    expect(history.unreadable?.problem).toMatch(problem);
    expect(history.list()).toEqual([]);
    // Kept byte for byte under the name the report gives.
    expect(readFileSync(history.unreadable!.file, 'utf8')).toBe(text);
    expect(existsSync(join(dir, HISTORY_FILE))).toBe(false);
    history.add(entry(1));
    expect(readFileSync(history.unreadable!.file, 'utf8')).toBe(text);
    expect(parseHistory(readFileSync(join(dir, HISTORY_FILE), 'utf8'))).toEqual({ entries: [entry(1)] });
  });

  // Root reads a 0000 file: there is nothing to refuse.
  it.skipIf(process.getuid?.() === 0)('reports a file it may not read (not as root)', () => {
    writeFileSync(join(dir, HISTORY_FILE), '{}', { mode: 0o000 });
    chmodSync(join(dir, HISTORY_FILE), 0o000);
    const history = new MigrationHistory(dir);
    history.load();
    expect(history.unreadable?.problem).toMatch(/cannot be read: EACCES/);
  });

  it('refuses more entries than the bound in a file (a file is not a way around it)', () => {
    const entries = Array.from({ length: 501 }, (_, n) => entry(n));
    expect(parseHistory(JSON.stringify({ version: 1, entries }))).toMatchObject({ problem: expect.stringMatching(/^entries: /) });
  });
});

describe('MigrationHistory in a directory it may not change', () => {
  // Root may rename in a read-only directory: there is nothing to refuse.
  it.skipIf(process.getuid?.() === 0)('leaves an unreadable file in place and never overwrites it', () => {
    const dir = mkdtempSync(join(tmpdir(), 'gangway-history-'));
    try {
      writeFileSync(join(dir, HISTORY_FILE), 'garbage', { mode: 0o600 });
      chmodSync(dir, 0o500);
      const history = new MigrationHistory(dir);
      history.load();
      expect(history.unreadable?.file).toBe(join(dir, HISTORY_FILE));
      expect(history.unreadable?.problem).toMatch(/could not be moved aside/);
      history.add(entry(1));
      expect(history.list()).toHaveLength(1);
      expect(readFileSync(join(dir, HISTORY_FILE), 'utf8')).toBe('garbage');
    } finally {
      chmodSync(dir, 0o700);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
