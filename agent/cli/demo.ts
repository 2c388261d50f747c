// `gangway demo`: two agents on loopback, a guest dirtying its memory, a live migration
// between them, and the guest's own check that it carries on at the destination with no
// stale page. Everything it starts it stops, and its temporary state goes away.
import { rmSync } from 'node:fs';
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
    const source = await startLocalAgent({ stateDir: `${tmp}/source` });
    agents.push(source);
    const destination = await startLocalAgent({ stateDir: `${tmp}/destination` });
    agents.push(destination);
    say(`agents: source ${source.listen} (pid ${source.pid}), destination ${destination.listen} (pid ${destination.pid})`);

    await source.client.call('POST', '/v1/guests', {
      name: 'vm1',
      memoryBytes: options.memoryBytes,
      profile: 'os-image',
      dirtyRateBytesPerSec: options.dirtyRateBytesPerSec,
      seed: 1,
      imageSeed: 0,
      sharedFraction: 0,
      hotFraction: 0.25,
    });
    say(`guest vm1: ${formatBytes(options.memoryBytes)}, OS-image-like content, dirtying ${formatRate(options.dirtyRateBytesPerSec)}`);
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

    // The guest's own verdict: it re-checked every page on resume and keeps checking each
    // page it rewrites. Wait for the resume check and two more passes.
    const guestCheck = await waitForGuestProgress(destination, 'vm1', 2, 60_000);
    say(
      `guest vm1 at the destination: resume check of every page found ${guestCheck.resumeStalePages} stale; ` +
        `${guestCheck.passesAfterResume} passes since resume, ${guestCheck.stalePages} stale pages in all`,
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
