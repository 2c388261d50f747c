// The bearer token of the loopback TCP control port: a file the agent creates (mode 0600,
// 256 random bits) when it is missing, and that the CLI reads with --token-file.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { closeSync, fstatSync, openSync, readSync, writeFileSync } from 'node:fs';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';

const MAX_TOKEN_FILE_BYTES = 4096;
/** RFC 6750 token68 characters; long enough that guessing is hopeless. */
const TOKEN_PATTERN = /^[A-Za-z0-9._~+/-]{16,1024}=*$/;

function problem(path: string, why: string): GangwayError {
  return new GangwayError(ErrorCode.BAD_REQUEST, `token file ${path}: ${why}`);
}

/**
 * The token in `path`: one line of 16-1024 token characters. `owner` (the agent) also refuses
 * a file others may read or write: anyone who can read it can drive the agent.
 */
export function readTokenFile(path: string, owner = false): string {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? (err as Error).message;
    throw problem(path, `cannot be read (${code})${code === 'ENOENT' ? ': the agent creates it when control.listen is set; pass the same path with --token-file' : ''}`);
  }
  try {
    const stat = fstatSync(fd);
    if (!stat.isFile()) throw problem(path, 'is not a regular file');
    if (stat.size > MAX_TOKEN_FILE_BYTES) throw problem(path, `is ${stat.size} bytes; a token file holds one token (at most ${MAX_TOKEN_FILE_BYTES} bytes)`);
    if (owner && (stat.mode & 0o007) !== 0) {
      throw problem(path, `is open to other users (mode 0${(stat.mode & 0o777).toString(8)}): chmod 600 ${path}`);
    }
    const buffer = Buffer.alloc(stat.size);
    const length = stat.size === 0 ? 0 : readSync(fd, buffer, 0, stat.size, 0);
    const token = buffer.subarray(0, length).toString('utf8').trim();
    if (!TOKEN_PATTERN.test(token)) {
      throw problem(path, `must hold one token: 16-1024 letters, digits or -._~+/${owner ? ' (delete the file and the agent makes a new one)' : ''}`);
    }
    return token;
  } finally {
    closeSync(fd);
  }
}

/** The agent's token: read from `path`, or created there (0600, never over an existing file). */
export function loadOrCreateToken(path: string): { token: string; created: boolean } {
  const token = randomBytes(32).toString('base64url');
  try {
    // O_EXCL: two agents racing, or a file created meanwhile, never get overwritten.
    writeFileSync(path, `${token}\n`, { mode: 0o600, flag: 'wx' });
    return { token, created: true };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'EEXIST') throw problem(path, `cannot be created (${code ?? (err as Error).message}): its directory must exist and be writable`);
  }
  return { token: readTokenFile(path, true), created: false };
}

/** Why a request's Authorization header is refused, or undefined when it carries `token`. */
export function bearerRefusal(header: string | undefined, token: string): 'missing' | 'wrong' | undefined {
  const match = header === undefined ? null : /^Bearer +(\S{1,2048}) *$/i.exec(header);
  if (!match) return header === undefined ? 'missing' : 'wrong';
  // Equal-length digests, so the comparison takes the same time whatever the guess.
  const digest = (text: string) => createHash('sha256').update(text).digest();
  return timingSafeEqual(digest(match[1]!), digest(token)) ? undefined : 'wrong';
}
