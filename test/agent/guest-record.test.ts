// Guest records read back from disk: validated, and a record that does not validate is kept
// on disk, reported and refuses its guest's name, never skipped (it may be the only note of
// where a guest runs).
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { makeTempDir } from '../../agent/local-agent.js';
import { GuestRegistry, type GuestRecord } from '../../agent/guest/registry.js';
import { parseGuestRecord } from '../../agent/guest/record.js';
import { fingerprintsPathOf } from '../../agent/guest/process-guest.js';
import { unreadableRecordsText } from '../../agent/cli/format.js';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';

/** A pid that is certainly alive while the test runs: the test's own. */
const ALIVE = process.pid;

/**
 * A record as today's agent writes it (daemon.ts startGuest, then JSON.stringify with two
 * spaces), field for field, for a guest that was started here.
 */
function startedRecordText(name: string, pid = ALIVE): string {
  return `{
  "name": "${name}",
  "kind": "process",
  "pid": ${pid},
  "memoryBytes": 67108864,
  "pageSizeBytes": 4096,
  "files": {
    "memoryPath": "/dev/shm/gangway-${name}-1a2b3c4d.mem",
    "trackReportPath": "/var/lib/gangway/guests/${name}-1a2b3c4d.track",
    "logPath": "/var/lib/gangway/guests/${name}.log"
  },
  "spec": {
    "memoryBytes": 67108864,
    "profile": "os-image",
    "dirtyRateBytesPerSec": 4194304,
    "seed": 1,
    "imageSeed": 7,
    "sharedFraction": 0,
    "hotFraction": 0.1
  },
  "origin": {
    "kind": "started"
  },
  "startedAt": "2026-12-05T07:29:57.123Z"
}`;
}

/** One migrated in by post-copy (destination.ts guestRecord), and marked outgoing since. */
function migratedRecord(name: string): GuestRecord {
  return {
    name,
    kind: 'process',
    pid: ALIVE,
    memoryBytes: 1 << 20,
    pageSizeBytes: 4096,
    files: { memoryPaths: [`/dev/shm/gangway-${name}-00ff00ff.mem`, `/dev/shm/gangway-${name}-00ff00ff.r1.mem`], deviceStatePath: `/s/guests/${name}-00ff00ff.dev`, trackReportPath: `/s/guests/${name}-00ff00ff.track`, logPath: `/s/guests/${name}.log` },
    // specFromHeader: u64 seeds need not be safe integers.
    spec: { memoryBytes: 1 << 20, regionBytes: [1 << 19, 1 << 19], profile: 'random', dirtyRateBytesPerSec: 0, seed: 2 ** 63, imageSeed: 0, sharedFraction: 0.25, hotFraction: 1 },
    origin: { kind: 'migrated', migrationId: '4a4f0e5e-0d47-4a53-9a3e-6a1f5d1c2b3a', from: 'agent-0123456789ab' },
    startedAt: new Date().toISOString(),
    tap: 'tap-vm1',
    incoming: { migrationId: '4a4f0e5e-0d47-4a53-9a3e-6a1f5d1c2b3a', from: 'agent-0123456789ab', missingPages: 12, stranded: 'the link broke' },
    outgoing: { migrationId: '9d7c1b52-8d51-4a38-8f4e-3f8c3b2a1d00', to: '127.0.0.1:7402', since: new Date().toISOString(), phase: 'postcopy', interrupted: 'peer gone', secret: 'ab'.repeat(32) },
  };
}

describe('guest records read back from disk', () => {
  let stateDir: string;
  let guestsDir: string;
  beforeEach(() => {
    stateDir = makeTempDir('gangway-record-');
    guestsDir = join(stateDir, 'guests');
    mkdirSync(guestsDir, { recursive: true });
  });
  afterEach(() => rmSync(stateDir, { recursive: true, force: true }));

  const write = (file: string, text: string) => writeFileSync(join(guestsDir, file), text, { mode: 0o600 });

  function loaded() {
    const registry = new GuestRegistry(stateDir);
    const dead = registry.load();
    return { registry, dead, unreadable: registry.unreadableRecords() };
  }

  /** The record is kept (on disk, unchanged), reported, and refuses its name. */
  function expectKeptAndRefused(registry: GuestRegistry, name: string, text: string, problem: RegExp) {
    const file = join(guestsDir, `${name}.json`);
    const entry = registry.unreadableRecords().find((r) => r.name === name);
    expect(entry).toBeDefined();
    expect(entry!.file).toBe(file);
    expect(entry!.problem).toMatch(problem);
    for (const act of [() => registry.reserve(name), () => registry.get(name), () => registry.update(name, { tap: 'x' })]) {
      let thrown: unknown;
      try {
        act();
      } catch (err) {
        thrown = err;
      }
      expect(thrown).toBeInstanceOf(GangwayError);
      expect((thrown as GangwayError).code).toBe(ErrorCode.GUEST_EXISTS);
      expect((thrown as GangwayError).message).toContain(file);
      expect((thrown as GangwayError).message).toContain(entry!.problem);
      expect((thrown as GangwayError).message).toMatch(/remove it or fix it, and restart the agent/);
    }
    expect(registry.has(name)).toBe(false);
    expect(registry.list().map((g) => g.record.name)).not.toContain(name);
    expect(readFileSync(file, 'utf8')).toBe(text);
  }

  it('loads a record written before guests had regions (one memoryPath), and one in today\'s format with every optional field', () => {
    write('vm1.json', startedRecordText('vm1'));
    const vm2 = migratedRecord('vm2');
    write('vm2.json', JSON.stringify(vm2, null, 2));
    const { registry, dead, unreadable } = loaded();
    expect(dead).toEqual([]);
    expect(unreadable).toEqual([]);
    const { memoryPath, ...files } = JSON.parse(startedRecordText('vm1')).files;
    expect(registry.get('vm1').record).toEqual({ ...JSON.parse(startedRecordText('vm1')), files: { ...files, memoryPaths: [memoryPath] } });
    expect(registry.get('vm2').guest.regions.map((region) => region.lengthBytes)).toEqual([1 << 19, 1 << 19]);
    expect(registry.get('vm2').record).toEqual(vm2);
    expect(registry.get('vm1').guest.memoryBytes).toBe(67108864);
  });

  it('drops a valid record whose guest is gone, as before', () => {
    // A pid above pid_max (4194304 at most) is never a live process.
    write('gone.json', startedRecordText('gone', 4_194_305));
    const { registry, dead, unreadable } = loaded();
    expect(dead).toEqual(['gone']);
    expect(unreadable).toEqual([]);
    expect(existsSync(join(guestsDir, 'gone.json'))).toBe(false);
    registry.reserve('gone');
  });

  it('removes the memory files of a guest found dead (an agent killed between stopping a guest and removing its files), but for a paused copy that died serving a post-copy', () => {
    const memoryDir = join(stateDir, 'shm');
    mkdirSync(memoryDir);
    const memory = (name: string) => [join(memoryDir, `gangway-${name}-0badf00d.mem`), join(memoryDir, `gangway-${name}-0badf00d.r1.mem`)];
    const dead = (name: string, outgoing?: GuestRecord['outgoing']): GuestRecord => {
      const record = migratedRecord(name);
      record.pid = 4_194_305;
      record.files = { ...record.files, memoryPaths: memory(name) };
      if (outgoing) record.outgoing = outgoing;
      else delete record.outgoing;
      return record;
    };
    const serving = migratedRecord('x').outgoing!;
    write('gone.json', JSON.stringify(dead('gone'), null, 2));
    write('switched.json', JSON.stringify(dead('switched', { ...serving, phase: 'commit' }), null, 2));
    write('serving.json', JSON.stringify(dead('serving', serving), null, 2));
    const files = ['gone', 'switched', 'serving'].flatMap(memory);
    for (const file of files) writeFileSync(file, 'guest memory');
    writeFileSync(fingerprintsPathOf(memory('gone')[0]!), '');
    const { dead: found } = loaded();
    expect(found.sort()).toEqual(['gone', 'serving', 'switched']);
    expect(readdirSync(memoryDir).sort()).toEqual(memory('serving').map((path) => path.slice(memoryDir.length + 1)).sort());
    expect(readdirSync(guestsDir)).toEqual([]);
  });

  it("removes the files no record names (a VM arriving when the agent died, a guest found dead but for its log and console), keeps its guests' own, and removes nothing while a record cannot be read", () => {
    const vm2 = migratedRecord('vm2');
    const own = (name: string) => join(guestsDir, name);
    vm2.files = { ...vm2.files, trackReportPath: own('vm2-00ff00ff.track'), logPath: own('vm2.log'), deviceStatePath: own('vm2-00ff00ff.dev') };
    write('vm2.json', JSON.stringify(vm2, null, 2));
    write('gone.json', startedRecordText('gone', 4_194_305));
    // A guest found dead keeps its log and console: why it died.
    const kept = ['vm2.json', 'vm2-00ff00ff.track', 'vm2-00ff00ff.track.1', 'vm2.log', 'vm2-00ff00ff.dev', 'vm3.json.tmp', 'gone.log', 'gone-0badf00d.console'];
    const strays = ['0badc0de.qmp', '0badc0de.state-in', '0badc0de.disks', 'vm3-0badc0de.console', 'vm3.log', 'gone-0badf00d.track', 'vm2-1234abcd.track'];
    for (const file of [...kept.slice(1), ...strays]) write(file, '');
    const { registry, dead } = loaded();
    expect(dead).toEqual(['gone']);
    expect(registry.removeStrays().sort()).toEqual([...strays].sort());
    expect(readdirSync(guestsDir).sort()).toEqual([...kept].sort());
    // With a record it cannot read, the agent cannot tell whose a file is: it keeps them all.
    write('bad.json', '{');
    write('0badc0de.qmp', '');
    const again = loaded();
    expect(again.registry.removeStrays()).toEqual([]);
    expect(existsSync(own('0badc0de.qmp'))).toBe(true);
  });

  it('a guest journaled again (the same process) keeps its object; another process of that name gets a new one', () => {
    const { registry } = loaded();
    const record = migratedRecord('vm4');
    const first = registry.add(record);
    expect(registry.add({ ...record, incoming: undefined })).toBe(first);
    expect(registry.get('vm4').record.incoming).toBeUndefined();
    expect(registry.add({ ...record, pid: 4_194_305 })).not.toBe(first);
  });

  it('keeps a truncated record, reports it and refuses its name', () => {
    const text = startedRecordText('cut').slice(0, 120);
    write('cut.json', text);
    write('ok.json', startedRecordText('ok'));
    const { registry, unreadable } = loaded();
    expect(unreadable).toHaveLength(1);
    expectKeptAndRefused(registry, 'cut', text, /^not valid JSON: /);
    // Others are not held up by it.
    expect(registry.get('ok').record.name).toBe('ok');
  });

  it('keeps an empty record (a write cut short by a crash)', () => {
    write('empty.json', '');
    const { registry } = loaded();
    expectKeptAndRefused(registry, 'empty', '', /the file is empty/);
  });

  it('keeps a record with a wrong field type, naming the field, the value and what is allowed', () => {
    const text = startedRecordText('wrong').replace(`"pid": ${ALIVE}`, `"pid": "${ALIVE}"`);
    write('wrong.json', text);
    const { registry } = loaded();
    expectKeptAndRefused(registry, 'wrong', text, new RegExp(`^'pid' must be a whole number of at least 1 \\(got "${ALIVE}"\\)$`));
  });

  it('keeps a record of an unknown kind, listing the kinds there are', () => {
    const text = startedRecordText('vmx').replace('"kind": "process"', '"kind": "firecracker"');
    write('vmx.json', text);
    const { registry } = loaded();
    expectKeptAndRefused(registry, 'vmx', text, /^'kind' must be one of: process, qemu \(got "firecracker"\)$/);
  });

  it('names nested fields, missing fields, unknown fields and a malformed secret (without showing it)', () => {
    const record = migratedRecord('deep') as unknown as Record<string, Record<string, unknown>>;
    record.outgoing!.phase = 'switch';
    record.outgoing!.secret = 'not-hex-and-secret';
    record.spec!.hotFraction = 2;
    delete record.files!.logPath;
    record.origin!.extra = 1;
    record.future = { a: 1 } as never;
    const text = JSON.stringify(record, null, 2);
    write('deep.json', text);
    const { registry, unreadable } = loaded();
    const problem = unreadable[0]!.problem;
    expect(problem).toContain("'outgoing.phase' must be one of: paused, commit, postcopy (got \"switch\")");
    expect(problem).toContain("'outgoing.secret' must be the migration's secret: 64 hex digits (got 18 characters)");
    expect(problem).not.toContain('not-hex-and-secret');
    expect(problem).toContain("'spec.hotFraction' must be a number from 0 to 1 (got 2)");
    expect(problem).toContain("'files.logPath' is missing (it must be non-empty text)");
    expect(problem).toContain("'future' is not a field of a guest record (allowed: ");
    expect(problem).toMatch(/'origin/);
    expectKeptAndRefused(registry, 'deep', text, /outgoing\.phase/);
  });

  it('keeps a record that names another guest than its file', () => {
    const text = startedRecordText('other');
    write('this.json', text);
    const { registry } = loaded();
    expectKeptAndRefused(registry, 'this', text, /'name' is "other" but the file is named for "this"/);
    expect(registry.has('other')).toBe(false);
  });

  it('keeps a record that is not an object, or cannot be read at all', () => {
    write('list.json', '[1, 2]');
    mkdirSync(join(guestsDir, 'dir.json'));
    const { registry } = loaded();
    expectKeptAndRefused(registry, 'list', '[1, 2]', /must be an object with a guest's fields \(got a list\)/);
    expect(registry.unreadableRecords().find((r) => r.name === 'dir')?.problem).toMatch(/cannot be read \(EISDIR\)/);
    expect(() => registry.reserve('dir')).toThrow(/dir\.json/);
  });

  it('ignores a stale NAME.json.tmp left by a crash: not a record, and the next write replaces it', () => {
    // A crash between writing the .tmp and renaming it: NAME.json is still the last complete record.
    write('vm1.json', startedRecordText('vm1'));
    write('vm1.json.tmp', startedRecordText('vm1').slice(0, 50));
    write('vm2.json.tmp', '{"name": "vm2"');
    // One left as a symlink: the next write must not follow it.
    const target = join(stateDir, 'elsewhere');
    writeFileSync(target, 'untouched');
    symlinkSync(target, join(guestsDir, 'vm3.json.tmp'));
    const { registry, dead, unreadable } = loaded();
    expect(dead).toEqual([]);
    expect(unreadable).toEqual([]);
    expect(registry.list().map((g) => g.record.name)).toEqual(['vm1']);

    registry.update('vm1', { tap: 'tap1' });
    expect(JSON.parse(readFileSync(join(guestsDir, 'vm1.json'), 'utf8')).tap).toBe('tap1');
    registry.reserve('vm2');
    registry.add((parseGuestRecord(startedRecordText('vm2'), 'vm2.json') as { record: GuestRecord }).record);
    registry.reserve('vm3');
    registry.add((parseGuestRecord(startedRecordText('vm3'), 'vm3.json') as { record: GuestRecord }).record);
    expect(readFileSync(target, 'utf8')).toBe('untouched');
    expect(readdirSync(guestsDir).sort()).toEqual(['vm1.json', 'vm2.json', 'vm3.json']);

    // What was written reads back.
    const again = loaded();
    expect(again.unreadable).toEqual([]);
    expect(again.registry.list().map((g) => g.record.name).sort()).toEqual(['vm1', 'vm2', 'vm3']);
    expect(again.registry.get('vm1').record.tap).toBe('tap1');
  });

  it('a record written by add() and update() validates as written', () => {
    const registry = new GuestRegistry(stateDir);
    registry.reserve('vm2');
    const record = migratedRecord('vm2');
    registry.add(record);
    registry.update('vm2', { incoming: undefined, outgoing: { ...record.outgoing!, phase: 'commit', secret: undefined } });
    const text = readFileSync(join(guestsDir, 'vm2.json'), 'utf8');
    const parsed = parseGuestRecord(text, 'vm2.json');
    expect('record' in parsed && parsed.record).toEqual(JSON.parse(text));
    expect('record' in parsed && parsed.record.incoming).toBeUndefined();
  });

  it('status lines say what is wrong and what to do', () => {
    const lines = unreadableRecordsText([{ file: '/s/guests/vmX.json', name: 'vmX', problem: 'not valid JSON: Unexpected end of JSON input' }]);
    expect(lines.join('\n')).toContain('/s/guests/vmX.json: not valid JSON: Unexpected end of JSON input');
    expect(lines.join('\n')).toMatch(/guest "vmX" is refused .* inspect the file .* then remove it or fix it, and restart the agent/);
  });
});
