//! Three hosts on this machine for the tests that cross a network: "home" is this host (the
//! engine, the pod's published LAN port); "vps" and "device" (a phone or a laptop) are network
//! namespaces, wired with veth pairs: home–device (the LAN), home–vps (the internet as the
//! pod's agent and a CA see it), device–vps (the internet as the device sees it). The device
//! reaches the VPS's home-side address through that last link, and the VPS reaches home.
//! Everything is removed on drop. Names and subnets are unique per process and per call.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

pub struct Hosts {
    pub vps: String,
    /// The phone's or laptop's namespace.
    pub device: String,
    /// The VPS's address from home (where the pod's agent dials, and a CA's view of it).
    pub vps_up: String,
    /// The VPS's address from the device.
    pub vps_wan: String,
    /// This host's address on the LAN link.
    pub home_lan: String,
    /// The device's end of the LAN link, and the VPS's end of the device's internet link.
    pub device_lan_dev: String,
    pub vps_wan_dev: String,
    host_devs: Vec<String>,
}

impl Hosts {
    pub fn new() -> Hosts {
        static CALLS: AtomicU32 = AtomicU32::new(0);
        ensure_command("ip", "iproute2");
        let id = std::process::id() * 4 + CALLS.fetch_add(1, Ordering::Relaxed) % 4;
        let net = |k: u32| format!("10.{}.{}", 150 + (id % 100), (id / 100 % 80) * 3 + k);
        let (lan, up, wan) = (net(0), net(1), net(2));
        let tag = id % 100_000;
        let (device, vps) = (format!("soul{tag}-dev"), format!("soul{tag}-vps"));
        let o = run(Command::new("sh").args([
            "-ec",
            &format!(
                "ip netns add {device}; ip netns add {vps}
                 ip -n {device} link set lo up; ip -n {vps} link set lo up
                 ip link add q{tag}h type veth peer name q{tag}d
                 ip link set q{tag}d netns {device}
                 ip addr add {lan}.1/24 dev q{tag}h; ip link set q{tag}h up
                 ip -n {device} addr add {lan}.2/24 dev q{tag}d; ip -n {device} link set q{tag}d up
                 ip link add p{tag}h type veth peer name p{tag}v
                 ip link set p{tag}v netns {vps}
                 ip addr add {up}.1/24 dev p{tag}h; ip link set p{tag}h up
                 ip -n {vps} addr add {up}.2/24 dev p{tag}v; ip -n {vps} link set p{tag}v up
                 ip -n {vps} route add default via {up}.1
                 ip -n {device} link add r{tag}d type veth peer name r{tag}v netns {vps}
                 ip -n {device} addr add {wan}.1/24 dev r{tag}d; ip -n {device} link set r{tag}d up
                 ip -n {vps} addr add {wan}.2/24 dev r{tag}v; ip -n {vps} link set r{tag}v up
                 ip -n {device} route add {up}.2/32 via {wan}.2"
            ),
        ]));
        assert!(o.status.success(), "{}", text(&o));
        Hosts {
            vps,
            device,
            vps_up: format!("{up}.2"),
            vps_wan: format!("{wan}.2"),
            home_lan: format!("{lan}.1"),
            device_lan_dev: format!("q{tag}d"),
            vps_wan_dev: format!("r{tag}v"),
            host_devs: vec![format!("q{tag}h"), format!("p{tag}h")],
        }
    }

    /// Plugs the device's LAN in (`up`) or out (`down`).
    pub fn device_lan(&self, state: &str) {
        run(Command::new("ip").args([
            "-n",
            &self.device,
            "link",
            "set",
            &self.device_lan_dev,
            state,
        ]))
        .exited(0);
    }

    /// Runs a shell script in the device's namespace.
    pub fn on_device(&self, script: &str) {
        let o = run(Hosts::in_ns(&self.device, "sh").args(["-ec", script]));
        assert!(o.status.success(), "{script}\n{}", text(&o));
    }

    pub fn in_ns(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.device, &self.vps] {
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
        for dev in &self.host_devs {
            let _ = run(Command::new("ip").args(["link", "del", dev]));
        }
    }
}
