# A synthetic but realistic "slice of nixpkgs" built from the host's real
# files, without nixpkgs: every derivation is a plain builtins.derivation with
# builder /bin/sh and host tools (cp, sed, patchelf).  Needs sandbox = false.
#
#   nix-build corpus/closure.nix --arg generation 2 --argstr scale small
#
# * `glibc` is the root dependency; its output contains `generation`, so
#   bumping `generation` changes its store path and therefore every store path
#   downstream (all ELF RUNPATHs / interpreters, shebangs, wrappers, .pc files,
#   config files embed it) -- exactly like a nixpkgs mass rebuild.
# * Real upgrades on top of the rename:
#     generation >= 3 : git 2.39.5 (Debian) -> 2.47.3 (/usr/local), if present
#     generation >= 4 : python 3.11.2 (Debian) -> 3.11.7 (pyenv), if present
#     generation >= 5 : sqlite gets a "security patch" (modified files)
#     generation >= 6 : the root is renamed glibc-2.36 -> glibc-2.40 (a mass rebuild
#                       that changes the root dependency's name, not only its hash, as
#                       a glibc version bump does)
#     generation >= 7 : renamed again, glibc-2.40 -> glibc-2.40.1: the name's length
#                       changes too (ELF files then change beyond the reference: patchelf
#                       lays out a longer RUNPATH differently)
# * scale = "small": ~30 MB of NARs, builds in well under a minute.
#   scale = "large": ~300+ MB (adds gcc's cc1/cc1plus, LLVM, ICU, full perl and
#   python stdlibs, vim runtime, glibc gconv/headers/locales ...).
{ generation ? 1, scale ? "small" }:

assert builtins.elem scale [ "small" "large" ];

let
  large = scale == "large";
  gen = generation;
  inherit (builtins) concatStringsSep map filter pathExists;

  setup = ./setup.sh;

  # host-dependent upgrades (fall back gracefully on machines without them)
  haveNewGit = pathExists /usr/local/bin/git && pathExists /usr/local/libexec/git-core;
  pyenv = "/root/.pyenv/versions/3.11.7";
  haveNewPy = pathExists (/. + "${pyenv}/lib/libpython3.11.so.1.0")
    && pathExists (/. + "${pyenv}/lib/python3.11/os.py");

  libdirs = ds: concatStringsSep ":" (map (d: "${d}/lib") ds);

  mk = { pname, version, deps ? [ ], script, env ? { } }:
    builtins.derivation ({
      name = "${pname}-${version}";
      inherit pname version scale deps;
      system = "x86_64-linux";
      builder = "/bin/sh";
      args = [ "-c" ". ${setup}\nmkdir -p $out\n${script}\nfinish\n" ];
      # host tool paths for the helpers (patchshebangs / wrapprog)
      bash = "";
      perl = "";
      python = "";
      glibc = "";
      allowSubstitutes = false;
      preferLocalBuild = true;
    } // env);

  # ------------------------------------------------------------------ root
  glibc = mk {
    pname = "glibc";
    version = if gen >= 7 then "2.40.1" else if gen >= 6 then "2.40" else "2.36";
    script = ''
      cplib ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libmvec.so.1 libpthread.so.0 \
            libdl.so.2 librt.so.1 libresolv.so.2 libutil.so.1 libnss_files.so.2 \
            libnss_dns.so.2 libanl.so.1 libBrokenLocale.so.1 libthread_db.so.1 \
            libc_malloc_debug.so.0
      # glibc's own RUNPATH points at itself (self-reference, like nixpkgs)
      setrpath "$out/lib" "$out/lib"
      # the linker script libc.so refers to the store path too (replaces the dev symlink)
      rm -f "$out/lib/libc.so"
      sed -e "s|/usr/lib/x86_64-linux-gnu/|$out/lib/|g; s|/lib/x86_64-linux-gnu/|$out/lib/|g; s|/lib64/|$out/lib/|g" \
        "$HL/libc.so" > "$out/lib/libc.so" 2>/dev/null || true
      cpbin bin iconv getconf getent locale localedef ldd
      sed -i "s|^RTLDLIST=.*|RTLDLIST=\"$out/lib/ld-linux-x86-64.so.2\"|" "$out/bin/ldd" || true
      glibc=$out patchbins "$out/lib" "$out/bin"
      mkdir -p "$out/share/corpus" "$out/etc"
      printf 'generation=%s\nscale=%s\n' "${toString gen}" "$scale" > "$out/share/corpus/generation"
      echo "$out/lib" > "$out/etc/ld.so.conf"
      cpheaders stdio.h stdlib.h string.h unistd.h errno.h fcntl.h signal.h pthread.h \
                features.h limits.h stdint.h time.h dlfcn.h
      cpdoc libc6
      ${if large then ''
        cptree "$HL/gconv" "$out/lib/gconv"
        setrpath "$out/lib" "$out/lib/gconv"
        cpheaders sys bits gnu net netinet arpa linux asm asm-generic
        cptree /usr/share/zoneinfo "$out/share/zoneinfo"
      '' else ""}
    '';
  };

  # -------------------------------------------------------------- libraries
  lib = { pname, version, sonames, deps ? [ ], headers ? [ ], pc ? null, extra ? "", doc ? [ ] }:
    mk {
      inherit pname version;
      deps = [ glibc ] ++ deps;
      script = ''
        cplib ${concatStringsSep " " sonames}
        setrpath "${libdirs ([ "$out" ] ++ deps ++ [ glibc ])}" "$out/lib"
        ${if headers != [ ] then "cpheaders ${concatStringsSep " " headers}" else ""}
        ${if pc != null then pc else ""}
        ${if doc != [ ] then "cpdoc ${concatStringsSep " " doc}" else ""}
        ${extra}
      '';
      env = { glibc = glibc; };
    };

  zlib = lib {
    pname = "zlib"; version = "1.2.13"; sonames = [ "libz.so.1" ];
    headers = [ "zlib.h" "zconf.h" ]; pc = ''mkpc zlib 1.2.13 "-lz"''; doc = [ "zlib1g" ];
  };
  bzip2 = lib {
    pname = "bzip2"; version = "1.0.8"; sonames = [ "libbz2.so.1.0" ];
    headers = [ "bzlib.h" ]; pc = ''mkpc bzip2 1.0.8 "-lbz2"'';
  };
  xz = lib {
    pname = "xz"; version = "5.4.1"; sonames = [ "liblzma.so.5" ];
    headers = [ "lzma.h" "lzma" ]; pc = ''mkpc liblzma 5.4.1 "-llzma" "" "-pthread"'';
    extra = ''
      cpbin bin xz xzdiff xzgrep xzless xzmore
      patchbins "$out/lib:${glibc}/lib" "$out/bin"
      for l in unxz xzcat; do ln -s xz "$out/bin/$l"; done
      cpman 1 xz xzdiff xzgrep
    '';
  };
  zstd = lib {
    pname = "zstd"; version = "1.5.4"; sonames = [ "libzstd.so.1" ];
    headers = [ "zstd.h" "zdict.h" "zstd_errors.h" ]; pc = ''mkpc libzstd 1.5.4 "-lzstd"'';
  };
  libxcrypt = lib { pname = "libxcrypt"; version = "4.4.33"; sonames = [ "libcrypt.so.1" ]; headers = [ "crypt.h" ]; };
  gcclib = lib {
    pname = "gcc-lib"; version = "12.2.0";
    sonames = [ "libstdc++.so.6" "libgcc_s.so.1" ]
      ++ (if large then [ "libgomp.so.1" "libatomic.so.1" "libquadmath.so.0" "libitm.so.1" ] else [ ]);
  };
  acl = lib {
    pname = "acl"; version = "2.3.1"; sonames = [ "libacl.so.1" "libattr.so.1" ];
    headers = [ "sys/acl.h" "acl/libacl.h" ];
  };
  pcre2 = lib {
    pname = "pcre2"; version = "10.42"; sonames = [ "libpcre2-8.so.0" ];
    headers = [ "pcre2.h" ]; pc = ''mkpc libpcre2-8 10.42 "-lpcre2-8"'';
  };
  expat = lib {
    pname = "expat"; version = "2.5.0"; sonames = [ "libexpat.so.1" ];
    headers = [ "expat.h" "expat_external.h" ]; pc = ''mkpc expat 2.5.0 "-lexpat"'';
  };
  libffi = lib {
    pname = "libffi"; version = "3.4.4"; sonames = [ "libffi.so.8" ];
    headers = [ "ffi.h" "ffitarget.h" ]; pc = ''mkpc libffi 3.4.4 "-lffi"'';
  };
  ncurses = lib {
    pname = "ncurses"; version = "6.4";
    sonames = [ "libncursesw.so.6" "libtinfo.so.6" "libformw.so.6" "libmenuw.so.6" "libpanelw.so.6" ];
    headers = [ "curses.h" "ncurses.h" "term.h" "termcap.h" "unctrl.h" "ncurses_dll.h" ];
    pc = ''mkpc ncursesw 6.4 "-lncursesw -ltinfo"'';
    extra = ''
      cptree /usr/share/terminfo "$out/share/terminfo"
      cptree /lib/terminfo "$out/share/terminfo"
    '';
  };
  readline = lib {
    pname = "readline"; version = "8.2"; sonames = [ "libreadline.so.8" "libhistory.so.8" ];
    deps = [ ncurses ]; headers = [ "readline" ];
    pc = ''mkpc readline 8.2 "-lreadline" "ncursesw"'';
  };
  openssl = lib {
    pname = "openssl"; version = "3.0.15"; sonames = [ "libssl.so.3" "libcrypto.so.3" ];
    deps = [ zlib ]; headers = if large then [ "openssl" ] else [ "openssl/ssl.h" "openssl/crypto.h" "openssl/opensslv.h" ];
    pc = ''
      mkpc libcrypto 3.0.15 "-lcrypto" "" "-ldl -pthread"
      mkpc libssl 3.0.15 "-lssl" "libcrypto"
      mkpc openssl 3.0.15 "" "libssl libcrypto"
    '';
    extra = ''
      ${if large then ''
        cptree "$HL/engines-3" "$out/lib/engines-3"
        cptree "$HL/ossl-modules" "$out/lib/ossl-modules"
        setrpath "$out/lib:${glibc}/lib" "$out/lib/engines-3" "$out/lib/ossl-modules"
      '' else ""}
      mkdir -p "$out/etc/ssl"
      sed "s|^dir\s*=.*|dir = $out/etc/ssl|" /etc/ssl/openssl.cnf > "$out/etc/ssl/openssl.cnf" || true
      ${if large then "cpbin bin openssl" else ""}
      mkdir -p "$out/bin"
      patchbins "$out/lib:${zlib}/lib:${glibc}/lib" "$out/bin"
      cpman 1 openssl
    '';
  };
  sqlite = lib {
    pname = "sqlite"; version = if gen >= 5 then "3.40.1-p1" else "3.40.1";
    sonames = [ "libsqlite3.so.0" ]; deps = [ zlib readline ncurses ];
    headers = [ "sqlite3.h" "sqlite3ext.h" ]; pc = ''mkpc sqlite3 3.40.1 "-lsqlite3" "" "-lm -ldl -lz -lpthread"'';
    extra = ''
      cpbin bin sqlite3
      patchbins "$out/lib:${readline}/lib:${zlib}/lib:${ncurses}/lib:${glibc}/lib" "$out/bin"
      cpman 1 sqlite3
      ${if gen >= 5 then ''
        # "security patch": tweak a few bytes in the middle of the library
        chmod u+w "$out/lib/"libsqlite3.so.0.*
        sed -i 's/SQLite format 3/SQLite formaT 3/' "$out/lib/"libsqlite3.so.0.*
        echo "CVE-2099-0001 fixed" > "$out/share/sqlite-security.txt"
      '' else ""}
    '';
  };
  nghttp2 = lib { pname = "nghttp2"; version = "1.52.0"; sonames = [ "libnghttp2.so.14" ]; };
  libidn2 = lib { pname = "libidn2"; version = "2.3.3"; sonames = [ "libidn2.so.0" "libunistring.so.2" ]; };
  libssh2 = lib { pname = "libssh2"; version = "1.10.0"; sonames = [ "libssh2.so.1" ]; deps = [ openssl zlib ]; };
  brotli = lib { pname = "brotli"; version = "1.0.9"; sonames = [ "libbrotlidec.so.1" "libbrotlicommon.so.1" "libbrotlienc.so.1" ]; };
  libpsl = lib { pname = "libpsl"; version = "0.21.2"; sonames = [ "libpsl.so.5" ]; deps = [ libidn2 ]; };
  curl = lib {
    pname = "curl"; version = "7.88.1"; sonames = [ "libcurl.so.4" ];
    deps = [ openssl zlib zstd nghttp2 libssh2 ] ++ (if large then [ libidn2 brotli libpsl ] else [ ]);
    headers = [ "curl" "x86_64-linux-gnu/curl" ];
    pc = ''mkpc libcurl 7.88.1 "-lcurl" "libssl libcrypto zlib libzstd"'';
    extra = ''
      cpbin bin curl
      patchbins "$out/lib:${zlib}/lib:${openssl}/lib:${glibc}/lib" "$out/bin"
      cpman 1 curl
      mkdir -p "$out/etc/ssl/certs"
      ${if large then ''cp /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/" || true'' else ""}
    '';
  };

  # large-only libraries
  icu = lib {
    pname = "icu4c"; version = "72.1";
    sonames = [ "libicuuc.so.72" "libicudata.so.72" "libicui18n.so.72" "libicuio.so.72" ];
    deps = [ gcclib ]; headers = [ "unicode" ];
    pc = ''mkpc icu-uc 72.1 "-licuuc -licudata"'';
  };
  libxml2 = lib {
    pname = "libxml2"; version = "2.9.14"; sonames = [ "libxml2.so.2" ];
    deps = [ zlib xz ] ++ (if large then [ icu ] else [ ]);
    headers = [ "libxml2" ];
    pc = ''mkpc libxml-2.0 2.9.14 "-lxml2" "" "-lz -llzma -lm"'';
  };
  gmp = lib { pname = "gmp"; version = "6.2.1"; sonames = [ "libgmp.so.10" ]; headers = [ "gmp.h" "x86_64-linux-gnu/gmp.h" ]; };
  mpfr = lib { pname = "mpfr"; version = "4.2.0"; sonames = [ "libmpfr.so.6" ]; deps = [ gmp ]; headers = [ "mpfr.h" ]; };
  libmpc = lib { pname = "libmpc"; version = "1.3.1"; sonames = [ "libmpc.so.3" ]; deps = [ gmp mpfr ]; };
  isl = lib { pname = "isl"; version = "0.25"; sonames = [ "libisl.so.23" ]; deps = [ gmp ]; };
  llvm = lib {
    pname = "llvm"; version = "15.0.6"; sonames = [ "libLLVM-15.so.1" ];
    deps = [ zlib zstd libffi ncurses libxml2 gcclib ];
    extra = ''
      for b in llc opt llvm-ar llvm-nm llvm-objdump; do
        [ -e "/usr/lib/llvm-15/bin/$b" ] && cpbin bin "/usr/lib/llvm-15/bin/$b"
      done
      mkdir -p "$out/bin"
      patchbins "$out/lib:${gcclib}/lib:${glibc}/lib" "$out/bin"
      { echo "#!${bash}/bin/sh"
        echo "echo '-I$out/include -L$out/lib -lLLVM-15 -L${zlib}/lib -L${zstd}/lib'"; } > "$out/bin/llvm-config"
      chmod 0755 "$out/bin/llvm-config"
    '';
  };

  # ------------------------------------------------------------ applications
  app = { pname, version, deps ? [ ], script }:
    mk {
      inherit pname version;
      deps = [ glibc ] ++ deps;
      script = ''
        RP="${libdirs (deps ++ [ glibc ])}"
        ${script}
        patchshebangs "$out/bin" "$out/libexec" "$out/share"
      '';
      env = { inherit glibc; bash = if pname == "bash" then "" else bash; };
    };

  bash = app {
    pname = "bash"; version = "5.2.15"; deps = [ ncurses ];
    script = ''
      cpbin bin /usr/bin/bash
      patchbins "$RP" "$out/bin"
      ln -s bash "$out/bin/sh"
      cpman 1 bash
      cpdoc bash
      mkdir -p "$out/etc"
      sed "s|/etc/bash.bashrc|$out/etc/bash.bashrc|" /etc/bash.bashrc > "$out/etc/bash.bashrc" || true
    '';
  };

  coreutilsBins = [
    "ls" "cp" "mv" "rm" "cat" "mkdir" "rmdir" "chmod" "chown" "ln" "head" "tail" "sort"
    "uniq" "wc" "tr" "cut" "env" "date" "echo" "install" "du" "df" "stat" "readlink"
    "dirname" "basename" "touch" "true" "false"
  ] ++ (if large then [ "id" "uname" "sleep" "tee" "printf" "test"
    "b2sum" "base32" "base64" "chcon" "chgrp" "cksum" "comm" "csplit" "dd" "dir" "dircolors"
    "expand" "expr" "factor" "fmt" "fold" "groups" "hostid" "join" "link" "logname" "md5sum"
    "mkfifo" "mknod" "mktemp" "nice" "nl" "nohup" "nproc" "numfmt" "od" "paste" "pathchk"
    "pinky" "pr" "printenv" "ptx" "pwd" "realpath" "runcon" "seq" "sha1sum" "sha224sum"
    "sha256sum" "sha384sum" "sha512sum" "shred" "shuf" "split" "stdbuf" "stty" "sum" "sync"
    "tac" "timeout" "truncate" "tsort" "tty" "unexpand" "unlink" "users" "vdir" "who" "whoami" "yes"
  ] else [ ]);

  coreutils = app {
    pname = "coreutils"; version = "9.1"; deps = [ acl ];
    script = ''
      for b in ${concatStringsSep " " coreutilsBins}; do cpbin bin "$b"; done
      patchbins "$RP" "$out/bin"
      cpman 1 ${concatStringsSep " " coreutilsBins}
      cpdoc coreutils
    '';
  };

  smallTools = app {
    pname = "gnu-tools"; version = "2023.1"; deps = [ pcre2 acl zlib xz zstd bzip2 ];
    script = ''
      cpbin bin grep sed gzip gunzip zcat zgrep zless zmore zdiff znew gzexe bzip2 \
        ${if large then "find xargs tar make diff cmp file awk mawk less patch zstd" else ""}
      patchbins "$RP:${zstd}/lib" "$out/bin"
      cpman 1 grep sed find xargs tar gzip make diff
      cpdoc grep sed tar gzip make
    '';
  };

  perlLib = "$out/lib/perl5/5.36";
  perl = app {
    pname = "perl"; version = "5.36.0"; deps = [ libxcrypt ];
    script = ''
      cpbin bin /usr/bin/perl
      patchbins "$RP" "$out/bin"
      for s in perldoc pod2man pod2text pod2usage podchecker prove cpan perlbug perlivp pod2html; do
        cpbin bin "$s"
      done
      ${if large then ''
        cptree /usr/share/perl/5.36 "${perlLib}"
        cptree "$HL/perl/5.36" "${perlLib}"
        cptree "$HL/perl-base" "${perlLib}"
        cptree /usr/share/perl5 "$out/lib/perl5/site_perl"
      '' else ''
        cptree /usr/share/perl/5.36 "${perlLib}" -maxdepth 1 -size -20k
        for d in File Getopt Text Term Time; do cptree /usr/share/perl/5.36/$d "${perlLib}/$d"; done
        cptree "$HL/perl/5.36" "${perlLib}" -maxdepth 1
        for d in auto/POSIX auto/Fcntl auto/IO auto/List auto/Cwd List Scalar IO; do cptree "$HL/perl/5.36/$d" "${perlLib}/$d"; done
        cptree "$HL/perl-base" "${perlLib}" -maxdepth 1
      ''}
      # xs modules link against the root dep
      setrpath "${glibc}/lib:${libxcrypt}/lib" "${perlLib}"
      # like nixpkgs, Config.pm & co. record the store paths of perl and its deps
      for f in Config.pm Config_heavy.pl Config_git.pl; do
        [ -f "${perlLib}/$f" ] || continue
        sed -i -e "s|/usr/lib/x86_64-linux-gnu/perl|$out/lib/perl5|g" -e "s|/usr/share/perl|$out/lib/perl5|g" \
               -e "s|/usr/local|$out|g" -e "s|'/usr'|'$out'|g" -e "s|/usr/bin|$out/bin|g" \
               -e "s|/lib/x86_64-linux-gnu|${glibc}/lib ${libxcrypt}/lib|g" "${perlLib}/$f"
      done
      cpman 1 perl perldoc prove cpan
      cpdoc perl
      perl=$out patchshebangs "$out/bin"
    '';
  };

  # python: Debian 3.11.2 until generation 4, then the pyenv 3.11.7 build
  newPy = gen >= 4 && haveNewPy;
  pySrc = if newPy then "${pyenv}/lib/python3.11" else "/usr/lib/python3.11";
  pySmallDirs = [ "json" "collections" "importlib" "urllib" "re" "sqlite3" ];
  pySmallEnc = [ "__init__" "aliases" "ascii" "latin_1" "utf_8" "utf_8_sig" "idna" "cp1252" "cp437" "punycode" ];
  pySmallDynload = [ "_ssl" "_hashlib" "_sqlite3" "_ctypes" "readline" ];
  python = app {
    pname = "python3"; version = if newPy then "3.11.7" else "3.11.2";
    deps = [ zlib expat openssl sqlite libffi xz bzip2 ncurses readline libxcrypt ];
    script = ''
      ${if newPy then ''
        cpbin bin "${pyenv}/bin/python3.11"
        cplib_src() { mkdir -p "$out/lib"; cp -L "$1" "$out/lib/"; chmod 0755 "$out/lib/$(basename "$1")"; }
        cplib_src "${pyenv}/lib/libpython3.11.so.1.0"
        ln -s libpython3.11.so.1.0 "$out/lib/libpython3.11.so"
        setrpath "$out/lib:$RP" "$out/lib"
        patchbins "$out/lib:$RP" "$out/bin"
      '' else ''
        cpbin bin /usr/bin/python3.11
        patchbins "$RP" "$out/bin"
      ''}
      ln -s python3.11 "$out/bin/python3"
      ln -s python3 "$out/bin/python"
      L="$out/lib/python3.11"
      ${if large then ''
        cptree "${pySrc}" "$L" -not -path "./site-packages/*" -not -path "./dist-packages/*" \
          -not -path "./test/*" -not -path "./config-3.11*" -not -name "*.opt-?.pyc"
      '' else ''
        cptree "${pySrc}" "$L" -maxdepth 1 -name "*.py" -size -16k
        for d in ${concatStringsSep " " pySmallDirs}; do
          cptree "${pySrc}/$d" "$L/$d" -not -name "*.pyc"
        done
        for e in ${concatStringsSep " " pySmallEnc}; do cptree "${pySrc}/encodings" "$L/encodings" -name "$e.py"; done
        for m in ${concatStringsSep " " pySmallDynload}; do cptree "${pySrc}/lib-dynload" "$L/lib-dynload" -name "$m.cpython-*"; done
      ''}
      setrpath "$RP" "$L/lib-dynload"
      # sysconfigdata records the build-time store paths (as in nixpkgs)
      for f in "$L"/_sysconfigdata_*.py; do
        [ -f "$f" ] || continue
        sed -i -e "s|/usr/local|$out|g" -e "s|'/usr'|'$out'|g" -e "s|/usr/lib/x86_64-linux-gnu|${openssl}/lib:${zlib}/lib:${expat}/lib|g" \
               -e "s|/usr/include|${zlib}/include|g" -e "s|${pyenv}|$out|g" -e "s|/usr|$out|g" "$f"
      done
      mkdir -p "$out/lib/pkgconfig" "$out/nix-support"
      mkpc python-3.11 "$version" "-lpython3.11" "" "-L${libxcrypt}/lib -lcrypt -L${glibc}/lib -ldl -lm"
      echo "export PYTHONHOME=$out" > "$out/nix-support/setup-hook"
      cpbin bin pydoc3.11
      python=$out patchshebangs "$out/bin" "$L"
      cpman 1 python3.11
    '';
  };

  # git: 2.39.5 from Debian, from generation 3 on 2.47.3 from /usr/local
  newGit = gen >= 3 && haveNewGit;
  git = app {
    pname = "git"; version = if newGit then "2.47.3" else "2.39.5";
    deps = [ zlib pcre2 curl openssl expat perl coreutils ];
    script = ''
      ${if newGit then ''
        GB=/usr/local/bin/git; GC=/usr/local/libexec/git-core; GS=/usr/local/share
      '' else ''
        GB=/usr/bin/git; GC=/usr/lib/git-core; GS=/usr/share
      ''}
      cpbin bin "$GB"
      mkdir -p "$out/libexec/git-core"
      gi=$(stat -c %i "$GB")
      (cd "$GC" && find . -maxdepth 1 \( -type f -o -type l \) -printf '%P\n' | LC_ALL=C sort) | while IFS= read -r f; do
        src="$GC/$f"
        if [ "$(stat -L -c %i "$src")" = "$gi" ] || [ "$f" = git ] || cmp -s "$src" "$GB"; then
          ln -s ../../bin/git "$out/libexec/git-core/$f"    # builtins
        elif is_elf "$(readlink -f "$src")"; then
          case "$f" in git-remote-http${if large then "|git-http-fetch|git-shell|git-daemon" else ""}) cp -L "$src" "$out/libexec/git-core/$f";; esac
        else
          cp -L "$src" "$out/libexec/git-core/$f"
        fi
      done
      [ -e "$out/libexec/git-core/git-remote-http" ] && for p in https ftp ftps; do ln -sf git-remote-http "$out/libexec/git-core/git-remote-$p"; done
      patchbins "$RP" "$out/bin" "$out/libexec"
      cptree "$GS/git-core/templates" "$out/share/git-core/templates"
      ${if large then ''cptree "$GS/perl5" "$out/share/perl5" -path "*Git*"'' else ""}
      perl=${perl} patchshebangs "$out/libexec"
      wrapprog git "${coreutils}/bin:${perl}/bin:${curl}/bin" "export GIT_EXEC_PATH='$out/libexec/git-core'"
      cpman 1 git git-commit git-log git-rebase
    '';
  };

  sqliteApp = sqlite; # sqlite3 CLI lives in the sqlite output

  pythonScripts = app {
    pname = "corpus-tools"; version = "0.1"; deps = [ python perl git ];
    script = ''
      mkdir -p "$out/bin" "$out/share/corpus-tools"
      # small script collection à la nixpkgs: python / perl scripts with store shebangs
      for s in /usr/lib/python3.11/tabnanny.py /usr/lib/python3.11/uu.py /usr/lib/python3.11/quopri.py \
               /usr/lib/python3.11/trace.py /usr/lib/python3.11/pdb.py /usr/lib/python3.11/base64.py; do
        [ -f "$s" ] || continue
        b=$(basename "$s" .py)
        { echo "#!${python}/bin/python3"; tail -n +2 "$s"; } > "$out/bin/$b"; chmod 0755 "$out/bin/$b"
      done
      for s in /usr/bin/pod2usage /usr/bin/podchecker; do
        [ -f "$s" ] && { echo "#!${perl}/bin/perl"; tail -n +2 "$s"; } > "$out/bin/$(basename "$s")-tool" && chmod 0755 "$out/bin/$(basename "$s")-tool"
      done
      { echo "[core]"; echo "  pager = ${coreutils}/bin/cat"; echo "[credential]";
        echo "  helper = ${git}/libexec/git-core/git-credential-store"; } > "$out/share/corpus-tools/gitconfig"
      for b in tabnanny uu quopri trace pdb base64; do
        [ -e "$out/bin/$b" ] && wrapprog "$b" "${python}/bin:${git}/bin:${coreutils}/bin" "export PYTHONPATH='${python}/lib/python3.11'"
      done
    '';
  };

  # large-only applications
  gcc = app {
    pname = "gcc"; version = "12.2.0"; deps = [ gmp mpfr libmpc isl zlib zstd gcclib ];
    script = ''
      G=/usr/lib/gcc/x86_64-linux-gnu/12
      LE="$out/libexec/gcc/x86_64-linux-gnu/12"; LG="$out/lib/gcc/x86_64-linux-gnu/12"
      cpbin bin /usr/bin/x86_64-linux-gnu-gcc-12 /usr/bin/x86_64-linux-gnu-cpp-12 /usr/bin/x86_64-linux-gnu-gcov-12
      [ -e "$out/bin/x86_64-linux-gnu-gcc-12" ] && ln -s x86_64-linux-gnu-gcc-12 "$out/bin/gcc"
      mkdir -p "$LE" "$LG"
      for f in cc1 collect2 lto-wrapper liblto_plugin.so; do [ -e "$G/$f" ] && cp -L "$G/$f" "$LE/$f"; done
      for f in crtbegin.o crtbeginS.o crtend.o crtendS.o libgcc.a libgcc_eh.a libgcov.a; do [ -e "$G/$f" ] && cp -L "$G/$f" "$LG/$f"; done
      cptree "$G/include" "$LG/include" -maxdepth 1
      patchbins "$RP" "$out/bin" "$LE"
      # specs-like file pointing at the libc (what nixpkgs' cc-wrapper does)
      mkdir -p "$out/nix-support"
      echo "-B${glibc}/lib/ -idirafter ${glibc}/include -dynamic-linker ${glibc}/lib/ld-linux-x86-64.so.2" > "$out/nix-support/libc-cflags"
      echo "-L${glibc}/lib -L${gcclib}/lib" > "$out/nix-support/libc-ldflags"
      cpman 1 gcc cpp gcov
    '';
  };

  vim = app {
    pname = "vim"; version = "9.0.1378"; deps = [ ncurses acl libxcrypt ];
    script = ''
      cpbin bin /usr/bin/vim.basic
      mv "$out/bin/vim.basic" "$out/bin/vim"
      patchbins "$RP" "$out/bin"
      for d in syntax ftplugin indent autoload plugin colors; do
        cptree /usr/share/vim/vim90/$d "$out/share/vim/vim90/$d"
      done
      mkdir -p "$out/share/vim"
      echo "let \$VIMRUNTIME='$out/share/vim/vim90'" > "$out/share/vim/vimrc"
      cpman 1 vim
    '';
  };

  curlApp = curl;

  packages =
    [ glibc zlib bzip2 xz zstd libxcrypt acl pcre2 expat libffi ncurses readline
      openssl sqlite nghttp2 libssh2 curl
      bash coreutils smallTools perl python git pythonScripts ]
    ++ (if large then [ libidn2 brotli libpsl libxml2 gcclib icu gmp mpfr libmpc isl llvm gcc vim ] else [ ]);

in
mk {
  pname = "corpus-env";
  version = "${toString gen}-${scale}";
  deps = packages;
  env = { inherit glibc; };
  script = ''
    # buildEnv-like symlink farm of every package's bin/ plus a manifest
    mkdir -p "$out/bin" "$out/share/corpus"
    for p in $deps; do
      echo "$p" >> "$out/share/corpus/manifest"
      [ -d "$p/bin" ] || continue
      for b in "$p"/bin/*; do
        [ -e "$b" ] || continue
        n=$(basename "$b")
        [ -e "$out/bin/$n" ] || [ -L "$out/bin/$n" ] || ln -s "$b" "$out/bin/$n"
      done
    done
  '';
}
