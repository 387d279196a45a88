#!/usr/bin/env bash
# Build the image from the repository's Dockerfile and check that it serves (`make image`; CI runs it from
# tests/integration/test_image.py). The check: start the image's own entry command as the user the image
# declares, wait for /readyz, generate an image, read /metrics, send SIGTERM and see exit status 0 within
# CM_DRAIN_S.
#
# The builder, the first that works here (or CMSERVE_IMAGE_BUILDER=docker|podman|buildah):
#   docker   a running Docker engine: `docker build`, then `docker run -p 127.0.0.1:PORT:8000`
#   podman   `podman build`, then `podman run -p 127.0.0.1:PORT:8000`
#   buildah  no engine, no registry (CI): the base image that FROM names (PYTHON_IMAGE) is made locally
#            with debootstrap from Debian's archive, the Dockerfile is built with `buildah bud --isolation
#            chroot`, and the entry command runs with `buildah run --isolation chroot` on the host's
#            network, listening on 127.0.0.1 only. Needs root and the Debian packages buildah and
#            debootstrap (.ci/install-tools installs them). The base is kept in buildah's store under a
#            tag that names its recipe, and the build's layers are cached, so a rerun takes seconds.
# What a build machine without the usual downloads needs, passed when found and only for the build:
#   PIP_CERT      the CA bundle this machine's pip uses (else pip.conf's cert): given to the pip step as the
#                 build secret pip-cert (mounted for that step alone; never in the image)
#   a torch wheel the CPU wheel of requirements.txt's torch in CMSERVE_TORCH_WHEELS or in pip's
#                 find-links folders: bind-mounted at /mnt (buildah/podman --volume), so the build takes
#                 it instead of downloading torch
# Other settings: CMSERVE_IMAGE (cmserve:cpu), CMSERVE_IMAGE_DRAIN_S (10), CMSERVE_IMAGE_READY_S (300),
# CMSERVE_IMAGE_OUT (a folder for the generated PNG and the service's log), CMSERVE_DEBIAN_MIRROR
# (http://deb.debian.org/debian), CMSERVE_IMAGE_CACHE (/var/cache/cmserve-image: debootstrap's packages).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"  # debootstrap lives in /usr/sbin

IMAGE=${CMSERVE_IMAGE:-cmserve:cpu}
DRAIN_S=${CMSERVE_IMAGE_DRAIN_S:-10}
READY_S=${CMSERVE_IMAGE_READY_S:-300}
OUT=${CMSERVE_IMAGE_OUT:-}
MIRROR=${CMSERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${CMSERVE_IMAGE_CACHE:-/var/cache/cmserve-image}
SUITE=bookworm  # Debian 12: python3.11, as the official python:3.11-slim-bookworm
BASE_PACKAGES=python3.11,python3.11-venv,python3-distutils,ca-certificates  # distutils: a virtual dependency of venv that debootstrap does not resolve
BASE_RECIPE=1  # bump when the base's recipe below changes, so a cached base is rebuilt

say() { echo "image: $*" >&2; }
die() { say "error: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
engine_works() { command -v "$1" >/dev/null 2>&1 && "$1" info >/dev/null 2>&1; }

builder=${CMSERVE_IMAGE_BUILDER:-}
if [ -z "$builder" ]; then
    if engine_works docker; then builder=docker
    elif engine_works podman; then builder=podman
    elif command -v buildah >/dev/null 2>&1; then builder=buildah
    else die "no image builder: install Docker or Podman, or (Debian, as root) buildah and debootstrap"
    fi
fi
case "$builder" in docker | podman | buildah) ;; *) die "CMSERVE_IMAGE_BUILDER=$builder: docker, podman or buildah" ;; esac
command -v "$builder" >/dev/null 2>&1 || die "$builder is not installed"
command -v python3 >/dev/null 2>&1 || die "python3 is needed for the HTTP checks"
if [ "$builder" = buildah ]; then
    [ "$(id -u)" -eq 0 ] || die "the buildah build (debootstrap, chroot isolation) runs as root"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (Debian package debootstrap)"
fi
say "builder: $builder ($("$builder" --version 2>/dev/null | head -n 1))"

# ---------------------------------------------------------------- build inputs (build time only)
build_args=()
pip_setting() {  # a setting of this machine's pip, from its variables or its configuration files
    { python3 -m pip config list 2>/dev/null || true; echo; } |
        sed -n "s/^\(:env:\|global\|install\|download\)\.$1='\(.*\)'\$/\2/p" | head -n 1
}
pip_cert=${PIP_CERT:-$(pip_setting cert)}
if [ -n "$pip_cert" ] && [ -s "$pip_cert" ]; then
    build_args+=(--secret "id=pip-cert,src=$pip_cert")
    say "pip's CA bundle $pip_cert goes to the pip step as the build secret pip-cert"
fi
if [ "$builder" != docker ]; then  # docker build has no --volume; Docker users download torch's CPU wheel
    torch_version=$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' requirements.txt)
    folders=${CMSERVE_TORCH_WHEELS:-"${PIP_FIND_LINKS:-} $(pip_setting find-links)"}
    for folder in $folders; do
        folder=${folder#file://}
        if [ -d "$folder" ] && compgen -G "$folder/torch-${torch_version}+cpu-cp311-cp311-*linux*_$(uname -m).whl" >/dev/null; then
            # /mnt: a folder the base already has, so no empty mount point is left in the image
            build_args+=(--volume "$(cd "$folder" && pwd):/mnt:ro" --build-arg TORCH_WHEELS=/mnt)
            say "torch ${torch_version}+cpu from $folder (bind-mounted at /mnt for the build)"
            break
        fi
    done
fi

# ---------------------------------------------------------------- buildah: the base image, made locally
base_seconds=0
if [ "$builder" = buildah ]; then
    recipe="$SUITE $BASE_PACKAGES $BASE_RECIPE $(uname -m)"
    base_image="localhost/cmserve-base:$SUITE-$(printf '%s' "$recipe" | sha256sum | cut -c1-12)"
    # --format docker: the OCI format has no HEALTHCHECK, and buildah would drop the Dockerfile's
    build_args+=(--build-arg "PYTHON_IMAGE=$base_image" --pull=never --isolation chroot --layers --format docker)
    mkdir -p "$CACHE/debs"
    exec 9>"$CACHE/lock"
    flock 9  # one debootstrap at a time; a second run waits and then finds the base made
    if buildah inspect --type image "$base_image" >/dev/null 2>&1; then
        say "base $base_image: cached"
    else
        say "base $base_image: debootstrap $SUITE ($BASE_PACKAGES) from $MIRROR"
        started=$(now)
        ctr=$(buildah from --pull=never scratch)
        mnt=$(buildah mount "$ctr")
        if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" --cache-dir="$CACHE/debs" \
            "$SUITE" "$mnt" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
            tail -n 30 "$CACHE/debootstrap.log" >&2
            buildah umount "$ctr" >/dev/null; buildah rm "$ctr" >/dev/null
            die "debootstrap failed (log: $CACHE/debootstrap.log)"
        fi
        # Where python:3.11-slim has its interpreter (the Dockerfile's base-cpu stage runs it from there).
        for name in python3.11 python3 python; do ln -sf /usr/bin/python3.11 "$mnt/usr/local/bin/$name"; done
        rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/*.bin "$mnt"/var/cache/apt/archives/*.deb
        buildah umount "$ctr" >/dev/null
        buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
            --cmd python3 --label "io.cmserve.base=debootstrap $recipe" "$ctr"
        buildah commit --quiet --rm "$ctr" "$base_image" >/dev/null
        base_seconds=$(since "$started")
        say "base $base_image: made in ${base_seconds} s"
    fi
    exec 9>&-
fi

# ---------------------------------------------------------------- build
say "building $IMAGE"
started=$(now)
case "$builder" in
    buildah | podman)
        # buildah before 1.29 (Debian 12 has 1.28; Podman builds with it) takes `FROM base-${VARIANT}` for an
        # image, not the stage of that name: the stage is built first under that name, so that it is found.
        "$builder" build ${build_args[@]+"${build_args[@]}"} --target base-cpu -f Dockerfile -t base-cpu . >&2
        "$builder" build ${build_args[@]+"${build_args[@]}"} -f Dockerfile -t "$IMAGE" . >&2 ;;
    docker) docker build ${build_args[@]+"${build_args[@]}"} -f Dockerfile -t "$IMAGE" . >&2 ;;
esac
build_seconds=$(since "$started")
say "built $IMAGE in ${build_seconds} s"

# ---------------------------------------------------------------- run: the image's entry command and user
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=${OUT:-$(mktemp -d)}/service.log
[ -n "$OUT" ] && mkdir -p "$OUT"
name="cmserve-image-check-$$"
run_pid="" ctr="" cid=""
cleanup() {
    if [ -n "$run_pid" ] && kill -0 "$run_pid" 2>/dev/null; then
        for pid in $(descendants "$run_pid") "$run_pid"; do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
    [ -n "$cid" ] && "$builder" rm -f "$cid" >/dev/null 2>&1 || true
}
trap cleanup EXIT
descendants() {  # every process below pid $1
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END { for (p in parent) { q = p; while (q in parent && q != root) q = parent[q]; if (q == root && p != root) print p } }'
}

if [ "$builder" = buildah ]; then
    config=$(buildah inspect --type image "$IMAGE" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]["config"]))')
    user=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get("User", ""))' "$config")
    mapfile -t command < <(python3 -c 'import json, sys; c = json.loads(sys.argv[1])
print("\n".join((c.get("Entrypoint") or []) + (c.get("Cmd") or [])))' "$config")
    [ "${#command[@]}" -gt 0 ] || die "the image declares no ENTRYPOINT or CMD"
else
    user=$("$builder" image inspect --format '{{.Config.User}}' "$IMAGE")
fi
case "${user%%:*}" in "" | 0 | root) die "the image runs as '${user}': it must declare a non-root USER" ;; esac

started=$(now)
if [ "$builder" = buildah ]; then
    say "running ${command[*]} as $user (buildah run --isolation chroot, host network, 127.0.0.1:$port)"
    ctr=$(buildah from --pull=never --name "$name" "$IMAGE")
    mnt=$(buildah mount "$ctr")  # the build's inputs stayed out of the image
    [ ! -e "$mnt/run/secrets/pip-cert" ] && ! compgen -G "$mnt/mnt/*" >/dev/null || die "a build input is in the image"
    buildah umount "$ctr" >/dev/null
    buildah run --isolation chroot --network host --user "$user" \
        --env CM_HOST=127.0.0.1 --env CM_PORT="$port" --env CM_DRAIN_S="$DRAIN_S" \
        "$ctr" -- "${command[@]}" >"$log" 2>&1 &
    run_pid=$!
else
    say "running $IMAGE as $user ($builder run, published on 127.0.0.1:$port)"
    cid=$("$builder" run -d --name "$name" -p "127.0.0.1:$port:8000" -e CM_DRAIN_S="$DRAIN_S" "$IMAGE")
fi

alive() {
    if [ -n "$run_pid" ]; then kill -0 "$run_pid" 2>/dev/null
    else [ "$("$builder" inspect --format '{{.State.Running}}' "$cid" 2>/dev/null)" = true ]; fi
}
fail() {
    [ -n "$cid" ] && "$builder" logs "$cid" >"$log" 2>&1
    tail -n 40 "$log" >&2 || true
    die "$*"
}

# Readiness, one generation, the metrics: Python's standard library, against 127.0.0.1 only.
probe() {
    python3 - "$1" "$port" "${OUT:-}" <<'EOF'
import base64, json, sys, urllib.error, urllib.request
step, port, out = sys.argv[1], sys.argv[2], sys.argv[3]
url = f"http://127.0.0.1:{port}"
if step == "ready":
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            sys.exit(0 if r.status == 200 else 1)
    except (OSError, urllib.error.URLError):
        sys.exit(1)
body = json.dumps({"n": 2, "steps": 2, "seed": 42, "class_label": 7}).encode()
req = urllib.request.Request(url + "/v1/generate", body, {"content-type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    answer = json.load(r)
images = [base64.b64decode(i["b64"]) for i in answer["images"]]
assert len(images) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in images), "two PNG images"
assert [i["seed"] for i in answer["images"]] == [42, 43], answer["images"]
if out:
    with open(f"{out}/generated.png", "wb") as f:
        f.write(images[0])
with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
    metrics = r.read().decode()
def value(prefix):
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))
assert value('cmserve_images_generated_total{model="digits"}') >= 2, "images counted"
assert value('cmserve_requests_total{') >= 1 and value("cmserve_ready ") == 1, "requests counted, ready"
print(f"generated 2 images in {answer['timings_ms']['total']:.0f} ms; /metrics counts them")
EOF
}

until probe ready; do
    alive || fail "the service exited before it was ready"
    [ "$(since "$started" | cut -d. -f1)" -lt "$READY_S" ] || fail "not ready after $READY_S s"
    sleep 1
done
ready_seconds=$(since "$started")
say "ready in ${ready_seconds} s"
probe generate >&2 || fail "generate or /metrics check failed"

# SIGTERM: to the service process itself (as `docker stop` does), then its exit status and time.
started=$(now)
if [ -n "$run_pid" ]; then
    target=""
    for pid in $(descendants "$run_pid"); do  # the command itself, its program found on the image's PATH
        mapfile -d '' -t argv <"/proc/$pid/cmdline" 2>/dev/null || continue
        [ "${#argv[@]}" -eq "${#command[@]}" ] && [ "${argv[0]##*/}" = "${command[0]##*/}" ] || continue
        if [ "${argv[*]:1}" = "${command[*]:1}" ]; then target=$pid; break; fi
    done
    [ -n "$target" ] || fail "no process '${command[*]}' under buildah run"
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$target/status")
    [ "$uid" = "${user%%:*}" ] || fail "the service runs as uid $uid, not the image's $user"
    kill -TERM "$target"
    status=0
    timeout "$((${DRAIN_S%.*} + 5))" tail --pid="$run_pid" -f /dev/null || fail "still running $DRAIN_S s after SIGTERM"
    wait "$run_pid" || status=$?
    run_pid=""
else
    "$builder" stop --time "$((${DRAIN_S%.*} + 5))" "$cid" >/dev/null  # SIGTERM; SIGKILL (status 137) after that
    status=$("$builder" inspect --format '{{.State.ExitCode}}' "$cid")
    "$builder" logs "$cid" >"$log" 2>&1 || true
fi
stop_seconds=$(since "$started")
[ "$status" = 0 ] || fail "exit status $status after SIGTERM"
awk -v s="$stop_seconds" -v d="$DRAIN_S" 'BEGIN { exit !(s <= d) }' || fail "exit took ${stop_seconds} s > CM_DRAIN_S=$DRAIN_S"
say "SIGTERM: exit 0 in ${stop_seconds} s (CM_DRAIN_S=$DRAIN_S)"
echo "image ok: builder=$builder image=$IMAGE base_s=$base_seconds build_s=$build_seconds ready_s=$ready_seconds stop_s=$stop_seconds"
