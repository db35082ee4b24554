#!/usr/bin/env bash
# Build the otelcol-cfk OpenTelemetry Collector distribution from builder-config.yaml
# with the OpenTelemetry Collector Builder (ocb), pinned to the collector release below.
#
# Usage: collector/build.sh [--force | --cached-only]
#
# Result is cached by content: sha256(builder-config.yaml + the recipe number below + Go
# version/platform + ldflags). A second run with unchanged inputs only re-links and prints the
# path (well under a second); --cached-only stops there (exit 3 when nothing is cached).
# The last line printed on stdout is the absolute path of the binary; progress goes to stderr:
# a cold build (~23 min on 2 cores) says every 15 s how many packages it has compiled of how
# many, the time elapsed and an estimate of the time left (collector/progress.sh).
#
# Environment (all optional):
#   CFK_CACHE               cache root            (default ${XDG_CACHE_HOME:-$HOME/.cache}/cfk-otel)
#   CFK_BUILDER_CONFIG      manifest to build     (default <this dir>/builder-config.yaml)
#   CFK_COLLECTOR_BIN_DIR   where otelcol-cfk is linked (default <this dir>/bin)
#   CFK_COLLECTOR_COPY=1    copy the binary into CFK_COLLECTOR_BIN_DIR instead of symlinking
#   CFK_NICE                nice level for the heavy steps (default 15)
#   CFK_KEEP_BUILD=1        keep the temporary build directory (for debugging)
#   CFK_LDFLAGS             ldflags for `go build` (default: the builder's "-s -w", stripped)
#   CFK_PROGRESS_INTERVAL   seconds between progress lines of the compile (default 15)
#   GO                      go executable (default: `go` on PATH, else /usr/local/go/bin/go)
#   GOFLAGS, GOPROXY, GOMODCACHE, GOCACHE, GOTOOLCHAIN are honoured as usual.
set -euo pipefail

# The builder release; must match the collector release every module in the manifest is on.
OCB_VERSION="v0.165.0"
OCB_MODULE="go.opentelemetry.io/collector/cmd/builder"
NAME="otelcol-cfk"
# What the steps below make of a manifest. Bump it whenever a change to this script changes
# the binary (not for messages or progress): the cache is keyed by it, not by this text.
RECIPE=1

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT_PATH="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
MANIFEST="${CFK_BUILDER_CONFIG:-$SCRIPT_DIR/builder-config.yaml}"
CACHE="${CFK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cfk-otel}"
BIN_DIR="${CFK_COLLECTOR_BIN_DIR:-$SCRIPT_DIR/bin}"
NICE_LEVEL="${CFK_NICE:-15}"
FORCE=0
CACHED_ONLY=0

log() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: ERROR: $*" >&2; exit 1; }

for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --cached-only) CACHED_ONLY=1 ;;
    -h|--help) sed -n '2,26p' "$SCRIPT_PATH" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg" ;;
  esac
done

[[ -f "$MANIFEST" ]] || die "manifest not found: $MANIFEST"
MANIFEST="$(cd "$(dirname "$MANIFEST")" && pwd)/$(basename "$MANIFEST")"

if [[ -z "${GO:-}" ]]; then
  if command -v go >/dev/null 2>&1; then GO="$(command -v go)"
  elif [[ -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go
  else die "no Go toolchain found (set GO=/path/to/go)"; fi
fi
export PATH="$(dirname "$GO"):$PATH"   # the builder runs `go` from PATH
export GOWORK=off                        # never pick up a go.work from a parent directory
# Contrib 0.165 needs Go >= 1.26.9; the go command fetches this toolchain from the module proxy.
export GOTOOLCHAIN=go1.27.3

sha256() { sha256sum | cut -d' ' -f1; }

GO_ID="$("$GO" env GOVERSION GOOS GOARCH CGO_ENABLED | tr '\n' ' ')"
HASH="$( { cat "$MANIFEST"; echo "recipe $RECIPE $OCB_VERSION $GO_ID ${CFK_LDFLAGS-default-ldflags}"; } | sha256 )"
HASH="${HASH:0:24}"
OUT_DIR="$CACHE/collector/$HASH"
OUT_BIN="$OUT_DIR/$NAME"

link_into_bin_dir() {
  mkdir -p "$BIN_DIR"
  local tmp="$BIN_DIR/.$NAME.tmp.$$"
  rm -f "$tmp"
  if [[ "${CFK_COLLECTOR_COPY:-0}" == 1 ]]; then
    cp "$OUT_BIN" "$tmp"
  else
    ln -s "$OUT_BIN" "$tmp"
  fi
  mv -Tf "$tmp" "$BIN_DIR/$NAME"     # atomic replace of the link/copy
}

finish() {
  link_into_bin_dir
  echo "$OUT_BIN"
  exit 0
}

# Builds made before RECIPE existed were keyed by this script's whole text (any edit, even
# to a message, meant a cold rebuild). One of them is recipe 1 when its manifest is this one
# and its binary says it was built by this Go, for this platform, with -trimpath and without
# cgo (`go version -m`); it is taken over with hard links, once.
adopt_earlier_build() {
  [[ $RECIPE == 1 && -z "${CFK_LDFLAGS+x}" ]] || return 1
  local dir info goversion goos goarch
  read -r goversion goos goarch _ <<<"$GO_ID"
  for dir in "$CACHE"/collector/*/; do
    dir="${dir%/}"
    [[ -x "$dir/$NAME" && ! -e "$dir/recipe" ]] || continue
    cmp -s "$dir/builder-config.yaml" "$MANIFEST" || continue
    info="$("$GO" version -m "$dir/$NAME" 2>/dev/null)" || continue
    [[ "$(head -n1 <<<"$info")" == *": $goversion" ]] || continue
    for want in "-trimpath=true" "CGO_ENABLED=0" "GOOS=$goos" "GOARCH=$goarch"; do
      grep -qE "^[[:space:]]+build[[:space:]]+$want\$" <<<"$info" || continue 2
    done
    local tmp="$CACHE/collector/.adopt.$$"
    rm -rf "$tmp" && mkdir -p "$tmp"
    cp -l "$dir"/* "$tmp/" 2>/dev/null || cp "$dir"/* "$tmp/"
    echo "$RECIPE (taken over from $(basename "$dir"))" >"$tmp/recipe"
    mv -T "$tmp" "$OUT_DIR" 2>/dev/null || rm -rf "$tmp"   # a concurrent run may have won
    [[ -x "$OUT_BIN" ]] || return 1
    log "cached build $HASH (the same build as $(basename "$dir"), made before build.sh kept a recipe number)"
    return 0
  done
  return 1
}

# ---- fast path: already built with identical inputs ----------------------------------
if [[ $FORCE == 0 && -x "$OUT_BIN" ]]; then
  log "cached build $HASH"
  finish
fi
if [[ $FORCE == 0 ]] && adopt_earlier_build; then
  finish
fi
if [[ $CACHED_ONLY == 1 ]]; then
  log "no cached build $HASH (--cached-only: not building; a cold build takes ~23 min on 2 cores)"
  exit 3
fi

mkdir -p "$CACHE/bin" "$CACHE/collector"

# Serialize concurrent builds (same cache) when flock is available.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/collector/.lock"
  flock 9
  if [[ $FORCE == 0 && -x "$OUT_BIN" ]]; then
    log "cached build $HASH (built by a concurrent run)"
    finish
  fi
fi

# ---- install the pinned builder -----------------------------------------------------
OCB_DIR="$CACHE/bin/ocb-$OCB_VERSION"
OCB="$OCB_DIR/builder"
if [[ ! -x "$OCB" ]]; then
  log "installing $OCB_MODULE@$OCB_VERSION into $OCB_DIR"
  tmp_gobin="$(mktemp -d "$CACHE/bin/.ocb.XXXXXX")"
  GOBIN="$tmp_gobin" nice -n "$NICE_LEVEL" "$GO" install "$OCB_MODULE@$OCB_VERSION"
  rm -rf "$OCB_DIR"
  mv -T "$tmp_gobin" "$OCB_DIR"
fi
[[ "$("$OCB" version 2>&1)" == *"$OCB_VERSION"* ]] || die "$OCB is not $OCB_VERSION"

# ---- read the component modules from the manifest -----------------------------------
# Every uncommented "gomod: <module> <version>" line (receivers, processors, exporters,
# connectors, extensions, providers, converters, telemetry).
mapfile -t GOMODS < <(sed -nE 's/^[[:space:]]*(-[[:space:]]+)?gomod:[[:space:]]*"?([^"#]+)"?.*$/\2/p' "$MANIFEST" \
                      | sed -E 's/[[:space:]]+$//')
(( ${#GOMODS[@]} > 0 )) || die "no gomod entries in $MANIFEST"
MODULE="$(sed -nE 's/^[[:space:]]+module:[[:space:]]*"?([^"#[:space:]]+).*$/\1/p' "$MANIFEST" | head -n1)"
[[ -n "$MODULE" ]] || die "dist.module missing in $MANIFEST"
if grep -qE '^[[:space:]]*(replaces|excludes):' "$MANIFEST"; then
  die "replaces/excludes in the manifest are not supported by build.sh's go.mod step"
fi
grep -qE '^[[:space:]]*output_path:' "$MANIFEST" || die "dist.output_path missing in $MANIFEST"

# ---- build in a temporary directory inside the cache (same filesystem => atomic mv) ---
WORK="$(mktemp -d "$CACHE/collector/.build.XXXXXX")"
cleanup() { if [[ "${CFK_KEEP_BUILD:-0}" != 1 ]]; then rm -rf "$WORK"; else log "kept $WORK"; fi; }
trap cleanup EXIT
SRC="$WORK/src"
sed -E "s#^([[:space:]]*)output_path:.*#\1output_path: $SRC#" "$MANIFEST" > "$WORK/manifest.yaml"

start=$(date +%s)
log "building $NAME ($HASH) in $WORK"

# 1. generate main.go/components.go
"$OCB" --config "$WORK/manifest.yaml" --skip-get-modules --skip-compilation 2>"$WORK/generate.log" \
  || { cat "$WORK/generate.log" >&2; die "source generation failed"; }

# 2. go.mod: same requirements the builder's own template would write.
#    We run `go mod tidy -e` ourselves instead of the builder's strict `go mod tidy`,
#    because tidy also resolves *tests of dependencies*, and one such test-only module
#    (contrib pkg/semconvtest, needed by k8sattributesprocessor's tests) is not served
#    by the module proxy here. The binary never imports it.
(
  cd "$SRC"
  printf 'module %s\n\ngo 1.25\n' "$MODULE" > go.mod
  for spec in "${GOMODS[@]}"; do
    read -r mod ver <<<"$spec"
    [[ -n "${ver:-}" ]] || die "gomod entry without a version: $spec"
    "$GO" mod edit -require="$mod@$ver"
  done
  "$GO" mod edit -require="go.opentelemetry.io/collector/otelcol@$OCB_VERSION"
)
log "resolving modules (go mod tidy -e)"
if ! (cd "$SRC" && nice -n "$NICE_LEVEL" "$GO" mod tidy -e -compat=1.25) >"$WORK/tidy.log" 2>&1; then
  cat "$WORK/tidy.log" >&2; die "go mod tidy failed"
fi
if grep -qE 'not available|403 Forbidden|404 Not Found|410 Gone' "$WORK/tidy.log"; then
  log "note: modules not available (tolerated if only tests need them):"
  grep -oE '[^[:space:]]+@v[^:[:space:]]+: reading' "$WORK/tidy.log" | sed 's/: reading//' | sort -u | sed 's/^/build.sh:   /' >&2
fi

# 3. strict versioning, as the builder does: every component resolved to the pinned minor.
mm() { echo "$1" | sed -E 's/^(v[0-9]+\.[0-9]+).*/\1/'; }
for spec in "${GOMODS[@]}" "go.opentelemetry.io/collector/otelcol $OCB_VERSION"; do
  read -r mod ver <<<"$spec"
  got="$(cd "$SRC" && "$GO" list -m -f '{{.Version}}' "$mod")"
  [[ "$(mm "$got")" == "$(mm "$ver")" ]] || die "$mod resolved to $got, manifest pins $ver (mixed releases)"
done

# 4. compile: the builder's own command (its Compile step: go build -trimpath -o NAME
#    -ldflags="-s -w" -gcflags="", CGO_ENABLED=0), run here rather than by the builder, which
#    holds go's output until the end: `go build -v` names each package as it is compiled, and
#    collector/progress.sh turns that into progress lines.
# shellcheck source=collector/progress.sh
source "$SCRIPT_DIR/progress.sh"
log "compiling (nice -n $NICE_LEVEL)"
export CGO_ENABLED=0
printf '#!/bin/sh\nexec nice -n %q %q "$@"\n' "$NICE_LEVEL" "$GO" >"$WORK/go-nice"
chmod +x "$WORK/go-nice"
if ! GO="$WORK/go-nice" go_build_with_progress "$SRC" "$WORK/compile.log" "$NAME" \
       -trimpath "-ldflags=${CFK_LDFLAGS-"-s -w"}" "-gcflags="; then
  tail -n 100 "$WORK/compile.log" >&2; die "compilation failed (log: $WORK/compile.log, kept with CFK_KEEP_BUILD=1)"
fi
[[ -x "$SRC/$NAME" ]] || die "builder did not produce $SRC/$NAME"

# 5. smoke test, then publish atomically
"$SRC/$NAME" components >"$WORK/components.yaml" || die "built binary failed to run"
mkdir -p "$OUT_DIR"
echo "$RECIPE" >"$OUT_DIR/recipe"
cp "$SRC/go.mod" "$SRC/go.sum" "$WORK/components.yaml" "$OUT_DIR/"
cp "$MANIFEST" "$OUT_DIR/builder-config.yaml"
mv -f "$SRC/$NAME" "$OUT_BIN"   # same filesystem: atomic rename
log "built in $(( $(date +%s) - start ))s: $OUT_BIN ($(du -h "$OUT_BIN" | cut -f1))"
finish
