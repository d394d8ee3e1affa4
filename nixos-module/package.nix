# The nix-p2p-cache binary, built from this repository.
#
#   pkgs.callPackage ./nixos-module/package.nix { }
{
  lib,
  rustPlatform,
}:
let
  root = ../.;
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "nix-p2p-cache";
  inherit (cargoToml.workspace.package) version;

  # Only what cargo needs to load the workspace and build; edits to docs, the module or the
  # corpus do not rebuild the package.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../daemon
      ../proto
      ../tests
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  # The daemon only: not the benchmark binaries, not the test crate.
  cargoBuildFlags = [
    "--package"
    "nix-p2p-cache"
    "--bin"
    "nix-p2p-cache"
  ];

  # The test suite drives the real `nix` (nix-build, nix copy, a local store outside the
  # sandbox), builds a corpus from host files and opens sockets; none of that works in the
  # build sandbox. scripts/test.sh runs it.
  doCheck = false;

  meta = {
    description = "Peer-to-peer, content-addressed binary cache for Nix";
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "nix-p2p-cache";
    platforms = lib.platforms.unix;
  };
}
