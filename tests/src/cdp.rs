//! Harness for replication tests: a running replicator, a TCP relay that can cut the link,
//! the proxy's status over its control socket, and the journal read back and replayed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use journal::record::Kind;
use journal::store::{self, GroupDir};
use journal::wire;

use crate::{bin, wait_for};

pub use crate::peer::RawPeer;

/// A free TCP port on loopback (bound and released; fine for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `--insecure` unless `args` give TLS files: most tests are about other things than the
/// link's TLS (tests/tests/link_tls.rs is about that).
pub fn insecure_unless_tls<S: AsRef<str>>(args: &[S]) -> impl Iterator<Item = &'static str> {
    let tls = args.iter().any(|a| a.as_ref().starts_with("--tls-"));
    (!tls).then_some("--insecure").into_iter()
}

/// A running `replicator serve`, killed when dropped.
#[derive(Debug)]
pub struct Replicator {
    child: Option<Child>,
    pub store: PathBuf,
    pub addr: String,
    pub log: PathBuf,
    extra: Vec<String>,
    /// The network namespace it runs in (None: this one).
    netns: Option<String>,
    /// `--store` when it is not `store` (an s3:// one; `store` is then its --staging).
    store_arg: Option<String>,
}

impl Replicator {
    pub fn start(store: &Path, extra: &[&str]) -> anyhow::Result<Replicator> {
        Replicator::start_at(store, "127.0.0.1", None, extra)
    }

    /// Starts it listening on `ip` (a free port), inside network namespace `netns` if given.
    pub fn start_at(
        store: &Path,
        ip: &str,
        netns: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<Replicator> {
        let mut r = Replicator {
            child: None,
            store: store.to_owned(),
            addr: format!("{ip}:{}", free_port()),
            log: store.with_extension("replicator.log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: netns.map(str::to_owned),
            store_arg: None,
        };
        r.spawn()?;
        Ok(r)
    }

    /// Starts it with `--store URL --staging STAGING` (a store on S3).
    pub fn start_s3(staging: &Path, url: &str, extra: &[&str]) -> anyhow::Result<Replicator> {
        Replicator::start_s3_on(&format!("127.0.0.1:{}", free_port()), staging, url, extra)
    }

    /// [`Replicator::start_s3`] listening on `addr` (where a replicator that is gone listened:
    /// its proxy reconnects there).
    pub fn start_s3_on(
        addr: &str,
        staging: &Path,
        url: &str,
        extra: &[&str],
    ) -> anyhow::Result<Replicator> {
        let mut r = Replicator {
            child: None,
            store: staging.to_owned(),
            addr: addr.to_owned(),
            log: staging.with_extension("replicator.log"),
            extra: ["--staging", &staging.display().to_string()]
                .into_iter()
                .chain(extra.iter().copied())
                .map(str::to_owned)
                .collect(),
            netns: None,
            store_arg: Some(url.to_owned()),
        };
        r.spawn()?;
        Ok(r)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("replicator"));
                c
            }
            None => Command::new(bin("replicator")),
        };
        let mut child = cmd
            .args(["serve", "--listen", &self.addr, "--store"])
            .arg(
                self.store_arg
                    .as_ref()
                    .map_or(self.store.as_os_str(), |s| s.as_ref()),
            )
            .args(&self.extra)
            .args(insecure_unless_tls(&self.extra))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn replicator")?;
        let addr = self.addr.clone();
        let up = wait_for("the replicator to listen", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(status));
            }
            TcpStream::connect(&addr).ok().map(|_| Ok(()))
        })?;
        if let Err(status) = up {
            bail!("replicator exited ({status}); log:\n{}", self.log_text());
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("replicator running")
    }

    /// Sends a signal (SIGSTOP freezes it as a vanished host would look, SIGCONT thaws it).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)
            .expect("signal the replicator");
    }

    /// Fails when the log has an ERROR line other than those `allowed` mentions.
    pub fn assert_no_errors_but(&self, allowed: &[&str]) -> anyhow::Result<()> {
        let log = self.log_text();
        if let Some(l) = log
            .lines()
            .filter(|l| l.contains(" ERROR "))
            .find(|l| !allowed.iter().any(|a| l.contains(a)))
        {
            bail!("the replicator logged an unexpected ERROR: {l}\nlog:\n{log}");
        }
        Ok(())
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn group(&self, name: &str) -> GroupDir {
        GroupDir::new(&self.store, name)
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A TCP relay between the proxy and the replicator whose link can be cut and restored.
#[derive(Debug)]
pub struct Relay {
    pub addr: String,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    /// Bytes relayed in both directions since the start or the last [`Relay::take_bytes`].
    bytes: Arc<AtomicU64>,
}

impl Relay {
    pub fn start(target: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().expect("relay addr").to_string();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let bytes: Arc<AtomicU64> = Arc::default();
        let (target, up2, conns2, bytes2) =
            (target.to_owned(), up.clone(), conns.clone(), bytes.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut list = conns2.lock().expect("relay lock");
                for s in [&client, &server] {
                    if let Ok(c) = s.try_clone() {
                        list.push(c);
                    }
                }
                drop(list);
                let count = bytes2.clone();
                pipe(
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                    count,
                );
                pipe(server, client, bytes2.clone());
            }
        });
        Relay {
            addr,
            up,
            conns,
            bytes,
        }
    }

    /// Bytes relayed (both directions) since the last call.
    pub fn take_bytes(&self) -> u64 {
        self.bytes.swap(0, Ordering::SeqCst)
    }

    /// Cuts every connection and refuses new ones until [`Relay::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().expect("relay lock").drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, count: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    count.fetch_add(n as u64, Ordering::SeqCst);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// `nbd-proxy status --json` of a running proxy.
pub fn proxy_status(control: &Path) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(bin("nbd-proxy"))
        .args(["status", "--json", "--control"])
        .arg(control)
        .output()?;
    if !out.status.success() {
        bail!("nbd-proxy status: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Waits until everything the proxy captured is durable at the replicator and no sync runs.
pub fn wait_caught_up(control: &Path, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let mut last = serde_json::Value::Null;
    let r = wait_for("replication to catch up", timeout, || {
        let s = proxy_status(control).ok()?;
        let done = s["link"] == "connected"
            && s["lag_seq"] == 0
            && s["sync_running"] == false
            && s["tracking"] == "live"
            && s["syncs_completed"].as_u64() >= Some(1);
        last = s.clone();
        done.then_some(s)
    });
    r.with_context(|| format!("last status: {last:#}"))
}

/// One record read back from the store.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub seq: u64,
    pub kind: Kind,
    pub disk: u16,
    pub offset: u64,
    pub length: u64,
    pub data: Vec<u8>,
    pub text: String,
}

/// Every record of a group after its base, in seq order, checked (payloads decompressed).
/// Reads like `replicator check`: a torn tail ends the list.
pub fn read_journal(dir: &GroupDir) -> anyhow::Result<Vec<StoredRecord>> {
    let base = dir.mark("base")?;
    let mut out: Vec<StoredRecord> = Vec::new();
    for seg in dir.segments()? {
        let mut err = None;
        seg.scan(|r, _| {
            if r.header.seq <= base.seq || err.is_some() {
                return;
            }
            let data = if r.header.kind.carries_data() {
                match r.payload() {
                    Ok(d) => d.into_owned(),
                    Err(e) => {
                        err = Some(e);
                        return;
                    }
                }
            } else {
                Vec::new()
            };
            out.push(StoredRecord {
                seq: r.header.seq,
                kind: r.header.kind,
                disk: r.header.disk,
                offset: r.header.offset,
                length: r.header.length,
                data,
                text: if r.header.kind.carries_data() {
                    String::new()
                } else {
                    r.text()
                },
            });
        })?;
        if let Some(e) = err {
            bail!("{}: {e}", seg.path.display());
        }
    }
    for w in out.windows(2) {
        if w[1].seq != w[0].seq + 1 {
            bail!("journal has a gap: seq {} then {}", w[0].seq, w[1].seq);
        }
    }
    Ok(out)
}

/// Applies one record to in-memory disks (the journal's own in-memory replay target).
pub fn apply(disks: &mut Vec<Vec<u8>>, r: &StoredRecord) {
    use journal::read::Apply;
    let applied = match r.kind {
        Kind::Write | Kind::SyncData => disks.write(r.disk, r.offset, &r.data),
        Kind::Zero | Kind::Trim => disks.zero(r.disk, r.offset, r.length),
        _ => Ok(()),
    };
    applied.expect("in-memory disks take every record");
}

/// The group's base images followed by every record up to `seq`, in memory.
pub fn replay(dir: &GroupDir, records: &[StoredRecord], seq: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    let meta = dir.meta()?;
    let mut disks = meta
        .volumes
        .iter()
        .map(|v| std::fs::read(dir.image("base", &v.name)))
        .collect::<std::io::Result<Vec<_>>>()?;
    for r in records.iter().take_while(|r| r.seq <= seq) {
        apply(&mut disks, r);
    }
    Ok(disks)
}

/// `replicator check --store`: fails with its output unless every checksum is good.
pub fn check_store(store: &Path) -> anyhow::Result<String> {
    let out = Command::new(bin("replicator"))
        .args(["check", "--store"])
        .arg(store)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "replicator check failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// A running `restore export`, stopped with SIGTERM when dropped.
#[derive(Debug)]
pub struct Export {
    child: Child,
    pub socket: PathBuf,
    out: PathBuf,
}

impl Export {
    /// Starts `restore export --store STORE --group g --at AT --socket SOCKET EXTRA...`.
    pub fn start(store: &Path, at: &str, socket: &Path, extra: &[&str]) -> anyhow::Result<Export> {
        let out = socket.with_extension("out");
        let child = Command::new(bin("restore"))
            .args(["export", "--store"])
            .arg(store)
            .args(["--group", "g", "--at", at, "--socket"])
            .arg(socket)
            .args(extra)
            .stdout(std::fs::File::create(&out)?)
            .stderr(Stdio::null())
            .spawn()
            .context("spawn restore export")?;
        let mut e = Export {
            child,
            socket: socket.to_owned(),
            out,
        };
        let socket = e.socket.clone();
        let r = crate::connect_while_alive(
            "restore export to listen",
            &mut e.child,
            &socket,
            Duration::from_secs(30),
        )?;
        if r.is_err() {
            bail!("restore export exited: {}", e.output());
        }
        Ok(e)
    }

    pub fn uri(&self, disk: &str) -> String {
        format!("nbd+unix:///{disk}?socket={}", self.socket.display())
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The whole disk through qemu-img convert (a third-party client).
    pub fn read_disk(&self, disk: &str, dir: &Path) -> anyhow::Result<Vec<u8>> {
        let file = dir.join(format!("read-{disk}-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&file);
        crate::run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &self.uri(disk),
                file.to_str().context("temp path is not UTF-8")?,
            ],
        )?;
        let bytes = crate::read_file(&file);
        std::fs::remove_file(&file)?;
        Ok(bytes)
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

pub use store::SeqMark;

/// Starts `nbd-proxy` replicating `disks` (NAME, image) to `rep` as group `g`, with its control
/// socket at `DIR/ctl` and its unix socket at `DIR/nbd.sock`.
pub fn start_proxy(dir: &Path, rep: &str, disks: &[(&str, &Path)], extra: &[&str]) -> crate::Proxy {
    let mut args: Vec<String> = Vec::new();
    for (name, path) in disks {
        args.push("--disk".into());
        args.push(format!("{name}={}", path.display()));
    }
    for a in ["--replicate", rep, "--group", "g", "--control"] {
        args.push(a.into());
    }
    args.push(dir.join("ctl").display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(insecure_unless_tls(extra).map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    crate::Proxy::start(&dir.join("nbd.sock"), &args).expect("start nbd-proxy")
}

/// Runs one of the project's binaries: (success, stdout then stderr).
pub fn cli(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin(program))
        .args(args)
        .output()
        .expect("run a project binary");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// qemu-io commands against an NBD URI (a third-party client).
pub fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    crate::run("qemu-io", &args).expect("qemu-io");
}

/// Base + journal replay equals each image, and `replicator check` passes.
pub fn replica_equals(store: &Path, disks: &[(&str, &Path)]) {
    let group = GroupDir::new(store, "g");
    let records = read_journal(&group).expect("read the journal");
    let replayed = replay(&group, &records, u64::MAX).expect("replay");
    for (i, (name, image)) in disks.iter().enumerate() {
        assert!(
            replayed[i] == crate::read_file(image),
            "base + journal replay of {name} equals its image"
        );
    }
    check_store(store).expect("replicator check");
}

/// A relay between proxy and replicator that can flip one payload bit of the next batch and
/// fix the frame's checksum, so the batch arrives whole but one record's own checksum fails:
/// what a bug (or a hostile peer) would send.
#[derive(Debug)]
pub struct CorruptingRelay {
    pub addr: String,
    corrupt: Arc<AtomicBool>,
}

impl CorruptingRelay {
    pub fn start(target: &str) -> CorruptingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().expect("relay addr").to_string();
        let corrupt = Arc::new(AtomicBool::new(false));
        let (target, flag) = (target.to_owned(), corrupt.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                pipe(
                    server.try_clone().expect("clone"),
                    client.try_clone().expect("clone"),
                    Arc::default(),
                );
                let flag = flag.clone();
                std::thread::spawn(move || relay_frames(client, server, &flag));
            }
        });
        CorruptingRelay { addr, corrupt }
    }

    pub fn corrupt_next_batch(&self) {
        self.corrupt.store(true, Ordering::SeqCst);
    }
}

fn relay_frames(mut from: TcpStream, mut to: TcpStream, corrupt: &AtomicBool) {
    loop {
        let mut head = [0u8; wire::FRAME_HEADER_LEN];
        if from.read_exact(&mut head).is_err() {
            break;
        }
        let len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
        let mut body = vec![0u8; len];
        if from.read_exact(&mut body).is_err() {
            break;
        }
        let batch = head[4] == wire::FrameType::Batch as u8;
        if batch
            && body.len() > journal::record::HEADER_LEN + 1
            && corrupt.swap(false, Ordering::SeqCst)
        {
            // A batch frame has no crc of its own: only the record's checksum can catch this.
            body[journal::record::HEADER_LEN] ^= 0x01;
        }
        if to
            .write_all(&head)
            .and_then(|()| to.write_all(&body))
            .is_err()
        {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// `restore materialize` of group `g` (one disk) at `at` into `out`: (success, its output).
pub fn materialize_at(store: &str, at: &str, out: &Path) -> (bool, String) {
    let out = out.to_str().expect("temp paths are UTF-8");
    cli(
        "restore",
        &[
            "materialize",
            "--store",
            store,
            "--group",
            "g",
            "--at",
            at,
            "--output",
            out,
        ],
    )
}

/// One scrape of a `--metrics` endpoint, fetched with Python's urllib and parsed by the
/// Prometheus project's own parser (`prometheus_client.parser`, from PyPI; `make setup`
/// installs it).
#[derive(Debug)]
pub struct Scrape {
    pub content_type: String,
    pub text: String,
    /// Families as the parser returns them: name (a counter's without `_total`), type, help,
    /// samples (name, labels, value).
    pub families: Vec<serde_json::Value>,
}

const SCRAPE_PY: &str = r#"
import json, sys, urllib.error, urllib.request
from prometheus_client.parser import text_string_to_metric_families
url, mode = sys.argv[1], sys.argv[2]
if mode == "status":
    try:
        urllib.request.urlopen(url, timeout=30).read()
        print(200)
    except urllib.error.HTTPError as e:
        print(e.code)
    sys.exit(0)
with urllib.request.urlopen(url, timeout=30) as r:
    ctype, text = r.headers.get("Content-Type"), r.read().decode("utf-8")
families = [
    {"name": f.name, "type": f.type, "help": f.documentation,
     "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
    for f in text_string_to_metric_families(text)
]
print(json.dumps({"content_type": ctype, "text": text, "families": families}))
"#;

fn scrape_py(url: &str, mode: &str) -> anyhow::Result<String> {
    // The python3 on PATH: the one scripts/setup.sh installed prometheus-client for.
    let out = Command::new("python3")
        .args(["-c", SCRAPE_PY, url, mode])
        .output()
        .context("run python3 (install it, then `make setup`)")?;
    if !out.status.success() {
        bail!(
            "scraping {url} with prometheus_client failed (missing? `make setup` installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// GET http://ADDR/metrics, parsed.
pub fn scrape(addr: &str) -> anyhow::Result<Scrape> {
    let out = scrape_py(&format!("http://{addr}/metrics"), "parse")?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(Scrape {
        content_type: v["content_type"].as_str().unwrap_or_default().to_owned(),
        text: v["text"].as_str().unwrap_or_default().to_owned(),
        families: v["families"].as_array().cloned().unwrap_or_default(),
    })
}

/// The HTTP status a GET of `http://ADDR{path}` gets.
pub fn http_status(addr: &str, path: &str) -> anyhow::Result<u16> {
    Ok(scrape_py(&format!("http://{addr}{path}"), "status")?.parse()?)
}

impl Scrape {
    /// The family of a sample named `name` (a counter's family drops `_total`).
    pub fn family(&self, name: &str) -> Option<&serde_json::Value> {
        let family = name.strip_suffix("_total").unwrap_or(name);
        self.families.iter().find(|f| f["name"] == family)
    }

    /// The value of the sample `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.family(name)?["samples"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][k] == *v))?
            ["value"]
            .as_f64()
    }

    /// Like [`Scrape::value`], failing with the whole text when there is no such sample.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in:\n{}", self.text))
    }
}
