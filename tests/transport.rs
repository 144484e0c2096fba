//! Transports on the real engine, offline: the LAN address and port, and a Tor onion service
//! in the pod whose address flows into the pairing URI and stays across applies.

mod support;

use std::time::Duration;

use support::*;

fn uri(s: &TestStack, device: &str, sidecar: &str) -> String {
    std::fs::read_to_string(s.state().join(format!("pairing/{device}/{sidecar}.uri"))).unwrap()
}

fn onion(uri: &str) -> Option<String> {
    let start = uri.find("&addr=tor:")? + "&addr=tor:".len();
    let rest = &uri[start..];
    Some(rest[..rest.find('&')?].to_string())
}

#[test]
fn lan_the_uri_carries_this_hosts_address_and_the_port_answers() {
    ensure_images();
    let s = TestStack::new("lan");
    let lan = free_port();
    s.write(&format!(
        "stack \"{{stack}}\"\nsidecar \"web\" {{ image \"{NGINX}\"; port 80; }}\ntransport {{ lan port={lan}; }}\ndevice \"phone\"\n"
    ));
    s.apply();
    let host = soul::transport::discover_lan_address().expect("this machine has a LAN address");
    let u = uri(&s, "phone", "web");
    assert!(u.contains(&format!("&addr=lan:{host}:{lan}&")), "{u}");
    let (code, _) =
        http_get(lan, "/", Duration::from_secs(20)).expect("the published port answers");
    assert_eq!(code, 200);
}

#[test]
fn tor_publishes_an_onion_address_offline_that_reaches_the_pairing_uri_and_survives() {
    ensure_images();
    let s = TestStack::new("tor");
    let lan = free_port();
    s.write(&format!(
        r#"stack "{{stack}}"
sidecar "notes" {{
    image "soul:latest"
    command "demo-app" "--port=8080"
    port 8080
}}
transport {{
    order "lan" "tor"
    lan port={lan} address="192.168.1.20"
    tor image="{TOR}"
}}
device "phone"
"#
    ));
    let o = s.apply();
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("not known yet"),
        "{}",
        text(&o)
    );
    let first = uri(&s, "phone", "notes");
    let address = onion(&first).unwrap_or_else(|| panic!("no tor address in {first}"));
    let (host, port) = address.rsplit_once(':').unwrap();
    assert!(
        host.ends_with(".onion") && host.len() == 56 + ".onion".len(),
        "{host}"
    );
    assert_eq!(port, "8443");
    assert!(
        first.find("&addr=lan:").unwrap() < first.find("&addr=tor:").unwrap(),
        "order lan, tor: {first}"
    );

    // The onion service lives in the pod: the tor container joins the pause namespace, reads
    // soul's torrc, and keeps its keys on a named volume.
    let tor = s.container("notes", "tor");
    let pause = s.container_id("notes", "pause").unwrap();
    assert_eq!(
        docker(&["inspect", "-f", "{{.HostConfig.NetworkMode}}", &tor]),
        format!("container:{pause}")
    );
    let torrc = std::fs::read_to_string(s.state().join("transports/notes/torrc")).unwrap();
    assert!(
        torrc.contains("HiddenServicePort 8443 127.0.0.1:8080"),
        "{torrc}"
    );
    let mounts = docker(&["inspect", "-f", "{{json .Mounts}}", &tor]);
    assert!(
        mounts.contains(&format!("soul-{}-notes-tor", s.name)),
        "{mounts}"
    );

    // A second apply keeps the address and changes nothing.
    let o = s.apply();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("0 changes"),
        "{}",
        text(&o)
    );
    assert_eq!(uri(&s, "phone", "notes"), first);

    // Recreating the tor container (here: removed by hand) keeps the onion address: the key
    // is state on the volume, and the pairing code does not flap meanwhile.
    docker(&["rm", "-f", &tor]);
    let o = s.apply();
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("pairing/"),
        "{}",
        text(&o)
    );
    assert_eq!(
        onion(&uri(&s, "phone", "notes")).as_deref(),
        Some(address.as_str())
    );
    std::thread::sleep(Duration::from_secs(2));
    let hostname = s.soul(&["plan", "--detailed-exitcode"]);
    assert_eq!(hostname.status.code(), Some(0), "{}", text(&hostname));

    // `down` keeps the onion key's volume; apply after it brings back the same address.
    let o = s.soul(&["down"]);
    assert!(o.status.success());
    assert!(s.volumes().contains(&format!("soul-{}-notes-tor", s.name)));
    s.apply();
    assert_eq!(
        onion(&uri(&s, "phone", "notes")).as_deref(),
        Some(address.as_str())
    );
}
