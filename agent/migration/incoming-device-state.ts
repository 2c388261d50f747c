// The incoming guest's device state: its deviceState chunks gathered in order into one
// buffer, checked whole before the switchover, and handed to the standby guest before it
// may run.
import { ErrorCode, ProtocolError } from '../../protocol/errors.js';
import type { FrameOf } from '../../protocol/index.js';
import type { GuestLauncher, StandbyGuest } from '../guest/adapter.js';
import type { GuestFiles } from '../guest/process-guest.js';

/** Why the migration is refused (its guest runs on at the source). */
export interface Refusal {
  code: ErrorCode;
  message: string;
}

export class IncomingDeviceState {
  /** The guest's device state as its chunks arrive. */
  private deviceState: { bytes: Buffer; receivedBytes: number } | undefined;
  private loaded = false;

  constructor(
    private readonly launcher: GuestLauncher,
    private readonly files: GuestFiles,
    /** The largest device state this agent takes (peers.maxDeviceState). */
    private readonly maxBytes: number,
    /** A peer's state was over maxBytes: for the agent's log and metrics. */
    private readonly onLimit: () => void,
  ) {}

  /**
   * A chunk of the guest's device state. Its total is checked against this agent's limit
   * (and the kind's taking any) before anything is allocated; a state over it refuses the
   * migration, not the session, and the source's guest runs on there.
   */
  receive(frame: FrameOf<'deviceState'>): Refusal | undefined {
    if (!this.deviceState) {
      if (frame.totalBytes > this.maxBytes) {
        this.onLimit();
        return { code: ErrorCode.LIMIT, message: `the guest's device state of ${frame.totalBytes} bytes is over this agent's maximum of ${this.maxBytes} (peers.maxDeviceState)` };
      }
      if (!this.launcher.loadDeviceState) {
        return { code: ErrorCode.BAD_REQUEST, message: `a ${this.launcher.kind} guest has no device state, but ${frame.totalBytes} bytes of it came` };
      }
      if (frame.offsetBytes !== 0) throw new ProtocolError(ErrorCode.PROTOCOL, `deviceState: the first chunk starts at ${frame.offsetBytes}, not 0`);
      this.deviceState = { bytes: Buffer.allocUnsafe(frame.totalBytes), receivedBytes: 0 };
    }
    const into = this.deviceState;
    if (frame.totalBytes !== into.bytes.length || frame.offsetBytes !== into.receivedBytes) {
      throw new ProtocolError(
        ErrorCode.PROTOCOL,
        `deviceState: a chunk at ${frame.offsetBytes} of ${frame.totalBytes} bytes after ${into.receivedBytes} of ${into.bytes.length} (chunks come in order, with one total)`,
      );
    }
    into.bytes.set(frame.state, frame.offsetBytes);
    into.receivedBytes += frame.state.length;
    return undefined;
  }

  /** Every chunk of a device state is here. */
  get complete(): boolean {
    return this.deviceState !== undefined && this.deviceState.receivedBytes === this.deviceState.bytes.length;
  }

  /** The switchover may start only with the whole device state here (when there is one). */
  checkComplete(): void {
    const into = this.deviceState;
    if (into && into.receivedBytes !== into.bytes.length) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `the switchover started with ${into.receivedBytes} of the guest's ${into.bytes.length} bytes of device state`);
    }
  }

  /** The device state goes to the standby guest before it may run (once: a later call finds it loaded). */
  async load(standby: StandbyGuest): Promise<void> {
    if (!this.deviceState || this.loaded) return;
    this.loaded = true;
    await this.launcher.loadDeviceState!(standby, this.files, this.deviceState.bytes);
  }
}
