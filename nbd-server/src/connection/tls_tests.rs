//! STARTTLS end to end over an in-memory pipe, with a rustls client and `tls::lab`
//! certificates: options refused before TLS, the TLS handshake on the same stream, option
//! haggling and a read inside TLS; a client that sends plaintext after the ACK ends only its
//! own connection.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::time::Duration;

use tokio::io::DuplexStream;
use tokio_rustls::TlsConnector;

use super::*;
use crate::file::FileBackend;
use tokio::io::AsyncWriteExt;

impl SplitStream for DuplexStream {
    type Read = tokio::io::ReadHalf<DuplexStream>;
    type Write = tokio::io::WriteHalf<DuplexStream>;
    fn split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

const DISK_BYTES: usize = 64 * 1024;

/// A server requiring TLS (clients with certificates from the lab's CA) on one end of a pipe,
/// serving `disk` from a file of pattern bytes; returns the client's end and the server's task.
fn start(
    dir: &Path,
) -> (
    DuplexStream,
    tokio::task::JoinHandle<io::Result<()>>,
    Vec<u8>,
) {
    let ca = dir.join("ca");
    tls::lab::init(&ca, &[], tls::lab::Validity::days(1)).unwrap();
    let config = tls::server_config(
        &ca.join(tls::lab::SERVER_CERT),
        &ca.join(tls::lab::SERVER_KEY),
        Some((&ca.join(tls::lab::CA_CERT), tls::ClientCerts::Required)),
    )
    .unwrap();
    let bytes: Vec<u8> = (0..DISK_BYTES).map(|i| (i * 7 % 251) as u8).collect();
    let image = dir.join("disk.img");
    std::fs::write(&image, &bytes).unwrap();
    let backend = Arc::new(FileBackend::open(&image, false).unwrap());
    let exports: Arc<[Export<FileBackend>]> = vec![Export::new("disk", "", backend)].into();
    let (client, server) = tokio::io::duplex(1 << 20);
    let (stop, stopped) = watch::channel(false);
    let tls = Some(Arc::new(Tls::new(config, true)));
    let task = tokio::spawn(async move {
        let _stop = stop;
        serve(server, exports, tls, stopped).await
    });
    (client, task, bytes)
}

fn client_config(dir: &Path) -> TlsConnector {
    let ca = dir.join("ca");
    let out = dir.join("client");
    tls::lab::issue(&ca, "client", &[], &out, tls::lab::Validity::days(1)).unwrap();
    let config = tls::client_config(
        &out.join(tls::lab::CA_CERT),
        Some((
            &out.join(tls::lab::CLIENT_CERT),
            &out.join(tls::lab::CLIENT_KEY),
        )),
    )
    .unwrap();
    TlsConnector::from(config)
}

async fn option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
    bytes.extend_from_slice(&option.to_be_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(data);
    s.write_all(&bytes).await.unwrap();
    s.flush().await.unwrap();
}

/// One option reply: (option, reply type, data).
async fn reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(&h[..8], &REPLY_MAGIC.to_be_bytes());
    let be32 = |at: usize| u32::from_be_bytes(h[at..at + 4].try_into().unwrap());
    let mut data = vec![0u8; be32(16) as usize];
    s.read_exact(&mut data).await.unwrap();
    (be32(8), be32(12), data)
}

/// The greeting read, fixed newstyle without zeroes sent.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting, handshake::greeting());
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
}

fn go_disk() -> Vec<u8> {
    let mut data = 4u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"disk");
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

#[tokio::test]
async fn options_wait_for_tls_then_haggling_and_a_read_run_inside_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut plain, server, disk) = start(dir.path());
    let connector = client_config(dir.path());
    greet(&mut plain).await;
    option(&mut plain, OPT_GO, &go_disk()).await;
    assert_eq!(reply(&mut plain).await.1, REP_ERR_TLS_REQD);
    option(&mut plain, OPT_STARTTLS, &[]).await;
    assert_eq!(reply(&mut plain).await, (OPT_STARTTLS, REP_ACK, vec![]));

    let name = tls::server_name("localhost").unwrap();
    let mut s = connector.connect(name, plain).await.unwrap();
    option(&mut s, OPT_STARTTLS, &[]).await;
    assert_eq!(
        reply(&mut s).await.1,
        REP_ERR_INVALID,
        "STARTTLS inside TLS"
    );
    option(&mut s, OPT_GO, &go_disk()).await;
    let (_, kind, info) = reply(&mut s).await;
    assert_eq!(
        (kind, &info[..2]),
        (REP_INFO, &INFO_EXPORT.to_be_bytes()[..])
    );
    assert_eq!(&info[2..10], &(DISK_BYTES as u64).to_be_bytes());
    while reply(&mut s).await.1 != REP_ACK {}

    let read = RequestHeader {
        flags: 0,
        kind: CMD_READ,
        cookie: 7,
        offset: 1000,
        length: 4096,
    };
    s.write_all(&read.encode()).await.unwrap();
    s.flush().await.unwrap();
    let mut simple = [0u8; SIMPLE_REPLY_LEN];
    s.read_exact(&mut simple).await.unwrap();
    assert_eq!(&simple[4..8], &[0; 4], "no error");
    assert_eq!(&simple[8..16], &7u64.to_be_bytes());
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data).await.unwrap();
    assert!(data == disk[1000..5096]);

    let disconnect = RequestHeader {
        kind: CMD_DISC,
        cookie: 8,
        offset: 0,
        length: 0,
        flags: 0,
    };
    s.write_all(&disconnect.encode()).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn plaintext_after_the_starttls_ack_ends_the_connection_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut plain, server, _) = start(dir.path());
    greet(&mut plain).await;
    option(&mut plain, OPT_STARTTLS, &[]).await;
    assert_eq!(reply(&mut plain).await.1, REP_ACK);
    // The client goes on as if it were not TLS: the handshake fails, the server says why in
    // its log and ends this connection without an error for its caller.
    option(&mut plain, OPT_GO, &go_disk()).await;
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
