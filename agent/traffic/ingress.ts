// Inbound traffic, made shapeable: the uplink's ingress is redirected to an ifb device, whose
// egress then carries an HTB tree like the uplink's own (shaper.ts). That is how a
// destination reserves its downlink for an incoming migration: a workload flow squeezed on
// the ifb loses packets, its TCP sender backs off, and the migration gets the share the plan
// gave it (seed 003 reserves bandwidth at the side where migration and workload compete:
// inbound at the destination for post-copy).
//
//   tc qdisc add dev UPLINK handle ffff: ingress
//   tc filter add dev UPLINK parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev gw-ifb0
//
// The ifb device's name is gangway's mark: an ingress qdisc whose filter redirects to it was
// put there by gangway (this run or a crashed one) and is removed with it; any other ingress
// qdisc is someone else's, and then inbound shaping stays off. Needs the ifb module and the
// mirred action (both present here; the police action, which ingress policing would use, is
// not).
import type { Runner } from './exec.js';

export const IFB_DEVICE = 'gw-ifb0';

export class IngressRedirect {
  private installed = false;

  constructor(
    private readonly run: Runner,
    readonly uplink: string,
  ) {}

  /** Creates the ifb device and redirects the uplink's ingress to it. Throws with the failing command. */
  async install(): Promise<void> {
    await IngressRedirect.removeLeftovers(this.run, this.uplink);
    if (await hasIngress(this.run, this.uplink)) {
      throw new Error(`${this.uplink} already has an ingress qdisc that gangway did not install: inbound shaping stays off`);
    }
    await this.run('ip', ['link', 'add', IFB_DEVICE, 'type', 'ifb']);
    try {
      await this.run('ip', ['link', 'set', 'dev', IFB_DEVICE, 'up']);
      await this.run('tc', ['qdisc', 'add', 'dev', this.uplink, 'handle', 'ffff:', 'ingress']);
      await this.run('tc', ['filter', 'add', 'dev', this.uplink, 'parent', 'ffff:', 'protocol', 'all', 'u32', 'match', 'u32', '0', '0',
        'action', 'mirred', 'egress', 'redirect', 'dev', IFB_DEVICE]);
    } catch (err) {
      await IngressRedirect.removeLeftovers(this.run, this.uplink).catch(() => {});
      throw err;
    }
    this.installed = true;
  }

  async remove(): Promise<void> {
    if (!this.installed) return;
    this.installed = false;
    await IngressRedirect.removeLeftovers(this.run, this.uplink);
  }

  /**
   * Removes the uplink's ingress qdisc if its filter redirects to gangway's ifb device, and
   * the device itself. Returns whether anything was removed.
   */
  static async removeLeftovers(run: Runner, uplink: string): Promise<boolean> {
    let removed = false;
    const filters = await run('tc', ['filter', 'show', 'dev', uplink, 'parent', 'ffff:']).catch(() => '');
    if (new RegExp(`redirect to device ${IFB_DEVICE}\\b`, 'i').test(filters)) {
      await run('tc', ['qdisc', 'del', 'dev', uplink, 'handle', 'ffff:', 'ingress']);
      removed = true;
    }
    const device = await run('ip', ['link', 'show', 'dev', IFB_DEVICE]).catch(() => '');
    if (device.includes(IFB_DEVICE)) {
      await run('ip', ['link', 'del', 'dev', IFB_DEVICE]);
      removed = true;
    }
    return removed;
  }
}

async function hasIngress(run: Runner, device: string): Promise<boolean> {
  const qdiscs = await run('tc', ['qdisc', 'show', 'dev', device]);
  return /^qdisc ingress ffff:/m.test(qdiscs);
}
