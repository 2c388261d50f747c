// A guest record (STATE/guests/NAME.json), the switchover journal: what the agent knows of a
// guest across its own restarts. Read back from disk, it is checked field by field; a record
// that does not pass is described (field, value, what is allowed) so that the operator can
// fix it, because it may be the only note of where a guest runs.
//
// The common fields are the same for every kind of guest; each kind adds its own (a process
// guest its `spec`) as one member of the union on `kind`. Adding a kind is adding a member.
import { z } from 'zod';
import { MIGRATION_SECRET_BYTES } from '../../protocol/limits.js';
import { GuestProfile, type GuestProfileName } from './guest-header.js';
import type { GuestFiles, ProcessGuestSpec } from './process-guest.js';
import { MAX_VM_REGIONS, VmDefinitionSchema, type VmSpec } from './vm-spec.js';

/** The rule a field breaks, also when the field is missing (describeRecordIssues says which). */
const rule = (message: string) => ({ error: message });

const TEXT = 'must be non-empty text';
const text = z.string(rule(TEXT)).min(1, TEXT);
const WHEN = 'must be a date and time, e.g. 2026-01-31T12:00:00.000Z';
const when = z.string(rule(WHEN)).refine((value) => !Number.isNaN(Date.parse(value)), WHEN);
const whole = (min: number) => {
  const message = `must be a whole number of at least ${min}`;
  return z.number(rule(message)).int(message).min(min, message);
};
/** A u64 read from the guest's header (seeds, rates): not always a safe integer. */
const NON_NEGATIVE = 'must be a number of at least 0';
const nonNegative = z.number(rule(NON_NEGATIVE)).min(0, NON_NEGATIVE);
const FRACTION = 'must be a number from 0 to 1';
const fraction = z.number(rule(FRACTION)).min(0, FRACTION).max(1, FRACTION);
const SECRET = `must be the migration's secret: ${MIGRATION_SECRET_BYTES * 2} hex digits`;
const secret = z.string(rule(SECRET)).regex(new RegExp(`^[0-9a-fA-F]{${MIGRATION_SECRET_BYTES * 2}}$`), SECRET);
const oneOf = <const T extends readonly [string, ...string[]]>(values: T) =>
  z.enum(values, rule(`must be one of: ${values.join(', ')}`));

const REGIONS = 'must be a list of 1 to 16 file paths';
const filesShape = {
  memoryPaths: z.array(text, rule(REGIONS)).min(1, REGIONS).max(16, REGIONS),
  deviceStatePath: text.optional(),
  trackReportPath: text,
  logPath: text,
  /** A VM's QMP socket (its device-state sockets are named after it). */
  qmpSocketPath: text.optional(),
  /** A VM's serial console. */
  consolePath: text.optional(),
  /** A VM's disks, in its definition's order (the operator's files: they stay when the VM stops). */
  diskPaths: z.array(text, rule('must be a list of up to 4 file paths')).max(4, 'must be a list of up to 4 file paths').optional(),
};
/** Records written before guests had regions name one memory file: read as a list of one. */
const legacyFiles = (value: unknown) => {
  if (value && typeof value === 'object' && !Array.isArray(value) && 'memoryPath' in value && !('memoryPaths' in value)) {
    const { memoryPath, ...rest } = value as { memoryPath: unknown };
    return { ...rest, memoryPaths: [memoryPath] };
  }
  return value;
};

const PROFILES = Object.keys(GuestProfile) as [GuestProfileName, ...GuestProfileName[]];
const processSpecShape = {
  memoryBytes: whole(1),
  regionBytes: z.array(whole(4096), rule('must be a list of region sizes in bytes')).min(2).max(16).optional(),
  profile: oneOf(PROFILES),
  dirtyRateBytesPerSec: nonNegative,
  seed: nonNegative,
  imageSeed: nonNegative,
  sharedFraction: fraction,
  hotFraction: fraction,
};

const ORIGIN = "must be { kind: 'started' } or { kind: 'migrated', migrationId, from }";
const origin = z.discriminatedUnion(
  'kind',
  [z.strictObject({ kind: z.literal('started') }), z.strictObject({ kind: z.literal('migrated'), migrationId: text, from: text })],
  rule(ORIGIN),
);

const incomingShape = {
  migrationId: text,
  from: text,
  missingPages: whole(0),
  stranded: z.string(rule('must be text')).optional(),
  /** The secret this agent's accept gave the migration (hex): an agent restarted during post-copy checks the source's reattach with it. */
  secret: secret.optional(),
};
const outgoingShape = {
  migrationId: text,
  to: text,
  since: when,
  phase: oneOf(['paused', 'commit', 'postcopy']),
  interrupted: z.string(rule('must be text')).optional(),
  secret: secret.optional(),
  /** The disk files that move with the guest: once it runs at `to`, they go with this copy. */
  movedDisks: z.array(text, rule('must be a list of disk file paths')).max(4).optional(),
};

const OBJECT = 'must be an object';
/** Every kind of guest has these. */
const commonShape = {
  name: text,
  pid: whole(1),
  memoryBytes: whole(1),
  pageSizeBytes: whole(1),
  files: z.preprocess(legacyFiles, z.strictObject(filesShape, rule(OBJECT))),
  /** How the guest got here: started on this host, or migrated in (with the migration id). */
  origin,
  startedAt: when,
  /** The guest's TAP device, where its network traffic is measured (a VM's NIC is on it). */
  tap: text.optional(),
  /** This agent made the TAP device (a VM that arrived): it goes with the guest. */
  tapCreated: z.boolean(rule('must be true or false')).optional(),
  /**
   * Post-copy: the guest runs here while pages are still coming from `from`. With
   * `stranded`, they stopped coming (the reason): the guest is paused on them.
   */
  incoming: z.strictObject(incomingShape, rule(OBJECT)).optional(),
  /**
   * Post-copy from here: the guest runs at `to` since the switchover, and this paused copy
   * holds the pages `to` still lacks. It must never resume here. `phase` paused: the guest
   * was paused for the switchover, and neither commit nor switch went out (it cannot run
   * there: a restarted agent resumes it); commit: pre-copy's commit was sent; postcopy: the
   * guest may run there, its missing pages are here. `secret`
   * is the destination's secret for this migration (hex): a restarted agent needs it to
   * reattach.
   */
  outgoing: z.strictObject(outgoingShape, rule(OBJECT)).optional(),
};

/** A gangway-guest process (process-guest.ts), with the spec it was created with. */
const ProcessGuestRecordSchema = z.strictObject({
  ...commonShape,
  kind: z.literal('process'),
  spec: z.strictObject(processSpecShape, rule(OBJECT)),
});

/** A QEMU VM (qemu-guest.ts): its definition as checked on every way in, and its regions' sizes. */
const QemuGuestRecordSchema = z.strictObject({
  ...commonShape,
  kind: z.literal('qemu'),
  spec: VmDefinitionSchema.extend({
    regionBytes: z.array(whole(1024 * 1024), rule('must be a list of region sizes in bytes')).min(1).max(MAX_VM_REGIONS),
  }),
});

const MEMBERS = [ProcessGuestRecordSchema, QemuGuestRecordSchema] as const;
export const GUEST_KINDS = MEMBERS.map((member) => member.shape.kind.value);

export const GuestRecordSchema = z.discriminatedUnion('kind', MEMBERS);
export type GuestRecord = z.infer<typeof GuestRecordSchema>;

// The record's spec and files are the adapter's types: a field added there must be added here.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const sameSpec: Same<Extract<GuestRecord, { kind: 'process' }>['spec'], ProcessGuestSpec> = true;
const sameVmSpec: Same<Extract<GuestRecord, { kind: 'qemu' }>['spec'], VmSpec> = true;
const sameFiles: Same<GuestRecord['files'], GuestFiles> = true;
void sameSpec;
void sameVmSpec;
void sameFiles;

/** The fields an object in a record may have, by its path (for "not a field" problems). */
const FIELDS: Record<string, string[]> = {
  '': Object.keys(ProcessGuestRecordSchema.shape),
  files: Object.keys(filesShape),
  spec: Object.keys(processSpecShape),
  'qemu:spec': Object.keys(QemuGuestRecordSchema.shape.spec.shape),
  origin: ['kind', 'migrationId', 'from'],
  incoming: Object.keys(incomingShape),
  outgoing: Object.keys(outgoingShape),
};

/** A value as a problem shows it: short, and never a secret. */
function shownValue(path: PropertyKey[], value: unknown): string {
  if (path.at(-1) === 'secret' && typeof value === 'string') return ` (got ${value.length} characters)`;
  if (value === null) return ' (got null)';
  if (Array.isArray(value)) return ' (got a list)';
  if (typeof value === 'object') return ' (got an object)';
  const json = JSON.stringify(value);
  return ` (got ${json.length > 80 ? `${json.slice(0, 77)}...` : json})`;
}

function describeRecordIssues(error: z.ZodError, input: unknown): string {
  return error.issues
    .slice(0, 10)
    .map((issue) => {
      const where = issue.path.map(String).join('.');
      if (issue.code === 'unrecognized_keys') {
        const kind = (input as { kind?: unknown } | null)?.kind;
        const allowed = (kind === 'qemu' ? FIELDS[`qemu:${where}`] : undefined) ?? FIELDS[where];
        return (
          `${issue.keys.map((key) => `'${[...issue.path, key].join('.')}'`).join(', ')} ${issue.keys.length > 1 ? 'are not fields' : 'is not a field'} ` +
          `of ${where === '' ? 'a guest record' : `'${where}'`}${allowed ? ` (allowed: ${allowed.join(', ')})` : ''}`
        );
      }
      let value: unknown = input;
      for (const part of issue.path) value = (value as Record<PropertyKey, unknown> | undefined)?.[part];
      if (where === '') return `must be an object with a guest's fields${shownValue([], value)}`;
      // The unions say what is allowed themselves; a wrong `kind` is the one case with a list.
      const message = issue.code === 'invalid_union' && where === 'kind' ? `must be one of: ${GUEST_KINDS.join(', ')}` : issue.message;
      return value === undefined ? `'${where}' is missing (it ${message})` : `'${where}' ${message}${shownValue(issue.path, value)}`;
    })
    .join('; ');
}

/**
 * Reads the text of NAME.json: the record, or what is wrong with it (every field that does
 * not pass, by name). A record must name the guest its file is named after.
 */
export function parseGuestRecord(text: string, fileName: string): { record: GuestRecord } | { problem: string } {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (err) {
    return { problem: text.trim() === '' ? 'the file is empty' : `not valid JSON: ${(err as Error).message}` };
  }
  const result = GuestRecordSchema.safeParse(data);
  if (!result.success) return { problem: describeRecordIssues(result.error, data) };
  const expected = fileName.replace(/\.json$/, '');
  if (result.data.name !== expected) {
    return { problem: `'name' is ${JSON.stringify(result.data.name)} but the file is named for "${expected}": a record must be NAME.json` };
  }
  return { record: result.data };
}
