#!/usr/bin/env bash
# Run HERE (the machine with the package index), from the repository root, before a GPU session:
# the device image has torch/triton/transformers/peft but not the peers we measure against.
# Wheels land in .whl/ (git-ignored via .git/info/exclude) and travel with `carry: [".whl"]`.
# .whl/COMMIT records the commit and whether the tree was dirty (`commit <sha>` / `dirty true|false`):
# .git does not travel to the GPU machine, so benchmarks/_harness.py git_commit/git_dirty read it there.
# Rerun this script after committing (or editing) so that COMMIT describes the code that is carried.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==4.7.0 dill==0.4.0 \
    multiprocess==0.70.18
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then dirty=true; else dirty=false; fi
printf 'commit %s\ndirty %s\n' "$commit" "$dirty" > .whl/COMMIT
du -sh .whl && ls .whl && cat .whl/COMMIT
