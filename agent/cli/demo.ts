// `gangway demo`: two agents on loopback, a guest dirtying its memory, a live migration
// between them, and the guest's own check that it carries on at the destination with no
// stale page. Everything it starts it stops, and its temporary state goes away.
import { rmSync } from 'node:fs';
import { qemuMissing } from '../guest/qemu-guest.js';
import { requestTestvmFullCheck } from '../guest/testvm-status.js';
import { testvmDir, testvmMissing, TESTVM_KERNEL_FILE } from '../native.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { killGuestsOf, makeTempDir, startLocalAgent, type AgentStatus, type LocalAgent } from '../local-agent.js';
import { formatBytes, formatRate } from '../units.js';
import { formatMs, progressLine, summaryText } from './format.js';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';

export interface DemoOptions {
  memoryBytes: number;
  dirtyRateBytesPerSec: number;
  json: boolean;
  technique?: 'precopy' | 'postcopy' | 'hybrid' | 'auto';
  /** A QEMU VM (the test kernel, TCG) instead of the synthetic process guest. */
  vm?: boolean;
}


export async function runDemo(options: DemoOptions): Promise<void> {
  const say = (line: string) => {
    if (!options.json) console.log(line);
  };
  const tmp = makeTempDir('gangway-demo-');
  const agents: LocalAgent[] = [];
  const cleanup = async () => {
    for (const agent of agents) await killGuestsOf(agent);
    await Promise.all(agents.map((agent) => agent.stop()));
    rmSync(tmp, { recursive: true, force: true });
  };
  const onSignal = () => {
    void cleanup().then(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    if (options.vm) {
      const problem = qemuMissing() ?? testvmMissing();
      if (problem) throw new GangwayError(ErrorCode.BAD_REQUEST, `demo --vm: ${problem}`);
    }
    const args = options.vm ? ['--vm-images-dir', testvmDir] : [];
    const source = await startLocalAgent({ stateDir: `${tmp}/source`, args });
    agents.push(source);
    const destination = await startLocalAgent({ stateDir: `${tmp}/destination`, args });
    agents.push(destination);
    say(`agents: source ${source.listen} (pid ${source.pid}), destination ${destination.listen} (pid ${destination.pid})`);

    if (options.vm) {
      await source.client.call('POST', '/v1/vms', {
        name: 'vm1',
        definition: {
          machine: 'q35',
          cpus: 1,
          accel: 'tcg',
          kernel: TESTVM_KERNEL_FILE,
          append: `gw.profile=os-image gw.seed=1 gw.rate=${Math.round(options.dirtyRateBytesPerSec / 1024)}`,
        },
        regionBytes: [options.memoryBytes],
      });
      say(`VM vm1: QEMU (TCG) booting gangway-testvm, ${formatBytes(options.memoryBytes)} of RAM, OS-image-like content, rewriting up to ${formatRate(options.dirtyRateBytesPerSec)}`);
      await waitForVm(source, 'vm1', (vm) => vm.state === 'running', 'its kernel to write every page', 120_000);
    } else await source.client.call('POST', '/v1/guests', {
      name: 'vm1',
      memoryBytes: options.memoryBytes,
      profile: 'os-image',
      dirtyRateBytesPerSec: options.dirtyRateBytesPerSec,
      seed: 1,
      imageSeed: 0,
      sharedFraction: 0,
      hotFraction: 0.25,
    });
    if (!options.vm) say(`guest vm1: ${formatBytes(options.memoryBytes)}, OS-image-like content, dirtying ${formatRate(options.dirtyRateBytesPerSec)}`);
    await sleep(1000);

    const tty = process.stderr.isTTY && !options.json;
    const group = await source.client
      .migrate({ guests: ['vm1'], to: destination.listen, ...(options.technique ? { technique: options.technique } : {}) }, (progress) => {
        if (tty) process.stderr.write(`\r\x1b[K${progressLine(progress)}`);
      })
      .finally(() => {
        if (tty) process.stderr.write('\r\x1b[K');
      });
    const summary = group.guests[0]!;
    say(summaryText(summary));

    // The guest's own verdict: it re-checked every page on resume (the VM's kernel when asked)
    // and keeps checking each page it rewrites. Wait for the check and more passes.
    const guestCheck = options.vm ? await vmCheck(destination, 'vm1') : await waitForGuestProgress(destination, 'vm1', 2, 60_000);
    say(
      `${options.vm ? 'VM' : 'guest'} vm1 at the destination: ${options.vm ? 'full check' : 'resume check'} of every page found ${guestCheck.resumeStalePages} stale; ` +
        `${guestCheck.passesAfterResume} passes since, ${guestCheck.stalePages} stale pages in all`,
    );
    const ok = summary.verified && guestCheck.stalePages === 0;
    if (options.json) {
      console.log(
        JSON.stringify({
          migrations: [
            {
              guest: summary.guest,
              technique: summary.technique,
              verified: summary.verified,
              downtimeMs: summary.downtimeMs,
              totalMs: summary.totalMs,
              rounds: summary.rounds.length,
              memoryBytes: summary.memoryBytes,
              wireBytes: summary.wireBytes,
              zeroPages: summary.zeroPages,
              guestCheck: { stalePages: guestCheck.stalePages, passesAfterResume: guestCheck.passesAfterResume },
            },
          ],
        }),
      );
    } else {
      say(ok ? `demo ok: downtime ${formatMs(summary.downtimeMs)}, guest intact` : 'demo FAILED: the guest found stale pages');
    }
    if (!ok) process.exitCode = 1;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await cleanup();
  }
}

type VmView = NonNullable<AgentStatus['guests'][number]['testvm']>;

async function waitForVm(agent: LocalAgent, name: string, done: (vm: VmView) => boolean, what: string, timeoutMs: number): Promise<VmView> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const vm = (await agent.status()).guests.find((g) => g.name === name)?.testvm;
    if (vm && done(vm)) return vm;
    if (Date.now() > deadline) throw new GangwayError(ErrorCode.TIMEOUT, `VM ${name}: timed out waiting for ${what} (${timeoutMs} ms)`);
    await sleep(100);
  }
}

/** The VM's kernel checks every page of its RAM (asked through its status block) and makes a pass more. */
async function vmCheck(agent: LocalAgent, name: string): Promise<GuestCheck> {
  const guest = (await agent.status()).guests.find((g) => g.name === name);
  if (!guest?.testvm) throw new GangwayError(ErrorCode.GUEST_FAILED, `VM ${name} does not run at the destination`);
  const request = requestTestvmFullCheck(guest.memoryPath);
  const passes = guest.testvm.passes;
  const vm = await waitForVm(agent, name, (vm) => vm.checkDone === request && vm.passes > passes, 'its full check', 60_000);
  return { stalePages: vm.stalePages, resumeStalePages: vm.checkStalePages, passesAfterResume: vm.passes - passes };
}

export interface GuestCheck {
  stalePages: number;
  resumeStalePages: number;
  passesAfterResume: number;
}

/** Waits until the guest finished its resume check and made `passes` more passes. */
export async function waitForGuestProgress(agent: LocalAgent, name: string, passes: number, timeoutMs: number): Promise<GuestCheck> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status: AgentStatus = await agent.status();
    const guest = status.guests.find((g) => g.name === name);
    if (guest?.passes !== undefined && guest.resumeCheckDone) {
      const passesAfterResume = guest.passes - (guest.passesAtResume ?? 0);
      if (passesAfterResume >= passes) {
        return { stalePages: guest.stalePages ?? 0, resumeStalePages: guest.resumeStalePages ?? 0, passesAfterResume };
      }
    }
    if (Date.now() > deadline) {
      throw new GangwayError(ErrorCode.TIMEOUT, `guest ${name} made no progress at the destination within ${timeoutMs} ms`);
    }
    await sleep(100);
  }
}
