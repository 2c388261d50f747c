// npm run chaos: a seeded fault campaign. Each run migrates a random mix of process guests and
// QEMU VMs, some with a disk (technique, gang or serial, sizes, dirty rates: all from the run's seed) between two
// agents and injects one fault at a random moment: kill -9 or SIGTERM of either agent (then
// restarted), either agent stopped for a while (SIGSTOP), the link cut or its packets
// dropped (network namespaces), the destination's memory directory filled, a cancel. Then it
// checks that every guest runs in exactly one place (or is reported stranded), that its own
// check finds no stale page (a VM's kernel: no stale page and no stale disk block; its disk
// on that host only), and that nothing of it is left once it is stopped.
//
//   npm run chaos [-- --runs N] [-- --seed S] [-- --quick] [-- --json]
//   npm run chaos -- --replay SEED          # one run again, by the seed a violation printed
//   npm run chaos -- --replay SEED --no-vms # a seed of a campaign of process guests only (CI's test)
import { parseArgs } from 'node:util';
import { ExitSteps } from './exit.js';
import { ChaosHosts, type RunResult } from './chaos/campaign.js';
import { describePlan, planRun, type FaultKind } from './chaos/schedule.js';

const USAGE = `usage: npm run chaos -- [--runs N] [--seed S] [--quick] [--no-vms] [--json]
       npm run chaos -- --replay SEED [--quick] [--no-vms]
  --no-vms   process guests only, as where QEMU is missing: the seeds of CI's short
             campaign (test/integration/chaos.test.ts) replay with it
examples:
  npm run chaos -- --runs 200 --seed 1 --json
  npm run chaos -- --replay 1017 --quick
  npm run chaos -- --replay 112 --quick --no-vms`;

function fail(message: string): never {
  process.stderr.write(`gangway chaos: ${message}\n${USAGE}\n`);
  process.exit(2);
}

function parse() {
  try {
    return parseArgs({
      options: {
        runs: { type: 'string' },
        seed: { type: 'string' },
        replay: { type: 'string' },
        quick: { type: 'boolean', default: false },
        json: { type: 'boolean', default: false },
        'no-vms': { type: 'boolean', default: false },
        help: { type: 'boolean', default: false },
      },
    });
  } catch (err) {
    fail((err as Error).message);
  }
}
const { values } = parse();
if (values.help) {
  console.log(USAGE);
  process.exit(0);
}
const integer = (flag: string, text: string | undefined, fallback: number) => {
  if (text === undefined) return fallback;
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 0) fail(`${flag} "${text}": a whole number, 0 or more`);
  return value;
};
if (process.getuid?.() !== 0) fail('the campaign needs root (post-copy uses userfaultfd; the link faults, network namespaces; the full memory directory, a tmpfs)');

const replay = values.replay === undefined ? undefined : integer('--replay', values.replay, 0);
const runs = replay !== undefined ? 1 : integer('--runs', values.runs, 20);
const seed = replay ?? integer('--seed', values.seed, Math.floor(Math.random() * 1e6));
const log = (line: string) => (values.json ? process.stderr.write(`${line}\n`) : console.log(line));

const exit = new ExitSteps('stopping the agents and guests, removing the namespaces and the tmpfs');
// A bug of the campaign's own must not leave its namespaces, tmpfs, agents and guests behind.
process.on('unhandledRejection', (err) => {
  console.error(`gangway chaos: ${(err as Error)?.stack ?? String(err)}`);
  void exit.run().finally(() => process.exit(1));
});
const notes: string[] = [];
const hosts = await ChaosHosts.create(undefined, notes);
exit.add(() => hosts.close());
for (const note of notes) log(`note: ${note}`);

const results: RunResult[] = [];
try {
  for (let i = 0; i < runs && !exit.interrupted; i++) {
    const plan = planRun(seed + i, { quick: values.quick, faults: hosts.faults, vms: hosts.vms && !values['no-vms'] });
    log(describePlan(plan));
    const result = await hosts.runOne(plan);
    results.push(result);
    const outcomes = Object.entries(result.outcomes).map(([name, outcome]) => `${name} ${outcome}`).join(', ');
    const phases = Object.entries(result.phasesMs).map(([phase, ms]) => `${phase} ${(ms / 1000).toFixed(1)}`).join(', ');
    log(`  ${result.faultNote}; migrate exit ${result.migrateExit ?? 'none'}; ${outcomes}; ${result.seconds.toFixed(1)} s (${phases})`);
    for (const error of result.migrateErrors) log(`  migrate said: ${error}`);
    for (const violation of result.violations) log(`  VIOLATION: ${violation} (replay: npm run chaos -- --replay ${plan.seed}${values.quick ? ' --quick' : ''}${values['no-vms'] ? ' --no-vms' : ''})`);
  }
} finally {
  await exit.run();
}

const faults: Partial<Record<FaultKind, number>> = {};
for (const r of results) faults[r.plan.fault.kind] = (faults[r.plan.fault.kind] ?? 0) + 1;
const violations = results.filter((r) => r.violations.length > 0).map((r) => ({ seed: r.plan.seed, plan: describePlan(r.plan), fault: r.faultNote, violations: r.violations }));
const outcomes: Record<string, number> = {};
for (const r of results) for (const o of Object.values(r.outcomes)) outcomes[o] = (outcomes[o] ?? 0) + 1;
if (values.json) console.log(JSON.stringify({ runs: results.length, seed, violations, faults, outcomes, notes }));
else console.log(`${results.length} runs from seed ${seed}: ${violations.length} with violations; faults ${JSON.stringify(faults)}; guests ${JSON.stringify(outcomes)}`);
process.exitCode = violations.length > 0 ? 1 : 0;
