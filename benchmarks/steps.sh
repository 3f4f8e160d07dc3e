# Shared by the GPU scripts (source it): step NAME SECONDS CMD... runs CMD with a time limit, logs to
# $OUT/NAME.log, prints its tail and records rc and seconds in $OUT/steps.txt; a failed step does not stop the rest.
step() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
}
