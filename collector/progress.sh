# Progress of a long `go build`, sourced by collector/build.sh (and by its test, on a tiny
# module). A cold collector build compiles ~2,000 packages in ~20 minutes on 2 cores; this
# says how far it is, every CFK_PROGRESS_INTERVAL seconds (default 15), on stderr:
#
#   build.sh: compiling: 812/1953 packages, 6m12s elapsed, ~8m40s left
#
# The total is what `go list -deps` finds stale for the same flags (packages already in
# GOCACHE are not compiled again and not counted); `go build -v` names each package it
# compiles, one line each. Pure bash in the loop: a few thousand lines cost nothing.

# progress_duration SECONDS -> "1h02m", "6m12s", "42s"
progress_duration() {
  local s=$1
  if (( s >= 3600 )); then printf '%dh%02dm' $((s / 3600)) $((s % 3600 / 60))
  elif (( s >= 60 )); then printf '%dm%02ds' $((s / 60)) $((s % 60))
  else printf '%ds' "$s"; fi
}

# progress_line DONE TOTAL ELAPSED -> one line for the log
progress_line() {
  local done=$1 total=$2 elapsed=$3 line
  if (( total > 0 )); then
    (( done > total )) && total=$done   # go list may miss a package or two: never above 100%
    line="compiling: $done/$total packages, $(progress_duration "$elapsed") elapsed"
    if (( done > 0 && done < total && elapsed > 0 )); then
      line+=", ~$(progress_duration $(( elapsed * (total - done) / done ))) left"
    fi
  else
    line="compiling: $done packages, $(progress_duration "$elapsed") elapsed"
  fi
  printf '%s\n' "$line"
}

# progress_filter TOTAL LOG [INTERVAL]: reads `go build -v` output (stdout and stderr) on
# stdin, appends it to LOG, and prints a progress line on stderr every INTERVAL seconds
# and once at the end.
progress_filter() {
  local total=$1 log=$2 interval=${3:-${CFK_PROGRESS_INTERVAL:-15}}
  local done=0 start=$SECONDS last=$SECONDS line
  while IFS= read -r line; do
    printf '%s\n' "$line" >>"$log"
    # A package path: no spaces, no colon (errors are "file.go:1:2: ...", "# pkg").
    [[ -n "$line" && "$line" != *[[:space:]:#]* ]] || continue
    done=$((done + 1))
    if (( done == total )); then   # the last package: the link comes next, and takes a while
      echo "build.sh: $(progress_line "$done" "$total" $((SECONDS - start))); linking" >&2
    elif (( SECONDS - last >= interval )); then
      last=$SECONDS
      echo "build.sh: $(progress_line "$done" "$total" $((SECONDS - start)))" >&2
    fi
  done
  echo "build.sh: compiled $done packages and linked in $(progress_duration $((SECONDS - start)))" >&2
}

# go_build_with_progress DIR LOG OUTPUT BUILD_FLAGS...: `go build -v -o OUTPUT BUILD_FLAGS .`
# in DIR, its output in LOG, its progress on stderr; returns go build's status. GO is the
# go command (default: go on PATH).
go_build_with_progress() {
  local dir=$1 log=$2 output=$3 total
  shift 3
  # The build's own flags: -trimpath and -gcflags change what is stale.
  total="$(cd "$dir" && "${GO:-go}" list -deps "$@" -f '{{if .Stale}}x{{end}}' . 2>>"$log" | grep -c x)" || total=0
  echo "build.sh: compiling $total packages (the others are in GOCACHE);" \
    "progress every ${CFK_PROGRESS_INTERVAL:-15}s" >&2
  (cd "$dir" && "${GO:-go}" build -v -o "$output" "$@" . 2>&1) | progress_filter "$total" "$log"
  return "${PIPESTATUS[0]}"
}
