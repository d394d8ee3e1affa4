# NixOS module: services.nix-p2p-cache.
#
# Every option becomes a key of one generated TOML file (config.nix, pure), which
# `nix-p2p-cache check-config` validates at build time; `settings` is merged over it. Only the
# upload token's path, known at run time ($CREDENTIALS_DIRECTORY), is a flag.
#
#   imports = [ ./nixos-module ];            # or the flake's nixosModules.default
#   services.nix-p2p-cache.enable = true;    # substituter on 127.0.0.1:7420, P2P on 7421
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    literalExpression
    mkBefore
    mkDefault
    mkEnableOption
    mkIf
    mkOption
    types
    ;

  cfg = config.services.nix-p2p-cache;
  pure = import ./config.nix;
  settingsFormat = pkgs.formats.toml { };

  generated = pure.generate {
    inherit (cfg)
      role
      listen
      p2pPort
      bootstrapPeers
      upstreams
      trustedPublicKeys
      share
      maxCacheSize
      uploadRateLimit
      uploadTokenFile
      storage
      s3Endpoint
      s3CacheSize
      s3CredentialsFile
      settings
      ;
    ipv6 = config.networking.enableIPv6;
  };

  exe = "${cfg.package}/bin/nix-p2p-cache";

  settingsFile = settingsFormat.generate "nix-p2p-cache.toml" generated.settings;

  # The generated file, checked by the daemon's own validation together with the flags the
  # unit adds (a bad key, multiaddr, URL or option combination fails the system build).
  checkedConfig =
    pkgs.runCommand "nix-p2p-cache.toml"
      {
        nativeBuildInputs = [ cfg.package ];
        preferLocalBuild = true;
      }
      ''
        nix-p2p-cache check-config ${lib.escapeShellArgs ([ "${settingsFile}" ] ++ generated.flags)}
        cp ${settingsFile} $out
      '';

  # `nix-p2p-cache-admin ARGS…` (as root): `nix-p2p-cache ARGS…` as the service's dynamic
  # user, with its data dir, config, upload token and S3 credentials, in a transient unit
  # (stdin/stdout piped, exit status passed on). While the daemon runs, pin/unpin/gc/undelete
  # go through its API with the token, stats/status/peers/doctor ask it.
  adminTool = pkgs.writeShellScriptBin "nix-p2p-cache-admin" ''
    set -eu
    unit="nix-p2p-cache-admin-$$"
    creds="/run/credentials/$unit.service"
    exec ${config.systemd.package}/bin/systemd-run --quiet --wait --collect --pipe --same-dir \
      --service-type=exec --unit="$unit" \
      ${lib.escapeShellArgs (map (p: "--property=${p}") generated.adminProperties)} \
      ${
        lib.escapeShellArgs (
          lib.mapAttrsToList (k: v: "--setenv=${k}=${v}") generated.adminEnvironment
          ++ [ "--setenv=NIX_P2P_CACHE_CONFIG=${checkedConfig}" ]
        )
      } \
      ${
        lib.concatStringsSep " " (
          lib.mapAttrsToList (
            k: v: "\"--setenv=${k}=$creds/${v}\""
          ) generated.adminCredentialEnvironment
        )
      } \
      -- ${exe} "$@"
  '';

  sizeType = types.nullOr (types.either types.ints.unsigned types.str);
in
{
  options.services.nix-p2p-cache = {
    enable = mkEnableOption "nix-p2p-cache, a peer-to-peer binary cache that Nix uses as its first substituter";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The nix-p2p-cache package.";
    };

    role = mkOption {
      type = types.enum [
        "peer"
        "seed"
      ];
      default = "peer";
      description = ''
        `peer`: caches what it fetches (under `maxCacheSize`) and falls back on `upstreams`.
        `seed`: keeps everything it holds, serves the network, no upstream by default.
      '';
    };

    listen = mkOption {
      type = types.str;
      default = "127.0.0.1:7420";
      example = "[::1]:7420";
      description = ''
        HTTP address of the substituter (host:port). Keep it on loopback: the firewall is
        never opened for it.
      '';
    };

    p2pPort = mkOption {
      type = types.nullOr types.port;
      default = 7421;
      description = ''
        TCP port of the P2P node, on all IPv4 (and, with networking.enableIPv6, IPv6)
        addresses. `null` turns the P2P layer off.
      '';
    };

    bootstrapPeers = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "/ip4/203.0.113.7/tcp/7421/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA" ];
      description = ''
        Multiaddrs of known nodes, each ending in /p2p/<peer id> (a node prints its own at
        startup). They are dialled at start and every 30 s while disconnected.
      '';
    };

    upstreams = mkOption {
      type = types.listOf types.str;
      default = pure.defaultUpstreams cfg.role;
      defaultText = literalExpression ''if role == "seed" then [ ] else [ "https://cache.nixos.org" ]'';
      description = "Upstream HTTP binary caches asked, in order, for what neither the store nor the peers have.";
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = [ pure.cacheNixosOrgKey ];
      defaultText = literalExpression ''[ "${pure.cacheNixosOrgKey}" ]'';
      description = ''
        Keys (name:base64) whose signatures make a narinfo trusted: only trusted paths are
        fetched from peers, announced and shared. With addToNixSubstituters they are also
        added to nix.settings.trusted-public-keys, since Nix checks the same signatures.
      '';
    };

    share = mkOption {
      type = types.enum [
        "none"
        "lan"
        "all"
      ];
      default = "all";
      description = "Which peers may fetch from this node: none, lan (mDNS-discovered peers only) or all.";
    };

    maxCacheSize = mkOption {
      type = sizeType;
      default = null;
      example = "50G";
      description = ''
        Evict least-recently-used unpinned NARs above this many stored bytes (an integer or a
        size such as "50G", "512MiB"). Peers only: a seed never evicts.
      '';
    };

    uploadRateLimit = mkOption {
      type = sizeType;
      default = null;
      example = "10M";
      description = "Cap on bytes per second sent to peers, all together (an integer or a size such as \"10M\").";
    };

    uploadTokenFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/keys/nix-p2p-cache-token";
      description = ''
        File holding the upload token (the HTTP basic password `nix copy --to` sends from its
        netrc file). Read by systemd (LoadCredential), never copied into the Nix store; null
        refuses uploads.
      '';
    };

    storage = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "s3://nix-cache/seed";
      description = ''
        Keep sealed packs in S3-compatible object storage (`s3://BUCKET[/PREFIX]`); null keeps
        them in the state directory. The index and the open pack stay local; the local
        directory may then be lost and rebuilt from the bucket (`verify --repair`).
      '';
    };

    s3Endpoint = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://s3.eu-central-003.backblazeb2.com";
      description = "The S3 endpoint (path-style addressing); null: AWS's endpoint for AWS_REGION.";
    };

    s3CacheSize = mkOption {
      type = sizeType;
      default = null;
      example = "10G";
      description = "Local cache of pack ranges read from the bucket (default 1 GiB).";
    };

    s3CredentialsFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/keys/nix-p2p-cache-s3";
      description = ''
        An AWS-style credentials file (`[default]` with `aws_access_key_id` and
        `aws_secret_access_key`), handed to the service through LoadCredential, never copied
        into the Nix store.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the P2P port (TCP) and, unless settings.no-mdns is set, mDNS (UDP 5353). The
        substituter's port is never opened.
      '';
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      example = literalExpression ''{ announce = "all"; no-mdns = true; }'';
      description = ''
        Daemon configuration keys (docs/operations.md), merged over the ones generated from
        the options above. Checked at build time with `nix-p2p-cache check-config`.
      '';
    };

    addToNixSubstituters = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Put the daemon (http://127.0.0.1:7420, from `listen`) in front of
        nix.settings.substituters and trustedPublicKeys into nix.settings.trusted-public-keys.
        When the daemon is down, Nix moves on to the next substituter.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = generated.assertions;

    # `nix-p2p-cache` for check-config and a data dir of one's own; `nix-p2p-cache-admin` for
    # the service's (stats, pin, gc, verify, import… as its user).
    environment.systemPackages = [
      cfg.package
      adminTool
    ];

    systemd.services.nix-p2p-cache = {
      description = "nix-p2p-cache, peer-to-peer binary cache for Nix";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      environment = generated.environment // {
        RUST_LOG = mkDefault "info";
      };
      serviceConfig =
        let
          caps = if generated.privilegedPorts then "CAP_NET_BIND_SERVICE" else "";
        in
        {
          # The daemon says READY=1 once it listens, STOPPING=1 at shutdown.
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = lib.escapeShellArgs (
            [
              exe
              "daemon"
              "--config"
              "${checkedConfig}"
            ]
            ++ generated.flags
          );
          Restart = "on-failure";
          RestartSec = 5;
          TimeoutStopSec = generated.stopTimeoutSec;
          # Every HTTP client and every peer is a file descriptor: 1024 is reached by a busy node.
          LimitNOFILE = 65536;

          DynamicUser = true;
          StateDirectory = "nix-p2p-cache";
          StateDirectoryMode = "0700";
          UMask = "0077";
          LoadCredential = generated.credentials;

          CapabilityBoundingSet = caps;
          AmbientCapabilities = caps;
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          PrivateUsers = !generated.privilegedPorts;
          ProtectHostname = true;
          ProtectClock = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectProc = "invisible";
          ProcSubset = "pid";
          # AF_NETLINK: the P2P node enumerates interface addresses (rtnetlink, through
          # if-watch) for mDNS and to expand its 0.0.0.0 / :: listen addresses.
          RestrictAddressFamilies = [
            "AF_INET"
            "AF_INET6"
            "AF_UNIX"
            "AF_NETLINK"
          ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [
            "@system-service"
            "~@privileged"
          ];
        };
    };

    networking.firewall = mkIf cfg.openFirewall {
      allowedTCPPorts = generated.firewall.tcp;
      allowedUDPPorts = generated.firewall.udp;
    };

    nix.settings = mkIf cfg.addToNixSubstituters {
      substituters = mkBefore [ generated.substituter ];
      trusted-public-keys = generated.nixTrustedKeys;
    };
  };
}
