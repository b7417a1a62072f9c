//! NBD over TLS (STARTTLS, x509) on `nbd-proxy --listen` and `restore export --listen`, with
//! real clients: qemu-img and qemu-io (QEMU's own NBD client, block/nbd.c, the one a VM uses)
//! with `tls-creds-x509`, and nbdinfo (libnbd) with `nbds://...?tls-certificates=DIR`.
//! Certificates come from `tls::lab` in the layout both read. Refused clients (plaintext to a
//! TLS-only server, a certificate from another CA, none at all) fail with a reason, the
//! server logs why, and it goes on serving good clients.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::cdp::{cli, free_port, start_proxy, wait_caught_up, Export, Replicator};
use tests::{make_image, pattern, read_file, run, Proxy};
use tls::lab::{self, Validity};

const MIB: u64 = 1 << 20;

/// A CA with a server certificate, and client directories in the layout QEMU's
/// `tls-creds-x509,dir=` and libnbd's `tls-certificates=` read.
struct Lab {
    /// The CA: `ca-cert.pem`, and the server's `server-cert.pem` / `server-key.pem`.
    ca: PathBuf,
    /// A client certificate signed by the CA.
    client: PathBuf,
    /// A client that trusts the server but whose certificate another CA signed. Its
    /// `ca-cert.pem` holds both CAs: QEMU checks its own certificate against that file before it
    /// connects, and would otherwise never reach the server.
    foreign: PathBuf,
    /// A client that trusts the server and has no certificate.
    anonymous: PathBuf,
}

impl Lab {
    fn new(dir: &Path) -> Lab {
        let validity = Validity::days(1);
        let ca = dir.join("ca");
        lab::init(&ca, &[], validity).unwrap();
        let client = dir.join("client");
        lab::issue(&ca, "client", &[], &client, validity).unwrap();
        let other = dir.join("other-ca");
        lab::init(&other, &[], validity).unwrap();
        let foreign = dir.join("foreign");
        lab::issue(&other, "intruder", &[], &foreign, validity).unwrap();
        let both = [
            read_file(&ca.join(lab::CA_CERT)),
            read_file(&other.join(lab::CA_CERT)),
        ];
        std::fs::write(foreign.join(lab::CA_CERT), both.concat()).unwrap();
        let anonymous = dir.join("anonymous");
        std::fs::create_dir(&anonymous).unwrap();
        std::fs::copy(ca.join(lab::CA_CERT), anonymous.join(lab::CA_CERT)).unwrap();
        Lab {
            ca,
            client,
            foreign,
            anonymous,
        }
    }

    /// The server's TLS flags: its certificate, and with `clients_need_certs` the CA.
    fn server_args(&self, mode: &str, clients_need_certs: bool) -> Vec<String> {
        let mut args = vec![
            "--tls".to_owned(),
            mode.to_owned(),
            "--tls-cert".to_owned(),
            path(&self.ca.join(lab::SERVER_CERT)),
            "--tls-key".to_owned(),
            path(&self.ca.join(lab::SERVER_KEY)),
        ];
        if clients_need_certs {
            args.extend(["--tls-ca".to_owned(), path(&self.ca.join(lab::CA_CERT))]);
        }
        args
    }
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// An NBD export on TCP, and how each client names it.
struct Target {
    addr: String,
    export: String,
}

impl Target {
    fn port(&self) -> &str {
        self.addr.rsplit_once(':').unwrap().1
    }

    /// `--object` and `--image-opts` for QEMU's tools; `creds` is a client directory, or
    /// `None` for a plaintext client.
    fn qemu(&self, creds: Option<&Path>) -> Vec<String> {
        let mut opts = format!(
            "driver=nbd,host=127.0.0.1,port={},export={}",
            self.port(),
            self.export
        );
        let mut args = Vec::new();
        if let Some(dir) = creds {
            args.push("--object".to_owned());
            args.push(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                dir.display()
            ));
            opts.push_str(",tls-creds=tls0");
        }
        args.extend(["--image-opts".to_owned(), opts]);
        args
    }

    /// A libnbd URI: `nbds://` with the client directory, or plain `nbd://`.
    fn uri(&self, creds: Option<&Path>) -> String {
        match creds {
            Some(dir) => format!(
                "nbds://{}/{}?tls-certificates={}",
                self.addr,
                self.export,
                dir.display()
            ),
            None => format!("nbd://{}/{}", self.addr, self.export),
        }
    }

    /// The export's size as nbdinfo reads it.
    fn nbdinfo_size(&self, creds: Option<&Path>) -> anyhow::Result<u64> {
        let out = run("nbdinfo", &["--size", &self.uri(creds)])?;
        Ok(out.trim().parse()?)
    }

    /// `qemu-img compare` of the export with a local raw image.
    fn qemu_compare(&self, creds: Option<&Path>, image: &Path) -> anyhow::Result<String> {
        let mut args = vec!["compare".to_owned()];
        args.extend(self.qemu(creds));
        args.push(format!("driver=file,filename={}", image.display()));
        run("qemu-img", &strs(&args))
    }

    /// The whole export through `qemu-img convert`.
    fn qemu_convert(&self, creds: &Path, out: &Path) -> Vec<u8> {
        let _ = std::fs::remove_file(out);
        let mut args = vec!["convert".to_owned()];
        args.extend(self.qemu(Some(creds)));
        args.extend(["-O".into(), "raw".into(), path(out)]);
        run("qemu-img", &strs(&args)).unwrap();
        read_file(out)
    }

    /// qemu-io commands over TLS.
    fn qemu_io(&self, creds: &Path, cmds: &[&str]) {
        let mut args = self.qemu(Some(creds));
        for c in cmds {
            args.extend(["-c".to_owned(), (*c).to_owned()]);
        }
        run("qemu-io", &strs(&args)).unwrap();
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Asserts that one of the project's programs exits with an error saying `says`.
fn fails(program: &str, args: &[String], says: &str) {
    let (ok, out) = cli(program, &strs(args));
    assert!(!ok && out.contains(says), "{program} {args:?}:\n{out}");
}

/// Asserts that a client failed, and that what it said contains one of `words`.
fn refused(result: anyhow::Result<impl std::fmt::Debug>, words: &[&str], who: &str) {
    let err = match result {
        Ok(v) => panic!("{who} was served: {v:?}"),
        Err(e) => e.to_string(),
    };
    eprintln!("{who} was refused: {err}");
    assert!(
        words.iter().any(|w| err.contains(w)),
        "{who} failed without saying {words:?}:\n{err}"
    );
}

/// The bad clients of a server whose clients need certificates, each followed by a good one:
/// the server refuses them and goes on serving.
fn refuses_bad_clients(lab: &Lab, target: &Target, size: u64) {
    // (credentials, who, what nbdinfo says, what qemu-img says)
    let bad: [(Option<&Path>, &str, &str, &str); 3] = [
        (
            None,
            "in plaintext",
            "server requires TLS",
            "TLS negotiation required",
        ),
        (
            Some(&lab.foreign),
            "with a certificate from another CA",
            "TLS",
            "TLS",
        ),
        (Some(&lab.anonymous), "without a certificate", "TLS", "TLS"),
    ];
    for (creds, who, nbdinfo_says, qemu_says) in bad {
        refused(
            target.nbdinfo_size(creds),
            &[nbdinfo_says],
            &format!("nbdinfo {who}"),
        );
        assert_eq!(target.nbdinfo_size(Some(&lab.client)).unwrap(), size);
        refused(
            target.qemu_compare(creds, Path::new("/dev/null")),
            &[qemu_says],
            &format!("qemu-img {who}"),
        );
        assert_eq!(target.nbdinfo_size(Some(&lab.client)).unwrap(), size);
    }
}

/// A 16 MiB image with data at 0..1M and 5M..6M.
fn sample_image(path: &Path) {
    make_image(
        path,
        16 * MIB,
        &[
            (0, &pattern(1, MIB as usize)),
            (5 * MIB, &pattern(2, MIB as usize)),
        ],
    )
    .unwrap();
}

/// A temporary directory with a [`Lab`] and a sample image in it.
fn lab_with_image() -> (tempfile::TempDir, Lab, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::new(dir.path());
    let image = dir.path().join("disk.img");
    sample_image(&image);
    (dir, lab, image)
}

fn tls_proxy(dir: &Path, image: &Path, lab: &Lab, mode: &str, ca: bool) -> (Proxy, Target) {
    let disk = format!("disk={}", image.display());
    let mut args = vec![
        "--disk".to_owned(),
        disk,
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(lab.server_args(mode, ca));
    let proxy = Proxy::start(&dir.join(format!("{mode}.sock")), &strs(&args)).unwrap();
    let target = Target {
        addr: proxy.tcp_address().unwrap(),
        export: "disk".into(),
    };
    (proxy, target)
}

/// The proxy's log has `count` WARN lines containing `text` (polled: the server may log after
/// the client has gone).
fn wait_warns(proxy: &Proxy, text: &str, count: usize) {
    tests::wait_for(
        &format!("{count} WARN {text:?}"),
        Duration::from_secs(10),
        || {
            let log = proxy.log_text();
            let lines = log
                .lines()
                .filter(|l| l.contains(" WARN ") && l.contains(text));
            (lines.count() == count).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", proxy.log_text()));
}

#[test]
fn proxy_requiring_tls_serves_qemu_and_libnbd_and_refuses_everyone_else() {
    let (dir, lab, image) = lab_with_image();
    let (mut proxy, target) = tls_proxy(dir.path(), &image, &lab, "require", true);
    assert!(
        proxy.log_text().contains("TLS required"),
        "{}",
        proxy.log_text()
    );

    target.qemu_compare(Some(&lab.client), &image).unwrap();
    assert!(target.qemu_convert(&lab.client, &dir.path().join("out.img")) == read_file(&image));
    assert_eq!(target.nbdinfo_size(Some(&lab.client)).unwrap(), 16 * MIB);
    // Writes over TLS reach the image.
    target.qemu_io(
        &lab.client,
        &[
            "write -P 0xab 2M 1M",
            "write -z 0 64k",
            "read -P 0xab 2M 1M",
            "flush",
        ],
    );
    let want = read_file(&image);
    assert!(want[2 * MIB as usize..3 * MIB as usize]
        .iter()
        .all(|b| *b == 0xab));
    assert!(want[..65536].iter().all(|b| *b == 0));
    // libnbd reads back what QEMU wrote, byte for byte, over TLS (nbdcopy: 4 connections).
    let copy = dir.path().join("copy.img");
    run(
        "nbdcopy",
        &[&target.uri(Some(&lab.client)), copy.to_str().unwrap()],
    )
    .unwrap();
    assert!(read_file(&copy) == want);

    refuses_bad_clients(&lab, &target, 16 * MIB);
    // One WARN per refused client, each naming the peer and the reason.
    wait_warns(&proxy, "peer=127.0.0.1:", 6);
    wait_warns(
        &proxy,
        "refused a plaintext client: TLS is required here",
        2,
    );
    // GnuTLS withholds a certificate whose issuer is not among the CAs the server names, so
    // the clients with a foreign certificate are refused as having none, like the anonymous.
    wait_warns(
        &proxy,
        "TLS handshake failed: the peer presented no certificate",
        4,
    );

    // The unix socket stays plaintext (its 0600 mode is the access control).
    assert_eq!(
        run("nbdinfo", &["--size", &proxy.uri("disk")])
            .unwrap()
            .trim(),
        (16 * MIB).to_string()
    );
    target.qemu_io(&lab.client, &["write -P 0x6c 0 1", "flush"]);
    assert_eq!(read_file(&image)[0], 0x6c);
    proxy.stop().unwrap();
}

#[test]
fn proxy_offering_tls_serves_tls_and_plaintext_clients() {
    let (dir, lab, image) = lab_with_image();
    // No --tls-ca: clients need no certificate, only to trust the server's.
    let (mut proxy, target) = tls_proxy(dir.path(), &image, &lab, "on", false);
    target.qemu_compare(Some(&lab.anonymous), &image).unwrap();
    target.qemu_compare(None, &image).unwrap();
    assert_eq!(target.nbdinfo_size(Some(&lab.anonymous)).unwrap(), 16 * MIB);
    assert_eq!(target.nbdinfo_size(Some(&lab.client)).unwrap(), 16 * MIB);
    assert_eq!(target.nbdinfo_size(None).unwrap(), 16 * MIB);
    target.qemu_io(&lab.anonymous, &["write -P 0x5c 1M 4k", "flush"]);
    assert!(read_file(&image)[MIB as usize..MIB as usize + 4096]
        .iter()
        .all(|b| *b == 0x5c));
    assert!(!proxy.log_text().contains(" WARN "), "{}", proxy.log_text());
    proxy.stop().unwrap();
}

#[test]
fn tls_flags_are_checked_and_plaintext_tcp_is_warned_about() {
    let (dir, lab, image) = lab_with_image();
    let disk = format!("disk={}", image.display());
    let proxy_with = |flags: &[&str]| {
        let mut args = vec!["--disk".to_owned(), disk.clone()];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        args
    };
    let tcp = ["--listen", "127.0.0.1:0"];
    fails(
        "nbd-proxy",
        &proxy_with(&[&tcp[..], &["--tls", "on"]].concat()),
        "--tls on needs --tls-cert and --tls-key",
    );
    let missing = [
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ];
    fails(
        "nbd-proxy",
        &proxy_with(&[&tcp[..], &["--tls", "require"], &missing].concat()),
        "/nonexistent/cert.pem",
    );
    let mut unix_only = proxy_with(&["--socket", &path(&dir.path().join("x.sock"))]);
    unix_only.extend(lab.server_args("require", false));
    fails("nbd-proxy", &unix_only, "unix sockets stay plaintext");

    let mut proxy = Proxy::start(
        &dir.path().join("plain.sock"),
        &["--disk", &disk, "--listen", "127.0.0.1:0"],
    )
    .unwrap();
    wait_warns(
        &proxy,
        "without TLS: whoever reaches it can read and write",
        1,
    );
    let target = Target {
        addr: proxy.tcp_address().unwrap(),
        export: "disk".into(),
    };
    // A client that insists on TLS is told this server does not offer it.
    refused(
        target.nbdinfo_size(Some(&lab.client)),
        &["TLS", "tls"],
        "nbdinfo asking for TLS",
    );
    assert_eq!(target.nbdinfo_size(None).unwrap(), 16 * MIB);
    proxy.stop().unwrap();
}

/// A store holding one disk (group `g`), and the image it was replicated from.
fn store_with_one_disk(dir: &Path) -> (PathBuf, PathBuf) {
    let image = dir.join("disk.img");
    sample_image(&image);
    let store = dir.join("store");
    let rep = Replicator::start(&store, &[]).unwrap();
    let proxy = start_proxy(dir, &rep.addr, &[("disk", &image)], &[]);
    wait_caught_up(&dir.join("ctl"), Duration::from_secs(60)).unwrap();
    drop(proxy);
    drop(rep);
    (store, image)
}

#[test]
fn restore_export_requiring_tls_serves_the_point_and_refuses_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::new(dir.path());
    let (store, image) = store_with_one_disk(dir.path());

    let store_arg = path(&store);
    let export = |flags: &[&str]| {
        let mut args = vec![
            "export", "--store", &store_arg, "--group", "g", "--at", "latest",
        ];
        args.extend(["--listen", "127.0.0.1:0"]);
        args.extend(flags);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    fails(
        "restore",
        &export(&["--tls", "require"]),
        "--tls require needs --tls-cert",
    );
    let ca = path(&lab.ca.join(lab::CA_CERT));
    fails(
        "restore",
        &export(&["--tls-ca", &ca]),
        "are for --tls on or --tls require",
    );

    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--listen".to_owned(), addr.clone()];
    args.extend(lab.server_args("require", true));
    let export = Export::start(&store, "latest", &dir.path().join("e.sock"), &strs(&args)).unwrap();
    let output = export.output();
    assert!(
        output.contains(&format!("nbds://{addr}/disk")) && output.contains("tls-creds=tls0"),
        "{output}"
    );
    let target = Target {
        addr,
        export: "disk".into(),
    };
    target.qemu_compare(Some(&lab.client), &image).unwrap();
    assert!(target.qemu_convert(&lab.client, &dir.path().join("out.img")) == read_file(&image));
    refuses_bad_clients(&lab, &target, 16 * MIB);
    target.qemu_compare(Some(&lab.client), &image).unwrap();
}

#[test]
fn writable_restore_export_offering_tls_takes_writes_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::new(dir.path());
    let (store, image) = store_with_one_disk(dir.path());
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--listen".to_owned(), addr.clone(), "--writable".into()];
    args.extend(lab.server_args("on", true));
    let export = Export::start(&store, "latest", &dir.path().join("w.sock"), &strs(&args)).unwrap();
    let target = Target {
        addr,
        export: "disk".into(),
    };
    target.qemu_io(
        &lab.client,
        &[
            "write -P 0x77 4096 65536",
            "read -P 0x77 4096 65536",
            "flush",
        ],
    );
    let mut want = read_file(&image);
    want[4096..4096 + 65536].fill(0x77);
    assert!(target.qemu_convert(&lab.client, &dir.path().join("out.img")) == want);
    // Plaintext clients are served too (--tls on), and see the same overlay.
    assert!(export.read_disk("disk", dir.path()).unwrap() == want);
    assert_eq!(target.nbdinfo_size(None).unwrap(), 16 * MIB);
}

/// Both clients check that the server's certificate names the host they connect to: one
/// issued for a group name only is refused at 127.0.0.1 until QEMU is told the name
/// (`tls-hostname=`); libnbd 1.14 has no such URI parameter, so the certificate must carry
/// the address (`replicator tls issue` takes the hosts to add).
#[test]
fn clients_check_the_server_certificate_names_the_host() {
    let (dir, lab, image) = lab_with_image();
    let named = dir.path().join("named");
    lab::issue(&lab.ca, "web", &[], &named, Validity::days(1)).unwrap();
    let disk = format!("disk={}", image.display());
    let args = [
        "--disk",
        &disk,
        "--listen",
        "127.0.0.1:0",
        "--tls",
        "require",
        "--tls-cert",
        &path(&named.join(lab::CLIENT_CERT)),
        "--tls-key",
        &path(&named.join(lab::CLIENT_KEY)),
    ];
    let mut proxy = Proxy::start(&dir.path().join("named.sock"), &args).unwrap();
    let target = Target {
        addr: proxy.tcp_address().unwrap(),
        export: "disk".into(),
    };
    refused(
        target.qemu_compare(Some(&lab.client), &image),
        &["hostname", "127.0.0.1"],
        "qemu-img at an address the certificate does not name",
    );
    refused(
        target.nbdinfo_size(Some(&lab.client)),
        &["TLS", "tls", "certificate"],
        "nbdinfo at an address the certificate does not name",
    );
    let mut args = vec!["compare".to_owned()];
    args.extend(target.qemu(Some(&lab.client)));
    *args.last_mut().unwrap() += ",tls-hostname=web";
    args.push(format!("driver=file,filename={}", image.display()));
    run("qemu-img", &strs(&args)).unwrap();
    proxy.stop().unwrap();
}

/// QEMU itself (`qemu-system-x86_64 -M none`) attaches a disk over TLS as a VM would, through
/// QMP `object-add` (tls-creds-x509) and `blockdev-add` (nbd with tls-creds), and writes to it.
#[test]
fn qemu_attaches_a_disk_over_tls_and_writes_through_it() {
    let (dir, lab, image) = lab_with_image();
    let (mut proxy, target) = tls_proxy(dir.path(), &image, &lab, "require", true);
    let mut qemu = tests::qmp::Qemu::start(dir.path(), &[]).unwrap();
    qemu.execute(
        "object-add",
        serde_json::json!({
            "qom-type": "tls-creds-x509",
            "id": "tls0",
            "dir": path(&lab.client),
            "endpoint": "client",
        }),
    )
    .unwrap();
    qemu.execute(
        "blockdev-add",
        serde_json::json!({
            "driver": "nbd",
            "node-name": "d0",
            "server": { "type": "inet", "host": "127.0.0.1", "port": target.port() },
            "export": "disk",
            "tls-creds": "tls0",
        }),
    )
    .unwrap();
    let nodes = qemu
        .execute("query-named-block-nodes", serde_json::json!({}))
        .unwrap();
    let d0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "d0")
        .unwrap_or_else(|| panic!("no node d0: {nodes}"));
    assert_eq!(d0["image"]["virtual-size"], 16 * MIB, "{d0}");
    qemu.qemu_io("d0", "write -P 0x42 3M 64k").unwrap();
    qemu.qemu_io("d0", "read -P 0x42 3M 64k").unwrap();
    qemu.qemu_io("d0", "flush").unwrap();
    let bytes = read_file(&image);
    assert!(bytes[3 * MIB as usize..3 * MIB as usize + 65536]
        .iter()
        .all(|b| *b == 0x42));
    drop(qemu);
    proxy.stop().unwrap();
}
