// The agent's configuration: one YAML file (`gangway agent --config FILE`), overridden by
// environment variables (GANGWAY_*), overridden by flags. Every mistake names the key,
// the value and what is allowed.
import { readFileSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import { parseDocument } from 'yaml';
import { z } from 'zod';
import { ErrorCode, GangwayError } from '../protocol/errors.js';
import { parseBytes, parseDurationMs, parseRate, QuantityError } from './units.js';
import { allowEntryProblem } from './peer/allowlist.js';
import { isLoopbackHost, type PeerTransport } from './peer/tls.js';
import { resolveControlGroup, type ControlGroup } from './control/group.js';
import { GUEST_SCOPE_MODES, SLICE_NAME_PATTERN } from './guest/scope.js';
import { DEFAULT_PLANNER_MODE, PLANNER_MODES, type PlannerMode } from './planner/choose.js';

export const LOG_LEVELS = ['debug', 'info', 'warn', 'error'] as const;
export const TRACKERS = ['auto', 'uffd-wp', 'hash-scan'] as const;

const hostPort = z
  .string()
  .regex(/^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, { message: 'must be HOST:PORT, e.g. 127.0.0.1:7401', abort: true })
  .refine((value) => Number(value.slice(value.lastIndexOf(':') + 1)) <= 65535, 'port must be at most 65535');
const absolutePath = z.string().min(1).refine(isAbsolute, 'must be an absolute path');
/** A number as it is, or text read by `parse` ("10s", "64MiB"), whose error becomes the issue. */
const quantity = (number: z.ZodNumber, parse: (text: string) => number) =>
  z.union([number, z.string()]).transform((value, ctx) => {
    if (typeof value === 'number') return value;
    try {
      return parse(value);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: err instanceof QuantityError ? err.message : String(err) });
      return z.NEVER;
    }
  });
const duration = quantity(z.number().min(0), (text) => parseDurationMs(text, 'duration'));

/** A rate in bytes per second: a number, or text such as "1Gbit/s" or "100MiB/s". */
const rate = z.union([z.number().positive(), z.string()]).transform((value, ctx) => {
  let bytesPerSec: number;
  try {
    bytesPerSec = typeof value === 'number' ? value : parseRate(value, 'rate');
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: err instanceof QuantityError ? err.message : String(err) });
    return z.NEVER;
  }
  if (!(bytesPerSec > 0)) {
    ctx.addIssue({ code: 'custom', message: 'must be a rate above 0, e.g. 1Gbit/s or 100MiB/s' });
    return z.NEVER;
  }
  return bytesPerSec;
});
/** A share of the link, above 0 and below 1 (environment variables give it as text). */
const SHARE_RULE = 'must be a number above 0 and below 1, e.g. 0.7';
const share = z.preprocess(
  (value) => (typeof value === 'string' && /^\s*\d*\.?\d+\s*$/.test(value) ? Number(value) : value),
  z.number({ error: SHARE_RULE }).gt(0, SHARE_RULE).lt(1, SHARE_RULE),
);

export const PRIORITIES = ['high', 'medium', 'low'] as const;
/** Linux interface names: 1 to 15 characters, no '/', ':' or whitespace. */
export const INTERFACE_NAME_PATTERN = /^[A-Za-z0-9_.-]{1,15}$/;
const INTERFACE_NAME_RULE = "must be an interface name: 1 to 15 letters, digits, '_', '.' or '-'";

/**
 * Bandwidth control (seed paper 003): the uplink the guests and migrations share, and the
 * workload's SLA. Contention is high from `contention.high` of the link, moderate from
 * `contention.moderate`, low below that.
 */
export const TrafficSettingsSchema = z
  .object({
    uplink: z.string().regex(INTERFACE_NAME_PATTERN, INTERFACE_NAME_RULE),
    linkCapacity: rate,
    slaLower: rate,
    slaUpper: rate,
    contention: z.object({ high: share, moderate: share }).partial().strict(),
    priority: z.enum(PRIORITIES),
    sampleInterval: duration.pipe(z.number().min(100, 'must be at least 100ms').max(60_000, 'must be at most 60s')),
    /** How --technique auto, plan and drain choose: 'forecast' (the best forecast) or 'paper' (seed paper 003's rules). */
    planner: z.enum(PLANNER_MODES),
  })
  .partial()
  .strict();
export type TrafficSettings = z.infer<typeof TrafficSettingsSchema>;

const allowEntry = z.string().superRefine((entry, ctx) => {
  const problem = entry === '' ? 'is empty (a CN or sha256:FINGERPRINT is needed)' : allowEntryProblem(entry);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

const TLS_NEEDS = 'is missing (tls needs cert, key, ca and allow)';
const tlsPath = z
  .string({ error: (issue) => (issue.input === undefined ? TLS_NEEDS : undefined) })
  .min(1)
  .refine(isAbsolute, 'must be an absolute path');

/** Mutual TLS between agents: this agent's certificate and key, the CA both sides trust, the peers it accepts. */
export const TlsSettingsSchema = z
  .object({
    cert: tlsPath,
    key: tlsPath,
    ca: tlsPath,
    allow: z.array(allowEntry, { error: (issue) => (issue.input === undefined ? TLS_NEEDS : undefined) }).min(1, 'must list at least one peer (a certificate CN or sha256:FINGERPRINT)'),
  })
  .strict();

export type TlsSettings = z.infer<typeof TlsSettingsSchema>;

const REMOTE_CONTROL_REFUSED =
  'must be a loopback address (127.0.0.0/8, ::1 or localhost): remote control would need TLS and an allowlist, which the control API does not offer';
const loopbackHostPort = z.string().superRefine((value, ctx) => {
  const parsed = hostPort.safeParse(value);
  if (!parsed.success) ctx.addIssue({ code: 'custom', message: parsed.error.issues[0]!.message });
  else if (!isLoopbackHost(value.slice(0, value.lastIndexOf(':')))) ctx.addIssue({ code: 'custom', message: REMOTE_CONTROL_REFUSED });
});
const controlGroup = z.union([z.number(), z.string()], { error: 'must be a group name or a numeric gid' }).superRefine((value, ctx) => {
  const group = resolveControlGroup(value);
  if ('problem' in group) ctx.addIssue({ code: 'custom', message: group.problem });
});

/**
 * The local control API: the unix socket STATE_DIR/control.sock is mode 0660, owned by the
 * agent's user and `group` (the users who may drive the agent); `listen` adds a loopback TCP
 * port that takes requests carrying the token in `tokenFile` (default STATE_DIR/control.token).
 */
export const ControlSettingsSchema = z
  .object({
    group: controlGroup,
    listen: loopbackHostPort,
    tokenFile: absolutePath,
  })
  .partial()
  .strict();

const count = (min: number, max: number) =>
  z.preprocess(
    (value) => (typeof value === 'string' && /^\s*\d+\s*$/.test(value) ? Number(value) : value),
    z.number({ error: `must be a whole number from ${min} to ${max}` }).int(`must be a whole number from ${min} to ${max}`).min(min, `must be at least ${min}`).max(max, `must be at most ${max}`),
  );
const size = quantity(z.number().int().min(0), (text) => parseBytes(text, 'size'));

/**
 * What one peer may make this agent do: each limit is refused (and logged and counted in
 * gangway_peer_limit_total{limit}) rather than served when it is hit.
 */
export const PeersSettingsSchema = z
  .object({
    /** Open sessions from one peer identity at once. */
    maxSessionsPerPeer: count(1, 1024),
    /** Incoming migrations from one peer identity at once. */
    maxIncomingPerPeer: count(1, 4096),
    /** Incoming migrations at once, from all peers. */
    maxIncoming: count(1, 4096),
    /** Dedup groups open on one session. */
    maxGroupsPerSession: count(1, 1024),
    /** TLS handshake plus WebSocket upgrade, and the hello after it. */
    handshakeTimeout: duration.pipe(z.number().min(100, 'must be at least 100ms').max(600_000, 'must be at most 10min')),
    /** Session-level requests (offer, reattach, migrationQuery, trafficQuery, dedupOpen, dedupClose): sustained rate per session. */
    requestsPerSecond: count(1, 1_000_000),
    /** ... and the burst a session may send at once. */
    requestBurst: count(1, 1_000_000),
    /** Space in memoryDir kept free beyond what accepted migrations have reserved. */
    memoryHeadroom: size,
    /** LZ4 decompressions of incoming pages under way at once on one session. */
    decompressionsPerSession: count(1, 256),
    /** The largest device state an incoming guest may bring (checked before it is allocated). */
    maxDeviceState: size,
  })
  .partial()
  .strict();
export type PeersSettings = z.infer<typeof PeersSettingsSchema>;

/**
 * This host's own migrations: how many may leave at once (migration.maxParallelOutbound, as
 * KubeVirt's parallelOutboundMigrationsPerNode); one beyond waits its turn. Arriving ones
 * are bounded by peers.maxIncoming. migration.channels: TCP connections, each with a thread at
 * both ends, that carry a pre-copy's raw rounds beside its session (a gang's members share
 * them, one each at least; 0: the session only).
 */
export const MigrationSettingsSchema = z.object({ maxParallelOutbound: count(1, 256), channels: count(0, 4) }).partial().strict();
export interface MigrationLimits {
  maxParallelOutbound: number;
  channels: number;
}
export const MIGRATION_LIMIT_DEFAULTS: MigrationLimits = { maxParallelOutbound: 2, channels: 2 };

export const RESIDENT_POLICIES = ['from-peer', 'all', 'none'] as const;

/**
 * Dedup against content already at this host (resident guests). Offering a guest means
 * sending the 128-bit fingerprint of each of its pages to the asking peer, which is enough to
 * confirm a guessed page offline: `resident` says whose guests a peer may see.
 * from-peer: only guests that peer itself migrated here; all: every guest on this host (for
 * hosts that trust each other with their guests' content); none: no resident dedup.
 */
export const DedupSettingsSchema = z
  .object({
    resident: z.enum(RESIDENT_POLICIES),
    /** Resident offers one peer may ask for per minute; further groups get none. */
    residentOffersPerMinute: count(0, 10_000),
    /** How long a resident guest's fingerprints are reused before they are computed again. */
    residentMaxAge: duration.pipe(z.number().min(0).max(3_600_000, 'must be at most 1h')),
    /**
     * A directory of base images (raw files VMs' disks were cloned from): their blocks are
     * offered to every peer that asks for resident content, whatever `resident` says (the
     * operator put them there to be shared).
     */
    baseImages: absolutePath,
  })
  .partial()
  .strict();
export type DedupSettings = z.infer<typeof DedupSettingsSchema>;

/** The settings a config file may hold (all optional: defaults and flags fill the rest). */
export const ConfigFileSchema = z
  .object({
    listen: hostPort,
    stateDir: absolutePath,
    memoryDir: absolutePath,
    tracker: z.enum(TRACKERS),
    shutdownGrace: duration,
    /** A peer session silent this long (no frame, no pong) is taken as dead. */
    peerTimeout: duration.pipe(z.number().min(1000, 'must be at least 1s').max(600_000, 'must be at most 10min')),
    /** Post-copy: how long either side waits for a broken link to the other to come back. */
    postcopyReattach: duration.pipe(z.number().min(1000, 'must be at least 1s').max(86_400_000, 'must be at most 24h')),
    logLevel: z.enum(LOG_LEVELS),
    metrics: z.object({ listen: hostPort }).strict(),
    control: ControlSettingsSchema,
    tls: TlsSettingsSchema,
    insecurePlaintextLoopback: z.boolean({ error: 'must be true or false' }),
    traffic: TrafficSettingsSchema,
    peers: PeersSettingsSchema,
    migration: MigrationSettingsSchema,
    dedup: DedupSettingsSchema,
    /** Guests in systemd scopes of their own (agent/guest/scope.ts). */
    guests: z
      .object({
        scope: z.enum(GUEST_SCOPE_MODES),
        slice: z.string().regex(SLICE_NAME_PATTERN, "a slice's unit name, e.g. machine.slice"),
      })
      .partial()
      .strict(),
    vm: z
      .object({
        imagesDir: absolutePath,
        disksDir: absolutePath,
        qemu: z.string().min(1, 'must name the QEMU binary').max(4096),
        bridge: z.string().regex(INTERFACE_NAME_PATTERN, "an interface name: 1 to 15 letters, digits, '_', '.' or '-'"),
      })
      .partial()
      .strict(),
  })
  .partial()
  .strict();

export type ConfigFile = z.infer<typeof ConfigFileSchema>;

/**
 * One layer of settings from the environment or from flags: like the file, except that it may
 * override single tls settings (the merged result must still be complete: see completeTls).
 */
export const ConfigLayerSchema = ConfigFileSchema.extend({ tls: TlsSettingsSchema.partial().optional() });
export type ConfigLayer = z.infer<typeof ConfigLayerSchema>;

/** What an agent runs with when neither file, environment nor flag says otherwise. */
export const CONFIG_DEFAULTS = {
  listen: '127.0.0.1:7401',
  stateDir: '/var/lib/gangway',
  memoryDir: '/dev/shm',
  tracker: 'auto',
  shutdownGrace: 10_000,
  logLevel: 'info',
} as const satisfies ConfigFile;

/** Environment variables that override the file, by setting (dotted: a nested setting). */
export const ENV_OVERRIDES = {
  GANGWAY_LISTEN: 'listen',
  GANGWAY_STATE_DIR: 'stateDir',
  GANGWAY_MEMORY_DIR: 'memoryDir',
  GANGWAY_VM_IMAGES_DIR: 'vm.imagesDir',
  GANGWAY_VM_DISKS_DIR: 'vm.disksDir',
  GANGWAY_VM_QEMU: 'vm.qemu',
  GANGWAY_VM_BRIDGE: 'vm.bridge',
  GANGWAY_TRACKER: 'tracker',
  GANGWAY_SHUTDOWN_GRACE: 'shutdownGrace',
  GANGWAY_PEER_TIMEOUT: 'peerTimeout',
  GANGWAY_POSTCOPY_REATTACH: 'postcopyReattach',
  GANGWAY_LOG_LEVEL: 'logLevel',
  GANGWAY_METRICS_LISTEN: 'metrics.listen',
  GANGWAY_CONTROL_GROUP: 'control.group',
  GANGWAY_CONTROL_LISTEN: 'control.listen',
  GANGWAY_CONTROL_TOKEN_FILE: 'control.tokenFile',
  GANGWAY_TLS_CERT: 'tls.cert',
  GANGWAY_TLS_KEY: 'tls.key',
  GANGWAY_TLS_CA: 'tls.ca',
  /** Comma-separated. */
  GANGWAY_TLS_ALLOW: 'tls.allow',
  GANGWAY_TRAFFIC_UPLINK: 'traffic.uplink',
  GANGWAY_TRAFFIC_LINK_CAPACITY: 'traffic.linkCapacity',
  GANGWAY_TRAFFIC_SLA_LOWER: 'traffic.slaLower',
  GANGWAY_TRAFFIC_SLA_UPPER: 'traffic.slaUpper',
  GANGWAY_TRAFFIC_CONTENTION_HIGH: 'traffic.contention.high',
  GANGWAY_TRAFFIC_CONTENTION_MODERATE: 'traffic.contention.moderate',
  GANGWAY_TRAFFIC_PRIORITY: 'traffic.priority',
  GANGWAY_TRAFFIC_SAMPLE_INTERVAL: 'traffic.sampleInterval',
  GANGWAY_TRAFFIC_PLANNER: 'traffic.planner',
  GANGWAY_PEERS_MAX_SESSIONS_PER_PEER: 'peers.maxSessionsPerPeer',
  GANGWAY_PEERS_MAX_INCOMING_PER_PEER: 'peers.maxIncomingPerPeer',
  GANGWAY_PEERS_MAX_INCOMING: 'peers.maxIncoming',
  GANGWAY_PEERS_MAX_GROUPS_PER_SESSION: 'peers.maxGroupsPerSession',
  GANGWAY_PEERS_HANDSHAKE_TIMEOUT: 'peers.handshakeTimeout',
  GANGWAY_PEERS_REQUESTS_PER_SECOND: 'peers.requestsPerSecond',
  GANGWAY_PEERS_REQUEST_BURST: 'peers.requestBurst',
  GANGWAY_PEERS_MEMORY_HEADROOM: 'peers.memoryHeadroom',
  GANGWAY_PEERS_DECOMPRESSIONS_PER_SESSION: 'peers.decompressionsPerSession',
  GANGWAY_PEERS_MAX_DEVICE_STATE: 'peers.maxDeviceState',
  GANGWAY_MIGRATION_MAX_PARALLEL_OUTBOUND: 'migration.maxParallelOutbound',
  GANGWAY_MIGRATION_CHANNELS: 'migration.channels',
  GANGWAY_DEDUP_RESIDENT: 'dedup.resident',
  GANGWAY_DEDUP_RESIDENT_OFFERS_PER_MINUTE: 'dedup.residentOffersPerMinute',
  GANGWAY_DEDUP_RESIDENT_MAX_AGE: 'dedup.residentMaxAge',
  GANGWAY_DEDUP_BASE_IMAGES: 'dedup.baseImages',
  GANGWAY_GUESTS_SCOPE: 'guests.scope',
  GANGWAY_GUESTS_SLICE: 'guests.slice',
} as const;

const ENV_NAME_OF: Record<string, string> = Object.fromEntries(Object.entries(ENV_OVERRIDES).map(([name, key]) => [key, name]));

const quotedKey = (path: PropertyKey[]) => `'${path.map(String).join('.')}'`;

/** The settings a section of the file takes ([] for the top level); none for a path that is not a section. */
function settingsAt(path: PropertyKey[]): string[] {
  let schema: unknown = ConfigFileSchema;
  for (const part of [...path, undefined]) {
    while (schema instanceof z.ZodOptional) schema = schema.unwrap();
    if (!(schema instanceof z.ZodObject)) return [];
    if (part === undefined) return Object.keys(schema.shape);
    schema = (schema.shape as Record<PropertyKey, unknown>)[part];
  }
  return [];
}

/** Edits (insert, delete, replace, swap two neighbours) from one word to another, ignoring case. */
function editDistance(from: string, to: string): number {
  const a = from.toLowerCase();
  const b = to.toLowerCase();
  const rows = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const row = rows[i]!;
      row[j] = Math.min(rows[i - 1]![j]! + 1, row[j - 1]! + 1, rows[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) row[j] = Math.min(row[j]!, rows[i - 2]![j - 2]! + 1);
    }
  }
  return rows[a.length]![b.length]!;
}

/**
 * What to say of a key the file's section does not take: the setting it is most likely a typo
 * of (a third of its letters wrong at most), else the settings that section takes; the whole
 * list of every section only buried the one that was meant.
 */
function unknownKeyText(section: PropertyKey[], key: string): string {
  const dotted = [...section, key].join('.');
  const allowed = settingsAt(section);
  const ranked = allowed.map((name) => ({ name, distance: editDistance(key, name) })).sort((x, y) => x.distance - y.distance);
  const best = ranked[0];
  if (best && best.distance <= Math.max(1, Math.floor(best.name.length / 3))) {
    return `'${dotted}' is not a setting: did you mean '${[...section, best.name].join('.')}'?`;
  }
  const where = section.length === 0 ? 'the top level' : section.join('.');
  return `'${dotted}' is not a setting (${where} takes ${allowed.join(', ')})`;
}

function describeIssues(where: string, error: z.ZodError, input: unknown, label: (path: PropertyKey[]) => string = quotedKey): string {
  return error.issues
    .map((issue) => {
      if (issue.code === 'unrecognized_keys') return issue.keys.map((key) => `${where}: ${unknownKeyText(issue.path, key)}`).join('\n');
      let value: unknown = input;
      for (const part of issue.path) value = (value as Record<PropertyKey, unknown> | undefined)?.[part as PropertyKey];
      const shown = value === undefined ? '' : ` (got ${JSON.stringify(value)})`;
      return `${where}: ${label(issue.path)} ${issue.message}${shown}`;
    })
    .join('\n');
}

/** Reads and validates a config file; throws GangwayError BAD_REQUEST with every problem found. */
export function loadConfigFile(path: string): ConfigFile {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `config ${path}: cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
  const doc = parseDocument(text, { prettyErrors: true, uniqueKeys: true });
  if (doc.errors.length > 0) {
    const first = doc.errors[0]!;
    const at = first.linePos?.[0] ? ` at line ${first.linePos[0].line}, column ${first.linePos[0].col}` : '';
    throw new GangwayError(ErrorCode.BAD_REQUEST, `config ${path}: not valid YAML${at}: ${first.message.split('\n')[0]!.replace(/ at line \d+, column \d+:?$/, '')}`);
  }
  const data = (doc.toJS() ?? {}) as unknown;
  if (typeof data !== 'object' || data === null || Array.isArray(data)) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `config ${path}: must be a mapping of settings (e.g. "listen: 127.0.0.1:7401")`);
  }
  return validate(`config ${path}`, data);
}

function validate(where: string, data: unknown): ConfigFile {
  const result = ConfigFileSchema.safeParse(data);
  if (!result.success) throw new GangwayError(ErrorCode.BAD_REQUEST, describeIssues(where, result.error, data));
  return result.data;
}

/** The variable a setting's path came from: `GANGWAY_TLS_ALLOW entry 2` for ['tls', 'allow', 1]. */
function envLabel(path: PropertyKey[]): string {
  for (let length = path.length; length > 0; length--) {
    const name = ENV_NAME_OF[path.slice(0, length).map(String).join('.')];
    if (!name) continue;
    const rest = path.slice(length);
    return rest.length === 1 && typeof rest[0] === 'number' ? `${name} entry ${rest[0] + 1}` : name;
  }
  return quotedKey(path);
}

/**
 * The settings given by GANGWAY_* environment variables, validated like the file; a tls
 * variable overrides that one tls setting (GANGWAY_TLS_ALLOW: entries separated by commas).
 */
export function configFromEnv(env: NodeJS.ProcessEnv): ConfigLayer {
  const data: Record<string, unknown> = {};
  for (const [name, key] of Object.entries(ENV_OVERRIDES)) {
    const text = env[name];
    if (text === undefined || text === '') continue;
    const value = key === 'tls.allow' ? text.split(',').map((entry) => entry.trim()) : text;
    // Dotted keys build the nested mapping: traffic.contention.high → { traffic: { contention: { high } } }.
    const path = key.split('.');
    let into = data;
    for (const part of path.slice(0, -1)) into = (into[part] ??= {}) as Record<string, unknown>;
    into[path.at(-1)!] = value;
  }
  const result = ConfigLayerSchema.safeParse(data);
  if (!result.success) throw new GangwayError(ErrorCode.BAD_REQUEST, describeIssues('environment', result.error, data, envLabel));
  return result.data;
}

const isSection = (value: unknown): value is Record<string, unknown> => typeof value === 'object' && value !== null && !Array.isArray(value);

/** A later value over an earlier one: sections setting by setting, at any depth; undefined settings leave the earlier one. */
function mergeSetting(earlier: unknown, later: unknown): unknown {
  if (!isSection(later) || !isSection(earlier)) return later;
  const merged: Record<string, unknown> = { ...earlier };
  for (const [key, value] of Object.entries(later)) {
    if (value !== undefined) merged[key] = mergeSetting(merged[key], value);
  }
  return merged;
}

/**
 * Later sources win: defaults < file < environment < flags. Sections (metrics, control, tls,
 * traffic) merge setting by setting, nested ones too (traffic.contention); a list (tls.allow)
 * is replaced whole.
 */
export function mergeConfig(...layers: ConfigLayer[]): ConfigLayer {
  const merged: Record<string, unknown> = {};
  for (const layer of layers) {
    for (const [key, value] of Object.entries(layer)) {
      if (value === undefined) continue;
      merged[key] = mergeSetting(merged[key], value);
    }
  }
  return merged as ConfigLayer;
}

/** The merged tls settings, which must be complete once any layer set one; the error says where each can be set. */
export function completeTls(tls: ConfigLayer['tls']): TlsSettings | undefined {
  if (tls === undefined || Object.keys(tls).length === 0) return undefined;
  const complete = TlsSettingsSchema.safeParse(tls);
  if (complete.success) return complete.data;
  throw new GangwayError(
    ErrorCode.BAD_REQUEST,
    complete.error.issues
      .map((issue) => {
        const key = String(issue.path[0]);
        return `tls.${issue.path.join('.')}: ${issue.message} (set it in the config file, with ${ENV_NAME_OF[`tls.${key}`]} or with --tls-${key})`;
      })
      .join('\n'),
  );
}

/** The peer limits an agent runs with (see PeersSettingsSchema). */
export interface PeerLimits {
  maxSessionsPerPeer: number;
  maxIncomingPerPeer: number;
  maxIncoming: number;
  maxGroupsPerSession: number;
  handshakeTimeoutMs: number;
  requestsPerSecond: number;
  requestBurst: number;
  memoryHeadroomBytes: number;
  decompressionsPerSession: number;
  maxDeviceStateBytes: number;
}

export const PEER_LIMIT_DEFAULTS: PeerLimits = {
  maxSessionsPerPeer: 4,
  maxIncomingPerPeer: 8,
  maxIncoming: 32,
  maxGroupsPerSession: 16,
  handshakeTimeoutMs: 10_000,
  requestsPerSecond: 100,
  requestBurst: 1000,
  memoryHeadroomBytes: 64 * 1024 * 1024,
  decompressionsPerSession: 4,
  maxDeviceStateBytes: 256 * 1024 * 1024,
};

export function resolvePeerLimits(settings: PeersSettings | undefined): PeerLimits {
  const s = settings ?? {};
  const limits: PeerLimits = {
    maxSessionsPerPeer: s.maxSessionsPerPeer ?? PEER_LIMIT_DEFAULTS.maxSessionsPerPeer,
    maxIncomingPerPeer: s.maxIncomingPerPeer ?? PEER_LIMIT_DEFAULTS.maxIncomingPerPeer,
    maxIncoming: s.maxIncoming ?? PEER_LIMIT_DEFAULTS.maxIncoming,
    maxGroupsPerSession: s.maxGroupsPerSession ?? PEER_LIMIT_DEFAULTS.maxGroupsPerSession,
    handshakeTimeoutMs: s.handshakeTimeout ?? PEER_LIMIT_DEFAULTS.handshakeTimeoutMs,
    requestsPerSecond: s.requestsPerSecond ?? PEER_LIMIT_DEFAULTS.requestsPerSecond,
    requestBurst: s.requestBurst ?? PEER_LIMIT_DEFAULTS.requestBurst,
    memoryHeadroomBytes: s.memoryHeadroom ?? PEER_LIMIT_DEFAULTS.memoryHeadroomBytes,
    decompressionsPerSession: s.decompressionsPerSession ?? PEER_LIMIT_DEFAULTS.decompressionsPerSession,
    maxDeviceStateBytes: s.maxDeviceState ?? PEER_LIMIT_DEFAULTS.maxDeviceStateBytes,
  };
  if (limits.maxIncomingPerPeer > limits.maxIncoming) {
    throw new GangwayError(
      ErrorCode.BAD_REQUEST,
      `'peers.maxIncomingPerPeer' (${limits.maxIncomingPerPeer}) is above 'peers.maxIncoming' (${limits.maxIncoming}): one peer cannot have more than all peers together`,
    );
  }
  return limits;
}

/** The resident-dedup policy an agent runs with (see DedupSettingsSchema). */
export interface DedupPolicy {
  resident: (typeof RESIDENT_POLICIES)[number];
  residentOffersPerMinute: number;
  residentMaxAgeMs: number;
  /** Base images offered to every peer that asks for resident content (dedup.baseImages). */
  baseImagesDir?: string;
}

export const DEDUP_POLICY_DEFAULTS: DedupPolicy = { resident: 'from-peer', residentOffersPerMinute: 60, residentMaxAgeMs: 30_000 };

export function resolveDedupPolicy(settings: DedupSettings | undefined): DedupPolicy {
  return {
    resident: settings?.resident ?? DEDUP_POLICY_DEFAULTS.resident,
    residentOffersPerMinute: settings?.residentOffersPerMinute ?? DEDUP_POLICY_DEFAULTS.residentOffersPerMinute,
    residentMaxAgeMs: settings?.residentMaxAge ?? DEDUP_POLICY_DEFAULTS.residentMaxAgeMs,
    ...(settings?.baseImages ? { baseImagesDir: settings.baseImages } : {}),
  };
}

/** How the CLI may reach the agent: the unix socket, plus a loopback TCP port with a token when asked for. */
export interface ControlAccess {
  /** The socket's group, when `control.group` is set (otherwise the agent's own group). */
  group: ControlGroup | undefined;
  listen: string | undefined;
  /** Where the TCP port's token lives (created on start when missing); set only with `listen`. */
  tokenFile: string | undefined;
}

export function resolveControlAccess(control: ConfigLayer['control'], stateDir: string): ControlAccess {
  let group: ControlGroup | undefined;
  if (control?.group !== undefined) {
    const resolved = resolveControlGroup(control.group);
    // Validated already; a group deleted since then is still a clear error.
    if ('problem' in resolved) throw new GangwayError(ErrorCode.BAD_REQUEST, `'control.group' ${resolved.problem} (got ${JSON.stringify(control.group)})`);
    group = resolved;
  }
  if (control?.tokenFile !== undefined && control.listen === undefined) {
    throw new GangwayError(
      ErrorCode.BAD_REQUEST,
      `'control.tokenFile' is for the TCP control port (got ${JSON.stringify(control.tokenFile)}), which is off: set 'control.listen' too, or drop the token file (the unix socket takes no token)`,
    );
  }
  const listen = control?.listen;
  return { group, listen, tokenFile: listen === undefined ? undefined : (control?.tokenFile ?? join(stateDir, 'control.token')) };
}

/** The traffic settings an agent runs with, in its units (see TrafficSettingsSchema). */
export interface TrafficConfig {
  /** The uplink; without it the agent neither measures nor shapes. */
  uplink: string | undefined;
  linkBytesPerSec: number | undefined;
  slaLowerBytesPerSec: number | undefined;
  slaUpperBytesPerSec: number | undefined;
  highContention: number;
  moderateContention: number;
  priority: (typeof PRIORITIES)[number];
  sampleIntervalMs: number;
  planner: PlannerMode;
}

export const TRAFFIC_DEFAULTS = {
  highContention: 0.7,
  moderateContention: 0.3,
  priority: 'medium',
  sampleIntervalMs: 1000,
  /** Without slaLower / slaUpper: these shares of the link. */
  slaLowerShare: 0.1,
  slaUpperShare: 0.5,
} as const;

/**
 * Checks the traffic settings against each other once every layer is merged, naming the
 * settings involved: an uplink needs a capacity; slaLower ≤ slaUpper ≤ linkCapacity;
 * contention.moderate < contention.high.
 */
export function resolveTrafficConfig(settings: TrafficSettings | undefined): TrafficConfig {
  const t = settings ?? {};
  const problems: string[] = [];
  if (t.uplink !== undefined && t.linkCapacity === undefined) {
    problems.push(`'traffic.linkCapacity' is missing: 'traffic.uplink' (${t.uplink}) needs its capacity, e.g. 1Gbit/s`);
  }
  const link = t.linkCapacity;
  const lower = t.slaLower ?? (link === undefined ? undefined : link * TRAFFIC_DEFAULTS.slaLowerShare);
  const upper = t.slaUpper ?? (link === undefined ? undefined : Math.max(lower ?? 0, link * TRAFFIC_DEFAULTS.slaUpperShare));
  if (lower !== undefined && upper !== undefined && lower > upper) {
    problems.push(`'traffic.slaLower' (${lower} bytes/s) is above 'traffic.slaUpper' (${upper} bytes/s): the lower limit must not exceed the upper`);
  }
  if (link !== undefined && upper !== undefined && upper > link) {
    problems.push(`'traffic.slaUpper' (${upper} bytes/s) is above 'traffic.linkCapacity' (${link} bytes/s)`);
  }
  if ((t.slaLower !== undefined || t.slaUpper !== undefined) && link === undefined) {
    problems.push("'traffic.slaLower' and 'traffic.slaUpper' need 'traffic.linkCapacity'");
  }
  const high = t.contention?.high ?? TRAFFIC_DEFAULTS.highContention;
  const moderate = t.contention?.moderate ?? TRAFFIC_DEFAULTS.moderateContention;
  if (moderate >= high) {
    problems.push(`'traffic.contention.moderate' (${moderate}) must be below 'traffic.contention.high' (${high})`);
  }
  if (problems.length > 0) throw new GangwayError(ErrorCode.BAD_REQUEST, problems.join('\n'));
  return {
    uplink: t.uplink,
    linkBytesPerSec: link,
    slaLowerBytesPerSec: lower,
    slaUpperBytesPerSec: upper,
    highContention: high,
    moderateContention: moderate,
    priority: t.priority ?? TRAFFIC_DEFAULTS.priority,
    sampleIntervalMs: t.sampleInterval ?? TRAFFIC_DEFAULTS.sampleIntervalMs,
    planner: t.planner ?? DEFAULT_PLANNER_MODE,
  };
}

/**
 * How the agent talks to peers, from the merged settings: mutual TLS when `tls` is set;
 * plain ws only when `insecurePlaintextLoopback` asks for it by name and the listen host is
 * loopback. Anything else refuses to start, naming the settings to change.
 */
export function resolvePeerTransport(settings: { tls?: TlsSettings | undefined; insecurePlaintextLoopback?: boolean | undefined }, listenHost: string): PeerTransport {
  if (settings.tls) {
    if (settings.insecurePlaintextLoopback) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, "'tls' and 'insecurePlaintextLoopback' exclude each other: set one (tls for peers on other hosts)");
    }
    const { cert, key, ca, allow } = settings.tls;
    return { kind: 'tls', certPath: cert, keyPath: key, caPath: ca, allow };
  }
  if (!settings.insecurePlaintextLoopback) {
    throw new GangwayError(
      ErrorCode.BAD_REQUEST,
      "peers need mutual TLS: set 'tls.cert', 'tls.key', 'tls.ca' and 'tls.allow' (see `gangway certs init`), " +
        "or, for agents on this host only, 'insecurePlaintextLoopback: true' (--insecure-plaintext-loopback) with a loopback 'listen'",
    );
  }
  if (!isLoopbackHost(listenHost)) {
    throw new GangwayError(
      ErrorCode.BAD_REQUEST,
      `'insecurePlaintextLoopback' needs a loopback 'listen' (127.0.0.0/8, ::1 or localhost; got "${listenHost}"): ` +
        "set 'tls.cert', 'tls.key', 'tls.ca' and 'tls.allow' to listen on other addresses",
    );
  }
  return { kind: 'plaintext-loopback' };
}
