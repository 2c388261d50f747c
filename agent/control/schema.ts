// Requests of the local control API, validated at the edge: a bad request gets a 400 that
// names the field, never reaches the engine.
import { z } from 'zod';
import { GUEST_NAME_PATTERN } from '../guest/registry.js';
import { INTERFACE_NAME_PATTERN, PRIORITIES } from '../config.js';

const guestName = z.string().regex(GUEST_NAME_PATTERN, "1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'");
const GiB = 1024 ** 3;

export const StartGuestRequest = z.object({
  name: guestName,
  memoryBytes: z.number().int().min(64 * 1024).max(1024 * GiB),
  profile: z.enum(['zero', 'os-image', 'random']),
  dirtyRateBytesPerSec: z.number().min(0).max(64 * GiB),
  seed: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER),
  imageSeed: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER),
  sharedFraction: z.number().min(0).max(1),
  hotFraction: z.number().min(0).max(1),
  /** The guest's TAP device: its traffic is measured there. */
  tap: z.string().regex(INTERFACE_NAME_PATTERN, "an interface name: 1 to 15 letters, digits, '_', '.' or '-'").optional(),
});

const peerAddress = z.string().regex(/^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$/, 'HOST:PORT');

export const PlanRequestSchema = z.object({
  guests: z.array(guestName).min(1).max(64),
  to: peerAddress,
  /** Default: the agent's traffic.priority. */
  priority: z.enum(PRIORITIES).optional(),
});

export const MigrateRequestSchema = z.object({
  guests: z.array(guestName).min(1).max(64),
  strategy: z.enum(['gang', 'serial']),
  dedup: z.boolean(),
  to: z.string().regex(/^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$/, 'HOST:PORT'),
  downtimeMs: z.number().min(1).max(600_000),
  force: z.boolean(),
  maxRounds: z.number().int().min(1).max(10_000),
  maxBytesFactor: z.number().min(1).max(1000),
  codec: z.enum(['auto', 'lz4', 'raw']),
  bandwidthBytesPerSec: z.number().positive().optional(),
  tracker: z.enum(['auto', 'uffd-wp', 'hash-scan']).optional(),
});

/** "field: problem; field: problem" from a zod error. */
export function describeZodError(error: z.ZodError): string {
  return error.issues.map((issue) => `${issue.path.join('.') || 'request'}: ${issue.message}`).join('; ');
}
