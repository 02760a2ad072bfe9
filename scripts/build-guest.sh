#!/usr/bin/env bash
# Builds the tiny guest that VM tests and the VM benchmark boot: the kernel of Debian's
# cloud image (the only download, from the Debian mirror through apt) and an initramfs of
# busybox with tests/guest/init. Usage: build-guest.sh OUTDIR (OUTDIR/vmlinuz and
# OUTDIR/initrd.img). Skips the work when both are newer than their sources.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: build-guest.sh OUTDIR}
say() { printf '\033[1m[guest]\033[0m %s\n' "$*"; }
mkdir -p "$OUT/cache"
if [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ] &&
  [ -z "$(find "$0" tests/guest -newer "$OUT/initrd.img" -print -quit)" ]; then
  say "up to date in $OUT"
  exit 0
fi

# The cloud kernel: the package linux-image-cloud-amd64 points to, kept in OUT/cache.
package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
deb=$(ls "$OUT/cache/${package}_"*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
  cached=$(ls /var/cache/apt/archives/"${package}_"*.deb 2>/dev/null | head -1 || true)
  if [ -n "$cached" ]; then
    cp "$cached" "$OUT/cache/"
  else
    say "downloading $package"
    (cd "$OUT/cache" && { apt-get download -q "$package" || { apt-get update -q && apt-get download -q "$package"; }; })
  fi
  deb=$(ls "$OUT/cache/${package}_"*.deb | head -1)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$deb" "$work/kernel"
version=$(ls "$work/kernel/lib/modules")
cp "$work/kernel/boot/vmlinuz-$version" "$OUT/vmlinuz"

# The initramfs: busybox, the init script and the modules the guest's devices need,
# listed with their dependencies first (busybox insmod loads one file at a time).
root=$work/initramfs
mkdir -p "$root"/{bin,dev,proc,sys,tmp,mnt,etc,lib/modules}
cp /bin/busybox "$root/bin/busybox"
install -m 0755 tests/guest/init "$root/init"
install -m 0755 tests/guest/udhcpc.script "$root/etc/udhcpc.script"
install -m 0755 tests/guest/banner "$root/bin/banner"
moddir=$work/kernel/lib/modules/$version
wanted="virtio_pci virtio_blk virtio_net ata_piix sr_mod isofs vfat nls_cp437 nls_iso8859_1 nls_utf8 button evdev"
# Module name (dashes as underscores) -> file; each module names its dependencies in its
# own `depends=` field (the package ships no modules.dep: its postinst makes that).
declare -A file_of
while read -r path; do
  name=$(basename "$path" .ko); file_of[${name//-/_}]=$path
done < <(find "$moddir" -name '*.ko')
order=()
declare -A added
add() {  # a module after its dependencies
  local name=${1//-/_} deps dep
  [ -n "${file_of[$name]:-}" ] || return 0  # built into the kernel
  [ -z "${added[$name]:-}" ] || return 0
  added[$name]=1
  deps=$(grep -a -o 'depends=[a-z0-9_,-]*' "${file_of[$name]}" | head -1 | cut -d= -f2 | tr , ' ')
  for dep in $deps; do add "$dep"; done
  order+=("${file_of[$name]}")
}
for name in $wanted; do add "$name"; done
for path in "${order[@]}"; do
  cp "$path" "$root/lib/modules/"
  basename "$path" >> "$root/etc/modules-order"
done
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$OUT/initrd.img.tmp"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
say "kernel $version, ${#order[@]} modules, initrd $(du -h "$OUT/initrd.img" | cut -f1) in $OUT"
