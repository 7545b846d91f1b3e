#!/usr/bin/env bash
# The teacher-cache study of docs/results.md: the methods study's logit KD row (experiment=
# <prefix>_study, study=logit, T as chosen by its sweep: STUDY_T, default 2) with a live teacher,
# and the same row replayed from teacher caches of the top-K logits for K = 1, 3 and 10 (float16,
# the cache's default), 3 seeds each; the report pairs every row by seed against the live one.
#   bash scripts/cache_study.sh fashion_mnist|digits [train.py overrides for every run]
# Rerunning it continues: complete caches and finished runs are kept. STUDY_LOGS=DIR as study.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  fashion_mnist) prefix=fmnist ;;
  digits) prefix=digits ;;
  *) echo "cache_study.sh: the data set is '${1:-}'; give fashion_mnist or digits." >&2; exit 2 ;;
esac
shift
bash scripts/install.sh
py=.venv/bin/python
logs=$(realpath -m "${STUDY_LOGS:-logs}")
root=$logs/${prefix}_study/multiruns/cache
row="experiment=${prefix}_study study=logit kd.terms.logit.temperature=${STUDY_T:-2} paths.log_dir=$logs"
for k in 1 3 10; do
  for seed in 0 1 2; do
    $py -m shd_vision.cache $row seed=$seed cache.top_k=$k cache.dir=$logs/${prefix}_study/caches/k$k/seed$seed \
      cache.resume=auto "$@"
  done
done
$py train.py -m $row seed=0,1,2 trainer.resume=auto run_name=cache/live "$@"
for k in 1 3 10; do
  $py train.py -m $row seed=0,1,2 kd.name=logit_cache_k$k "teacher.cache=$logs/${prefix}_study/caches/k$k/seed\${seed}" \
    trainer.resume=auto run_name=cache/k$k "$@"
done
$py -m shd_vision.report dir=$root "by=[kd.name]" "paired=[logit]"
