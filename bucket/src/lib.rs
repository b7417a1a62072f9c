//! The store on S3-compatible object storage (AWS S3, SeaweedFS, MinIO, Ceph RGW).
//!
//! [`Bucket`] is a blocking client over `object_store` (which is async only: each `Bucket`
//! owns a current-thread runtime, so it is used from threads that are not in a runtime). Its
//! errors say what to fix (credentials, bucket, endpoint). [`manifest`] is the format: the
//! per-group manifest, the commit point, and the keys of the immutable objects it names.
//! [`fetch`] copies what a manifest names into a local directory with a store's layout, each
//! object checked first (restore's cache; a replicator taking a group over onto a new machine).
//!
//! ```text
//! s3://BUCKET/PREFIX/<group>/manifest.json                       the commit point (conditional PUT)
//!                   <group>/journal/<epoch>-<first>-<last>.seg   a sealed segment, and its .idx
//!                   <group>/base/<volume>/<sha256>.chunk         4 MiB of a base image (not zeroes)
//!                   <group>/base/<volume>/<sha256>.table         which chunk holds which range
//!                   <group>/base/<volume>/<sha256>.sums          the base image's chunk checksums
//! ```

pub mod fetch;
pub mod manifest;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion,
};

/// What went wrong talking to the bucket, as a sentence that names the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not an S3 location: write s3://BUCKET or s3://BUCKET/PREFIX")]
    Url(String),
    #[error(
        "the S3 endpoint {0} is plain http on another host: use https (http is allowed for \
         127.0.0.1, ::1 and localhost only)"
    )]
    InsecureEndpoint(String),
    #[error(
        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or give \
         --s3-access-key-id and --s3-secret-access-key)"
    )]
    NoCredentials,
    #[error(
        "the S3 server at {endpoint} refused access key {access_key} for bucket {bucket} \
         ({op} {key}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that this key may \
         use the bucket"
    )]
    Credentials {
        endpoint: String,
        access_key: String,
        bucket: String,
        op: &'static str,
        key: String,
    },
    #[error(
        "bucket {bucket} does not exist at {endpoint}: create it (e.g. `aws s3 mb \
         s3://{bucket}`), or correct the s3:// location"
    )]
    NoBucket { endpoint: String, bucket: String },
    #[error(
        "the S3 server at {endpoint} does not answer ({op} {key}: {detail}): start it, or \
         correct AWS_ENDPOINT_URL (--s3-endpoint)"
    )]
    Unreachable {
        endpoint: String,
        op: &'static str,
        key: String,
        detail: String,
    },
    #[error("{key} is not in bucket {bucket}")]
    NotFound { bucket: String, key: String },
    /// A conditional PUT lost: the object exists (put-if-absent) or changed (put-if-match).
    #[error("{key} in bucket {bucket} was written by someone else meanwhile")]
    Changed { bucket: String, key: String },
    #[error("S3 {op} {key} at {endpoint} failed: {source}")]
    Other {
        endpoint: String,
        op: &'static str,
        key: String,
        source: Box<object_store::Error>,
    },
    #[error("start the S3 client: {0}")]
    Runtime(std::io::Error),
}

/// Where in object storage: `s3://BUCKET/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub bucket: String,
    /// Without leading or trailing slashes; may be empty.
    pub prefix: String,
}

impl Location {
    /// `Some` for an `s3://` URL (checked), `None` for anything else (a directory).
    pub fn parse(s: &str) -> Option<Result<Location, Error>> {
        let rest = s.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let ok_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !ok_bucket || prefix.split('/').any(|p| p == "." || p == "..") {
            return Some(Err(Error::Url(s.to_owned())));
        }
        Some(Ok(Location {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        }))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// How to reach the server: flags, else the AWS environment variables.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Settings {
    /// The S3 endpoint for an s3:// store, e.g. http://127.0.0.1:8333 [default: AWS S3 of the
    /// region]. http is allowed for 127.0.0.1, ::1 and localhost only.
    #[arg(
        long,
        value_name = "URL",
        env = "AWS_ENDPOINT_URL",
        help_heading = "S3"
    )]
    pub s3_endpoint: Option<String>,
    /// The S3 region.
    #[arg(
        long,
        value_name = "NAME",
        env = "AWS_REGION",
        default_value = "us-east-1",
        help_heading = "S3"
    )]
    pub s3_region: String,
    /// The access key id.
    #[arg(
        long,
        value_name = "ID",
        env = "AWS_ACCESS_KEY_ID",
        help_heading = "S3"
    )]
    pub s3_access_key_id: Option<String>,
    /// The secret key (prefer the environment variable: a flag shows in `ps`).
    #[arg(
        long,
        value_name = "KEY",
        env = "AWS_SECRET_ACCESS_KEY",
        hide_env_values = true,
        help_heading = "S3"
    )]
    pub s3_secret_access_key: Option<String>,
}

fn is_loopback(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(h) => h.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    matches!(host, "127.0.0.1" | "::1" | "localhost")
}

/// A blocking client of one bucket and prefix.
#[derive(Debug)]
pub struct Bucket {
    rt: tokio::runtime::Runtime,
    store: Arc<AmazonS3>,
    pub location: Location,
    endpoint: String,
    access_key: String,
}

impl Bucket {
    /// A client (no request is made: [`Bucket::check`] makes the first one).
    pub fn open(location: Location, settings: &Settings) -> Result<Bucket, Error> {
        // rustls needs its crypto provider chosen before the first client (ring, as the
        // `tls` crate builds rustls); a second install is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (Some(access_key), Some(secret)) = (
            settings.s3_access_key_id.clone(),
            settings.s3_secret_access_key.clone(),
        ) else {
            return Err(Error::NoCredentials);
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(&settings.s3_region)
            .with_access_key_id(&access_key)
            .with_secret_access_key(secret)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 6,
                retry_timeout: Duration::from_secs(15),
            });
        let mut options = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(120));
        let endpoint = match &settings.s3_endpoint {
            Some(e) => {
                if e.starts_with("http://") {
                    if !is_loopback(e) {
                        return Err(Error::InsecureEndpoint(e.clone()));
                    }
                    options = options.with_allow_http(true);
                }
                builder = builder
                    .with_endpoint(e)
                    .with_virtual_hosted_style_request(false);
                e.clone()
            }
            None => format!("https://s3.{}.amazonaws.com", settings.s3_region),
        };
        let store = builder
            .with_client_options(options)
            .build()
            .map_err(|source| Error::Other {
                endpoint: endpoint.clone(),
                op: "configure",
                key: String::new(),
                source: Box::new(source),
            })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        Ok(Bucket {
            rt,
            store: Arc::new(store),
            location,
            endpoint,
            access_key,
        })
    }

    fn path(&self, key: &str) -> Path {
        if self.location.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.location.prefix))
        }
    }

    /// The error a failed request means to a user.
    fn error(&self, op: &'static str, key: &str, e: object_store::Error) -> Error {
        use object_store::Error as E;
        match e {
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => Error::Credentials {
                endpoint: self.endpoint.clone(),
                access_key: self.access_key.clone(),
                bucket: self.location.bucket.clone(),
                op,
                key: key.to_owned(),
            },
            E::NotFound { .. } => Error::NotFound {
                bucket: self.location.bucket.clone(),
                key: key.to_owned(),
            },
            E::AlreadyExists { .. } | E::Precondition { .. } => Error::Changed {
                bucket: self.location.bucket.clone(),
                key: key.to_owned(),
            },
            e => match connect_failure(&e) {
                Some(detail) => Error::Unreachable {
                    endpoint: self.endpoint.clone(),
                    op,
                    key: key.to_owned(),
                    detail,
                },
                None => Error::Other {
                    endpoint: self.endpoint.clone(),
                    op,
                    key: key.to_owned(),
                    source: Box::new(e),
                },
            },
        }
    }

    /// One request that proves the bucket is there and the credentials work: a HEAD of the
    /// bucket itself (an object request would say "not found" for a missing bucket and a
    /// missing object alike, and listings report no status a caller can tell apart).
    pub fn check(&self) -> Result<(), Error> {
        let r = self.rt.block_on(self.store.head(&Path::from("")));
        match r {
            Ok(_) => Ok(()),
            Err(e) => match self.error("HEAD", "", e) {
                Error::NotFound { .. } => Err(Error::NoBucket {
                    endpoint: self.endpoint.clone(),
                    bucket: self.location.bucket.clone(),
                }),
                // A 200 without an object's headers is not an object: the bucket answered.
                Error::Other { .. } => Ok(()),
                e => Err(e),
            },
        }
    }

    fn put_mode(&self, key: &str, bytes: Bytes, mode: PutMode) -> Result<Option<String>, Error> {
        let path = self.path(key);
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        self.rt
            .block_on(
                self.store
                    .put_opts(&path, PutPayload::from_bytes(bytes), opts),
            )
            .map(|r| r.e_tag)
            .map_err(|e| self.error("PUT", key, e))
    }

    /// Writes an immutable object. `Ok(false)`: it was there already (a retry after a crash
    /// or a lost reply; the caller checks it is the same).
    pub fn put_if_absent(&self, key: &str, bytes: impl Into<Bytes>) -> Result<bool, Error> {
        match self.put_mode(key, bytes.into(), PutMode::Create) {
            Ok(_) => Ok(true),
            Err(Error::Changed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Replaces an object only if it is still the version with `etag` (None: only if there is
    /// none), so two writers never both win. Returns the new ETag. [`Error::Changed`]: lost.
    pub fn put_if_match(
        &self,
        key: &str,
        bytes: impl Into<Bytes>,
        etag: Option<&str>,
    ) -> Result<String, Error> {
        let mode = match etag {
            None => PutMode::Create,
            Some(e) => PutMode::Update(UpdateVersion {
                e_tag: Some(e.to_owned()),
                version: None,
            }),
        };
        let etag = self.put_mode(key, bytes.into(), mode)?;
        Ok(etag.unwrap_or_default())
    }

    /// Writes an object unconditionally (tests use it to damage one).
    pub fn put(&self, key: &str, bytes: impl Into<Bytes>) -> Result<(), Error> {
        self.put_mode(key, bytes.into(), PutMode::Overwrite)
            .map(|_| ())
    }

    /// The object and its ETag, or None when it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<(Bytes, String)>, Error> {
        let path = self.path(key);
        let r = self.rt.block_on(async {
            let g = self.store.get(&path).await?;
            let etag = g.meta.e_tag.clone().unwrap_or_default();
            Ok::<_, object_store::Error>((g.bytes().await?, etag))
        });
        match r {
            Ok(v) => Ok(Some(v)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("GET", key, e)),
        }
    }

    /// Bytes `range` of an object (a range GET).
    pub fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, Error> {
        let path = self.path(key);
        self.rt
            .block_on(self.store.get_range(&path, range))
            .map_err(|e| self.error("GET", key, e))
    }

    /// Keys (relative to the prefix) and sizes of every object under `under`.
    pub fn list(&self, under: &str) -> Result<Vec<(String, u64)>, Error> {
        let path = self.path(under);
        let strip = match self.location.prefix.as_str() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let found: Vec<_> = self
            .rt
            .block_on(self.store.list(Some(&path)).try_collect())
            .map_err(|e| self.error("list", under, e))?;
        Ok(found
            .into_iter()
            .map(|m| {
                let k = m.location.to_string();
                (k.strip_prefix(&strip).unwrap_or(&k).to_owned(), m.size)
            })
            .collect())
    }

    /// Deletes an object (deleting one that is gone is not an error).
    pub fn delete(&self, key: &str) -> Result<(), Error> {
        let path = self.path(key);
        match self.rt.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("DELETE", key, e)),
        }
    }
}

/// A connection that failed (refused, timed out, reset): the server is not there. The cause
/// is found by type in the error's sources, never by its text.
fn connect_failure(e: &object_store::Error) -> Option<String> {
    use object_store::client::{HttpError, HttpErrorKind};
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<HttpError>() {
            if matches!(
                h.kind(),
                HttpErrorKind::Connect | HttpErrorKind::Timeout | HttpErrorKind::Interrupted
            ) {
                let mut detail = h.to_string();
                let mut inner = std::error::Error::source(h);
                while let Some(i) = inner {
                    detail = i.to_string();
                    inner = i.source();
                }
                return Some(detail);
            }
        }
        source = s.source();
    }
    None
}

/// sha256 of `bytes`, as lowercase hex: the checksum every object is named and checked by.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let l = Location::parse("s3://cdp-1/a/b/").unwrap().unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("cdp-1", "a/b"));
        let l = Location::parse("s3://cdp").unwrap().unwrap();
        assert_eq!(l.prefix, "");
        assert!(Location::parse("/srv/cdp").is_none());
        assert!(Location::parse("s3://A_b/x").unwrap().is_err());
        assert!(Location::parse("s3://bkt/../x").unwrap().is_err());
    }

    #[test]
    fn http_only_on_loopback() {
        assert!(is_loopback("http://127.0.0.1:8333"));
        assert!(is_loopback("http://[::1]:8333/"));
        assert!(is_loopback("http://localhost"));
        assert!(!is_loopback("http://10.0.0.1:8333"));
        assert!(!is_loopback("https://127.0.0.1"));
    }

    #[test]
    fn sha256_of_abc() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
