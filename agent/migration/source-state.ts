// The source side of a migration as a typed state machine: an out-of-order transition is a
// bug, and throws (after Cloud Hypervisor's vm-migration context).
//
//   offering ─▶ precopy ─▶ stopping ─▶ verifying ─▶ committing ─▶ committed
//      │           │           │            │             │
//      └───────────┴───────────┴────────────┴─▶ failed    └─▶ in-doubt (commit sent, no answer)
//
//   post-copy:  stopping ─▶ postcopy-switch ─▶ postcopy ─▶ committed
//                                 │                └─▶ interrupted (the destination runs the
//                                 └─▶ failed / in-doubt    guest and waits for pages we keep)
//
// Before `committing` / `postcopy-switch`, a failure resumes the source guest. From then on
// the destination may be running the guest, so the source guest is never resumed by itself.

export type SourcePhase =
  | 'offering'
  | 'precopy'
  | 'stopping'
  | 'verifying'
  | 'committing'
  | 'postcopy-switch'
  | 'postcopy'
  | 'committed'
  | 'failed'
  | 'in-doubt'
  | 'interrupted';

const NEXT: Record<SourcePhase, readonly SourcePhase[]> = {
  // postcopy: an agent restarted mid post-copy serves the rest (resumePostcopy).
  offering: ['precopy', 'postcopy', 'failed'],
  precopy: ['stopping', 'failed'],
  stopping: ['verifying', 'postcopy-switch', 'failed'],
  verifying: ['committing', 'failed'],
  committing: ['committed', 'failed', 'in-doubt'],
  'postcopy-switch': ['postcopy', 'failed', 'in-doubt'],
  postcopy: ['committed', 'interrupted'],
  committed: [],
  failed: [],
  'in-doubt': ['committed', 'failed'],
  interrupted: ['postcopy', 'committed'],
};

export class SourceStateMachine {
  private current: SourcePhase = 'offering';

  /** `onChange` hears each transition (the agent's event stream reports the switchover). */
  constructor(private readonly onChange?: (phase: SourcePhase) => void) {}

  get phase(): SourcePhase {
    return this.current;
  }

  /** True while a failure must resume the source guest. */
  get sourceOwnsGuest(): boolean {
    return this.current === 'offering' || this.current === 'precopy' || this.current === 'stopping' || this.current === 'verifying';
  }

  to(next: SourcePhase): void {
    if (!NEXT[this.current].includes(next)) {
      throw new Error(`migration state machine: ${this.current} → ${next} is not a legal transition`);
    }
    this.current = next;
    this.onChange?.(next);
  }
}
