// Every way an agent is started runs node with the same flags: the spawn of a local agent
// (AGENT_NODE_FLAGS), main.ts's shebang (an agent run as `gangway agent`), and the shipped
// systemd unit (install-unit writes AGENT_NODE_FLAGS into its own).
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { AGENT_NODE_FLAGS } from '../../agent/node-flags.js';

const root = join(import.meta.dirname, '..', '..');

describe('AGENT_NODE_FLAGS', () => {
  it('are the flags of the shebang and of the shipped unit', () => {
    const shebang = readFileSync(join(root, 'agent', 'main.ts'), 'utf8').split('\n')[0]!;
    expect(shebang).toBe(`#!/usr/bin/env -S node ${AGENT_NODE_FLAGS.join(' ')}`);
    const execStart = /^ExecStart=(\S+) (.*) (\S+main\.js) agent/m.exec(readFileSync(join(root, 'agent', 'systemd', 'gangway-agent.service'), 'utf8'));
    expect(execStart?.[2]).toBe(AGENT_NODE_FLAGS.join(' '));
  });

  it('are flags this node takes, and keep the bytecode of functions that have not run', () => {
    // V8's own account of the flags it runs with (a misspelt one stops node).
    const flags = execFileSync(process.execPath, [...AGENT_NODE_FLAGS, '--print-flag-values', '-e', '0'], { encoding: 'utf8' }).split('\n');
    expect(flags).toContain('--no-flush-bytecode');
    expect(flags).toContain('--single-threaded-gc');
  });
});
