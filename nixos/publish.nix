# The publisher: a timer that builds each system and runs `kiss-onion publish`
# to push its closure to the cache and point its marker at it.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkEnableOption mkIf mkOption types;
  cfg = config.services.kiss-onion.publish;
  package = config.services.kiss-onion.package;
  kolib = import ./lib.nix { inherit lib; };
  stateDir = "/var/lib/kiss-onion-publish";
  badNames = lib.filter (n: !kolib.isName n) (lib.attrNames cfg.systems);

  publishArgs = lib.escapeShellArgs (
    [
      "--bundle"
      cfg.bundle
      "--state-dir"
      stateDir
    ]
    ++ lib.optionals (cfg.signingKeyFile != null) [
      "--signing-key"
      cfg.signingKeyFile
    ]
    ++ cfg.extraArgs
  );
in
{
  imports = [ ./common.nix ];

  options.services.kiss-onion.publish = {
    enable = mkEnableOption "a timer that publishes systems to the cache (`kiss-onion publish`), for machines running services.kiss-onion.update";

    systems = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        web1 = "git+https://git.example.org/fleet?ref=main#nixosConfigurations.web1.config.system.build.toplevel";
        web2 = "/nix/store/8l1sxfs0rnjq0k3ms6mqnf4lsaxn4k8p-nixos-system-web2-26.05";
      };
      description = ''
        Marker name to what it names: a flake output reference, built with
        `nix build` on every run (unchanged inputs build nothing), or a store
        path, published as it is.
      '';
    };

    schedule = mkOption {
      type = types.str;
      default = "hourly";
      example = "*:0/15";
      description = "When to publish: a systemd calendar event (OnCalendar=, like hourly or *:0/15).";
    };

    signingKeyFile = mkOption {
      type = types.nullOr kolib.secretPath;
      default = null;
      example = "/var/lib/kiss-onion-secrets/fleet-1.sec";
      description = ''
        The Nix signing key (from `nix-store --generate-binary-cache-key`)
        that signs the markers, so that hosts with update.publisherKey accept
        them and refuse rollbacks. A string, read at run time: it never
        enters the Nix store. Null publishes plain, unsigned markers.
      '';
    };

    bundle = mkOption {
      type = kolib.secretPath;
      example = "/var/lib/kiss-onion-secrets/publisher.bundle";
      description = ''
        A writer's key bundle, readable by root only. A string, read at run
        time: it never enters the Nix store.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "More arguments for `kiss-onion publish`, before the marker name.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.systems != { };
        message = "services.kiss-onion.publish.systems is empty: name at least one marker and its flake output or store path, like web1 = \"/etc/fleet#nixosConfigurations.web1.config.system.build.toplevel\"";
      }
      {
        assertion = badNames == [ ];
        message = "services.kiss-onion.publish.systems: marker names are 1 to 64 letters, digits, '-', '_' and '.', not starting with '.' or '-': ${lib.concatStringsSep ", " badNames}";
      }
    ];

    warnings = lib.optional (cfg.signingKeyFile == null) "services.kiss-onion.publish.signingKeyFile is not set: the markers are unsigned, and hosts whose update has a publisherKey refuse them";

    environment.systemPackages = [ package ];

    systemd.services.kiss-onion-publish = {
      description = "kiss-onion publish: push systems to the cache and point their markers at them";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      restartIfChanged = false;
      path = [
        package
        config.nix.package
        pkgs.gitMinimal
        pkgs.tor
        pkgs.coreutils
      ];
      environment.HOME = stateDir;
      serviceConfig = {
        Type = "oneshot";
        StateDirectory = "kiss-onion-publish";
        StateDirectoryMode = "0700";
        PrivateTmp = true;
      };
      # Every marker is tried; the run fails if any of them failed. A
      # target with a '#' is a flake output, built first.
      script = ''
        status=0
        publish() {
          name=$1 target=$2
          case "$target" in
            *'#'*) path= ;;
            ${builtins.storeDir}/*) path=$target ;;
            *) path= ;;
          esac
          if [ -z "$path" ] && ! path=$(nix --extra-experimental-features 'nix-command flakes' build --no-link --print-out-paths "$target"); then
            echo "kiss-onion: error: publish $name: nix build $target failed" >&2
            status=1
            return 0
          fi
          # $path is unquoted: an output with several paths gives several arguments.
          kiss-onion publish ${publishArgs} "$name" $path || status=1
        }
      ''
      + lib.concatStrings (
        lib.mapAttrsToList (name: target: ''
          publish ${lib.escapeShellArg name} ${lib.escapeShellArg target}
        '') cfg.systems
      )
      + ''
        exit $status
      '';
    };

    systemd.timers.kiss-onion-publish = {
      description = "Run kiss-onion publish on schedule";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.schedule;
        Persistent = true;
      };
    };
  };
}
