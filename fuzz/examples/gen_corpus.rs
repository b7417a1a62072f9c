//! Writes the checked-in seed corpus, `fuzz/corpus/<target>/seed-*`: a few real messages per
//! fuzz target, encoded with the project's own encoders, so the fuzzers start past the magics
//! and checksums. Each seed is checked to parse before it is written.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus` (rewrites the seeds; the
//! output is deterministic, so an unchanged format leaves `git status` clean).

use std::path::{Path, PathBuf};

use journal::record::{self, Encoded, Kind};
use journal::segment::{self, SegmentHeader};
use journal::wire::{self, FrameType, Hashes, Hello, Volume, Welcome};
use nbd_server::handshake::{parse_client_flags, parse_option_header};
use nbd_server::proto::*;
use nbd_server::request::{validate, Limits, RequestHeader};

struct Corpus {
    root: PathBuf,
    written: usize,
    bytes: usize,
}

impl Corpus {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
        self.written += 1;
        self.bytes += bytes.len();
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut c = Corpus {
        root,
        written: 0,
        bytes: 0,
    };
    nbd_request(&mut c);
    nbd_handshake(&mut c);
    let records = records();
    for (name, bytes) in &records {
        assert!(matches!(record::parse(bytes), Ok(Some(_))), "{name}");
        c.put("record", name, bytes);
    }
    segments(&mut c, &records);
    frames(&mut c, &records);
    points(&mut c);
    println!(
        "wrote {} seeds ({} bytes) under {}",
        c.written,
        c.bytes,
        c.root.display()
    );
}

// --- NBD ---

const ALL_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_DF
    | FLAG_SEND_CACHE
    | FLAG_SEND_FAST_ZERO;

fn request(kind: u16, flags: u16, offset: u64, length: u32) -> [u8; REQUEST_HEADER_LEN] {
    RequestHeader {
        flags,
        kind,
        cookie: 0x1122_3344_5566_7788,
        offset,
        length,
    }
    .encode()
}

/// The `nbd_request` input: a header, then the limits (size, flags, structured, base_allocation).
fn request_seed(header: [u8; REQUEST_HEADER_LEN], limits: Limits) -> Vec<u8> {
    let mut out = header.to_vec();
    out.extend_from_slice(&limits.size_bytes.to_le_bytes());
    out.extend_from_slice(&limits.flags.to_le_bytes());
    out.push(u8::from(limits.structured_replies));
    out.push(u8::from(limits.base_allocation));
    out
}

fn nbd_request(c: &mut Corpus) {
    let full = Limits {
        size_bytes: 1 << 20,
        flags: ALL_FLAGS,
        structured_replies: true,
        base_allocation: true,
    };
    let read_only = Limits {
        size_bytes: 4097,
        flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH,
        structured_replies: false,
        base_allocation: false,
    };
    let seeds: [(&str, [u8; REQUEST_HEADER_LEN], Limits, bool); 10] = [
        ("read", request(CMD_READ, CMD_FLAG_DF, 0, 4096), full, true),
        (
            "write-fua",
            request(CMD_WRITE, CMD_FLAG_FUA, 8192, 512),
            full,
            true,
        ),
        ("disc", request(CMD_DISC, 0, 0, 0), full, true),
        ("flush", request(CMD_FLUSH, 0, 0, 0), full, true),
        ("trim", request(CMD_TRIM, 0, 4096, 4096), full, true),
        ("cache", request(CMD_CACHE, 0, 0, 65536), full, true),
        (
            "write-zeroes",
            request(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                0,
                1 << 20,
            ),
            full,
            true,
        ),
        (
            "block-status",
            request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 512, 1024),
            full,
            true,
        ),
        (
            "read-past-end",
            request(CMD_READ, 0, 4096, 2),
            read_only,
            false,
        ),
        (
            "write-read-only",
            request(CMD_WRITE, 0, 0, 512),
            read_only,
            false,
        ),
    ];
    for (name, header, limits, valid) in seeds {
        let parsed = RequestHeader::parse(&header).expect("request magic");
        assert_eq!(validate(&parsed, &limits).is_ok(), valid, "{name}");
        c.put("nbd_request", name, &request_seed(header, limits));
    }
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    string(&mut d, name);
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    string(&mut d, name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        string(&mut d, q);
    }
    d
}

fn nbd_handshake(c: &mut Corpus) {
    let both = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();

    // What QEMU does: structured replies, base:allocation, GO; then a few requests.
    let mut qemu = both.to_vec();
    option(&mut qemu, OPT_STRUCTURED_REPLY, &[]);
    option(
        &mut qemu,
        OPT_SET_META_CONTEXT,
        &meta_data("disk0", &[META_BASE_ALLOCATION]),
    );
    option(
        &mut qemu,
        OPT_GO,
        &info_data("disk0", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    qemu.extend_from_slice(&request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20));
    qemu.extend_from_slice(&request(CMD_WRITE, CMD_FLAG_FUA, 4096, 16));
    qemu.extend_from_slice(&[0xab; 16]);
    qemu.extend_from_slice(&request(CMD_READ, CMD_FLAG_DF, 4096, 16));
    qemu.extend_from_slice(&request(CMD_DISC, 0, 0, 0));
    c.put("nbd_handshake", "qemu-go", &qemu);

    // An old client: list, info on the default export, then EXPORT_NAME with zeroes.
    let mut old = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    option(&mut old, OPT_LIST, &[]);
    option(&mut old, OPT_INFO, &info_data("", &[]));
    option(&mut old, OPT_EXPORT_NAME, b"ro");
    old.extend_from_slice(&request(CMD_READ, 0, 0, 4097));
    old.extend_from_slice(&request(CMD_WRITE, 0, 0, 4));
    old.extend_from_slice(b"data");
    c.put("nbd_handshake", "list-export-name", &old);

    // nbdinfo --list style: meta contexts listed, unknown export, STARTTLS refused, abort.
    let mut probe = both.to_vec();
    option(&mut probe, OPT_STARTTLS, &[]);
    option(&mut probe, OPT_LIST_META_CONTEXT, &meta_data("disk0", &[]));
    option(&mut probe, OPT_STRUCTURED_REPLY, &[]);
    option(
        &mut probe,
        OPT_LIST_META_CONTEXT,
        &meta_data("disk0", &["base:"]),
    );
    option(&mut probe, OPT_INFO, &info_data("nosuch", &[INFO_NAME]));
    option(&mut probe, 0x7fff, b"unknown option");
    option(&mut probe, OPT_ABORT, &[]);
    c.put("nbd_handshake", "probe-abort", &probe);

    for seed in [&qemu, &old, &probe] {
        let flags: [u8; 4] = seed[..4].try_into().expect("4 bytes");
        parse_client_flags(flags).expect("client flags");
        let head: &[u8; 16] = seed[4..20].try_into().expect("16 bytes");
        parse_option_header(head).expect("option header");
    }
}

// --- journal ---

fn records() -> Vec<(String, Vec<u8>)> {
    let compressible: Vec<u8> = (0..4096u32).map(|i| (i / 64) as u8).collect();
    let noisy: Vec<u8> = (0..512u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let t = 1_795_000_000_000_000_000u64;
    let encoded = [
        (
            "write-lz4",
            Encoded::data(Kind::Write, 0, 1 << 20, &compressible, true),
        ),
        (
            "write-raw",
            Encoded::data(Kind::Write, 1, 4096, &noisy, false),
        ),
        ("zero", Encoded::control(Kind::Zero, 0, 0, 65536, "")),
        ("trim", Encoded::control(Kind::Trim, 1, 8192, 4096, "")),
        ("flush", Encoded::control(Kind::Flush, 0, 0, 0, "")),
        (
            "bookmark",
            Encoded::control(Kind::Bookmark, 0, 0, 0, "before-upgrade"),
        ),
        (
            "sync-begin",
            Encoded::control(Kind::SyncBegin, 0, 0, 0, "seed"),
        ),
        (
            "sync-data",
            Encoded::data(Kind::SyncData, 0, 0, &compressible[..1024], true),
        ),
        ("sync-end", Encoded::control(Kind::SyncEnd, 0, 0, 0, "")),
    ];
    encoded
        .into_iter()
        .enumerate()
        .map(|(i, (name, e))| (name.to_owned(), e.seal(100 + i as u64, t + i as u64)))
        .collect()
}

fn segments(c: &mut Corpus, records: &[(String, Vec<u8>)]) {
    let header = SegmentHeader {
        first_seq: 100,
        created_ns: 1_795_000_000_000_000_000,
    }
    .encode();
    let mut full = header.to_vec();
    for (_, r) in records {
        full.extend_from_slice(r);
    }
    let scan = segment::scan(&full, |_, _| {}).expect("segment header");
    assert!(scan.stop.is_none() && scan.entries.len() == records.len());
    c.put("segment", "full", &full);
    c.put("segment", "empty", &header);
    // A torn tail: the last record cut in the middle, as a crash leaves it.
    let torn = &full[..full.len() - 7];
    assert!(segment::scan(torn, |_, _| {})
        .expect("header")
        .stop
        .is_some());
    c.put("segment", "torn", torn);

    let index = segment::encode_index(100, full.len() as u64, &scan.entries);
    assert_eq!(
        segment::decode_index(&index, full.len() as u64).as_ref(),
        Ok(&scan.entries)
    );
    c.put("segment", "index", &index);
    let empty_index = segment::encode_index(100, header.len() as u64, &[]);
    assert!(segment::decode_index(&empty_index, header.len() as u64).is_ok());
    c.put("segment", "index-empty", &empty_index);
}

fn frames(c: &mut Corpus, records: &[(String, Vec<u8>)]) {
    let hello = Hello {
        protocol: wire::PROTOCOL,
        group: "web".into(),
        volumes: vec![
            Volume {
                name: "root".into(),
                size: 20 << 30,
            },
            Volume {
                name: "data".into(),
                size: 1 << 40,
            },
        ],
        want_hashes: true,
    }
    .encode();
    let welcome = Welcome {
        protocol: wire::PROTOCOL,
        known: true,
        durable_seq: 4242,
    }
    .encode();
    let hashes = Hashes {
        disk: 1,
        first_chunk: 64,
        hashes: vec![
            wire::chunk_hash(&[0u8; 4096]),
            wire::chunk_hash(b"abc"),
            u128::MAX,
        ],
    }
    .encode();
    let done = wire::frame(FrameType::HashesDone, &[]);
    let body: Vec<u8> = records.iter().flat_map(|(_, r)| r.clone()).collect();
    let batch = wire::frame(FrameType::Batch, &body);
    let ack = wire::ack(108);
    let error = wire::error("group \"web\" has 2 volumes, the proxy sent 3");
    let seeds = [
        ("hello", &hello),
        ("welcome", &welcome),
        ("hashes", &hashes),
        ("hashes-done", &done),
        ("batch", &batch),
        ("ack", &ack),
        ("error", &error),
    ];
    for (name, bytes) in seeds {
        assert!(matches!(wire::parse(bytes), Ok(Some(_))), "{name}");
        c.put("wire", name, bytes);
    }
    // Both directions of a short conversation, one frame after another.
    let proxy = [hello.as_slice(), &batch, &error].concat();
    c.put("wire", "stream-proxy", &proxy);
    let replicator = [welcome.as_slice(), &hashes, &done, &ack].concat();
    c.put("wire", "stream-replicator", &replicator);
}

fn points(c: &mut Corpus) {
    let seeds = [
        ("latest", "latest"),
        ("seq", "seq:42"),
        ("bookmark", "bookmark:before-upgrade"),
        ("utc", "2026-11-22T10:15:03Z"),
        ("offset-frac", "2026-11-22T10:15:03.123456789+02:00"),
        ("relative-min", "-5m"),
        ("relative-ms", " -1500ms "),
        ("size-mib", "256MiB"),
        ("size-frac", "1.5k"),
        ("size-gib", "20 GiB"),
        ("duration-h", "24h"),
        ("duration-d", "7d"),
    ];
    for (name, s) in seeds {
        let now = 1_795_000_000_000_000_000;
        let ok = journal::pit::parse_point(s, now).is_ok()
            || journal::units::parse_size(s).is_ok()
            || journal::units::parse_duration(s).is_ok();
        assert!(ok, "{s:?} parses as something");
        c.put("point", name, s.as_bytes());
    }
}
