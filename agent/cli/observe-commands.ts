// `gangway events`, `gangway history` and `gangway watch ID`: what the agent did and does,
// as it happens and after it ended (also after the agent restarted: history is kept in
// its state dir).
import type { Command } from 'commander';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { ControlClient } from '../control/client.js';
import type { AgentEvent } from '../daemon/events.js';
import type { UnreadableHistory } from '../daemon/history.js';
import type { HistoryEntry } from '../daemon/outcome.js';
import type { ListedRecord } from '../daemon/records.js';
import { clientFor, fail, withControlOptions } from './common.js';
import { summaryText } from './format.js';
import { eventText, exitCodeOf, historyEntryText, liveProgressLine } from './observe-format.js';

interface HistoryAnswer {
  entries: HistoryEntry[];
  unreadable: UnreadableHistory | null;
}

/** How often `watch` shows the migration's progress while it runs. */
const WATCH_PROGRESS_INTERVAL_MS = 2000;
const MIGRATION_ID = /^[0-9a-fA-F-]{1,36}$/;

function unreadableText(u: UnreadableHistory): string {
  return `UNREADABLE migration history (${u.problem}): kept as ${u.file}; this history starts after it. Read or remove that file.`;
}

/** The migration `idOrPrefix` names: its record while the agent has one, else its history entry. */
async function findMigration(client: ControlClient, idOrPrefix: string): Promise<{ record?: ListedRecord; entry?: HistoryEntry; migrationId: string }> {
  const [status, history] = await Promise.all([client.call<{ migrations: ListedRecord[] }>('GET', '/v1/status'), client.call<HistoryAnswer>('GET', '/v1/history')]);
  const ids = new Set([...status.migrations.map((m) => m.migrationId), ...history.entries.map((e) => e.migrationId)].filter((id) => id.startsWith(idOrPrefix)));
  if (ids.size === 0) throw new GangwayError(ErrorCode.BAD_REQUEST, `no migration has id ${idOrPrefix} on this agent (see gangway status and gangway history)`);
  if (ids.size > 1) throw new GangwayError(ErrorCode.BAD_REQUEST, `id prefix ${idOrPrefix} matches ${ids.size} migrations: give more of it`);
  const [migrationId] = ids as unknown as [string];
  const record = status.migrations.find((m) => m.migrationId === migrationId);
  const entry = history.entries.find((e) => e.migrationId === migrationId);
  return { migrationId, ...(record ? { record } : {}), ...(entry ? { entry } : {}) };
}

/** Prints how the migration ended (the summary migrate prints, when it has one) and exits with its code. */
function finish(entry: HistoryEntry, record: ListedRecord | undefined, json: boolean): never {
  const summary = record?.direction === 'out' && record.state === 'committed' ? record.summary : undefined;
  if (json) console.log(JSON.stringify({ ...entry, ...(summary ? { summary } : {}) }));
  else console.log(summary ? `${summaryText(summary)}\n${historyEntryText(entry)}` : historyEntryText(entry));
  process.exit(exitCodeOf(entry));
}

async function watch(client: ControlClient, idOrPrefix: string, json: boolean): Promise<never> {
  // Subscribed before the migration is looked up: an end in between is in the stream.
  const events = client.stream('GET', '/v1/events');
  const first = await events.next();
  if (first.done || first.value.type !== 'subscribed') throw new GangwayError(ErrorCode.INTERNAL, 'the agent did not start its event stream with a subscribed event');
  const found = await findMigration(client, idOrPrefix);
  if (found.record?.state !== 'running') {
    if (found.entry) finish(found.entry, found.record, json);
    throw new GangwayError(ErrorCode.INTERNAL, `migration ${found.migrationId} is ${found.record?.state ?? 'unknown'} and has no history entry`);
  }
  const id = found.migrationId;
  let pending: Promise<IteratorResult<Record<string, unknown>>> = events.next();
  for (;;) {
    const next = await Promise.race([pending, new Promise<'tick'>((resolve) => setTimeout(() => resolve('tick'), WATCH_PROGRESS_INTERVAL_MS))]);
    if (next === 'tick') {
      if (json) continue;
      const { record } = await findMigration(client, id);
      if (record?.direction === 'out' && record.state === 'running' && record.progress) process.stderr.write(`${liveProgressLine(record.progress)}\n`);
      continue;
    }
    if (next.done) throw new GangwayError(ErrorCode.PEER_GONE, `the agent closed its event stream before migration ${id} ended`);
    pending = events.next();
    const event = next.value as AgentEvent;
    if (event.type === 'error') throw new GangwayError(event.error.code as ErrorCode, event.error.message);
    if (event.type === 'migration-ended' && event.entry.migrationId === id) {
      const { record } = await findMigration(client, id);
      finish(event.entry, record, json);
    }
    if ('migrationId' in event && event.migrationId === id) {
      if (json) console.log(JSON.stringify(event));
      else process.stderr.write(`${eventText(event)}\n`);
    }
  }
}

export function addObserveCommands(program: Command): void {
  withControlOptions(program.command('history'))
    .description("list the migrations this agent saw end, in both directions, newest first (kept in the state dir's history.json across restarts)")
    .option('--json', 'print JSON: { entries, unreadable }')
    .action(async (opts) => {
      try {
        const history = await clientFor(opts).call<HistoryAnswer>('GET', '/v1/history');
        if (opts.json) return console.log(JSON.stringify(history));
        if (history.unreadable) console.log(unreadableText(history.unreadable));
        if (history.entries.length === 0) console.log('no migrations have ended on this agent');
        for (const entry of history.entries) console.log(historyEntryText(entry));
      } catch (err) {
        fail(err, Boolean(opts.json));
      }
    });

  withControlOptions(program.command('events'))
    .description('follow what the agent does, one line per event until interrupted: migrations started, rounds ended, switchovers, migrations ended (completed, cancelled, failed, ...), guests started and stopped')
    .option('--json', 'print NDJSON: one JSON event per line')
    .action(async (opts) => {
      const json = Boolean(opts.json);
      try {
        for await (const event of clientFor(opts).stream('GET', '/v1/events')) {
          console.log(json ? JSON.stringify(event) : eventText(event as AgentEvent));
          if (event.type === 'error') process.exit(1);
        }
        throw new GangwayError(ErrorCode.PEER_GONE, 'the agent closed its event stream (it stopped?)');
      } catch (err) {
        fail(err, json);
      }
    });

  withControlOptions(program.command('watch <migration-id>'))
    .description('follow a migration (id or unique prefix) to its end and print its summary; exits 0 when it completed, 130 when cancelled, 1 otherwise. An ended one prints its history entry')
    .option('--json', "print the migration's events and then its history entry (with the summary) as JSON lines")
    .action(async (idOrPrefix: string, opts) => {
      const json = Boolean(opts.json);
      try {
        if (!MIGRATION_ID.test(idOrPrefix)) {
          throw new GangwayError(ErrorCode.BAD_REQUEST, `"${idOrPrefix.slice(0, 40)}" is not a migration id: give an id or a prefix of one (hex digits and -, at most 36), as gangway status lists them`);
        }
        await watch(clientFor(opts), idOrPrefix, json);
      } catch (err) {
        fail(err, json);
      }
    });
}
