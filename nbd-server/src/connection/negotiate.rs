//! The handshake's I/O: the greeting, then option haggling (in plaintext, or inside TLS after
//! STARTTLS) until the client asks for transmission, starts TLS or goes. The rules are
//! `handshake`'s (no I/O); this reads and writes them.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::warn;

use super::{discard, invalid};
use crate::handshake::{self, Agreement, Negotiation, Outcome, TlsOffer};
use crate::proto::MAX_OPTION_BYTES;

/// `work`'s result, or `None` once `shutdown` turns true first.
pub(super) async fn unless_stopped<T>(
    shutdown: &mut watch::Receiver<bool>,
    work: impl Future<Output = io::Result<T>>,
) -> io::Result<Option<T>> {
    tokio::select! {
        biased;
        _ = shutdown.wait_for(|stop| *stop) => Ok(None),
        done = work => done.map(Some),
    }
}

/// A client that gave up after being told TLS is required: a WARN, since a plaintext client
/// pointed at a TLS-only server is a misconfiguration someone must fix.
pub(super) fn note_plaintext_refusal(negotiation: &Negotiation) {
    if let Some(option) = negotiation.refused_for_tls() {
        warn!(
            "refused a plaintext client: TLS is required here, and it sent {} without \
             NBD_OPT_STARTTLS (give the client TLS credentials, or use --tls on)",
            handshake::option_name(option)
        );
    }
}

/// Sends the greeting and reads the client's flags.
pub(super) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    tls: TlsOffer,
) -> io::Result<Negotiation> {
    stream.write_all(&handshake::greeting()).await?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).await?;
    let client = handshake::parse_client_flags(flags).map_err(invalid)?;
    Ok(Negotiation::new(client, tls))
}

/// How option haggling ended.
pub(super) enum Haggled {
    /// The client went away, aborted, or asked for what cannot be answered.
    Closed,
    Agreed(Agreement),
    /// STARTTLS was acknowledged: the TLS handshake comes next, on the same socket.
    StartTls,
}

/// Runs option haggling on `stream` until transmission, STARTTLS or the end. Options are read
/// unbuffered, so no byte after the last one (a TLS ClientHello, a first request) is taken
/// from the socket here.
pub(super) async fn options<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    negotiation: &mut Negotiation,
    exports: &[handshake::ExportInfo],
) -> io::Result<Haggled> {
    let mut out = Vec::new();
    let mut data = Vec::new();
    loop {
        let mut header = [0u8; 16];
        match stream.read_exact(&mut header).await {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Haggled::Closed),
            r => r?,
        };
        let (option, len) = handshake::parse_option_header(&header).map_err(invalid)?;
        out.clear();
        let outcome = if len > MAX_OPTION_BYTES {
            discard(stream, u64::from(len)).await?;
            negotiation.too_big(option, &mut out)
        } else {
            data.resize(len as usize, 0);
            stream.read_exact(&mut data).await?;
            negotiation.handle(option, &data, exports, &mut out)
        };
        stream.write_all(&out).await?;
        // A TLS stream holds what it encrypted until flushed.
        stream.flush().await?;
        match outcome {
            Outcome::Continue => continue,
            Outcome::Abort | Outcome::Close => return Ok(Haggled::Closed),
            Outcome::Transmission(agreement) => return Ok(Haggled::Agreed(agreement)),
            Outcome::StartTls => return Ok(Haggled::StartTls),
        }
    }
}
