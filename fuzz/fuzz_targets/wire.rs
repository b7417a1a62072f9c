//! The proxy-replicator stream: frames parsed one after another from the input (`wire::parse`),
//! and each handed to every body decoder (the one for its type must succeed or fail cleanly;
//! the others must refuse it). What decodes must encode back: byte for byte for the binary
//! frames, value for value for the JSON ones. `read_frame` (the blocking reader both ends use)
//! must agree with `parse`.
#![no_main]

use journal::wire::{
    self, ack, batch_records, decode_ack, read_frame, Frame, FrameType, Hashes, Hello, Refused,
    Welcome,
};
use libfuzzer_sys::fuzz_target;

fn reparse(bytes: &[u8]) -> Frame<'_> {
    let (frame, used) = wire::parse(bytes)
        .expect("an encoded frame parses")
        .expect("whole");
    assert_eq!(used, bytes.len());
    frame
}

fn check(frame: &Frame<'_>, raw: &[u8]) {
    let hello = Hello::decode(frame);
    let welcome = Welcome::decode(frame);
    let acked = decode_ack(frame);
    let hashes = Hashes::decode(frame);
    let refused = Refused::decode(frame);
    let _ = wire::unexpected(frame, "fuzz");
    if frame.kind != FrameType::Hello {
        assert!(hello.is_err());
    }
    if frame.kind != FrameType::Welcome {
        assert!(welcome.is_err());
    }
    if frame.kind != FrameType::Ack {
        assert!(acked.is_err());
    }
    if frame.kind != FrameType::Hashes {
        assert!(hashes.is_err());
    }
    if frame.kind != FrameType::Refused {
        assert!(refused.is_err());
    }
    match frame.kind {
        FrameType::Hello => {
            if let Ok(h) = hello {
                assert_eq!(Hello::decode(&reparse(&h.encode())), Ok(h));
            }
        }
        FrameType::Welcome => {
            if let Ok(w) = welcome {
                assert_eq!(Welcome::decode(&reparse(&w.encode())), Ok(w));
            }
        }
        FrameType::Ack => {
            if let Ok(seq) = acked {
                assert_eq!(ack(seq), raw);
            }
        }
        FrameType::Hashes => {
            if let Ok(h) = hashes {
                assert_eq!(h.encode(), raw);
            }
        }
        FrameType::Batch => {
            let mut used = 0;
            for r in batch_records(frame.body) {
                let Ok(r) = r else { break };
                used += r.header.record_len();
                let _ = r.payload();
            }
            assert!(used <= frame.body.len());
        }
        FrameType::Refused => {
            if let Ok(r) = refused {
                assert_eq!(Refused::decode(&reparse(&r.encode())), Ok(r));
            }
        }
        FrameType::HashesDone | FrameType::Error | FrameType::Keepalive => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        let mut reader = rest;
        match wire::parse(rest) {
            Ok(Some((frame, used))) => {
                let (kind, body) = read_frame(&mut reader, wire::MAX_BODY)
                    .expect("read_frame reads what parse parses");
                assert_eq!((kind, body.as_slice()), (frame.kind, frame.body));
                assert_eq!(reader.len(), rest.len() - used);
                assert_eq!(wire::header(frame.kind, frame.body), rest[..16]);
                check(&frame, &rest[..used]);
                rest = &rest[used..];
            }
            // A frame cut short: read_frame would wait for more (and allocate the whole body
            // first, up to MAX_BODY), so it is not asked.
            Ok(None) => return,
            Err(_) => {
                assert!(read_frame(&mut reader, wire::MAX_BODY).is_err());
                return;
            }
        }
    }
});
