#!/usr/bin/env bash
# openai-harmony's vocabulary (o200k_base.tiktoken), which it downloads from a host CI cannot reach: built from the
# `tiktoken` npm package's copy and checked against the hash openai-harmony expects. Prints the folder to use as
# TIKTOKEN_ENCODINGS_BASE; idempotent.
set -euo pipefail
dir=${LLMCTL_CI_CACHE:-$HOME/.cache/llmctl-ci}/tiktoken
want=446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d
if [ "$(sha256sum "$dir/o200k_base.tiktoken" 2>/dev/null | cut -d' ' -f1)" != "$want" ]; then
    command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >&2; }
    work=$(mktemp -d)
    (cd "$work" && npm pack -q tiktoken@1.0.22 >/dev/null && tar xzf tiktoken-1.0.22.tgz)
    mkdir -p "$dir"
    python3 - "$work/package/encoders/o200k_base.json" "$dir/o200k_base.tiktoken" <<'PY'
import json, sys
# The npm copy writes the ranks as lines of "! <first rank> <token> <token> ...", tokens in base64.
ranks = json.load(open(sys.argv[1]))["bpe_ranks"]
with open(sys.argv[2], "w") as out:
    for line in filter(None, ranks.split("\n")):
        _, first, *tokens = line.split(" ")
        out.writelines(f"{token} {int(first) + i}\n" for i, token in enumerate(tokens))
PY
    rm -rf "$work"
    [ "$(sha256sum "$dir/o200k_base.tiktoken" | cut -d' ' -f1)" = "$want" ] || { echo "o200k_base: hash mismatch" >&2; exit 1; }
fi
echo "$dir"
