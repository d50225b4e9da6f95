#!/usr/bin/env bash
# Prepare .whl/ (ignored by git) for scripts/gpu_check.py on a GPU machine without network access
# that has Python 3.12 with PyTorch (CUDA), transformers, accelerate, safetensors, tokenizers, typer,
# rich, httpx, psutil, pyyaml, prometheus-client, filelock, jinja2, click, markupsafe, numpy,
# packaging, requests and tqdm, but not llmctl's other dependencies.
#
#   scripts/gpu_wheels.sh          # here, where pip works; then copy the repository with .whl/
#
# It fetches the missing wheels (pure Python, or cp312 manylinux x86-64 builds) and copies the
# embedded SmolLM2 tokenizer to .whl/tokenizer/ (its 98 MB GGUF stays here). The versions are the
# ones the CPU dry run was tested with (exact pins: the GPU machine cannot resolve anything). On
# the GPU machine, in the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
#   python3 scripts/gpu_check.py --tokenizer .whl/tokenizer --out gpu-check
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

WHEELS=(
  flask==3.1.3 werkzeug==3.1.9 itsdangerous==2.2.0 blinker==1.9.0 flask-cors==6.0.5
  waitress==3.0.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  platformdirs==4.14.9 tenacity==9.2.1 httpx-sse==0.4.3 gguf==0.19.0
  bitsandbytes==0.50.2
)

rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"

"$PYTHON" - <<'EOF'
import shutil
from pathlib import Path

from llmctl.core.embedded import ensure_embedded_model

source, target = ensure_embedded_model(), Path(".whl/tokenizer")
target.mkdir()
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
    if (source / name).is_file():
        shutil.copy(source / name, target / name)
EOF
ls -l .whl
du -sh .whl
