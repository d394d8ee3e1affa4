# NixOS VM test of the module: `seed` holds a signed path (uploaded to its daemon with
# `nix copy --to`); `client` substitutes it through its own daemon, which finds it at the seed
# over P2P (bootstrapped from the seed's address and peer id). No internet: upstreams = [ ].
#
# NOT RUN YET: it was written on a machine without nixpkgs or KVM, where only its parsing (CI)
# and the module's evaluation with nixpkgs' lib (eval-test/) could be checked. Run it with
#   nix build .#checks.x86_64-linux.vm-test          # flake
#   nix-build nixos-module/test.nix                   # nixpkgs on NIX_PATH
{
  pkgs ? import <nixpkgs> { },
  module ? ./default.nix,
}:
let
  inherit (pkgs) lib;

  cacheKey = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
  # The repository's test signing key (testdata/nix/README.md): the seed signs the path with
  # it; both daemons and the client's Nix trust it.
  testKey = lib.removeSuffix "\n" (builtins.readFile ../testdata/nix/test-key-1.pk);
  testSecretKey = ../testdata/nix/test-key-1.sk;

  # A fixed libp2p node key for the seed (libp2p's protobuf encoding of an ed25519 key pair,
  # made once with `nix-p2p-cache daemon --p2p-listen …` in an empty data dir), so the
  # client's bootstrapPeers can name the seed's peer id. Test-only: a real node generates its
  # key in its data dir on first start and prints its peer id.
  seedNodeKey = pkgs.runCommand "seed-node.key" { } ''
    echo 'CAESQLm9S51GXkZTniA6jyzy6ZuCKvNVCKiwUbbl1+iYqabk9aY3YHTvpygFf9UxUcC8cibVN3R1nPVykp22rNnZUY0=' | base64 -d > $out
  '';
  seedPeerId = "12D3KooWSMH4H4JC4LXD4pyo4KuJkRaBAteWUqZ1eoDuTgtnUB3A";

  token = "vm-test-upload-token";
in
pkgs.testers.runNixOSTest {
  name = "nix-p2p-cache";

  nodes = {
    seed =
      { ... }:
      {
        imports = [ module ];
        services.nix-p2p-cache = {
          enable = true;
          role = "seed"; # upstreams default to [ ] for a seed
          openFirewall = true;
          trustedPublicKeys = [
            cacheKey
            testKey
          ];
          uploadTokenFile = "/etc/nix-p2p-cache/upload-token";
          settings.no-mdns = true; # the client must find the seed through bootstrapPeers
        };
        # /etc files with a mode are copies (still in the store: fine for a test token).
        environment.etc."nix-p2p-cache/upload-token" = {
          text = token;
          mode = "0400";
        };
        environment.etc."nix-p2p-cache/test-signing-key".source = testSecretKey;
        environment.etc."nix-p2p-cache/upload-netrc" = {
          text = "machine 127.0.0.1 login upload password ${token}\n";
          mode = "0400";
        };
        # Runs as the dynamic user, after systemd created the StateDirectory.
        systemd.services.nix-p2p-cache.serviceConfig.ExecStartPre = "${pkgs.coreutils}/bin/install -m 0600 ${seedNodeKey} /var/lib/nix-p2p-cache/node.key";
        nix.settings.experimental-features = [ "nix-command" ];
        environment.systemPackages = [ pkgs.curl ];
      };

    client =
      { nodes, ... }:
      {
        imports = [ module ];
        services.nix-p2p-cache = {
          enable = true;
          role = "peer";
          upstreams = [ ];
          maxCacheSize = "1G";
          trustedPublicKeys = [
            cacheKey
            testKey
          ];
          bootstrapPeers = [ "/ip4/${nodes.seed.networking.primaryIPAddress}/tcp/7421/p2p/${seedPeerId}" ];
          settings.no-mdns = true;
        };
        # cache.nixos.org stays in the list behind the daemon; there is no internet.
        nix.settings.connect-timeout = 1;
        environment.systemPackages = [ pkgs.curl ];
      };
  };

  testScript = ''
    start_all()

    with subtest("seed: the daemon runs with its fixed identity, hardened"):
        seed.wait_for_unit("nix-p2p-cache.service")
        seed.wait_for_open_port(7420)
        seed.wait_for_open_port(7421)
        seed.wait_until_succeeds("journalctl -u nix-p2p-cache -o cat | grep -q 'listening /ip4/.*/p2p/${seedPeerId}'")
        seed.succeed("systemctl show nix-p2p-cache -p DynamicUser | grep -qx DynamicUser=yes")
        seed.succeed("systemctl cat nix-p2p-cache | grep -q '^LoadCredential=upload-token:/etc/nix-p2p-cache/upload-token'")
        # The substituter is bound to loopback only.
        seed.fail("ss -Htln | grep -q '0.0.0.0:7420'")

    with subtest("seed: a signed path is uploaded to its daemon"):
        path = seed.succeed("echo 'fetched over P2P' > /tmp/payload && nix-store --add /tmp/payload").strip()
        seed.succeed(f"nix store sign --key-file /etc/nix-p2p-cache/test-signing-key {path}")
        # Without the token the upload is refused.
        seed.fail(f"nix copy --to http://127.0.0.1:7420 {path}")
        seed.succeed(f"nix copy --option netrc-file /etc/nix-p2p-cache/upload-netrc --to http://127.0.0.1:7420 {path}")
        h = path.removeprefix("/nix/store/")[:32]
        seed.succeed(f"curl -fs http://127.0.0.1:7420/{h}.narinfo | grep -q '^Sig: test-key-1:'")

    with subtest("seed: nix-p2p-cache-admin runs the CLI as the service, with its token"):
        seed.succeed("nix-p2p-cache-admin stats --json | grep -q '\"narinfos\": 1'")
        # Through the running daemon's API, authenticated with the unit's upload token.
        seed.succeed(f"nix-p2p-cache-admin pin {path} | grep -q '^already pinned: '")

    with subtest("client: Nix is pointed at its daemon"):
        client.succeed("grep -Eq '^substituters = http://127.0.0.1:7420( |$)' /etc/nix/nix.conf")
        client.succeed("grep -q '${testKey}' /etc/nix/nix.conf")
        client.wait_for_unit("nix-p2p-cache.service")
        client.wait_for_open_port(7420)
        # Bootstrap peers are re-dialled every 30 s; a restart just makes it immediate.
        client.succeed("systemctl restart nix-p2p-cache")
        client.wait_until_succeeds("journalctl -u nix-p2p-cache -o cat | grep -q 'connected to bootstrap peer'")

    with subtest("client: the path is substituted through its daemon from the seed"):
        client.fail(f"nix-store --check-validity {path}")
        client.wait_until_succeeds(f"curl -fs http://127.0.0.1:7420/{h}.narinfo | grep -q '^Sig: test-key-1:'", timeout=60)
        client.succeed(f"nix-store --realise {path}")
        assert client.succeed(f"cat {path}") == "fetched over P2P\n"
        # The client's daemon now holds it.
        client.wait_until_succeeds("curl -fs http://127.0.0.1:7420/metrics | grep -qx 'nix_p2p_cache_store_narinfos 1'")

    with subtest("a stopped daemon: Nix moves on (and here fails: nothing else has the path)"):
        client.succeed("systemctl stop nix-p2p-cache")
        client.succeed(f"nix-store --delete {path}")
        rc, out = client.execute(f"timeout 60 nix-store --realise {path} 2>&1")
        assert rc not in (0, 124), f"rc={rc}: {out}"
  '';
}
