# The GPU runs behind docs/THROUGHPUT.md, docs/KERNELS.md and docs/RESULTS.md, on a
# machine of 2 or 4 GPUs (nvidia-h200-x2/x4): independent jobs, one per GPU, each resumable (`single`: one GPU).
# Source eval/gpu_setup.sh first; then `bash eval/gpu_runs.sh CASE` (the cases below).
# Results go to /tmp/runs (kept while the machine stays warm), returned as $OUT/runs.tgz (without HLO text).
set -u
R=/tmp/runs
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
bench)  # throughput (main rows, HF, fixed budget), the grid split over three GPUs, kernels
  on 0 throughput python3 -m eval.throughput --preset gpu --fixed-budget --ttft --ttft-blockwise --out "$R/throughput" &
  on 1 grid_a $GRID --shapes llama2-7b --contexts 2048,8192 --out "$R/grid_a" &
  on 2 grid_b $GRID --shapes llama2-7b --contexts 16384,32768 --out "$R/grid_b" &
  on 3 grid_c bash -c "python3 eval/bench_kernels.py --out $R/bench_kernels.json --deadline 200 --check-cases 5 &&
    python3 -m eval.throughput --preset grid --ttft --no-hf --steps 8 --repeats 3 --shapes smollm2-135m --out $R/grid_c" &
  ;;
quality)  # the four evaluations of `adore eval all --size full`, split over four GPUs
  on 0 ppl_a $EVAL ppl $Q --policy full,window,streaming,h2o,tova &
  on 1 ppl_b $EVAL ppl $Q --policy adore,adore-r8,oracle &
  on 2 recall $EVAL recall $Q &
  on 3 passkey_agreement bash -c "python3 -m adore_jax eval passkey --size full --out $R/quality &&
    python3 -m adore_jax eval agreement --size full --out $R/quality" &
  ;;
throughput)  # session 3, two GPUs: the main rows (HLO, both layer layouts, fixed budget, TTFT); the 7B grid at B = 8, 64
  on 0 throughput bash -c "python3 -m eval.throughput --preset gpu --fixed-budget --ttft --ttft-blockwise --hlo --out $R/throughput;
    python3 -m eval.hlo_copies $R/throughput/hlo/*.hlo.txt > $R/hlo_copies.txt" &
  on 1 grid_a $GRID_DECODE --shapes llama2-7b --batches 8,64 --out "$R/grid_a" &
  ;;
grid)  # two GPUs: the main rows with the fixed budget and TTFT; the prefill kernel against XLA and cuDNN, then
        # the unstacked 7B grid at B=64 (resumable: run again until done)
  on 0 throughput bash -c "python3 -m eval.throughput --preset gpu --fixed-budget --ttft --ttft-blockwise --hlo --out $R/throughput;
    python3 -m eval.hlo_copies $R/throughput/hlo/*.hlo.txt > $R/hlo_copies.txt" &
  on 1 grid_a bash -c "[ -f $R/bench_prefill.json ] || python3 eval/bench_kernels.py --sections copy,check,prefill \
    --check-cases 3 --out $R/bench_prefill.json; $GRID_DECODE --shapes llama2-7b --batches 64 --out $R/grid_a" &
  ;;
single)  # one GPU, the grid case's jobs one after another (call again until each is done): the prefill kernel
         # against XLA and cuDNN; the main rows with the fixed budget and TTFT; the unstacked 7B grid at B=64
  [ -f $R/bench_prefill.json ] || on 0 bench_prefill python3 eval/bench_kernels.py --sections copy,check,prefill \
    --check-cases 3 --out $R/bench_prefill.json
  [ -f $R/throughput/throughput.json ] || on 0 throughput python3 -m eval.throughput --preset gpu --fixed-budget \
    --ttft --ttft-blockwise --hlo --out $R/throughput
  [ -f $R/throughput/throughput.json ] && [ ! -f $R/hlo_copies.txt ] && python3 -m eval.hlo_copies \
    $R/throughput/hlo/*.hlo.txt > $R/hlo_copies.txt
  [ -f $R/grid_a/throughput.json ] || on 0 grid_a $GRID_DECODE --shapes llama2-7b --batches 64 --out $R/grid_a
  ;;
single_grid)  # session 6, one GPU, resumable: the SmolLM2 grid (unstacked layers, TTFT through the prefill kernel);
              # the 7B TTFT at B <= 16 (their decode rows stand); the 7B decode at B=1 again (after the one-row fix)
  [ -f $R/grid_s/throughput.json ] || on 0 grid_s $GRID --shapes smollm2-135m --out $R/grid_s
  [ -f $R/grid_t/throughput.json ] || on 0 grid_t $GRID --ttft-only --shapes llama2-7b --batches 1,8,16 --out $R/grid_t
  [ -f $R/grid_1/throughput.json ] || on 0 grid_1 $GRID_DECODE --shapes llama2-7b --batches 1 --out $R/grid_1
  ;;
grid_rest)  # one GPU, resumable: what the grids still lack (TTFT at B=64, HF transformers at every point, both
            # shapes), then the conditionals experiment (docs/THROUGHPUT.md, the grid)
  [ -f $R/grid_t64/throughput.json ] || on 0 grid_t64 $GRID --ttft-only --batches 64 --out $R/grid_t64
  [ -f $R/grid_hf/throughput.json ] || on 0 grid_hf python3 -m eval.throughput --preset grid --hf-only --out $R/grid_hf
  for shape in smollm2-135m llama2-7b; do  # about 27 compiles each: one job per shape, so a deadline loses one only
    [ -f $R/cond_$shape.json ] || on 0 cond python3 docs/results/throughput/session6/cond_experiment.py \
      --shapes $shape --out $R/cond_$shape.json
  done
  ;;
cond_sweep)  # session 7, one GPU, resumable: the conditionals experiment (one job per shape), then the decode-kernel
            # sweep (one_split among its configs) on an otherwise idle host
  for shape in smollm2-135m llama2-7b; do
    [ -f $R/cond_$shape.json ] || on 0 cond python3 docs/results/throughput/session6/cond_experiment.py \
      --shapes $shape --out $R/cond_$shape.json
  done
  [ -f $R/bench_sweep.json ] || on 0 bench_sweep python3 eval/bench_kernels.py --sections copy,sweep \
    --deadline $(( END - $(date +%s) - 30 )) --out $R/bench_sweep.json
  ;;
loops)  # one GPU, resumable (sessions 7-8): the decode loop's forms at both shapes with their HLO (the engine's
        # periods against the lax.cond forms; docs/THROUGHPUT.md), the rows the loop changes (7B B=8 16K; SmolLM2
        # B=8,16), the decode matmuls split over K (session7/matmul_splitk.sh), then the 7B TTFT at B=64 with JAX's
        # memory pool at 95% (its default, 75%, did not hold it)
  for shape in llama2-7b smollm2-135m; do
    [ -f $R/loops_$shape.json ] || on 0 loops python3 docs/results/throughput/session6/cond_experiment.py \
      --shapes $shape --flag-sets default --hlo $R/loops_hlo --out $R/loops_$shape.json
  done
  [ -f $R/loops_smollm2-135m.json ] && [ ! -f $R/loops_copies.txt ] && python3 -m eval.hlo_copies \
    $R/loops_hlo/default/*.hlo.txt > $R/loops_copies.txt
  [ -f $R/v7b/throughput.json ] || on 0 v7b $GRID_DECODE --shapes llama2-7b --batches 8 --contexts 16384 --out $R/v7b
  [ -f $R/vsm/throughput.json ] || on 0 vsm $GRID_DECODE --shapes smollm2-135m --batches 8,16 --contexts 8192,32768 \
    --out $R/vsm
  [ -f $R/matmul.done ] || { on 0 matmul bash docs/results/throughput/session7/matmul_splitk.sh && touch $R/matmul.done; }
  [ -f $R/t64b/throughput.json ] || XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 on 0 t64b $GRID --ttft-only \
    --shapes llama2-7b --batches 64 --out $R/t64b
  ;;
groups)  # one GPU, resumable (session 9): the 7B TTFT at B=64 under JAX's default pool, prefilled in groups of 16
         # and of 8 sequences (--prefill-group; docs/THROUGHPUT.md, the grid); SmolLM2 B=8 2K again (R=8/8 as slow
         # as R=8 in session 8's one run)
  for g in 16 8; do
    [ -f $R/t64g$g/throughput.json ] || on 0 t64g$g $GRID --ttft-only --shapes llama2-7b --batches 64 \
      --prefill-group $g --out $R/t64g$g
  done
  [ -f $R/s8_2k/throughput.json ] || on 0 s8_2k $GRID_DECODE --shapes smollm2-135m --batches 8 --contexts 2048 \
    --out $R/s8_2k
  ;;
kernels)  # one GPU, resumable (for session 10): the main run with session 9's few-row projection kernels (its
          # xla-matmul rows are the reference), the 7B step's kernel-by-kernel profile, the 7B B=8 16K grid rows
  [ -f $R/main/throughput.json ] || on 0 main python3 -m eval.throughput --preset gpu --fixed-budget --out $R/main
  mkdir -p $R/profile
  [ -f $R/profile/profile_step.json ] || on 0 profile python3 docs/results/throughput/session9/profile_step.py \
    $R/profile adore adore-xla-matmul full-no-attention
  [ -f $R/g7b8/throughput.json ] || on 0 g7b8 $GRID_DECODE --shapes llama2-7b --batches 8 --contexts 16384 --out $R/g7b8
  ;;
quality2)  # with the model (carry .carry/p2, .carry/parts): a hidden-state controller, ADORE with sinks, fp32 agreement
  [ -d .carry/parts/quality_parts ] && mkdir -p "$R/quality" && cp -rn .carry/parts/quality_parts/. "$R/quality/.parts/"
  on 0 agreement $EVAL agreement --size full --dtype float32 --out "$R/quality_fp32" &
  on 1 hidden bash -c "python3 -m train.variants --final hidden:8/bce --final-steps 600 --out $R/ctrl_h8 &&
    $EVAL ppl --size full --policy full,streaming,adore,adore-r8 --controller $R/ctrl_h8/controller --out $R/quality_h8 &&
    $EVAL ppl $Q --policy full,window,streaming,h2o,tova,adore,adore-r8,oracle,adore-s4,adore-r8-s4" &
  ;;
assemble)  # every quality row is in .parts by now: write the reports (grid rows are assembled off the GPU)
  on 0 assemble_quality $EVAL all $Q &
  ;;
*) echo "usage: bash eval/gpu_runs.sh bench|quality|throughput|grid|single|single_grid|grid_rest|cond_sweep|loops|groups|kernels|quality2|assemble" >&2; exit 2 ;;
esac
wait
mkdir -p "$OUT" && tar czf "$OUT/runs.tgz" --exclude='*.hlo.txt' -C /tmp runs  # one file (the tool returns few)
tail -n 3 "$R"/*.log
