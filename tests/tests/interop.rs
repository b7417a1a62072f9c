//! nbd-proxy with real third-party clients: nbdinfo, qemu-img, qemu-io, nbdcopy, fio, the `nbd`
//! crate; over a unix socket, TCP and socket activation.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;

use serde_json::Value;
use tests::{make_image, pattern, read_file, require, run, system_path, Proxy};

const MIB: u64 = 1 << 20;

/// A 64 MiB image with data at 0..1M and 8M..9M, holes elsewhere.
fn sample_image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    make_image(
        &path,
        64 * MIB,
        &[
            (0, &pattern(1, MIB as usize)),
            (8 * MIB, &pattern(2, MIB as usize)),
        ],
    )
    .expect("image");
    path
}

fn proxy(dir: &Path, image: &Path, extra: &[&str]) -> Proxy {
    let disk = format!("disk={}", image.display());
    let mut args = vec!["--disk", disk.as_str()];
    args.extend_from_slice(extra);
    Proxy::start(&dir.join("nbd.sock"), &args).expect("start proxy")
}

#[test]
fn nbdinfo_reports_export_map_and_multi_conn() {
    let dir = tempfile::tempdir().unwrap();
    let image = sample_image(dir.path());
    let mut p = proxy(dir.path(), &image, &[]);
    let uri = p.uri("disk");

    let info: Value = serde_json::from_str(&run("nbdinfo", &["--json", &uri]).unwrap()).unwrap();
    let e = &info["exports"][0];
    assert_eq!(info["structured"], true);
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["export-size"], 64 * MIB);
    assert_eq!(e["contexts"][0], "base:allocation");
    for key in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[key], true, "{key} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_preferred"], 4096);

    // Exit status 0 means "yes".
    run("nbdinfo", &["--can", "multi-conn", &uri]).unwrap();

    let map = run("nbdinfo", &["--map", &uri]).unwrap();
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expect = [
        (0, MIB, "data"),
        (MIB, 7 * MIB, "hole,zero"),
        (8 * MIB, MIB, "data"),
        (9 * MIB, 55 * MIB, "hole,zero"),
    ];
    assert_eq!(rows.len(), expect.len(), "map:\n{map}");
    for (row, (start, len, kind)) in rows.iter().zip(expect) {
        assert_eq!(
            (row[0], row[1], row[3]),
            (start.to_string().as_str(), len.to_string().as_str(), kind),
            "{map}"
        );
    }
    p.stop().unwrap();
}

#[test]
fn qemu_img_info_map_compare_convert() {
    let dir = tempfile::tempdir().unwrap();
    let image = sample_image(dir.path());
    let mut p = proxy(dir.path(), &image, &[]);
    let uri = p.uri("disk");

    let info: Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", &uri]).unwrap()).unwrap();
    assert_eq!(info["virtual-size"], 64 * MIB);

    let map: Value =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", &uri]).unwrap()).unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["data"] == true)
        .map(|m| (m["start"].as_u64().unwrap(), m["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, [(0, MIB), (8 * MIB, MIB)], "{map}");

    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &uri,
            image.to_str().unwrap(),
        ],
    )
    .unwrap();
    let out = dir.path().join("out.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            out.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(
        read_file(&out) == read_file(&image),
        "converted image differs"
    );
    p.stop().unwrap();
}

#[test]
fn qemu_io_patterns_zeroes_discard_flush() {
    let dir = tempfile::tempdir().unwrap();
    let image = sample_image(dir.path());
    let mut p = proxy(dir.path(), &image, &[]);
    let uri = p.uri("disk");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 4095 3",
            "-c",
            "read -P 0xcd 4095 3",
            "-c",
            "write -z 8M 512k",
            "-c",
            "read -P 0 8M 512k",
            "-c",
            "discard 2M 1M",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "aio_write -P 0x11 16M 64k",
            "-c",
            "aio_write -P 0x22 17M 64k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x22 17M 64k",
            "-c",
            "flush",
            &uri,
        ],
    )
    .unwrap();
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io reported a failure:\n{out}"
    );
    let img = read_file(&image);
    assert!(img[..4095].iter().all(|&b| b == 0xab));
    assert_eq!(&img[4095..4098], &[0xcd; 3]);
    assert!(img[8 << 20..(8 << 20) + (512 << 10)]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        &img[(8 << 20) + (512 << 10)..9 << 20],
        &pattern(2, MIB as usize)[512 << 10..]
    );
    assert!(img[16 << 20..(16 << 20) + 65536].iter().all(|&b| b == 0x11));
    p.stop().unwrap();
}

/// Four 64 MiB writes at once (the maximum payload) from libnbd, read back with structured and
/// with simple replies; the image holds them, and the proxy's peak memory stays far below the
/// 256 MiB that holding them would take (long payloads stream in pieces within its budget).
#[test]
fn sixty_four_mib_requests_stream_within_bounded_memory() {
    const WRITES: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.img");
    make_image(&image, WRITES * 64 * MIB + MIB, &[]).unwrap();
    let mut p = proxy(dir.path(), &image, &[]);
    let before = p.peak_rss_bytes().unwrap();
    let script = format!(
        r#"
import random
size, n, uri, image = 64 << 20, {WRITES}, "{uri}", "{image}"
def connect(structured):
    c = nbd.NBD()
    c.set_request_structured_replies(structured)
    c.connect_uri(uri)
    assert c.get_structured_replies_negotiated() == structured
    assert c.get_block_size(nbd.SIZE_MAXIMUM) == size, c.get_block_size(nbd.SIZE_MAXIMUM)
    return c
def wait(c, cookies):
    while c.aio_in_flight() > 0:
        c.poll(-1)
    for cookie in cookies:
        assert c.aio_command_completed(cookie)
data = [random.Random(i).randbytes(size) for i in range(n)]
c = connect(True)
bufs = [nbd.Buffer.from_bytearray(bytearray(d)) for d in data]
wait(c, [c.aio_pwrite(b, i * size) for i, b in enumerate(bufs)])
del bufs
c.flush()
with open(image, "rb") as f:
    for i in range(n):
        assert f.read(size) == data[i], f"write {{i}} is not in the image"
reads = [nbd.Buffer(size) for _ in range(n)]
wait(c, [c.aio_pread(b, i * size) for i, b in enumerate(reads)])
for i in range(n):
    assert reads[i].to_bytearray() == data[i], f"structured read {{i}}"
del reads
s = connect(False)
for i in range(n):
    assert s.pread(size, i * size) == data[i], f"simple read {{i}}"
c.shutdown()
s.shutdown()
"#,
        uri = p.uri("disk"),
        image = image.display(),
    );
    run("nbdsh", &["-c", &script]).unwrap();
    let grown = p.peak_rss_bytes().unwrap().saturating_sub(before);
    assert!(
        grown < 96 * MIB,
        "peak RSS grew by {} MiB for {WRITES} concurrent 64 MiB writes",
        grown / MIB
    );
    p.stop().unwrap();
}

#[test]
fn nbdcopy_in_and_out_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.img");
    make_image(&served, 64 * MIB, &[]).unwrap();
    let source = sample_image(dir.path());
    let mut p = proxy(dir.path(), &served, &[]);
    let uri = p.uri("disk");
    run(
        "nbdcopy",
        &["-C", "4", "--requests=64", source.to_str().unwrap(), &uri],
    )
    .unwrap();
    assert!(
        read_file(&served) == read_file(&source),
        "nbdcopy in: served image differs from source"
    );
    let back = dir.path().join("back.img");
    run("nbdcopy", &["-C", "4", &uri, back.to_str().unwrap()]).unwrap();
    assert!(
        read_file(&back) == read_file(&source),
        "nbdcopy out: copy differs"
    );
    p.stop().unwrap();
}

fn fio_verify(uri: &str, jobs: u32) {
    let jobs_arg = format!("--numjobs={jobs}");
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16m",
            "--offset_increment=16m",
            &jobs_arg,
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--verify_fatal=1",
            "--output-format=json",
        ],
    )
    .unwrap();
    let json = &out[out.find('{').expect("fio json")..];
    let v: Value = serde_json::from_str(json).unwrap();
    let jobs_out = v["jobs"].as_array().unwrap();
    assert_eq!(jobs_out.len(), jobs as usize);
    for j in jobs_out {
        assert_eq!(j["error"], 0, "fio job failed: {j}");
        assert_eq!(
            j["write"]["io_bytes"],
            16 * MIB,
            "every job wrote its 16 MiB"
        );
        assert_eq!(
            j["read"]["io_bytes"],
            16 * MIB,
            "every job read back (verified) its 16 MiB"
        );
    }
}

#[test]
fn fio_random_writes_verify_one_and_four_connections() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 64 * MIB, &[]).unwrap();
    let mut p = proxy(dir.path(), &image, &[]);
    fio_verify(&p.uri("disk"), 1);
    fio_verify(&p.uri("disk"), 4);
    p.stop().unwrap();
}

#[test]
fn tcp_listener_serves_the_same_export() {
    let dir = tempfile::tempdir().unwrap();
    let image = sample_image(dir.path());
    let mut p = proxy(dir.path(), &image, &["--listen", "127.0.0.1:0"]);
    let uri = format!("nbd://{}/disk", p.tcp_address().unwrap());
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &uri,
            image.to_str().unwrap(),
        ],
    )
    .unwrap();
    p.stop().unwrap();
}

#[test]
fn socket_activation_and_export_list() {
    let dir = tempfile::tempdir().unwrap();
    let a = sample_image(dir.path());
    let b = dir.path().join("b.img");
    make_image(&b, MIB, &[]).unwrap();
    let proxy = tests::bin("nbd-proxy");
    let (da, db) = (
        format!("root={}", a.display()),
        format!("data={}", b.display()),
    );
    // nbdinfo starts the server itself and passes it a socket (LISTEN_FDS).
    let out = run(
        "nbdinfo",
        &[
            "--list",
            "--json",
            "--",
            "[",
            proxy.to_str().unwrap(),
            "--disk",
            &da,
            "--disk",
            &db,
            "]",
        ],
    )
    .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["root", "data"]);
    assert_eq!(v["exports"][1]["export-size"], MIB);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = sample_image(dir.path());
    let before = read_file(&image);
    let mut p = proxy(dir.path(), &image, &["--read-only"]);
    let info: Value =
        serde_json::from_str(&run("nbdinfo", &["--json", &p.uri("disk")]).unwrap()).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    require("qemu-io");
    let out = std::process::Command::new("qemu-io")
        .env("PATH", system_path())
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &p.uri("disk")])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("ermission denied")
            || text.contains("read-only")
            || text.contains("read only"),
        "{text}"
    );
    assert!(
        read_file(&image) == before,
        "a read-only export changed the image"
    );
    p.stop().unwrap();
}

#[test]
fn independent_rust_client_with_export_name_and_padding() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let image = sample_image(dir.path());
    let mut p = proxy(dir.path(), &image, &[]);
    let mut stream = std::os::unix::net::UnixStream::connect(&p.socket).unwrap();
    let export = nbd::client::handshake(&mut stream, b"disk").unwrap();
    assert_eq!(export.size, 64 * MIB);
    let mut client = nbd::client::NbdClient::new(&mut stream, &export);
    let mut buf = vec![0u8; 4096];
    client.seek(SeekFrom::Start(8 * MIB)).unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(buf, pattern(2, MIB as usize)[..4096]);
    client.seek(SeekFrom::Start(32 * MIB)).unwrap();
    client.write_all(&[7u8; 4096]).unwrap();
    client.flush().unwrap();
    drop(stream);
    assert_eq!(
        &read_file(&image)[32 << 20..(32 << 20) + 4096],
        &[7u8; 4096][..]
    );
    p.stop().unwrap();
}
