#!/usr/bin/env bash
# Run HERE after a device lease: restores data/drafters (removed by pack.sh) from git, and, given the
# folder where a fetch call's files landed, reassembles each NAME.tar.part-* into build/gpu/NAME.
set -euo pipefail
cd "$(dirname "$0")/../.."
git checkout -- data/drafters
if [ $# -ge 1 ]; then
    mkdir -p build/gpu
    for first in "$1"/*.tar.part-00; do
        [ -e "$first" ] || continue
        name=$(basename "$first" .tar.part-00)
        cat "$1/$name".tar.part-* | tar -C build/gpu -xf -
        echo "build/gpu/$name: $(ls build/gpu/"$name" | tr '\n' ' ')"
    done
    cp "$1"/*.json "$1"/*.log build/gpu/ 2>/dev/null || true
fi
