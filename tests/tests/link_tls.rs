//! The replication link under mutual TLS, with certificates made by `replicator tls init` and
//! `replicator tls issue`: every write replicated; a certificate feeds only its own group (or
//! one `--allow` names); another CA, an expired certificate, a wrong server name, and TLS
//! against plaintext either way are refused with a sentence that says which side to fix, the
//! replicator stays up, and nothing of a refused group reaches the store.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::cdp::*;
use tests::{make_image, wait_for, Proxy};

const MIB: u64 = 1 << 20;
const CAUGHT_UP: Duration = Duration::from_secs(120);

/// A lab CA in DIR/pki made by the CLI, with proxy certificates for `groups`.
fn pki(dir: &Path, groups: &[&str]) -> PathBuf {
    let pki = dir.join("pki");
    let (ok, out) = cli("replicator", &["tls", "init", pki.to_str().unwrap()]);
    assert!(ok, "{out}");
    for g in groups {
        let (ok, out) = cli(
            "replicator",
            &["tls", "issue", "--dir", pki.to_str().unwrap(), "--group", g],
        );
        assert!(ok, "{out}");
    }
    pki
}

fn server_args(pki: &Path) -> Vec<String> {
    ["server-cert.pem", "server-key.pem", "ca-cert.pem"]
        .iter()
        .zip(["--tls-cert", "--tls-key", "--tls-ca"])
        .flat_map(|(f, flag)| [flag.to_owned(), pki.join(f).display().to_string()])
        .collect()
}

/// TLS flags for a proxy with the certificate in `cert_dir`, trusting the CA in `ca_dir`.
fn proxy_tls(cert_dir: &Path, ca_dir: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        cert_dir.join("client-cert.pem").display().to_string(),
        "--tls-key".into(),
        cert_dir.join("client-key.pem").display().to_string(),
        "--tls-ca".into(),
        ca_dir.join("ca-cert.pem").display().to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A proxy for group `group` on a fresh 4 MiB image, replicating to `rep` with `extra`.
fn proxy(dir: &Path, name: &str, group: &str, rep: &str, extra: &[String]) -> (Proxy, PathBuf) {
    let image = dir.join(format!("{name}.img"));
    make_image(&image, 4 * MIB, &[]).unwrap();
    let ctl = dir.join(format!("{name}.ctl"));
    let mut args: Vec<String> = [
        "--disk",
        &format!("disk={}", image.display()),
        "--group",
        group,
        "--replicate",
        rep,
        "--control",
        ctl.to_str().unwrap(),
    ]
    .map(String::from)
    .into();
    args.extend(extra.iter().cloned());
    let p = Proxy::start(&dir.join(format!("{name}.sock")), &strs(&args)).unwrap();
    (p, ctl)
}

/// Waits until the proxy's link reports an error containing `what`; returns it.
fn link_error(ctl: &Path, what: &str) -> String {
    wait_for(&format!("a link error saying {what:?}"), CAUGHT_UP, || {
        let s = proxy_status(ctl).ok()?;
        let e = s["link_error"].as_str()?.to_owned();
        e.contains(what).then_some(e)
    })
    .unwrap()
}

#[test]
fn replication_over_mutual_tls_keeps_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["g"]);
    let rep = Replicator::start(&dir.path().join("store"), &strs(&server_args(&pki))).unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let tls = proxy_tls(&pki.join("g"), &pki.join("g"));
    let mut proxy = start_proxy(dir.path(), &rep.addr, &[("disk", &image)], &strs(&tls));
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    qemu_io(
        &proxy.uri("disk"),
        &[
            "write -P 0x5a 0 3M",
            "write -P 0x11 5M 64k",
            "write -z 8M 1M",
        ],
    );
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    assert!(proxy.log_text().contains("TLSv1_3"), "{}", proxy.log_text());
    assert!(
        rep.log_text().contains("TLSv1_3") && rep.log_text().contains("certificate g"),
        "{}",
        rep.log_text()
    );
    proxy.stop().unwrap();
    replica_equals(&rep.store, &[("disk", &image)]);
}

#[test]
fn a_certificate_feeds_only_its_own_group_or_one_allow_names() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["h"]);
    let mut args = server_args(&pki);
    args.extend(["--allow".into(), "web=h".into()]);
    let rep = Replicator::start(&dir.path().join("store"), &strs(&args)).unwrap();
    let tls = proxy_tls(&pki.join("h"), &pki);
    // h's certificate for group g: refused, and g never reaches the store.
    let (_g, g_ctl) = proxy(dir.path(), "g", "g", &rep.addr, &tls);
    let e = link_error(&g_ctl, "does not allow group");
    assert!(e.contains("replicator tls issue --group g"), "{e}");
    assert!(!rep.group("g").exists());
    // Group web, which --allow gives to certificates named h: served.
    let (mut web, web_ctl) = proxy(dir.path(), "web", "web", &rep.addr, &tls);
    wait_caught_up(&web_ctl, CAUGHT_UP).unwrap();
    qemu_io(&web.uri("disk"), &["write -P 0x77 1M 1M"]);
    wait_caught_up(&web_ctl, CAUGHT_UP).unwrap();
    web.stop().unwrap();
    replica_equals_group(&rep, "web", &dir.path().join("web.img"));
    assert!(!rep.group("g").exists());
}

/// The replica of a one-disk group other than `g` equals `image`.
fn replica_equals_group(rep: &Replicator, group: &str, image: &Path) {
    let out = dir_of(image).join(format!("{group}-replica.img"));
    let (ok, text) = cli(
        "restore",
        &[
            "materialize",
            "--store",
            rep.store.to_str().unwrap(),
            "--group",
            group,
            "--disk",
            "disk",
            "--at",
            "latest",
            "--output",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "{text}");
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(image).unwrap(),
        "the replica of {group} differs from its image"
    );
}

fn dir_of(p: &Path) -> &Path {
    p.parent().unwrap()
}

#[test]
fn bad_tls_is_refused_with_a_reason_and_the_replicator_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["g"]);
    let other = dir.path().join("other");
    let (ok, out) = cli("replicator", &["tls", "init", other.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (ok, out) = cli(
        "replicator",
        &[
            "tls",
            "issue",
            "--dir",
            other.to_str().unwrap(),
            "--group",
            "g",
        ],
    );
    assert!(ok, "{out}");
    let store = dir.path().join("store");
    let rep = Replicator::start(&store, &strs(&server_args(&pki))).unwrap();

    let plain = Replicator::start(&dir.path().join("plain-store"), &[]).unwrap();
    let mut named = proxy_tls(&pki.join("g"), &pki);
    named.extend(["--tls-server-name".into(), "elsewhere.example".into()]);
    let cases: [(&str, &str, Vec<String>, &str); 5] = [
        // A certificate from another CA: the proxy hears a refusal (the replicator's reason
        // is checked below).
        (
            "a",
            &rep.addr,
            proxy_tls(&other.join("g"), &pki),
            "refused this side's certificate",
        ),
        // A proxy trusting another CA refuses the replicator.
        (
            "b",
            &rep.addr,
            proxy_tls(&pki.join("g"), &other),
            "not signed by the CA given with --tls-ca",
        ),
        // The replicator's certificate checked against another name than it carries.
        ("c", &rep.addr, named, "not for the name it was reached by"),
        // Plaintext to the TLS replicator, and TLS to a plaintext one.
        (
            "d",
            &rep.addr,
            vec!["--insecure".into()],
            "this replicator requires TLS",
        ),
        (
            "e",
            &plain.addr,
            proxy_tls(&pki.join("g"), &pki),
            "does not speak TLS",
        ),
    ];
    for (name, addr, args, error) in cases {
        let (proxy, ctl) = proxy(dir.path(), name, "g", addr, &args);
        link_error(&ctl, error);
        drop(proxy);
    }
    wait_for("the replicator's reason", CAUGHT_UP, || {
        rep.log_text()
            .contains("TLS handshake failed: the peer's certificate is not signed by the CA")
            .then_some(())
    })
    .unwrap();
    assert!(!plain.group("g").exists());
    // An expired certificate: the proxy refuses to start and says so.
    let expired = dir.path().join("expired");
    let now = time::OffsetDateTime::now_utc();
    tls::lab::issue(
        &pki,
        "g",
        &[],
        &expired,
        tls::lab::Validity {
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(1),
        },
    )
    .unwrap();
    let image = dir.path().join("x.img");
    make_image(&image, MIB, &[]).unwrap();
    let mut args = vec![
        "--disk".to_owned(),
        format!("disk={}", image.display()),
        "--socket".into(),
        dir.path().join("x.sock").display().to_string(),
        "--replicate".into(),
        rep.addr.clone(),
    ];
    args.extend(proxy_tls(&expired, &pki));
    let (ok, out) = cli("nbd-proxy", &strs(&args));
    assert!(
        !ok && out.contains("expired") && out.contains("client-cert.pem"),
        "{out}"
    );
    // ... and the replicator refuses one presented by a client that does not check its own.
    let e = raw_client_hello(&rep.addr, &pki, &expired).unwrap_err();
    assert!(e.contains("refused this side's certificate"), "{e}");
    wait_for(
        "the replicator's reason for the expired one",
        CAUGHT_UP,
        || {
            rep.log_text()
                .contains("certificate has expired")
                .then_some(())
        },
    )
    .unwrap();
    assert!(!rep.group("g").exists(), "a refused peer reached the store");

    // Through all of it the replicator stayed up: the right proxy replicates.
    let (mut good, ctl) = proxy(
        dir.path(),
        "good",
        "g",
        &rep.addr,
        &proxy_tls(&pki.join("g"), &pki),
    );
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    qemu_io(&good.uri("disk"), &["write -P 0x42 0 1M"]);
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    good.stop().unwrap();
    replica_equals_group(&rep, "g", &dir.path().join("good.img"));
}

/// A TLS client built directly with rustls (no validity check of its own certificate), that
/// sends one byte after the handshake and reads the answer: the error it meets, explained.
fn raw_client_hello(addr: &str, pki: &Path, identity: &Path) -> Result<(), String> {
    use std::io::{Read, Write};
    use tls::rustls;
    use tls::rustls::pki_types::pem::PemObject;
    let certs: Vec<_> =
        rustls::pki_types::CertificateDer::pem_file_iter(identity.join("client-cert.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(identity.join("client-key.pem")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(tls::load_roots(&pki.join("ca-cert.pem")).unwrap())
        .with_client_auth_cert(certs, key)
        .unwrap();
    let sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let s = tls::Stream::connect(
        sock,
        std::sync::Arc::new(config),
        tls::server_name("127.0.0.1").unwrap(),
    )
    .map_err(|e| tls::describe(&e))?;
    let _ = (&s).write_all(b"x");
    let mut b = [0u8; 16];
    match (&s).read(&mut b) {
        Err(e) => Err(tls::describe(&e)),
        Ok(n) => Err(format!(
            "the replicator answered {n} bytes instead of refusing"
        )),
    }
}

#[test]
fn the_link_needs_tls_or_an_explicit_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (ok, out) = cli(
        "replicator",
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            store.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && out.contains("replicator tls init") && out.contains("--insecure"),
        "{out}"
    );
    let (ok, out) = cli(
        "replicator",
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            store.to_str().unwrap(),
            "--insecure",
            "--tls-cert",
            "x.pem",
        ],
    );
    assert!(!ok && out.contains("cannot be used with"), "{out}");
    let image = dir.path().join("x.img");
    make_image(&image, MIB, &[]).unwrap();
    let disk = format!("disk={}", image.display());
    let (ok, out) = cli(
        "nbd-proxy",
        &[
            "--disk",
            &disk,
            "--socket",
            "/tmp/never.sock",
            "--replicate",
            "127.0.0.1:9",
        ],
    );
    assert!(
        !ok && out.contains("--replicate needs TLS") && out.contains("--insecure"),
        "{out}"
    );
    // A CA directory is made once: a second init refuses to overwrite its key.
    let pki = pki(dir.path(), &[]);
    let (ok, out) = cli("replicator", &["tls", "init", pki.to_str().unwrap()]);
    assert!(!ok && out.contains("already exists"), "{out}");
    let (ok, out) = cli(
        "replicator",
        &[
            "tls",
            "issue",
            "--dir",
            pki.to_str().unwrap(),
            "--group",
            "../x",
        ],
    );
    assert!(!ok && out.contains("group name"), "{out}");
}
