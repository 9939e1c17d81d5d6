#!/usr/bin/env bash
# check-extras.sh VENV EXTRAS: install the repository with EXTRAS (e.g. "test" or "docs") into VENV, which already
# holds a plain `pip install -e .`, and fail if that changed the version of anything the plain install had put there
# (issue 17: `[test]` used to downgrade huggingface_hub, filelock and openai to litellm's caps).
# Prints the packages the extras added, and every changed version as "NAME OLD -> NEW".
set -uo pipefail
venv="$1" extras="$2"
repo="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d /tmp/check-extras.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
freeze() { "$venv/bin/python" -m pip list --format=freeze --exclude-editable --disable-pip-version-check 2>/dev/null | sort -f; }

freeze >"$scratch/before"
"$venv/bin/python" -m pip install -e "$repo[$extras]" || exit
freeze >"$scratch/after"
"$venv/bin/python" - "$scratch/before" "$scratch/after" "$extras" <<'EOF'
import re
import sys


def read(path):
    """name (normalised as pip compares them) -> version, from `pip list --format=freeze`."""
    found = {}
    for line in open(path, encoding="utf-8"):
        name, _, version = line.strip().partition("==")
        if version:
            found[re.sub(r"[-_.]+", "-", name).lower()] = (name, version)
    return found


before, after, extras = read(sys.argv[1]), read(sys.argv[2]), sys.argv[3]
changed = [f"  {name} {old} -> {after[key][1] if key in after else '(removed)'}"
           for key, (name, old) in sorted(before.items()) if after.get(key, (None, None))[1] != old]
added = sorted(name for key, (name, _) in after.items() if key not in before)
print(f"[{extras}] added {len(added)} packages to the {len(before)} installed before: {', '.join(added) or 'none'}")
if changed:
    print(f"[{extras}] changed what the plain install had resolved:", *changed, sep="\n")
    sys.exit(1)
print(f"[{extras}] no version of the plain install changed")
EOF
