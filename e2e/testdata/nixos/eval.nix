# Evaluates kiss-onion's NixOS modules with lib.evalModules over the real
# nixpkgs lib, as a user imports them (modules: a comma-separated list of the
# flake's nixosModules, or "nixos-dir" for a plain import of nixos/ without
# the overlay), plus the given configuration module, and returns what
# e2e/nixos_test.go checks.
# libPath (nixpkgs' lib directory) and repo (the repository) are strings.
{
  libPath,
  repo,
  module,
  modules ? "default",
}:

let
  lib = import (/. + libPath);
  repoPath = /. + repo;
  stubs = import ./stubs.nix { inherit lib; };

  flake = import (repoPath + "/flake.nix");
  outputs = flake.outputs {
    self = outputs // {
      outPath = repoPath;
      lastModifiedDate = "20260102030405";
    };
    inherit (stubs) nixpkgs;
  };

  imported = map (
    name: if name == "nixos-dir" then repoPath + "/nixos" else outputs.nixosModules.${name}
  ) (lib.splitString "," modules);

  inherit
    (lib.evalModules {
      modules = [
        stubs.module
        module
      ]
      ++ imported;
    })
    config
    ;

  pkg = outputs.packages.x86_64-linux.default;
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  inherit (config) warnings;
  systemd = {
    inherit (config.systemd) services timers;
    tmpfiles = config.systemd.tmpfiles.rules;
  };
  # A file's text, or the value a generated file (stubs' formats.toml) holds.
  etc = lib.mapAttrs (
    _: e: if e ? text then e.text else e.source.value or (toString e.source)
  ) config.environment.etc;
  nix = {
    inherit (config.nix.settings) substituters trusted-public-keys;
  };
  users = lib.attrNames config.users.users;
  overlays = lib.length config.nixpkgs.overlays;
  packages = map toString config.environment.systemPackages;

  flake = {
    systems = lib.attrNames outputs.packages;
    modules = lib.attrNames outputs.nixosModules;
    package = {
      inherit (pkg)
        pname
        vendorHash
        subPackages
        doCheck
        ;
    };
    overlayAdds = lib.attrNames (outputs.overlays.default stubs.pkgs stubs.pkgs);
  };
}
