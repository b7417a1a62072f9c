//! A raw peer of the replication link (plain or TLS): Hello, batches and acks as bytes, for
//! what no well-behaved proxy sends and for measuring the replicator alone (`ingest-bench`).

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use journal::wire;

/// A raw peer of the replicator's protocol, for what no well-behaved proxy sends.
#[derive(Debug)]
pub struct RawPeer {
    pub stream: tls::Stream,
}

impl RawPeer {
    /// A plaintext peer (for a replicator with --insecure).
    pub fn connect(addr: &str) -> RawPeer {
        RawPeer {
            stream: tls::Stream::plain(Self::socket(addr)),
        }
    }

    /// A TLS peer with the certificate, key and CA in `dir` (`client-cert.pem`,
    /// `client-key.pem`, `ca-cert.pem`, as `replicator tls issue` writes them).
    pub fn connect_tls(addr: &str, dir: &Path) -> anyhow::Result<RawPeer> {
        let config = tls::client_config(
            &dir.join(tls::lab::CA_CERT),
            Some((
                &dir.join(tls::lab::CLIENT_CERT),
                &dir.join(tls::lab::CLIENT_KEY),
            )),
        )?;
        let name = tls::server_name(tls::host_of(addr))?;
        let stream = tls::Stream::connect(Self::socket(addr), config, name)
            .map_err(|e| anyhow::anyhow!("TLS to {addr}: {}", tls::describe(&e)))?;
        Ok(RawPeer { stream })
    }

    fn socket(addr: &str) -> TcpStream {
        let stream = TcpStream::connect(addr).expect("connect to the replicator");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        stream
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn frame(&mut self) -> std::io::Result<(wire::FrameType, Vec<u8>)> {
        wire::read_frame(&mut self.stream, wire::MAX_BODY)
    }

    /// Introduces itself; the Welcome, or the replicator's error text. With `want_hashes`,
    /// reads the hashes up to HashesDone (and returns how many came).
    pub fn hello(
        &mut self,
        group: &str,
        volumes: &[(&str, u64)],
        stream: &str,
        want_hashes: bool,
    ) -> Result<(wire::Welcome, usize), String> {
        let hello = wire::Hello {
            protocol: wire::PROTOCOL,
            group: group.into(),
            volumes: volumes
                .iter()
                .map(|(name, size)| wire::Volume {
                    name: (*name).into(),
                    size: *size,
                })
                .collect(),
            want_hashes,
            stream: stream.into(),
            link_timeout_ms: 30_000,
        };
        self.send(&hello.encode()).map_err(|e| e.to_string())?;
        let (kind, body) = self.frame().map_err(|e| e.to_string())?;
        let frame = wire::Frame { kind, body: &body };
        if kind == wire::FrameType::Error {
            return Err(String::from_utf8_lossy(&body).into_owned());
        }
        let welcome = wire::Welcome::decode(&frame).map_err(|e| e.to_string())?;
        let mut hashes = 0;
        if !want_hashes {
            return Ok((welcome, hashes));
        }
        loop {
            let (kind, body) = self.frame().map_err(|e| e.to_string())?;
            match kind {
                wire::FrameType::HashesDone => break,
                wire::FrameType::Hashes => {
                    hashes += wire::Hashes::decode(&wire::Frame { kind, body: &body })
                        .map_err(|e| e.to_string())?
                        .hashes
                        .len()
                }
                _ => {}
            }
        }
        Ok((welcome, hashes))
    }

    /// Sends sealed records as one batch.
    pub fn batch(&mut self, records: &[Vec<u8>]) -> std::io::Result<()> {
        let body: Vec<u8> = records.concat();
        self.send(&wire::frame(wire::FrameType::Batch, &body))
    }

    /// The next ack (keepalives skipped); Err with the text of an Error or Refused frame.
    pub fn ack(&mut self) -> Result<u64, String> {
        loop {
            let (kind, body) = self.frame().map_err(|e| e.to_string())?;
            let frame = wire::Frame { kind, body: &body };
            match kind {
                wire::FrameType::Keepalive => continue,
                wire::FrameType::Ack => return wire::decode_ack(&frame).map_err(|e| e.to_string()),
                _ => return Err(String::from_utf8_lossy(&body).into_owned()),
            }
        }
    }
}
