// Every way gangway is started runs node with the flags node-flags.ts gives: main.ts's
// shebang (every command) NODE_FLAGS; the agent daemon (a spawned local agent, the shipped
// systemd unit, install-unit's own) AGENT_NODE_FLAGS.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { AGENT_NODE_FLAGS, NODE_FLAGS } from '../../agent/node-flags.js';

const root = join(import.meta.dirname, '..', '..');

describe('node flags', () => {
  it('the shebang carries NODE_FLAGS, the shipped unit AGENT_NODE_FLAGS, which adds to them', () => {
    const shebang = readFileSync(join(root, 'agent', 'main.ts'), 'utf8').split('\n')[0]!;
    expect(shebang).toBe(`#!/usr/bin/env -S node ${NODE_FLAGS.join(' ')}`);
    const execStart = /^ExecStart=(\S+) (.*) (\S+main\.js) agent/m.exec(readFileSync(join(root, 'agent', 'systemd', 'gangway-agent.service'), 'utf8'));
    expect(execStart?.[2]).toBe(AGENT_NODE_FLAGS.join(' '));
    expect(AGENT_NODE_FLAGS.slice(0, NODE_FLAGS.length)).toEqual(NODE_FLAGS);
  });

  it('are flags this node takes, with the values they name', () => {
    // V8's own account of the flags it runs with (a misspelt one stops node).
    const flags = execFileSync(process.execPath, [...AGENT_NODE_FLAGS, '--print-flag-values', '-e', '0'], { encoding: 'utf8' }).split('\n');
    expect(flags).toContain('--no-flush-bytecode');
    expect(flags).toContain('--single-threaded-gc');
    expect(flags).toContain('--no-lazy');
  });
});
