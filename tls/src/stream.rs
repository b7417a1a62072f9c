//! A blocking TCP stream, plain or TLS, shared by a reader and a writer thread.
//!
//! rustls keeps one state per connection, and a blocking read would hold it while it waits.
//! So the socket is read and written outside the state's lock: the reader takes the lock only
//! to hand rustls the bytes it read and take the plaintext out, the writer only to encrypt.
//! Writers are serialized by a second lock that is held through the socket write, so records
//! go out in the order they were sealed. Only the writer ever writes to the socket once the
//! handshake is done (a reader never answers anything: no key update requests are sent by
//! either side, and tickets are off).

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

/// Plaintext is encrypted in pieces of at most this, so the ciphertext buffer stays small.
const PIECE: usize = 256 * 1024;
/// The largest TLS record's plaintext: smaller slices are gathered up to it.
const RECORD: usize = 16 * 1024;

#[derive(Debug)]
struct State {
    conn: Connection,
    /// Plaintext taken out of rustls and not yet read.
    plain: Vec<u8>,
    at: usize,
    /// The peer sent close_notify.
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Held through each socket write; holds the ciphertext being written.
    out: Mutex<Vec<u8>>,
    /// Held through each socket read; holds the ciphertext read.
    raw: Mutex<Vec<u8>>,
}

/// A TCP stream, plain or TLS. `&Stream` reads and writes, like `&TcpStream`.
#[derive(Debug)]
pub struct Stream {
    sock: TcpStream,
    tls: Option<Arc<Shared>>,
}

fn lock<T>(m: &Mutex<T>) -> io::Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| io::Error::other("a thread using this TLS stream panicked"))
}

/// The socket during a handshake: each read waits at most for what is left until `until`.
struct Until<'a> {
    sock: &'a TcpStream,
    until: Option<Instant>,
}

impl Read for Until<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(until) = self.until {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the TLS handshake did not complete in time",
                ));
            }
            self.sock.set_read_timeout(Some(left))?;
        }
        self.sock.read(buf)
    }
}

impl Write for Until<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn handshake(sock: &TcpStream, mut conn: Connection, until: Option<Instant>) -> io::Result<Stream> {
    let mut io = Until { sock, until };
    while conn.is_handshaking() {
        conn.complete_io(&mut io)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut io)?;
    }
    // Each write is encrypted at once and written out by the same call.
    conn.set_buffer_limit(None);
    Ok(Stream {
        sock: sock.try_clone()?,
        tls: Some(Arc::new(Shared {
            state: Mutex::new(State {
                conn,
                plain: Vec::new(),
                at: 0,
                closed: false,
            }),
            out: Mutex::new(Vec::new()),
            raw: Mutex::new(vec![0u8; 64 * 1024]),
        })),
    })
}

impl Stream {
    /// A plaintext stream.
    pub fn plain(sock: TcpStream) -> Stream {
        Stream { sock, tls: None }
    }

    /// Runs a client handshake on `sock` (its timeouts apply) for a server named `name`.
    pub fn connect(
        sock: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Stream> {
        let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        handshake(&sock, conn.into(), None)
    }

    /// Runs a server handshake on `sock` (its timeouts apply).
    pub fn accept(sock: TcpStream, config: Arc<ServerConfig>) -> io::Result<Stream> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        handshake(&sock, conn.into(), None)
    }

    /// Runs a server handshake on `sock` that must complete by `until`, however slowly the
    /// client's bytes trickle in (the socket's read timeout is changed on the way).
    pub fn accept_until(
        sock: TcpStream,
        config: Arc<ServerConfig>,
        until: Instant,
    ) -> io::Result<Stream> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        handshake(&sock, conn.into(), Some(until))
    }

    /// The socket of a plaintext stream, or of a TLS one (then its TLS state is dropped).
    pub fn into_socket(self) -> TcpStream {
        self.sock
    }

    /// Another handle on the same stream (for a reader thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(Stream {
            sock: self.sock.try_clone()?,
            tls: self.tls.clone(),
        })
    }

    /// The socket underneath: for timeouts, `shutdown`, addresses.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The peer's end-entity certificate, when it presented one.
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        let state = lock(&self.tls.as_ref()?.state).ok()?;
        Some(
            state
                .conn
                .peer_certificates()?
                .first()?
                .clone()
                .into_owned(),
        )
    }

    /// The TLS protocol version and cipher suite, for logs.
    pub fn describe_session(&self) -> Option<String> {
        let state = lock(&self.tls.as_ref()?.state).ok()?;
        Some(format!(
            "{:?} {:?}",
            state.conn.protocol_version()?,
            state.conn.negotiated_cipher_suite()?.suite()
        ))
    }
}

/// Moves what rustls decrypted into `st.plain`, so the next `read_tls` has room.
fn take_plaintext(st: &mut State) -> io::Result<()> {
    if st.at == st.plain.len() {
        st.plain.clear();
        st.at = 0;
    }
    let mut piece = [0u8; 8192];
    loop {
        match st.conn.reader().read(&mut piece) {
            Ok(0) => {
                st.closed = true;
                return Ok(());
            }
            Ok(n) => st.plain.extend_from_slice(&piece[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            // The peer closed the socket without close_notify: an end like any other here
            // (the link's frames say whether anything was cut short).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                st.closed = true;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return (&self.sock).read(buf);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        let mut raw = lock(&tls.raw)?;
        loop {
            {
                let mut st = lock(&tls.state)?;
                take_plaintext(&mut st)?;
                if st.at < st.plain.len() {
                    let n = buf.len().min(st.plain.len() - st.at);
                    buf[..n].copy_from_slice(&st.plain[st.at..st.at + n]);
                    st.at += n;
                    return Ok(n);
                }
                if st.closed {
                    return Ok(0);
                }
            }
            let n = (&self.sock).read(&mut raw)?;
            let mut st = lock(&tls.state)?;
            if n == 0 {
                st.closed = true;
                return Ok(0);
            }
            let mut fed = &raw[..n];
            while !fed.is_empty() {
                st.conn.read_tls(&mut fed)?;
                st.conn
                    .process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                take_plaintext(&mut st)?;
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Stream {
    /// Encrypts `bufs` (gathering small ones into whole records) and writes them out.
    fn send(&self, tls: &Shared, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut out = lock(&tls.out)?;
        out.clear();
        let mut taken = 0usize;
        {
            let mut st = lock(&tls.state)?;
            let mut gather: Vec<u8> = Vec::new();
            for b in bufs {
                if taken >= PIECE {
                    break;
                }
                let b = &b[..b.len().min(PIECE - taken)];
                if gather.len() + b.len() <= RECORD {
                    gather.extend_from_slice(b);
                } else {
                    if !gather.is_empty() {
                        st.conn.writer().write_all(&gather)?;
                        gather.clear();
                    }
                    if b.len() < RECORD {
                        gather.extend_from_slice(b);
                    } else {
                        st.conn.writer().write_all(b)?;
                    }
                }
                taken += b.len();
            }
            if !gather.is_empty() {
                st.conn.writer().write_all(&gather)?;
            }
            while st.conn.wants_write() {
                st.conn.write_tls(&mut *out)?;
            }
        }
        (&self.sock).write_all(&out)?;
        out.clear();
        Ok(taken)
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.tls {
            None => (&self.sock).write(buf),
            Some(tls) => self.send(tls, &[IoSlice::new(buf)]),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &self.tls {
            None => (&self.sock).write_vectored(bufs),
            Some(tls) => self.send(tls, bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
