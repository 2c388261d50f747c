// QMP on the wire: one JSON object per line (QEMU's docs/interop/qmp-spec). QEMU ends every
// message with "\r\n" and JSON escapes newlines inside strings, so a line is a message.
// Pure, bytes in and messages out, so that every way a stream can be split is testable
// without a socket (test/agent/qmp-parse.test.ts).
//
// Anything that is not one of the four QMP messages (greeting, event, success, error) is
// refused with a QmpWireError that quotes it, never skipped: a monitor that sends garbage
// is not one the agent can trust to have run a `stop` or a `migrate`.

/** The longest line accepted. QEMU's largest answer gangway may ask for, query-qmp-schema, is about 200 KiB. */
export const DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024;

/** How much of an offending line an error quotes. */
const QUOTE_CHARS = 200;

export interface QmpVersion {
  qemu: { major: number; minor: number; micro: number };
  /** The distribution's build, e.g. 'Debian 1:7.2+dfsg-7+deb12u18+b3'. */
  package: string;
}

export interface QmpGreeting {
  version: QmpVersion;
  /** What the server offers to enable with qmp_capabilities ('oob' on 7.2). */
  capabilities: string[];
}

export interface QmpTimestamp {
  seconds: number;
  microseconds: number;
}

export type QmpMessage =
  | { kind: 'greeting'; greeting: QmpGreeting }
  | { kind: 'event'; event: string; data: Record<string, unknown>; timestamp: QmpTimestamp }
  /** `id` is what the command carried, echoed; undefined when it carried none. */
  | { kind: 'return'; id: unknown; value: unknown }
  | { kind: 'error'; id: unknown; errorClass: string; desc: string };

/** The stream is not QMP: a line that is too long, not JSON, or not a QMP message. */
export class QmpWireError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'QmpWireError';
  }
}

function quote(text: string): string {
  return JSON.stringify(text.length > QUOTE_CHARS ? `${text.slice(0, QUOTE_CHARS)}...` : text);
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isVersion(value: unknown): value is QmpVersion {
  if (!isObject(value) || !isObject(value.qemu) || typeof value.package !== 'string') return false;
  const { major, minor, micro } = value.qemu;
  return Number.isInteger(major) && Number.isInteger(minor) && Number.isInteger(micro);
}

/** What one parsed line is; throws QmpWireError for JSON that is no QMP message. */
export function classifyMessage(value: unknown, text: string): QmpMessage {
  if (!isObject(value)) throw new QmpWireError(`not a JSON object: ${quote(text)}`);
  if ('QMP' in value) {
    const qmp = value.QMP;
    if (!isObject(qmp) || !isVersion(qmp.version) || !Array.isArray(qmp.capabilities) || !qmp.capabilities.every((c) => typeof c === 'string')) {
      throw new QmpWireError(`a greeting without version {qemu: {major, minor, micro}, package} and capabilities: ${quote(text)}`);
    }
    return { kind: 'greeting', greeting: { version: qmp.version, capabilities: qmp.capabilities as string[] } };
  }
  if ('event' in value) {
    const { event, data, timestamp } = value;
    if (typeof event !== 'string' || (data !== undefined && !isObject(data)) || !isObject(timestamp) || typeof timestamp.seconds !== 'number' || typeof timestamp.microseconds !== 'number') {
      throw new QmpWireError(`an event without a name, a timestamp or with data that is not an object: ${quote(text)}`);
    }
    return { kind: 'event', event, data: data ?? {}, timestamp: { seconds: timestamp.seconds, microseconds: timestamp.microseconds } };
  }
  if ('return' in value) return { kind: 'return', id: value.id, value: value.return };
  if ('error' in value) {
    const error = value.error;
    if (!isObject(error) || typeof error.class !== 'string' || typeof error.desc !== 'string') {
      throw new QmpWireError(`an error reply without class and desc: ${quote(text)}`);
    }
    return { kind: 'error', id: value.id, errorClass: error.class, desc: error.desc };
  }
  throw new QmpWireError(`neither a greeting, an event nor a reply: ${quote(text)}`);
}

/**
 * Splits a byte stream into QMP messages. push() takes chunks as they come (a message may
 * be cut anywhere, several may share a chunk) and returns the complete messages. After it
 * has thrown, the decoder is spent: the connection is to be closed.
 */
export class QmpDecoder {
  /** The start of the line being received: views of earlier chunks, joined once its newline comes. */
  private parts: Buffer[] = [];
  private partBytes = 0;

  constructor(readonly maxLineBytes = DEFAULT_MAX_LINE_BYTES) {}

  push(chunk: Buffer): QmpMessage[] {
    const messages: QmpMessage[] = [];
    let start = 0;
    for (let newline = chunk.indexOf(0x0a); newline !== -1; newline = chunk.indexOf(0x0a, start)) {
      const piece = chunk.subarray(start, newline);
      start = newline + 1;
      this.checkLength(this.partBytes + piece.length);
      const line = this.parts.length === 0 ? piece : Buffer.concat([...this.parts, piece]);
      this.parts = [];
      this.partBytes = 0;
      const message = this.parseLine(line);
      if (message) messages.push(message);
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      // Checked before keeping it, so a peer that never sends a newline costs at most the limit.
      this.checkLength(this.partBytes + rest.length);
      this.parts.push(rest);
      this.partBytes += rest.length;
    }
    return messages;
  }

  /** Bytes of an unfinished line held (0 between messages). */
  get pendingBytes(): number {
    return this.partBytes;
  }

  private checkLength(lineBytes: number): void {
    if (lineBytes > this.maxLineBytes) {
      throw new QmpWireError(`a line of more than ${this.maxLineBytes} bytes (the limit) without a newline`);
    }
  }

  private parseLine(line: Buffer): QmpMessage | undefined {
    const text = line.toString('utf8').trim();
    // QMP sends no empty lines, but a blank one carries nothing to refuse.
    if (text === '') return undefined;
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (err) {
      throw new QmpWireError(`not JSON (${(err as Error).message}): ${quote(text)}`);
    }
    return classifyMessage(value, text);
  }
}
