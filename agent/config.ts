// The agent's configuration: one YAML file (`gangway agent --config FILE`), overridden by
// environment variables (GANGWAY_*), overridden by flags. Every mistake names the key,
// the value and what is allowed.
import { readFileSync } from 'node:fs';
import { isAbsolute } from 'node:path';
import { parseDocument } from 'yaml';
import { z } from 'zod';
import { ErrorCode, GangwayError } from '../protocol/errors.js';
import { parseDurationMs, QuantityError } from './units.js';
import { allowEntryProblem } from './peer/allowlist.js';
import { isLoopbackHost, type PeerTransport } from './peer/tls.js';

export const LOG_LEVELS = ['debug', 'info', 'warn', 'error'] as const;
export const TRACKERS = ['auto', 'uffd-wp', 'hash-scan'] as const;

const hostPort = z
  .string()
  .regex(/^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, 'must be HOST:PORT, e.g. 127.0.0.1:7401')
  .refine((value) => Number(value.slice(value.lastIndexOf(':') + 1)) <= 65535, 'port must be at most 65535');
const absolutePath = z.string().min(1).refine(isAbsolute, 'must be an absolute path');
const duration = z.union([z.number().min(0), z.string()]).transform((value, ctx) => {
  if (typeof value === 'number') return value;
  try {
    return parseDurationMs(value, 'duration');
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: err instanceof QuantityError ? err.message : String(err) });
    return z.NEVER;
  }
});

const allowEntry = z.string().superRefine((entry, ctx) => {
  const problem = allowEntryProblem(entry);
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

/** The settings a config file may hold (all optional: defaults and flags fill the rest). */
export const ConfigFileSchema = z
  .object({
    listen: hostPort,
    stateDir: absolutePath,
    memoryDir: absolutePath,
    tracker: z.enum(TRACKERS),
    shutdownGrace: duration,
    logLevel: z.enum(LOG_LEVELS),
    metrics: z.object({ listen: hostPort }).strict(),
    tls: TlsSettingsSchema,
    insecurePlaintextLoopback: z.boolean({ error: 'must be true or false' }),
  })
  .partial()
  .strict();

export type ConfigFile = z.infer<typeof ConfigFileSchema>;

/** What an agent runs with when neither file, environment nor flag says otherwise. */
export const CONFIG_DEFAULTS = {
  listen: '127.0.0.1:7401',
  stateDir: '/var/lib/gangway',
  memoryDir: '/dev/shm',
  tracker: 'auto',
  shutdownGrace: 10_000,
  logLevel: 'info',
} as const satisfies ConfigFile;

/** Environment variables that override the file, by setting. */
export const ENV_OVERRIDES: Record<string, keyof ConfigFile | 'metrics.listen'> = {
  GANGWAY_LISTEN: 'listen',
  GANGWAY_STATE_DIR: 'stateDir',
  GANGWAY_MEMORY_DIR: 'memoryDir',
  GANGWAY_TRACKER: 'tracker',
  GANGWAY_SHUTDOWN_GRACE: 'shutdownGrace',
  GANGWAY_LOG_LEVEL: 'logLevel',
  GANGWAY_METRICS_LISTEN: 'metrics.listen',
};

function describeIssues(where: string, error: z.ZodError, input: unknown): string {
  return error.issues
    .map((issue) => {
      if (issue.code === 'unrecognized_keys') {
        const allowed = Object.keys(ConfigFileSchema.shape).join(', ');
        return `${where}: ${issue.keys.map((k) => `'${[...issue.path, k].join('.')}'`).join(', ')} is not a setting (allowed: ${allowed}; metrics takes listen; tls takes cert, key, ca, allow)`;
      }
      const key = issue.path.join('.');
      let value: unknown = input;
      for (const part of issue.path) value = (value as Record<PropertyKey, unknown> | undefined)?.[part as PropertyKey];
      const shown = value === undefined ? '' : ` (got ${JSON.stringify(value)})`;
      return `${where}: '${key}' ${issue.message}${shown}`;
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

/** The settings given by GANGWAY_* environment variables, validated like the file. */
export function configFromEnv(env: NodeJS.ProcessEnv): ConfigFile {
  const data: Record<string, unknown> = {};
  for (const [name, key] of Object.entries(ENV_OVERRIDES)) {
    const value = env[name];
    if (value === undefined || value === '') continue;
    if (key === 'metrics.listen') data.metrics = { listen: value };
    else data[key] = value;
  }
  try {
    return validate('environment', data);
  } catch (err) {
    const names = Object.fromEntries(Object.entries(ENV_OVERRIDES).map(([name, key]) => [key, name]));
    throw new GangwayError(
      ErrorCode.BAD_REQUEST,
      (err as Error).message.replace(/'([a-zA-Z.]+)'/g, (match, key: string) => (names[key] ? `${names[key]}` : match)),
    );
  }
}

/** Later sources win: defaults < file < environment < flags. */
export function mergeConfig(...layers: ConfigFile[]): ConfigFile {
  const merged: ConfigFile = {};
  for (const layer of layers) {
    for (const [key, value] of Object.entries(layer) as [keyof ConfigFile, unknown][]) {
      if (value !== undefined) (merged as Record<string, unknown>)[key] = value;
    }
  }
  return merged;
}

/**
 * How the agent talks to peers, from the merged settings: mutual TLS when `tls` is set;
 * plain ws only when `insecurePlaintextLoopback` asks for it by name and the listen host is
 * loopback. Anything else refuses to start, naming the settings to change.
 */
export function resolvePeerTransport(settings: Pick<ConfigFile, 'tls' | 'insecurePlaintextLoopback'>, listenHost: string): PeerTransport {
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
