//! NBD over TLS (STARTTLS, x509): what a TCP listener offers, built from the `--tls` flags both
//! servers take, and the TLS handshake on a socket whose client sent STARTTLS. The option rules
//! are `handshake`'s (no I/O); this is the rustls end, for `connection` to call.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::handshake::TlsOffer;

/// A TLS handshake that has not finished in this long is given up (a client that sent
/// STARTTLS and then nothing holds no connection for ever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS as a TCP listener offers it: the server's configuration, and whether plaintext
/// clients are refused.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    required: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

impl Tls {
    pub fn new(config: Arc<tokio_rustls::rustls::ServerConfig>, required: bool) -> Tls {
        Tls {
            acceptor: TlsAcceptor::from(config),
            required,
        }
    }

    /// From `--tls MODE` and `--tls-cert/--tls-key/--tls-ca`: `None` for `off`; with a CA,
    /// every client must present a certificate it signed. Errors name the flag or the file.
    pub fn from_flags(mode: tls::Mode, files: &tls::Files) -> tls::Result<Option<Tls>> {
        let required = match mode {
            tls::Mode::Off => return Ok(None),
            tls::Mode::On => false,
            tls::Mode::Require => true,
        };
        let Some((cert, key)) = files.identity()? else {
            return Err(tls::TlsError::Config(format!(
                "--tls {} needs --tls-cert and --tls-key: the certificate this server shows \
                 its NBD clients (`replicator tls init DIR` makes a lab's)",
                if required { "require" } else { "on" }
            )));
        };
        let clients = files
            .tls_ca
            .as_deref()
            .map(|ca| (ca, tls::ClientCerts::Required));
        Ok(Some(Tls::new(
            tls::server_config(cert, key, clients)?,
            required,
        )))
    }

    /// What the negotiation offers on a socket of this listener.
    pub fn offer(&self) -> TlsOffer {
        if self.required {
            TlsOffer::Required
        } else {
            TlsOffer::Optional
        }
    }

    /// Runs the server's side of the TLS handshake on `stream` (after STARTTLS was
    /// acknowledged), within [`HANDSHAKE_TIMEOUT`]. An error says why; [`tls::describe`]
    /// turns it into a sentence.
    pub async fn accept<S>(&self, stream: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?} of STARTTLS"),
                )
            })??;
        let (_, session) = stream.get_ref();
        let client = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| tls::cert_names(cert).join(", "));
        debug!(
            version = ?session.protocol_version(),
            client = client.as_deref().unwrap_or("no certificate"),
            "TLS established"
        );
        Ok(stream)
    }
}
