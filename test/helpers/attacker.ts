// A peer that plays the attacker against a real agent: it speaks the real protocol through
// the agent's own session code (TLS with its own certificate, or plain ws on loopback) and
// sends whatever frames a test gives it, collecting what comes back per migration id.
import { pino } from 'pino';
import { GuestKind, Technique, Codec } from '../../protocol/codes.js';
import { Frame } from '../../protocol/index.js';
import type { GangwayError } from '../../protocol/errors.js';
import { connectPeer, type AnyFrame, type PeerSession } from '../../agent/peer/session.js';
import { loadTlsMaterial } from '../../agent/peer/tls.js';
import { waitFor } from './wait.js';

export interface AttackerOptions {
  address: string;
  /** What the hello claims. */
  agentId: string;
  /** Mutual TLS with this certificate (it must be listed by the agent under attack). */
  tls?: { cert: string; key: string; ca: string; allow: string[] };
  maxPayloadBytes?: number;
}

export class Attacker {
  /** Frames that came back, by migration id (abort, accept, reject, migrationAnswer, ...). */
  readonly frames = new Map<string, AnyFrame[]>();
  /** Dedup group frames that came back (dedupResident, dedupReady). */
  readonly groupFrames: AnyFrame[] = [];
  closedWith: GangwayError | undefined;

  private constructor(readonly session: PeerSession) {
    session.on('closed', (err: GangwayError) => (this.closedWith = err));
    session.onGroupFrame = (frame) => this.groupFrames.push(frame);
  }

  static async connect(options: AttackerOptions): Promise<Attacker> {
    const session = await connectPeer(options.address, {
      agentId: options.agentId,
      features: ['lz4', 'precopy', 'dedup', 'repair', 'postcopy'],
      maxPayloadBytes: options.maxPayloadBytes ?? 16 * 1024 * 1024,
      log: pino({ level: 'silent' }),
      deadAfterMs: 0,
      ...(options.tls ? { tls: loadTlsMaterial({ kind: 'tls', certPath: options.tls.cert, keyPath: options.tls.key, caPath: options.tls.ca, allow: options.tls.allow }) } : {}),
    });
    return new Attacker(session);
  }

  /**
   * The agent's reason for refusing a session on its hello: the dial itself fails with it
   * when the agent's hello and its error frame come in one read, else the session closes
   * with it once open.
   */
  static async refusal(options: AttackerOptions): Promise<GangwayError> {
    let attacker: Attacker;
    try {
      attacker = await Attacker.connect(options);
    } catch (err) {
      return err as GangwayError;
    }
    try {
      return await attacker.closed();
    } finally {
      attacker.close();
    }
  }

  /** Collects every frame the agent sends for `migrationId` on this session. */
  watch(migrationId: string): AnyFrame[] {
    const got: AnyFrame[] = [];
    this.frames.set(migrationId, got);
    this.session.register(migrationId, { onFrame: (frame) => got.push(frame), onSessionClosed: () => {} });
    return got;
  }

  /** Waits for the first frame of `type` for `migrationId` (watch it first). */
  async next<T extends AnyFrame['type']>(migrationId: string, type: T, timeoutMs = 10_000): Promise<Extract<AnyFrame, { type: T }>> {
    const got = this.frames.get(migrationId) ?? this.watch(migrationId);
    return (await waitFor(`${type} for ${migrationId}`, () => got.find((f) => f.type === type), timeoutMs)) as Extract<AnyFrame, { type: T }>;
  }

  /** Resolves once the agent closed the session (with why). */
  closed(timeoutMs = 10_000): Promise<GangwayError> {
    return waitFor('the session to close', () => this.closedWith, timeoutMs);
  }

  send(frame: AnyFrame): void {
    this.session.send(frame);
  }

  close(): void {
    this.session.close();
  }
}

/** An offer of a process guest with one region of `lengthBytes`. */
export function offerOf(migrationId: string, name: string, lengthBytes: number, technique: Technique = Technique.precopy) {
  return Frame.offer({
    migrationId,
    guest: { name, kind: GuestKind.process, regions: [{ name: 'ram', lengthBytes, pageSizeBytes: 4096 }], config: {} },
    technique,
    downtimeBudgetMs: 300,
    codecs: [Codec.raw, Codec.lz4],
  });
}
