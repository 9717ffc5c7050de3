#!/bin/sh
# Unpacks the compressed test fixtures (tests/fixtures/*.tar.xz) into DEST and links the bundled 8-bit model
# and its tokenizer files, so that tests find: DEST/models/{kjv-qwen3-21m,kjv-qwen3-21m-8bit,kjv-qwen3-21m-4bit,
# stories260K}, DEST/tokenizers/llama3 and DEST/goldens.
set -eu
dest=${1:-build/fixtures}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dest"
for f in "$root"/tests/fixtures/*.tar.xz; do
    xz -dc "$f" | tar -xf - -C "$dest"
done
bundled="$root/models/kjv-qwen3-21m-8bit"
rm -rf "$dest/models/kjv-qwen3-21m-8bit"
cp -r "$bundled" "$dest/models/kjv-qwen3-21m-8bit"
# The kjv models share one tokenizer; it is stored once, with the bundled model.
for m in kjv-qwen3-21m kjv-qwen3-21m-4bit; do
    cp "$bundled/tokenizer.json" "$dest/models/$m/tokenizer.json"
done
chmod -R u+w "$dest"
