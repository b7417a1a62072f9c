use super::*;
use proptest::prelude::*;

use crate::testdata::pattern;

#[test]
fn data_record_round_trips_compressed_and_not() {
    for (data, compress) in [
        (vec![7u8; 65536], true),
        (
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761u32) >> 24) as u8)
                .collect(),
            true,
        ),
        (vec![1u8; 4096], false),
    ] {
        let enc = Encoded::data(Kind::Write, 2, 8192, &data, compress);
        let sealed = enc.seal(99, 1234);
        let r = parse(&sealed).unwrap().unwrap();
        assert_eq!(r.header.seq, 99);
        assert_eq!(r.header.time_ns, 1234);
        assert_eq!(r.header.disk, 2);
        assert_eq!(r.header.offset, 8192);
        assert_eq!(r.header.length, data.len() as u64);
        assert_eq!(r.payload().unwrap().as_ref(), &data[..]);
        assert_eq!(seq_of(&sealed), 99);
    }
    // Highly compressible data is stored compressed.
    let sealed = Encoded::data(Kind::Write, 0, 0, &[0u8; 65536], true).seal(1, 0);
    assert!(sealed.len() < 1024);
}

#[test]
fn control_records_carry_range_and_text() {
    let sealed = Encoded::control(Kind::Bookmark, 0, 0, 0, "before-upgrade").seal(5, 6);
    let r = parse(&sealed).unwrap().unwrap();
    assert_eq!(r.header.kind, Kind::Bookmark);
    assert_eq!(r.text(), "before-upgrade");
    let sealed = Encoded::control(Kind::Trim, 1, 4096, 1 << 40, "").seal(6, 7);
    let r = parse(&sealed).unwrap().unwrap();
    assert_eq!((r.header.offset, r.header.length), (4096, 1 << 40));
}

#[test]
fn partial_records_ask_for_more() {
    let sealed = Encoded::data(Kind::Write, 0, 0, &[3u8; 100], false).seal(1, 0);
    for cut in [0, 10, HEADER_LEN, sealed.len() - 1] {
        assert!(parse(&sealed[..cut]).unwrap().is_none(), "cut at {cut}");
    }
}

#[test]
fn lying_headers_are_refused() {
    let good = Encoded::data(Kind::Write, 0, 0, &[3u8; 100], false).seal(1, 0);
    let mut b = good.clone();
    b[4] = 200;
    assert_eq!(parse(&b).unwrap_err(), FormatError::Kind(200));
    let mut b = good.clone();
    b[40..44].copy_from_slice(&(MAX_STORED + 1).to_le_bytes());
    assert_eq!(
        parse(&b).unwrap_err(),
        FormatError::TooLarge(MAX_STORED + 1)
    );
    let mut b = good.clone();
    b[32..40].copy_from_slice(&101u64.to_le_bytes());
    assert!(matches!(
        parse(&b).unwrap_err(),
        FormatError::Inconsistent(_)
    ));
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(parse(&b).unwrap_err(), FormatError::Magic(_)));
    // A raw payload whose data_crc is not its crc, resealed so the record crc is right: the
    // parse refuses it (payload() trusts a parsed raw payload without summing it again).
    let mut b = good;
    b[44] ^= 1;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[HEADER_LEN..]), &b[..52]);
    b[52..56].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(parse(&b).unwrap_err(), FormatError::DataChecksum);
}

/// Incompressible data: attempts back off (1 in 2, 4, ... up to MAX_SKIP records); the first
/// compressible record after the skipping ends brings every record's attempt back.
#[test]
fn the_compress_gate_backs_off_on_incompressible_data_and_returns() {
    let gate = CompressGate::default();
    let mut attempts = Vec::new();
    for i in 0..2000 {
        let noise = pattern(i, 4096);
        let skip_before = gate.skip.load(std::sync::atomic::Ordering::Relaxed);
        let enc = gate.encode(Kind::Write, 0, 0, &noise);
        assert!(!enc.is_compressed());
        if skip_before == 0 {
            attempts.push(i);
        }
        // Stored uncompressed, the record still parses to the same data.
        let sealed = enc.seal(i + 1, 0);
        assert_eq!(
            parse(&sealed).unwrap().unwrap().payload().unwrap().as_ref(),
            &noise[..]
        );
    }
    let gaps: Vec<u64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(&gaps[..8], &[3, 5, 9, 17, 33, 65, 129, 257]);
    assert!(gaps
        .iter()
        .all(|&g| g <= u64::from(CompressGate::MAX_SKIP) + 1));
    // Compressible data: compressed from the first attempt on, every record.
    let zeros = vec![0u8; 4096];
    let mut compressed = 0;
    for _ in 0..(CompressGate::MAX_SKIP + 10) {
        compressed += usize::from(gate.encode(Kind::Write, 0, 0, &zeros).is_compressed());
    }
    assert!(compressed >= 10, "{compressed}");
    for _ in 0..100 {
        assert!(gate.encode(Kind::Write, 0, 0, &zeros).is_compressed());
    }
}

proptest! {
    #[test]
    fn any_flipped_bit_is_detected(
        data in proptest::collection::vec(any::<u8>(), 1..2000),
        compress in any::<bool>(),
        bit in any::<proptest::sample::Index>(),
    ) {
        let sealed = Encoded::data(Kind::SyncData, 1, 512, &data, compress).seal(7, 8);
        let mut bad = sealed.clone();
        let i = bit.index(bad.len() * 8);
        bad[i / 8] ^= 1 << (i % 8);
        // Either the header no longer decodes, the record now looks partial, or a checksum fails.
        if let Ok(Some(r)) = parse(&bad) {
            prop_assert!(false, "flipped bit {} accepted as seq {}", i, r.header.seq);
        }
    }

    #[test]
    fn round_trip(data in proptest::collection::vec(0u8..4, 1..5000), seq in any::<u64>()) {
        let sealed = Encoded::data(Kind::Write, 0, 0, &data, true).seal(seq, 1);
        let r = parse(&sealed).unwrap().unwrap();
        prop_assert_eq!(r.header.seq, seq);
        let payload = r.payload().unwrap();
        prop_assert_eq!(payload.as_ref(), &data[..]);
    }
}

/// The bytes of sealed records are the format's (the replicator and stored journals read
/// them): fingerprints taken from the code before `store`/`Header::seal` existed.
#[test]
fn sealed_bytes_are_unchanged() {
    let pattern: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761u32) >> 24) as u8)
        .collect();
    let cases = [
        Encoded::data(Kind::Write, 3, 1 << 30, &pattern, true)
            .seal(12345, 1_700_000_000_000_000_001),
        Encoded::data(Kind::Write, 3, 4096, &pattern, false).seal(7, 8),
        Encoded::data(Kind::SyncData, 0, 0, &[5u8; 65536], true).seal(u64::MAX, 1),
        Encoded::data(Kind::Write, 1, 9, &[1, 2, 3], true).seal(2, 3),
        Encoded::control(Kind::Bookmark, 0, 0, 0, "before-upgrade").seal(5, 6),
        Encoded::control(Kind::Trim, 1, 4096, 1 << 40, "").seal(6, 7),
    ];
    let got: Vec<(usize, u32, String)> = cases
        .iter()
        .map(|b| {
            let head: String = b[..HEADER_LEN].iter().map(|x| format!("{x:02x}")).collect();
            (b.len(), crc32c::crc32c(b), head)
        })
        .collect();
    let want = [
        (2397, 1630567631, "4344505201010300393000000000000001002a36fe9c971700000040000000000010000000000000250900005315d84a00000000cd0ac877"),
        (4152, 2065130947, "43445052010003000700000000000000080000000000000000100000000000000010000000000000001000005315d84a00000000e83e7999"),
        (324, 2030376300, "4344505207010000ffffffffffffffff0100000000000000000000000000000000000100000000000c0100003e2b5e28000000005ac8cef5"),
        (59, 3795868306, "43445052010001000200000000000000030000000000000009000000000000000300000000000000030000001ef230f1000000001e71e33f"),
        (70, 737545708, "434450520500000005000000000000000600000000000000000000000000000000000000000000000e0000003be6365000000000a3717fa9"),
        (56, 1214729159, "43445052030001000600000000000000070000000000000000100000000000000000000000010000000000000000000000000000a51e9dec"),
    ];
    let want: Vec<(usize, u32, String)> = want
        .iter()
        .map(|&(len, crc, head)| (len, crc, head.to_owned()))
        .collect();
    assert_eq!(got, want);
}

/// A header sealed apart from its payload ([`Header::seal`] over [`store`]'s result) is the
/// record [`Encoded::seal`] makes, header then stored payload, compressed or not.
#[test]
fn a_header_sealed_apart_from_its_payload_makes_the_same_record() {
    let repeating: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let noise = pattern(1, 5000);
    let mut scratch = Vec::new();
    for data in [&repeating[..], &noise[..], &[9u8][..]] {
        for compress in [true, false] {
            let stored = store(data, compress, &mut scratch);
            let payload = match stored.compressed {
                Some(n) => &scratch[..n],
                None => data,
            };
            let header = Header {
                seq: 41,
                time_ns: 42,
                ..Header::data(Kind::SyncData, 2, 1 << 20, data.len() as u64, &stored)
            };
            let mut apart = header.seal(stored.stored_crc).to_vec();
            apart.extend_from_slice(payload);
            let whole = Encoded::data(Kind::SyncData, 2, 1 << 20, data, compress).seal(41, 42);
            assert_eq!(apart, whole);
        }
    }
}
