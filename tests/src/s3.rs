//! A real S3 server for tests: SeaweedFS (`weed mini`) on free 127.0.0.1 ports with a temporary
//! directory, one bucket and one identity, killed when dropped. `make setup` installs it
//! (scripts/seaweedfs.sh, into target/seaweedfs/).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

pub const ACCESS_KEY: &str = "cdptestkey";
pub const SECRET_KEY: &str = "cdptestsecret0123456789";

/// A running SeaweedFS with bucket `bucket`.
#[derive(Debug)]
pub struct Seaweed {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub endpoint: String,
    pub bucket: String,
    s3_port: u16,
    ports: [u16; 3],
}

/// The `weed` binary: $CDP_WEED, else the one `make setup` installs, else one on PATH.
pub fn weed() -> PathBuf {
    if let Some(w) = std::env::var_os("CDP_WEED") {
        return w.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/seaweedfs/venv/bin/weed
    let installed = exe
        .ancestors()
        .nth(3)
        .map(|t| t.join("seaweedfs/venv/bin/weed"));
    if let Some(p) = installed.filter(|p| p.is_file()) {
        return p;
    }
    crate::require("weed");
    "weed".into()
}

/// A port p with p+10000 free too (every SeaweedFS service also opens port+10000 for gRPC).
fn port_pair(taken: &[u16]) -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a port");
        let p = l.local_addr().expect("its address").port();
        if p > 55000 || taken.contains(&p) || taken.contains(&(p + 10000)) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
    panic!("no free pair of ports (p, p+10000) on 127.0.0.1");
}

impl Seaweed {
    /// Starts one; a start that fails (a port taken meanwhile by a parallel test) is tried
    /// again on other ports, twice.
    pub fn start(bucket: &str) -> anyhow::Result<Seaweed> {
        let mut last = None;
        for _ in 0..3 {
            match Seaweed::start_once(bucket) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    eprintln!("SeaweedFS did not start ({e:#}); trying other ports");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("three attempts"))
    }

    fn start_once(bucket: &str) -> anyhow::Result<Seaweed> {
        let dir = tempfile::tempdir()?;
        let mut taken = Vec::new();
        for _ in 0..4 {
            let p = port_pair(&taken);
            taken.push(p);
        }
        let mut s = Seaweed {
            child: None,
            endpoint: format!("http://127.0.0.1:{}", taken[0]),
            bucket: bucket.to_owned(),
            s3_port: taken[0],
            ports: [taken[1], taken[2], taken[3]],
            dir,
        };
        let config = serde_json::json!({"identities": [{
            "name": "cdp",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]});
        std::fs::write(s.dir.path().join("s3.json"), config.to_string())?;
        std::fs::create_dir_all(s.dir.path().join("data"))?;
        std::fs::create_dir_all(s.dir.path().join("logs"))?;
        s.spawn()?;
        Ok(s)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())?;
        let arg = |k: &str, v: &Path| format!("-{k}={}", v.display());
        let child = Command::new(weed())
            // A global flag: before the command.
            .arg(arg("logdir", &d.join("logs")))
            .arg("mini")
            .arg(arg("dir", &d.join("data")))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={}", self.s3_port))
            .arg(format!("-master.port={}", self.ports[0]))
            .arg(format!("-volume.port={}", self.ports[1]))
            .arg(format!("-filer.port={}", self.ports[2]))
            .args(["-webdav=false", "-admin.ui=false"])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg("-s3.autoCreateBucket=false")
            .arg(format!("-bucket={}", self.bucket))
            .arg(arg("s3.config", &d.join("s3.json")))
            // Its heap otherwise grows to ~900 MB.
            .env("GOMEMLIMIT", "256MiB")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start weed mini (SeaweedFS): run `make setup`")?;
        self.child = Some(child);
        // Up when a signed PUT into the bucket succeeds, not when a port answers.
        let bucket = self.client()?;
        let child = self.child.as_mut().expect("just started");
        let ready = crate::wait_for("SeaweedFS to take a PUT", Duration::from_secs(60), || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(status));
            }
            let ok = bucket.put(".ready", &b"ok"[..]).is_ok();
            ok.then_some(Ok(()))
        });
        let tail = |log: String| log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
        let ready = ready.map_err(|e| {
            anyhow::anyhow!("{e}; log (last lines first):\n{}", tail(self.log_text()))
        })?;
        if let Err(status) = ready {
            bail!("weed mini exited ({status}); log:\n{}", self.log_text());
        }
        Ok(())
    }

    /// The flags a replicator or restore reaches this server with.
    pub fn flags(&self) -> Vec<String> {
        self.flags_with_secret(SECRET_KEY)
    }

    pub fn flags_with_secret(&self, secret: &str) -> Vec<String> {
        [
            "--s3-endpoint",
            &self.endpoint,
            "--s3-access-key-id",
            ACCESS_KEY,
            "--s3-secret-access-key",
            secret,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    pub fn settings(&self) -> bucket::Settings {
        bucket::Settings {
            s3_endpoint: Some(self.endpoint.clone()),
            s3_region: "us-east-1".into(),
            s3_access_key_id: Some(ACCESS_KEY.into()),
            s3_secret_access_key: Some(SECRET_KEY.into()),
        }
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// A client of the bucket (no prefix).
    pub fn client(&self) -> anyhow::Result<bucket::Bucket> {
        let loc = bucket::Location {
            bucket: self.bucket.clone(),
            prefix: String::new(),
        };
        Ok(bucket::Bucket::open(loc, &self.settings())?)
    }

    /// Kills it (SIGKILL: a server that disappears).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GROUP/upload.json` of a staging store, as JSON.
pub fn upload_status(g: &journal::store::GroupDir) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(g.path.join("upload.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The last seq of the newest sealed segment of a staging store (0: none).
pub fn sealed_last_seq(g: &journal::store::GroupDir) -> Option<u64> {
    let mut segments = g.segments().ok()?;
    segments.pop(); // the open one
    let last = segments.last().map(|s| s.load_index());
    match last {
        None => Some(0),
        Some(Ok((entries, _))) => entries.last().map(|e| e.seq),
        Some(Err(_)) => None,
    }
}

/// The manifest of group g under prefix `cdp` (checked), and its ETag.
pub fn manifest_of_g(s3: &Seaweed) -> (bucket::manifest::Manifest, String) {
    let (bytes, etag) = s3
        .client()
        .expect("a client")
        .get("cdp/g/manifest.json")
        .expect("get the manifest")
        .expect("a manifest");
    let m = bucket::manifest::Manifest::decode(&bytes, "manifest").expect("a good manifest");
    (m, etag)
}
