// `gangway completion bash|zsh`: a completion script generated from the command tree the CLI
// runs with (commands, subcommands, options, an option's choices), so a command or option
// added later completes without anyone editing a script. The tree travels as four tables,
// keyed by command path ('.' for gangway itself: zsh refuses an empty key); the shell
// functions only look words up in them.
import { Argument, type Command } from 'commander';
import { describeCommand, type CommandInfo } from './command-tree.js';

export const SHELLS = ['bash', 'zsh'] as const;
export type Shell = (typeof SHELLS)[number];

/** What to offer after an option that takes a value: its choices, or files, dirs, nothing. */
type ValueHint = { choices: readonly string[] } | 'file' | 'dir' | 'none';

interface Tables {
  /** The words after a command: its subcommands, or its first argument's choices. */
  subcommands: Map<string, string[]>;
  arguments: Map<string, string[]>;
  options: Map<string, string[]>;
  values: Map<string, ValueHint>;
}

function tables(root: CommandInfo): Tables {
  const result: Tables = { subcommands: new Map(), arguments: new Map(), options: new Map(), values: new Map() };
  const visit = (info: CommandInfo) => {
    const key = info.path === '' ? '.' : info.path;
    result.subcommands.set(key, info.subcommands.map((sub) => sub.path.split(' ').at(-1)!));
    result.arguments.set(key, [...(info.argumentChoices ?? [])]);
    result.options.set(key, info.options.map((option) => option.name));
    for (const option of info.options.filter((o) => o.takesValue)) {
      const placeholder = /<([^>]+)>|\[([^\]]+)\]/.exec(option.flags)?.slice(1).find(Boolean) ?? '';
      result.values.set(
        `${key} ${option.name}`,
        option.choices ? { choices: option.choices } : placeholder === 'file' || placeholder === 'binary' ? 'file' : placeholder === 'dir' ? 'dir' : 'none',
      );
    }
    info.subcommands.forEach(visit);
  };
  visit(root);
  return result;
}

/** A single-quoted shell word (both shells read '...' the same way). */
const quoted = (text: string) => `'${text.replace(/'/g, `'\\''`)}'`;

/** Entries of an associative array: [key]=value for bash, key value pairs for zsh. */
function entries(map: Map<string, string>, shell: Shell): string {
  return [...map].map(([key, value]) => (shell === 'bash' ? `  [${quoted(key)}]=${quoted(value)}` : `  ${quoted(key)} ${quoted(value)}`)).join('\n');
}

function tableText(t: Tables, shell: Shell): string {
  const words = (map: Map<string, string[]>) => new Map([...map].map(([key, list]) => [key, list.join(' ')]));
  // A value hint as one word list: the choices, or @file, @dir, '' (nothing to offer).
  const values = new Map([...t.values].map(([key, hint]) => [key, typeof hint === 'object' ? hint.choices.join(' ') : hint === 'none' ? '' : `@${hint}`]));
  const declare = shell === 'bash' ? 'declare -gA' : 'typeset -gA';
  return [
    `${declare} _gangway_subcommands=(\n${entries(words(t.subcommands), shell)}\n)`,
    `${declare} _gangway_arguments=(\n${entries(words(t.arguments), shell)}\n)`,
    `${declare} _gangway_options=(\n${entries(words(t.options), shell)}\n)`,
    `${declare} _gangway_values=(\n${entries(values, shell)}\n)`,
  ].join('\n');
}

const BASH_FUNCTION = `
# The command path is the words so far that name a subcommand of the path before them.
_gangway() {
  local cur=\${COMP_WORDS[COMP_CWORD]} prev=\${COMP_WORDS[COMP_CWORD-1]} path=. word i
  for (( i = 1; i < COMP_CWORD; i++ )); do
    word=\${COMP_WORDS[i]}
    [[ $word == -* ]] && continue
    if [[ " \${_gangway_subcommands[$path]} " == *" $word "* ]]; then
      [[ $path == . ]] && path=$word || path="$path $word"
    fi
  done
  COMPREPLY=()
  if [[ $prev == -* && -n \${_gangway_values["$path $prev"]+set} ]]; then
    local values=\${_gangway_values["$path $prev"]}
    case $values in
      @file) compopt -o filenames; COMPREPLY=($(compgen -f -- "$cur")) ;;
      @dir) compopt -o filenames; COMPREPLY=($(compgen -d -- "$cur")) ;;
      *) COMPREPLY=($(compgen -W "$values" -- "$cur")) ;;
    esac
  elif [[ $cur == -* ]]; then
    COMPREPLY=($(compgen -W "\${_gangway_options[$path]}" -- "$cur"))
  else
    COMPREPLY=($(compgen -W "\${_gangway_subcommands[$path]} \${_gangway_arguments[$path]}" -- "$cur"))
  fi
}
complete -F _gangway gangway
`;

const ZSH_FUNCTION = `
# The command path is the words so far that name a subcommand of the path before them.
_gangway() {
  local path=. word i prev=\${words[CURRENT-1]} cur=\${words[CURRENT]}
  for (( i = 2; i < CURRENT; i++ )); do
    word=\${words[i]}
    [[ $word == -* ]] && continue
    if [[ " \${_gangway_subcommands[$path]} " == *" $word "* ]]; then
      [[ $path == . ]] && path=$word || path="$path $word"
    fi
  done
  if [[ $prev == -* && -n \${_gangway_values[$path $prev]+set} ]]; then
    local values=\${_gangway_values[$path $prev]}
    case $values in
      @file) _files ;;
      @dir) _files -/ ;;
      *) compadd -- \${=values} ;;
    esac
  elif [[ $cur == -* ]]; then
    compadd -- \${=_gangway_options[$path]}
  else
    compadd -- \${=_gangway_subcommands[$path]} \${=_gangway_arguments[$path]}
  fi
}
# Autoloaded from $fpath (#compdef above) the file's body runs per completion; sourced, it
# registers the function.
if [[ \${zsh_eval_context[-1]} == loadautofunc ]]; then
  _gangway "$@"
else
  compdef _gangway gangway
fi
`;

export function completionScript(program: Command, shell: Shell): string {
  const header =
    shell === 'bash'
      ? '# gangway completion for bash: source it (source <(gangway completion bash)) or install it\n# as /etc/bash_completion.d/gangway. Generated by `gangway completion bash`.'
      : '#compdef gangway\n# gangway completion for zsh: put it in a directory of $fpath as _gangway, or source it after\n# compinit. Generated by `gangway completion zsh`.';
  return `${header}\n${tableText(tables(describeCommand(program, {})), shell)}\n${shell === 'bash' ? BASH_FUNCTION : ZSH_FUNCTION}`;
}

export function addCompletionCommand(program: Command): void {
  program
    .command('completion')
    .description(`print a completion script for ${SHELLS.join(' or ')}: commands, subcommands, options and their choices`)
    .addArgument(new Argument('<shell>', 'the shell the script is for').choices(SHELLS))
    .option('--json', 'print {"shell", "script"} as JSON')
    .action((shell: Shell, opts: { json?: boolean }) => {
      const script = completionScript(program, shell);
      process.stdout.write(opts.json ? `${JSON.stringify({ shell, script })}\n` : script);
    });
}
