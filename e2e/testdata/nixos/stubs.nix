# Loose stand-ins for the NixOS options that kiss-onion's modules set outside
# their own, and a package set with just the packages they use: enough to
# evaluate the modules with lib.evalModules and no nixpkgs.
{ lib }:

let
  inherit (lib) mkOption types;

  fakeDrv = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };

  # Like nixpkgs' TOML format: the type of a settings tree, and a generate
  # whose result also carries the value, for the tests to read back.
  tomlValue =
    let
      value =
        types.nullOr (
          types.oneOf [
            types.bool
            types.int
            types.float
            types.str
            types.path
            (types.attrsOf value)
            (types.listOf value)
          ]
        )
        // {
          description = "TOML value";
        };
    in
    value;

  basePkgs = {
    coreutils = fakeDrv "coreutils";
    tor = fakeDrv "tor";
    gitMinimal = fakeDrv "git-minimal";
    nix = fakeDrv "nix";
    formats.toml = { }: {
      type = types.attrsOf tomlValue;
      generate = name: value: fakeDrv name // { inherit value; };
    };
    buildGoModule = args: fakeDrv "${args.pname}-${args.version}" // args;
  };

  # Overlays applied one after the other, each seeing its own result as
  # final: enough for an overlay that adds a package with callPackage.
  applyOverlays =
    pkgs: overlays:
    lib.foldl' (
      acc: overlay:
      let
        final = withCallPackage (acc // overlay final acc);
      in
      final
    ) (withCallPackage pkgs) overlays;

  callPackageWith =
    pkgs: fn: extra:
    let
      f = if builtins.isFunction fn then fn else import fn;
    in
    f (builtins.intersectAttrs (builtins.functionArgs f) (pkgs // { inherit lib; }) // extra);

  withCallPackage =
    pkgs:
    let
      self = pkgs // {
        callPackage = callPackageWith self;
      };
    in
    self;

  loose = mkOption {
    type = types.attrsOf types.anything;
    default = { };
  };
in
{
  inherit fakeDrv;

  pkgs = withCallPackage basePkgs;

  # The nixpkgs flake input, as far as flake.nix uses it.
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (
      system: withCallPackage (basePkgs // { inherit system; })
    );
  };

  module =
    { config, ... }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        systemd.services = loose;
        systemd.timers = loose;
        systemd.tmpfiles.rules = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        users.users = loose;
        users.groups = loose;
        environment.etc = loose;
        environment.systemPackages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        nix.package = mkOption {
          type = types.package;
          default = basePkgs.nix;
        };
        nix.settings = mkOption {
          type = types.submodule {
            freeformType = types.attrsOf types.anything;
            options.substituters = mkOption {
              type = types.listOf types.str;
              default = [ ];
            };
            options.trusted-public-keys = mkOption {
              type = types.listOf types.str;
              default = [ ];
            };
          };
          default = { };
        };
        networking.hostName = mkOption {
          type = types.str;
          default = "nixos";
        };
        nixpkgs.overlays = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
      };
      config._module.args.pkgs = applyOverlays basePkgs config.nixpkgs.overlays;
    };
}
