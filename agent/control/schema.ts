// Requests of the local control API, validated at the edge: a bad request gets a 400 that
// names the field, never reaches the engine.
import { z } from 'zod';
import { GUEST_NAME_PATTERN } from '../guest/registry.js';
import { GUEST_MAX_REGIONS } from '../guest/guest-header.js';
import { regionSizesProblem } from '../guest/process-guest.js';
import { MAX_VM_DISKS, MAX_VM_REGIONS, VM_ACCELS, VmDefinitionSchema } from '../guest/vm-spec.js';
import { INTERFACE_NAME_PATTERN, PRIORITIES } from '../config.js';

const guestName = z.string().regex(GUEST_NAME_PATTERN, "1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'");
const GiB = 1024 ** 3;

// Strict: a field the agent does not know is refused, not dropped (a misspelt `force`
// would otherwise silently mean the default).
export const StartGuestRequest = z
  .strictObject({
  name: guestName,
  memoryBytes: z.number().int().min(64 * 1024).max(1024 * GiB),
  /** Several memory regions (a file each), adding up to memoryBytes. */
  regionBytes: z.array(z.number().int().min(4096).max(1024 * GiB)).min(2).max(GUEST_MAX_REGIONS).optional(),
  profile: z.enum(['zero', 'os-image', 'random']),
  dirtyRateBytesPerSec: z.number().min(0).max(64 * GiB),
  seed: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER),
  imageSeed: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER),
  sharedFraction: z.number().min(0).max(1),
  hotFraction: z.number().min(0).max(1),
  /** The guest's TAP device: its traffic is measured there. */
  tap: z.string().regex(INTERFACE_NAME_PATTERN, "an interface name: 1 to 15 letters, digits, '_', '.' or '-'").optional(),
})
  .superRefine((request, ctx) => {
    if (!request.regionBytes) return;
    const total = request.regionBytes.reduce((sum, size) => sum + size, 0);
    const problem =
      total !== request.memoryBytes ? `the regions add up to ${total} bytes, memoryBytes is ${request.memoryBytes}` : regionSizesProblem(request.regionBytes);
    if (problem) ctx.addIssue({ code: 'custom', path: ['regionBytes'], message: problem });
  });

/** A VM: its definition (as vm-spec.ts checks it, `accel` may also be auto) and its memory regions. */
export const StartVmRequest = z.strictObject({
  name: guestName,
  definition: VmDefinitionSchema.omit({ disk0: true, disk1: true, disk2: true, disk3: true }).extend({
    accel: z.enum([...VM_ACCELS, 'auto'], { error: `must be one of: ${[...VM_ACCELS, 'auto'].join(', ')}` }),
  }),
  regionBytes: z.array(z.number().int().min(1024 * 1024).max(1024 * GiB)).min(1).max(MAX_VM_REGIONS),
  /** Disk files (names in the agent's disks directory, or paths inside it), in device order. */
  disks: z.array(z.string().min(1).max(4096), { error: `must be a list of up to ${MAX_VM_DISKS} disk files` }).max(MAX_VM_DISKS, `at most ${MAX_VM_DISKS} disks`).optional(),
  tap: z.string().regex(INTERFACE_NAME_PATTERN, "an interface name: 1 to 15 letters, digits, '_', '.' or '-'").optional(),
});

const peerAddress = z
  .string()
  .regex(/^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$/, { message: 'HOST:PORT', abort: true })
  .refine((value) => {
    const port = Number(value.slice(value.lastIndexOf(':') + 1));
    return port >= 1 && port <= 65535;
  }, 'HOST:PORT with a port from 1 to 65535');

export const PlanRequestSchema = z.strictObject({
  guests: z.array(guestName).min(1).max(64),
  to: peerAddress,
  /** Default: the agent's traffic.priority. */
  priority: z.enum(PRIORITIES).optional(),
  /** The strategy migrate would be asked for (gang, its default): auto keeps it without traffic data. */
  strategy: z.enum(['gang', 'serial']).optional(),
  /** migrate's limits the forecast weighs each option against (default: migrate's defaults). */
  downtimeMs: z.number().min(1).max(600_000).optional(),
  force: z.boolean().optional(),
  maxRounds: z.number().int().min(1).max(10_000).optional(),
  maxBytesFactor: z.number().min(1).max(1000).optional(),
  dedup: z.boolean().optional(),
});

export const DrainRequestSchema = z.strictObject({
  /** The peers the guests are spread over, in the order they are dealt. */
  to: z
    .array(peerAddress)
    .min(1)
    .max(32)
    .refine((peers) => new Set(peers).size === peers.length, 'names a peer twice'),
  /** Migrations at once; default: the agent's migration.maxParallelOutbound. */
  maxParallel: z.number().int().min(1).max(256).optional(),
  /** Default: the agent's traffic.priority. */
  priority: z.enum(PRIORITIES).optional(),
  dryRun: z.boolean().optional(),
});

export const MigrateRequestSchema = z.strictObject({
  guests: z.array(guestName).min(1).max(64),
  strategy: z.enum(['gang', 'serial']),
  dedup: z.boolean(),
  to: peerAddress,
  downtimeMs: z.number().min(1).max(600_000),
  force: z.boolean(),
  maxRounds: z.number().int().min(1).max(10_000),
  maxBytesFactor: z.number().min(1).max(1000),
  codec: z.enum(['auto', 'lz4', 'raw']),
  bandwidthBytesPerSec: z.number().positive().optional(),
  tracker: z.enum(['auto', 'uffd-wp', 'hash-scan']).optional(),
  technique: z.enum(['precopy', 'postcopy', 'hybrid', 'auto']).optional(),
  /** Default: the agent's traffic.priority. */
  priority: z.enum(PRIORITIES).optional(),
  postcopyAfterRounds: z.number().int().min(1).max(10_000).optional(),
  /** A VM's disks: all move (the default), none (shared storage), or these (file names or disk0...). */
  disks: z.union([z.enum(['all', 'none']), z.array(z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/, 'a disk file name or disk0, disk1, ...')).min(1).max(MAX_VM_DISKS)]).optional(),
});

/** POST /v1/migrations/:id/settings (gangway migrate-set): at least one setting, in the migrate request's bounds. */
export const MigrationSettingsRequest = z
  .strictObject({
    bandwidthBytesPerSec: z.number().positive().max(1e12).optional(),
    downtimeMs: z.number().min(1).max(600_000).optional(),
  })
  .refine((body) => body.bandwidthBytesPerSec !== undefined || body.downtimeMs !== undefined, { message: 'give bandwidthBytesPerSec, downtimeMs or both' });

/** "field: problem; field: problem" from a zod error. */
export function describeZodError(error: z.ZodError): string {
  return error.issues
    .slice(0, 10)
    .map((issue) => {
      const where = issue.path.join('.') || 'request';
      if (issue.code === 'unrecognized_keys') {
        return `${where}: unknown field${issue.keys.length > 1 ? 's' : ''} ${issue.keys.slice(0, 5).map((k) => JSON.stringify(k.slice(0, 64))).join(', ')}`;
      }
      return `${where}: ${issue.message}`;
    })
    .join('; ');
}
