//! A 28-byte NBD request header, parsed and validated against limits taken from the bytes that
//! follow it. Input: `header[28] | size u64 LE | flags u16 LE | structured u8 | base_allocation u8`
//! (missing tail bytes read as zero). `validate` must never panic, and a request it accepts must
//! lie inside the export: that is the server's promise to every backend.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_server::proto::{REQUEST_HEADER_LEN, REQUEST_MAGIC};
use nbd_server::request::{validate, Command, Limits, RequestHeader};

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<REQUEST_HEADER_LEN>() else {
        return;
    };
    let mut tail = [0u8; 12];
    let n = rest.len().min(tail.len());
    tail[..n].copy_from_slice(&rest[..n]);
    let limits = Limits {
        size_bytes: u64::from_le_bytes(tail[0..8].try_into().expect("8 bytes")),
        flags: u16::from_le_bytes([tail[8], tail[9]]),
        structured_replies: tail[10] & 1 != 0,
        base_allocation: tail[11] & 1 != 0,
    };

    let header = match RequestHeader::parse(head) {
        Ok(header) => header,
        Err(bad) => {
            assert_ne!(bad.0, REQUEST_MAGIC);
            return;
        }
    };
    assert_eq!(&header.encode(), head, "encode(parse(h)) == h");
    let Ok(command) = validate(&header, &limits) else {
        return;
    };
    let range = match command {
        Command::Read { offset, length, .. }
        | Command::Write { offset, length, .. }
        | Command::Trim { offset, length, .. }
        | Command::Cache { offset, length }
        | Command::WriteZeroes { offset, length, .. }
        | Command::BlockStatus { offset, length, .. } => Some((offset, length)),
        Command::Disconnect | Command::Flush => None,
    };
    if let Some((offset, length)) = range {
        assert!(
            offset
                .checked_add(u64::from(length))
                .is_some_and(|end| end <= limits.size_bytes),
            "accepted {command:?} outside an export of {} bytes",
            limits.size_bytes
        );
    }
});
