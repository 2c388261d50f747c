// What a benchmark undoes on the way out, also on Ctrl-C or SIGTERM: its agents (and their
// guests), links, namespaces. Each step runs once, whoever asks first (the signal or the
// normal way out), in reverse order of registration.
export class ExitSteps {
  private readonly steps: (() => Promise<void>)[] = [];
  /** Set once a signal came: loops stop starting new work. */
  interrupted = false;

  /** `doing`: what the signal handler says it does, e.g. "stopping the agents and guests". */
  constructor(doing: string) {
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      process.once(signal, () => {
        this.interrupted = true;
        console.error(`${signal}: ${doing}`);
        void this.run().finally(() => process.exit(130));
      });
    }
  }

  /** Registers `step`; the returned function runs it now (once). */
  add(step: () => Promise<void>): () => Promise<void> {
    let running: Promise<void> | undefined;
    const once = () => (running ??= step().catch((err: Error) => console.error(`cleanup: ${err.message}`)));
    this.steps.push(once);
    return once;
  }

  async run(): Promise<void> {
    for (const step of [...this.steps].reverse()) await step();
  }
}
