# Evaluates the real module (../default.nix) with the real nixpkgs lib through
# lib.evalModules, without nixpkgs' packages or NixOS itself: stand-in declarations for the
# NixOS options the module sets, and a `pkgs` stub. Run through run.sh, which then "builds"
# each case's config check with the locally built binary.
#
# The stubs:
#   pkgs.formats.toml { }  type: TOML values; generate: writes TOML text (builtins.toFile, a
#                          small serializer for the flat tables the daemon reads).
#   pkgs.runCommand        returns its build script as a file (builtins.toFile), so the
#                          ExecStart's `--config` names that script; run.sh runs it with $out set.
#   pkgs.callPackage       a fake package whose bin/ is not used (run.sh puts the real binary
#                          on PATH).
{ lib }:
let
  inherit (lib) mkOption types;

  tomlValue =
    v:
    if builtins.isString v then
      builtins.toJSON v
    else if builtins.isBool v then
      (if v then "true" else "false")
    else if builtins.isInt v || builtins.isFloat v then
      toString v
    else if builtins.isList v then
      "[" + lib.concatMapStringsSep ", " tomlValue v + "]"
    else if builtins.isPath v then
      builtins.toJSON (toString v)
    else
      throw "eval-test TOML stub: nested tables are not supported";

  pkgs = {
    formats.toml =
      { }:
      {
        type =
          let
            v =
              types.nullOr (
                types.oneOf [
                  types.bool
                  types.int
                  types.float
                  types.str
                  types.path
                  (types.attrsOf v)
                  (types.listOf v)
                ]
              )
              // {
                description = "TOML value";
              };
          in
          types.attrsOf v;
        generate =
          name: value:
          builtins.toFile name (
            lib.concatStrings (lib.mapAttrsToList (k: v: "${k} = ${tomlValue v}\n") value)
          );
      };
    runCommand = name: _env: script: builtins.toFile name script;
    callPackage = _: _: {
      type = "derivation";
      name = "nix-p2p-cache-stub";
      outPath = "/nix/store/00000000000000000000000000000000-nix-p2p-cache-stub";
    };
  };

  # Stand-ins for the NixOS options the module sets (and the one it reads).
  nixosStandIns =
    { lib, ... }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        systemd.services = mkOption {
          type = types.attrsOf (
            types.submodule {
              freeformType = types.attrsOf types.anything;
              options.serviceConfig = mkOption {
                type = types.attrsOf types.anything;
                default = { };
              };
            }
          );
          default = { };
        };
        environment.systemPackages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        networking.enableIPv6 = mkOption {
          type = types.bool;
          default = true;
        };
        networking.firewall.allowedTCPPorts = mkOption {
          type = types.listOf types.port;
          default = [ ];
        };
        networking.firewall.allowedUDPPorts = mkOption {
          type = types.listOf types.port;
          default = [ ];
        };
        nix.settings = mkOption {
          type = types.submodule {
            freeformType = types.attrsOf types.anything;
            options.substituters = mkOption { type = types.listOf types.str; };
            options.trusted-public-keys = mkOption { type = types.listOf types.str; };
          };
        };
      };
      # What nixos/modules/config/nix.nix defines, so the order of substituters is real.
      config.nix.settings = {
        substituters = lib.mkAfter [ "https://cache.nixos.org/" ];
        trusted-public-keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      };
    };

  eval =
    cfg:
    let
      c =
        (lib.evalModules {
          specialArgs = { inherit pkgs; };
          modules = [
            nixosStandIns
            ../default.nix
            { services.nix-p2p-cache = cfg; }
          ];
        }).config;
      unit = c.systemd.services.nix-p2p-cache or null;
    in
    {
      failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
      unit = unit;
      firewall = c.networking.firewall;
      systemPackages = map (p: p.name) c.environment.systemPackages;
      nixSettings = {
        inherit (c.nix.settings) substituters trusted-public-keys;
      };
    };
in
{
  peer-defaults = eval { enable = true; };
  seed = eval {
    enable = true;
    role = "seed";
    openFirewall = true;
    uploadTokenFile = "/run/keys/nix-p2p-cache-token";
    trustedPublicKeys = [
      "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
      "test-key-1:78Nf98nbvOPNUUW/boOhsIB79Rq1dhy940buuyOMuZM="
    ];
    settings.no-mdns = true;
  };
  lan-quota = eval {
    enable = true;
    listen = "0.0.0.0:7420";
    share = "lan";
    maxCacheSize = "50G";
    uploadRateLimit = 10000000;
    bootstrapPeers = [ "/ip4/192.0.2.1/tcp/7421/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA" ];
    addToNixSubstituters = true;
  };
  disabled = eval { };
  # The bad-* cases must be refused. This one passes the assertions; the build-time
  # check-config refuses it (unknown key, bootstrap address without /p2p/<id>).
  bad-settings = eval {
    enable = true;
    settings.bogus = 1;
    bootstrapPeers = [ "/ip4/192.0.2.1/tcp/7421" ];
  };
  # Refused by the assertions: a seed never evicts; a token in the store.
  bad-seed = eval {
    enable = true;
    role = "seed";
    maxCacheSize = "5G";
    uploadTokenFile = ./eval.nix;
  };
}
