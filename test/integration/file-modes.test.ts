// Guest memory was world-readable: gangway-guest created its memory file 0644, so any user on
// the host could read a guest's memory. Under the usual umask 022, every file and dir that
// agents and their guests create (state dir, agent id, records, logs, tracking reports, the
// memory files at both ends of a migration) must belong to the agent's user and be open to
// nobody else, except the state dir (0750) and control.sock (0660), which the control group
// may reach on purpose. And gangway-guest must never create a memory file through a symlink
// or over a file that is already there.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, lstatSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir } from '../../agent/local-agent.js';
import { guestBinaryPath } from '../../agent/native.js';
import { builtAgent, Cluster, shmFilesOf, uniqueName } from '../helpers/cluster.js';
import { waitFor } from '../helpers/wait.js';

const uid = process.getuid!();
const builtGuest = existsSync(guestBinaryPath);

// Agents and guests are spawned by this process and inherit its umask: 022 lets group and
// others read whatever is created without an explicit mode, which is what must not happen.
let savedUmask: number;
beforeAll(() => {
  savedUmask = process.umask(0o022);
});
afterAll(() => {
  process.umask(savedUmask);
});

/** The one mode each kind of entry may have. */
function expectedMode(root: string, path: string, isDir: boolean): number {
  if (path === root) return 0o750; // the control group may search it, to reach control.sock
  if (relative(root, path) === 'control.sock') return 0o660; // the control group's way in
  return isDir ? 0o700 : 0o600;
}

/** Every entry under `root` (itself included), as `{ path: 'mode uid' }`, for one comparison that names each offender. */
function modesUnder(root: string): { actual: Record<string, string>; expected: Record<string, string> } {
  const actual: Record<string, string> = {};
  const expected: Record<string, string> = {};
  const visit = (path: string) => {
    const stat = lstatSync(path);
    const isDir = stat.isDirectory();
    actual[path] = `${(stat.mode & 0o7777).toString(8)} uid=${stat.uid}${stat.isSymbolicLink() ? ' symlink' : ''}`;
    expected[path] = `${expectedMode(root, path, isDir).toString(8)} uid=${uid}`;
    if (isDir) for (const entry of readdirSync(path)) visit(join(path, entry));
  };
  visit(root);
  return { actual, expected };
}

function expectPrivate(root: string): Record<string, string> {
  const { actual, expected } = modesUnder(root);
  expect(actual).toEqual(expected);
  return actual;
}

function expectPrivateFile(path: string): void {
  const stat = lstatSync(path);
  expect(stat.isFile(), `${path} is a regular file`).toBe(true);
  expect({ path, mode: (stat.mode & 0o7777).toString(8), uid: stat.uid }).toEqual({ path, mode: '600', uid });
}

describe.skipIf(!builtAgent)(`files of agents and guests${builtAgent ? '' : ' (skipped: the agent is not built: npm run build)'}`, () => {
  let cluster: Cluster | undefined;
  let name = '';
  afterEach(async () => {
    await cluster?.cleanup();
    cluster = undefined;
    // killGuestsOf only reaches guests an agent still lists.
    for (const file of name ? shmFilesOf(name) : []) rmSync(join('/dev/shm', file), { force: true });
  });

  it('leaves nothing readable by others after a guest starts and migrates (guest memory was 0644)', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a', ['--control-listen', '127.0.0.1:0']);
    const b = await cluster.agent('b');
    name = uniqueName('fm');
    const start = await cluster.cli(a, ['guest', 'start', name, '--memory', '16MiB', '--dirty-rate', '1MiB/s']);
    expect(start.exitCode, start.stderr).toBe(0);
    const source = (await a.status()).guests.find((g) => g.name === name)!;
    expect(source).toBeDefined();

    // At the source: the memory file, and the record, log and tracking report in guests/.
    expectPrivateFile(source.memoryPath);
    const before = expectPrivate(a.stateDir);
    for (const file of ['agent.json', 'agent.log', 'control.sock', 'control.token', 'guests', `guests/${name}.json`, `guests/${name}.log`]) {
      expect(Object.keys(before), file).toContain(join(a.stateDir, file));
    }
    expect(Object.keys(before).some((path) => path.startsWith(join(a.stateDir, 'guests', `${name}-`)) && path.endsWith('.track'))).toBe(true);

    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--json']);
    expect(run.exitCode, run.stderr).toBe(0);

    // At the destination: the received memory file (named at the commit) and its guest's files.
    const moved = (await b.status()).guests.find((g) => g.name === name)!;
    expect(moved).toBeDefined();
    expect(shmFilesOf(name)).toEqual([moved.memoryPath.replace('/dev/shm/', '')]);
    expectPrivateFile(moved.memoryPath);
    const after = expectPrivate(b.stateDir);
    for (const file of ['agent.json', 'agent.log', 'control.sock', 'guests', `guests/${name}.json`, `guests/${name}.log`]) {
      expect(Object.keys(after), file).toContain(join(b.stateDir, file));
    }
    expect(Object.keys(after).some((path) => path.startsWith(join(b.stateDir, 'guests', `${name}-`)) && path.endsWith('.track'))).toBe(true);
    // The source rewrote and removed files as it gave the guest up: still nothing open.
    expectPrivate(a.stateDir);
  });
});

describe.skipIf(!builtGuest)(`gangway-guest memory files${builtGuest ? '' : ` (skipped: ${guestBinaryPath} is not built: npm run build)`}`, () => {
  let dir: string;
  const children: ChildProcess[] = [];
  beforeAll(() => {
    dir = makeTempDir('gangway-test-modes-');
  });
  afterEach(() => {
    for (const child of children) child.kill('SIGKILL');
    children.length = 0;
  });
  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const guest = (args: string[]) => spawnSync(guestBinaryPath, args, { encoding: 'utf8', timeout: 10_000 });
  const create = (path: string) => guest(['run', '--memory-file', path, '--create', '--memory-bytes', '65536']);

  /** Starts gangway-guest and waits until it has its file mapped. */
  async function running(args: string[]): Promise<ChildProcess> {
    const child = spawn(guestBinaryPath, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    children.push(child);
    let out = '';
    let err = '';
    child.stdout!.on('data', (data: Buffer) => (out += data.toString()));
    child.stderr!.on('data', (data: Buffer) => (err += data.toString()));
    await waitFor(`gangway-guest ${args[0]} running (stderr: ${err})`, () => out.includes('running pid='));
    return child;
  }

  it('creates the memory file 0600 with run --create and with poke', async () => {
    const created = join(dir, 'created.mem');
    await running(['run', '--memory-file', created, '--create', '--memory-bytes', '65536']);
    expectPrivateFile(created);
    const poked = join(dir, 'poked.mem');
    await running(['poke', '--memory-file', poked, '--memory-bytes', '65536']);
    expectPrivateFile(poked);
  });

  it('refuses run --create on a symlink to a file, and leaves the file alone', () => {
    const target = join(dir, 'precious');
    writeFileSync(target, 'not guest memory\n', { mode: 0o644 });
    const link = join(dir, 'link-to-file.mem');
    symlinkSync(target, link);
    const r = create(link);
    expect(r.status, r.stderr).toBe(3);
    expect(r.stderr).toContain(link);
    expect(r.stderr).toContain('File exists');
    expect(readFileSync(target, 'utf8')).toBe('not guest memory\n');
    expect(lstatSync(target).mode & 0o777).toBe(0o644);
    expect(lstatSync(link).isSymbolicLink()).toBe(true);
  });

  it('refuses run --create and poke on a dangling symlink: nothing is created where it points', () => {
    const target = join(dir, 'planted');
    const link = join(dir, 'dangling.mem');
    symlinkSync(target, link);
    const r = create(link);
    expect(r.status, r.stderr).toBe(3);
    expect(r.stderr).toContain('File exists');
    expect(existsSync(target)).toBe(false);
    const poke = spawnSync(guestBinaryPath, ['poke', '--memory-file', link, '--memory-bytes', '65536'], { encoding: 'utf8', input: '', timeout: 10_000 });
    expect(poke.status, poke.stderr).toBe(3);
    expect(existsSync(target)).toBe(false);
    expect(lstatSync(link).isSymbolicLink()).toBe(true);
  });

  it('refuses run --create on an existing file instead of truncating it', () => {
    const path = join(dir, 'existing.mem');
    writeFileSync(path, 'someone else\'s\n');
    const r = create(path);
    expect(r.status, r.stderr).toBe(3);
    expect(r.stderr).toContain('File exists');
    expect(r.stderr).toContain('--create');
    expect(readFileSync(path, 'utf8')).toBe('someone else\'s\n');
  });

  it('refuses to resume through a symlink', () => {
    const target = join(dir, 'resume-target');
    writeFileSync(target, Buffer.alloc(65536));
    const link = join(dir, 'resume-link.mem');
    symlinkSync(target, link);
    const r = guest(['run', '--memory-file', link]);
    expect(r.status, r.stderr).toBe(3);
    expect(r.stderr).toContain('symlink');
    expect(r.stderr).not.toContain('bad magic'); // refused at open, not read
  });
});
