# NixOS module: services.soul runs `soul watch` as a hardened systemd service after Docker;
# services.soul-relay runs `soul relay serve` (the self-hosted relay, for a small VPS).
self:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.soul;
  relay = config.services.soul-relay;
  relayFile = pkgs.writeText "relay.kdl" relay.settings;
  # Both services run soul's one binary.
  packageOption = lib.mkOption {
    type = lib.types.package;
    default = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
    defaultText = lib.literalExpression "soul.packages.\${system}.default";
    description = "The soul package to run.";
  };
  # The hardening both services share; each adds what its job needs.
  hardening = {
    NoNewPrivileges = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    CapabilityBoundingSet = "";
  };
in
{
  options.services.soul = {
    enable = lib.mkEnableOption "soul, which keeps this machine on a stack.kdl";

    package = packageOption;

    stackFile = lib.mkOption {
      type = lib.types.path;
      example = "/etc/soul/stack.kdl";
      description = "The stack.kdl to keep this machine on (passed as --file).";
    };

    stateDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/soul/stack";
      description = "Where soul keeps the stack key, tokens and pairing codes (passed as --state-dir).";
    };

    environmentFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "A file of VAR=value lines for `from-env=` values; kept out of the Nix store.";
    };
  };

  options.services.soul-relay = {
    enable = lib.mkEnableOption "soul's relay, which splices devices' TLS to home pods it cannot read";

    package = packageOption;

    settings = lib.mkOption {
      type = lib.types.lines;
      example = ''
        listen "0.0.0.0:7000"
        status "127.0.0.1:7001"
        allow "home" key="ed25519:…"
      '';
      description = "The relay's file (KDL): `listen`, `status`, one `allow` line per stack (printed by `soul relay allow`), `limits`. It holds public keys only.";
    };

    port = lib.mkOption {
      type = lib.types.port;
      default = 7000;
      description = "The port `listen` names, opened in the firewall when openFirewall is set.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the relay's port in the firewall.";
    };
  };

  config = lib.mkMerge [ (lib.mkIf relay.enable {
    networking.firewall.allowedTCPPorts = lib.mkIf relay.openFirewall [ relay.port ];

    systemd.services.soul-relay = {
      description = "soul relay: splices devices' TLS to home pods it cannot read";
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      serviceConfig = hardening // {
        ExecStart = "${lib.getExe relay.package} relay serve --config ${relayFile}";
        Restart = "always";
        RestartSec = "2s";
        DynamicUser = true;
        # The relay's key, made at the first start; its pin goes into each stack's
        # `relay … pin=`. systemd passes the directory as $STATE_DIRECTORY.
        StateDirectory = "soul-relay";
        StateDirectoryMode = "0700";
        UMask = "0077";
        ProtectSystem = "strict";
        ProtectHome = true;
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" ];
        LimitNOFILE = 65536;
        # Public names (`domain` in the relay's file) need port 443: binding a port below
        # 1024 is the one capability the relay has.
        CapabilityBoundingSet = "CAP_NET_BIND_SERVICE";
        AmbientCapabilities = "CAP_NET_BIND_SERVICE";
      };
    };
  }) (lib.mkIf cfg.enable {
    virtualisation.docker.enable = lib.mkDefault true;

    systemd.services.soul = {
      description = "soul: keep this machine on its stack.kdl";
      after = [ "docker.service" "network-online.target" ];
      requires = [ "docker.service" ];
      wants = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      path = [ pkgs.git ];
      serviceConfig = hardening // {
        ExecStart = "${lib.getExe cfg.package} --file ${cfg.stackFile} --state-dir ${cfg.stateDir} --log-format json watch";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        EnvironmentFile = lib.mkIf (cfg.environmentFile != null) cfg.environmentFile;
        Restart = "always";
        RestartSec = "2s";
        KillMode = "process";
        StateDirectory = "soul";
        StateDirectoryMode = "0700";
        UMask = "0077";
        ProtectSystem = "strict";
        # Exactly the state dir it is given (ProtectSystem = "strict" makes the rest read-only).
        ReadWritePaths = [ cfg.stateDir "/run/docker.sock" ];
        ProtectHome = "read-only";
        RestrictSUIDSGID = true;
        SystemCallFilter = [ "@system-service" ];
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
      };
    };
  })];
}
