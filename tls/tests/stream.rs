//! The lab CA's certificates, the configurations built from them, and the shared stream, on
//! real sockets: both directions at once, large gathered writes, and the handshake failures a
//! user meets (another CA, no certificate, a plaintext peer) explained.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::thread;

use tls::lab::{self, Validity};
use tls::{ClientCerts, Stream};

fn ca(dir: &Path) {
    lab::init(dir, &[], Validity::days(30)).unwrap();
}

fn server(dir: &Path, mode: ClientCerts) -> std::sync::Arc<tls::rustls::ServerConfig> {
    tls::server_config(
        &dir.join(lab::SERVER_CERT),
        &dir.join(lab::SERVER_KEY),
        Some((&dir.join(lab::CA_CERT), mode)),
    )
    .unwrap()
}

/// A server thread that accepts one connection with `config` and runs `then` on it.
fn serve<T: Send + 'static>(
    config: std::sync::Arc<tls::rustls::ServerConfig>,
    then: impl FnOnce(std::io::Result<Stream>) -> T + Send + 'static,
) -> (String, thread::JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        then(Stream::accept(sock, config))
    });
    (addr, t)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn both_directions_at_once_with_gathered_writes_and_names() {
    let dir = tempfile::tempdir().unwrap();
    ca(dir.path());
    let client_dir = dir.path().join("g1");
    lab::issue(dir.path(), "g1", &[], &client_dir, Validity::days(30)).unwrap();
    let down = pattern(3 << 20, 7);
    let up = pattern(5 << 20, 9);
    let (down2, up2) = (down.clone(), up.clone());
    let (addr, t) = serve(server(dir.path(), ClientCerts::Required), move |s| {
        let s = s.unwrap();
        let names = tls::cert_names(&s.peer_certificate().unwrap());
        let reader = s.try_clone().unwrap();
        let r = thread::spawn(move || {
            let mut got = vec![0u8; up2.len()];
            (&reader).read_exact(&mut got).unwrap();
            got == up2
        });
        (&s).write_all(&down2).unwrap();
        (names, r.join().unwrap())
    });
    let config = tls::client_config(
        &client_dir.join(lab::CA_CERT),
        Some((
            &client_dir.join(lab::CLIENT_CERT),
            &client_dir.join(lab::CLIENT_KEY),
        )),
    )
    .unwrap();
    let c = Stream::connect(
        TcpStream::connect(&addr).unwrap(),
        config,
        tls::server_name("127.0.0.1").unwrap(),
    )
    .unwrap();
    assert!(c.describe_session().unwrap().contains("TLS"));
    let reader = c.try_clone().unwrap();
    let r = thread::spawn(move || {
        let mut got = vec![0u8; down.len()];
        (&reader).read_exact(&mut got).unwrap();
        got == down
    });
    // Small and large slices gathered: headers of 16 bytes between 4 KiB and 1 MiB bodies.
    let mut slices = Vec::new();
    let mut at = 0;
    for (i, len) in [16usize, 4096, 16, 1 << 20, 16, 65536, 3]
        .iter()
        .cycle()
        .enumerate()
    {
        if at >= up.len() {
            break;
        }
        let len = (*len + i).min(up.len() - at);
        slices.push(&up[at..at + len]);
        at += len;
    }
    let mut io: Vec<IoSlice<'_>> = slices.iter().map(|s| IoSlice::new(s)).collect();
    let mut io = &mut io[..];
    while !io.is_empty() {
        let n = (&c).write_vectored(io).unwrap();
        IoSlice::advance_slices(&mut io, n);
    }
    assert!(
        r.join().unwrap(),
        "the client read other bytes than were sent"
    );
    let (names, ok) = t.join().unwrap();
    assert!(ok, "the server read other bytes than were sent");
    assert_eq!(names[0], "g1");
}

#[test]
fn handshake_failures_say_which_side_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    ca(dir.path());
    let other = dir.path().join("other");
    ca(&other);
    lab::issue(&other, "g1", &[], &other.join("g1"), Validity::days(30)).unwrap();
    // A client trusting another CA refuses the server.
    let (addr, t) = serve(server(dir.path(), ClientCerts::Required), |s| s.err());
    let config = tls::client_config(&other.join(lab::CA_CERT), None).unwrap();
    let e = Stream::connect(
        TcpStream::connect(&addr).unwrap(),
        config,
        tls::server_name("localhost").unwrap(),
    )
    .unwrap_err();
    assert!(tls::describe(&e).contains("not signed by the CA"), "{e}");
    assert!(t.join().unwrap().is_some());
    // A server refuses a client certificate from another CA, and a client with none.
    for identity in [true, false] {
        let (addr, t) = serve(server(dir.path(), ClientCerts::Required), |s| {
            s.err().map(|e| tls::describe(&e))
        });
        let g1 = other.join("g1");
        let (cert, key) = (g1.join(lab::CLIENT_CERT), g1.join(lab::CLIENT_KEY));
        let config = tls::client_config(
            &dir.path().join(lab::CA_CERT),
            identity.then_some((cert.as_path(), key.as_path())),
        )
        .unwrap();
        let c = Stream::connect(
            TcpStream::connect(&addr).unwrap(),
            config,
            tls::server_name("127.0.0.1").unwrap(),
        );
        // TLS 1.3: the client learns of the refusal at its first read.
        if let Ok(c) = c {
            let mut b = [0u8; 1];
            let e = (&c).read(&mut b).unwrap_err();
            assert!(
                tls::describe(&e).contains("refused this side's certificate"),
                "{e}"
            );
        }
        let server_saw = t.join().unwrap().expect("the server accepted");
        let want = if identity {
            "not signed by the CA"
        } else {
            "no certificate"
        };
        assert!(server_saw.contains(want), "{server_saw}");
    }
    // A plaintext server.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"CDPW this is not TLS at all, but a frame of another protocol");
    });
    let config = tls::client_config(&dir.path().join(lab::CA_CERT), None).unwrap();
    let e = Stream::connect(
        TcpStream::connect(addr).unwrap(),
        config,
        tls::server_name("127.0.0.1").unwrap(),
    )
    .unwrap_err();
    assert!(tls::describe(&e).contains("does not speak TLS"), "{e}");
    t.join().unwrap();
}

#[test]
fn expired_certificates_and_foreign_files_are_refused_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    ca(dir.path());
    let past = Validity {
        not_before: time::OffsetDateTime::now_utc() - time::Duration::days(10),
        not_after: time::OffsetDateTime::now_utc() - time::Duration::days(1),
    };
    let old = dir.path().join("old");
    lab::issue(dir.path(), "g1", &[], &old, past).unwrap();
    let e = tls::client_config(
        &dir.path().join(lab::CA_CERT),
        Some((&old.join(lab::CLIENT_CERT), &old.join(lab::CLIENT_KEY))),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("expired") && e.contains("client-cert.pem"),
        "{e}"
    );
    let e = tls::server_config(
        &dir.path().join(lab::SERVER_KEY),
        &dir.path().join(lab::SERVER_KEY),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("server-key.pem") && e.contains("no certificate"),
        "{e}"
    );
    let e = lab::init(dir.path(), &[], Validity::days(1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
}
