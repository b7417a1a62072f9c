//! TLS for the replication link and for NBD, with rustls (ring as the crypto provider):
//!
//! * [`server_config`] and [`client_config`] build rustls configurations from PEM files, with
//!   errors that name the file and what is wrong with it (an expired certificate is refused at
//!   start, not at the first handshake);
//! * [`cert_names`] reads the names a peer's certificate carries (its CN, then its DNS names):
//!   the replicator authorizes a group by them;
//! * [`lab`] makes a small CA and certificates in the file layout QEMU and libnbd read
//!   (`ca-cert.pem`, `server-cert.pem`, `client-cert.pem`, ...), so a lab needs no openssl;
//! * [`Stream`] is a blocking TCP stream, plain or TLS, that a reader thread and a writer
//!   thread share (`try_clone`), as the replication link's threads do with a `TcpStream`;
//! * [`explain`] turns a failed handshake into a sentence that says which side to fix.

pub mod lab;
mod stream;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
pub use stream::Stream;

/// What can go wrong while loading credentials or making certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {what}", path.display())]
    Bad { path: PathBuf, what: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error("making a certificate: {0}")]
    Cert(#[from] rcgen::Error),
}

pub type Result<T> = std::result::Result<T, TlsError>;

/// The crypto provider every configuration here uses: ring's, with AES-128-GCM first (the
/// suite TLS 1.3 mandates, and with AES-NI the cheapest per byte: 10 rounds to AES-256's 14;
/// the link carries whole disks' changes).
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn bad(path: &Path, what: impl Into<String>) -> TlsError {
    TlsError::Bad {
        path: path.to_owned(),
        what: what.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file (a chain: the end entity first), each checked to be
/// within its validity period now.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad(path, "holds no certificate (BEGIN CERTIFICATE)"));
    }
    for cert in &certs {
        check_validity(path, cert)?;
    }
    Ok(certs)
}

fn check_validity(path: &Path, cert: &CertificateDer<'_>) -> Result<()> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| bad(path, format!("not an X.509 certificate: {e}")))?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(bad(
            path,
            format!(
                "the certificate for {} expired on {}; issue a new one (`replicator tls issue`)",
                parsed.subject(),
                validity.not_after
            ),
        ));
    }
    if now < validity.not_before {
        return Err(bad(
            path,
            format!(
                "the certificate for {} is not valid before {} (is the clock right?)",
                parsed.subject(),
                validity.not_before
            ),
        ));
    }
    Ok(())
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad(path, format!("holds no private key: {e}")))
}

/// The certificates of a CA file as trust anchors.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| bad(path, format!("not usable as a CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// Whether a server asks its clients for certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCerts {
    /// Every client must present a certificate signed by the CA.
    Required,
    /// A client may present one (then it must be signed by the CA) or none.
    Optional,
}

/// A server's configuration: its certificate chain and key, and with `client_ca` the CA whose
/// client certificates it accepts.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<(&Path, ClientCerts)>,
) -> Result<Arc<ServerConfig>> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some((ca, mode)) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(load_roots(ca)?, provider());
            let verifier = match mode {
                ClientCerts::Required => verifier,
                ClientCerts::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| bad(ca, format!("cannot verify clients with it: {e}")))?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| bad(key, format!("does not go with {}: {e}", cert.display())))?;
    // Sessions are long; resumption would only add state.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client's configuration: the CA that signed the server's certificate, and optionally the
/// client's own certificate and key.
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Arc<ClientConfig>> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(load_roots(ca)?);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| bad(key, format!("does not go with {}: {e}", cert.display())))?,
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The name a client checks the server's certificate against: a DNS name or an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|e| TlsError::Config(format!("{host:?} is not a host name or address: {e}")))
}

/// The host part of `HOST:PORT` (`[v6]:PORT` too).
pub fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
            host.trim_start_matches('[').trim_end_matches(']')
        }
        _ => addr,
    }
}

/// The names a certificate carries: its subject's common names, then its DNS names.
pub fn cert_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let mut names: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                if !names.iter().any(|n| n == dns) {
                    names.push((*dns).to_owned());
                }
            }
        }
    }
    names
}

/// A sentence for a failed TLS handshake or a broken TLS stream, or None when `e` is not a
/// TLS error.
pub fn explain(e: &io::Error) -> Option<String> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    Some(match tls {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "the peer's certificate is not signed by the CA given with --tls-ca".into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the peer's certificate has expired".into()
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the peer's certificate is not valid yet (is a clock wrong?)".into()
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the peer's certificate is not for the name it was reached by \
             (issue it for that host, or pass --tls-server-name)"
                .into()
        }
        E::InvalidCertificate(other) => format!("the peer's certificate is refused: {other:?}"),
        E::NoCertificatesPresented => "the peer presented no certificate".into(),
        E::AlertReceived(
            alert @ (A::UnknownCA
            | A::BadCertificate
            | A::CertificateExpired
            | A::CertificateRequired
            | A::CertificateUnknown
            | A::AccessDenied
            | A::DecryptError),
        ) => format!(
            "the peer refused this side's certificate ({alert:?}): it must be signed by the CA \
             the peer trusts, valid now, and present"
        ),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "the peer does not speak TLS here (a plaintext port? one side runs with --insecure)"
                .into()
        }
        other => format!("TLS: {other}"),
    })
}

/// `e` with [`explain`]'s sentence in front when it is a TLS error.
pub fn describe(e: &io::Error) -> String {
    match explain(e) {
        Some(why) => format!("{why} ({e})"),
        None => e.to_string(),
    }
}

/// The TLS options every program here takes, flattened into its clap arguments.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Files {
    /// This program's certificate, PEM (a chain: its own first). `replicator tls init` and
    /// `replicator tls issue` make a lab's.
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, PEM.
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate peers' certificates must be signed by, PEM.
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    pub tls_ca: Option<PathBuf>,
}

impl Files {
    /// Whether any TLS file was given.
    pub fn any(&self) -> bool {
        self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some()
    }

    /// The certificate and key, both required once either is given.
    pub fn identity(&self) -> Result<Option<(&Path, &Path)>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Ok(Some((c, k))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Config("--tls-cert needs --tls-key".into())),
            (None, Some(_)) => Err(TlsError::Config("--tls-key needs --tls-cert".into())),
        }
    }
}

/// Whether an NBD server offers TLS (`--tls`): not at all, to clients that ask (STARTTLS), or
/// to every client (plaintext clients are refused).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    #[default]
    Off,
    On,
    Require,
}
