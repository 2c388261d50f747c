// gangway drain: every guest off this host, spread over the peers named (agent/daemon/drain.ts
// decides and runs it). Prints the plan, each guest's outcome as it ends and a closing line;
// exits 0 only when every guest moved. Ctrl-C cancels the drain (running migrations are
// cancelled, the guests not moved stay here); a second Ctrl-C leaves it running in the agent.
import { Option, type Command } from 'commander';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { PRIORITIES } from '../config.js';
import type { DrainOutcome, DrainPlan, DrainSummary } from '../daemon/drain.js';
import type { MigrationProgress } from '../migration/source.js';
import { QuantityError } from '../units.js';
import { arg, clientFor, fail, number, withControlOptions } from './common.js';
import { groupProgressLine } from './format.js';

const PEER_ADDRESS = /^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$/;

/** --to PEER[,PEER...]: agent addresses, each HOST:PORT, none twice. */
const peerList = arg((text) => {
  const peers = text.split(',');
  for (const peer of peers) {
    const port = Number(peer.slice(peer.lastIndexOf(':') + 1));
    if (!PEER_ADDRESS.test(peer) || port < 1 || port > 65535) {
      throw new QuantityError(`"${peer}" is not an agent address: use HOST:PORT[,HOST:PORT...] with ports from 1 to 65535, e.g. 10.0.0.2:7401,10.0.0.3:7401`);
    }
  }
  if (new Set(peers).size !== peers.length) throw new QuantityError(`"${text}" names a peer twice`);
  if (peers.length > 32) throw new QuantityError(`"${text}" names ${peers.length} peers; at most 32`);
  return peers;
});

export function planLines(plan: DrainPlan): string[] {
  const lines = [`drain: ${plan.guests.length} guest${plan.guests.length === 1 ? '' : 's'} to ${plan.peers.map((p) => p.to).join(', ') || 'no peer'}, at most ${plan.maxParallel} at once`];
  for (const peer of plan.peers) {
    lines.push(`  to ${peer.to}: ${peer.strategy}, ${peer.priority} priority${peer.followed ? '' : ' (no traffic data: auto\'s default)'}`);
  }
  plan.guests.forEach((g, i) => lines.push(`  ${i + 1}. ${g.name} -> ${g.to}: ${g.technique}`));
  for (const u of plan.unmovable) lines.push(`  ${u.guest}: cannot move: ${u.reason}`);
  return lines;
}

export function outcomeLine(o: DrainOutcome): string {
  return o.moved
    ? `moved ${o.guest} to ${o.to} (${o.technique}, downtime ${o.downtimeMs.toFixed(0)} ms)`
    : `stayed ${o.guest} here${o.to ? ` (was going to ${o.to})` : ''}: ${o.error.message} [${o.error.code}]`;
}

export function closingLine(s: DrainSummary): string {
  const total = s.outcomes.length;
  const stayed = s.outcomes.filter((o) => !o.moved).map((o) => o.guest);
  return `drain${s.cancelled ? ' cancelled' : ''}: ${s.moved} of ${total} guest${total === 1 ? '' : 's'} moved${stayed.length ? `; stayed here: ${stayed.join(', ')}` : ''}`;
}

export function addDrainCommand(program: Command): void {
  withControlOptions(program.command('drain'))
    .description(
      'move every guest off this host, spread over the peers (the planner chooses order, technique and strategy, as `gangway plan` shows); ' +
        'new guests and arriving migrations are refused meanwhile. Exit 0 only when every guest moved. ' +
        'Ctrl-C cancels the drain (the guests not moved stay here); a second Ctrl-C leaves it running in the agent',
    )
    .requiredOption('--to <peers>', 'the destination agents, HOST:PORT or several separated by commas: guests are dealt to them in turn', peerList)
    .addOption(new Option('--max-parallel <n>', 'migrations at once').argParser(number('--max-parallel', 1, 256, true)).default(undefined, "the agent's migration.maxParallelOutbound"))
    .addOption(new Option('--priority <priority>', "the migrations' priority").choices(PRIORITIES).default(undefined, "the agent's traffic.priority"))
    .option('--dry-run', 'print the plan and move nothing')
    .option('--json', 'print the summary (plan and outcomes) as JSON')
    .action(async (opts) => {
      const json = Boolean(opts.json);
      const tty = process.stderr.isTTY && !json;
      try {
        const client = clientFor(opts);
        for (const peer of opts.to as string[]) await client.refuseSelf(peer);
        let interrupted = false;
        const interrupt = (signal: NodeJS.Signals) => {
          if (interrupted) {
            process.stderr.write(`\ngangway: ${signal}: detached; the drain goes on in the agent (gangway status shows its migrations)\n`);
            process.exit(130);
          }
          interrupted = true;
          process.stderr.write(`\ngangway: ${signal}: cancelling the drain: running migrations are cancelled, the guests not moved stay here (Ctrl-C again to detach)\n`);
          client.call('POST', '/v1/drain/cancel').catch((err: Error) => process.stderr.write(`gangway: cancelling the drain failed: ${err.message}\n`));
        };
        process.on('SIGINT', interrupt);
        process.on('SIGTERM', interrupt);
        const latest = new Map<string, MigrationProgress>();
        let summary: DrainSummary | undefined;
        const body = { to: opts.to, ...(opts.maxParallel ? { maxParallel: opts.maxParallel } : {}), ...(opts.priority ? { priority: opts.priority } : {}), dryRun: Boolean(opts.dryRun) };
        for await (const event of client.stream('POST', '/v1/drain', body)) {
          if (event.type === 'error') {
            const error = event.error as { code: string; message: string };
            throw new GangwayError(error.code as ErrorCode, error.message);
          }
          if (event.type === 'result') summary = event.summary as DrainSummary;
          if (json) continue;
          if (event.type === 'plan') console.log(planLines(event.plan as DrainPlan).join('\n'));
          if (event.type === 'guest') {
            const outcome = event.outcome as DrainOutcome;
            latest.delete(outcome.guest);
            if (tty) process.stderr.write('\r\x1b[K');
            console.log(outcomeLine(outcome));
          }
          if (event.type === 'progress' && tty && !interrupted) {
            const progress = event.progress as MigrationProgress;
            latest.set(progress.guest, progress);
            process.stderr.write(`\r\x1b[K${groupProgressLine(latest)}`);
          }
        }
        if (!summary) throw new GangwayError(ErrorCode.INTERNAL, 'the agent ended the drain without a result');
        if (tty) process.stderr.write('\r\x1b[K');
        console.log(json ? JSON.stringify(summary) : summary.dryRun ? 'dry run: nothing was moved' : closingLine(summary));
        process.exitCode = summary.cancelled ? 130 : summary.stayed > 0 ? 1 : 0;
      } catch (err) {
        fail(err, json);
      }
    });
}
