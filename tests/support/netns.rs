//! Test helper: several "hosts" on one machine — Linux network namespaces with their own
//! addresses on one private Ethernet segment — that a test can start programs in, cut off and
//! reconnect, and whose traffic it can count.
//!
//! Topology: a *switch* namespace holds a bridge; each host namespace has an `eth0` (a veth)
//! whose peer is a port of that bridge, and the address 10.<net>.0.<n>/24. The bridge lives in a
//! namespace of its own so the host's firewall (Docker sets the FORWARD policy to DROP, and
//! br_netfilter makes bridged frames go through it) never sees the traffic. Processes are
//! started with `nsenter --net=...`: they join only the network namespace and share the test's
//! mount namespace, so a FUSE mount made "on a host" is visible to the test.
//!
//! Needs root, `ip` (iproute2) and `nsenter` (util-linux). Everything is removed on drop.

#![allow(dead_code)]

use std::ffi::OsString;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip (install iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private network of hosts.
#[derive(Debug)]
pub struct Net {
    /// Unique tag of this network's names (`hx<tag>...`).
    tag: String,
    /// Second octet of the addresses.
    octet: u32,
    switch: String,
    pub hosts: Vec<Host>,
}

/// One host of a [`Net`].
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// Network namespace name (under /run/netns).
    pub netns: String,
    /// Its address.
    pub addr: String,
    /// Its port on the switch (in the switch namespace).
    port: String,
    switch: String,
}

impl Net {
    /// A network with one host per name, addressed 10.X.0.2, .3, ...
    pub fn new(names: &[&str]) -> Net {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "network namespace tests need root"
        );
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}{n}", std::process::id() % 0xfff);
        // 10.64.0.0 - 10.191.0.0: away from Docker's 172.17/16 and common 10.0/16 setups.
        let octet = 64 + (std::process::id() * 7 + n) % 128;
        let switch = format!("hx{tag}sw");
        ip(&["netns", "add", &switch]);
        let mut net = Net {
            tag: tag.clone(),
            octet,
            switch: switch.clone(),
            hosts: Vec::new(),
        };
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        ip(&["-n", &switch, "link", "set", "lo", "up"]);
        for (i, name) in names.iter().enumerate() {
            let netns = format!("hx{tag}h{i}");
            let port = format!("p{i}");
            let addr = format!("10.{octet}.0.{}", i + 2);
            ip(&["netns", "add", &netns]);
            net.hosts.push(Host {
                name: name.to_string(),
                netns: netns.clone(),
                addr: addr.clone(),
                port: port.clone(),
                switch: switch.clone(),
            });
            ip(&[
                "-n", &netns, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                "netns", &switch,
            ]);
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &netns, "link", "set", "eth0", "up"]);
            ip(&["-n", &netns, "link", "set", "lo", "up"]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &switch, "link", "set", &port, "up"]);
        }
        net
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Processes still inside keep a namespace alive but unreachable; the test's guards
        // stop them first.
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.netns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .status();
    }
}

impl Host {
    /// The command prefix that runs a program on this host.
    pub fn wrap(&self) -> Vec<OsString> {
        vec![
            "nsenter".into(),
            format!("--net=/run/netns/{}", self.netns).into(),
            "--".into(),
        ]
    }

    /// `program` on this host.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(program);
        c
    }

    /// Cut the host off the network (its switch port goes down: packets are lost, as when a
    /// cable is pulled; no connection is reset).
    pub fn cut(&self) {
        ip(&["-n", &self.switch, "link", "set", &self.port, "down"]);
    }

    /// Limit what this host sends to `rate` (tc's spelling: `40mbit`), so a transfer lasts
    /// long enough to be cut in the middle. A token bucket on its `eth0`; replaced by a
    /// second call, gone with the namespace.
    pub fn limit_rate(&self, rate: &str) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                "eth0",
            ])
            .args([
                "root", "tbf", "rate", rate, "burst", "64kb", "latency", "500ms",
            ])
            .output()
            .expect("run tc (install iproute2)");
        assert!(
            out.status.success(),
            "tc tbf on {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Reconnect it.
    pub fn reconnect(&self) {
        ip(&["-n", &self.switch, "link", "set", &self.port, "up"]);
        // Back only once the port carries frames again; and the host forgets the neighbours it
        // failed to reach while cut, so its next connection asks afresh instead of failing at
        // once with "No route to host" on a stale entry.
        let up = || {
            Command::new("ip")
                .args(["-n", &self.switch, "-j", "link", "show", "dev", &self.port])
                .output()
                .ok()
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                .is_some_and(|v| v[0]["operstate"] == "UP")
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !up() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        ip(&["-n", &self.netns, "neigh", "flush", "all"]);
    }

    /// Bytes this host has sent on the network so far (its `eth0` transmit counter).
    pub fn tx_bytes(&self) -> u64 {
        let out = Command::new("ip")
            .args(["-n", &self.netns, "-s", "-j", "link", "show", "dev", "eth0"])
            .output()
            .expect("ip -s link");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        v[0]["stats64"]["tx"]["bytes"]
            .as_u64()
            .expect("tx bytes in ip's output")
    }
}
