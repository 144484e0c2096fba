{
  description = "soul: make a self-hosted service give-able — one stack.kdl, applied to any Docker engine";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: {
        default = pkgs.rustPlatform.buildRustPackage {
          pname = "soul";
          version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;
          src = ./.;
          cargoLock.lockFile = ./Cargo.lock;
          # The integration tests need a Docker engine, which the build sandbox lacks.
          cargoTestFlags = [ "--lib" ];
          meta = {
            description = "Make a self-hosted service give-able";
            mainProgram = "soul";
          };
        };
      });

      nixosModules.default = import ./nix/module.nix self;

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [ cargo rustc rustfmt clippy docker-compose debootstrap git ];
        };
      });
    };
}
