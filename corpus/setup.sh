# Shell helpers sourced by every derivation of closure.nix (builder is /bin/sh,
# i.e. dash on Debian, so this is POSIX sh).  Build tools come from the host.
set -eu
export PATH=/usr/bin:/bin
umask 022
HL=/usr/lib/x86_64-linux-gnu

log() { echo "[$name] $*" >&2; }

# Absolute path of a host file, or empty if absent.
hostfile() {
  for d in "$HL" /lib/x86_64-linux-gnu /usr/lib /lib /usr/bin /bin /usr/sbin /sbin; do
    if [ -e "$d/$1" ]; then echo "$d/$1"; return 0; fi
  done
  return 0
}

binfile() {
  for d in /usr/bin /bin /usr/sbin /sbin; do
    if [ -f "$d/$1" ]; then echo "$d/$1"; return 0; fi
  done
  return 0
}

is_elf() { [ -f "$1" ] && [ ! -L "$1" ] && [ "$(head -c 4 "$1" | tail -c 3)" = "ELF" ]; }

# cplib SONAME... : copy host shared libraries (resolving symlinks) into
# $out/lib, keeping the real file name plus soname and .so dev symlinks.
cplib() {
  mkdir -p "$out/lib"
  for so in "$@"; do
    src=$(hostfile "$so")
    if [ -z "$src" ]; then log "host library $so missing, skipped"; continue; fi
    real=$(readlink -f "$src"); base=$(basename "$real")
    cp "$real" "$out/lib/$base"; chmod 0755 "$out/lib/$base"
    [ "$base" = "$so" ] || ln -sfn "$base" "$out/lib/$so"
    dev=$(echo "$so" | sed 's/\.so\..*$/.so/')
    if [ "$dev" != "$so" ] && [ ! -e "$out/lib/$dev" ]; then ln -s "$so" "$out/lib/$dev"; fi
  done
}

# cpbin DEST SRC... : copy host executables (first existing SRC) to $out/DEST/
cpbin() {
  dest=$1; shift
  mkdir -p "$out/$dest"
  for src in "$@"; do
    case "$src" in /*) ;; *) src=$(binfile "$src");; esac
    if [ -z "$src" ] || [ ! -e "$src" ]; then log "host binary $src missing, skipped"; continue; fi
    cp -L "$src" "$out/$dest/$(basename "$src")"; chmod 0755 "$out/$dest/$(basename "$src")"
  done
}

# cptree SRC DEST [find-args...] : copy a host directory tree (dereferencing
# symlinks that point outside), skipping missing sources.
cptree() {
  src=$1; dst=$2; shift 2
  if [ ! -d "$src" ]; then log "host dir $src missing, skipped"; return 0; fi
  mkdir -p "$dst"
  (cd "$src" && find . "$@" \( -type f -o -type l \) -print) | LC_ALL=C sort | while IFS= read -r f; do
    mkdir -p "$dst/$(dirname "$f")"
    cp -L "$src/$f" "$dst/$f" 2>/dev/null || true
  done
}

# setrpath RPATH FILE|DIR... : set RUNPATH of every dynamic ELF object.
setrpath() {
  rp=$1; shift
  for t in "$@"; do
    find "$t" -type f | LC_ALL=C sort | while IFS= read -r f; do
      is_elf "$f" || continue
      case "$(basename "$f")" in ld-linux*) continue;; esac
      chmod u+w "$f"
      patchelf --set-rpath "$rp" "$f" 2>/dev/null || log "patchelf rpath failed on $f"
    done
  done
}

# patchbins RPATH DIR... : set interpreter (root dep's ld.so) + RUNPATH on
# every ELF executable (objects with a PT_INTERP) under DIR.
patchbins() {
  rp=$1; shift
  for t in "$@"; do
    find "$t" -type f | LC_ALL=C sort | while IFS= read -r f; do
      is_elf "$f" || continue
      chmod u+w "$f"
      if patchelf --print-interpreter "$f" >/dev/null 2>&1; then
        patchelf --set-interpreter "$glibc/lib/ld-linux-x86-64.so.2" --set-rpath "$rp" "$f" \
          || log "patchelf failed on $f"
      else
        patchelf --set-rpath "$rp" "$f" 2>/dev/null || log "patchelf rpath failed on $f"
      fi
    done
  done
}

# patchshebangs DIR... : like nixpkgs' patchShebangs, rewrite interpreters of
# scripts to store paths of the closure's bash / perl / python.
patchshebangs() {
  for t in "$@"; do
    [ -e "$t" ] || continue
    grep -rlI '^#!' "$t" 2>/dev/null | LC_ALL=C sort | while IFS= read -r f; do
      [ -L "$f" ] && continue
      case "$(head -c 2 "$f")" in '#!') ;; *) continue;; esac
      set -- -e '1s|^#! *|#!|'
      if [ -n "${bash:-}" ]; then
        set -- "$@" -e "1s|^#!\(/usr/bin/env \+\)\?\(/usr\)\?\(/bin/\)\?sh\b|#!$bash/bin/sh|" \
                    -e "1s|^#!\(/usr/bin/env \+\)\?\(/usr\)\?\(/bin/\)\?bash\b|#!$bash/bin/bash|"
      fi
      if [ -n "${perl:-}" ]; then
        set -- "$@" -e "1s|^#!\(/usr/bin/env \+\)\?\(/usr\)\?\(/bin/\)\?perl\b|#!$perl/bin/perl|"
      fi
      if [ -n "${python:-}" ]; then
        set -- "$@" -e "1s|^#!\(/usr/bin/env \+\)\?\(/usr\)\?\(/local\)\?\(/bin/\)\?python3\(\.[0-9]*\)\?\b|#!$python/bin/python3|"
      fi
      sed -i "$@" "$f"
    done
  done
}

# wrapprog PROG PATHDIRS : makeWrapper-style wrapper in bash, keeping the real
# program as .PROG-wrapped (this is what nixpkgs does for most applications).
wrapprog() {
  p=$out/bin/$1
  [ -e "$p" ] || return 0
  mv "$p" "$out/bin/.$1-wrapped"
  {
    echo "#! $bash/bin/bash -e"
    echo "export PATH='$2'\${PATH:+':'}\$PATH"
    [ -z "${3:-}" ] || echo "$3"
    echo "exec -a \"\$0\" \"$out/bin/.$1-wrapped\"  \"\$@\""
  } > "$p"
  chmod 0755 "$p"
}

# mkpc NAME VERSION LIBS [REQUIRES] [EXTRA_LIBDIRS] : pkg-config file.
mkpc() {
  mkdir -p "$out/lib/pkgconfig"
  {
    echo "prefix=$out"
    echo "exec_prefix=\${prefix}"
    echo "libdir=\${exec_prefix}/lib"
    echo "includedir=\${prefix}/include"
    echo
    echo "Name: $1"
    echo "Description: $1 library (corpus copy of the host's)"
    echo "Version: $2"
    [ -z "${4:-}" ] || echo "Requires.private: $4"
    echo "Libs: -L\${libdir} $3"
    [ -z "${5:-}" ] || echo "Libs.private: $5"
    echo "Cflags: -I\${includedir}"
  } > "$out/lib/pkgconfig/$1.pc"
}

# cpheaders FILE|DIR... (relative to /usr/include) into $out/include
cpheaders() {
  mkdir -p "$out/include"
  for h in "$@"; do
    if [ -d "/usr/include/$h" ]; then cptree "/usr/include/$h" "$out/include/$h"
    elif [ -e "/usr/include/$h" ]; then mkdir -p "$out/include/$(dirname "$h")"; cp -L "/usr/include/$h" "$out/include/$h"
    elif [ -d "/usr/include/x86_64-linux-gnu/$h" ]; then cptree "/usr/include/x86_64-linux-gnu/$h" "$out/include/$h"
    elif [ -e "/usr/include/x86_64-linux-gnu/$h" ]; then mkdir -p "$out/include/$(dirname "$h")"; cp -L "/usr/include/x86_64-linux-gnu/$h" "$out/include/$h"
    fi
  done
}

# cpdoc PKG... : /usr/share/doc/PKG (copyright, changelogs) into share/doc
cpdoc() {
  for d in "$@"; do cptree "/usr/share/doc/$d" "$out/share/doc/$d"; done
}

# cpman SECTION NAME... : man pages (already gzip -n compressed on Debian)
cpman() {
  s=$1; shift
  mkdir -p "$out/share/man/man$s"
  for m in "$@"; do
    for f in /usr/share/man/man$s/$m.$s*; do [ -e "$f" ] && cp -L "$f" "$out/share/man/man$s/"; done
  done
  return 0
}

finish() {
  mkdir -p "$out/nix-support"
  if [ -n "${deps:-}" ]; then echo "$deps" > "$out/nix-support/propagated-build-inputs"; fi
  # make the tree read-only-ish like the store does anyway; strip no-op
  find "$out" -type d -exec chmod 0755 {} +
}
