#!/usr/bin/env bash
# The methods study of docs/results.md on one real data set (experiment=<prefix>_study):
#   1. the teacher (digits: trained once, cached in logs/teachers/; Fashion-MNIST: shipped);
#   2. sweeps on held-out training images (data.holdout, one seed, 4 trials per method): the logit
#      temperature T on logit KD, then SHD's τ and weight on SHD + KD, MiniLMv2's relation heads and
#      weight on MiniLMv2 + KD (both with the chosen T); never on the images the table reports;
#   3. every study row (conf/study/) x 3 seeds with the chosen values, validated on the test images
#      (the comparison SHD must win first: CE, logit KD, MiniLMv2, SHD + KD; then the other
#      baselines; then SHD's ablations);
#   4. the report, with each row paired by seed against logit KD and MiniLMv2.
#   bash scripts/study.sh fashion_mnist|digits [train.py overrides for every run]
# Rerunning it continues an interrupted study: each run resumes from its last checkpoint and
# finished runs are skipped. STUDY_LOGS=DIR puts every run under DIR instead of logs/.
# STUDY_CACHE=K: the rows that read only the teacher's logits (the logit sweep, logit KD, DeiT
# hard) replay teacher caches of its top-K logits (python -m shd_vision.cache), one per seed,
# written first (STUDY_CACHE_DTYPE, default float32: with K = the 10 classes, exactly the live
# rows); the report's teacher column names those rows.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  fashion_mnist) prefix=fmnist; holdout=5000 ;;
  digits) prefix=digits; holdout=287 ;;
  *) echo "study.sh: the data set is '${1:-}'; give fashion_mnist or digits." >&2; exit 2 ;;
esac
shift
bash scripts/install.sh
py=.venv/bin/python
logs=$(realpath -m "${STUDY_LOGS:-logs}")
root=$logs/${prefix}_study/multiruns
if [ "$prefix" = digits ] && [ ! -f $logs/teachers/vit_digits_teacher/summary.json ]; then
  $py train.py experiment=digits_teacher trainer.resume=auto paths.log_dir=$logs "$@"
fi
run() { $py train.py -m experiment=${prefix}_study trainer.resume=auto paths.log_dir=$logs "$@"; }
caches() {  # name, seeds, plan overrides: with STUDY_CACHE, one cache per seed, and the override that reads it
  [ -n "${STUDY_CACHE:-}" ] || return 0
  local name=$1 seeds=$2 dir=$logs/${prefix}_study/caches/k${STUDY_CACHE}_$1; shift 2
  for s in ${seeds//,/ }; do
    $py -m shd_vision.cache experiment=${prefix}_study seed=$s cache.top_k=$STUDY_CACHE \
      cache.dtype=${STUDY_CACHE_DTYPE:-float32} cache.dir=$dir/seed$s cache.resume=auto paths.log_dir=$logs "$@" >&2
  done
  echo "teacher.cache=$dir/seed\${seed}"
}
best() {  # sweep name, then the swept keys: the best trial's overrides
  local name=$1; shift
  $py -m shd_vision.report dir=$root/sweep/$name "by=[$(IFS=,; echo "$*")]" >/dev/null
  cat $root/sweep/$name/best_overrides.txt
}
sweep="seed=0 data.holdout=$holdout"
run $sweep study=logit kd.terms.logit.temperature=1,2,4,8 $(caches holdout 0 data.holdout=$holdout "$@") \
  run_name=sweep/logit "$@"
T=$(best logit kd.terms.logit.temperature)
run $sweep study=shd_logit $T kd.terms.shd.temperature=1,2 kd.terms.shd.weight=1,3 run_name=sweep/shd "$@"
SHD=$(best shd kd.terms.shd.temperature kd.terms.shd.weight)
run $sweep study=minilm $T kd.terms.minilm.relation_heads=4,12 kd.terms.minilm.weight=1,3 run_name=sweep/minilm "$@"
MINILM=$(best minilm kd.terms.minilm.relation_heads kd.terms.minilm.weight)
echo "chosen on held-out training images: $T | $SHD | $MINILM" | tee $root/sweep/chosen.txt
seeds=seed=0,1,2  # seed-major: a study cut short has as many seeds in every row of a stage
CACHE=$(caches test 0,1,2 "$@")
run $seeds study=ce,logit $T $CACHE run_name=study/base "$@"
run $seeds study=minilm $T $MINILM run_name=study/minilm "$@"
run $seeds study=shd_logit $T $SHD run_name=study/shd_logit "$@"
run $seeds study=deit_hard $T $CACHE run_name=study/deit_hard "$@"
run $seeds study=manifold,fitnet,adkd $T run_name=study/baselines "$@"
run $seeds study=shd_progressive,shd_group,shd_mean,shd_select,shd_mse $T $SHD run_name=study/shd_ablations "$@"
$py -m shd_vision.report dir=$root/study "by=[kd.name]" "paired=[logit,minilm]"
