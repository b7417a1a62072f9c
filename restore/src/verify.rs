//! `restore verify --boot`: serve the point as an export with a throw-away overlay, boot it
//! under QEMU, and wait for a line on the serial console. KVM is tried when /dev/kvm is usable
//! and the guest shows no sign of life under it; then TCG.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use journal::units::parse_duration;
use nbd_server::{Export, Listener};
use tracing::info;

use crate::open;

#[derive(clap::Args, Debug)]
pub struct BootArgs {
    /// Boot the point under QEMU (the check this command makes).
    #[arg(long, required = true)]
    pub boot: bool,
    /// Text on the serial console that means the guest came up.
    #[arg(long, value_name = "TEXT", default_value = "login:")]
    pub expect: String,
    /// Give up after this long.
    #[arg(long, value_name = "AGE", value_parser = parse_duration, default_value = "120s")]
    pub timeout: Duration,
    /// Boot this kernel directly (else the disks' own boot loader, through the BIOS).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initramfs for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(
        long,
        value_name = "ARGS",
        requires = "kernel",
        default_value = "console=ttyS0 panic=-1 no_timer_check"
    )]
    pub append: String,
    /// kvm, tcg, or auto (KVM when it boots, else TCG).
    #[arg(long, value_name = "ACCEL", default_value = "auto")]
    pub accel: String,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value = "512")]
    pub memory: u32,
    /// Keep the serial console here (else it is in a temporary directory).
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
}

pub fn verify(
    store: &crate::remote::Store,
    group: &str,
    at: &str,
    args: &BootArgs,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("restore-verify-")
        .tempdir()?;
    let mut opened = open::open_point(store, group, None, at, Some((tmp.path(), false)))?;
    let point = open::describe(&opened);
    let disks = open::into_arcs(&mut opened);
    let socket = tmp.path().join("nbd.sock");
    let listener = nbd_server::listen::bind_unix(&socket)?;
    let names: Vec<String> = disks.iter().map(|(n, _, _)| n.clone()).collect();
    let exports: Vec<Export<crate::view::PointView>> = disks
        .iter()
        .map(|(n, _, v)| Export::new(n, &point, v.clone()))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(async move {
        listener.set_nonblocking(true)?;
        let l = Listener::Unix(tokio::net::UnixListener::from_std(listener)?);
        nbd_server::run(vec![l], exports, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let export_ms = started.elapsed().as_millis();
    let console = args
        .console_log
        .clone()
        .unwrap_or_else(|| tmp.path().join("console.log"));
    let accels: Vec<&str> = match args.accel.as_str() {
        "auto" if kvm_usable() => vec!["kvm", "tcg"],
        "auto" => vec!["tcg"],
        "kvm" => vec!["kvm"],
        "tcg" => vec!["tcg"],
        other => bail!("--accel must be auto, kvm or tcg, not {other:?}"),
    };
    println!(
        "verifying group {group} at {point}: export ready in {export_ms} ms, booting {} disk(s) ({})",
        names.len(),
        names.join(", ")
    );
    let mut outcome = None;
    for (i, accel) in accels.iter().enumerate() {
        let _ = std::fs::remove_file(&console);
        let boot_start = Instant::now();
        let mut qemu = spawn_qemu(args, accel, &socket, &names, &console)?;
        // Under auto, KVM gets 20 s to show a first console byte before TCG is tried.
        let first_try_limit = (accels.len() > 1 && i == 0).then_some(Duration::from_secs(20));
        let result = watch(
            &mut qemu,
            &console,
            &args.expect,
            args.timeout,
            first_try_limit,
        );
        let _ = qemu.kill();
        let _ = qemu.wait();
        match result {
            Watch::Silent if i + 1 < accels.len() => {
                info!("no console output under {accel}; trying the next accelerator");
                continue;
            }
            other => {
                outcome = Some((other, *accel, boot_start.elapsed()));
                break;
            }
        }
    }
    let _ = stop_tx.send(());
    let _ = runtime.block_on(server);
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let Some((result, accel, took)) = outcome else {
        bail!("QEMU was not started");
    };
    match result {
        Watch::Seen => {
            println!(
                "PASS: {:?} appeared on the console {:.1} s after boot ({accel}); group {group} at {point} boots",
                args.expect,
                took.as_secs_f64()
            );
            Ok(true)
        }
        other => {
            println!(
                "FAIL: {} ({accel}, after {:.1} s); group {group} at {point}\n--- console tail ---\n{}",
                match other {
                    Watch::Exited(s) => format!("QEMU exited ({s}) before {:?} appeared", args.expect),
                    _ => format!("{:?} did not appear within {:?}", args.expect, args.timeout),
                },
                took.as_secs_f64(),
                tail.join("\n")
            );
            Ok(false)
        }
    }
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn spawn_qemu(
    args: &BootArgs,
    accel: &str,
    socket: &Path,
    disks: &[String],
    console: &Path,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-accel",
        accel,
    ])
    .args(["-m", &args.memory.to_string()])
    .arg("-serial")
    .arg(format!("file:{}", console.display()));
    if accel == "kvm" {
        cmd.args(["-cpu", "host"]);
    }
    if let Some(k) = &args.kernel {
        cmd.arg("-kernel").arg(k).args(["-append", &args.append]);
        if let Some(i) = &args.initrd {
            cmd.arg("-initrd").arg(i);
        }
    }
    for (i, name) in disks.iter().enumerate() {
        cmd.arg("-blockdev").arg(format!(
            "driver=nbd,node-name=d{i},server.type=unix,server.path={},export={name}",
            socket.display()
        ));
        cmd.args(["-device", &format!("virtio-blk-pci,drive=d{i}")]);
        if i == 0 && args.kernel.is_none() {
            // Boot from the first disk.
            cmd.args(["-boot", "c"]);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.spawn()
        .context("start qemu-system-x86_64 (install qemu-system-x86)")
}

enum Watch {
    Seen,
    Timeout,
    Silent,
    Exited(String),
}

fn watch(
    qemu: &mut Child,
    console: &Path,
    expect: &str,
    timeout: Duration,
    silent_limit: Option<Duration>,
) -> Watch {
    let start = Instant::now();
    loop {
        let text = std::fs::read(console).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains(expect) {
            return Watch::Seen;
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = qemu.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Watch::Exited(format!("{status}: {}", err.trim()));
        }
        if silent_limit.is_some_and(|l| start.elapsed() > l) && text.is_empty() {
            return Watch::Silent;
        }
        if start.elapsed() > timeout {
            return Watch::Timeout;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
