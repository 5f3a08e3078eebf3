# The client gateway: `kiss-onion proxy` holds this machine's key bundle and
# serves the cache on loopback (or to the LAN, lanCache), and the
# nix-daemon substitutes from it.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkEnableOption mkIf mkOption types;
  cfg = config.services.kiss-onion.proxy;
  package = config.services.kiss-onion.package;
  kolib = import ./lib.nix { inherit lib; };
  listenHost = if cfg.lanCache.listenAddress != null then cfg.lanCache.listenAddress else "127.0.0.1";
  # The nix-daemon of this machine reaches the gateway where it listens
  # (on loopback for an address that means every interface).
  url = "http://${if listenHost == "0.0.0.0" then "127.0.0.1" else listenHost}:${toString cfg.port}";
  cacheDir = "/var/cache/kiss-onion-proxy";
  stateDir = "/var/lib/kiss-onion-proxy";
  isLoopback = addr: builtins.match "(127\\.[0-9.]+|\\[::1]|localhost):[0-9]+" addr != null;
  allowRemote = builtins.elem "--allow-remote" cfg.extraArgs;
in
{
  imports = [ ./common.nix ];

  options.services.kiss-onion.proxy = {
    enable = mkEnableOption "the kiss-onion gateway (`kiss-onion proxy`), and the cache as a substituter of the nix-daemon";

    bundle = mkOption {
      type = kolib.secretPath;
      example = "/var/lib/kiss-onion-secrets/laptop.bundle";
      description = ''
        The key bundle this machine reaches the cache with (a directory from
        `kiss-onion keys add` or `keys export`: client.key, the .auth_private
        files and kiss-onion.toml), readable by root only. A string, read at
        run time: it never enters the Nix store.
      '';
    };

    port = mkOption {
      type = types.port;
      default = 37510;
      description = "The loopback port of the gateway: the nix-daemon substitutes from http://127.0.0.1:<port>.";
    };

    write = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Forward to the write onion instead of the read onion (a writer's
        bundle only): `nix copy --to http://127.0.0.1:<port>` then uploads.
        Reads keep working through it.
      '';
    };

    trustedPublicKeys = mkOption {
      type = types.listOf kolib.nixPublicKey;
      default = [ ];
      example = [ "ci-1:Fo/rQDRyZgn2ML3TRRn1cdj1jkUGrz/hM75WCr5MA0w=" ];
      description = ''
        The keys the cache's paths are signed with (NAME:BASE64), added to
        nix.settings.trusted-public-keys. Nix refuses unsigned paths or paths
        signed by keys it does not trust.
      '';
    };

    prefetch = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Ask the cache for a closure's narinfos in one round trip and fetch
        its NARs ahead of Nix (docs/gateway.md). False forwards every request
        as it is.
      '';
    };

    lanCache = {
      enable = mkEnableOption "a LAN cache: the gateway keeps what it fetched in /var/cache/kiss-onion-proxy across restarts, within lanCache.size, and answers the paths it holds while the onion is away (docs/gateway.md)";

      size = mkOption {
        type = types.strMatching "[0-9]+[KMGT]?(i?B)?";
        default = "10G";
        example = "50G";
        description = "What the LAN cache may hold; the least recently used NARs go first.";
      };

      listenAddress = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "192.168.1.2";
        description = ''
          An address of this machine to serve the other machines of the LAN
          on (at `port`), instead of loopback; they use
          `substituters = http://<listenAddress>:<port>`. Whoever reaches it
          reads the cache with this machine's key, over plain HTTP: a trusted
          LAN only, and open the port in networking.firewall for it.
        '';
      };
    };

    metrics = {
      enable = mkEnableOption "Prometheus metrics of the gateway at http://<metrics.listen>/metrics (see docs/operating.md)";

      listen = mkOption {
        type = types.str;
        default = "127.0.0.1:37513";
        example = "127.0.0.1:9438";
        description = ''
          Where the gateway serves its metrics (host:port), for a Prometheus
          on the same machine: whether the onion is reachable, the circuits,
          the requests and their bytes (counts, never keys, addresses or
          store paths). A non-loopback address also needs `"--allow-remote"`
          in extraArgs and an open firewall port.
        '';
      };
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--tor-config"
        "/etc/kiss-onion/bridges.torrc"
      ];
      description = "More arguments for `kiss-onion proxy`.";
    };
  };

  config = mkIf cfg.enable {
    nix.settings.substituters = [ url ];
    nix.settings.trusted-public-keys = cfg.trustedPublicKeys;
    # While the onion is unreachable the gateway answers 404 for narinfos,
    # so that builds carry on without the cache; Nix remembers a 404 for
    # narinfo-cache-negative-ttl (an hour by default). A minute brings the
    # cache back within about a minute of the onion's return, for the
    # price of asking the substituters again, once a minute at most, for
    # paths they lack. `fallback` stays off: the gateway's answers already
    # make Nix build what it cannot fetch, and fallback = true would also
    # turn every flaky download from another substituter into a build
    # from source. Both are defaults: nix.settings overrides them.
    nix.settings.narinfo-cache-negative-ttl = lib.mkDefault 60;

    assertions = [
      {
        assertion = !(kolib.underHome cfg.bundle);
        message = "services.kiss-onion.proxy.bundle = \"${cfg.bundle}\": the gateway cannot read /root, /home or /run/user (ProtectHome); keep the bundle elsewhere, like /var/lib/kiss-onion-secrets/";
      }
      {
        assertion = !(cfg.write && (cfg.lanCache.enable || cfg.lanCache.listenAddress != null));
        message = "services.kiss-onion.proxy.lanCache is for reading: not with write = true";
      }
      {
        assertion = !cfg.metrics.enable || isLoopback cfg.metrics.listen || allowRemote || cfg.lanCache.listenAddress != null;
        message = "services.kiss-onion.proxy.metrics.listen = \"${cfg.metrics.listen}\" is not a loopback address: the gateway refuses it unless services.kiss-onion.proxy.extraArgs has \"--allow-remote\" (then open the port in networking.firewall)";
      }
    ];

    warnings = lib.optional (cfg.trustedPublicKeys == [ ]) "services.kiss-onion.proxy.trustedPublicKeys is empty: the nix-daemon will refuse every path from the cache that is not signed by a key it already trusts";

    environment.systemPackages = [ package ];

    systemd.services.kiss-onion-proxy = {
      description = "kiss-onion gateway into the cache's onion";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      path = [ pkgs.tor ];

      serviceConfig = {
        ExecStart = kolib.execLine (
          [
            "${package}/bin/kiss-onion"
            "proxy"
            "--bundle"
            cfg.bundle
            "--listen"
            "${listenHost}:${toString cfg.port}"
            "--state-dir"
            stateDir
          ]
          ++ lib.optional cfg.write "--write"
          ++ lib.optional (!cfg.prefetch) "--prefetch=false"
          ++ lib.optionals cfg.lanCache.enable [
            "--cache-dir"
            cacheDir
            "--cache-size"
            cfg.lanCache.size
          ]
          ++ lib.optional (cfg.lanCache.listenAddress != null && !allowRemote) "--allow-remote"
          ++ lib.optionals cfg.metrics.enable [
            "--metrics-listen"
            cfg.metrics.listen
          ]
          ++ cfg.extraArgs
        );
        Restart = "on-failure";
        RestartSec = "5s";
        # Root, to read the root-only bundle, but with no capabilities: it
        # can write only its own state directory and /tmp.
        StateDirectory = "kiss-onion-proxy";
        StateDirectoryMode = "0700";
        CacheDirectory = mkIf cfg.lanCache.enable "kiss-onion-proxy";
        CacheDirectoryMode = mkIf cfg.lanCache.enable "0700";
        WorkingDirectory = stateDir;
      }
      // kolib.sandbox;
    };
  };
}
