# Source on the GPU machine from the repository root (the device tool's copy of the tree).
# It installs the carried wheels and assembles the carried default model, its
# tokenizer and the corpora into ADORE_CACHE. The GGUF is larger than one call may
# carry, so it travels in two calls: .carry/p1/gguf.part, then .carry/p2/{gguf.part,
# *.tokenizer, corpora.tgz} (both folders git-ignored; see docs/GPU.md).
export ADORE_CACHE=/tmp/adore-cache PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
mkdir -p "$ADORE_CACHE"
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl
gguf="$ADORE_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f .carry/p1/gguf.part ] && cp .carry/p1/gguf.part /tmp/gguf.part1
if [ ! -f "$gguf" ] && [ -f .carry/p2/gguf.part ] && [ -f /tmp/gguf.part1 ]; then
  cat /tmp/gguf.part1 .carry/p2/gguf.part > "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
  cp -r .carry/p2/*.tokenizer "$ADORE_CACHE/" && tar xzf .carry/p2/corpora.tgz -C "$ADORE_CACHE"
fi
ls "$ADORE_CACHE"
