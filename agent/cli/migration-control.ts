// `gangway migrate-set` and `gangway postcopy`: settings of an outgoing migration changed while
// it runs (virsh migrate-setspeed / migrate-setmaxdowntime, QEMU's migrate-start-postcopy).
// The migration is named as `gangway cancel` names it: its id or a unique prefix (gangway status).
import type { Command } from 'commander';
import type { PostcopyAnswer, SettingsAnswer } from '../daemon/outbound.js';
import type { LiveSettings } from '../migration/mid-flight.js';
import { formatRate, parseRate, QuantityError } from '../units.js';
import { arg, clientFor, fail, number, withControlOptions } from './common.js';

const SET_EXAMPLES = `
Examples:
  gangway migrate-set 3f2a --bandwidth 1Gbit/s       # the pacer's rate, from its next batch
  gangway migrate-set 3f2a --downtime-ms 500         # the budget of the next round's decision
  gangway migrate-set 3f2a --bandwidth 200MiB/s --downtime-ms 50 --json

A gang's --bandwidth is one pacer for the whole gang: a new rate given to one member's id is
the gang's, and the answer names the members that share it. A migration that had no
--bandwidth gets a pacer of its own. Where the uplink's shaper (tc) holds a reservation for
migrations to that destination port, it takes the new rate as a manual --bandwidth would
have set it (the class is shared by every migration to that port).`;

const POSTCOPY_EXAMPLES = `
Examples:
  gangway migrate vm1 --to 10.0.0.2:7401 --technique hybrid --detach
  gangway postcopy 3f2a        # pre-copy ends at the next round boundary; the guest runs there

The destination prepares post-copy when the migration is offered (as QEMU needs postcopy-ram
before migrate): a hybrid migration can be switched, a pre-copy one cannot.`;

/** "precopy, round 3": where the migration was when the command reached it. */
function whereText(answer: { phase: string; round: number | null }): string {
  return answer.round === null ? answer.phase : `${answer.phase}, round ${answer.round}`;
}

function settingsText(s: LiveSettings): string {
  return `bandwidth ${s.bandwidthBytesPerSec === null ? 'unlimited' : formatRate(s.bandwidthBytesPerSec)}, downtime budget ${s.downtimeMs} ms`;
}

export function settingsAnswerText(answer: SettingsAnswer): string {
  return [
    `migration ${answer.migrationId} of ${answer.guest} (${whereText(answer)}): ${settingsText(answer.current)}`,
    `  was        ${settingsText(answer.previous)}`,
    ...(answer.pacerSharedWith.length > 0 ? [`  shared     the rate is the gang's: ${answer.pacerSharedWith.join(', ')} take turns at the same pacer`] : []),
    ...(answer.shaper ? [`  shaper     ${answer.shaper}`] : []),
  ].join('\n');
}

export function postcopyAnswerText(answer: PostcopyAnswer): string {
  return answer.alreadyRequested
    ? `migration ${answer.migrationId} of ${answer.guest} (${whereText(answer)}): post-copy was already asked for; it starts at the next round boundary`
    : `migration ${answer.migrationId} of ${answer.guest} (${whereText(answer)}): post-copy starts at the next round boundary; \`gangway status\` follows it`;
}

export function addMigrationControlCommands(program: Command): void {
  withControlOptions(program.command('migrate-set <migration-id>'))
    .description("change a running outgoing migration's rate or downtime budget (id or unique prefix, see status)")
    .option('--bandwidth <rate>', 'the new cap: 100MiB/s or 100MB/s (bytes), 1Gbit/s or 1Gbps (bits)', arg((t) => parseRate(t, '--bandwidth')))
    .option('--downtime-ms <ms>', 'the new downtime budget for the final round', number('--downtime-ms', 1, 600_000))
    .option('--json', 'print JSON')
    .addHelpText('after', SET_EXAMPLES)
    .action(async (id: string, opts: { bandwidth?: number; downtimeMs?: number; json?: boolean; stateDir: string; control?: string; tokenFile?: string }) => {
      try {
        if (opts.bandwidth === undefined && opts.downtimeMs === undefined) {
          throw new QuantityError('give --bandwidth RATE, --downtime-ms N or both: nothing to change');
        }
        const answer = await clientFor(opts).changeSettings(id, {
          ...(opts.bandwidth !== undefined ? { bandwidthBytesPerSec: opts.bandwidth } : {}),
          ...(opts.downtimeMs !== undefined ? { downtimeMs: opts.downtimeMs } : {}),
        });
        console.log(opts.json ? JSON.stringify(answer) : settingsAnswerText(answer));
      } catch (err) {
        fail(err, Boolean(opts.json));
      }
    });

  withControlOptions(program.command('postcopy <migration-id>'))
    .description('switch a running hybrid migration to post-copy at its next round boundary (id or unique prefix, see status)')
    .option('--json', 'print JSON')
    .addHelpText('after', POSTCOPY_EXAMPLES)
    .action(async (id: string, opts: { json?: boolean; stateDir: string; control?: string; tokenFile?: string }) => {
      try {
        const answer = await clientFor(opts).startPostcopy(id);
        console.log(opts.json ? JSON.stringify(answer) : postcopyAnswerText(answer));
      } catch (err) {
        fail(err, Boolean(opts.json));
      }
    });
}
