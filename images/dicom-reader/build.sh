#!/usr/bin/env bash
# Builds `medhive/dicom-reader:1` (dicom_reader.py, the newcomer's demo job) without
# pulling anything: a root filesystem of the host's Debian python3.11 (the binary, the
# libraries it links, the standard library without tests, IDLE, pip and the rest no job
# runs), pure-Python pydicom from the project's virtualenv and the reader, imported with
# `docker import`. The image carries the hash of all that as a label: the build is
# skipped while it matches, and redone when the reader, this recipe, the interpreter or
# a library it loads, or pydicom's version change.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
IMAGE=${MEDHIVE_READER_IMAGE:-medhive/dicom-reader:1}
VENV=${MEDHIVE_VENV:-$here/../../.venv}
PYTHON=/usr/bin/python3.11
STDLIB=/usr/lib/python3.11
SITE=/usr/lib/python3/dist-packages  # where Debian's python3.11 looks for packages
# Parts of the standard library the reader never uses: the tests, the configuration for
# building extensions, the tools (IDLE, pip, venv, 2to3, distutils, pydoc), and packages
# whose C half is left out below or that a one-shot reader has no use for.
DROP=(test idlelib tkinter turtledemo turtle.py ensurepip venv lib2to3 distutils pydoc_data
  pydoc.py config-3.11-x86_64-linux-gnu unittest sqlite3 curses ctypes asyncio
  multiprocessing concurrent xmlrpc wsgiref _pydecimal.py EXTERNALLY-MANAGED
  '*.opt-[12].pyc' sitecustomize.py)  # the last: a link to the host's /etc
# pydicom's place and version, from its metadata (importing it would take longer).
read -r pydicom version < <("$VENV/bin/python" -c 'import importlib.metadata as m, importlib.util as u
print(u.find_spec("pydicom").submodule_search_locations[0], m.version("pydicom"))' 2>/dev/null) || {
  echo "[setup] cannot build $IMAGE: no pydicom in $VENV (scripts/setup.sh installs it)" >&2
  exit 1
}
# The libraries the interpreter links, plus OpenSSL's libcrypto: hashlib's SHA-256 runs
# at ~1.4 GB/s through it here, ~0.25 GB/s without.
needs() { ldd "$@" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $2 ~ /^\(0x/ {print $1}' | sort -u; }
libs=$(needs "$PYTHON" "$STDLIB/lib-dynload/_hashlib".*.so)
inputs=$( {
  cat "$here/build.sh" "$here/dicom_reader.py"
  sha256sum "$PYTHON" $libs
  dpkg-query -W -f='${Package} ${Version}\n' libpython3.11-minimal libpython3.11-stdlib
  echo "pydicom $version"
} | sha256sum | cut -c1-16)
have=$(docker image inspect -f '{{index .Config.Labels "medhive.inputs"}}' "$IMAGE" 2>/dev/null || true)
[ "$have" = "$inputs" ] && exit 0

echo "[setup] building $IMAGE (inputs $inputs)"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/usr/local/bin" "$root/usr/lib" "$root/etc" "$root/tmp" "$root$SITE"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"

cp "$PYTHON" "$root/usr/bin/python3.11"
ln -s python3.11 "$root/usr/bin/python3"
tar -C "${STDLIB%/*}" "${DROP[@]/#/--exclude=}" -cf - "${STDLIB##*/}" | tar -C "$root/usr/lib" -xf -
# pydicom's compiled files belong to the virtualenv's Python; they are made anew below.
tar -C "${pydicom%/*}" --exclude=__pycache__ --exclude=sr --exclude=data/test_files \
  --exclude=data/charset_files -cf - pydicom "pydicom-$version.dist-info" | tar -C "$root$SITE" -xf -
install -m 0755 "$here/dicom_reader.py" "$root/usr/local/bin/dicom-reader"

# The libraries above, where the loader looks for them. An extension module that needs
# any other (ssl, sqlite, curses, readline, ...) is left out, and so are the test modules.
for lib in $libs; do
  mkdir -p "$root${lib%/*}"
  cp -L "$lib" "$root$lib"
done
for module in "$root$STDLIB"/lib-dynload/*.so; do
  case ${module##*/} in _test* | _xx* | xx* | _ctypes_test*) rm "$module"; continue ;; esac
  [ -z "$(comm -23 <(needs "$module") <(echo "$libs"))" ] || rm "$module"
done
# Compiled once here: the root file system is read-only when a job runs.
"$PYTHON" -m compileall -q -j0 --invalidation-mode unchecked-hash -s "$root" -p / "$root$SITE"

old=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
tar -C "$root" --numeric-owner --owner=0 --group=0 -cf - . | docker import \
  -c 'ENV PATH=/usr/local/bin:/usr/bin' -c 'ENV PYTHONDONTWRITEBYTECODE=1' \
  -c 'USER 65534:65534' -c 'CMD ["dicom-reader", "/data/study", "/outputs"]' \
  -c "LABEL medhive.inputs=$inputs" - "$IMAGE" >/dev/null
# The image this one replaces, unless a container still uses it.
[ -z "$old" ] || docker image rm "$old" >/dev/null 2>&1 || true
