#!/usr/bin/env bash
# The methods study of docs/results.md on one real data set: train the tiny teacher once (cached),
# then a Hydra multirun of every method (conf/study/) x 3 seeds with equal epochs, then the
# report (results.md, results.csv, curves.png in the multirun directory).
#   bash scripts/study.sh fashion_mnist|digits [train.py overrides for every run]
# Rerunning it continues an interrupted study: each run resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  fashion_mnist) prefix=fmnist ;;
  digits) prefix=digits ;;
  *) echo "study.sh: the data set is '${1:-}'; give fashion_mnist or digits." >&2; exit 2 ;;
esac
shift
bash scripts/install.sh
py=.venv/bin/python
methods=ce,logit,deit_hard,deit_soft,fitnet,shd_progressive,shd_group,shd_mean,adkd,shd_logit
if [ ! -f "logs/teachers/vit_${prefix}_teacher/checkpoints/best.pt" ]; then
  $py train.py experiment=${prefix}_teacher trainer.resume=auto "$@"
fi
$py train.py -m experiment=${prefix}_student seed=0,1,2 study=$methods run_name=study \
  trainer.resume=auto "$@"
$py -m shd_vision.report dir=logs/${prefix}_student/multiruns/study "by=[kd.name]"
