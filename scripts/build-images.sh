#!/usr/bin/env bash
# Builds the registry-free workload images, pulling nothing (no registry is reachable):
# `medhive/busybox:1` from Debian's static busybox (skipped when it exists) and
# `medhive/dicom-reader:1`, the demo DICOM reader (images/dicom-reader/build.sh; rebuilt
# when its inputs change). One build at a time: setup and a test may both call this.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 9>"${TMPDIR:-/tmp}/medhive-build-images.lock"
flock 9
bash images/dicom-reader/build.sh

IMAGE=${MEDHIVE_TEST_IMAGE:-medhive/busybox:1}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then exit 0; fi
echo "[setup] building $IMAGE"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/proc" "$root/sys" "$root/dev" "$root/work"
cp /bin/busybox "$root/bin/busybox"
for tool in $("$root/bin/busybox" --list); do
  [ "$tool" = busybox ] || ln -sf busybox "$root/bin/$tool"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
chmod 1777 "$root/tmp"
tar -C "$root" --numeric-owner --owner=0 --group=0 -cf - . \
  | docker import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' - "$IMAGE" >/dev/null
