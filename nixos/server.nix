# The cache appliance: `kiss-onion serve` as a hardened systemd service,
# published as a read onion and a write onion, with declarative client keys.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    types
    ;
  cfg = config.services.kiss-onion;
  kolib = import ./lib.nix { inherit lib; };
  toml = pkgs.formats.toml { };

  etcDir = "/etc/kiss-onion";
  configPath = "${etcDir}/kiss-onion.toml";
  clientsPath = "${etcDir}/clients.toml";
  torrcPath = "${etcDir}/torrc";
  # Where systemd puts the unit's LoadCredential files.
  credentialsDir = "/run/credentials/kiss-onion.service";

  clientKey = types.submodule {
    options.publicKey = mkOption {
      type = kolib.publicKey;
      example = "PLPUWH4M5DIRWB2EQH4B2ANJTBNLMCBL3V6P4OI2B5KQHDR2PQXA";
      description = ''
        The client's x25519 public key in Tor's form (52 base32 characters),
        as `kiss-onion keys add` registers it (the `public_key` of the
        bundle's kiss-onion.toml). Only public keys belong here: the private
        half stays in the client's bundle, never in the Nix store.
      '';
    };
  };

  # The clients file is in the format of the registry `kiss-onion keys`
  # keeps (clients.toml in the state directory). Names and keys are checked
  # (assertions, option types), so they need no TOML escaping beyond quotes.
  clientEntry = role: name: c: ''

    [[client]]
    name = ${builtins.toJSON name}
    role = "${role}"
    public_key = ${builtins.toJSON c.publicKey}
    created = 1970-01-01T00:00:00Z
  '';
  clientsText =
    ''
      # kiss-onion clients from services.kiss-onion.readers and .writers (NixOS).
      # Declared keys have no creation time: the format wants one.
      version = 1
    ''
    + lib.concatStrings (lib.mapAttrsToList (clientEntry "reader") cfg.readers)
    + lib.concatStrings (lib.mapAttrsToList (clientEntry "writer") cfg.writers);
  configFile = toml.generate "kiss-onion.toml" cfg.settings;
  # Secrets the unit reads at run time (LoadCredential), never from the store.
  credentials =
    lib.optionals (cfg.tls.enable && cfg.tls.certFile != null && cfg.tls.keyFile != null) [
      "tls-cert:${cfg.tls.certFile}"
      "tls-key:${cfg.tls.keyFile}"
    ]
    ++ lib.optional (cfg.store.credentialsFile != null) "s3-credentials:${cfg.store.credentialsFile}";

  stateUnder = kolib.managedUnder "/var/lib" cfg.stateDir;
  cacheUnder = kolib.managedUnder "/var/cache" cfg.cacheDir;

  allNames = lib.attrNames cfg.readers ++ lib.attrNames cfg.writers;
  badNames = lib.filter (n: !kolib.isName n) allNames;
  bothRoles = lib.filter (n: cfg.writers ? ${n}) (lib.attrNames cfg.readers);
  keyOwners = lib.foldlAttrs (
    acc: name: c:
    let
      k = lib.toUpper c.publicKey;
    in
    acc // { ${k} = (acc.${k} or [ ]) ++ [ name ]; }
  ) { } (cfg.readers // cfg.writers);
  sharedKeys = lib.filter (names: lib.length names > 1) (lib.attrValues keyOwners);
  within = dir: parent: dir == parent || lib.hasPrefix "${parent}/" dir;
  isLoopback = addr: builtins.match "(127\\.[0-9.]+|\\[::1]|localhost):[0-9]+" addr != null;
  # An OIDC rule: claim=value pairs joined by commas (serve says more).
  oidcRule = types.strMatching "[^,=]+=[^,]+(,[^,=]+=[^,]+)*";
  oidcIssuerOK =
    lib.hasPrefix "https://" cfg.oidc.issuer
    || builtins.match "http://(127\\.[0-9.]+|\\[::1]|localhost)(:[0-9]+)?(/.*)?" cfg.oidc.issuer != null;
in
{
  imports = [ ./common.nix ];

  options.services.kiss-onion = {
    enable = mkEnableOption "the kiss-onion cache server (`kiss-onion serve`)";

    cacheDir = mkOption {
      type = kolib.absolutePath;
      default = "/var/cache/kiss-onion";
      example = "/srv/nix-cache";
      description = ''
        The cache directory: a flat Nix binary cache, valid as a `file://`
        cache at every instant. Under /var/cache it is the service's
        CacheDirectory; elsewhere it is created by systemd-tmpfiles.
      '';
    };

    store = {
      url = mkOption {
        type = types.nullOr (types.strMatching "s3://.+");
        default = null;
        example = "s3://nix-cache/main?endpoint=http://10.0.0.5:8333&region=us-east-1";
        description = ''
          Keep the cache in an S3-compatible bucket instead of cacheDir:
          `s3://BUCKET/PREFIX` with `endpoint=`, `region=` and `scheme=` as
          Nix's own S3 stores take them (AWS's endpoint when none is given).
          Several servers may share one bucket, each with its own onions.
          See docs/s3.md.
        '';
      };

      credentialsFile = mkOption {
        type = types.nullOr kolib.secretPath;
        default = null;
        example = "/run/secrets/kiss-onion-s3";
        description = ''
          An AWS credentials file (`[default]`, `aws_access_key_id`,
          `aws_secret_access_key`) with the bucket's keys, read at run time
          as a systemd credential: it never enters the Nix store. Without
          it the keys come from the service's environment.
        '';
      };
    };

    stateDir = mkOption {
      type = kolib.absolutePath;
      default = "/var/lib/kiss-onion";
      description = ''
        The state directory (mode 0700): the onion identities, the client
        registry of `kiss-onion keys`, Tor's data, and the onion addresses in
        `read.onion` and `write.onion`. Never inside cacheDir.
      '';
    };

    readers = mkOption {
      type = types.attrsOf clientKey;
      default = { };
      example = lib.literalExpression ''
        { laptop.publicKey = "PLPUWH4M5DIRWB2EQH4B2ANJTBNLMCBL3V6P4OI2B5KQHDR2PQXA"; }
      '';
      description = ''
        Clients that may read (substitute from) the cache: name to public key.
        They are authorized on the read onion. Keys added with
        `kiss-onion keys add` count as well.
      '';
    };

    writers = mkOption {
      type = types.attrsOf clientKey;
      default = { };
      example = lib.literalExpression ''
        { ci.publicKey = "D5JEPTBFBA3VHB7YW4HWRXNCWC2IQRZNYGAG3P7UPNGB2YO5BYUA"; }
      '';
      description = ''
        Clients that may also write (upload closures, GC-root markers, locks):
        name to public key. They are authorized on both onions. The write
        onion needs at least one.
      '';
    };

    publicRead = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Publish the read onion without client authorization: anyone who
        learns its address can download the whole cache. The write onion
        always requires a writer key.
      '';
    };

    priority = mkOption {
      type = types.ints.unsigned;
      default = 30;
      description = "The cache's priority in nix-cache-info (lower is preferred; cache.nixos.org has 40).";
    };

    trustedWriterKeys = mkOption {
      type = types.listOf kolib.nixPublicKey;
      default = [ ];
      example = [ "ci-1:Fo/rQDRyZgn2ML3TRRn1cdj1jkUGrz/hM75WCr5MA0w=" ];
      description = ''
        Nix signing keys (NAME:BASE64): when not empty, an upload is accepted
        only when its narinfo is signed by one of them.
      '';
    };

    prune = {
      enable = mkEnableOption "pruning, inside the server, of what no GC root in gcroots/ reaches";

      interval = mkOption {
        type = kolib.goDuration;
        default = "1h";
        example = "6h";
        description = "How often the server prunes: a Go duration (like 30m, 6h or 168h).";
      };

      maxRootAge = mkOption {
        type = types.nullOr kolib.goDuration;
        default = null;
        example = "720h";
        description = ''
          A GC-root marker older than this (by its modification time) no
          longer counts: a Go duration (like 720h for 30 days). Null keeps
          markers for good.
        '';
      };
    };

    upstream = {
      urls = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "https://cache.nixos.org" ];
        description = ''
          Upstream caches, tried in order, for a narinfo the cache lacks
          (fallback): the path is fetched with its closure, checked against
          `upstream.keys` and kept with the upstream's signature. Empty
          turns fallback off. See docs/upstream.md.
        '';
      };

      keys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
        description = ''
          Upstream signing keys (NAME:BASE64): only paths signed by one of
          them are fetched. Readers must trust the same keys, which the
          cache passes on unchanged.
        '';
      };

      viaTor = mkOption {
        type = types.bool;
        default = false;
        description = "Reach the upstreams through the server's own tor, for a machine with no clearnet.";
      };

      timeout = mkOption {
        type = types.nullOr kolib.goDuration;
        default = null;
        example = "10s";
        description = "Connect and answer timeout of upstream requests; null: 5s, 30s through tor.";
      };

      closureTimeout = mkOption {
        type = types.nullOr kolib.goDuration;
        default = null;
        example = "3m";
        description = ''
          How long a narinfo request waits for the narinfos of the path's
          closure from upstream; null: 24 times `timeout`, at most 5m.
        '';
      };

      downloadTimeout = mkOption {
        type = types.nullOr kolib.goDuration;
        default = null;
        example = "4h";
        description = "How long the download of a closure's NARs that a request started may take; null: 1h.";
      };

      keep = mkOption {
        type = types.nullOr kolib.goDuration;
        default = null;
        example = "168h";
        description = ''
          Keep each path fetched from upstream this long after its last
          read (with the marker gcroots/upstream/recent); null: no time
          limit when `maxSize` is set, else until the next prune (enable
          `prune` either way, or the cache only grows).
        '';
      };

      maxSize = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "50G";
        description = ''
          Keep at most this much (NAR files, like 50G) of the paths fetched
          from upstream: past it, the least recently read leave the marker
          gcroots/upstream/recent and the next prune deletes them, unless
          another root reaches them; null: no bound.
        '';
      };

      maxNarSize = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "2G";
        description = "Largest NAR fetched from upstream (like 512M or 8G); null: 8G.";
      };
    };

    listen = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "127.0.0.1:8080";
      description = ''
        Also serve reads on this local address (host:port), for clients on
        the same machine. A non-loopback address also needs
        `settings.allow-remote = true` and an open firewall port.
      '';
    };

    oidc = {
      enable = mkEnableOption "a door taking OpenID Connect tokens (such as GitHub Actions mints) for both roles, on a loopback address for a TLS reverse proxy in front (see docs/oidc.md)";

      issuer = mkOption {
        type = types.str;
        default = "";
        example = "https://token.actions.githubusercontent.com";
        description = ''
          The token issuer's URL (its tokens' `iss`): https, or http only on
          loopback. The server reaches its discovery document at start and
          fails (and is restarted) while it cannot.
        '';
      };

      audience = mkOption {
        type = types.str;
        default = "";
        example = "https://cache.example.org";
        description = ''
          Tokens must hold this audience (`aud`): the value CI asks its token
          for, so that a token minted for another service does not open the
          cache.
        '';
      };

      writers = mkOption {
        type = types.listOf oidcRule;
        default = [ ];
        example = [ "repository=org/infra,ref=refs/heads/main" ];
        description = ''
          Rules (claim=value pairs joined by commas) letting a token write when
          its claims hold every pair, as strings; tried before `readers`.
        '';
      };

      readers = mkOption {
        type = types.listOf oidcRule;
        default = [ ];
        example = [ "repository_owner=org" ];
        description = "Rules letting a token read. A token that no rule matches is refused.";
      };

      listen = mkOption {
        type = types.str;
        default = "127.0.0.1:37513";
        description = ''
          The loopback address (host:port) of the door, plain HTTP: a reverse
          proxy on the same machine terminates TLS in front of it. Never
          another address: tokens cross it in clear.
        '';
      };
    };

    tls = {
      enable = mkEnableOption "the TLS door: both roles on one HTTPS port, to clients with a certificate from `kiss-onion keys add --tls` (see docs/tls.md)";

      listen = mkOption {
        type = types.str;
        default = "127.0.0.1:8443";
        example = "0.0.0.0:8443";
        description = ''
          Where the TLS door listens (host:port). A non-loopback address also
          needs `settings.allow-remote = true` and an open firewall port.
        '';
      };

      names = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [
          "cache.lan"
          "192.168.1.5"
        ];
        description = ''
          The DNS names and IP addresses clients reach the door at, put in
          the cache's own server certificate (signed by its CA in stateDir).
          The first makes the URL that `kiss-onion keys add --tls` writes
          into bundles. Not with certFile, whose certificate names its hosts.
        '';
      };

      certFile = mkOption {
        type = types.nullOr kolib.secretPath;
        default = null;
        example = "/var/lib/kiss-onion-secrets/cache.lan.crt";
        description = ''
          A PEM server certificate (with its chain) to serve instead of the
          cache's own; clients then trust it through their system's roots.
          Read at run time (as a systemd credential, so it may be root's
          alone), never copied into the Nix store. With keyFile. systemd
          copies credentials when the unit starts: after a renewal, restart
          kiss-onion.service (security.acme.certs.<name>.reloadServices).
        '';
      };

      keyFile = mkOption {
        type = types.nullOr kolib.secretPath;
        default = null;
        example = "/var/lib/kiss-onion-secrets/cache.lan.key";
        description = "The private key of certFile, read at run time as a systemd credential.";
      };
    };

    metrics = {
      enable = mkEnableOption "Prometheus metrics of the server at http://<metrics.listen>/metrics (see docs/operating.md)";

      listen = mkOption {
        type = types.str;
        default = "127.0.0.1:37512";
        example = "127.0.0.1:9437";
        description = ''
          Where the server serves its metrics (host:port), for a Prometheus
          on the same machine. A non-loopback address also needs
          `settings.allow-remote = true` and an open firewall port: the
          metrics say how busy the cache is and who may use it (counts,
          never keys or store paths).
        '';
      };
    };

    tor.extraConfig = mkOption {
      type = types.lines;
      default = "";
      example = ''
        UseBridges 1
        Bridge obfs4 192.0.2.10:443 0123456789ABCDEF0123456789ABCDEF01234567 cert=... iat-mode=0
      '';
      description = "Extra torrc lines for the server's own tor (written to ${torrcPath}, passed as --tor-config).";
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = toml.type;
        options.tor = mkOption {
          type = types.enum [
            "public"
            "local"
            "off"
          ];
          default = "public";
          description = ''
            How the cache reaches its clients: `public` (onions on the Tor
            network), `local` (a private, offline Tor network, for demos) or
            `off` (local listeners only).
          '';
        };
      };
      default = { };
      example = {
        max-upload-size = "16G";
        log-format = "json";
        listen-write = "127.0.0.1:8081";
      };
      description = ''
        Settings for `kiss-onion serve`, written to ${configPath} and passed
        as `--config`: every serve flag, by its name, can be a key. The
        options above are set here; setting one of them here as well to a
        different value is a conflict.
      '';
    };
  };

  config = mkIf cfg.enable {
    services.kiss-onion.settings = {
      cache-dir = cfg.cacheDir;
      store = mkIf (cfg.store.url != null) cfg.store.url;
      s3-credentials = mkIf (cfg.store.credentialsFile != null) "${credentialsDir}/s3-credentials";
      state-dir = cfg.stateDir;
      clients-file = clientsPath;
      public-read = cfg.publicRead;
      priority = cfg.priority;
      trusted-writer-key = mkIf (cfg.trustedWriterKeys != [ ]) cfg.trustedWriterKeys;
      listen = mkIf (cfg.listen != null) cfg.listen;
      tor-config = mkIf (cfg.tor.extraConfig != "") torrcPath;
      prune-interval = mkIf cfg.prune.enable cfg.prune.interval;
      max-root-age = mkIf (cfg.prune.enable && cfg.prune.maxRootAge != null) cfg.prune.maxRootAge;
      metrics-listen = mkIf cfg.metrics.enable cfg.metrics.listen;
      listen-tls = mkIf cfg.tls.enable cfg.tls.listen;
      tls-name = mkIf (cfg.tls.enable && cfg.tls.names != [ ]) cfg.tls.names;
      tls-cert = mkIf (cfg.tls.enable && cfg.tls.certFile != null) "${credentialsDir}/tls-cert";
      tls-key = mkIf (cfg.tls.enable && cfg.tls.keyFile != null) "${credentialsDir}/tls-key";
      upstream = mkIf (cfg.upstream.urls != [ ]) cfg.upstream.urls;
      upstream-key = mkIf (cfg.upstream.urls != [ ]) cfg.upstream.keys;
      upstream-via-tor = mkIf (cfg.upstream.urls != [ ] && cfg.upstream.viaTor) true;
      upstream-timeout = mkIf (cfg.upstream.urls != [ ] && cfg.upstream.timeout != null) cfg.upstream.timeout;
      upstream-keep = mkIf (cfg.upstream.urls != [ ] && cfg.upstream.keep != null) cfg.upstream.keep;
      upstream-closure-timeout = mkIf (cfg.upstream.urls != [ ] && cfg.upstream.closureTimeout != null) cfg.upstream.closureTimeout;
      upstream-download-timeout = mkIf (cfg.upstream.urls != [ ] && cfg.upstream.downloadTimeout != null) cfg.upstream.downloadTimeout;
      upstream-max-size = mkIf (cfg.upstream.urls != [ ] && cfg.upstream.maxSize != null) cfg.upstream.maxSize;
      listen-oidc = mkIf cfg.oidc.enable cfg.oidc.listen;
      oidc-issuer = mkIf cfg.oidc.enable cfg.oidc.issuer;
      oidc-audience = mkIf cfg.oidc.enable cfg.oidc.audience;
      oidc-writer = mkIf (cfg.oidc.enable && cfg.oidc.writers != [ ]) cfg.oidc.writers;
      oidc-reader = mkIf (cfg.oidc.enable && cfg.oidc.readers != [ ]) cfg.oidc.readers;
      upstream-max-nar-size = mkIf (cfg.upstream.urls != [ ] && cfg.upstream.maxNarSize != null) cfg.upstream.maxNarSize;
    };

    assertions = [
      {
        assertion = cfg.upstream.urls == [ ] || cfg.upstream.keys != [ ];
        message = "services.kiss-onion.upstream.urls is set but upstream.keys is empty: what comes from upstream must be signed (for cache.nixos.org: cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=)";
      }
      {
        assertion = !(cfg.upstream.viaTor && cfg.upstream.urls != [ ] && cfg.settings.tor == "off");
        message = "services.kiss-onion.upstream.viaTor needs the server's tor: settings.tor must be public or local";
      }
      {
        assertion = cfg.settings.tor == "off" || cfg.writers != { };
        message = ''
          services.kiss-onion: the write onion needs at least one writer, but services.kiss-onion.writers is empty.
          Add one: services.kiss-onion.writers.<name>.publicKey = "<52 base32 characters>";
          (mint the key pair with `kiss-onion keys add <name> --role writer`), or set
          services.kiss-onion.settings.tor = "off" to serve on local listeners only.'';
      }
      {
        assertion = badNames == [ ];
        message = "services.kiss-onion: client names are 1 to 64 letters, digits, '-', '_' and '.', not starting with '.' or '-': ${lib.concatStringsSep ", " badNames}";
      }
      {
        assertion = bothRoles == [ ];
        message = "services.kiss-onion: ${lib.concatStringsSep ", " bothRoles} listed in both readers and writers: a writer already reads, list each client once";
      }
      {
        assertion = sharedKeys == [ ];
        message = "services.kiss-onion: one public key is listed for several clients (${
          lib.concatMapStringsSep "; " (lib.concatStringsSep ", ") sharedKeys
        }): every client needs its own key";
      }
      {
        assertion = !(within cfg.stateDir cfg.cacheDir);
        message = "services.kiss-onion.stateDir (${cfg.stateDir}) must not be inside cacheDir (${cfg.cacheDir}): the keys would be served with the cache";
      }
      {
        assertion = cfg.listen == null || isLoopback cfg.listen || (cfg.settings.allow-remote or false);
        message = "services.kiss-onion.listen = \"${toString cfg.listen}\" is not a loopback address: serve refuses it unless services.kiss-onion.settings.allow-remote = true (then open the port in networking.firewall)";
      }
      {
        assertion = !cfg.oidc.enable || (oidcIssuerOK && cfg.oidc.audience != "");
        message = "services.kiss-onion.oidc needs issuer (an https URL, http only on loopback) and audience, not issuer = \"${cfg.oidc.issuer}\", audience = \"${cfg.oidc.audience}\"";
      }
      {
        assertion = !cfg.oidc.enable || cfg.oidc.writers != [ ] || cfg.oidc.readers != [ ];
        message = "services.kiss-onion.oidc needs at least one rule in oidc.writers or oidc.readers (like \"repository=org/infra,ref=refs/heads/main\")";
      }
      {
        assertion = !cfg.oidc.enable || isLoopback cfg.oidc.listen;
        message = "services.kiss-onion.oidc.listen = \"${cfg.oidc.listen}\" is not a loopback address: tokens cross it in clear, so serve takes only loopback; put a TLS reverse proxy in front";
      }
      {
        assertion = !cfg.metrics.enable || isLoopback cfg.metrics.listen || (cfg.settings.allow-remote or false);
        message = "services.kiss-onion.metrics.listen = \"${cfg.metrics.listen}\" is not a loopback address: serve refuses it unless services.kiss-onion.settings.allow-remote = true (then open the port in networking.firewall)";
      }
      {
        assertion = !cfg.tls.enable || isLoopback cfg.tls.listen || (cfg.settings.allow-remote or false);
        message = "services.kiss-onion.tls.listen = \"${cfg.tls.listen}\" is not a loopback address: serve refuses it unless services.kiss-onion.settings.allow-remote = true (then open the port in networking.firewall)";
      }
      {
        assertion = (cfg.tls.certFile == null) == (cfg.tls.keyFile == null);
        message = "services.kiss-onion.tls: set certFile and keyFile together";
      }
      {
        assertion = cfg.tls.certFile == null || cfg.tls.names == [ ];
        message = "services.kiss-onion.tls.names names the hosts of the cache's own certificate: with tls.certFile, your certificate names them";
      }
    ];

    warnings = lib.optional cfg.publicRead "services.kiss-onion.publicRead is on: anyone who learns the read onion's address can download the whole cache";

    users.users.kiss-onion = {
      isSystemUser = true;
      group = "kiss-onion";
      description = "kiss-onion cache server";
    };
    users.groups.kiss-onion = { };

    environment.systemPackages = [ cfg.package ];
    environment.etc."kiss-onion/kiss-onion.toml".source = configFile;
    environment.etc."kiss-onion/clients.toml".text = clientsText;
    environment.etc."kiss-onion/torrc" = mkIf (cfg.tor.extraConfig != "") { text = cfg.tor.extraConfig; };

    systemd.tmpfiles.rules =
      lib.optional (stateUnder == null) "d ${cfg.stateDir} 0700 kiss-onion kiss-onion - -"
      ++ lib.optional (cacheUnder == null) "d ${cfg.cacheDir} 0755 kiss-onion kiss-onion - -";

    systemd.services.kiss-onion = {
      description = "kiss-onion, a private Nix binary cache behind Tor";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      path = [ pkgs.tor ];
      # A new configuration restarts the server; new client keys only
      # reload it (SIGHUP: serve reads the clients files again and
      # republishes the onions, as it also does when it sees them change).
      restartTriggers = [ configFile ] ++ lib.optional (cfg.tor.extraConfig != "") cfg.tor.extraConfig;
      reloadTriggers = [ clientsText ];

      serviceConfig = {
        ExecStart = kolib.execLine [
          "${cfg.package}/bin/kiss-onion"
          "serve"
          "--config"
          configPath
        ];
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        User = "kiss-onion";
        Group = "kiss-onion";
        Restart = "on-failure";
        RestartSec = "5s";
        UMask = "0022";
        LimitNOFILE = 65536;

        StateDirectory = mkIf (stateUnder != null) stateUnder;
        StateDirectoryMode = "0700";
        CacheDirectory = mkIf (cacheUnder != null) cacheUnder;
        CacheDirectoryMode = "0755";
        ReadWritePaths = [
          cfg.cacheDir
          cfg.stateDir
        ];
        RemoveIPC = true;
        # The user's server certificate and key, readable by root alone,
        # reach the service here.
        LoadCredential = mkIf (credentials != [ ]) credentials;
      }
      // kolib.sandbox;
    };
  };
}
