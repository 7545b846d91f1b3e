#!/usr/bin/env bash
# The methods study of docs/results.md on one real data set (experiment=<prefix>_study):
#   1. the teacher (digits: trained once, cached in logs/teachers/; Fashion-MNIST: shipped);
#   2. sweeps on held-out training images (data.holdout, one seed, 4 trials per method): the logit
#      temperature T on logit KD, then SHD's τ and weight on SHD + KD, MiniLMv2's relation heads and
#      weight on MiniLMv2 + KD (both with the chosen T); never on the images the table reports; a
#      chosen value at the edge of its grid extends the grid (tune() below);
#   3. every study row (conf/study/) x 3 seeds with the chosen values, validated on the test images
#      (the comparison SHD must win first: CE, logit KD, MiniLMv2, SHD + KD; then the other
#      baselines; then SHD's ablations);
#   4. the report, with each row paired by seed against logit KD and MiniLMv2.
#   bash scripts/study.sh fashion_mnist|digits [train.py overrides for every run]
# The head-ratio study (fashion_mnist_ratio): students of the same width and depth with 3, 2 and 1
# heads under the 6-head teacher (ratios 2, 3, 6), each with its own sweeps (logit T; τ and
# weight of SHD + KD with progressive, select and mean merging; MiniLMv2's relation heads and
# weight; from 2 heads on, starting one step either side of the previous ratio's choice) and the
# rows CE, logit KD, MiniLMv2 + KD and SHD + KD with each merge x 3 seeds; the
# report after each ratio pairs SHD + KD against MiniLMv2 + KD, select and mean at every ratio
# and draws top-1 against the head count (trend.png).
# Rerunning it continues an interrupted study: each run resumes from its last checkpoint and
# finished runs are skipped. STUDY_LOGS=DIR puts every run under DIR instead of logs/.
# Records: every finished run's summary.json, config.yaml and metrics.jsonl are copied to
# docs/results/runs/<study>/ (STUDY_RECORDS=DIR) as it lands, to be committed (with each sweep's
# extension plans); on a fresh machine
# they are copied back first, and a finished record stands without its checkpoints (train.py
# skips a run whose record defines the same run), so a study continues across machines.
# STUDY_CACHE=K: the rows that read only the teacher's logits (the logit sweep, logit KD, DeiT
# hard) replay teacher caches of its top-K logits (python -m shd_vision.cache), one per seed,
# written first (STUDY_CACHE_DTYPE, default float32: with K = the 10 classes, exactly the live
# rows); the report's teacher column names those rows.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  fashion_mnist) prefix=fmnist; holdout=5000; study=methods ;;
  fashion_mnist_ratio) prefix=fmnist; holdout=5000; study=ratio ;;
  digits) prefix=digits; holdout=287; study=methods ;;
  *) echo "study.sh: the study is '${1:-}'; give fashion_mnist, fashion_mnist_ratio or digits." >&2; exit 2 ;;
esac
shift
bash scripts/install.sh
py=.venv/bin/python
logs=$(realpath -m "${STUDY_LOGS:-logs}")
root=$logs/${prefix}_study/multiruns
if [ "$prefix" = digits ] && [ ! -f $logs/teachers/vit_digits_teacher/summary.json ]; then
  $py train.py experiment=digits_teacher trainer.resume=auto paths.log_dir=$logs "$@"
fi
records=$(realpath -m "${STUDY_RECORDS:-docs/results/runs/${prefix}_$study}")
source scripts/study_lib.sh  # keep, run, caches, tune, around
keep "$records" "$root"
sweep="seed=0 data.holdout=$holdout"
scope=$([ $study = ratio ] && echo ratio || echo "sweep study")  # where this study's runs go under $root
seeds=seed=0,1,2  # seed-major: a study cut short has as many seeds in every row of a stage
SHD_GRID=("kd.terms.shd.temperature,kd.terms.shd.weight" "kd.terms.shd.temperature=1,2 kd.terms.shd.weight=1,3"
          "kd.terms.shd.temperature,kd.terms.shd.weight")
MINILM_GRID=("kd.terms.minilm.relation_heads,kd.terms.minilm.weight"
             "kd.terms.minilm.relation_heads=4,12 kd.terms.minilm.weight=1,3"
             "kd.terms.minilm.relation_heads:2,kd.terms.minilm.weight")  # a count that must divide the widths
if [ $study = ratio ]; then
  # 3 heads start from the grids above; each later ratio's sweeps start one step either side of the
  # previous ratio's choice (3 x 3 trials), then extend as ever
  G_SHD=${SHD_GRID[1]} G_SELECT=${SHD_GRID[1]} G_MEAN=${SHD_GRID[1]} G_MINILM=${MINILM_GRID[1]}
  for heads in 3 2 1; do  # a finished ratio is reported before the next starts
    H=model.num_heads=$heads sweeps=ratio/sweep/h$heads rows=ratio/study/h$heads
    T=$(tune logit kd.terms.logit.temperature kd.terms.logit.temperature=1,2,4,8 kd.terms.logit.temperature \
      study=logit $H "$@")
    SHD=$(tune shd "${SHD_GRID[0]}" "$G_SHD" "${SHD_GRID[2]}" study=shd_logit $H $T "$@")
    SELECT=$(tune shd_select "${SHD_GRID[0]}" "$G_SELECT" "${SHD_GRID[2]}" study=shd_logit_select $H $T "$@")
    MEAN=$(tune shd_mean "${SHD_GRID[0]}" "$G_MEAN" "${SHD_GRID[2]}" study=shd_logit_mean $H $T "$@")
    MINILM=$(tune minilm "${MINILM_GRID[0]}" "$G_MINILM" "${MINILM_GRID[2]}" study=minilm $H $T "$@")
    G_SHD=$(around "$SHD" "${SHD_GRID[2]}") G_SELECT=$(around "$SELECT" "${SHD_GRID[2]}")
    G_MEAN=$(around "$MEAN" "${SHD_GRID[2]}") G_MINILM=$(around "$MINILM" "${MINILM_GRID[2]}")
    echo "$heads heads, chosen on held-out training images: $T | progressive $SHD | select $SELECT | mean $MEAN |" \
      "$MINILM" | tee $root/$sweeps/chosen.txt
    run $seeds $H study=ce,logit $T run_name=$rows/base "$@"
    run $seeds $H study=minilm $T $MINILM run_name=$rows/minilm "$@"
    run $seeds $H study=shd_logit $T $SHD run_name=$rows/shd_logit "$@"
    run $seeds $H study=shd_logit_select $T $SELECT run_name=$rows/shd_logit_select "$@"
    run $seeds $H study=shd_logit_mean $T $MEAN run_name=$rows/shd_logit_mean "$@"
    $py -m shd_vision.report dir=$root/ratio/study "by=[model.num_heads,kd.name]" \
      "paired=[minilm,shd_logit_select,shd_logit_mean]" x=model.num_heads \
      "x_label='student heads (6-head teacher: head ratio 6, 3, 2)'"
  done
  exit 0
fi
sweeps=sweep
T=$(tune logit kd.terms.logit.temperature kd.terms.logit.temperature=1,2,4,8 kd.terms.logit.temperature \
  study=logit $(caches holdout 0 data.holdout=$holdout "$@") "$@")
SHD=$(tune shd "${SHD_GRID[@]}" study=shd_logit $T "$@")
MINILM=$(tune minilm "${MINILM_GRID[@]}" study=minilm $T "$@")
echo "chosen on held-out training images: $T | $SHD | $MINILM" | tee $root/sweep/chosen.txt
CACHE=$(caches test 0,1,2 "$@")
run $seeds study=ce,logit $T $CACHE run_name=study/base "$@"
run $seeds study=minilm $T $MINILM run_name=study/minilm "$@"
run $seeds study=shd_logit $T $SHD run_name=study/shd_logit "$@"
run $seeds study=deit_hard $T $CACHE run_name=study/deit_hard "$@"
run $seeds study=manifold,fitnet,adkd $T run_name=study/baselines "$@"
run $seeds study=shd_progressive,shd_group,shd_mean,shd_select,shd_mse $T $SHD run_name=study/shd_ablations "$@"
$py -m shd_vision.report dir=$root/study "by=[kd.name]" "paired=[logit,minilm]"
