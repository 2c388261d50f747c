// Arrival notes: the files a migration in names at its switchover, by inode, so that an
// agent killed before it journaled the guest removes them at its next start, and nothing
// else: not a file put at that path since, not a file a record names (a dead guest's disk is
// its operator's), not what a note that cannot be read would name.
import { closeSync, existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { removeArrivalNote, sweepArrivalNotes, writeArrivalNote } from '../../agent/guest/arrival-note.js';
import { GuestRegistry, type GuestRecord } from '../../agent/guest/registry.js';
import { makeTempDir } from '../../agent/local-agent.js';
import { loadNative } from '../../agent/native.js';

describe('arrival notes', () => {
  let root: string;
  let guests: string;
  let memory: string;
  const fds: number[] = [];
  beforeEach(() => {
    root = makeTempDir('gangway-arrival-');
    guests = join(root, 'state', 'guests');
    memory = join(root, 'memory');
    mkdirSync(guests, { recursive: true });
    mkdirSync(memory);
  });
  afterEach(() => {
    for (const fd of fds.splice(0)) closeSync(fd);
    rmSync(root, { recursive: true, force: true });
  });

  /** An unnamed file as a destination makes one, and where its switchover would name it. */
  function unnamed(name: string): { path: string; fd: number } {
    const native = loadNative();
    const fd = native.tmpfileCreate(memory, 4096, false);
    fds.push(fd);
    return { path: join(memory, name), fd };
  }

  it('removes what a switchover named and no record names, then the note', () => {
    const files = [unnamed('gangway-g1-aa.mem'), unnamed('gangway-g1-aa.mem.fingerprints')];
    writeArrivalNote(guests, 'g1', files);
    expect(readdirSync(guests)).toEqual(['g1.arriving']);
    loadNative().tmpfileLink(files[0]!.fd, files[0]!.path);
    // Killed before the second was named: only the first is there.
    const swept = sweepArrivalNotes(guests, new Set());
    expect(swept).toEqual({ removed: [files[0]!.path], unreadable: [] });
    expect(existsSync(files[0]!.path)).toBe(false);
    expect(readdirSync(guests)).toEqual([]);
  });

  it('keeps a path that is another file now, and a path a record names', () => {
    const replaced = unnamed('gangway-g2-bb.mem');
    const recorded = unnamed('gangway-g2-bb.r1.mem');
    writeArrivalNote(guests, 'g2', [replaced, recorded]);
    // The switchover never named the first; someone put a file of their own there since.
    writeFileSync(replaced.path, 'not ours');
    loadNative().tmpfileLink(recorded.fd, recorded.path);
    expect(sweepArrivalNotes(guests, new Set([recorded.path])).removed).toEqual([]);
    expect(existsSync(replaced.path)).toBe(true);
    expect(existsSync(recorded.path)).toBe(true);
    expect(readdirSync(guests)).toEqual([]);
  });

  it('a note that cannot be read is reported and removed, and nothing it names is', () => {
    const file = unnamed('gangway-g3-cc.mem');
    loadNative().tmpfileLink(file.fd, file.path);
    writeFileSync(join(guests, 'g3.arriving'), '{"files":[{"path":"relative","dev":"1","ino":"2"}]}');
    writeFileSync(join(guests, 'g4.arriving'), '{"files":');
    expect(sweepArrivalNotes(guests, new Set())).toEqual({ removed: [], unreadable: ['g3.arriving', 'g4.arriving'] });
    expect(existsSync(file.path)).toBe(true);
    expect(readdirSync(guests)).toEqual([]);
  });

  it('an arrival that ended leaves no note', () => {
    writeArrivalNote(guests, 'g5', [unnamed('gangway-g5-dd.mem')]);
    removeArrivalNote(guests, 'g5');
    removeArrivalNote(guests, 'g5');
    expect(readdirSync(guests)).toEqual([]);
  });

  it('the registry keeps a file the record of a guest found dead names (its disk is its operator\'s), and removes the one nobody names', () => {
    const disk = unnamed('vm6.qcow2-raw');
    const stray = unnamed('gangway-vm6-ee.mem');
    const registry = new GuestRegistry(join(root, 'state'));
    registry.noteArrival('vm6', [disk, stray]);
    for (const file of [disk, stray]) loadNative().tmpfileLink(file.fd, file.path);
    // Journaled naming the disk only, and the guest died before the note went.
    const record: GuestRecord = {
      name: 'vm6',
      kind: 'process',
      pid: 2 ** 22 + 1,
      memoryBytes: 1 << 20,
      pageSizeBytes: 4096,
      files: { memoryPaths: [join(memory, 'gangway-vm6-ff.mem')], deviceStatePath: join(guests, 'vm6-ff.dev'), trackReportPath: join(guests, 'vm6-ff.track'), logPath: join(guests, 'vm6.log'), diskPaths: [disk.path] },
      spec: { memoryBytes: 1 << 20, profile: 'random', dirtyRateBytesPerSec: 0, seed: 1, imageSeed: 0, sharedFraction: 0, hotFraction: 1 },
      origin: { kind: 'migrated', migrationId: '4a4f0e5e-0d47-4a53-9a3e-6a1f5d1c2b3a', from: 'agent-0123456789ab' },
      startedAt: new Date().toISOString(),
    };
    writeFileSync(join(guests, 'vm6.json'), JSON.stringify(record), { mode: 0o600 });
    const again = new GuestRegistry(join(root, 'state'));
    expect(again.load()).toEqual(['vm6']);
    expect(again.removeStrays()).toContain(stray.path);
    expect(existsSync(disk.path)).toBe(true);
    expect(existsSync(stray.path)).toBe(false);
    expect(readdirSync(guests).filter((f) => f.endsWith('.arriving'))).toEqual([]);
  });
});
