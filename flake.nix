{
  description = "kiss-onion: a private Nix binary cache behind Tor";

  # Any nixpkgs whose Go is 1.25 or newer builds it; the overlay and the
  # NixOS modules build with the system's own nixpkgs.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];

      # The package, as a function for callPackage.
      kiss-onion =
        { lib, buildGoModule }:
        buildGoModule {
          pname = "kiss-onion";
          version = "0-unstable-" + builtins.substring 0 8 (self.lastModifiedDate or "19700101");
          src = lib.cleanSource ./.;
          # The NAR hash of `go mod vendor`'s output. e2e/nixos_test.go
          # recomputes it and prints the new one when go.mod or go.sum change.
          vendorHash = "sha256-SRH9ucygW86HJTY+uExlA0F7pG9PR5XOBCtwF7nSgtY=";
          subPackages = [ "cmd/kiss-onion" ];
          ldflags = [
            "-s"
            "-w"
          ];
          # The tests need tor, nix and a private Tor network, which the
          # build sandbox does not give: CI runs them (scripts/test).
          doCheck = false;
          meta = {
            description = "A private Nix binary cache served behind Tor";
            homepage = "https://github.com/kiss-onion/kiss-onion";
            mainProgram = "kiss-onion";
            platforms = lib.platforms.linux;
          };
        };

      # Every module brings the overlay, so that services.kiss-onion.package
      # defaults to this flake's package; the key makes it count once.
      overlayModule = {
        _file = ./flake.nix;
        key = "kiss-onion#overlay";
        nixpkgs.overlays = [ self.overlays.default ];
      };
      withOverlay = module: {
        _file = ./flake.nix;
        imports = [
          module
          overlayModule
        ];
      };
    in
    {
      overlays.default = final: prev: { kiss-onion = final.callPackage kiss-onion { }; };

      packages = lib.genAttrs systems (
        system:
        let
          pkg = nixpkgs.legacyPackages.${system}.callPackage kiss-onion { };
        in
        {
          kiss-onion = pkg;
          default = pkg;
        }
      );

      nixosModules = {
        default = withOverlay ./nixos;
        server = withOverlay ./nixos/server.nix;
        proxy = withOverlay ./nixos/proxy.nix;
        update = withOverlay ./nixos/update.nix;
        publish = withOverlay ./nixos/publish.nix;
      };
    };
}
