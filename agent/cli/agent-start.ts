// `gangway agent`: the agent's start-up. The settings resolved and checked (or only printed
// and checked, --check-config), the state dir secured, the agent started with its control
// socket, control port and metrics, systemd told, and SIGTERM/SIGINT shutting it down.
import type { Server } from 'node:http';
import { rmSync } from 'node:fs';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { checkSocketPath, secureStateDir } from '../control/access.js';
import { startControlPort, startControlServer } from '../control/server.js';
import { loadOrCreateToken } from '../control/token.js';
import { Agent, controlSocketInUse, DEFAULT_AGENT_CONFIG, type AgentConfig } from '../daemon.js';
import { guestPlacement, placeGuests } from '../guest/scope.js';
import { createLogger } from '../log.js';
import { SystemdNotifier } from '../systemd.js';
import { parseListen, resolveAgentSettings } from './agent-settings.js';
import { listenProblem, startProblems } from './check-config.js';
import { fail } from './common.js';

/** Runs the agent with the `agent` command's options until a signal stops it (exits on a start that fails). */
export async function runAgent(opts: Parameters<typeof resolveAgentSettings>[0]): Promise<void> {
  let settings: ReturnType<typeof resolveAgentSettings>;
  try {
    settings = resolveAgentSettings(opts);
  } catch (err) {
    fail(err, false);
  }
  if (opts.checkConfig) {
    // The settings as a start would take them, even when this host is not ready for them.
    console.log(JSON.stringify(settings, null, 2));
    const problems = await startProblems(settings);
    if (problems.length > 0) fail(new GangwayError(ErrorCode.BAD_REQUEST, `a start would fail:\n  ${problems.join('\n  ')}`), false);
    return;
  }
  const log = createLogger(settings.logLevel);
  const stateDir = settings.stateDir;
  const socketPath = settings.control.socket;
  if (await controlSocketInUse(socketPath)) {
    fail(new GangwayError(ErrorCode.BAD_REQUEST, `another agent is already running with state dir ${stateDir}`), false);
  }
  let token: string | undefined;
  try {
    checkSocketPath(socketPath);
    const tightened = secureStateDir(stateDir, settings.control.group);
    if (tightened.modeBefore !== undefined) {
      log.warn({ stateDir, modeBefore: `0${tightened.modeBefore.toString(8)}` }, 'state dir was open to more than the agent and its group: tightened');
    }
    if (settings.control.tokenFile) {
      const loaded = loadOrCreateToken(settings.control.tokenFile);
      token = loaded.token;
      if (loaded.created) log.info({ tokenFile: settings.control.tokenFile }, 'control token created');
    }
  } catch (err) {
    fail(err, false);
  }
  const config: AgentConfig = {
    ...DEFAULT_AGENT_CONFIG,
    listenHost: settings.listenHost,
    listenPort: settings.listenPort,
    stateDir,
    memoryDir: settings.memoryDir,
    tracker: settings.tracker,
    shutdownGraceMs: settings.shutdownGraceMs,
    peerTimeoutMs: settings.peerTimeoutMs,
    postcopyReattachMs: settings.postcopyReattachMs,
    transport: settings.transport,
    traffic: settings.traffic,
    peers: settings.peers,
    migration: settings.migration,
    dedup: settings.dedup,
    vm: settings.vm,
  };
  const placed = guestPlacement(settings.guests);
  if ('problem' in placed) fail(new GangwayError(ErrorCode.BAD_REQUEST, placed.problem), false);
  placeGuests(placed.placement);
  if (placed.placement.kind === 'scope') log.info({ slice: placed.placement.slice }, 'guests start in systemd scopes of their own');
  let agent!: Agent;
  try {
    agent = new Agent(config, log);
  } catch (err) {
    fail(err, false);
  }
  const controlServers: Server[] = [];
  try {
    await agent.start();
    controlServers.push(await startControlServer(agent, socketPath, settings.control.group));
  } catch (err) {
    fail(err, false);
  }
  if (settings.control.listen) {
    const { host, port } = parseListen(settings.control.listen);
    try {
      const server = await startControlPort(agent, host, port, token!);
      controlServers.push(server);
      const address = server.address();
      agent.controlAddress = `${host.includes(':') ? `[${host}]` : host}:${typeof address === 'object' && address ? address.port : port}`;
      log.info({ controlPort: agent.controlAddress, tokenFile: settings.control.tokenFile }, 'control port ready');
    } catch (err) {
      fail(new GangwayError(ErrorCode.BAD_REQUEST, `cannot serve the control API on ${settings.control.listen}: ${listenProblem(err)}; set another address with control.listen (--control-listen, GANGWAY_CONTROL_LISTEN)`), false);
    }
  }
  if (settings.metricsListen) {
    const { host, port } = parseListen(settings.metricsListen);
    try {
      const server = await agent.metrics.serve(host, port, () => agent.ready);
      const address = server.address();
      agent.metricsAddress = `${host}:${typeof address === 'object' && address ? address.port : port}`;
      log.info({ metrics: `http://${agent.metricsAddress}/metrics` }, 'metrics served');
    } catch (err) {
      fail(new GangwayError(ErrorCode.BAD_REQUEST, `cannot serve metrics on ${settings.metricsListen}: ${listenProblem(err)}; set another address with metrics.listen (--metrics-listen, GANGWAY_METRICS_LISTEN)`), false);
    }
  }
  const systemd = SystemdNotifier.fromEnv(log);
  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'signal received');
    systemd.stopping();
    await agent.stop();
    for (const server of controlServers) server.close();
    rmSync(socketPath, { force: true });
    process.exit(0);
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));
  log.info({ control: socketPath }, 'control API ready');
  systemd.ready(`listening on ${agent.listenAddress}`);
}
