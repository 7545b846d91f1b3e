# The functions of scripts/study.sh, sourced by it (and by tests/test_study.py with a stand-in
# for train.py). They read study.sh's globals: py, logs, root, records, prefix, sweep, sweeps, scope.
shopt -s inherit_errexit  # a run that fails inside $(tune ...) stops the study instead of being skipped
keep() {  # from $1 to $2: the record of every finished run that $2 lacks
  [ -d "$1" ] || return 0
  (cd "$1" && grep -rl --include=summary.json '"status": "finished"' . || true) | while read -r f; do
    d=$(dirname "$f")
    [ -f "$2/$d/summary.json" ] && continue
    mkdir -p "$2/$d" && for k in config.yaml metrics.jsonl summary.json; do  # the summary last: the record is whole
      [ ! -f "$1/$d/$k" ] || cp "$1/$d/$k" "$2/$d/$k"; done
  done
}
run() {  # one multirun; the records of its finished runs are kept even when a later one fails
  local rc=0 a name=?
  for a; do case $a in run_name=*) name=${a#run_name=} ;; esac; done
  echo "[study $(date '+%F %T'), $((SECONDS / 3600)):$(printf %02d $((SECONDS / 60 % 60))) in] $(finished) run(s)" \
    "of this study finished; next: $name" >&2
  $py train.py -m experiment=${prefix}_study trainer.resume=auto paths.log_dir=$logs "$@" || rc=$?
  keep "$root" "$records"
  return $rc
}
finished() {  # how many of this study's runs have finished (the records copied back count)
  (cd "$root" 2>/dev/null && grep -rl --include=summary.json '"status": "finished"' ${scope:-.} 2>/dev/null || true) | wc -l
}
caches() {  # name, seeds, plan overrides: with STUDY_CACHE, one cache per seed, and the override that reads it
  [ -n "${STUDY_CACHE:-}" ] || return 0
  local name=$1 seeds=$2 dir=$logs/${prefix}_study/caches/k${STUDY_CACHE}_$1; shift 2
  for s in ${seeds//,/ }; do
    $py -m shd_vision.cache experiment=${prefix}_study seed=$s cache.top_k=$STUDY_CACHE \
      cache.dtype=${STUDY_CACHE_DTYPE:-float32} cache.dir=$dir/seed$s cache.resume=auto paths.log_dir=$logs "$@" >&2
  done
  echo "teacher.cache=$dir/seed\${seed}"
}
round() {  # tune's round r: every sweep line of its plan, one multirun each (tune's locals)
  local i=0 more
  while read -r -u 3 more; do run $sweep $more "$@" run_name=$sweeps/$name/r$r-$i >&2; i=$((i + 1)); done 3< $plans/r$r.txt
}
tune() {  # sweep name, swept keys (k1,k2), their grid ("k1=a,b k2=c,d"), the keys it may extend, fixed overrides...
  # The grid on held-out images; while a chosen value of an extendable key lies at an end of the
  # values tried, the points one step past it (x3 above, /3 below: report.py's extend.txt) run
  # too (key:2: x2 and /2), up to STUDY_EXTEND rounds (default 3). Each round's plan goes to the
  # records first (rN.txt), so a resumed sweep finishes an interrupted round as it was planned
  # before it plans the next. Prints the best trial's overrides.
  local name=$1 keys=$2 grid=$3 extend=$4 dir=$root/$sweeps/$1 plans=$records/$sweeps/$1 r=0 d edges; shift 4
  run $sweep $grid "$@" run_name=$sweeps/$name/r0 >&2
  for d in $dir/r*-* $plans/r*.txt; do  # the rounds already begun (run directories rN-i, plans rN.txt)
    [ -e "$d" ] || continue; d=${d##*/r}; d=${d%%[-.]*}; [ "$d" -le $r ] || r=$d
  done
  [ ! -f $plans/r$r.txt ] || round "$@"
  while :; do  # the report's warnings reach the log; its failure ends the study (never a stale choice)
    $py -m shd_vision.report dir=$dir "by=[$keys]" "extend=[$extend]" >/dev/null
    [ -s $dir/extend.txt ] && [ $r -lt "${STUDY_EXTEND:-3}" ] || break
    r=$((r + 1)); mkdir -p $plans && cp $dir/extend.txt $plans/r$r.txt && round "$@"
  done
  edges=$(grep -o "EDGE: .*" $dir/results.md || true)
  if [ -s $dir/extend.txt ]; then edges="stopped at the cap, still on an edge: $edges"; fi  # a step was left to run
  echo "sweep $name, $r extension round(s) (cap STUDY_EXTEND=${STUDY_EXTEND:-3}): ${edges:-every chosen value is interior}" \
    | tee -a $root/$sweeps/edges.txt >&2
  cat $dir/best_overrides.txt
}
around() {  # a choice "k=v ..." and the extendable keys -> the grid one step either side of it
  $py -c 'import sys; from shd_vision.report import around; print(around(sys.argv[1], sys.argv[2].split(",")))' "$1" "$2"
}
