//! One journal record as bytes (from a segment file or a batch on the wire): `record::parse`,
//! then for a parsed record its payload (lz4 decompression and the payload crc). Nothing may
//! panic; what parses must re-encode to the same bytes where the encoding is deterministic.
#![no_main]

use journal::record::{self, Encoded, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some(r)) = record::parse(data) else {
        return;
    };
    let h = r.header;
    assert_eq!(r.stored.len(), h.stored_len as usize);
    assert!(h.record_len() <= data.len());
    assert_eq!(record::seq_of(data), h.seq);
    assert_eq!(record::time_of(data), h.time_ns);
    let _ = r.text();
    let Ok(payload) = r.payload() else {
        return;
    };
    let original = &data[..h.record_len()];
    if h.kind.carries_data() {
        assert_eq!(payload.len() as u64, h.length);
        if !h.compressed {
            let again = Encoded::data(h.kind, h.disk, h.offset, &payload, false);
            assert_eq!(again.seal(h.seq, h.time_ns), original);
        } else {
            // Compression may come out differently; the payload must survive it.
            let sealed = Encoded::data(h.kind, h.disk, h.offset, &payload, true).seal(h.seq, 0);
            let back = record::parse(&sealed)
                .expect("re-encoded record parses")
                .expect("whole");
            assert_eq!(back.payload().expect("re-encoded payload"), payload);
        }
    } else if let Ok(text) = std::str::from_utf8(r.stored) {
        let again = Encoded::control(h.kind, h.disk, h.offset, h.length, text);
        assert_eq!(again.seal(h.seq, h.time_ns), original);
    }
    assert!(original.len() >= HEADER_LEN);
});
