//! Journal segment files and their indexes, as the store reads them from disk: the input is
//! tried as a segment (`SegmentHeader::decode`, `scan`) and as an index (`decode_index`, with
//! the segment length the index's own header names, so the fuzzer gets past that check). An
//! index built from a scan must decode back to the same entries, and a scan ends cleanly exactly
//! when what follows the records is padding.
#![no_main]

use journal::segment::{
    decode_index, encode_index, is_padding, scan, SegmentHeader, SEGMENT_HEADER_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = SegmentHeader::decode(data) {
        assert_eq!(SegmentHeader::decode(&header.encode()), Ok(header));
    }

    if let Ok(s) = scan(data, |r, _pos| {
        let _ = r.payload();
    }) {
        assert!(s.valid_len as usize <= data.len());
        // A clean end: nothing after the records, or zeros to the end.
        assert_eq!(s.stop.is_none(), is_padding(&data[s.valid_len as usize..]));
        let mut end = SEGMENT_HEADER_LEN as u64;
        for e in &s.entries {
            assert_eq!(e.pos, end, "scan entries tile the segment");
            end = e.end();
        }
        assert_eq!(end, s.valid_len);
        let first_seq = s.entries.first().map_or(0, |e| e.seq);
        let index = encode_index(first_seq, s.valid_len, &s.entries);
        assert_eq!(decode_index(&index, s.valid_len), Ok(s.entries));
    }

    let segment_len = data
        .get(16..24)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if let Ok(entries) = decode_index(data, segment_len) {
        let mut end = SEGMENT_HEADER_LEN as u64;
        for e in &entries {
            assert_eq!(e.pos, end);
            end = e.end();
        }
        assert_eq!(end, segment_len);
    }
});
