// The chaos campaign's machinery: two agents (each in a network namespace of its own where
// the host allows, mutual TLS; the destination's memory directory on a small tmpfs), and for
// each run: its guests started at the source, `gangway migrate` run as an operator runs it,
// the run's fault injected at its moment and healed, the agents left to settle, and the
// invariants checked (invariants.ts). A killed or stopped agent is restarted on the same
// state directory and address, as systemd would.
import { execa } from 'execa';
import { existsSync, mkdirSync, readdirSync, rmSync, statfsSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { initCa, issueHostCert, type CertResult } from '../../agent/cli/certs.js';
import { qemuMissing } from '../../agent/guest/qemu-guest.js';
import { writeTestvmBaseImage } from '../../agent/guest/testvm-disk.js';
import { runTestvmFullCheck } from '../../agent/guest/testvm-status.js';
import { testvmDir, testvmMissing, TESTVM_KERNEL_FILE } from '../../agent/native.js';
import { killGuestsOf, makeTempDir, startLocalAgent, type AgentStatus, type LocalAgent, type LocalAgentOptions } from '../../agent/local-agent.js';
import { createShapedLink, netnsAvailable, run, type ShapedLink } from '../netns-link.js';
import { judgePlacement, leftoverViolations, settled, type GuestView, type Outcome } from './invariants.js';
import { FAULT_KINDS, LINK_FAULTS, VM_MEMORY_BYTES, type FaultKind, type GuestPlan, type RunPlan } from './schedule.js';

const MIGRATE_TIMEOUT_MS = 180_000;
const SETTLE_TIMEOUT_MS = 120_000;
/** Passes of the guest's own check to wait for after the run settled (each reads all its memory). */
const CHECK_TIMEOUT_MS = 30_000;
const MEMORY_TMPFS_BYTES = 768 * 1024 * 1024;
const PEER_PORT = 7731;
/** The run's guest processes: gangway-guest, and QEMU for VMs (both name the guest on their command line). */
const GUEST_PROCESSES = 'gangway-guest|qemu-system';
/** A VM's kernel answers a full check of 64 MiB (and its disk) in seconds under TCG; a loaded host needs more. */
const VM_CHECK_TIMEOUT_MS = 90_000;
const VM_DISK_BYTES = 16 * 1024 * 1024;

export interface RunResult {
  plan: RunPlan;
  outcomes: Record<string, Outcome | 'unknown'>;
  migrateExit: number | undefined;
  /** What the fault did, as it happened (a fault whose moment came after the migration ended did nothing). */
  faultNote: string;
  violations: string[];
  /** Why the migrate command said guests did not move (its --json error or failed[] entries). */
  migrateErrors: string[];
  /** Where the run's time went. */
  phasesMs: { migrate: number; settle: number; check: number; cleanup: number };
  seconds: number;
}

type Role = 'source' | 'destination';

export class ChaosHosts {
  readonly faults: readonly FaultKind[];
  /** QEMU and the test kernel are here: runs may move VMs, with disks. */
  readonly vms: boolean;
  private readonly agents: Record<Role, LocalAgent | undefined> = { source: undefined, destination: undefined };
  private readonly options: Record<Role, LocalAgentOptions>;
  private constructor(
    private readonly tmp: string,
    private readonly link: ShapedLink | undefined,
    /** The destination's memory directory, a tmpfs of its own (where one could be mounted). */
    readonly memoryDir: string | undefined,
    options: Record<Role, LocalAgentOptions>,
    readonly to: string,
    vms: boolean,
  ) {
    this.options = options;
    this.vms = vms;
    this.faults = FAULT_KINDS.filter((kind) => (link || !LINK_FAULTS.includes(kind)) && (memoryDir || kind !== 'memory-full'));
  }

  /** Sets up the hosts; `notes` collects why some faults cannot be injected here. */
  static async create(mainPath: string | undefined, notes: string[]): Promise<ChaosHosts> {
    const tmp = makeTempDir('gangway-chaos-');
    let link: ShapedLink | undefined;
    let memoryDir: string | undefined;
    try {
      const netns = await netnsAvailable();
      if (netns.ok) link = await createShapedLink({ name: `c${process.pid % 100000}`, rateBitsPerSec: 2e9 });
      else notes.push(`no link faults: ${netns.reason}`);
      const mount = join(tmp, 'destination-memory');
      mkdirSync(mount, { mode: 0o700 });
      try {
        await run(['mount', '-t', 'tmpfs', '-o', `size=${MEMORY_TMPFS_BYTES},mode=0700`, 'gangway-chaos', mount]);
        memoryDir = mount;
      } catch (err) {
        notes.push(`no memory-full faults: cannot mount a tmpfs (${(err as Error).message.split('\n')[0]})`);
      }
      const caDir = join(tmp, 'tls');
      await initCa({ dir: caDir, days: 1 });
      const sans = (addr?: string) => ['127.0.0.1', ...(addr ? [addr] : [])];
      const sourceCert = await issueHostCert({ dir: caDir, name: 'source', sans: sans(link?.addrA), validity: { days: 1 } });
      const destinationCert = await issueHostCert({ dir: caDir, name: 'destination', sans: sans(link?.addrB), validity: { days: 1 } });
      const tls = (cert: CertResult, peer: CertResult) => ({ cert: cert.certPath, key: cert.keyPath, ca: cert.caPath, allow: [peer.fingerprint] });
      // Fixed addresses: a restarted agent must be found where it was.
      const sourceListen = link ? `${link.addrA}:${PEER_PORT}` : `127.0.0.1:${await freePort()}`;
      const destinationListen = link ? `${link.addrB}:${PEER_PORT}` : `127.0.0.1:${await freePort()}`;
      // A short peer timeout: a stalled or cut-off peer is noticed within seconds, not the default 15.
      const common = ['--peer-timeout', '4s', '--postcopy-reattach', '90s'];
      const vmMissing = qemuMissing() ?? testvmMissing();
      if (vmMissing) notes.push(`no VMs: ${vmMissing}`);
      // Each host's VM disks directory: a moved disk arrives in the destination's.
      const vmArgs = (role: Role) => {
        if (vmMissing) return [];
        const disks = join(tmp, `${role}-disks`);
        mkdirSync(disks, { mode: 0o700 });
        return ['--vm-images-dir', testvmDir, '--vm-disks-dir', disks];
      };
      const options: Record<Role, LocalAgentOptions> = {
        source: {
          stateDir: join(tmp, 'source'),
          listen: sourceListen,
          tls: tls(sourceCert, destinationCert),
          args: [...common, ...vmArgs('source')],
          ...(mainPath ? { mainPath } : {}),
          ...(link ? { wrap: link.netnsExecPrefix(link.nsA) } : {}),
        },
        destination: {
          stateDir: join(tmp, 'destination'),
          listen: destinationListen,
          tls: tls(destinationCert, sourceCert),
          args: [...common, ...vmArgs('destination'), ...(memoryDir ? ['--memory-dir', memoryDir] : [])],
          ...(mainPath ? { mainPath } : {}),
          ...(link ? { wrap: link.netnsExecPrefix(link.nsB) } : {}),
        },
      };
      const hosts = new ChaosHosts(tmp, link, memoryDir, options, destinationListen, vmMissing === undefined);
      await hosts.start('source');
      await hosts.start('destination');
      return hosts;
    } catch (err) {
      if (memoryDir) await run(['umount', memoryDir]).catch(() => {});
      await link?.close().catch(() => {});
      rmSync(tmp, { recursive: true, force: true });
      throw err;
    }
  }

  agent(role: Role): LocalAgent {
    const agent = this.agents[role];
    if (!agent) throw new Error(`the ${role} agent is not running`);
    return agent;
  }

  private async start(role: Role): Promise<void> {
    this.agents[role] = await startLocalAgent(this.options[role]);
  }

  /** Restarts an agent that is not running (killed or stopped by a fault). */
  private async ensureRunning(role: Role): Promise<void> {
    const agent = this.agents[role];
    if (agent && agent.process.exitCode === null && agent.process.signalCode === null) return;
    await this.start(role);
  }

  /** Runs `plan` and checks what must hold afterwards. */
  async runOne(plan: RunPlan): Promise<RunResult> {
    const started = performance.now();
    const names = plan.guests.map((g) => g.name);
    const violations: string[] = [];
    const outcomes: RunResult['outcomes'] = Object.fromEntries(names.map((n) => [n, 'unknown' as const]));
    let migrateExit: number | undefined;
    let faultNote = 'not injected';
    const migrateErrors: string[] = [];
    const phasesMs = { migrate: 0, settle: 0, check: 0, cleanup: 0 };
    let mark = performance.now();
    const lap = (phase: keyof typeof phasesMs) => {
      const now = performance.now();
      phasesMs[phase] = now - mark;
      mark = now;
    };
    try {
      for (const guest of plan.guests) await this.startGuest(guest, plan.seed);
      const migrate = execa(
        process.execPath,
        [this.options.source.mainPath ?? 'dist/agent/main.js', 'migrate', ...names, '--to', this.to, '--technique', plan.technique, '--strategy', plan.strategy, '--json', '--state-dir', this.options.source.stateDir],
        { reject: false, timeout: MIGRATE_TIMEOUT_MS },
      );
      const ended = migrate.then(() => undefined);
      // The fault's moment counts from when the source lists the migration as running, not
      // from the command's start (its start-up and the offer take seconds on a loaded host).
      const fault = this.runningSeen(names, ended)
        .then((seen) => seen && Promise.race([ended.then(() => false), sleep(plan.fault.atMs).then(() => true)]))
        .then(async (due) => {
          if (!due) return void (faultNote = `the migration ended before the fault's moment (${plan.fault.atMs} ms after it started)`);
          faultNote = await this.inject(plan, names, ended);
        })
        // A fault the host could not inject is the campaign's problem, not gangway's: noted,
        // and the run is still checked.
        .catch((err: Error) => void (faultNote = `the fault could not be injected: ${err.message}`));
      const result = await migrate;
      migrateExit = result.exitCode;
      migrateErrors.push(...migrateErrorsOf(String(result.stdout), String(result.stderr)));
      await fault;
      await this.heal();
      lap('migrate');
      await this.settle(names, violations);
      lap('settle');
      await this.judge(plan, names, outcomes, violations);
      lap('check');
    } catch (err) {
      violations.push(`the run failed: ${(err as Error).message}`);
      await this.heal().catch(() => {});
    } finally {
      mark = performance.now();
      violations.push(...(await this.removeGuests(names)));
      lap('cleanup');
    }
    return { plan, outcomes, migrateExit, faultNote, violations, migrateErrors, phasesMs, seconds: (performance.now() - started) / 1000 };
  }

  /** The disk file of a VM of the run, in a host's disks directory. */
  private diskPath(role: Role, name: string): string {
    return join(this.tmp, `${role}-disks`, `${name}.raw`);
  }

  private async startGuest(guest: GuestPlan, seed: number): Promise<void> {
    const source = this.agent('source');
    if (guest.kind === 'process') {
      await source.client.call('POST', '/v1/guests', {
        name: guest.name,
        memoryBytes: guest.memoryBytes,
        profile: 'os-image',
        dirtyRateBytesPerSec: guest.dirtyRateBytesPerSec,
        seed,
        imageSeed: 1,
        sharedFraction: 0.5,
        hotFraction: 0.25,
      });
      return;
    }
    // The test kernel: random pages rewritten at its rate, each checked when it is revisited;
    // with a disk, 2048 base blocks and 256 hot ones rewritten and checked likewise.
    const rate = guest.vmPagesPerSec ? `gw.rate=${guest.vmPagesPerSec}` : 'gw.rate=0';
    let append = `gw.profile=random gw.seed=${seed % 100000} ${rate}`;
    if (guest.disk) {
      writeTestvmBaseImage(this.diskPath('source', guest.name), { sizeBytes: VM_DISK_BYTES, baseBlocks: 2048, imageSeed: 7n });
      append += ' gw.image_seed=7 gw.disk_base=2048 gw.disk_hot=256 gw.disk_rate=200';
    }
    await source.client.call('POST', '/v1/vms', {
      name: guest.name,
      definition: { machine: 'q35', cpus: 1, accel: 'tcg', kernel: TESTVM_KERNEL_FILE, append },
      regionBytes: [VM_MEMORY_BYTES],
      ...(guest.disk ? { disks: [`${guest.name}.raw`] } : {}),
    });
  }

  /** Resolves true once the source lists a running outgoing migration of the run's guests, false if the command ended first. */
  private async runningSeen(names: readonly string[], ended: Promise<void>): Promise<boolean> {
    let over = false;
    void ended.then(() => (over = true));
    while (!over) {
      const status = await this.agent('source').status().catch(() => undefined);
      if (status?.migrations.some((m) => m.direction === 'out' && m.state === 'running' && names.includes(m.guest))) return true;
      await Promise.race([sleep(50), ended]);
    }
    return false;
  }

  // ── faults ──────────────────────────────────────────────────────────────────────────────

  private filler: string | undefined;
  private dropRule: string[] | undefined;
  private linkDown = false;
  private stopped: number[] = [];

  private async inject(plan: RunPlan, names: readonly string[], ended: Promise<void>): Promise<string> {
    const { kind, forMs } = plan.fault;
    const hold = () => Promise.race([sleep(forMs), ended]);
    switch (kind) {
      case 'none':
        return 'no fault';
      case 'kill-source':
      case 'kill-destination':
      case 'term-source':
      case 'term-destination': {
        const role: Role = kind.endsWith('source') ? 'source' : 'destination';
        const agent = this.agent(role);
        if (kind.startsWith('kill')) await agent.kill();
        else await agent.stop(20_000);
        // Dead for a while (the migration command may end meanwhile), then back, as systemd restarts it.
        await sleep(forMs);
        await this.ensureRunning(role);
        return `${kind.startsWith('kill') ? 'SIGKILL' : 'SIGTERM'} to the ${role} agent, restarted after ${forMs} ms`;
      }
      case 'stall-source':
      case 'stall-destination': {
        const pid = this.agent(kind === 'stall-source' ? 'source' : 'destination').pid;
        process.kill(pid, 'SIGSTOP');
        this.stopped.push(pid);
        await sleep(forMs);
        process.kill(pid, 'SIGCONT');
        this.stopped = this.stopped.filter((p) => p !== pid);
        return `the ${kind.slice(6)} agent stopped (SIGSTOP) for ${forMs} ms`;
      }
      case 'cancel': {
        const source = this.agent('source');
        const status = await source.status();
        const running = status.migrations.filter((m) => m.state === 'running' && m.direction === 'out' && names.includes(m.guest));
        if (running.length === 0) return 'cancel: no migration was running';
        const answers = await Promise.all(running.map((m) => source.client.cancel(m.migrationId).then(() => 'cancelled', (err: Error) => err.message)));
        return `cancel: ${answers.join('; ')}`;
      }
      case 'link-down': {
        const link = this.link!;
        await run(['ip', '-n', link.nsA, 'link', 'set', link.nsA, 'down']);
        this.linkDown = true;
        await hold();
        await this.heal();
        return `link down for ${forMs} ms (or until the migration ended)`;
      }
      case 'drop': {
        const link = this.link!;
        this.dropRule = ['-p', 'tcp', '--dport', String(PEER_PORT), '-j', 'DROP'];
        await run(['ip', 'netns', 'exec', link.nsB, 'iptables', '-w', '-I', 'INPUT', ...this.dropRule]);
        await hold();
        await this.heal();
        return `peer packets dropped at the destination for ${forMs} ms (or until the migration ended)`;
      }
      case 'memory-full': {
        const dir = this.memoryDir!;
        this.filler = join(dir, 'chaos-filler');
        // The guest's memory file grows meanwhile: a filler that no longer fits is tried smaller.
        let fillBytes = 0;
        for (const keepBytes of [4, 16, 64].map((mib) => mib * 1024 * 1024)) {
          const { bavail, bsize } = statfsSync(dir);
          fillBytes = Math.max(0, bavail * bsize - keepBytes);
          const done = await run(['fallocate', '-l', String(fillBytes), this.filler]).then(() => true, () => false);
          if (done) break;
          if (keepBytes === 64 * 1024 * 1024) throw new Error(`cannot fill ${dir}: fallocate of ${fillBytes} bytes failed`);
        }
        // Freed after a while, as an operator would make room (a post-copy's pages wait for
        // it), or when the migration ended (a refused offer, a pre-copy that failed).
        await hold();
        rmSync(this.filler, { force: true });
        this.filler = undefined;
        return `the destination's memory directory filled (${Math.round(fillBytes / 2 ** 20)} MiB) for ${forMs} ms (or until the migration ended)`;
      }
    }
  }

  /** Undoes what a fault left: processes stopped, the link, the DROP rule, the filler; agents not running are restarted. */
  async heal(): Promise<void> {
    for (const pid of this.stopped.splice(0)) process.kill(pid, 'SIGCONT');
    if (this.linkDown && this.link) {
      await run(['ip', '-n', this.link.nsA, 'link', 'set', this.link.nsA, 'up']);
      this.linkDown = false;
    }
    if (this.dropRule && this.link) {
      await run(['ip', 'netns', 'exec', this.link.nsB, 'iptables', '-w', '-D', 'INPUT', ...this.dropRule]);
      this.dropRule = undefined;
    }
    if (this.filler) {
      rmSync(this.filler, { force: true });
      this.filler = undefined;
    }
    await this.ensureRunning('source');
    await this.ensureRunning('destination');
  }

  // ── after the run ───────────────────────────────────────────────────────────────────────

  private async settle(names: readonly string[], violations: string[]): Promise<void> {
    const deadline = performance.now() + SETTLE_TIMEOUT_MS;
    for (;;) {
      const [source, destination] = await Promise.all([this.agent('source').status(), this.agent('destination').status()]);
      if (settled(source, names) && settled(destination, names)) return;
      if (performance.now() > deadline) {
        violations.push(`the agents did not settle within ${SETTLE_TIMEOUT_MS / 1000} s: ${unsettledText(source, destination, names)}`);
        return;
      }
      await sleep(250);
    }
  }

  /**
   * A VM where it runs: its kernel's full check of every page (and every block of its disk)
   * finds nothing stale, nor did its running checks; its disk file is on that host only.
   */
  private async judgeVm(guest: GuestPlan, role: Role, view: GuestView): Promise<string[]> {
    const problems: string[] = [];
    const at = `at the ${role}`;
    if (!view.memoryPath) return [`${guest.name}: the ${role} lists no memory file for the VM`];
    try {
      const status = await runTestvmFullCheck(view.memoryPath, VM_CHECK_TIMEOUT_MS, 100);
      if (status.checkStalePages > 0 || status.stalePages > 0) problems.push(`${guest.name}: its kernel found ${status.checkStalePages} stale pages in a full check (${status.stalePages} while running) ${at}`);
      if (guest.disk) {
        const disk = status.disk;
        if (!disk || disk.state !== 'running') problems.push(`${guest.name}: its kernel's disk is ${disk?.state ?? 'absent'} ${at}`);
        else if (disk.checkStaleBlocks > 0 || disk.staleBlocks > 0 || disk.errors > 0) problems.push(`${guest.name}: its kernel found ${disk.checkStaleBlocks} stale blocks in a full check (${disk.staleBlocks} while running, ${disk.errors} I/O errors) ${at}`);
      }
    } catch (err) {
      problems.push(`${guest.name}: ${(err as Error).message} ${at}`);
    }
    if (guest.disk) {
      const other: Role = role === 'source' ? 'destination' : 'source';
      if (!existsSync(this.diskPath(role, guest.name))) problems.push(`${guest.name}: runs ${at} without its disk file there`);
      if (existsSync(this.diskPath(other, guest.name))) problems.push(`${guest.name}: runs ${at}, and the ${other} still has a copy of its disk`);
    }
    return problems;
  }

  private async judge(plan: RunPlan, names: readonly string[], outcomes: RunResult['outcomes'], violations: string[]): Promise<void> {
    const views = async () => {
      const [source, destination] = await Promise.all([this.agent('source').status(), this.agent('destination').status()]);
      return names.map((name) => ({ name, source: source.guests.find((g) => g.name === name), destination: destination.guests.find((g) => g.name === name) }));
    };
    // The guest's own check: the full check of every page after its last resume, and for a
    // guest that writes, a sweep of its hot set after that (each write checks the page first).
    const deadline = performance.now() + CHECK_TIMEOUT_MS;
    let placements = await views();
    while (performance.now() < deadline) {
      const checking = placements.filter((p) => {
        const running = [p.source, p.destination].find((v) => v?.state === 'running');
        return running && !ownCheckDone(running);
      });
      if (checking.length === 0) break;
      await sleep(250);
      placements = await views();
    }
    for (const placement of placements) {
      const verdict = judgePlacement(placement);
      if (verdict.outcome) outcomes[placement.name] = verdict.outcome;
      violations.push(...verdict.violations);
      const guest = plan.guests.find((g) => g.name === placement.name)!;
      if (guest.kind === 'vm' && (verdict.outcome === 'moved' || verdict.outcome === 'stayed')) {
        violations.push(...(await this.judgeVm(guest, verdict.outcome === 'moved' ? 'destination' : 'source', verdict.outcome === 'moved' ? placement.destination! : placement.source!)));
      }
      const running = [placement.source, placement.destination].find((v) => v?.state === 'running');
      if (running && !ownCheckDone(running)) violations.push(`${placement.name}: its own check did not finish within ${CHECK_TIMEOUT_MS / 1000} s`);
    }
  }

  /** Stops the run's guests wherever they are, then lists what is left of them. */
  private async removeGuests(names: readonly string[]): Promise<string[]> {
    const problems: string[] = [];
    for (const role of ['source', 'destination'] as const) {
      let agent: LocalAgent;
      try {
        await this.ensureRunning(role);
        agent = this.agent(role);
        const listed = (await agent.status()).guests.filter((g) => names.includes(g.name));
        for (const guest of listed) {
          await agent.client.call('DELETE', `/v1/guests/${guest.name}`).catch((err: Error) => problems.push(`guest stop ${guest.name} at the ${role}: ${err.message}`));
        }
      } catch (err) {
        problems.push(`cannot stop the run's guests at the ${role}: ${(err as Error).message}`);
      }
    }
    await sleep(200);
    const memoryFiles = [
      ...listFiles('/dev/shm').filter((f) => names.some((n) => f.startsWith(`gangway-${n}-`))).map((f) => join('/dev/shm', f)),
      ...(this.memoryDir ? listFiles(this.memoryDir).filter((f) => names.some((n) => f.includes(n))).map((f) => join(this.memoryDir!, f)) : []),
    ];
    const records = (['source', 'destination'] as const).flatMap((role) =>
      names.map((n) => join(this.options[role].stateDir, 'guests', `${n}.json`)).filter((path) => existsSync(path)),
    );
    const processes = (await execa('pgrep', ['-af', GUEST_PROCESSES], { reject: false })).stdout
      .split('\n')
      .filter((line) => names.some((n) => line.includes(n)));
    problems.push(...leftoverViolations({ processes, memoryFiles, records }));
    // Whatever is left goes now, so that the next run starts clean (it was reported above).
    for (const line of processes) {
      const pid = Number(line.split(' ')[0]);
      if (Number.isInteger(pid) && pid > 0) process.kill(pid, 'SIGKILL');
    }
    for (const file of [...memoryFiles, ...records]) rmSync(file, { force: true });
    // The disks are the operator's (a stopped VM leaves its disk): the run's go now.
    for (const role of ['source', 'destination'] as const) for (const name of names) rmSync(this.diskPath(role, name), { force: true });
    return problems;
  }

  private closing: Promise<void> | undefined;

  /** Stops the agents and their guests, removes the tmpfs, the namespaces and the directory. Once. */
  close(): Promise<void> {
    return (this.closing ??= this.tearDown());
  }

  private async tearDown(): Promise<void> {
    await this.heal().catch(() => {});
    for (const role of ['source', 'destination'] as const) {
      const agent = this.agents[role];
      if (!agent) continue;
      await killGuestsOf(agent).catch(() => {});
      await agent.stop().catch(() => {});
    }
    if (this.memoryDir) await run(['umount', this.memoryDir]).catch(() => {});
    await this.link?.close().catch(() => {});
    rmSync(this.tmp, { recursive: true, force: true });
  }
}

/** The migrate command's reasons, from its --json output: a whole failure, or the guests that did not move. */
function migrateErrorsOf(stdout: string, stderr: string): string[] {
  try {
    const out = JSON.parse(stdout) as { error?: { message: string }; failed?: { guest: string; message: string }[] };
    if (out.error) return [out.error.message];
    return (out.failed ?? []).map((f) => `${f.guest}: ${f.message}`);
  } catch {
    const text = (stdout || stderr).trim();
    return text ? [text.split('\n')[0]!.slice(0, 300)] : [];
  }
}

/** A resumed guest has checked every page since its last resume, and swept its hot set once if it writes. */
function ownCheckDone(view: GuestView): boolean {
  if (typeof view.resumes !== 'number' || view.resumes === 0) return true; // never resumed: it was started here and never moved
  if (view.resumeCheckDone !== true) return false;
  return view.dirtyRateBytesPerSec === 0 || (view.passes ?? 0) > (view.passesAtResume ?? 0);
}

function listFiles(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

function unsettledText(source: AgentStatus, destination: AgentStatus, names: readonly string[]): string {
  const parts: string[] = [];
  for (const [side, status] of [['source', source], ['destination', destination]] as const) {
    for (const m of status.migrations.filter((m) => m.state === 'running' && names.includes(m.guest))) parts.push(`${side}: migration of ${m.guest} running`);
    for (const g of status.guests.filter((g) => names.includes(g.name))) {
      if (g.outgoing) parts.push(`${side}: ${g.name} outgoing ${g.outgoing.phase}`);
      if (g.incoming && g.incoming.stranded === undefined) parts.push(`${side}: ${g.name} receiving (${g.incoming.missingPages} pages missing)`);
    }
  }
  return parts.join('; ');
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

