//! A small certificate authority for a lab, so nobody needs openssl to try TLS.
//!
//! The files use the names QEMU's `tls-creds-x509` and libnbd's `tls-certificates` read from
//! a directory, so a directory made here can be handed to them as it is:
//!
//! * `init(DIR)`: `ca-cert.pem`, `ca-key.pem`, and `server-cert.pem`/`server-key.pem` for the
//!   replicator (and any NBD server on this host), valid for localhost, 127.0.0.1, ::1, this
//!   host's name and any `hosts` given;
//! * `issue(DIR, NAME, OUT)`: `OUT/client-cert.pem` and `OUT/client-key.pem` for the name
//!   (a group's proxy: the replicator authorizes the group by it), also valid as a server
//!   certificate for `hosts`, and a copy of `ca-cert.pem`.
//!
//! Keys are ECDSA P-256, written 0600. Every certificate may serve as client and server
//! (both extended key usages), with the key usages QEMU insists on.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::{bad, read, Result, TlsError};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// How long a certificate is valid: from `not_before` to `not_after`.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clocks differ a little) for `days`.
    pub fn days(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

/// localhost, 127.0.0.1 and ::1: what every certificate made here is valid for.
pub fn loopback_hosts() -> Vec<String> {
    ["localhost", "127.0.0.1", "::1"].map(String::from).into()
}

/// The names a server certificate made on this host is valid for, before any given: the
/// loopback ones and this host's name.
pub fn local_hosts() -> Vec<String> {
    let mut hosts = loopback_hosts();
    if let Ok(name) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let name = name.trim();
        if !name.is_empty() && !hosts.iter().any(|h| h == name) {
            hosts.push(name.to_owned());
        }
    }
    hosts
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    let io = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

fn params(cn: &str, sans: &[String], validity: Validity) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(sans.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.not_before = validity.not_before;
    p.not_after = validity.not_after;
    Ok(p)
}

fn leaf(cn: &str, sans: &[String], validity: Validity) -> Result<CertificateParams> {
    let mut p = params(cn, sans, validity)?;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// The CA in `dir`, ready to sign.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate as its file holds it (what peers trust).
    pem: String,
}

fn load_ca(dir: &Path) -> Result<Ca> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let cert_pem = String::from_utf8_lossy(&read(&cert_path)?).into_owned();
    let key_pem = String::from_utf8_lossy(&read(&key_path)?).into_owned();
    let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, e.to_string()))?;
    let params = CertificateParams::from_ca_cert_pem(&cert_pem)
        .map_err(|e| bad(&cert_path, format!("not a CA certificate: {e}")))?;
    // The same name and key as the file's: what it signs chains to the file's certificate.
    let cert = params.self_signed(&key)?;
    Ok(Ca {
        cert,
        key,
        pem: cert_pem,
    })
}

fn sign(
    ca: &Ca,
    params: CertificateParams,
    dir: &Path,
    cert: &str,
    key: &str,
) -> Result<[PathBuf; 2]> {
    let pair = KeyPair::generate()?;
    let signed = params.signed_by(&pair, &ca.cert, &ca.key)?;
    let (cert_path, key_path) = (dir.join(cert), dir.join(key));
    write_file(&key_path, &pair.serialize_pem(), 0o600)?;
    write_file(&cert_path, &signed.pem(), 0o644)?;
    Ok([cert_path, key_path])
}

/// Makes a CA in `dir` (which must not hold one) and a server certificate signed by it for
/// [`local_hosts`] and `hosts`. Returns the files written.
pub fn init(dir: &Path, hosts: &[String], validity: Validity) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).map_err(|source| TlsError::Read {
        path: dir.to_owned(),
        source,
    })?;
    if dir.join(CA_KEY).exists() {
        return Err(bad(
            &dir.join(CA_KEY),
            "a CA already exists here; issue certificates from it, or pick another directory",
        ));
    }
    // A name of its own: a verifier that meets a certificate from another lab CA then says
    // "unknown issuer" rather than "bad signature".
    let made = OffsetDateTime::now_utc();
    let host = local_hosts().pop().unwrap_or_default();
    let ca_name = format!("cdp lab CA {host} {}", made.unix_timestamp_nanos());
    let mut ca_params = params(&ca_name, &[], validity)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = ca_params.self_signed(&key)?;
    write_file(&dir.join(CA_KEY), &key.serialize_pem(), 0o600)?;
    let pem = cert.pem();
    write_file(&dir.join(CA_CERT), &pem, 0o644)?;
    let ca = Ca { cert, key, pem };
    let mut sans = local_hosts();
    for h in hosts {
        if !sans.contains(h) {
            sans.push(h.clone());
        }
    }
    let server = sign(
        &ca,
        leaf("replicator", &sans, validity)?,
        dir,
        SERVER_CERT,
        SERVER_KEY,
    )?;
    let mut files = vec![dir.join(CA_CERT), dir.join(CA_KEY)];
    files.extend(server);
    Ok(files)
}

/// Issues a certificate for `name` from the CA in `dir` into `out` (`client-cert.pem`,
/// `client-key.pem`, a copy of `ca-cert.pem`), valid as a server certificate for `hosts`
/// too. Returns the files written.
pub fn issue(
    dir: &Path,
    name: &str,
    hosts: &[String],
    out: &Path,
    validity: Validity,
) -> Result<Vec<PathBuf>> {
    let ca = load_ca(dir)?;
    fs::create_dir_all(out).map_err(|source| TlsError::Read {
        path: out.to_owned(),
        source,
    })?;
    let mut sans = vec![name.to_owned()];
    for h in hosts {
        if !sans.contains(h) {
            sans.push(h.clone());
        }
    }
    let mut files = sign(
        &ca,
        leaf(name, &sans, validity)?,
        out,
        CLIENT_CERT,
        CLIENT_KEY,
    )?
    .to_vec();
    let ca_copy = out.join(CA_CERT);
    if ca_copy != dir.join(CA_CERT) {
        write_file(&ca_copy, &ca.pem, 0o644)?;
        files.push(ca_copy);
    }
    Ok(files)
}
