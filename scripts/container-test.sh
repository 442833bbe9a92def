#!/usr/bin/env bash
# Build the bids_ctp Docker image and run the phantom demo in it the way users do: read-only
# root filesystem, read-only input mount, a non-root uid that has no account in the image; then
# check the derivatives (every map of every participant, owned by that uid, input unchanged).
#
#   scripts/container-test.sh            (or: make container-test)
#
# Environment:
#   IMAGE       image tag to build/test (default bids/ctp:<version>)
#   SKIP_BUILD  1 = test an existing image (CircleCI loads the one built by its build job)
#   OUT_DIR     where the phantom, derivatives and logs go (default /tmp/bids_ctp-container-test)
#   RUN_UID     uid:gid to run as (default: yours; 4242:4242 when you are root)
#   TOOLS       folder of the shared dev tools (default ../shared/tools): docker-up starts a Docker
#               daemon if none answers, local-base-image provides debian:bookworm-slim where no
#               registry is reachable
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf 'container-test: %s\n' "$*"; }
die() { printf 'container-test: ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' bids_ctp/__init__.py)
IMAGE=${IMAGE:-bids/ctp:$VERSION}
OUT_DIR=${OUT_DIR:-/tmp/bids_ctp-container-test}
TOOLS=${TOOLS:-../shared/tools}
if [ -z "${RUN_UID:-}" ]; then
    if [ "$(id -u)" = 0 ]; then RUN_UID=4242:4242; else RUN_UID="$(id -u):$(id -g)"; fi
fi
uid=${RUN_UID%%:*}
[ "$uid" != 0 ] || die "RUN_UID must not be root"
t_all=$(now)

# --- Docker daemon -------------------------------------------------------------------------
if ! docker info > /dev/null 2>&1; then
    [ -f "$TOOLS/docker-up" ] || die "no Docker daemon answers and $TOOLS/docker-up is not there"
    say "starting Docker with $TOOLS/docker-up"
    bash "$TOOLS/docker-up"
fi

# --- build -----------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    base=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' Dockerfile | head -1)
    if ! docker image inspect "$base" > /dev/null 2>&1 && ! docker pull "$base" > /dev/null 2>&1; then
        [ -f "$TOOLS/local-base-image" ] || die "cannot pull $base and $TOOLS/local-base-image is not there"
        say "no registry reachable: local stand-in for $base from $TOOLS/local-base-image"
        bash "$TOOLS/local-base-image" "$base"
    fi
    t=$(now)
    docker build --build-arg VERSION="$VERSION" -t "$IMAGE" . > /tmp/bids_ctp-docker-build.log 2>&1 \
        || { tail -30 /tmp/bids_ctp-docker-build.log >&2; die "docker build failed (log /tmp/bids_ctp-docker-build.log)"; }
    say "built $IMAGE in $(since "$t") s"
fi
docker image inspect "$IMAGE" > /dev/null 2>&1 || die "no image $IMAGE"
size=$(docker image inspect "$IMAGE" --format '{{.Size}}')
say "image $IMAGE: $((size / 1000000)) MB"
[ "$size" -lt 1000000000 ] || die "image is larger than 1 GB"
[ "$(docker image inspect "$IMAGE" --format '{{.Config.User}}')" != "" ] || die "image runs as root"

# --- phantom -------------------------------------------------------------------------------
rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR/bids" "$OUT_DIR/derivatives" "$OUT_DIR/logs"
[ "$(id -u)" = 0 ] && chown "$RUN_UID" "$OUT_DIR/bids" "$OUT_DIR/derivatives"
run=(docker run --rm --read-only --tmpfs /tmp -u "$RUN_UID")
t=$(now)
"${run[@]}" -v "$OUT_DIR/bids:/bids" --entrypoint bids_ctp-phantom "$IMAGE" /bids --seed 1 --subjects 2 \
    > "$OUT_DIR/logs/phantom.log" 2>&1 || { cat "$OUT_DIR/logs/phantom.log" >&2; die "phantom failed"; }
say "phantom (2 participants) written in the container in $(since "$t") s"
chmod -R a-w "$OUT_DIR/bids"
before=$(cd "$OUT_DIR/bids" && find . -type f -exec md5sum {} + | sort | md5sum)

# --- the demo, as documented in the README ---------------------------------------------------
[ "$("${run[@]}" "$IMAGE" --version)" = "bids_ctp $VERSION" ] || die "--version does not print $VERSION"
t=$(now)
"${run[@]}" -v "$OUT_DIR/bids:/data:ro" -v "$OUT_DIR/derivatives:/out" "$IMAGE" \
    /data /out participant --participant-label 01 02 -v > "$OUT_DIR/logs/bids_ctp.log" 2>&1 \
    || { tail -30 "$OUT_DIR/logs/bids_ctp.log" >&2; die "bids_ctp failed in the container"; }
say "participant level (2 participants) in the container in $(since "$t") s"

# --- checks ----------------------------------------------------------------------------------
after=$(cd "$OUT_DIR/bids" && find . -type f -exec md5sum {} + | sort | md5sum)
[ "$before" = "$after" ] || die "the input dataset changed"
missing=0
for sub in sub-01 sub-02; do
    for f in desc-nlr_cbf.nii.gz desc-nlr_cbv.nii.gz desc-nlr_mtt.nii.gz desc-nlr_tmax.nii.gz \
             desc-nlr_ttp.nii.gz desc-nlr_cbf.json desc-brain_mask.nii.gz desc-nlr_aif.tsv \
             desc-nlr_vof.tsv desc-motion_timeseries.tsv; do
        p="$OUT_DIR/derivatives/$sub/perf/${sub}_$f"
        [ -s "$p" ] || { echo "missing: $p" >&2; missing=1; }
    done
done
[ -s "$OUT_DIR/derivatives/dataset_description.json" ] || { echo "missing dataset_description.json" >&2; missing=1; }
[ "$missing" = 0 ] || die "derivatives are missing"
foreign=$(find "$OUT_DIR/derivatives" -mindepth 1 ! -uid "$uid" | head -5)
[ -z "$foreign" ] || die "files not owned by uid $uid: $foreign"
n=$(find "$OUT_DIR/derivatives" -type f | wc -l)
say "OK: $n files in $OUT_DIR/derivatives, all owned by uid $uid; input untouched; total $(since "$t_all") s"
