# The GPU runs behind docs/THROUGHPUT.md, docs/KERNELS.md and docs/RESULTS.md: independent jobs, one per GPU
# (bench, quality: a machine of 2 or 4 GPUs, nvidia-h200-x2/x4), or one after another on one GPU (single, grid,
# groups, controller, quality1, stage1, cost, sharded, kvquant), each resumable: call the same case again on the warm machine and finished jobs are skipped.
# From the repository root: `source scripts/gpu/setup.sh`, then `bash scripts/gpu/runs.sh CASE` (docs/GPU.md).
# Results go to /tmp/runs (kept while the machine stays warm), returned as $OUT/runs.tgz (without HLO text).
set -u
R=/tmp/runs
# A fresh machine resumes an earlier machine's rows: carry its tarball as .carry/seed/runs.tgz (docs/GPU.md)
[ -d "$R" ] || { [ -f .carry/seed/runs.tgz ] && tar xzf .carry/seed/runs.tgz -C /tmp; }
mkdir -p "$R"
LIMIT=${LIMIT:-540}  # seconds per call: the device tool allows 600; every job ends by then
END=$(( $(date +%s) + LIMIT ))
on() {  # GPU, log name, command: runs until END
  local gpu=$1 log=$2 left=$(( END - $(date +%s) )); shift 2; [ "$left" -gt 10 ] || return 124
  CUDA_VISIBLE_DEVICES=$gpu timeout "$left" "$@" >>"$R/$log.log" 2>&1
}
GRID="python3 -m eval.throughput --preset grid --ttft --no-hf --steps 8 --repeats 3"
GRID_DECODE="python3 -m eval.throughput --preset grid --no-hf --steps 8 --repeats 3"  # decode rows only (TTFT: GRID)
EVAL="python3 -m adore_jax eval"
Q="--size full --out $R/quality"

case "${1:-}" in
bench)  # four GPUs: the main throughput run (HF, fixed budget, TTFT), the 7B grid in two halves, the kernel
        # benchmark then the SmolLM2 grid
  on 0 throughput python3 -m eval.throughput --preset gpu --fixed-budget --ttft --ttft-blockwise --out "$R/throughput" &
  on 1 grid_a $GRID --shapes llama2-7b --contexts 2048,8192 --out "$R/grid_a" &
  on 2 grid_b $GRID --shapes llama2-7b --contexts 16384,32768 --out "$R/grid_b" &
  on 3 grid_c bash -c "python3 -m eval.bench_kernels --out $R/kernels/bench_kernels.json &&
    $GRID --shapes smollm2-135m --out $R/grid_c" &
  ;;
single)  # one GPU: the kernel benchmark (docs/KERNELS.md), then the main throughput run (docs/THROUGHPUT.md)
  [ -f $R/kernels/bench_kernels.txt ] || on 0 bench_kernels python3 -m eval.bench_kernels \
    --out $R/kernels/bench_kernels.json  # the .txt table is written last, when the run is complete
  [ -f $R/main/throughput.json ] || on 0 main python3 -m eval.throughput --preset gpu --fixed-budget --out $R/main
  ;;
grid)  # one GPU: the grids of docs/THROUGHPUT.md (7B, then SmolLM2; decode and TTFT), one batch size a job
  for B in 1 8 16 64; do
    [ -f $R/grid_7b_b$B/throughput.json ] || on 0 grid_7b_b$B $GRID --shapes llama2-7b --batches $B \
      --out $R/grid_7b_b$B
  done
  [ -f $R/grid_smollm2/throughput.json ] || on 0 grid_smollm2 $GRID --shapes smollm2-135m --out $R/grid_smollm2
  [ -f $R/grid_hf/throughput.json ] || on 0 grid_hf python3 -m eval.throughput --preset grid --hf-only --out $R/grid_hf
  ;;
groups)  # one GPU: the 7B TTFT at B=64 under JAX's default memory pool, prefilled in groups of 16 and of 8
         # sequences (--prefill-group; docs/THROUGHPUT.md, "Open")
  for g in 16 8; do
    [ -f $R/t64g$g/throughput.json ] || on 0 t64g$g $GRID --ttft-only --shapes llama2-7b --batches 64 \
      --prefill-group $g --out $R/t64g$g
  done
  ;;
quality)  # four GPUs, with the model (docs/GPU.md): the four evaluations of `adore eval all --size full`
  on 0 ppl_a $EVAL ppl $Q --policy full,window,streaming,h2o,tova &
  on 1 ppl_b $EVAL ppl $Q --policy adore,adore-r8,oracle &
  on 2 recall $EVAL recall $Q &
  on 3 passkey_agreement bash -c "python3 -m adore_jax eval passkey --size full --out $R/quality &&
    python3 -m adore_jax eval agreement --size full --out $R/quality" &
  ;;
controller)  # one GPU, with the model and the 2048-token packed data (docs/GPU.md): the ablation of docs/TRAINING.md
             # (nine processes at once), then the shipped controller's recipe
  [ -f $R/ablation/ablation.json ] || on 0 ablation python3 -m train.variants --steps 160 --train-seconds 290 \
    --seq-len 2048 --batch-size 8 --eval-batches 2 --eval-len 8192 --eval-segments 4 --budgets 256,1024 \
    --protections 0-0,4-0,4-25 --out $R/ablation
  [ -f $R/controller/controller/controller.json ] || on 0 controller python3 -m adore_jax train-controller \
    --config train/configs/smollm2-135m.toml --out $R/controller
  ;;
quality1)  # one GPU, with the model, resumable (call again until done): the tables of docs/RESULTS.md with the
           # shipped controller: perplexity on the test book (m = 128-1024) and on the out-of-domain text (m = 1024),
           # pass-key and float32 agreement at m = 256 and 1024
  P="--policy full,streaming,h2o,tova,adore,adore-r8"
  on 0 ppl $EVAL ppl $Q $P --cache-size 128,256,512,1024
  on 0 ppl_ood $EVAL ppl --size full --text ood $P --cache-size 1024 --out $R/quality_ood
  on 0 passkey $EVAL passkey $Q --policy full,streaming,h2o,tova,adore,adore-q16 --cache-size 256,1024
  on 0 agreement $EVAL agreement $Q --dtype float32 --policy full,streaming,h2o,tova,adore --cache-size 256,1024
  ;;
stage1)  # one GPU, with the model, resumable: Stage 1 at 2048 tokens on the book/chat/retrieval mix (docs/TRAINING.md;
        # STEPS=N for fewer steps), then perplexity and pass-key of full attention and the policies on the adapted
        # backbone (the fair table; the original's is quality1's)
  A=$R/stage1_mix/adapter
  [ -f $A/adapter.json ] || on 0 stage1 python3 -m adore_jax finetune-sparse \
    --config train/configs/stage1-smollm2-135m.toml ${STEPS:+--steps $STEPS} --out $R/stage1_mix
  if [ -f $A/adapter.json ]; then
    on 0 ppl_stage1 $EVAL ppl --size full --adapter $A --policy full,streaming,h2o,tova,adore --cache-size 256,1024 \
      --out $R/quality_stage1_mix
    on 0 passkey_stage1 $EVAL passkey --size full --adapter $A --policy full,adore --cache-size 256,1024 \
      --out $R/quality_stage1_mix
  fi
  ;;
cost)  # one GPU: the controller's and the cache update's share of a 7B decode step, per controller input
       # (docs/THROUGHPUT.md, "Targets")
  [ -f $R/cost/throughput.json ] || on 0 cost python3 -m eval.throughput --preset controller --no-hf --out $R/cost
  ;;
sharded)  # one GPU: the 7B shape at B = 8, 16K (full, streaming, adore R = 0, 8, 8/8): the single-device rows of the
          # tree before sharding (carried as .carry/before/tree.tgz, `git archive` of that commit; docs/SERVING.md) and
          # of this tree, and this tree's rows on a mesh of one device, the steps under shard_map; resumable
  S="python3 -m eval.throughput --preset grid --shapes llama2-7b --contexts 16384 --batches 8 --no-hf --steps 8 --repeats 3"
  if [ ! -f $R/sharded_before/throughput.json ] && [ -f .carry/before/tree.tgz ]; then
    [ -d /tmp/before_tree ] || { mkdir -p /tmp/before_tree && tar xzf .carry/before/tree.tgz -C /tmp/before_tree; }
    on 0 sharded_before bash -c "cd /tmp/before_tree && PYTHONPATH=/tmp/before_tree:/tmp/site $S --out $R/sharded_before"
  fi
  [ -f $R/sharded/throughput.json ] || on 0 sharded $S --ttft --mesh data=1,model=1 --hlo --out $R/sharded
  ;;
kvquant)  # one GPU, with the model, resumable (call again until done): 8-bit KV slots (docs/THROUGHPUT.md and
          # docs/KERNELS.md, "8-bit KV slots"): the decode kernel's rate on int8/float8 slots, the 7B rows at B = 8,
          # 16K and at a fixed budget with each cache dtype, then perplexity (L = 8192) of full and ADORE, m = 256
          # and 1024, with bfloat16, int8 and float8_e4m3 slots
  [ -f $R/kv8_kernels/bench_kernels.txt ] || on 0 kv8_kernels python3 -m eval.bench_kernels --sections copy,attn8 \
    --out $R/kv8_kernels/bench_kernels.json
  [ -f $R/kvquant/throughput.json ] || on 0 kvquant python3 -m eval.throughput --preset kvquant --fixed-budget \
    --no-hf --out $R/kvquant
  for KV in auto int8 float8_e4m3; do
    [ -f $R/kvquant_ppl_$KV/ppl.json ] || on 0 kvquant_ppl_$KV $EVAL ppl --size full --dtype bfloat16 \
      --policy full,adore --cache-size 256,1024 --kv-dtype $KV --out $R/kvquant_ppl_$KV
  done
  ;;
assemble)  # every quality row is in .parts by now: write the reports (grid rows are assembled off the GPU)
  on 0 assemble_quality $EVAL all $Q &
  ;;
*) echo "usage: bash scripts/gpu/runs.sh bench|single|grid|groups|quality|controller|quality1|stage1|cost|sharded|kvquant|assemble" >&2; exit 2 ;;
esac
wait
mkdir -p "$OUT" && tar czf "$OUT/runs.tgz" --exclude='*.hlo.txt' --exclude=checkpoints -C /tmp runs  # one file (the tool returns few)
tail -n 3 "$R"/*.log
