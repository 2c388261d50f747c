#!/usr/bin/env -S node --single-threaded-gc --no-flush-bytecode
// gangway: the agent daemon and its command-line client.
import { Command, Option } from 'commander';
import { ErrorCode, GangwayError } from '../protocol/errors.js';
import { MIGRATE_DEFAULTS, StartedMigrations, type CancelAnswer } from './control/client.js';
import type { Agent } from './daemon.js';
import { CONFIG_DEFAULTS, LOG_LEVELS, PRIORITIES, TRACKERS } from './config.js';
import { runAgent } from './cli/agent-start.js';
import type { MigrationProgress } from './migration/source.js';
import { detachedStartText, detachedText, groupProgressLine, groupSummaryText, unreadableRecordsText } from './cli/format.js';
import { planText, trafficText } from './cli/traffic-format.js';
import type { TrafficStatus } from './traffic/service.js';
import type { PlanAnswer } from './planner/plan-answer.js';
import { DEFAULT_PLANNER_MODE, PLANNER_MODES } from './planner/choose.js';
import { ForecastEta, forecastFirstLine } from './cli/forecast-eta.js';
import { runDemo } from './cli/demo.js';
import { checkDays, DEFAULT_CA_DAYS, DEFAULT_HOST_DAYS, initCa, issueHostCert, type CertResult } from './cli/certs.js';
import { parseBytes, parseBytesList, parseRate, QuantityError } from './units.js';
import { VERSION_TEXT } from './version.js';
import { arg, clientFor, DEFAULT_STATE_DIR, fail, number, tapDevice, withControlOptions } from './cli/common.js';
import { addVmCommands } from './cli/vm-commands.js';
import { applyHelp } from './cli/help.js';
import { addManCommand } from './cli/man-page.js';
import { addCompletionCommand } from './cli/completion.js';
import { addInstallUnitCommand } from './cli/install-unit.js';
import { addObserveCommands } from './cli/observe-commands.js';
import { liveProgressLine, ProgressThrottle } from './cli/observe-format.js';
import { followMigrationEvents } from './cli/migrate-events.js';
import { outcomeText } from './daemon/outcome.js';
import { addDrainCommand } from './cli/drain-command.js';
import { addMigrationControlCommands } from './cli/migration-control.js';
import { DEFAULT_QEMU_SETTINGS } from './guest/qemu-guest.js';
import { regionSizesProblem } from './guest/process-guest.js';

/** --memory: one size, or a size per memory region. */
function parseRegionSizes(text: string, what: string): number[] {
  const sizes = parseBytesList(text, what);
  const problem = regionSizesProblem(sizes);
  if (problem) throw new QuantityError(`${what} "${text}": ${problem}`);
  return sizes;
}


const program = new Command('gangway')
  .description('Live migration of guests between hosts: one agent per host, pages streamed peer to peer.')
  .version(VERSION_TEXT, '-V, --version', 'print the version (and the peer protocol it speaks)')
  .showHelpAfterError('(run with --help for usage)')
  .configureOutput({ outputError: (text, write) => write(`gangway: ${text.replace(/^error: /, '')}`) });

program
  .command('agent')
  .description('run the host agent (peer listener + local control API); logs JSON lines to stdout')
  .option('--config <file>', 'YAML config file (settings: listen, stateDir, memoryDir, tracker, shutdownGrace, peerTimeout, postcopyReattach, logLevel, metrics.listen, control.group/listen/tokenFile, tls.cert/key/ca/allow, insecurePlaintextLoopback, traffic.uplink/linkCapacity/slaLower/slaUpper/contention.high/contention.moderate/priority/sampleInterval/planner, peers.maxSessionsPerPeer/maxIncomingPerPeer/maxIncoming/maxGroupsPerSession/handshakeTimeout/requestsPerSecond/requestBurst/memoryHeadroom/decompressionsPerSession, migration.maxParallelOutbound/channels, dedup.resident/residentOffersPerMinute/residentMaxAge/baseImages, vm.imagesDir/disksDir/qemu/bridge)')
  .option('--check-config', 'validate the configuration (file, GANGWAY_* environment, flags) and what a start needs of this host (TLS files, directories, free addresses), print it and exit')
  // The agent's defaults are its config's (defaults < file < GANGWAY_* < flags, see
  // resolveAgentSettings): these flags only show theirs, `.default(undefined, text)`, so a
  // flag not given leaves the file's or the environment's value.
  .addOption(new Option('--listen <host:port>', 'address for peer agents').default(undefined, CONFIG_DEFAULTS.listen))
  .addOption(new Option('--state-dir <dir>', 'the agent state directory').default(undefined, DEFAULT_STATE_DIR))
  .addOption(new Option('--memory-dir <dir>', 'where guest memory files live').default(undefined, CONFIG_DEFAULTS.memoryDir))
  .addOption(new Option('--tracker <kind>', 'dirty-page tracking').choices(TRACKERS).default(undefined, 'auto'))
  .addOption(new Option('--shutdown-grace <duration>', 'on SIGTERM, how long running migrations may finish').default(undefined, '10s'))
  .addOption(new Option('--peer-timeout <duration>', 'a peer session silent this long (no frame, no pong) is taken as dead (peerTimeout)').default(undefined, '15s'))
  .addOption(new Option('--postcopy-reattach <duration>', 'post-copy: how long either side waits for a broken link to the other to come back (postcopyReattach)').default(undefined, '10min'))
  .option('--metrics-listen <host:port>', 'serve Prometheus metrics on this address')
  .option('--control-group <group>', 'group (name or gid) that may use the control socket, mode 0660, control.group')
  .option('--control-listen <host:port>', 'also serve the control API on this loopback port, with a bearer token, control.listen')
  .addOption(new Option('--control-token-file <file>', "the control port's token (created, mode 0600, when missing), control.tokenFile").default(undefined, 'STATE_DIR/control.token'))
  .addOption(new Option('--log-level <level>', 'log level').choices(LOG_LEVELS).default(undefined, 'info'))
  .option('--tls-cert <file>', "this agent's certificate (PEM), tls.cert")
  .option('--tls-key <file>', "this agent's private key (PEM), tls.key")
  .option('--tls-ca <file>', 'the CA that signs agent certificates (PEM), tls.ca')
  .option('--tls-allow <entry>', 'a peer this agent accepts: certificate CN or sha256:FINGERPRINT (repeat for more), tls.allow', (entry: string, list: string[] = []) => [...list, entry])
  .option('--insecure-plaintext-loopback', 'no TLS: plain ws, only on a loopback listen address and only to loopback peers')
  .option('--uplink <interface>', 'the uplink guests and migrations share: measured, and shaped when root (traffic.uplink)')
  .option('--link-capacity <rate>', "the uplink's capacity, e.g. 1Gbit/s (traffic.linkCapacity)")
  .addOption(new Option('--planner <mode>', "how --technique auto, plan and drain choose: the best forecast, or seed paper 003's rules (traffic.planner)").choices(PLANNER_MODES).default(undefined, DEFAULT_PLANNER_MODE))
  .addOption(new Option('--vm-images-dir <dir>', 'kernels VMs boot, by file name (vm.imagesDir)').default(undefined, DEFAULT_QEMU_SETTINGS.imagesDir))
  .addOption(new Option('--vm-disks-dir <dir>', "VMs' disks (raw files), by file name; migrated disks arrive here (vm.disksDir)").default(undefined, DEFAULT_QEMU_SETTINGS.disksDir))
  .addOption(new Option('--vm-qemu <binary>', 'the QEMU to run VMs with (vm.qemu)').default(undefined, DEFAULT_QEMU_SETTINGS.binary))
  .addOption(new Option('--vm-bridge <bridge>', 'the bridge the TAP devices of arriving VMs join (vm.bridge)').default(undefined, 'none: left unattached'))
  .action((opts) => runAgent(opts));

const guest = program.command('guest').description('start, stop or resume guests on the local agent (QEMU VMs start with `gangway vm start`; stop and resume take them too)');

withControlOptions(guest.command('start <name>'))
  .description('start a synthetic guest (gangway-guest) that keeps dirtying its memory; for a QEMU VM see `gangway vm start --help`')
  .addOption(
    new Option('--memory <sizes>', 'guest memory, e.g. 512MiB; several regions (a file each, as a VM has RAM below and above 4 GiB) as 256MiB,256MiB')
      .argParser(arg((t) => parseRegionSizes(t, '--memory')))
      .default([parseBytes('512MiB')], '512MiB'),
  )
  .option('--dirty-rate <rate>', 'how fast the guest rewrites memory, e.g. 40MiB/s (0 = idle)', arg((t) => parseRate(t, '--dirty-rate')), 0)
  .addOption(new Option('--profile <profile>', 'page content').choices(['zero', 'os-image', 'random']).default('os-image'))
  .option('--seed <n>', 'content seed (guests with different seeds hold different private pages)', number('--seed', 0, 2 ** 53, true), 1)
  .option('--image-seed <n>', 'image identity: guests with the same image seed share content', number('--image-seed', 0, 2 ** 53, true), 0)
  .option('--shared <fraction>', 'fraction of non-zero pages taken from the image (0-1)', number('--shared', 0, 1), 0)
  .option('--hot <fraction>', 'fraction of memory the guest keeps rewriting (0-1)', number('--hot', 0, 1), 0.25)
  .option('--tap <device>', "the guest's TAP device, where its traffic is measured", tapDevice)
  .option('--json', 'print JSON')
  .action(async (name: string, opts) => {
    try {
      const regions = opts.memory as number[];
      const result = await clientFor(opts).call<{ name: string; pid: number; memoryPaths: string[] }>('POST', '/v1/guests', {
        name,
        memoryBytes: regions.reduce((sum, size) => sum + size, 0),
        ...(regions.length > 1 ? { regionBytes: regions } : {}),
        profile: opts.profile,
        dirtyRateBytesPerSec: opts.dirtyRate,
        seed: opts.seed,
        imageSeed: opts.imageSeed,
        sharedFraction: opts.shared,
        hotFraction: opts.hot,
        ...(opts.tap ? { tap: opts.tap } : {}),
      });
      if (opts.json) console.log(JSON.stringify(result));
      else console.log(`guest ${result.name} running (pid ${result.pid}, memory ${result.memoryPaths.join(', ')})`);
    } catch (err) {
      fail(err, Boolean(opts.json));
    }
  });

for (const [verb, method, suffix, description] of [
  ['stop', 'DELETE', '', 'stop a guest (a VM: QMP quit) and delete its memory and files'],
  ['resume', 'POST', '/resume', 'resume a paused guest (a VM: QMP cont), e.g. after a switchover left in doubt'],
] as const) {
  withControlOptions(guest.command(`${verb} <name>`))
    .description(description)
    .option('--json', 'print JSON')
    .action(async (name: string, opts) => {
      try {
        const client = clientFor(opts);
        const result = await client.call('POST' === method ? 'POST' : 'DELETE', `/v1/guests/${encodeURIComponent(name)}${suffix}`);
        console.log(opts.json ? JSON.stringify(result) : `guest ${name}: ${verb === 'stop' ? 'stopped' : 'resumed'}`);
      } catch (err) {
        fail(err, Boolean(opts.json));
      }
    });
}

addVmCommands(program);
addObserveCommands(program);
addDrainCommand(program);
addMigrationControlCommands(program);

/** --to of migrate and plan: HOST:PORT with a port the destination can listen on. */
const peerAddress = arg((text) => {
  const port = Number(text.slice(text.lastIndexOf(':') + 1));
  if (!/^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$/.test(text) || port < 1 || port > 65535) {
    throw new QuantityError(`"${text}" is not an agent address: use HOST:PORT with a port from 1 to 65535, e.g. 10.0.0.2:7401`);
  }
  return text;
});

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));


withControlOptions(program.command('migrate <guests...>'))
  .description(
    'live-migrate guests to another agent, verified by memory digests; several guests move as a gang or one by one, with content dedup across them (pre-copy). ' +
      'Ctrl-C (or SIGTERM) cancels the migrations and the guests stay here; a second Ctrl-C detaches and lets them go on',
  )
  .requiredOption('--to <host:port>', 'the destination agent', peerAddress)
  .addOption(new Option('--strategy <strategy>', 'several guests: all at once over one session (gang) or one after another (serial)').choices(['gang', 'serial']).default('gang'))
  .option('--no-dedup', 'send every page, even when its content is already at the destination')
  .option('--downtime-ms <ms>', 'downtime budget for the final round', number('--downtime-ms', 1, 600_000), 300)
  .option('--force', 'at the round or byte limit, stop the guest anyway instead of failing')
  .option('--max-rounds <n>', 'pre-copy rounds before giving up', number('--max-rounds', 1, 10_000, true), 30)
  .option('--max-bytes-factor <x>', 'wire bytes allowed, as a multiple of guest memory', number('--max-bytes-factor', 1, 1000), 3)
  .addOption(new Option('--codec <codec>', 'page compression (auto measures whether LZ4 pays)').choices(['auto', 'lz4', 'raw']).default('auto'))
  .option('--bandwidth <rate>', 'cap the migration rate: 100MiB/s or 100MB/s (bytes), 1Gbit/s or 1Gbps (bits)', arg((t) => parseRate(t, '--bandwidth')))
  .addOption(new Option('--tracker <kind>', 'dirty-page tracking for this migration').choices(['auto', 'uffd-wp', 'hash-scan']))
  .addOption(
    new Option(
      '--technique <technique>',
      'precopy: rounds, then stop-and-copy; postcopy: the guest moves at once and its pages follow on demand; ' +
        'hybrid: pre-copy rounds, then post-copy if they do not converge; ' +
        "auto: follow the planner (each guest's technique, the strategy and order, the reserved rate) where the agent measures its uplink, " +
        'else hybrid where the destination can post-copy, else precopy',
    )
      .choices(['precopy', 'postcopy', 'hybrid', 'auto'])
      .default('precopy'),
  )
  .addOption(new Option('--priority <priority>', "the migration's priority: the plan (--technique auto) and the bandwidth reservation").choices(PRIORITIES).default(undefined, "the agent's traffic.priority"))
  .addOption(new Option('--postcopy-after-rounds <n>', 'hybrid: go post-copy after this many pre-copy rounds at the latest').argParser(number('--postcopy-after-rounds', 1, 10_000, true)).default(undefined, '--max-rounds'))
  .addOption(
    new Option(
      '--disks <which>',
      "a VM's disks: all move with it (by --technique; auto takes pre-copy for them); none stay (shared storage: the destination opens the same file name in its vm.disksDir); or those named: disk0,disk1 or file names",
    )
      .default(undefined, 'all')
      .argParser(arg((text) => {
        if (text === 'all' || text === 'none') return text;
        const names = text.split(',');
        const bad = names.find((name) => !/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(name));
        if (bad !== undefined) throw new QuantityError(`--disks "${text}": all, none, or disk names (disk0, vm1.raw) separated by commas; "${bad}" is not one`);
        return names;
      })),
  )
  .option('--detach', 'start the migrations, print their ids and return; follow them with `gangway status`, cancel with `gangway cancel ID`')
  .option('--json', 'print the summary as JSON')
  .option('--json-events', "print the agent's events of these migrations as NDJSON while they run, then the summary as the last event ({\"type\":\"result\"} or {\"type\":\"error\"})")
  .action(async (names: string[], opts) => {
    const jsonEvents = Boolean(opts.jsonEvents);
    const json = Boolean(opts.json) || jsonEvents;
    const tty = process.stderr.isTTY && !json;
    // Without a TTY (a log, a pipe): a progress line now and then instead of one redrawn in place.
    const throttle = !process.stderr.isTTY && !jsonEvents ? new ProgressThrottle() : undefined;
    try {
      const client = clientFor(opts);
      await client.refuseSelf(opts.to);
      const events = jsonEvents ? await followMigrationEvents(client, names) : undefined;
      const started = new StartedMigrations(client, names);
      const latest = new Map<string, MigrationProgress>();
      let forecastEta: ForecastEta | undefined;
      let interrupted = false;
      const migrating = client.migrate(
        {
          guests: names,
          strategy: opts.strategy,
          dedup: Boolean(opts.dedup),
          to: opts.to,
          downtimeMs: opts.downtimeMs,
          force: Boolean(opts.force),
          maxRounds: opts.maxRounds,
          maxBytesFactor: opts.maxBytesFactor,
          codec: opts.codec,
          ...(opts.bandwidth ? { bandwidthBytesPerSec: opts.bandwidth } : {}),
          ...(opts.tracker ? { tracker: opts.tracker } : {}),
          technique: opts.technique,
          ...(opts.priority ? { priority: opts.priority } : {}),
          ...(opts.postcopyAfterRounds ? { postcopyAfterRounds: opts.postcopyAfterRounds } : {}),
          ...(opts.disks ? { disks: opts.disks } : {}),
        },
        (reported) => {
          started.note(reported);
          const { progress, suffix } = forecastEta?.apply(reported, performance.now()) ?? { progress: reported, suffix: '' };
          if (throttle?.take(progress) && !interrupted) process.stderr.write(`${liveProgressLine(progress)}${suffix}\n`);
          if (!tty || interrupted) return;
          latest.set(progress.guest, progress);
          process.stderr.write(`\r\x1b[K${groupProgressLine(latest)}${latest.size === 1 ? suffix : ''}`);
        },
        (forecast) => {
          forecastEta = new ForecastEta(forecast);
          if (!json) console.log(forecastFirstLine(forecast));
        },
      );
      let ended = false;
      const outcome = migrating.then(
        (summary) => ({ summary }),
        (error: unknown) => ({ error }),
      );
      void outcome.finally(() => (ended = true));
      if (opts.detach) {
        // The first id(s) to show up: a gang's migrations all start at once, a serial one's
        // others start in turn.
        while (!ended && started.ids.size === 0) await Promise.race([outcome, sleep(100).then(() => started.refresh().catch(() => {}))]);
        if (!ended) {
          await started.refresh().catch(() => {});
          console.log(detachedStartText(started, opts.to, json));
          process.exit(0);
        }
      }

      // Ctrl-C / SIGTERM: cancel what this command started, as virsh does; again: detach.
      const answers: CancelAnswer[] = [];
      let cancelling: Promise<void> | undefined;
      const interrupt = (signal: NodeJS.Signals) => {
        if (interrupted) {
          if (tty) process.stderr.write('\r\x1b[K');
          const accepted = new Set(answers.filter((a) => a.cancelled).map((a) => a.migrationId));
          process.stderr.write(`gangway: detached (${signal}): ${detachedText(started, opts.to, accepted)}\n`);
          process.exit(130);
        }
        interrupted = true;
        if (tty) process.stderr.write('\r\x1b[K');
        process.stderr.write(`gangway: ${signal}: cancelling the migration of ${names.join(', ')} (press Ctrl-C again to detach and let it go on)\n`);
        cancelling = (async () => {
          // Until the request ends: a serial command starts its next guest when one fails.
          while (!ended) {
            await started.refresh().catch(() => {});
            for (const answer of await started.cancelNew()) {
              answers.push(answer);
              if (!answer.cancelled) {
                process.stderr.write(`gangway: migration ${answer.migrationId.slice(0, 8)} of ${answer.guest} cannot be cancelled: ${answer.message}; following it (Ctrl-C again to detach)\n`);
              }
            }
            await Promise.race([outcome, sleep(150)]);
          }
        })();
      };
      process.on('SIGINT', interrupt);
      process.on('SIGTERM', interrupt);

      const result = await outcome;
      await cancelling;
      await events?.ended([...started.ids.keys()]);
      if (tty) process.stderr.write('\r\x1b[K');
      const cancelled = answers.filter((a) => a.cancelled);
      const moved = new Set('summary' in result ? result.summary.guests.map((g) => g.guest) : []);
      const stayed = cancelled.filter((a) => !moved.has(a.guest));
      if (stayed.length === 0) {
        if ('error' in result) throw result.error;
        console.log(jsonEvents ? JSON.stringify({ type: 'result', summary: result.summary }) : json ? JSON.stringify(result.summary) : groupSummaryText(result.summary));
        // Some guests moved, some did not (each of those runs on here): a partial success.
        if (result.summary.failed.length > 0) process.exitCode = 1;
        return;
      }
      const message = stayed.map((a) => `cancelled: ${a.guest} stays on this host`).join('; ');
      if (json) {
        console.log(
          JSON.stringify({
            ...(jsonEvents ? { type: 'error' } : {}),
            error: { code: ErrorCode.ABORTED, message },
            cancelled: stayed.map(({ guest, migrationId }) => ({ guest, migrationId })),
            notCancelled: answers.filter((a) => !a.cancelled),
            ...('summary' in result ? { summary: result.summary } : {}),
          }),
        );
      } else {
        if ('summary' in result) console.log(groupSummaryText(result.summary));
        for (const a of stayed) console.log(`cancelled: ${a.guest} stays on this host (migration ${a.migrationId.slice(0, 8)})`);
      }
      process.exit(130);
    } catch (err) {
      if (jsonEvents) {
        console.log(JSON.stringify({ type: 'error', error: { code: err instanceof GangwayError ? err.code : ErrorCode.INTERNAL, message: err instanceof Error ? err.message : String(err) } }));
        fail(err, false);
      }
      fail(err, json);
    }
  });

withControlOptions(program.command('plan <guests...>'))
  .description("show what `migrate --technique auto` would run (each guest's technique, the strategy and order, reserved rates, and why) from this host's and the destination's traffic; migrates nothing")
  .requiredOption('--to <host:port>', 'the destination agent (asked for its traffic)', peerAddress)
  .addOption(new Option('--priority <priority>', "the migration's priority").choices(PRIORITIES).default(undefined, "the agent's traffic.priority"))
  .addOption(new Option('--strategy <strategy>', 'the strategy migrate would be given: kept without traffic data').choices(['gang', 'serial']).default('gang'))
  .option('--downtime-ms <ms>', "migrate's downtime budget the forecasts are held to", number('--downtime-ms', 1, 600_000), MIGRATE_DEFAULTS.downtimeMs)
  .option('--force', "as migrate --force: a pre-copy at its round or byte limit stops anyway")
  .option('--max-rounds <n>', "migrate's pre-copy round limit", number('--max-rounds', 1, 10_000, true), MIGRATE_DEFAULTS.maxRounds)
  .option('--max-bytes-factor <x>', "migrate's wire byte limit, as a multiple of guest memory", number('--max-bytes-factor', 1, 1000), MIGRATE_DEFAULTS.maxBytesFactor)
  .option('--no-dedup', 'as migrate --no-dedup: forecast every page sent whole')
  .option('--json', 'print the plan as JSON')
  .action(async (names: string[], opts) => {
    try {
      const client = clientFor(opts);
      await client.refuseSelf(opts.to);
      const plan = await client.call<PlanAnswer>('POST', '/v1/plan', {
        guests: names,
        to: opts.to,
        strategy: opts.strategy,
        downtimeMs: opts.downtimeMs,
        force: Boolean(opts.force),
        maxRounds: opts.maxRounds,
        maxBytesFactor: opts.maxBytesFactor,
        dedup: opts.dedup,
        ...(opts.priority ? { priority: opts.priority } : {}),
      });
      console.log(opts.json ? JSON.stringify(plan) : planText(plan));
    } catch (err) {
      fail(err, Boolean(opts.json));
    }
  });

withControlOptions(program.command('traffic'))
  .description("show the live traffic: per guest and direction, the uplink, the contention level, and the shaper's rates")
  .option('--json', 'print JSON')
  .action(async (opts) => {
    try {
      const status = await clientFor(opts).call<TrafficStatus>('GET', '/v1/traffic');
      console.log(opts.json ? JSON.stringify(status) : trafficText(status));
    } catch (err) {
      fail(err, Boolean(opts.json));
    }
  });

withControlOptions(program.command('cancel <migration-id>'))
  .description('stop an outgoing migration (id or unique prefix, see status); the guest keeps running here')
  .option('--json', 'print JSON')
  .action(async (id: string, opts) => {
    try {
      const cancelled = await clientFor(opts).cancel(id);
      console.log(opts.json ? JSON.stringify({ cancelled }) : `migration ${cancelled} cancelled; the guest keeps running on this host`);
    } catch (err) {
      fail(err, Boolean(opts.json));
    }
  });

withControlOptions(program.command('status'))
  .description('show the local agent, its guests (with their self-check counters) and recent migrations')
  .option('--json', 'print JSON')
  .action(async (opts) => {
    try {
      const status = await clientFor(opts).call<ReturnType<Agent['status']>>('GET', '/v1/status');
      if (opts.json) {
        console.log(JSON.stringify(status));
        return;
      }
      const a = status.agent;
      console.log(`agent ${a.id} on ${a.listen} (pid ${a.pid}, state ${a.stateDir}, tracker ${a.trackerPreference})`);
      if (status.guests.length === 0) console.log('no guests');
      for (const g of status.guests) {
        console.log(
          `  ${g.kind === 'qemu' ? 'VM' : 'guest'} ${g.name}: ${g.state}, pid ${g.pid}, ${(g.memoryBytes / 2 ** 20).toFixed(0)} MiB, tracker ${g.tracker.kind}` +
            (g.passes !== undefined ? `, passes ${g.passes}, stale pages ${g.stalePages}` : '') +
            (g.vmStatus !== undefined ? `, QEMU ${g.vmStatus} (${g.accel}, ${g.cpus} CPU${g.cpus === 1 ? '' : 's'}, ${g.kernel !== undefined ? `kernel ${g.kernel}` : 'booted from its disk'})` : '') +
            (g.testvm ? `, test kernel: passes ${g.testvm.passes}, stale pages ${g.testvm.stalePages}` : '') +
            (g.testvm?.disk ? `, disk ${g.testvm.disk.state}: writes ${g.testvm.disk.writes}, stale blocks ${g.testvm.disk.staleBlocks}` : '') +
            (g.origin.kind === 'migrated' ? `, migrated in from ${g.origin.from}` : ''),
        );
        for (const disk of g.disks ?? []) {
          console.log(
            disk.problem
              ? `    disk ${disk.path}: cannot be read (${disk.problem})`
              : `    disk ${disk.path}: ${(disk.sizeBytes! / 2 ** 20).toFixed(0)} MiB, ${(disk.allocatedBytes! / 2 ** 20).toFixed(1)} MiB allocated`,
          );
        }
        if (g.incoming?.stranded) {
          console.log(
            `    post-copy from ${g.incoming.from} did not complete: ${g.incoming.stranded}. ${g.incoming.missingPages} pages never came; the guest is kept paused ` +
              `with its memory (${g.memoryPath}). The source agent keeps them: when it is back, it reattaches; otherwise the guest cannot run.`,
          );
        } else if (g.incoming) {
          console.log(`    receiving its memory from ${g.incoming.from} (post-copy): ${g.incoming.missingPages} pages to come`);
        }
        if (g.outgoing?.phase === 'paused') {
          console.log(`    paused since ${g.outgoing.since} for a switchover to ${g.outgoing.to} that never reached it; it resumes here`);
        } else if (g.outgoing?.phase === 'commit') {
          console.log(`    switchover in doubt since ${g.outgoing.since}: the commit went to ${g.outgoing.to} unconfirmed; this agent asks there, then removes or resumes this copy`);
        } else if (g.outgoing) {
          console.log(
            `    runs at ${g.outgoing.to} since the post-copy switchover (${g.outgoing.since})` +
              (g.outgoing.interrupted ? `; the link broke (${g.outgoing.interrupted})` : '') +
              `: this paused copy holds what it may still lack there. Do not resume it here.`,
          );
        }
      }
      for (const line of unreadableRecordsText(status.unreadableRecords)) console.log(line);
      for (const m of status.migrations.slice(0, 10)) {
        const peer = m.direction === 'out' ? `→ ${m.to}` : `← ${m.from}`;
        const detail =
          m.state === 'committed' && m.direction === 'out'
            ? ` downtime ${m.summary.downtimeMs.toFixed(1)} ms, total ${m.summary.totalMs.toFixed(0)} ms`
            : m.outcome !== 'cancelled' && (m.state === 'failed' || m.state === 'in-doubt') && m.direction === 'out'
              ? ` ${m.error.message}`
              : m.direction === 'in' && m.outcome !== 'cancelled' && m.result?.reason
                ? ` ${m.result.reason}`
                : '';
        console.log(`  migration ${m.migrationId.slice(0, 8)} ${m.guest} ${peer}: ${m.outcome === 'cancelled' ? outcomeText({ ...m, outcome: 'cancelled' }) : (m.outcome ?? m.state)}${detail}`);
        if (m.direction === 'out' && m.state === 'running' && m.progress) console.log(`    ${liveProgressLine(m.progress)}`);
      }
    } catch (err) {
      fail(err, Boolean(opts.json));
    }
  });

const certs = program.command('certs').description('a small CA and host certificates for mutual TLS between agents (openssl)');
const daysOption = (fallback: number) =>
  new Option('--days <n>', 'validity in days').argParser(arg((t) => checkDays(Number(t)))).default(fallback);

function printCert(result: CertResult, json: boolean, what: string): void {
  if (json) {
    console.log(JSON.stringify(result));
    return;
  }
  console.log(`${what}: ${result.certPath}`);
  console.log(`  key:         ${result.keyPath} (mode 0600)`);
  console.log(`  CA:          ${result.caPath}`);
  if (result.subjectAltNames.length > 0) console.log(`  names:       ${result.subjectAltNames.join(', ')}`);
  console.log(`  valid:       ${result.notBefore} to ${result.notAfter}`);
  console.log(`  fingerprint: ${result.fingerprint}`);
}

certs
  .command('init')
  .description('create a CA: DIR/ca.key (0600) and a self-signed DIR/ca.crt; never overwrites')
  .option('--dir <dir>', 'where the CA lives', '/etc/gangway/tls')
  .addOption(daysOption(DEFAULT_CA_DAYS))
  .option('--json', 'print JSON')
  .action(async (opts) => {
    try {
      const result = await initCa({ dir: opts.dir, days: opts.days });
      printCert(result, Boolean(opts.json), 'CA certificate (tls.ca on every agent)');
      if (!opts.json) console.log(`next: gangway certs issue HOST --dir ${result.caPath.replace(/\/ca\.crt$/, '')} --san ADDRESS`);
    } catch (err) {
      fail(err, Boolean(opts.json));
    }
  });

certs
  .command('issue <name>')
  .description("create DIR/NAME.key (0600) and DIR/NAME.crt signed by DIR's CA, CN=NAME; prints the fingerprint for tls.allow")
  .option('--dir <dir>', 'where the CA lives (the new files go there too)', '/etc/gangway/tls')
  .option('--san <ip-or-dns>', 'an extra subjectAltName (repeat for more)', (value: string, list: string[] = []) => [...list, value])
  .addOption(daysOption(DEFAULT_HOST_DAYS))
  .option('--json', 'print JSON')
  .action(async (name: string, opts) => {
    try {
      const result = await issueHostCert({ dir: opts.dir, name, sans: opts.san ?? [], validity: { days: opts.days } });
      printCert(result, Boolean(opts.json), `certificate for ${name} (tls.cert)`);
      if (!opts.json) console.log(`peers list it in tls.allow as ${name} or ${result.fingerprint}`);
    } catch (err) {
      fail(err, Boolean(opts.json));
    }
  });

program
  .command('demo')
  .description('two local agents, a running guest, a live migration between them, and a summary')
  .addOption(new Option('--memory <size>', 'guest memory').argParser(arg((t) => parseBytes(t, '--memory'))).default(undefined, '512MiB; --vm: 256MiB'))
  .addOption(new Option('--dirty-rate <rate>', 'guest dirty rate').argParser(arg((t) => parseRate(t, '--dirty-rate'))).default(undefined, '40MiB/s; --vm: 8MiB/s, what the test kernel does under TCG'))
  .option('--vm', 'move a QEMU VM (gangway-testvm under TCG) instead of the synthetic process guest')
  .addOption(new Option('--technique <technique>', 'how the guest moves (see migrate --help); postcopy and hybrid need root').choices(['precopy', 'postcopy', 'hybrid', 'auto']).default('precopy'))
  .option('--json', 'print one JSON object')
  .action(async (opts) => {
    try {
      const vm = Boolean(opts.vm);
      await runDemo({
        memoryBytes: opts.memory ?? parseBytes(vm ? '256MiB' : '512MiB'),
        dirtyRateBytesPerSec: opts.dirtyRate ?? parseRate(vm ? '8MiB/s' : '40MiB/s'),
        json: Boolean(opts.json),
        technique: opts.technique,
        vm,
      });
    } catch (err) {
      fail(err, Boolean(opts.json));
    }
  });

addInstallUnitCommand(program);
addCompletionCommand(program);
addManCommand(program);
applyHelp(program);
await program.parseAsync(process.argv);
