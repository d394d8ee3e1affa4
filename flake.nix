{
  description = "nix-p2p-cache: a peer-to-peer, content-addressed binary cache for Nix";

  # No flake.lock is committed yet (it was written on a machine that cannot fetch nixpkgs);
  # the first `nix build` / `nix flake lock` pins nixpkgs.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      linux = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      systems = linux ++ [
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forSystems = ss: f: lib.genAttrs ss (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forSystems systems (pkgs: rec {
        nix-p2p-cache = pkgs.callPackage ./nixos-module/package.nix { };
        default = nix-p2p-cache;
      });

      overlays.default = final: _prev: {
        nix-p2p-cache = final.callPackage ./nixos-module/package.nix { };
      };

      # The module's `package` defaults to `pkgs.callPackage ./package.nix { }`, which builds
      # the same source with the system's own nixpkgs.
      nixosModules.default = import ./nixos-module;
      nixosModules.nix-p2p-cache = self.nixosModules.default;

      devShells = forSystems systems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            cargo-nextest
            nix
          ];
        };
      });

      checks = forSystems linux (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        vm-test = import ./nixos-module/test.nix {
          inherit pkgs;
          module = self.nixosModules.default;
        };
      });

      formatter = forSystems systems (pkgs: pkgs.nixfmt-rfc-style);
    };
}
