# All kiss-onion NixOS modules: the cache server (services.kiss-onion), the
# client gateway (.proxy), pull-based deployment (.update) and the publisher
# (.publish). Each is off until enabled.
{
  imports = [
    ./server.nix
    ./proxy.nix
    ./update.nix
    ./publish.nix
  ];
}
