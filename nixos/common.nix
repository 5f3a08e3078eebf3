# The option every kiss-onion module shares: the package that provides the
# binary. Each role's module imports this file; the module system loads it
# once however many of them are imported.
{ lib, pkgs, ... }:

{
  options.services.kiss-onion.package = lib.mkOption {
    type = lib.types.package;
    default =
      pkgs.kiss-onion or (throw ''
        services.kiss-onion.package: pkgs has no kiss-onion. Import the module
        through the kiss-onion flake (nixosModules.*, which add its overlays.default),
        add that overlay to nixpkgs.overlays, or set services.kiss-onion.package.
      '');
    defaultText = lib.literalExpression "pkgs.kiss-onion";
    description = ''
      The kiss-onion package: the server, the gateway, `update` and `publish`
      all run its `bin/kiss-onion`. The flake's modules add the flake's overlay,
      so the default is the flake's package, built with this system's nixpkgs.
    '';
  };
}
