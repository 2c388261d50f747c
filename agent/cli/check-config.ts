// `gangway agent --check-config`: what a start would run into, found without starting. The
// settings are valid already (resolveAgentSettings); this looks at the host: the TLS files
// readable and belonging together, the directories there and writable, the addresses free,
// no agent already on the state dir. Every problem is listed, not only the first, so that one
// run under systemd's ExecStartPre (or by hand) shows all there is to fix.
import { accessSync, constants, statSync } from 'node:fs';
import { X509Certificate } from 'node:crypto';
import { createServer } from 'node:net';
import { dirname } from 'node:path';
import { checkSocketPath } from '../control/access.js';
import { controlSocketInUse } from '../daemon.js';
import { DEFAULT_QEMU_SETTINGS } from '../guest/qemu-guest.js';
import { guestPlacement } from '../guest/scope.js';
import { loadTlsMaterial } from '../peer/tls.js';
import { parseListen, type resolveAgentSettings } from './agent-settings.js';

type AgentSettings = ReturnType<typeof resolveAgentSettings>;

/** Why a listen failed, in the operator's words (the setting to change is added by the caller). */
export function listenProblem(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'EADDRINUSE') return 'the address is in use (another agent or program listens there)';
  if (code === 'EADDRNOTAVAIL') return 'no interface of this host has that address';
  if (code === 'EACCES') return 'permission denied (a port below 1024 needs root or CAP_NET_BIND_SERVICE)';
  return err instanceof Error ? err.message : String(err);
}

/** Binds HOST:PORT and lets it go again: the problem a start would have there, or undefined. */
function bindProblem(address: string): Promise<string | undefined> {
  const { host, port } = parseListen(address);
  // Port 0 picks a free port at start: nothing to check.
  if (port === 0) return Promise.resolve(undefined);
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', (err) => resolve(listenProblem(err)));
    server.listen({ host, port, exclusive: true }, () => server.close(() => resolve(undefined)));
  });
}

const errnoOf = (err: unknown) => (err as NodeJS.ErrnoException).code ?? (err as Error).message;

/**
 * A directory the agent needs: there (or, with `creatable`, one it may create: its nearest
 * existing parent is writable) and readable, writable too when `writable`.
 */
function dirProblem(path: string, options: { writable: boolean; creatable?: boolean }): string | undefined {
  let stat;
  try {
    stat = statSync(path);
  } catch (err) {
    if (errnoOf(err) !== 'ENOENT') return `cannot be used (${errnoOf(err)})`;
    if (!options.creatable) return 'does not exist (create it, or set another directory)';
    let parent = dirname(path);
    while (parent !== dirname(parent) && statSync(parent, { throwIfNoEntry: false }) === undefined) parent = dirname(parent);
    try {
      accessSync(parent, constants.W_OK | constants.X_OK);
      return undefined;
    } catch {
      return `does not exist, and this user cannot create it (${parent} is not writable)`;
    }
  }
  if (!stat.isDirectory()) return 'is not a directory';
  const mode = constants.R_OK | constants.X_OK | (options.writable ? constants.W_OK : 0);
  try {
    accessSync(path, mode);
    return undefined;
  } catch (err) {
    return `is not ${options.writable ? 'writable' : 'readable'} by this user (${errnoOf(err)}; the agent runs as uid ${process.getuid?.()})`;
  }
}

/** tls.cert, tls.key and tls.ca as a start reads them, and the certificate against the CA and the clock. */
function tlsProblems(transport: Extract<AgentSettings['transport'], { kind: 'tls' }>): string[] {
  let material;
  try {
    material = loadTlsMaterial(transport);
  } catch (err) {
    return [(err as Error).message];
  }
  const problems: string[] = [];
  const cert = new X509Certificate(material.cert);
  // Peers that trust tls.ca would refuse a certificate it did not sign.
  if (!cert.verify(new X509Certificate(material.ca).publicKey)) {
    problems.push(`tls.cert: ${transport.certPath} is not signed by tls.ca ${transport.caPath}: peers that trust that CA refuse it (issue it with \`gangway certs issue\` from that CA)`);
  }
  if (material.validTo.getTime() < Date.now()) {
    problems.push(`tls.cert: ${transport.certPath} expired on ${material.validTo.toISOString()}: peers refuse it (issue a new one with \`gangway certs issue\`)`);
  }
  return problems;
}

/** The problems a start with these settings would run into on this host; empty when there are none. */
export async function startProblems(settings: AgentSettings): Promise<string[]> {
  const problems: string[] = [];
  if (settings.transport.kind === 'tls') problems.push(...tlsProblems(settings.transport));

  const stateDir = dirProblem(settings.stateDir, { writable: true, creatable: true });
  if (stateDir) problems.push(`stateDir: ${settings.stateDir} ${stateDir}`);
  try {
    checkSocketPath(settings.control.socket);
  } catch (err) {
    problems.push(`stateDir: ${(err as Error).message}`);
  }
  const running = await controlSocketInUse(settings.control.socket);
  if (running) problems.push(`stateDir: an agent is already running with state dir ${settings.stateDir} (it answers on ${settings.control.socket})`);
  const memoryDir = dirProblem(settings.memoryDir, { writable: true });
  if (memoryDir) problems.push(`memoryDir: ${settings.memoryDir} ${memoryDir}`);
  // The VM directories matter once VMs run: the defaults may be absent on a host without VMs,
  // a directory the operator named may not.
  const vmDirs = [
    ['vm.imagesDir', settings.vm.imagesDir, DEFAULT_QEMU_SETTINGS.imagesDir, false],
    ['vm.disksDir', settings.vm.disksDir, DEFAULT_QEMU_SETTINGS.disksDir, true],
    ['dedup.baseImages', settings.dedup.baseImagesDir, undefined, false],
  ] as const;
  for (const [key, path, fallback, writable] of vmDirs) {
    if (path === undefined || (path === fallback && statSync(path, { throwIfNoEntry: false }) === undefined)) continue;
    const problem = dirProblem(path, { writable });
    if (problem) problems.push(`${key}: ${path} ${problem}`);
  }
  const placed = guestPlacement(settings.guests);
  if ('problem' in placed) problems.push(placed.problem);

  const addresses = [
    ['listen', settings.listen, '--listen, GANGWAY_LISTEN'],
    ['metrics.listen', settings.metricsListen, '--metrics-listen, GANGWAY_METRICS_LISTEN'],
    ['control.listen', settings.control.listen, '--control-listen, GANGWAY_CONTROL_LISTEN'],
  ] as const;
  for (const [key, address, where] of addresses) {
    if (address === undefined) continue;
    const problem = await bindProblem(address);
    if (problem) problems.push(`${key}: cannot listen on ${address}: ${problem}; set another address with ${key} (${where})`);
  }
  return problems;
}
