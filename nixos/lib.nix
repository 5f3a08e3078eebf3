# Helpers shared by the kiss-onion NixOS modules (not a module itself).
{ lib }:

let
  inherit (lib) types;
in
rec {
  # A client or marker name as kiss-onion accepts it: 1 to 64 letters,
  # digits, '-', '_' and '.', not starting with '.' or '-'.
  isName =
    name: builtins.match "[A-Za-z0-9_][A-Za-z0-9_.-]*" name != null && builtins.stringLength name <= 64;

  # A path read at run time that must stay out of the Nix store: a secret
  # such as a key bundle. A string, never a Nix path value (which would be
  # copied into the world-readable store when interpolated).
  secretPath = types.addCheck types.str (
    s: lib.hasPrefix "/" s && !lib.hasPrefix "${builtins.storeDir}/" s
  ) // {
    name = "secretPath";
    description = "absolute path outside the Nix store, as a string (a secret read at run time)";
  };

  # An absolute directory path, as a string: a Nix path value would be copied
  # into the store when interpolated.
  absolutePath = types.addCheck types.str (s: lib.hasPrefix "/" s) // {
    name = "absolutePath";
    description = "absolute path, as a string";
  };

  # The systemd sandbox of the long-running services (serve, proxy): no
  # capabilities, a read-only system, no home directories, IP and unix
  # sockets only, the system calls of an ordinary service.
  sandbox = {
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    NoNewPrivileges = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    SystemCallErrorNumber = "EPERM";
  };

  # Whether a path lies where ProtectHome= hides it.
  underHome =
    path:
    lib.any (dir: path == dir || lib.hasPrefix "${dir}/" path) [
      "/root"
      "/home"
      "/run/user"
    ];

  # A Go duration such as 90s, 6h or 720h (no days: Go has none).
  goDuration = types.strMatching "([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+";

  # A client's x25519 public key in Tor's form: 52 base32 characters.
  publicKey = types.strMatching "[A-Za-z2-7]{52}";

  # A Nix signing key's public half: NAME:BASE64 of 32 bytes.
  nixPublicKey = types.strMatching "[^:[:space:]]+:[A-Za-z0-9+/]{43}=";

  # One argument of a systemd ExecStart line: bare when it holds only safe
  # characters, otherwise double-quoted with systemd's escapes, and with '%'
  # (specifiers) and '$' (environment variables) doubled.
  execArg =
    arg:
    let
      s = toString arg;
    in
    if builtins.match "[A-Za-z0-9_./:=@+,-]+" s != null then
      s
    else
      builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);

  # A whole ExecStart line from a list of arguments.
  execLine = args: lib.concatMapStringsSep " " execArg args;

  # Where a systemd StateDirectory= or CacheDirectory= can manage dir:
  # the part under base, or null when dir lies elsewhere.
  managedUnder =
    base: dir:
    let
      prefix = "${base}/";
      rel = lib.removePrefix prefix dir;
    in
    if lib.hasPrefix prefix dir && rel != "" && !lib.hasInfix ".." rel then rel else null;
}
