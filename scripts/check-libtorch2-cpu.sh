#!/usr/bin/env bash
# Builds the addon against libtorch 2.x and runs the whole test suite on it, on the CPU: a Debian trixie root
# (debootstrap) with trixie's libtorch-dev 2.6, Node, cmake and g++ from trixie, this checkout cloned into it,
# `npm ci`, the cmake-js build, `npx vitest run`. Here the addon is built and tested against Debian bookworm's
# libtorch 1.13; users' GPU machines have a PyTorch 2.x, whose code paths (libtorch's fused attention, CPU float16
# kernels, TCPStore's libuv default, other rounding) no other test reaches without a GPU.
#
# Needs root (debootstrap, chroot, mounts) and Debian's archive. The root is kept in $DIFFLORA_LIBTORCH2_ROOT (default
# /var/tmp/difflora-<suite>, outside the checkout, which linters and test runners walk) and reused; the checkout is
# cloned into it afresh each run (the committed state, as CI sees it). DIFFLORA_LIBTORCH2_SUITE=sid runs the suite
# on Debian unstable's newer libtorch instead (2.14.1 on 2026-12-04: C++20); CI uses trixie's, which does not move.
# Exit status: the test run's.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
suite=${DIFFLORA_LIBTORCH2_SUITE:-trixie}
case "$suite" in trixie | sid) ;; *) echo "check-libtorch2-cpu: DIFFLORA_LIBTORCH2_SUITE must be trixie or sid, got '$suite'" >&2; exit 2 ;; esac
given=${DIFFLORA_LIBTORCH2_ROOT:-/var/tmp/difflora-$suite}
# the root is deleted and remade when incomplete: only an absolute path at least three folders deep once resolved
# (.. and links), never /, /var or /var/tmp
case "$given" in /*) ;; *) echo "check-libtorch2-cpu: DIFFLORA_LIBTORCH2_ROOT must be an absolute path, got '$given'" >&2; exit 2 ;; esac
root=$(realpath -m "$given")
case "$root" in /*/*/*) ;; *) echo "check-libtorch2-cpu: DIFFLORA_LIBTORCH2_ROOT '$given' resolves to '$root': it must be three or more folders deep" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "check-libtorch2-cpu: needs root (debootstrap, chroot, mounts)" >&2; exit 1; }

# every mount under the root, deepest first (also ones a killed run left behind: never delete through them)
unmount_all() {
  local m pass
  for pass in 1 2 3; do
    for m in $(findmnt -rn -o TARGET | awk -v r="$root" '$0 == r || index($0, r "/") == 1' | sort -r); do
      umount "$m" 2> /dev/null || umount -l "$m" 2> /dev/null || true
    done
  done
}
trap unmount_all EXIT

if [ ! -x "$root/usr/bin/node" ] || [ ! -f "$root/usr/include/torch/csrc/api/include/torch/version.h" ]; then
  command -v debootstrap > /dev/null || { apt-get update -q > /dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap > /dev/null; }
  echo "check-libtorch2-cpu: making a Debian $suite root in $root"
  unmount_all
  rm -rf --one-file-system "$root" && mkdir -p "$root"
  debootstrap --variant=minbase "$suite" "$root" http://deb.debian.org/debian > "$root.debootstrap.log" 2>&1 ||
    { tail -20 "$root.debootstrap.log" >&2; exit 1; }
fi

unmount_all
# the root a mount point of its own: the tests' `unshare -m --propagation private` (tmpfs mounts for the read-only and
# full-disk cases) cannot change a chroot's propagation otherwise
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"
mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# a proxy's CA (this machine's custom certificates) for npm inside the root too
if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates" && cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi

in_root() { chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin TERM=dumb CI=true \
  NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt bash -c "$1"; }
if [ ! -x "$root/usr/bin/node" ] || [ ! -f "$root/usr/include/torch/csrc/api/include/torch/version.h" ]; then
  echo "check-libtorch2-cpu: installing libtorch-dev, Node, cmake and g++ from $suite"
  # (Check-Valid-Until off: a mirror of a moving suite can serve a Release file past its validity date)
  in_root 'apt-get -o Acquire::Check-Valid-Until=false update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    nodejs npm cmake g++ make python3 libtorch-dev libopenblas0-pthread libgloo-dev ca-certificates git' > "$root.apt.log" 2>&1 ||
    { tail -20 "$root.apt.log" >&2; exit 1; }
fi
in_root 'update-ca-certificates > /dev/null 2>&1 || true'

rm -rf "$root/root/difflora"
git clone -q "$repo" "$root/root/difflora"
echo "check-libtorch2-cpu: $(in_root 'node --version; g++ --version | head -1' | paste -sd' ' -), libtorch $(LIBTORCH=$root/usr node scripts/torch-paths.cjs version)"
in_root 'cd /root/difflora && npm config set cafile /etc/ssl/certs/ca-certificates.crt > /dev/null &&
  npm ci --no-audit --no-fund > /tmp/npm-ci.log 2>&1 || { tail -20 /tmp/npm-ci.log; exit 1; }
  npm run build:native > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
  npm run build:ts > /dev/null
  npx vitest run'
