// Dirty-page trackers: which guest pages were written since the last collect.
//
// `collect()` is get-and-reset. Pages the destination did not receive must be handed back
// with `remark()` so that no dirty bit is ever lost (Firecracker's dump_dirty rule).

export type TrackerKind = 'uffd-wp' | 'hash-scan' | 'qemu-bitmap';

export interface DirtyTracker {
  readonly kind: TrackerKind;
  /** Starts a tracking epoch: everything recorded before is forgotten. */
  arm(): Promise<void>;
  /** Pages written since the last collect (or arm), as ascending runs [first, count, ...]. */
  collect(): Promise<Uint32Array>;
  /** Pages whose transfer failed: the next collect reports them again. */
  remark(runs: Uint32Array): void;
  /**
   * The bytes of pages as they were sent (entries as gathered by the addon: triples
   * [kind, firstPage, pageCount], data pages packed in `payload`). Content-based trackers
   * take this as their baseline; write-protect trackers ignore it.
   */
  noteSent(entries: Uint32Array, entryCount: number, payload: Uint8Array): void;
  close(): void;
}
