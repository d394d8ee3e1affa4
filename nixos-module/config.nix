# The pure part of the NixOS module: option values -> the daemon's TOML settings, its extra
# command-line flags, the LoadCredential entries, the firewall ports, the substituter URL and
# the assertions. Builtins only (no nixpkgs), so the tests evaluate it with a bare
# `nix-instantiate --eval` and feed the result to `nix-p2p-cache check-config`
# (tests/tests/module.rs). `default.nix` declares the options with the defaults below.
let
  cacheNixosOrgKey = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

  # systemd's StateDirectory=nix-p2p-cache (with DynamicUser a symlink into /var/lib/private).
  stateDir = "/var/lib/nix-p2p-cache";

  # LoadCredential=upload-token:<file>; the daemon reads it from $CREDENTIALS_DIRECTORY (%d).
  tokenCredential = "upload-token";
  s3Credential = "s3-credentials";

  optional = cond: x: if cond then [ x ] else [ ];
  optionalAttrs = cond: as: if cond then as else { };
  hasPrefix = pre: s: builtins.substring 0 (builtins.stringLength pre) s == pre;

  # A secret given as a Nix path literal is copied into the world-readable store when the unit
  # is written; a string naming /nix/store/... is already there.
  inStore = v: builtins.isPath v || (builtins.isString v && hasPrefix builtins.storeDir v);

  # "host:port" -> [ host port ]; "[v6]:port" keeps its brackets.
  splitHostPort =
    listen:
    let
      m = builtins.match "(.*):([0-9]+)" listen;
    in
    if m == null then
      throw "services.nix-p2p-cache.listen: ${builtins.toJSON listen} is not host:port"
    else
      m;

  # The URL Nix uses: a wildcard listen address is reached through loopback.
  substituterUrl =
    listen:
    let
      hp = splitHostPort listen;
      host = builtins.elemAt hp 0;
      port = builtins.elemAt hp 1;
      reach =
        if host == "0.0.0.0" then
          "127.0.0.1"
        else if host == "[::]" then
          "[::1]"
        else
          host;
    in
    "http://${reach}:${port}";

  # Deprecated spellings of daemon keys (the daemon still accepts them) -> the current ones, so
  # that `settings` written with an old name overrides the generated key instead of giving
  # the daemon both spellings (which it refuses).
  renamedKeys = {
    upstream = "upstreams";
    bootstrap = "bootstrap-peers";
    trusted-public-key = "trusted-public-keys";
  };
  canonicalKeys =
    s:
    builtins.listToAttrs (
      map (k: {
        name = renamedKeys.${k} or k;
        value = s.${k};
      }) (builtins.attrNames s)
    );
in
rec {
  inherit cacheNixosOrgKey stateDir tokenCredential;

  # Defaults of the module's options (the ones `generate` reads). `upstreams = null` stands for
  # the role's default, `defaultUpstreams`.
  defaults = {
    role = "peer";
    listen = "127.0.0.1:7420";
    p2pPort = 7421;
    bootstrapPeers = [ ];
    upstreams = null;
    trustedPublicKeys = [ cacheNixosOrgKey ];
    share = "all";
    maxCacheSize = null;
    uploadRateLimit = null;
    uploadTokenFile = null;
    storage = null;
    s3Endpoint = null;
    s3CacheSize = null;
    s3CredentialsFile = null;
    settings = { };
    # Not an option of the module: it follows networking.enableIPv6.
    ipv6 = true;
  };

  # A peer falls back on cache.nixos.org; a seed falls back on nothing (it serves what it holds).
  defaultUpstreams = role: if role == "seed" then [ ] else [ "https://cache.nixos.org" ];

  # Option values as the module system would give them, from a partial set (for tests).
  withDefaults =
    opts:
    let
      o = defaults // opts;
    in
    o // { upstreams = if o.upstreams == null then defaultUpstreams o.role else o.upstreams; };

  generate =
    cfg:
    let
      p2p = cfg.p2pPort != null;
      port = toString cfg.p2pPort;
      base = {
        data-dir = stateDir;
        listen = cfg.listen;
        trusted-public-keys = cfg.trustedPublicKeys;
        upstreams = cfg.upstreams;
        role = cfg.role;
        share = cfg.share;
        p2p-listen =
          if p2p then [ "/ip4/0.0.0.0/tcp/${port}" ] ++ optional cfg.ipv6 "/ip6/::/tcp/${port}" else [ ];
        bootstrap-peers = cfg.bootstrapPeers;
      }
      // optionalAttrs (cfg.maxCacheSize != null) { max-cache-size = cfg.maxCacheSize; }
      // optionalAttrs (cfg.uploadRateLimit != null) { upload-rate-limit = cfg.uploadRateLimit; }
      // optionalAttrs (cfg.storage != null) { storage = cfg.storage; }
      // optionalAttrs (cfg.s3Endpoint != null) { s3-endpoint = cfg.s3Endpoint; }
      // optionalAttrs (cfg.s3CacheSize != null) { s3-cache-size = cfg.s3CacheSize; };
      s3Creds = cfg.s3CredentialsFile != null;
      credentials =
        optional (cfg.uploadTokenFile != null) "${tokenCredential}:${toString cfg.uploadTokenFile}"
        ++ optional s3Creds "${s3Credential}:${toString cfg.s3CredentialsFile}";
      settings = base // canonicalKeys cfg.settings;
      mdns = p2p && !(settings.no-mdns or false);
      portOf = listen: builtins.fromJSON (builtins.elemAt (splitHostPort listen) 1);
    in
    {
      inherit settings;

      # Flags after `daemon --config FILE`: only what is known at run time.
      flags =
        if cfg.uploadTokenFile != null then
          [
            "--upload-token-file"
            "%d/${tokenCredential}"
          ]
        else
          [ ];

      # LoadCredential= entries (systemd copies the file into the unit's credentials dir,
      # readable by the dynamic user only).
      inherit credentials;

      # The unit's environment: the S3 credentials file (an AWS-style INI file, handed in as a
      # credential like the token; systemd expands %d), never the keys themselves.
      environment = optionalAttrs s3Creds { AWS_SHARED_CREDENTIALS_FILE = "%d/${s3Credential}"; };

      # `nix-p2p-cache-admin` (default.nix): the CLI run by `systemd-run` in a transient unit
      # as the service's dynamic user (named after the unit), with its state directory and
      # credentials. `adminEnvironment` is set as it is; `adminCredentialEnvironment` names
      # files in the transient unit's credentials directory.
      adminProperties = [
        "DynamicUser=yes"
        "User=nix-p2p-cache"
        "StateDirectory=nix-p2p-cache"
        "StateDirectoryMode=0700"
        "UMask=0077"
      ]
      ++ map (c: "LoadCredential=${c}") credentials;
      adminEnvironment = {
        NIX_P2P_CACHE_DATA_DIR = stateDir;
      };
      adminCredentialEnvironment =
        optionalAttrs (cfg.uploadTokenFile != null) {
          NIX_P2P_CACHE_UPLOAD_TOKEN_FILE = tokenCredential;
        }
        // optionalAttrs s3Creds { AWS_SHARED_CREDENTIALS_FILE = s3Credential; };

      # A clean stop seals the open pack and uploads it: give it time on a slow uplink.
      stopTimeoutSec = if (settings.storage or null) != null then 600 else 90;

      substituter = substituterUrl settings.listen;

      # What goes into nix.settings.trusted-public-keys: NixOS lists cache.nixos.org's key
      # already (the daemon trusts it always), so it is not added a second time.
      nixTrustedKeys = builtins.filter (k: k != cacheNixosOrgKey) cfg.trustedPublicKeys;

      # What openFirewall opens: the P2P port, and mDNS when it is on. Never the substituter.
      firewall = {
        tcp = optional p2p cfg.p2pPort;
        udp = optional mdns 5353;
      };

      # Ports below 1024 need CAP_NET_BIND_SERVICE.
      privilegedPorts = portOf settings.listen < 1024 || (p2p && cfg.p2pPort < 1024);

      assertions = map (a: a // { message = "services.nix-p2p-cache: ${a.message}"; }) [
        {
          assertion = !(cfg.role == "seed" && (settings.max-cache-size or null) != null);
          message = "a seed never evicts, so maxCacheSize (max-cache-size) must be null when role = \"seed\"; use role = \"peer\" for a size-capped cache.";
        }
        {
          assertion = cfg.uploadTokenFile == null || !(inStore cfg.uploadTokenFile);
          message = "uploadTokenFile must not lie in the Nix store (it is world-readable); give the path of a file outside it as a string, e.g. \"/run/keys/nix-p2p-cache-token\".";
        }
        {
          assertion = !(settings ? upload-token-file);
          message = "set uploadTokenFile instead of settings.upload-token-file: the token is handed to the sandboxed service through LoadCredential.";
        }
        {
          assertion = settings.data-dir == stateDir;
          message = "the data directory is the unit's StateDirectory, ${stateDir}; do not set settings.data-dir (bind-mount another disk onto /var/lib/private/nix-p2p-cache instead).";
        }
        {
          assertion = cfg.s3CredentialsFile == null || !(inStore cfg.s3CredentialsFile);
          message = "s3CredentialsFile must not lie in the Nix store (it is world-readable); give the path of a file outside it as a string.";
        }
        {
          assertion =
            (settings.storage or null) != null
            || (cfg.s3Endpoint == null && cfg.s3CacheSize == null && cfg.s3CredentialsFile == null);
          message = "s3Endpoint, s3CacheSize and s3CredentialsFile only apply with storage = \"s3://BUCKET[/PREFIX]\".";
        }
        {
          assertion = p2p || cfg.bootstrapPeers == [ ];
          message = "bootstrapPeers are set but p2pPort = null turns the P2P layer off.";
        }
      ];
    };
}
