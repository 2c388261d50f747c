// The settings `gangway agent` runs with: defaults < config file < GANGWAY_* environment <
// flags, validated, in the agent's units; a flag's mistake names the flag.
import { DEFAULT_QEMU_SETTINGS } from '../guest/qemu-guest.js';
import { GUEST_SCOPE_DEFAULTS } from '../guest/scope.js';
import { resolve } from 'node:path';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { completeTls, CONFIG_DEFAULTS, ConfigLayerSchema, configFromEnv, loadConfigFile, mergeConfig, resolveControlAccess, MIGRATION_LIMIT_DEFAULTS, resolveDedupPolicy, resolvePeerLimits, resolvePeerTransport, resolveTrafficConfig } from '../config.js';
import { controlSocketPath, DEFAULT_AGENT_CONFIG } from '../daemon.js';
import { QuantityError } from '../units.js';

export function parseListen(text: string): { host: string; port: number } {
  const match = /^(.+):(\d{1,5})$/.exec(text);
  const port = Number(match?.[2]);
  if (!match || port > 65535) throw new QuantityError('use HOST:PORT, e.g. 127.0.0.1:7401 (port 0 picks a free one)');
  return { host: match[1]!.replace(/^\[|\]$/g, ''), port };
}

/**
 * `--metrics-listen` for metrics.listen, `--tls-allow` for tls.allow.0, `--control-token-file`
 * for control.tokenFile, `--link-capacity` for traffic.linkCapacity.
 */
function flagOf(path: PropertyKey[]): string {
  const [section, key] = path.map(String);
  const camel =
    section === 'tls' ? `tls-${key}` : key === undefined ? section! : section === 'traffic' ? key : `${section}${key[0]!.toUpperCase()}${key.slice(1)}`;
  return `--${camel.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
}

/** Defaults < config file < GANGWAY_* environment < flags, validated, in the agent's units. */
export function resolveAgentSettings(opts: Record<string, string | string[] | boolean | undefined>) {
  const str = (value: unknown) => value as string | undefined;
  const path = (value: unknown) => (value === undefined ? undefined : resolve(str(value)!));
  const section = (entries: Record<string, unknown>) => {
    const defined = Object.entries(entries).filter(([, v]) => v !== undefined);
    return defined.length > 0 ? Object.fromEntries(defined) : undefined;
  };
  const flags: Record<string, unknown> = {
    listen: opts.listen,
    stateDir: path(opts.stateDir),
    memoryDir: path(opts.memoryDir),
    tracker: opts.tracker,
    shutdownGrace: opts.shutdownGrace,
    peerTimeout: opts.peerTimeout,
    postcopyReattach: opts.postcopyReattach,
    logLevel: opts.logLevel,
    metrics: section({ listen: opts.metricsListen }),
    control: section({ group: opts.controlGroup, listen: opts.controlListen, tokenFile: path(opts.controlTokenFile) }),
    // --tls-* flags override single tls settings of the file or the environment.
    tls: section({ cert: path(opts.tlsCert), key: path(opts.tlsKey), ca: path(opts.tlsCa), allow: opts.tlsAllow }),
    insecurePlaintextLoopback: opts.insecurePlaintextLoopback ? true : undefined,
    traffic: section({ uplink: opts.uplink, linkCapacity: opts.linkCapacity, planner: opts.planner }),
    vm: section({ imagesDir: path(opts.vmImagesDir), disksDir: path(opts.vmDisksDir), qemu: opts.vmQemu, bridge: opts.vmBridge }),
  };
  const given = Object.fromEntries(Object.entries(flags).filter(([, v]) => v !== undefined));
  const parsed = ConfigLayerSchema.safeParse(given);
  if (!parsed.success) {
    const valueAt = (path: PropertyKey[]) => path.reduce<unknown>((value, part) => (value as Record<PropertyKey, unknown> | undefined)?.[part], given);
    const shown = (value: unknown) => (value === undefined || typeof value === 'object' ? '' : ` (got ${JSON.stringify(value)})`);
    // One problem per flag: "--listen 127.0.0.1" fails the HOST:PORT pattern, and the port
    // check after it would only add a second, confusing line.
    const issues = parsed.error.issues.filter((issue, i, all) => all.findIndex((other) => other.path.join('.') === issue.path.join('.')) === i);
    throw new GangwayError(ErrorCode.BAD_REQUEST, issues.map((i) => `${flagOf(i.path)}: ${i.message}${shown(valueAt(i.path))}`).join('\n'));
  }
  const merged = mergeConfig(
    CONFIG_DEFAULTS,
    opts.config ? loadConfigFile(resolve(str(opts.config)!)) : {},
    configFromEnv(process.env),
    parsed.data,
  );
  const tls = completeTls(merged.tls);
  const listen = parseListen(merged.listen!);
  const transport = resolvePeerTransport({ tls, insecurePlaintextLoopback: merged.insecurePlaintextLoopback }, listen.host);
  const stateDir = resolve(merged.stateDir!);
  return {
    listen: merged.listen!,
    listenHost: listen.host,
    listenPort: listen.port,
    stateDir,
    memoryDir: resolve(merged.memoryDir!),
    tracker: merged.tracker!,
    shutdownGraceMs: merged.shutdownGrace!,
    peerTimeoutMs: merged.peerTimeout ?? DEFAULT_AGENT_CONFIG.peerTimeoutMs,
    postcopyReattachMs: merged.postcopyReattach ?? DEFAULT_AGENT_CONFIG.postcopyReattachMs,
    logLevel: merged.logLevel!,
    metricsListen: merged.metrics?.listen,
    control: { socket: controlSocketPath(stateDir), ...resolveControlAccess(merged.control, stateDir) },
    transport,
    traffic: resolveTrafficConfig(merged.traffic),
    peers: resolvePeerLimits(merged.peers),
    migration: {
      maxParallelOutbound: merged.migration?.maxParallelOutbound ?? MIGRATION_LIMIT_DEFAULTS.maxParallelOutbound,
      channels: merged.migration?.channels ?? MIGRATION_LIMIT_DEFAULTS.channels,
    },
    dedup: resolveDedupPolicy(merged.dedup),
    guests: { ...GUEST_SCOPE_DEFAULTS, ...merged.guests },
    vm: {
      imagesDir: resolve(merged.vm?.imagesDir ?? DEFAULT_QEMU_SETTINGS.imagesDir),
      disksDir: resolve(merged.vm?.disksDir ?? DEFAULT_QEMU_SETTINGS.disksDir),
      binary: merged.vm?.qemu ?? DEFAULT_QEMU_SETTINGS.binary,
      ...(merged.vm?.bridge ? { bridge: merged.vm.bridge } : {}),
    },
    configFile: opts.config ? resolve(str(opts.config)!) : undefined,
  };
}
