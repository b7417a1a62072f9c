//! Malformed input sent as raw bytes: each case gets the spec's reply (or a closed connection
//! where the spec allows no reply), and neither the server nor other connections suffer.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use tests::raw::*;
use tests::{make_image, pattern, read_file, Proxy};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

struct Fixture {
    _dir: tempfile::TempDir,
    image: std::path::PathBuf,
    proxy: Proxy,
}

fn fixture(extra: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, SIZE, &[(0, &pattern(9, 4096))]).unwrap();
    let disk = format!("disk={}", image.display());
    let mut args = vec!["--disk", disk.as_str()];
    args.extend_from_slice(extra);
    let proxy = Proxy::start(&dir.path().join("nbd.sock"), &args).unwrap();
    Fixture {
        _dir: dir,
        image,
        proxy,
    }
}

/// A connection in transmission (simple replies unless `structured`).
fn connect(f: &Fixture, structured: bool) -> RawClient {
    let mut c = RawClient::connect(&f.proxy.socket);
    let (size, _) = c.go("disk", structured, structured);
    assert_eq!(size, SIZE);
    c
}

/// A good read still works: the connection (or the server) is alive.
fn assert_serves(c: &mut RawClient) {
    c.request(CMD_READ, 0, 777, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (0, 777));
    assert_eq!(c.read(4096), pattern(9, 4096));
}

#[test]
fn out_of_range_requests_get_einval_or_enospc_and_the_connection_continues() {
    let mut f = fixture(&[]);
    let before = read_file(&f.image);
    let mut c = connect(&f, false);
    c.request(CMD_READ, 0, 1, SIZE - 4096, 8192, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 1));
    c.request(CMD_READ, 0, 2, u64::MAX - 10, 4096, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 2));
    c.request(CMD_BLOCK_STATUS, 0, 3, 0, 4096, &[]);
    assert_eq!(
        c.simple_reply(),
        (EINVAL, 3),
        "block status without a negotiated context"
    );
    // A write beyond the end is ENOSPC (the spec's SHOULD), and its payload is skipped.
    c.request(CMD_WRITE, 0, 4, SIZE, 4096, &[0xee; 4096]);
    assert_eq!(c.simple_reply(), (ENOSPC, 4));
    assert_serves(&mut c);
    f.proxy.stop().unwrap();
    assert!(
        read_file(&f.image) == before,
        "a refused write reached the image"
    );
}

#[test]
fn unknown_command_and_unknown_flags_get_einval() {
    let mut f = fixture(&[]);
    let mut c = connect(&f, false);
    c.request(42, 0, 5, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 5));
    c.request(CMD_READ, 1 << 12, 6, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 6));
    assert_serves(&mut c);
    f.proxy.stop().unwrap();
}

#[test]
fn oversized_write_is_refused_without_allocating_its_length() {
    let mut f = fixture(&[]);
    let mut c = connect(&f, false);
    let rss_before = f.proxy.peak_rss_bytes().unwrap();
    // 96 MiB: past the maximum payload (64 MiB). The server must stream it away, not buffer it.
    let len = 96 * MIB as u32;
    c.send(&request_bytes(CMD_WRITE, 0, 8, 0, len));
    let chunk = vec![0x5a; MIB as usize];
    for _ in 0..96 {
        c.send(&chunk);
    }
    assert_eq!(c.simple_reply(), (EINVAL, 8));
    assert_serves(&mut c);
    let grown = f.proxy.peak_rss_bytes().unwrap().saturating_sub(rss_before);
    assert!(
        grown < 24 * MIB,
        "peak RSS grew by {grown} bytes for a refused 96 MiB write"
    );
    f.proxy.stop().unwrap();
    assert_eq!(&read_file(&f.image)[..4096], &pattern(9, 4096)[..]);
}

#[test]
fn structured_errors_for_reads_carry_a_message() {
    let mut f = fixture(&[]);
    let mut c = connect(&f, true);
    c.request(CMD_READ, 0, 9, SIZE, 1, &[]);
    let chunk = c.chunk();
    assert_eq!(
        (chunk.cookie, chunk.flags, chunk.kind),
        (9, 1, 0x8001),
        "{chunk:?}"
    );
    assert_eq!(be32(&chunk.payload[..4]), EINVAL);
    let msg_len = be16(&chunk.payload[4..6]) as usize;
    assert!(String::from_utf8_lossy(&chunk.payload[6..6 + msg_len]).contains("outside the export"));
    // A good structured read: one OFFSET_DATA chunk with DONE.
    c.request(CMD_READ, 0, 10, 0, 4096, &[]);
    let chunk = c.chunk();
    assert_eq!((chunk.flags, chunk.kind), (1, 1));
    assert_eq!(&chunk.payload[8..], &pattern(9, 4096)[..]);
    // Block status with the context negotiated.
    c.request(CMD_BLOCK_STATUS, 0, 11, 0, 2 * MIB as u32, &[]);
    let chunk = c.chunk();
    assert_eq!((chunk.flags, chunk.kind), (1, 5));
    assert_eq!(be32(&chunk.payload[0..4]), 1, "context id");
    assert_eq!(be32(&chunk.payload[8..12]), 0, "first extent is data");
    f.proxy.stop().unwrap();
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let mut f = fixture(&[]);
    let mut bystander = connect(&f, false);
    let mut c = connect(&f, false);
    let mut bad = request_bytes(CMD_READ, 0, 1, 0, 512);
    bad[0] = 0xde;
    c.send(&bad);
    assert!(
        c.closed(),
        "the server must close a connection that sent a bad magic"
    );
    assert_serves(&mut bystander);
    let mut fresh = connect(&f, false);
    assert_serves(&mut fresh);
    f.proxy.stop().unwrap();
}

#[test]
fn truncated_header_closes_that_connection_and_the_server_serves_on() {
    let mut f = fixture(&[]);
    {
        let mut c = connect(&f, false);
        c.send(&request_bytes(CMD_READ, 0, 1, 0, 512)[..11]);
        c.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(c.closed());
    }
    {
        // Truncated in the middle of a write payload.
        let mut c = connect(&f, false);
        c.send(&request_bytes(CMD_WRITE, 0, 2, 0, 8192));
        c.send(&[1u8; 100]);
        c.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(c.closed());
    }
    let mut fresh = connect(&f, false);
    assert_serves(&mut fresh);
    f.proxy.stop().unwrap();
}

#[test]
fn unknown_export_names() {
    let mut f = fixture(&[]);
    // NBD_OPT_GO: an error reply, and negotiation continues.
    let mut c = RawClient::connect(&f.proxy.socket);
    c.send(&3u32.to_be_bytes());
    c.option(OPT_GO, &go_data("nope"));
    let (opt, kind, msg) = c.option_reply();
    assert_eq!((opt, kind), (OPT_GO, REP_ERR_UNKNOWN));
    assert!(
        String::from_utf8_lossy(&msg).contains("disk"),
        "the error names the exports"
    );
    c.option(0x1234, &[1, 2, 3]);
    assert_eq!(c.option_reply().1, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]); // a unix socket offers no TLS
    assert_eq!(c.option_reply().1, REP_ERR_POLICY);
    c.option(OPT_GO, &go_data("disk"));
    while c.option_reply().1 != REP_ACK {}
    assert_serves(&mut c);
    // NBD_OPT_EXPORT_NAME can carry no error: the server closes.
    let mut c = RawClient::connect(&f.proxy.socket);
    c.send(&3u32.to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    f.proxy.stop().unwrap();
}

#[test]
fn oversized_option_and_bad_option_magic() {
    let mut f = fixture(&[]);
    let mut c = RawClient::connect(&f.proxy.socket);
    c.send(&3u32.to_be_bytes());
    c.option(OPT_GO, &vec![0u8; 1 << 20]);
    assert_eq!(c.option_reply().1, REP_ERR_TOO_BIG);
    c.option(OPT_GO, &go_data("disk"));
    while c.option_reply().1 != REP_ACK {}
    assert_serves(&mut c);

    let mut c = RawClient::connect(&f.proxy.socket);
    c.send(&3u32.to_be_bytes());
    c.send(b"NOTANOPT\0\0\0\x07\0\0\0\0");
    assert!(c.closed());
    let mut c = RawClient::connect(&f.proxy.socket);
    c.send(&0x8000_0000u32.to_be_bytes()); // unknown client flags
    assert!(c.closed());
    f.proxy.stop().unwrap();
}

#[test]
fn read_only_export_answers_eperm() {
    let mut f = fixture(&["--read-only"]);
    let mut c = connect(&f, false);
    c.request(CMD_WRITE, 0, 3, 0, 512, &[1; 512]);
    assert_eq!(c.simple_reply(), (EPERM, 3));
    assert_serves(&mut c);
    f.proxy.stop().unwrap();
}

#[test]
fn disconnect_after_pipelined_writes_answers_them_all_first() {
    let mut f = fixture(&[]);
    let mut c = connect(&f, false);
    let mut burst = Vec::new();
    for i in 0..64u64 {
        burst.extend_from_slice(&request_bytes(CMD_WRITE, 0, 100 + i, MIB + i * 4096, 4096));
        burst.extend_from_slice(&pattern(i, 4096));
    }
    burst.extend_from_slice(&request_bytes(CMD_FLUSH, 0, 1000, 0, 0));
    burst.extend_from_slice(&request_bytes(CMD_DISC, 0, 1001, 0, 0));
    c.send(&burst);
    let mut cookies: Vec<u64> = (0..65)
        .map(|_| c.simple_reply())
        .map(|(err, cookie)| {
            assert_eq!(err, 0);
            cookie
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, (100..164).chain([1000]).collect::<Vec<_>>());
    assert!(c.closed());
    f.proxy.stop().unwrap();
    let img = read_file(&f.image);
    for i in 0..64u64 {
        let at = (MIB + i * 4096) as usize;
        assert_eq!(&img[at..at + 4096], &pattern(i, 4096)[..]);
    }
}

#[test]
fn structured_reads_send_holes_as_offset_hole_and_df_as_one_chunk() {
    let mut f = fixture(&[]);
    let mut c = connect(&f, true);
    // 0..4096 is data, the rest of the first MiB a hole.
    c.request(CMD_READ, 0, 20, 0, MIB as u32, &[]);
    let mut chunks = Vec::new();
    loop {
        let chunk = c.chunk();
        let done = chunk.flags & 1 != 0;
        chunks.push(chunk);
        if done {
            break;
        }
    }
    let kinds: Vec<u16> = chunks.iter().map(|c| c.kind).collect();
    assert_eq!(kinds, [1, 2, 0], "OFFSET_DATA, OFFSET_HOLE, NONE");
    assert_eq!(&chunks[0].payload[..8], &0u64.to_be_bytes());
    assert_eq!(&chunks[0].payload[8..], &pattern(9, 4096)[..]);
    assert_eq!(
        &chunks[1].payload,
        &[
            &4096u64.to_be_bytes()[..],
            &(MIB as u32 - 4096).to_be_bytes()
        ]
        .concat()
    );
    // With DF: exactly one content chunk, zeroes included.
    c.request(CMD_READ, 1 << 2, 21, 0, 65536, &[]);
    let chunk = c.chunk();
    assert_eq!(
        (chunk.flags, chunk.kind, chunk.payload.len()),
        (1, 1, 8 + 65536)
    );
    assert!(chunk.payload[8 + 4096..].iter().all(|&b| b == 0));
    f.proxy.stop().unwrap();
}

/// 106 MiB of refused requests from a client that reads no reply: the error replies count
/// against the connection's in-flight budget, so the server stops reading (TCP pushes back)
/// instead of queueing millions of replies. Before: nbd-proxy grew from 4 to 456 MiB.
#[test]
fn error_replies_count_against_the_memory_bound() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut f = fixture(&[]);
    let c = connect(&f, false);
    let rss_before = f.proxy.peak_rss_bytes().unwrap();
    const REQUESTS: u64 = 106 * MIB / 28;
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let mut writer = c.stream.try_clone().unwrap();
    let progress = sent.clone();
    let blaster = std::thread::spawn(move || {
        // Unknown command 42: EINVAL each, 28 bytes each, no payload.
        let batch: Vec<u8> = (0..4096u64)
            .flat_map(|i| request_bytes(42, 0, i, 0, 0))
            .collect();
        let mut n = 0;
        while n < REQUESTS {
            let k = (REQUESTS - n).min(4096);
            writer.write_all(&batch[..k as usize * 28]).unwrap();
            n += k;
            progress.store(n, Ordering::SeqCst);
        }
    });
    // Let the server take what it will: until the blaster stops making progress (it is
    // pushed back) or finishes.
    let mut last = 0;
    let mut still_since = std::time::Instant::now();
    while !blaster.is_finished() && still_since.elapsed() < std::time::Duration::from_secs(3) {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = sent.load(Ordering::SeqCst);
        if now != last {
            last = now;
            still_since = std::time::Instant::now();
        }
    }
    let grown = f.proxy.peak_rss_bytes().unwrap().saturating_sub(rss_before);
    assert!(
        !blaster.is_finished() || grown < 64 * MIB,
        "the server read {} MiB of garbage and grew by {} MiB",
        sent.load(Ordering::SeqCst) * 28 / MIB,
        grown / MIB
    );
    // Now read every reply: each is EINVAL with its cookie, and the server goes on.
    let mut reader = std::io::BufReader::with_capacity(1 << 20, c.stream.try_clone().unwrap());
    let mut reply = [0u8; 16];
    for i in 0..REQUESTS {
        reader.read_exact(&mut reply).unwrap();
        assert_eq!(be32(&reply[4..8]), EINVAL);
        assert_eq!(
            u64::from_be_bytes(reply[8..16].try_into().unwrap()),
            i % 4096
        );
    }
    blaster.join().unwrap();
    let grown = f.proxy.peak_rss_bytes().unwrap().saturating_sub(rss_before);
    eprintln!(
        "106 MiB of refused requests: peak RSS grew by {:.1} MiB",
        grown as f64 / MIB as f64
    );
    assert!(grown < 64 * MIB, "peak RSS grew by {} MiB", grown / MIB);
    let mut c = c;
    assert_serves(&mut c);
    f.proxy.stop().unwrap();
}

/// Zero-length commands (which the spec leaves to the server) succeed and change nothing, in
/// both reply modes; the connection goes on.
#[test]
fn zero_length_commands_succeed_and_change_nothing() {
    let mut f = fixture(&[]);
    let before = read_file(&f.image);
    for structured in [false, true] {
        let mut c = connect(&f, structured);
        for (i, kind) in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_READ]
            .into_iter()
            .enumerate()
        {
            let cookie = 100 + i as u64;
            c.request(kind, 0, cookie, 4096, 0, &[]);
            if structured && kind == CMD_READ {
                // One chunk: NBD_REPLY_TYPE_NONE with the DONE flag.
                let chunk = c.chunk();
                assert_eq!((chunk.cookie, chunk.kind, chunk.flags & 1), (cookie, 0, 1));
            } else {
                assert_eq!(c.simple_reply(), (0, cookie), "command {kind}");
            }
        }
        if !structured {
            assert_serves(&mut c);
        }
    }
    f.proxy.stop().unwrap();
    assert!(read_file(&f.image) == before);
}
