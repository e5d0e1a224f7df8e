"""Shell completion for `remoterun` (bash, zsh), generated from the argparse parser itself."""

from __future__ import annotations

import argparse

BASH = """# remoterun completion for bash: eval "$(remoterun completion bash)"
_remoterun() {
  local cur=${COMP_WORDS[COMP_CWORD]} verb="" w
  for w in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
    case $w in -*) ;; *) verb=$w; break ;; esac
  done
  case $verb in
%(cases)s
    *) COMPREPLY=($(compgen -W "%(verbs)s %(globals)s" -- "$cur")); return ;;
  esac
  if [[ $cur == -* ]]; then
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
  elif [[ $verb == run ]]; then
    COMPREPLY=($(compgen -W "$(remoterun scripts -o name 2>/dev/null)" -- "$cur"))
  elif [[ $verb =~ ^(attach|logs|show|cancel)$ ]]; then
    COMPREPLY=($(compgen -W "$(remoterun ls -o json --limit 50 2>/dev/null \\
      | python3 -c 'import json,sys; print(" ".join(t["id"][:8] for t in json.load(sys.stdin)))' \\
      2>/dev/null)" -- "$cur"))
  fi
}
complete -o default -F _remoterun remoterun
"""

ZSH = """#compdef remoterun
# remoterun completion for zsh: eval "$(remoterun completion zsh)"
autoload -U bashcompinit && bashcompinit
%(bash)s"""


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings
            if flag.startswith("--") or len(flag) == 2]


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for this shell."""
    verbs = _verbs(parser)
    cases = "\n".join(f"    {name}) opts=\"{' '.join(_options(sub))}\" ;;"
                      for name, sub in verbs.items())
    bash = BASH % {"cases": cases, "verbs": " ".join(verbs),
                   "globals": " ".join(_options(parser))}
    return bash if shell == "bash" else ZSH % {"bash": bash}
