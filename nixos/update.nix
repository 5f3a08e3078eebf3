# Pull-based deployment: a timer runs `kiss-onion update`, which switches this
# machine to the system its marker in the cache names.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkEnableOption mkIf mkOption types;
  cfg = config.services.kiss-onion.update;
  package = config.services.kiss-onion.package;
  kolib = import ./lib.nix { inherit lib; };
  stateDir = "/var/lib/kiss-onion-update";
in
{
  imports = [ ./common.nix ];

  options.services.kiss-onion.update = {
    enable = mkEnableOption "pull-based deployment: a timer that runs `kiss-onion update` to switch to the system the cache's marker names";

    action = mkOption {
      type = types.enum [
        "switch"
        "boot"
      ];
      default = "switch";
      description = "Activate the new system at once (`switch`) or at the next boot (`boot`).";
    };

    marker = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "The marker (gcroots/<marker> in the cache) that names this machine's system.";
    };

    interval = mkOption {
      type = types.str;
      default = "15min";
      example = "1h";
      description = "How long after each run the next one starts: a systemd time span (like 5min, 1h). The first run is 5 minutes after boot.";
    };

    publisherKey = mkOption {
      type = types.nullOr kolib.nixPublicKey;
      default = null;
      example = "fleet-1:Fo/rQDRyZgn2ML3TRRn1cdj1jkUGrz/hM75WCr5MA0w=";
      description = ''
        The public key (NAME:BASE64) that signs the markers (publish's
        --signing-key). Update then refuses a marker it does not sign, and a
        signed marker older than the last one applied (a rollback).
      '';
    };

    allowUnsigned = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Accept plain, unsigned markers: whoever can write the marker decides
        what this machine runs. Needed when publisherKey is not set.
      '';
    };

    bundle = mkOption {
      type = kolib.secretPath;
      example = "/var/lib/kiss-onion-secrets/web1.bundle";
      description = ''
        The key bundle update reaches the cache with (a reader's is enough),
        readable by root only. A string, read at run time: it never enters
        the Nix store.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--profile"
        "/nix/var/nix/profiles/system"
      ];
      description = "More arguments for `kiss-onion update`.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.publisherKey != null || cfg.allowUnsigned;
        message = ''
          services.kiss-onion.update: set publisherKey to the public key that signs the markers
          (services.kiss-onion.publish.signingKeyFile on the publisher), so that update verifies them
          and refuses rollbacks, or set services.kiss-onion.update.allowUnsigned = true to accept
          plain, unsigned markers.'';
      }
      {
        assertion = !(cfg.publisherKey != null && cfg.allowUnsigned);
        message = "services.kiss-onion.update: publisherKey and allowUnsigned = true contradict each other: with a publisher key, unsigned markers are refused; drop one";
      }
      {
        assertion = kolib.isName cfg.marker;
        message = "services.kiss-onion.update.marker = \"${cfg.marker}\" is not a marker name (1 to 64 letters, digits, '-', '_' and '.', not starting with '.' or '-'); set it, or networking.hostName";
      }
    ];

    environment.systemPackages = [ package ];

    systemd.services.kiss-onion-update = {
      description = "kiss-onion update: switch to the system the cache's marker names";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # This service runs switch-to-configuration itself: the switch must
      # neither restart nor stop it.
      restartIfChanged = false;
      unitConfig.X-StopOnRemoval = false;
      path = [
        config.nix.package
        pkgs.tor
        pkgs.coreutils
      ];
      environment.HOME = stateDir;

      serviceConfig = {
        Type = "oneshot";
        ExecStart = kolib.execLine (
          [
            "${package}/bin/kiss-onion"
            "update"
            cfg.action
            "--bundle"
            cfg.bundle
            "--marker"
            cfg.marker
            "--state-dir"
            stateDir
          ]
          ++ (if cfg.publisherKey != null then [ "--publisher-key" cfg.publisherKey ] else [ "--allow-unsigned" ])
          ++ cfg.extraArgs
        );
        StateDirectory = "kiss-onion-update";
        StateDirectoryMode = "0700";
        # 75 (EX_TEMPFAIL): the cache was unreachable (this machine offline,
        # the cache off) and nothing changed; the next run tries again.
        SuccessExitStatus = [ 75 ];
        # No sandboxing: the activation runs inside this service, and its
        # mounts must land in the machine's mount namespace.
      };
    };

    systemd.timers.kiss-onion-update = {
      description = "Run kiss-onion update regularly";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnBootSec = "5min";
        OnUnitActiveSec = cfg.interval;
        RandomizedDelaySec = "1min";
      };
    };
  };
}
